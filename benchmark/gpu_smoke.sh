#!/usr/bin/env bash
# The GPU path at small real scale, offline: a SmolLM-135M-shaped Llama (random weights, stored in bf16; the toy
# tokenizer padded to its 49,152 tokens) through sft.py, reward_model.py and $ITERS PPO iterations in bf16 autocast;
# a few PPO iterations with --micro_batch_size 8 --gradient_checkpointing, and, on 2 GPUs, under DDP and --fsdp.
# Then time and peak memory per stage and PPO phase, and a check that the old log-probs ppo.py reads from the
# generation's logits match a forward pass (mean gap under $MAX_GAP nats, under $MAX_CLIPPED of the ratios clipped).
#
#     bash benchmark/gpu_smoke.sh                  # on the GPU
#     bash benchmark/gpu_smoke.sh --device cpu     # the same steps at a tiny scale: checks the script here
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device cpu or cuda}; fi
if [ "$DEVICE" = cpu ]; then  # the same shape of model (grouped-query attention, tied embeddings), tiny
    ARCH='{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": true, "vocab_size": 1024}'
    ITERS=${ITERS:-6} BATCH=16 NEW_TOKENS=16 OUT=${OUT:-runs/bench/gpu_smoke_cpu}
    STAGE=(--max_train_rows 512 --eval_rows 32)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else  # HuggingFaceTB/SmolLM-135M's config.json
    ARCH='{"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "hidden_act": "silu", "max_position_embeddings": 2048, "rope_theta": 10000.0,
           "rms_norm_eps": 1e-5, "initializer_range": 0.02, "tie_word_embeddings": true, "vocab_size": 49152}'
    ITERS=${ITERS:-40} BATCH=64 NEW_TOKENS=48 OUT=${OUT:-runs/bench/gpu_smoke} STAGE=()
fi
MAX_GAP=${MAX_GAP:-0.05} MAX_CLIPPED=${MAX_CLIPPED:-0.01}
mkdir -p "$OUT"
# the base: a Llama of $ARCH's config fields, random weights, saved in bf16 as hub checkpoints are, over the toy
# tokenizer padded with unused tokens to its vocab_size (so that the output layer costs what it does at that size)
python - "$OUT/base" "$ARCH" <<'PY'
import json
import sys

import tokenizers
import torch
import transformers

import common

out, arch = sys.argv[1], json.loads(sys.argv[2])
toy = common.toy_tokenizer()  # its vocabulary padded with unused tokens
spec = json.loads(toy.backend_tokenizer.to_str())
spec["model"]["vocab"] |= {f"<unused_{i}>": len(toy) + i for i in range(arch["vocab_size"] - len(toy))}
tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(spec)),
                                                 padding_side="left", **toy.special_tokens_map)
config = transformers.LlamaConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")
PY

stage() {  # stage NAME SCRIPT ARGS...: one run into $OUT/NAME_s1 (no checkpoints), its output in .log
    echo "$(date +%T) $1"
    ${LAUNCH:-python} "$2" "${@:3}" --device "$DEVICE" --overwrite --save_every 100000 --output_dir "$OUT/$1_s1" \
        > "$OUT/$1_s1.log" 2>&1 || { tail -5 "$OUT/$1_s1.log"; echo "$1 failed: see $OUT/$1_s1.log"; exit 1; }
}
PPO=(--sft_model_path "$OUT/sft_s1" --reward_model_path "$OUT/reward_model_s1" --learning_rate 1e-5
     --batch_size "$BATCH" --max_new_tokens "$NEW_TOKENS" --eval_rows $((2 * BATCH)))
stage sft sft.py --model_name_or_path "$OUT/base" --num_epochs 2 --learning_rate 5e-4 --batch_size "$BATCH" \
    --max_new_tokens "$NEW_TOKENS" "${STAGE[@]}"
stage reward_model reward_model.py --model_name_or_path "$OUT/sft_s1" --num_epochs 1 --learning_rate 1e-4 \
    --batch_size "$BATCH" "${STAGE[@]}"
stage ppo ppo.py "${PPO[@]}" --total_episodes $((ITERS * BATCH)) --eval_every 10
stage ppo_memory ppo.py "${PPO[@]}" --total_episodes $((4 * BATCH)) --micro_batch_size 8 --gradient_checkpointing
if [ "$DEVICE" = cpu ] || [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    LAUNCH="torchrun --standalone --nproc_per_node 2"  # the same batch over 2 processes, replicated and sharded
    stage ppo_ddp ppo.py "${PPO[@]}" --total_episodes $((4 * BATCH))
    stage ppo_fsdp ppo.py "${PPO[@]}" --total_episodes $((4 * BATCH)) --fsdp
fi
python benchmark/report.py table "$OUT" --keys wall_time peak_memory_mb world_size gold reward kl length eos_rate
python benchmark/report.py timing "$OUT" --keys time/generation time/scoring time/training tokens_per_second \
    memory/generation_gb memory/scoring_gb memory/training_gb

python - "$OUT/ppo_s1" "$DEVICE" "$BATCH" "$NEW_TOKENS" "$MAX_GAP" "$MAX_CLIPPED" <<'PY'
import sys

import torch

import common

run, device, batch, new_tokens = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tokenizer = common.load_tokenizer(run)
policy = common.load_model(run, tokenizer, device=device).eval()
_, rows = common.load_data("toy", "prompts", tokenizer, test_rows=batch)
queries = common.encode_prompts(tokenizer, [r["prompt"] for r in rows], common.max_positions(policy) - new_tokens)
query_ids, query_mask = (t.to(device) for t in common.pad(queries, tokenizer.pad_token_id, "left"))
torch.manual_seed(0)
with torch.no_grad(), common.autocast(device):  # as in ppo.py: the old log-probs, then the first PPO forward pass
    responses, response_mask, _, old = common.generate(policy, query_ids, query_mask, tokenizer, new_tokens)
    ids, mask = torch.cat([query_ids, responses], 1), torch.cat([query_mask, response_mask], 1)
    new = common.response_logprobs(policy, ids, mask, query_ids.shape[1])
gap = (new - old)[response_mask.bool()]
clipped = ((gap.exp() - 1).abs() > 0.2).float().mean().item()
print(f"\nold log-probs against a forward pass, {gap.numel()} tokens: mean |gap| {gap.abs().mean():.2e} nats, "
      f"max {gap.abs().max():.2e}; ratios outside PPO's clip range: {clipped:.4f}")
if gap.abs().mean() > float(sys.argv[5]) or clipped > float(sys.argv[6]):
    sys.exit("the generation's log-probs differ from a forward pass by more than bf16 explains")
PY
