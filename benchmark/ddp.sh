#!/usr/bin/env bash
# One process against two under torchrun on the same 2 CPU cores (README's "Multiple GPUs"):
# `ppo.py --reward length --target_length 20 --total_episodes 1280 --eval_rows 64` from the SFT model at
# $SFT, the same global batch, once alone, once as `torchrun --standalone --nproc_per_node 2` (DDP) and once
# more with --fsdp. Run it with nothing else on the machine.
#
#     bash benchmark/ddp.sh
#     python benchmark/report.py table runs/bench/ddp --initial one_process --keys world_size length_error \
#         wall_time peak_memory_mb
#     python benchmark/report.py timing runs/bench/ddp
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/ddp}
SFT=${SFT:-runs/sft}
FLAGS=(--sft_model_path "$SFT" --reward length --target_length 20 --total_episodes 1280 --eval_rows 64)
run_once "$OUT/one_process_s1" python ppo.py "${FLAGS[@]}"
run_once "$OUT/two_processes_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}"
run_once "$OUT/two_processes_fsdp_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}" --fsdp
python benchmark/report.py table "$OUT" --initial one_process --keys world_size length_error wall_time \
    peak_memory_mb | tee "$OUT/table.md"
python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
