#!/usr/bin/env bash
# The annotator sweep: how much of PPO's gain on a learned reward model is true (gold) gain, as a
# function of the toy annotator P(a > b) = sigmoid(k (gold_a - gold_b) + c (len_a - len_b)) and of the
# number of preference pairs. For each setting k,c,pairs and seed: a reward model from that seed's SFT
# model on the pairs relabeled by that annotator, then ppo.py on it, every other flag at its default.
# The SFT models are the 3-seed pipeline's ($SFTS/sft_s<seed>, trained here if missing, with the same
# command as pipeline.sh): the annotator changes only the preference labels.
#
#     bash benchmark/annotator.sh
#     python benchmark/report.py annotator runs/bench/annotator
#
# Runs go to $OUT/rm_<setting>_s<seed> and $OUT/ppo_<setting>_s<seed>; a run whose summary.json exists
# is skipped, and an unfinished one is started again (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench/annotator}
SFTS=${SFTS:-runs/bench/pipeline}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
SETTINGS=${SETTINGS:-2,0.1,4000 3,0.1,4000 3,0.12,4000 2.5,0.075,4000 3,0.1,8000}  # k,c,pairs
export OMP_NUM_THREADS=1
mkdir -p "$OUT" "$SFTS"

for s in $SEEDS; do  # the SFT models first, one per seed, two at a time
    sft="$SFTS/sft_s$s"
    [ -f "$sft/summary.json" ] || python sft.py --seed "$s" --output_dir "$sft" --overwrite > "$sft.log" 2>&1 &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
done
wait

setting() {  # setting K C PAIRS SEED: the reward model, then PPO on it
    local name="k$1_c$2_n$3" s=$4
    local sft="$SFTS/sft_s$s" rm="$OUT/rm_${name}_s$s" ppo="$OUT/ppo_${name}_s$s"
    [ -f "$sft/summary.json" ] || { echo "$sft failed: see $sft.log"; return 1; }
    [ -f "$rm/summary.json" ] || python benchmark/annotator.py "$1" "$2" "$3" reward_model.py --seed "$s" \
        --model_name_or_path "$sft" --output_dir "$rm" --overwrite > "$rm.log" 2>&1 || { echo "$rm failed: see $rm.log"; return 1; }
    [ -f "$ppo/summary.json" ] || python ppo.py --seed "$s" --sft_model_path "$sft" --reward_model_path "$rm" \
        --output_dir "$ppo" --overwrite > "$ppo.log" 2>&1 || { echo "$ppo failed: see $ppo.log"; return 1; }
    echo "$(date +%T) done $name seed $s"
}

pids=()
for s in $SEEDS; do
    for setting in $SETTINGS; do
        IFS=, read -r k c pairs <<< "$setting"
        setting "$k" "$c" "$pairs" "$s" & pids+=($!)
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
    done
done
failed=0; for pid in "${pids[@]}"; do wait "$pid" || failed=1; done; [ "$failed" = 0 ]  # all finish first; then set -e stops on a failure
python benchmark/report.py annotator "$OUT" | tee "$OUT/table.md"
