#!/usr/bin/env bash
# The README's quick start, timed: `python sft.py && python reward_model.py && python ppo.py` with every
# default (all threads; run it with nothing else on the machine), into $OUT/sft, $OUT/reward_model and
# $OUT/ppo. A finished stage (one with summary.json) is skipped.
#
#     bash benchmark/quickstart.sh
#     python benchmark/report.py quickstart runs/bench/quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/quickstart}

run_once "$OUT/sft" python sft.py
run_once "$OUT/reward_model" python reward_model.py --model_name_or_path "$OUT/sft"
run_once "$OUT/ppo" python ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model"
python benchmark/report.py quickstart "$OUT" | tee "$OUT/table.md"
