#!/usr/bin/env bash
# The README's quick start, timed: `python sft.py && python reward_model.py && python ppo.py` with every
# default (all threads; run it with nothing else on the machine), into $OUT/sft, $OUT/reward_model and
# $OUT/ppo. A finished stage (one with summary.json) is skipped.
#
#     bash benchmark/quickstart.sh
#     python benchmark/report.py quickstart runs/bench/quickstart
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench/quickstart}
mkdir -p "$OUT"

stage() {  # stage NAME SCRIPT ARGS...: one run into $OUT/NAME, its output in $OUT/NAME.log
    local name=$1 script=$2; shift 2
    [ -f "$OUT/$name/summary.json" ] && return
    python "$script" "$@" --output_dir "$OUT/$name" --overwrite > "$OUT/$name.log" 2>&1 \
        || { echo "$name failed: see $OUT/$name.log"; return 1; }
    echo "$(date +%T) done $name"
}

stage sft sft.py
stage reward_model reward_model.py --model_name_or_path "$OUT/sft"
stage ppo ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model"
python benchmark/report.py quickstart "$OUT" | tee "$OUT/table.md"
