#!/usr/bin/env bash
# The annotator sweep (RESULTS.md): for each toy annotator setting k,c,pairs and seed, a reward model from the
# pipeline's SFT model of that seed ($SFTS/sft_s<seed>, trained here if missing) on the relabeled pairs, then ppo.py.
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/annotator}
SFTS=${SFTS:-runs/bench/pipeline}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
SETTINGS=${SETTINGS:-2,0.1,4000 3,0.1,4000 3,0.12,4000 2.5,0.075,4000 3,0.1,8000}  # k,c,pairs
export OMP_NUM_THREADS=1

for s in $SEEDS; do  # the SFT models first, as pipeline.sh trains them
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
