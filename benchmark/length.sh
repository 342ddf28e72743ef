#!/usr/bin/env bash
# Length correlations in RLHF on the toy world ("A Long Way to Go", Singhal et al. 2023; RESULTS.md, length.md): three
# reward models from $SFT (default, --length_balance, --random_augment 0.25); PPO with one budget and seeds on the
# default one, with each RL-side intervention, on the two others, and length-only PPO; then every final policy and
# the SFT policy sampled again on the 256 held-out prompts x $SAMPLES with one seed and scored by every reward model,
# the gold reward, length and KL to the SFT model, so that all rows compare. Tables: $OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SFT=${SFT:-runs/sft}
OUT=${OUT:-runs/bench/length}
SEEDS=${SEEDS:-1 2}
JOBS=${JOBS:-2}
TARGET=${TARGET:-17}     # N of the length penalty: about the SFT policy's mean length
LONG=${LONG:-40}         # LPPO's target: a long one, more than twice the SFT length
SAMPLES=${SAMPLES:-2}    # samples per held-out prompt in the final scoring
BUDGET=(--sft_model_path "$SFT" --total_episodes 3200 --batch_size 64 --eval_every 10 --eval_rows 128)

run() {  # run NAME SCRIPT ARGS...: one training run into $OUT/NAME
    local name=$1; shift
    run_once "$OUT/$name" python "$@"
}

mkdir -p "$OUT"
[ -d "$SFT" ] || { echo "$SFT not found: run \`python sft.py\` first or set SFT=..."; exit 2; }

launch run rm_default reward_model.py --model_name_or_path "$SFT"
launch run rm_balance reward_model.py --model_name_or_path "$SFT" --length_balance
launch run rm_augment reward_model.py --model_name_or_path "$SFT" --random_augment 0.25
finish

RM=(--reward_model_path "$OUT/rm_default")
for seed in $SEEDS; do
    S=(--seed "$seed")
    launch run "ppo_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}"
    launch run "ppo_lenpen_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --length_penalty 0.5 \
        --target_length "$TARGET"
    launch run "ppo_omitlong_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --omit_long
    launch run "ppo_kl0.12_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --kl_coef 0.12
    launch run "ppo_rmbalance_s$seed" ppo.py "${BUDGET[@]}" --reward_model_path "$OUT/rm_balance" "${S[@]}"
    launch run "ppo_rmaugment_s$seed" ppo.py "${BUDGET[@]}" --reward_model_path "$OUT/rm_augment" "${S[@]}"
    launch run "lppo${LONG}_s$seed" ppo.py "${BUDGET[@]}" "${S[@]}" --reward length --target_length "$LONG"
done
finish

# every policy, and the SFT policy, sampled again and scored by every reward model; the tables
python - "$OUT" "$SFT" "$SAMPLES" <<'EOF' | tee "$OUT/table.md"
import json
import random
import re
import sys
from pathlib import Path

import torch

import common

sys.path.insert(0, "benchmark")
from analysis import length_stratified_gain, run_gains  # benchmark/analysis.py

out, sft, samples_per_prompt = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
RMS = ("rm_default", "rm_balance", "rm_augment")
MAX_NEW_TOKENS = 48
tokenizer = common.load_tokenizer(sft)
ref = common.load_model(sft, tokenizer).eval()
_, test = common.load_data(common.TOY, "prompts", tokenizer, test_rows=256)
prompts = [r["prompt"] for r in test] * samples_per_prompt
queries = common.encode_prompts(tokenizer, prompts, common.max_positions(ref) - MAX_NEW_TOKENS)
# the reward models are trained from the SFT model: they read the policies' token ids as they are
reward_models = {rm: common.TokenScores(common.load_model(str(out / rm), tokenizer, "score")).eval() for rm in RMS}


