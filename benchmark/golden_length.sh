#!/usr/bin/env bash
# Does PPO itself work? PPO with the exact golden length reward 1 - |n/N - 1| (Fan et al. 2023) for
# targets N = 10, 20, 30, 3 seeds, 20 iterations of 64 prompts each (a fifth of ppo.py's default
# budget), from the SFT model at $SFT.
#
#     bash benchmark/golden_length.sh
#     python benchmark/report.py table runs/bench/golden_length --initial length10 length20 length30 \
#         --keys length length_error within_10pct gold well_formed wall_time
#     python benchmark/report.py points runs/bench/golden_length --at 5 10 20 --keys response/length_error
#
# Runs go to $OUT/length<N>_s<seed>; a run whose summary.json exists is skipped, and an unfinished
# one is started again (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/golden_length}
SFT=${SFT:-runs/sft}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1

for s in $SEEDS; do
    for n in 10 20 30; do
        launch run_once "$OUT/length${n}_s$s" python ppo.py --sft_model_path "$SFT" --reward length --total_episodes 1280 \
            --eval_every 5 --target_length "$n" --seed "$s"
    done
done
finish
python benchmark/report.py table "$OUT" --initial length10 length20 length30 --keys length length_error within_10pct gold well_formed wall_time \
    | tee "$OUT/table.md"
