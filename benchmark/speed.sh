#!/usr/bin/env bash
# The speed study, alone on the machine (it measures time; TRL's environment: RESULTS.md's speed section): ppo.py
# against TRL's PPOTrainer (speed.py: $OUT/results.json), and ppo.py's peak memory with glibc returning freed memory
# at once and without ($OUT/memory).
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/speed}
mkdir -p "$OUT"
python benchmark/speed.py --work_dir "$OUT"

flags=(--sft_model_path "$OUT/models-toy-cpu/sft" --reward_model_path "$OUT/models-toy-cpu/reward_model"
       --total_episodes 640 --missing_eos_penalty -1 --eval_every 1000000 --save_every 1000000)
run_once "$OUT/memory/default_s1" python ppo.py "${flags[@]}"
MALLOC_TRIM_THRESHOLD_=0 run_once "$OUT/memory/malloc_trim_s1" python ppo.py "${flags[@]}"
python benchmark/report.py table "$OUT/memory" --keys peak_memory_mb wall_time