def sample(path: str) -> list[dict]:
    """Samples of a policy on the held-out prompts, each scored by every reward model (cached)."""
    cache = out / f"{Path(path).name}.rescored_samples.json" if path == sft else Path(path) / "rescored_samples.json"
    if cache.exists():
        return json.loads(cache.read_text())
    policy = common.load_model(path, tokenizer).eval()
    scores = {rm: [] for rm in RMS}

    def score_fn(prompts, queries, query_mask, responses, response_mask):
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
        for rm, model in reward_models.items():
            scores[rm] += common.last_token_scores(model, ids, mask).tolist()
        return torch.tensor(scores["rm_default"][-len(ids):])

    _, samples = common.evaluate(policy, ref, tokenizer, prompts, queries, score_fn, MAX_NEW_TOKENS, seed=1234)
    common.gold_metrics(samples)
    for i, s in enumerate(samples):
        s.update({rm: scores[rm][i] for rm in RMS})
    cache.write_text(json.dumps(samples))
    return samples


def mean(xs):
    return sum(xs) / len(xs)


def means(samples: list[dict]) -> dict:
    return {k: mean([float(s[k]) for s in samples]) for k in (*RMS, "gold", "length", "kl", "well_formed", "eos")}


def pearson(xs, ys):
    return torch.corrcoef(torch.tensor([xs, ys], dtype=torch.float64))[0, 1].item()


def bootstrap_share(b_rew, b_len, runs, n=300):
    """5th-95th percentile of the seed-mean of the length share (5-token bins, policy weights)
    when the SFT samples and each seed's policy samples are resampled with replacement."""
    rng = random.Random(0)
    shares = []
    for _ in range(n):
        i = [rng.randrange(len(b_rew)) for _ in b_rew]
        per_seed = []
        for rew, lens in runs:
            j = [rng.randrange(len(rew)) for _ in rew]
            per_seed.append(length_stratified_gain([b_rew[k] for k in i], [b_len[k] for k in i],
                                                   [rew[k] for k in j], [lens[k] for k in j], 5)["length_share"])
        shares.append(mean(per_seed))
    shares.sort()
    return f"{shares[int(0.05 * n)]:.2f} .. {shares[int(0.95 * n)]:.2f}"


def fmt(values, digits=2):
    values = [v for v in values if v == v]
    if not values:
        return "-"
    m = mean(values)
    return f"{m:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


base = sample(sft)
b_rew, b_len = [s["rm_default"] for s in base], [s["length"] for s in base]
print(f"## Reward models (held-out preference pairs; correlation also on {len(base)} SFT samples)\n")
print("| reward model | accuracy | gold_accuracy | label_ceiling | length_corr (pairs) | length_corr (SFT samples) |"
      " accuracy where len(chosen) - len(rejected) <= -6 | accuracy where it is >= 5 |")
print("|---|---|---|---|---|---|---|---|")
for rm in RMS:
    s = json.loads((out / rm / "summary.json").read_text())
    by = s["accuracy_by_length_diff"]

    def acc(pred):
        bins = [(b["n"], b["accuracy"]) for k, b in by.items() if pred(int(re.match(r"-?\d+", k).group()))]
        n = sum(n for n, _ in bins)
        return f"{sum(n * a for n, a in bins) / n:.3f} (n={n})" if n else "-"

    print(f"| {rm} | {s['accuracy']:.3f} | {s['gold_accuracy']:.3f} | {s['label_ceiling']:.3f} | "
          f"{s['length_corr']:.3f} | {pearson([x[rm] for x in base], b_len):.3f} | "
          f"{acc(lambda lo: lo + 4 <= -5)} | {acc(lambda lo: lo >= 5)} |")
# the gold reward itself, for reference: how much does true quality track length?
pairs = common.load_data(common.TOY, "preference", tokenizer, test_rows=256)[1]
gold_pairs = [common.gold_reward(r["prompt"], r[k]) for k in ("chosen", "rejected") for r in pairs]
len_pairs = [len(common.encode_completion(tokenizer, r[k])) - 1 for k in ("chosen", "rejected") for r in pairs]
print(f"| gold reward (reference) | {s['label_ceiling']:.3f} | 1 | - | {pearson(gold_pairs, len_pairs):.3f} | "
      f"{pearson([x['gold'] for x in base], b_len):.3f} | - | - |")

