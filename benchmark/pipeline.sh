#!/usr/bin/env bash
# Every algorithm with every default, 3 seeds (RESULTS.md and the README's table): each seed trains its SFT model
# and reward model, then PPO, PPO-max, RRHF, RCfD and length-only PPO from them. EPISODES=N: another budget for the
# PPO-style methods. Seeds run in parallel, one thread each ($JOBS at a time).
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/pipeline}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-3}
EPISODES=${EPISODES:-}
export OMP_NUM_THREADS=1

seed_pipeline() {
    local s=$1
    run_once "$OUT/sft_s$s" python sft.py --seed "$s"
    run_once "$OUT/reward_model_s$s" python reward_model.py --seed "$s" --model_name_or_path "$OUT/sft_s$s"
    local models=(--seed "$s" --sft_model_path "$OUT/sft_s$s" --reward_model_path "$OUT/reward_model_s$s")
    local budget=(${EPISODES:+--total_episodes "$EPISODES"})
    run_once "$OUT/ppo_s$s" python ppo.py "${models[@]}" "${budget[@]}"
    run_once "$OUT/ppo_max_s$s" python ppo_max.py "${models[@]}" "${budget[@]}"
    run_once "$OUT/rrhf_s$s" python rrhf.py "${models[@]}"
    run_once "$OUT/rcfd_s$s" python rcfd.py "${models[@]}" "${budget[@]}"
    run_once "$OUT/length_ppo_s$s" python ppo.py "${models[@]}" "${budget[@]}" --reward length --target_length 30
}
for s in $SEEDS; do launch seed_pipeline "$s"; done
finish
python benchmark/report.py table "$OUT" --initial ppo --keys gold reward kl length well_formed wall_time \
    peak_memory_mb | tee "$OUT/table.md"
python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
