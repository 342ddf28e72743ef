#!/usr/bin/env bash
# PPO-max against ppo.py with no KL penalty (Zheng et al. 2023's stability claim, RESULTS.md), 40 policy iterations
# of 64 rollouts, 3 seeds; then PPO-max with --ptx_coef 0.5 and ppo.py with PPO-max's update budget
# ($OUT/stability_extra). From $SFT and $RM.
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=1
SFT=${SFT:-runs/sft}
RM=${RM:-runs/reward_model}
OUT=${OUT:-runs/bench}
JOBS=${JOBS:-2}
SETTING=(--sft_model_path "$SFT" --reward_model_path "$RM" --kl_coef 0 --total_episodes 2560 --eval_rows 64
         --eval_every 10)

run() {  # run RUN_DIR SCRIPT [extra flags...]: one run in the study's setting
    local dir=$1 script=$2
    shift 2
    run_once "$dir" python "$script" "${SETTING[@]}" "$@"
}
for seed in 1 2 3; do
    launch run "$OUT/stability/ppo_s$seed" ppo.py --seed "$seed"
    launch run "$OUT/stability/ppo_max_s$seed" ppo_max.py --seed "$seed"
done
for seed in 1 2 3; do
    launch run "$OUT/stability_extra/ppo_max_ptx0.5_s$seed" ppo_max.py --seed "$seed" --ptx_coef 0.5
    launch run "$OUT/stability_extra/ppo_1pass_s$seed" ppo.py --seed "$seed" --num_ppo_epochs 1 --num_mini_batches 4
done
finish
python benchmark/report.py stability "$OUT/stability"
python benchmark/report.py stability "$OUT/stability_extra"
