"""How much of an RL run's reward gain is only longer responses: the length-stratified reward gain of "A Long Way
to Go" (Singhal et al. 2023). Bin the responses by length; in each bin holding responses of both the initial policy
(initial_samples.jsonl) and the trained one (samples.jsonl), take the gain in mean reward; average the gains weighted
by the trained policy's counts (--weights both: both policies' counts). A gain that only moves into longer,
higher-scoring bins vanishes from the average: `length_share` = 1 - stratified gain / total gain.

    python benchmark/analysis.py runs/ppo --bin_width 2 --weights both
    python benchmark/analysis.py length_study runs/bench/length SFT_MODEL 2    # the length study's tables
"""

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

Weights = Literal["both", "policy"]


@dataclass
class Args:
    """A run's length-stratified gains (`analysis.py length_study OUT SFT_MODEL SAMPLES_PER_PROMPT`: the tables of
    run_all.sh's length study)."""

    run_dir: tyro.conf.Positional[Path]
    """a finished RL run's folder (it holds initial_samples.jsonl and samples.jsonl)"""
    bin_width: int = 5
    """length bin width in tokens"""
    weights: Weights = "policy"
    """weight of a bin's gain: its count of trained responses (`policy`) or of both policies' (`both`)"""


def length_stratified_gain(base_rewards: list[float], base_lengths: list[int], rewards: list[float],
                           lengths: list[int], bin_width: int = 5, weights: Weights = "policy") -> dict:
    """{reward_gain, length_stratified_gain, length_share}; the last two are NaN when no bin holds both policies'
    responses, the share also when the total gain is 0."""
    bins: dict[int, tuple[list[float], list[float]]] = {}
    for group, (rs, ls) in enumerate(((base_rewards, base_lengths), (rewards, lengths))):
        for r, n in zip(rs, ls):
            bins.setdefault(n // bin_width, ([], []))[group].append(r)
    shared = [(base, new) for base, new in bins.values() if base and new]
    weight = [len(new) + (len(base) if weights == "both" else 0) for base, new in shared]
    gains = [sum(new) / len(new) - sum(base) / len(base) for base, new in shared]
    stratified = sum(w * g for w, g in zip(weight, gains)) / sum(weight) if shared else float("nan")
    total = sum(rewards) / len(rewards) - sum(base_rewards) / len(base_rewards)
    return {"reward_gain": total, "length_stratified_gain": stratified,
            "length_share": 1 - stratified / total if total else float("nan")}


def read_samples(path: Path) -> list[dict]:
    if not path.exists():
        print(f"error: {path} not found: pass the folder of a finished RL run (ppo.py, ppo_max.py, rrhf.py, rcfd.py)",
              file=sys.stderr)
        sys.exit(2)
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not samples:
        print(f"error: {path} holds no samples", file=sys.stderr)
        sys.exit(2)
    return samples


def run_gains(run_dir: Path, bin_width: int = 5, weights: Weights = "policy") -> dict[str, dict]:
    """length_stratified_gain of a run's final samples against its initial ones, on its reward ("reward": the
    samples' `score`) and, on the toy world, on the gold reward ("gold")."""
    base, final = read_samples(Path(run_dir) / "initial_samples.jsonl"), read_samples(Path(run_dir) / "samples.jsonl")
    keys = {"reward": "score"} | ({"gold": "gold"} if all("gold" in s for s in base + final) else {})
    return {name: length_stratified_gain([s[key] for s in base], [s["length"] for s in base],
                                         [s[key] for s in final], [s["length"] for s in final], bin_width, weights)
            for name, key in keys.items()}


def length_study(out: Path, sft: str, samples_per_prompt: int) -> None:
    """The length study's tables (run_all.sh length, length.md): the SFT policy and every finished policy run
    `<name>_s<seed>` in `out`, sampled again on the 256 held-out prompts x samples_per_prompt with one seed, each
    sample scored by the three reward models in `out` (cached as each run's rescored_samples.json)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from report import mean_spread as fmt  # mean ± half-range over seeds, NaN left out

    import common

    rms, new_tokens = ("rm_default", "rm_balance", "rm_augment"), 48
    tokenizer = common.load_tokenizer(sft)
    ref = common.load_model(sft, tokenizer).eval()
    _, test = common.load_data(common.TOY, "prompts", tokenizer, test_rows=256)
    prompts = [r["prompt"] for r in test] * samples_per_prompt
    queries = common.encode_prompts(tokenizer, prompts, common.max_positions(ref) - new_tokens)
    # the reward models are trained from the SFT model: they read the policies' token ids as they are
    reward_models = {rm: common.TokenScores(common.load_model(str(out / rm), tokenizer, "score")).eval()
                     for rm in rms}

    def sample(path: str, cache: Path) -> list[dict]:
        if cache.exists():
            return json.loads(cache.read_text())
        policy = common.load_model(path, tokenizer).eval()
        scores = {rm: [] for rm in rms}

        def score_fn(prompts, queries, query_mask, responses, response_mask):
            ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask], 1)
            for rm, model in reward_models.items():
                scores[rm] += common.last_token_scores(model, ids, mask).tolist()
            return torch.tensor(scores["rm_default"][-len(ids):])

        _, samples = common.evaluate(policy, ref, tokenizer, prompts, queries, score_fn, new_tokens, seed=1234)
        common.gold_metrics(samples)
        for i, s in enumerate(samples):
            s.update({rm: scores[rm][i] for rm in rms})
        cache.write_text(json.dumps(samples))
        return samples

    def mean(xs):
        return sum(xs) / len(xs)

    def pearson(xs, ys):
        return torch.corrcoef(torch.tensor([xs, ys], dtype=torch.float64))[0, 1].item()

    def bootstrap_share(runs, n=300):
        """5th-95th percentile of the seeds' mean length share (5-token bins, policy weights), the SFT samples and
        each seed's policy samples resampled with replacement."""
        rng, shares = random.Random(0), []
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

    base = sample(sft, out / f"{Path(sft).name}.rescored_samples.json")
    b_rew, b_len = [s["rm_default"] for s in base], [s["length"] for s in base]
    print(f"## Reward models (held-out preference pairs; correlation also on {len(base)} SFT samples)\n")
    print("| reward model | accuracy | gold_accuracy | label_ceiling | length_corr (pairs) | length_corr (SFT samples)"
          " | accuracy where len(chosen) - len(rejected) <= -6 | accuracy where it is >= 5 |\n" + "|---" * 8 + "|")
    def accuracy(by_length_diff, pred):  # over the length-difference bins whose lower bound passes pred
        bins = [(b["n"], b["accuracy"]) for k, b in by_length_diff.items() if pred(int(re.match(r"-?\d+", k).group()))]
        n = sum(n for n, _ in bins)
        return f"{sum(n * a for n, a in bins) / n:.3f} (n={n})" if n else "-"

    for rm in rms:
        s = json.loads((out / rm / "summary.json").read_text())
        print(f"| {rm} | {s['accuracy']:.3f} | {s['gold_accuracy']:.3f} | {s['label_ceiling']:.3f} | "
              f"{s['length_corr']:.3f} | {pearson([x[rm] for x in base], b_len):.3f} | "
              f"{accuracy(s['accuracy_by_length_diff'], lambda lo: lo + 4 <= -5)} | "
              f"{accuracy(s['accuracy_by_length_diff'], lambda lo: lo >= 5)} |")
    # the gold reward itself, for reference: how much does true quality track length?
    pairs = [(r["prompt"], r[k]) for k in ("chosen", "rejected")
             for r in common.load_data(common.TOY, "preference", tokenizer, test_rows=256)[1]]
    gold_pairs = [common.gold_reward(p, c) for p, c in pairs]
    len_pairs = [len(common.encode_completion(tokenizer, c)) - 1 for _, c in pairs]
    print(f"| gold reward (reference) | {s['label_ceiling']:.3f} | 1 | - | {pearson(gold_pairs, len_pairs):.3f} | "
          f"{pearson([x['gold'] for x in base], b_len):.3f} | - | - |")

    keys = (*rms, "gold", "length", "kl", "well_formed", "eos")
    groups, base_bins = {}, {n // 5 for n in b_len}
    for run in sorted(p for p in out.iterdir() if (p / "summary.json").exists() and re.search(r"_s\d+$", p.name)):
        samples = sample(str(run), run / "rescored_samples.json")
        rew, lens = [s["rm_default"] for s in samples], [s["length"] for s in samples]
        row = {k: mean([float(s[k]) for s in samples]) for k in keys} | {"samples": (rew, lens)}
        row["matched"] = mean([n // 5 in base_bins for n in lens])  # share of samples in bins the SFT samples fill
        for width in (5, 2):
            g = length_stratified_gain(b_rew, b_len, rew, lens, width)
            row |= {"gain": g["reward_gain"], f"strat{width}": g["length_stratified_gain"],
                    f"share{width}": g["length_share"]}
        row["share5_both"] = length_stratified_gain(b_rew, b_len, rew, lens, 5, weights="both")["length_share"]
        summary, own = json.loads((run / "summary.json").read_text()), run_gains(run)["reward"]
        row |= {"own_reward": summary["reward"], "own_reward0": summary["initial"]["reward"],
                "own_reward_gain": own["reward_gain"], "own_length_share": own["length_share"]}
        groups.setdefault(re.sub(r"_s\d+$", "", run.name), []).append(row)
    order = ["ppo", "ppo_lenpen", "ppo_omitlong", "ppo_kl0.12", "ppo_rmbalance", "ppo_rmaugment"]
    groups = dict(sorted(groups.items(), key=lambda kv: (order + [kv[0]]).index(kv[0])))

    sft_row = {k: mean([float(s[k]) for s in base]) for k in keys}
    print(f"\n## Policies: {len(base)} samples each (256 held-out prompts x {samples_per_prompt}), scored by "
          "rm_default; mean ± half-range over seeds\n")
    print("| policy | seeds | rm_default reward | gold | length | KL to SFT | well-formed | EOS rate | reward gain |"
          " stratified gain (5-token bins) | length share (5) | its 90% bootstrap interval | length share (2-token"
          " bins) | length share (5, SFT + policy weights) | samples in shared bins (5) |\n" + "|---" * 15 + "|")
    print(f"| SFT | - | {sft_row['rm_default']:.2f} | {sft_row['gold']:.2f} | {sft_row['length']:.1f} | 0 | "
          f"{sft_row['well_formed']:.3f} | {sft_row['eos']:.2f} | - | - | - | - | - | - | - |")
    digits = {"length": 1, "kl": 1, "well_formed": 3}
    for name, rs in groups.items():
        cells = [fmt([r[k] for r in rs], digits.get(k, 2))
                 for k in ("rm_default", "gold", "length", "kl", "well_formed", "eos", "gain", "strat5", "share5")]
        cells += [bootstrap_share([r["samples"] for r in rs]),
                  *(fmt([r[k] for r in rs]) for k in ("share2", "share5_both", "matched"))]
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |")

    print("\n## The same policies under the other reward models, and ppo.py's own evaluation (its 128 samples before "
          "and after training, its training reward; gain and share by benchmark/analysis.py)\n")
    print(f"| policy | rm_balance reward (SFT {sft_row['rm_balance']:.2f}) | rm_augment reward (SFT "
          f"{sft_row['rm_augment']:.2f}) | own reward: initial -> final | own reward_gain | own length_share |\n"
          + "|---" * 6 + "|")
    for name, rs in groups.items():
        c = {k: fmt([r[k] for r in rs]) for k in ("rm_balance", "rm_augment", "own_reward0", "own_reward",
                                                  "own_reward_gain", "own_length_share")}
        print(f"| {name} | {c['rm_balance']} | {c['rm_augment']} | {c['own_reward0']} -> {c['own_reward']} | "
              f"{c['own_reward_gain']} | {c['own_length_share']} |")


if __name__ == "__main__" and sys.argv[1:2] == ["length_study"]:
    if len(sys.argv) != 5:
        print("usage: python benchmark/analysis.py length_study OUT SFT_MODEL SAMPLES_PER_PROMPT", file=sys.stderr)
        sys.exit(2)
    length_study(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
elif __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    if args.bin_width < 1:
        print(f"error: --bin_width must be positive, got {args.bin_width}", file=sys.stderr)
        sys.exit(2)
    for name, gain in run_gains(args.run_dir, args.bin_width, args.weights).items():
        print(f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in gain.items()))
