#!/usr/bin/env bash
# RRHF (Yuan et al. 2023, RESULTS.md): the default offline sources, online sampling with and without a KL term,
# and both ranked by the gold reward; 3 seeds from $SFT and $RM, rrhf.py's default budget.
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/rrhf}
SFT=${SFT:-runs/sft}
RM=${RM:-runs/reward_model}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-3}
export OMP_NUM_THREADS=1

run() {  # run NAME ARGS...: one rrhf.py run into $OUT/NAME
    local name=$1; shift
    run_once "$OUT/$name" python rrhf.py --sft_model_path "$SFT" --reward_model_path "$RM" "$@"
}
seed_runs() {
    local s=$1
    run "default_s$s" --seed "$s"
    run "online_s$s" --seed "$s" --sources online
    run "online_kl0.05_s$s" --seed "$s" --sources online --kl_coef 0.05
    run "gold_s$s" --seed "$s" --reward gold
    run "gold_online_s$s" --seed "$s" --reward gold --sources online
}
for s in $SEEDS; do launch seed_runs "$s"; done
finish
python benchmark/report.py table "$OUT" --initial default \
    --keys gold reward kl length well_formed wall_time peak_memory_mb | tee "$OUT/table.md"
