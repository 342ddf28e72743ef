#!/usr/bin/env bash
# The speed study, run alone (it measures time): ppo.py against TRL's PPOTrainer side by side and
# the compute floor (benchmark/speed.py, 4 rounds x 30 updates, its section into $OUT/section.md);
# where ppo.py's PPO epochs spend their time (benchmark/ppo_step.py, into $OUT/ppo_step.md);
# and ppo.py's peak memory with glibc returning freed memory at once (MALLOC_TRIM_THRESHOLD_=0)
# and without, on the speed benchmark's models and settings, 10 updates each ($OUT/memory).
#
#     python benchmark/speed.py --setup_trl --quick   # once: TRL 1.9.0 into /tmp/trl-venv, then a short check
#     bash benchmark/speed.sh
#     python benchmark/report.py table runs/bench/speed/memory --keys peak_memory_mb wall_time
#
# On a GPU: python benchmark/speed.py --device cuda --config 160m (speed.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/speed}
mkdir -p "$OUT"
python benchmark/speed.py --work_dir "$OUT" --write --results_file "$OUT/section.md"
python benchmark/ppo_step.py --models "$OUT/models-toy-cpu" > "$OUT/ppo_step.md.tmp"
mv "$OUT/ppo_step.md.tmp" "$OUT/ppo_step.md"

models=$OUT/models-toy-cpu  # trained by speed.py
flags=(--sft_model_path "$models/sft" --reward_model_path "$models/reward_model" --total_episodes 640
       --missing_eos_penalty -1 --eval_every 1000000 --save_every 1000000)
run_once "$OUT/memory/default_s1" python ppo.py "${flags[@]}"
MALLOC_TRIM_THRESHOLD_=0 run_once "$OUT/memory/malloc_trim_s1" python ppo.py "${flags[@]}"
python benchmark/report.py table "$OUT/memory" --keys peak_memory_mb wall_time
