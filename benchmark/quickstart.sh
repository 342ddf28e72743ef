#!/usr/bin/env bash
# The README's quick start, timed: sft.py, reward_model.py and ppo.py with every default, all threads (alone on the
# machine), into $OUT/sft, $OUT/reward_model and $OUT/ppo.
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/quickstart}
run_once "$OUT/sft" python sft.py
run_once "$OUT/reward_model" python reward_model.py --model_name_or_path "$OUT/sft"
run_once "$OUT/ppo" python ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model"
python benchmark/report.py quickstart "$OUT" | tee "$OUT/table.md"
