#!/usr/bin/env bash
# Does PPO-max train stably where vanilla PPO collapses? (Zheng et al. 2023's claim, on the toy world.)
# The same setting and policy budget for ppo.py and ppo_max.py, 3 seeds each: no KL penalty
# (--kl_coef 0), under which ppo.py over-optimizes the learned reward model, 40 policy iterations of
# 64 rollouts. PPO-max additionally spends its --critic_warmup_steps (10) iterations of rollouts on
# the critic before its 40 policy iterations. Then two follow-ups (runs/bench/stability_extra):
# PPO-max with the pretraining loss (--ptx_coef 0.5, 3 seeds), and ppo.py with PPO-max's optimizer
# budget (one pass over the rollouts in 4 minibatches, 3 seeds), to separate "fewer updates" from the
# rest of PPO-max. $JOBS runs at a time (default 2), one thread each.
#
#     bash benchmark/stability.sh
#     python benchmark/report.py stability runs/bench/stability
#     python benchmark/report.py stability runs/bench/stability_extra
#
# Needs the SFT model at $SFT and the reward model at $RM (defaults runs/sft and runs/reward_model: run the
# default pipeline first).
# A run whose summary.json exists is skipped, and an unfinished one is started again (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
export OMP_NUM_THREADS=1
SFT=${SFT:-runs/sft}
RM=${RM:-runs/reward_model}
OUT=${OUT:-runs/bench}
JOBS=${JOBS:-2}
SETTING=(--sft_model_path "$SFT" --reward_model_path "$RM" --kl_coef 0 --total_episodes 2560 --eval_rows 64 --eval_every 10)

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
