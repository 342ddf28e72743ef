"""Supervised fine-tuning (SFT): the first stage of RLHF.

Train a causal LM on prompt/completion demonstrations with the loss on completion tokens only
(the prompt is context, not a target) and the EOS token learned, so the model knows when to stop.

    python sft.py                                   # toy world, a few minutes on a CPU
    python sft.py --model_name_or_path EleutherAI/pythia-160m --dataset_name trl-lib/tldr
"""

import math
import random
import time
from dataclasses import dataclass

import torch
import tyro

import common


@dataclass
class Args:
    model_name_or_path: str = "toy"
    """`toy` (a fresh ~0.8M-parameter GPT-2), a hub id, or a local directory"""
    dataset_name: str = "toy"
    """`toy`, a hub id, or a local .json/.jsonl/.parquet file or `save_to_disk` folder"""
    dataset_config: str | None = None
    """dataset configuration name on the hub"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (without one, the last `eval_rows` training rows, at most half, are held out)"""
    output_dir: str = "runs/sft"
    """where the model, args.json, metrics.jsonl and summary.json go"""
    seed: int = 1
    """random seed"""
    device: str = "auto"
    """`auto` (cuda if available), `cpu` or `cuda`"""
    track: bool = False
    """log to Weights & Biases"""
    learning_rate: float = 3e-3
    """peak learning rate, decayed linearly to 0"""
    num_epochs: int = 6
    """passes over the training data"""
    batch_size: int = 64
    """sequences per optimizer step"""
    max_length: int = 128
    """prompt + completion tokens; longer examples are truncated"""
    max_train_rows: int | None = None
    """use only the first rows of the training split (quick tests)"""
    eval_every: int = 50
    """evaluate the held-out loss every this many steps"""
    eval_rows: int = 256
    """held-out rows for the loss and for sampled completions"""
    max_new_tokens: int = 48
    """length limit of sampled completions in the final evaluation"""


def tokenize(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; labels are -100 on prompt tokens so only the completion
    (and its EOS) is learned."""
    examples = []
    for row in rows:
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        completion = common.encode_completion(tokenizer, row["completion"])
        ids = (prompt + completion)[:max_length]
        examples.append((ids, ([-100] * len(prompt) + completion)[:max_length]))
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    ids, mask = common.pad([ids for ids, _ in batch], pad_id, side="right")
    labels, _ = common.pad([labels for _, labels in batch], -100, side="right")
    return ids, mask, labels


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens. logits (B, T, V), labels (B, T) with
    -100 on prompt and padding. The logit at position t predicts the token at t+1."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def eval_loss(model, examples, pad_id, batch_size, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
        n = (labels[:, 1:] != -100).sum().item()
        total += completion_loss(common.forward(model, ids, mask).logits, labels).item() * n
        count += n
    model.train()
    return total / max(count, 1)


if __name__ == "__main__":
    args = tyro.cli(Args)
    common.require_positive(args, "learning_rate", "num_epochs", "batch_size", "max_length", "eval_every",
                            "eval_rows", "max_new_tokens")
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    tokenizer = common.load_tokenizer(args.model_name_or_path)
    model = common.load_model(args.model_name_or_path, tokenizer).to(device)
    train_rows, test_rows = common.load_data(args.dataset_name, "sft", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split,
                                             args.eval_rows, args.max_train_rows)
    train, test = tokenize(train_rows, tokenizer, args.max_length), tokenize(test_rows, tokenizer, args.max_length)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    num_steps = args.num_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    logger = common.Logger(args.output_dir, args, args.track)
    print(f"{len(train)} training examples, {num_steps} steps, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")

    # ---- training: next-token loss on completion tokens ----
    model.train()
    rng = random.Random(args.seed)
    step, start = 0, time.time()
    bar = common.progress(total=num_steps, desc="sft")
    for epoch in range(args.num_epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), args.batch_size):
            ids, mask, labels = (t.to(device) for t in collate([train[j] for j in order[i:i + args.batch_size]],
                                                                tokenizer.pad_token_id))
            with common.autocast(device):
                loss = completion_loss(common.forward(model, ids, mask).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            if step % args.eval_every == 0 or step == num_steps:
                logger.log({"episode": step * args.batch_size, "epoch": epoch, "loss/train": loss.item(),
                            "loss/eval": eval_loss(model, test, tokenizer.pad_token_id, args.batch_size, device),
                            "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                            "time/train": time.time() - start}, step)
    bar.close()

    # ---- evaluation: held-out loss, and sampled completions scored by the toy gold reward ----
    model.eval()
    summary = {"eval_loss": eval_loss(model, test, tokenizer.pad_token_id, args.batch_size, device),
               "train_time": round(time.time() - start, 1)}
    queries, query_mask = common.pad([common.encode_prompt(tokenizer, r["prompt"]) for r in test_rows],
                                     tokenizer.pad_token_id, side="left")
    with common.autocast(device):
        responses, response_mask, ended, _ = common.generate(model, queries.to(device), query_mask.to(device),
                                                             tokenizer, args.max_new_tokens)
    texts = common.decode_responses(tokenizer, responses, response_mask)
    summary["eos_rate"] = ended.float().mean().item()
    if args.dataset_name == common.TOY:
        pairs = list(zip([r["prompt"] for r in test_rows], texts))
        summary["gold"] = sum(common.gold_reward(p, c) for p, c in pairs) / len(pairs)
        summary["well_formed"] = sum(common.well_formed(p, c) for p, c in pairs) / len(pairs)
        summary["demo_gold"] = sum(common.gold_reward(r["prompt"], r["completion"]) for r in test_rows) / len(test_rows)
    for row, text in list(zip(test_rows, texts))[:4]:
        print(f"  prompt: {row['prompt']!r}\n  sample: {text!r}")
    print("summary: " + " ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    common.save_run(args.output_dir, model, tokenizer, args, summary)
    logger.close()
