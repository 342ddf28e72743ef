#!/usr/bin/env bash
# The GPU path at small real scale, offline, on one GPU: a model of SmolLM-135M's architecture (its config is
# written out below; random weights) over the toy world's tokenizer, its vocabulary padded with unused tokens to the
# real 49,152 so that the output layer costs what it does in SmolLM, stored in bf16 as hub checkpoints are (the
# scripts train fp32 master weights and save bf16 back); then sft.py, reward_model.py and $ITERS PPO iterations of 64
# prompts, all in bf16 autocast, and a few PPO iterations more with --micro_batch_size 8 --gradient_checkpointing,
# and, on a machine with 2 GPUs, over 2 processes replicated (DDP) and sharded (--fsdp).
# It records generated tokens per second, seconds per PPO iteration, each stage's peak GPU memory and each PPO
# phase's (generation, scoring, training), and checks that the old log-probs that ppo.py reads from the generation's
# own logits match a fresh forward pass within bf16 tolerance: mean gap under $MAX_GAP nats, and under $MAX_CLIPPED of
# tokens with a ratio that PPO's clip (0.2) would cut before any update. A few minutes; results in $OUT/smoke.json.
#
#     bash benchmark/gpu_smoke.sh                  # one GPU
#     bash benchmark/gpu_smoke.sh --device cpu     # the same steps at a tiny scale: checks the script here
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device cpu or cuda}; fi
if [ "$DEVICE" = cpu ]; then
    SCALE=tiny ITERS=${ITERS:-6} BATCH=16 NEW_TOKENS=16 OUT=${OUT:-runs/bench/gpu_smoke_cpu}
    STAGE=(--max_train_rows 512 --eval_rows 32)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    SCALE=smollm ITERS=${ITERS:-40} BATCH=64 NEW_TOKENS=48 OUT=${OUT:-runs/bench/gpu_smoke}
    STAGE=()
fi
MAX_GAP=${MAX_GAP:-0.05}
MAX_CLIPPED=${MAX_CLIPPED:-0.01}
COMMON=(--device "$DEVICE" --overwrite --save_every 100000)  # no checkpoints: the loop's own cost is measured
mkdir -p "$OUT"

# 1. the base model and tokenizer, built from the config alone
python - "$OUT/base" "$SCALE" <<'EOF'
import sys

import tokenizers
import torch
import transformers

import common

out, scale = sys.argv[1], sys.argv[2]
if scale == "smollm":  # HuggingFaceTB/SmolLM-135M's config.json
    arch = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, hidden_act="silu", max_position_embeddings=2048, rope_theta=10000.0,
                rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True, vocab_size=49152)
else:  # the same shape of model (grouped-query attention, tied embeddings), tiny
    arch = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, vocab_size=1024)
toy = common.toy_tokenizer()
words = [toy.convert_ids_to_tokens(i) for i in range(len(toy))]
vocab = {w: i for i, w in enumerate(words + [f"<unused_{i}>" for i in range(arch["vocab_size"] - len(words))])}
backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=common.UNK))
backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
backend.post_processor = tokenizers.processors.TemplateProcessing(single=f"{common.BOS} $A",
                                                                  special_tokens=[(common.BOS, toy.bos_token_id)])
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=common.PAD, bos_token=common.BOS,
                                                 eos_token=common.EOS, unk_token=common.UNK)
config = transformers.LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # stored as hub models are
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")
EOF

# 2. the pipeline: SFT, a reward model, PPO (a few dozen iterations)
stage() {  # stage NAME SCRIPT ARGS...: one run into $OUT/NAME, its output in $OUT/NAME.log ($LAUNCH: torchrun)
    local name=$1 script=$2; shift 2
    echo "$(date +%T) $name"
    ${LAUNCH:-python} "$script" "$@" "${COMMON[@]}" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
        || { tail -5 "$OUT/$name.log"; echo "$name failed: see $OUT/$name.log"; exit 1; }
}
stage sft sft.py --model_name_or_path "$OUT/base" --num_epochs 2 --learning_rate 5e-4 --batch_size "$BATCH" \
    --max_new_tokens "$NEW_TOKENS" "${STAGE[@]}"
stage reward_model reward_model.py --model_name_or_path "$OUT/sft" --num_epochs 1 --learning_rate 1e-4 \
    --batch_size "$BATCH" "${STAGE[@]}"
stage ppo ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model" --learning_rate 1e-5 \
    --total_episodes $((ITERS * BATCH)) --batch_size "$BATCH" --max_new_tokens "$NEW_TOKENS" --eval_every 10 \
    --eval_rows $((2 * BATCH))
stage ppo_memory ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model" --learning_rate 1e-5 \
    --total_episodes $((4 * BATCH)) --batch_size "$BATCH" --max_new_tokens "$NEW_TOKENS" --eval_rows $((2 * BATCH)) \
    --micro_batch_size 8 --gradient_checkpointing