groups: dict[str, list[dict]] = {}
for run in sorted(p for p in out.iterdir() if (p / "summary.json").exists() and re.search(r"_s\d+$", p.name)):
    samples = sample(str(run))
    rew, lens = [s["rm_default"] for s in samples], [s["length"] for s in samples]
    row = means(samples) | {"samples": (rew, lens)}
    base_bins = {n // 5 for n in b_len}
    row["matched"] = mean([n // 5 in base_bins for n in lens])  # share of samples in bins the SFT samples also fill
    for width in (5, 2):
        g = length_stratified_gain(b_rew, b_len, rew, lens, width)
        row |= {"gain": g["reward_gain"], f"strat{width}": g["length_stratified_gain"],
                f"share{width}": g["length_share"]}
    row["share5_both"] = length_stratified_gain(b_rew, b_len, rew, lens, 5, weights="both")["length_share"]
    summary, own = json.loads((run / "summary.json").read_text()), run_gains(run)["reward"]
    row |= {"own_reward": summary["reward"], "own_reward0": summary["initial"]["reward"],
            "own_reward_gain": own["reward_gain"], "own_length_share": own["length_share"]}
    groups.setdefault(re.sub(r"_s\d+$", "", run.name), []).append(row)
ORDER = ["ppo", "ppo_lenpen", "ppo_omitlong", "ppo_kl0.12", "ppo_rmbalance", "ppo_rmaugment"]
groups = dict(sorted(groups.items(), key=lambda kv: (ORDER + [kv[0]]).index(kv[0])))

sft_row = means(base)
print(f"\n## Policies: {len(base)} samples each (256 held-out prompts x {samples_per_prompt}), scored by rm_default; "
      "mean ± half-range over seeds\n")
print("| policy | seeds | rm_default reward | gold | length | KL to SFT | well-formed | EOS rate | reward gain |"
      " stratified gain (5-token bins) | length share (5) | its 90% bootstrap interval | length share (2-token bins) |"
      " length share (5, SFT + policy weights) | samples in shared bins (5) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| SFT | - | {sft_row['rm_default']:.2f} | {sft_row['gold']:.2f} | {sft_row['length']:.1f} | 0 | "
      f"{sft_row['well_formed']:.3f} | {sft_row['eos']:.2f} | - | - | - | - | - | - | - |")
for name, rs in groups.items():
    digits = {"length": 1, "kl": 1, "well_formed": 3}
    cells = [fmt([r[k] for r in rs], digits.get(k, 2))
             for k in ("rm_default", "gold", "length", "kl", "well_formed", "eos", "gain", "strat5", "share5")]
    cells.append(bootstrap_share(b_rew, b_len, [r["samples"] for r in rs]))
    cells += [fmt([r[k] for r in rs]) for k in ("share2", "share5_both", "matched")]
    print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")

print("\n## The same policies under the other reward models, and ppo.py's own evaluation (its 128 samples before and "
      "after training, its training reward; gain and share by benchmark/analysis.py)\n")
print(f"| policy | rm_balance reward (SFT {sft_row['rm_balance']:.2f}) | rm_augment reward (SFT "
      f"{sft_row['rm_augment']:.2f}) | own reward: initial -> final | own reward_gain | own length_share |")
print("|---|---|---|---|---|---|")
for name, rs in groups.items():
    c = {k: fmt([r[k] for r in rs]) for k in ("rm_balance", "rm_augment", "own_reward0", "own_reward",
                                              "own_reward_gain", "own_length_share")}
    print(f"| {name} | {c['rm_balance']} | {c['rm_augment']} | {c['own_reward0']} -> {c['own_reward']} | "
          f"{c['own_reward_gain']} | {c['own_length_share']} |")
EOF
echo "CPU time of the runs (this invocation):"; times
