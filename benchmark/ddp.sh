#!/usr/bin/env bash
# One process against two under torchrun (DDP, then --fsdp) on the same cores, the same global batch (RESULTS.md).
# Run it with nothing else on the machine.
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-runs/bench/ddp}
SFT=${SFT:-runs/sft}
FLAGS=(--sft_model_path "$SFT" --reward length --target_length 20 --total_episodes 1280 --eval_rows 64)
run_once "$OUT/one_process_s1" python ppo.py "${FLAGS[@]}"
run_once "$OUT/two_processes_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}"
run_once "$OUT/two_processes_fsdp_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}" --fsdp
python benchmark/report.py table "$OUT" --initial one_process --keys world_size length_error wall_time \
    peak_memory_mb | tee "$OUT/table.md"
python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