# the same PPO iterations over 2 processes, replicated (DDP) and sharded (--fsdp): on 2 GPUs, or on the CPU
if [ "$DEVICE" = cpu ] || [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    for mode in ddp fsdp; do
        LAUNCH="torchrun --standalone --nproc_per_node 2" stage "ppo_2_$mode" ppo.py --sft_model_path "$OUT/sft" \
            --reward_model_path "$OUT/reward_model" --learning_rate 1e-5 --total_episodes $((4 * BATCH)) \
            --batch_size "$BATCH" --max_new_tokens "$NEW_TOKENS" --eval_rows $((2 * BATCH)) \
            $([ "$mode" = fsdp ] && echo --fsdp)
    done
else
    echo "one GPU: the 2-process DDP and --fsdp runs need 2 (skipped)"
fi

# 3. old log-probs from generation against a fresh forward pass (bf16 autocast on CUDA, as in ppo.py), and the report
python - "$OUT" "$DEVICE" "$BATCH" "$NEW_TOKENS" "$MAX_GAP" "$MAX_CLIPPED" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

import torch

import common

out, device = Path(sys.argv[1]), torch.device(sys.argv[2])
batch, new_tokens, max_gap, max_clipped = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
tokenizer = common.load_tokenizer(str(out / "ppo"))
policy = common.load_model(str(out / "ppo"), tokenizer, device=device).eval()
_, rows = common.load_data("toy", "prompts", tokenizer, test_rows=batch)
queries = common.encode_prompts(tokenizer, [r["prompt"] for r in rows], common.max_positions(policy) - new_tokens)
query_ids, query_mask = (t.to(device) for t in common.pad(queries, tokenizer.pad_token_id, "left"))
torch.manual_seed(0)
with torch.no_grad():
    with common.autocast(device):
        # the old log-probs ppo.py keeps, read from the generation's logits
        responses, response_mask, _, old = common.generate(policy, query_ids, query_mask, tokenizer, new_tokens)
        ids, mask = torch.cat([query_ids, responses], 1), torch.cat([query_mask, response_mask], 1)
        new = common.response_logprobs(policy, ids, mask, query_ids.shape[1])  # PPO's first forward pass
    full = common.response_logprobs(policy, ids, mask, query_ids.shape[1])  # full precision
kept = response_mask.bool()
gap, ratio = (new - old)[kept].abs(), (new - old)[kept].exp()
check = {"tokens": int(kept.sum()), "mean_abs_gap": gap.mean().item(), "max_abs_gap": gap.max().item(),
         "clipped_fraction": ((ratio - 1).abs() > 0.2).float().mean().item(),
         "autocast_vs_full_precision_mean_abs": (new - full)[kept].abs().mean().item()}

lines = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
iterations = [m for m in lines if "time/generation" in m][1:]  # the first pays for warm-up
stages = ("sft", "reward_model", "ppo", "ppo_memory")
summaries = {stage: json.loads((out / stage / "summary.json").read_text()) for stage in stages}
memory_run = [json.loads(line) for line in (out / "ppo_memory" / "metrics.jsonl").read_text().splitlines()]
memory_run = [m for m in memory_run if "time/generation" in m][1:]
phases = ("generation", "scoring", "training")
report = {
    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
    "ppo_iterations": len(iterations) + 1, "batch_size": batch, "max_new_tokens": new_tokens,
    "tokens_per_second": statistics.median(m["tokens_per_second"] for m in iterations),
    "seconds_per_iteration": statistics.median(m["time/generation"] + m["time/scoring"] + m["time/training"]
                                               for m in iterations),
    "seconds_per_stage": {k: statistics.median(m[f"time/{k}"] for m in iterations)
                          for k in phases},
    "peak_memory_mb": {stage: s["peak_memory_mb"] for stage, s in summaries.items()},
    # each PPO phase's peak GPU memory (GB), without and with --micro_batch_size 8 --gradient_checkpointing
    "ppo_phase_peak_gb": {k: max((m.get(f"memory/{k}_gb", 0.0) for m in iterations), default=0.0) for k in phases},
    "ppo_memory_phase_peak_gb": {k: max((m.get(f"memory/{k}_gb", 0.0) for m in memory_run), default=0.0)
                                 for k in phases},
    "ppo_memory_seconds_per_stage": {k: statistics.median(m[f"time/{k}"] for m in memory_run) for k in phases},
    # 2 processes, replicated and sharded: s/iteration, each process's peak memory
    "two_processes": {mode: {"seconds_per_iteration": statistics.median(
        m["time/generation"] + m["time/scoring"] + m["time/training"] for m in run[1:]),
        "peak_memory_mb_per_process": json.loads((out / f"ppo_2_{mode}" / "summary.json").read_text())[
            "peak_memory_mb_per_process"]}
        for mode in ("ddp", "fsdp") if (out / f"ppo_2_{mode}" / "summary.json").exists()
        for run in [[json.loads(line) for line in (out / f"ppo_2_{mode}" / "metrics.jsonl").read_text().splitlines()
                     if "time/generation" in line]]},
    "stored_dtype": {stage: json.loads((out / stage / "config.json").read_text()).get("dtype")
                     for stage in ("base", "sft", "reward_model", "ppo")},
    "wall_time_s": {stage: s["wall_time"] for stage, s in summaries.items()},
    "ppo": {k: summaries["ppo"][k] for k in ("reward", "kl", "length", "eos_rate", "gold")},
    "logprob_check": check | {"passed": check["mean_abs_gap"] <= max_gap and check["clipped_fraction"] <= max_clipped},
}
common.write_json(out / "smoke.json", report)
print(json.dumps(report, indent=2))
if not report["logprob_check"]["passed"]:
    sys.exit(f"the generation's log-probs differ from a forward pass by more than bf16 explains (see {out}/smoke.json)")
EOF
