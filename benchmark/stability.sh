#!/usr/bin/env bash
# Does PPO-max train stably where vanilla PPO collapses? (Zheng et al. 2023's claim, on the toy world.)
# The same setting and policy budget for ppo.py and ppo_max.py, 3 seeds each: no KL penalty
# (--kl_coef 0), under which ppo.py over-optimizes the learned reward model. PPO-max additionally
# spends its --critic_warmup_steps (10) iterations of rollouts on the critic before the 40 policy
# iterations. About 40 minutes on 2 busy CPU cores.
#
#     bash benchmark/stability.sh && python benchmark/stability_table.py runs/bench/stability
#
# Needs runs/sft and the reward model at $RM (default runs/bench/reward_model).
set -euo pipefail
cd "$(dirname "$0")/.."
RM=${RM:-runs/bench/reward_model}
OUT=${OUT:-runs/bench/stability}
SETTING=(--reward_model_path "$RM" --kl_coef 0 --total_episodes 2560 --eval_prompts 64 --eval_every 10)
for seed in 1 2 3; do
  for algo in ppo ppo_max; do
    mkdir -p "$OUT/${algo}_s$seed"
    OMP_NUM_THREADS=1 python "$algo.py" "${SETTING[@]}" --seed "$seed" --output_dir "$OUT/${algo}_s$seed" \
      > "$OUT/${algo}_s$seed/train.log" 2>&1 || { echo "$algo seed $seed failed: see $OUT/${algo}_s$seed/train.log"; exit 1; }
    echo "done $algo seed $seed"
  done
done
