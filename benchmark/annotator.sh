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
source benchmark/lib.sh
OUT=${OUT:-runs/bench/annotator}
SFTS=${SFTS:-runs/bench/pipeline}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
SETTINGS=${SETTINGS:-2,0.1,4000 3,0.1,4000 3,0.12,4000 2.5,0.075,4000 3,0.1,8000}  # k,c,pairs
export OMP_NUM_THREADS=1

for s in $SEEDS; do  # the SFT models first, one per seed
    launch run_once "$SFTS/sft_s$s" python sft.py --seed "$s"
done
finish

setting() {  # setting K C PAIRS SEED: the reward model, then PPO on it
    local name="k$1_c$2_n$3" s=$4
    local sft="$SFTS/sft_s$s" rm="$OUT/rm_${name}_s$s"
    run_once "$rm" python benchmark/annotator.py "$1" "$2" "$3" reward_model.py --seed "$s" --model_name_or_path "$sft"
    run_once "$OUT/ppo_${name}_s$s" python ppo.py --seed "$s" --sft_model_path "$sft" --reward_model_path "$rm"
}

for s in $SEEDS; do
    for setting in $SETTINGS; do
        IFS=, read -r k c pairs <<< "$setting"
        launch setting "$k" "$c" "$pairs" "$s"
    done
done
finish
python benchmark/report.py annotator "$OUT" | tee "$OUT/table.md"
