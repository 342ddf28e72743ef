#!/usr/bin/env bash
# The README's results table: every algorithm on the toy world with every default, 3 seeds. Each seed
# trains its own SFT model and reward model, then PPO, PPO-max, RRHF, RCfD and length-only PPO
# (--reward length --target_length 30) from them. EPISODES=N gives the PPO-style methods another
# budget of sampled responses than their default (6,400). Runs go to $OUT/<algo>_s<seed>; a run
# whose summary.json exists is skipped, so the script resumes where it stopped (an unfinished run is
# started again: --overwrite).
#
#     bash benchmark/pipeline.sh
#     python benchmark/report.py table runs/bench/pipeline --initial ppo --keys gold reward kl length well_formed wall_time peak_memory_mb
#     python benchmark/report.py curves runs/bench/pipeline --only ppo ppo_max rcfd length_ppo --out benchmark/figures/pipeline.png --smooth 3
#
# Seeds run in parallel, one thread each ($JOBS at a time, default 3: all seeds at once on 2 cores
# finish sooner than two then one).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
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
python benchmark/report.py table "$OUT" --initial ppo --keys gold reward kl length well_formed wall_time peak_memory_mb \
    | tee "$OUT/table.md"
python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
