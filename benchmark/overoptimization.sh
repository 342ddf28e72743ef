#!/usr/bin/env bash
# Reward over-optimization (RESULTS.md, overoptimization.md): PPO with no KL penalty, PPO with a KL coefficient tuned
# by a short sweep, RCfD with no KL (the paper's setting) and with rcfd.py's default 0.2, 3 seeds each, from $SFT and
# $RM with one budget: 24 iterations of 64 responses, held-out evaluation every 4.
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SFT=${SFT:-runs/sft}
RM=${RM:-runs/reward_model}
OUT=${OUT:-runs/bench/overopt}
SEEDS=${SEEDS:-1 2 3}
SWEEP=${SWEEP:-0.02 0.1 0.5}
RCFD_SWEEP=${RCFD_SWEEP:-0.05 0.5}
JOBS=${JOBS:-3}
BUDGET=(--sft_model_path "$SFT" --reward_model_path "$RM" --total_episodes 1536 --batch_size 64 --eval_every 4
        --eval_rows 128 --learning_rate 3e-4)

run() {  # run NAME SCRIPT ARGS...: one training run into $OUT/NAME
    local name=$1; shift
    run_once "$OUT/$name" python "$@" "${BUDGET[@]}"
}

# 1. PPO's KL coefficient, tuned on seed 1 by the final gold reward (an oracle a real sweep does not have: the best
#    case for the baseline); the chosen run is the tuned baseline's seed 1
for kl in $SWEEP; do launch run "sweep/ppo_kl${kl}_s1" ppo.py --kl_coef "$kl" --seed 1; done
finish
TUNED_KL=${TUNED_KL:-$(python benchmark/overoptimization.py pick "$OUT/sweep")}
echo "tuned kl_coef: $TUNED_KL"
[ -e "$OUT/ppo_kl${TUNED_KL}_s1" ] || cp -r "$OUT/sweep/ppo_kl${TUNED_KL}_s1" "$OUT/ppo_kl${TUNED_KL}_s1"

# 2. the comparison
compare() {
    local seed=$1
    run "ppo_nokl_s$seed" ppo.py --kl_coef 0 --seed "$seed"
    run "ppo_kl${TUNED_KL}_s$seed" ppo.py --kl_coef "$TUNED_KL" --seed "$seed"
    run "rcfd_s$seed" rcfd.py --kl_coef 0 --seed "$seed"  # the paper's setting (no KL)
    run "rcfd_kl0.2_s$seed" rcfd.py --seed "$seed"          # rcfd.py's default: --kl_coef 0.2
}
for seed in $SEEDS; do launch compare "$seed"; done
finish

# 3. RCfD's KL coefficient, swept on seed 1 as PPO's is; 0 and 0.2 are the comparison's seed-1 runs
for kl in $RCFD_SWEEP; do launch run "rcfd_sweep/rcfd_kl${kl}_s1" rcfd.py --kl_coef "$kl" --seed 1; done
finish
[ -e "$OUT/rcfd_sweep/rcfd_kl0_s1" ] || cp -r "$OUT/rcfd_s1" "$OUT/rcfd_sweep/rcfd_kl0_s1"
[ -e "$OUT/rcfd_sweep/rcfd_kl0.2_s1" ] || cp -r "$OUT/rcfd_kl0.2_s1" "$OUT/rcfd_sweep/rcfd_kl0.2_s1"

# 4. every final policy's alignment with the same reward model, then the table
python benchmark/overoptimization.py alignment "$OUT" --reward_model_path "$RM"
python benchmark/overoptimization.py table "$OUT" | tee "$OUT/table.md"
