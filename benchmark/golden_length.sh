#!/usr/bin/env bash
# Does PPO itself work? PPO on the exact golden length reward 1 - |n/N - 1| (Fan et al. 2023) for N = 10, 20, 30,
# 3 seeds, 20 iterations of 64 prompts, from the SFT model at $SFT (RESULTS.md).
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/golden_length}
SFT=${SFT:-runs/sft}
SEEDS=${SEEDS:-1 2 3}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1

for s in $SEEDS; do
    for n in 10 20 30; do
        launch run_once "$OUT/length${n}_s$s" python ppo.py --sft_model_path "$SFT" --reward length \
            --total_episodes 1280 --eval_every 5 --target_length "$n" --seed "$s"
    done
done
finish
python benchmark/report.py table "$OUT" --initial length10 length20 length30 \
    --keys length length_error within_10pct gold well_formed wall_time | tee "$OUT/table.md"
