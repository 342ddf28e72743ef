#!/usr/bin/env bash
# How much of PPO's gain on a learned reward model is true (gold) gain, as a function of the toy
# annotator P(a > b) = sigmoid(k (gold_a - gold_b) + c (len_a - len_b)): for each (k, c), a reward
# model from $SFT on the same preference pairs relabeled with that annotator, then ppo.py on it with
# 50 iterations of 64 responses (seed 1, 128 held-out prompts). About 20 minutes on 2 cores.
#
#     bash benchmark/annotator.sh
#     python benchmark/report.py table runs/bench/annotator --initial ppo_k2_c0.1 \
#         --keys gold reward kl length well_formed
#
# Runs go to $OUT/rm_k<k>_c<c> and $OUT/ppo_k<k>_c<c>_s1; a run whose summary.json exists is skipped,
# and an unfinished one is started again (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench/annotator}
SFT=${SFT:-runs/sft}
JOBS=${JOBS:-2}
SETTINGS=${SETTINGS:-2,0.1 4,0.2 2,0.067 3,0.1 4,0.1 4,0.05}  # k,c pairs; 2,0.1 is the toy world
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

setting() {  # setting K C: the reward model, then PPO on it
    local k=$1 c=$2 rm="$OUT/rm_k$1_c$2" ppo="$OUT/ppo_k$1_c$2_s1"
    [ -f "$rm/summary.json" ] || python benchmark/annotator.py "$k" "$c" reward_model.py \
        --model_name_or_path "$SFT" --output_dir "$rm" --overwrite > "$rm.log" 2>&1 || { echo "$rm failed: see $rm.log"; return 1; }
    [ -f "$ppo/summary.json" ] || python ppo.py --sft_model_path "$SFT" --reward_model_path "$rm" \
        --total_episodes 3200 --output_dir "$ppo" --overwrite > "$ppo.log" 2>&1 || { echo "$ppo failed: see $ppo.log"; return 1; }
    echo "$(date +%T) done k=$k c=$c"
}

pids=()
for kc in $SETTINGS; do
    setting "${kc%,*}" "${kc#*,}" & pids+=($!)
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed setting fails the script
for kc in $SETTINGS; do  # one line per setting: the reward model's summary, then PPO's
    python - "$OUT" "${kc%,*}" "${kc#*,}" <<'PY'
import json, sys
out, k, c = sys.argv[1:]
rm = json.load(open(f"{out}/rm_k{k}_c{c}/summary.json"))
ppo = json.load(open(f"{out}/ppo_k{k}_c{c}_s1/summary.json"))
print(f"| {k}, {c} | {float(c) / float(k):.3g} | {rm['accuracy']:.2f} ({rm['label_ceiling']:.2f}) | {rm['gold_accuracy']:.2f} "
      f"| {rm['length_corr']:.2f} | {ppo['gold']:.2f} | {ppo['length']:.1f} | {ppo['well_formed']:.2f} |")
PY
done | tee "$OUT/table.md"
