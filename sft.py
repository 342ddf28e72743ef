"""Supervised fine-tuning (SFT): the first stage of RLHF.

Train a causal LM on prompt/completion demonstrations with the loss on completion tokens only
(the prompt is context, not a target) and the EOS token learned, so the model knows when to stop.

    python sft.py                                   # toy world, a few minutes on a CPU
    python sft.py --model_name_or_path EleutherAI/pythia-160m --dataset_name trl-lib/tldr
"""

import random
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
    fsdp: bool = False
    """under torchrun: shard the trained models across the processes (FSDP2) instead of a full copy in each (DDP)"""
    learning_rate: float = 3e-3
    """peak learning rate, decayed linearly to 0"""
    num_epochs: int = 6
    """passes over the training data"""
    batch_size: int = 64
    """sequences per optimizer step, over all processes (each takes an equal share)"""
    micro_batch_size: int | None = None
    """sequences of one forward/backward pass on one process: gradients accumulate over the batch's micro-batches,
    and the held-out loss runs in chunks of it (memory, not results); None: the whole batch"""
    gradient_checkpointing: bool = False
    """recompute the activations in the backward pass instead of keeping them (less memory, more compute)"""
    max_length: int = 128
    """prompt + completion tokens (at most the model's positions); longer examples are left out"""
    max_train_rows: int | None = None
    """use only the first rows of the training split (quick tests)"""
    eval_every: int = 50
    """evaluate the held-out loss every this many steps"""
    eval_rows: int = 256
    """held-out rows for the loss and for sampled completions"""
    max_new_tokens: int = 48
    """length limit of sampled completions in the final evaluation"""
    save_every: int = 200
    """write a checkpoint every this many optimizer steps"""
    resume: bool = False
    """continue the run in --output_dir from its latest checkpoint"""
    overwrite: bool = False
    """replace the run in --output_dir"""


def check_args(args: Args, world_size: int) -> None:
    """fail() with a one-line error on a flag out of its range, or on flags that do not fit together."""
    common.check_args(args, positive=("learning_rate", "num_epochs", "batch_size", "max_length", "eval_every",
                                      "eval_rows", "max_new_tokens", "save_every", "max_train_rows",
                                      "micro_batch_size"))
    if args.batch_size % world_size:
        common.fail(f"--batch_size {args.batch_size} must be divisible by the {world_size} processes")


def tokenize(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row that fits in max_length tokens; labels are -100 on prompt tokens
    so that only the completion (and its EOS) is learned. Says how many rows did not fit."""
    examples = []
    for row in rows:
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        completion = common.encode_completion(tokenizer, row["completion"], prompt=row["prompt"])
        if len(prompt) + len(completion) <= max_length:
            examples.append((prompt + completion, [-100] * len(prompt) + completion))
    if len(examples) < len(rows) and common.rank() == 0:
        print(f"note: {len(rows) - len(examples)} of {len(rows)} examples are longer than {max_length} "
              "tokens: left out")
    if not examples:
        common.fail(f"no example fits in {max_length} tokens: raise --max_length (at most the model's positions)")
    return examples


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    ids, mask = common.pad([ids for ids, _ in batch], pad_id, side="right")
    labels, _ = common.pad([labels for _, labels in batch], -100, side="right")
    return ids, mask, labels


def completion_loss(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens (of every process's batch). logits
    (B, T, V), labels (B, T) with -100 on prompt and padding. The logit at t predicts the token at t+1.
    For a micro-batch, `count` is the batch's number of completion tokens: the micro-batches' losses add up."""
    labels = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
                                               reduction="none")
    return common.masked_mean(losses, labels != -100, count)


@torch.no_grad()
def eval_loss(model, examples, pad_id, batch_size, device) -> float:
    """Mean completion loss per token over held-out examples (each process holds a share of them)."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(examples[i:i + batch_size], pad_id))
        logits = common.forward(common.unwrap(model), ids, mask).logits[:, :-1]  # no DDP: shares differ in size
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                                                   reduction="sum").item()
        count += (labels[:, 1:] != -100).sum().item()
    total, count = common.all_mean(torch.tensor([total, count], dtype=torch.float64)).tolist()  # over all processes
    return total / max(count, 1e-8)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    check_args(args, common.world_size())
    device, rank, world_size = common.setup(args)
    tokenizer = common.load_tokenizer(args.model_name_or_path)
    train_rows, test_rows = common.load_data(args.dataset_name, "sft", tokenizer, args.dataset_config,
                                             args.dataset_train_split, args.dataset_test_split,
                                             args.eval_rows, args.max_train_rows)
    model = common.load_model(args.model_name_or_path, tokenizer, device=device,
                              gradient_checkpointing=args.gradient_checkpointing)
    max_length = min(args.max_length, common.max_positions(model))
    # the final samples: prompts cut from the left so that prompt + response fit the model's positions
    test_queries = common.encode_prompts(tokenizer, [r["prompt"] for r in test_rows],
                                         common.max_positions(model) - args.max_new_tokens)
    train, test = tokenize(train_rows, tokenizer, max_length), tokenize(test_rows, tokenizer, max_length)
    if len(train) < world_size:
        common.fail(f"{len(train)} training examples cannot be shared by {world_size} processes")
    steps_per_epoch = max(1, len(train) // args.batch_size)  # full batches only (a last partial one is left out)
    num_steps = args.num_epochs * steps_per_epoch
    local_batch_size = args.batch_size // world_size  # this process's share of each batch
    micro_batch_size = min(args.micro_batch_size or local_batch_size, local_batch_size)  # rows per forward pass
    eval_batch_size = args.micro_batch_size or args.batch_size
    model = common.distribute(model, device, args.fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    derived = {"steps_per_epoch": steps_per_epoch, "num_steps": num_steps, "local_batch_size": local_batch_size,
               "micro_batch_size": micro_batch_size}
    run = common.Run(args, {"model": model, "optimizer": optimizer, "scheduler": scheduler}, derived)
    rng, order, start = random.Random(args.seed), [], 1  # the loop's state, fresh or resumed
    if run.resumed:
        rng, order, start = run.resumed["rng"], run.resumed["order"], run.resumed["step"] + 1
    if common.rank() == 0:
        print(f"{len(train)} training examples, {num_steps} steps, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} x {world_size}")

    # ---- training: next-token loss on completion tokens ----
    if args.fsdp:  # every rank passes as many held-out batches through the sharded model (padding: no loss)
        test += [(test[0][0], [-100] * len(test[0][0]))] * (-len(test) % world_size)
    test_shard = test[rank::world_size]
    model.train()  # dropout is off: train mode changes nothing but lets gradient checkpointing act
    for step in common.progress(range(start, num_steps + 1), desc="sft", initial=start - 1, total=num_steps):
        i = (step - 1) % steps_per_epoch
        if i == 0:  # a new epoch: a new order of the examples
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = order[i * args.batch_size:(i + 1) * args.batch_size][rank::world_size]  # this process's share
        ids, mask, labels = (t.to(device) for t in collate([train[j] for j in batch], tokenizer.pad_token_id))
        count, train_loss = (labels[:, 1:] != -100).sum(), 0.0  # the loss is a mean over the batch's tokens
        for first in range(0, len(ids), micro_batch_size):  # micro-batches, whose gradients add up
            rows = slice(first, first + micro_batch_size)
            with common.grad_sync(model, sync=first + micro_batch_size >= len(ids)):
                with common.autocast(device):
                    loss = completion_loss(common.forward(model, ids[rows], mask[rows]).logits, labels[rows], count)
                run.check_finite(step, loss=loss)
                loss.backward()
            train_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        run.check_finite(step, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.eval_every == 0 or step == num_steps:
            run.log({"episode": step * args.batch_size, "epoch": (step - 1) // steps_per_epoch,
                     "loss/train": train_loss,
                     "loss/eval": eval_loss(model, test_shard, tokenizer.pad_token_id, eval_batch_size, device),
                     "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0]}, step)
        if step % args.save_every == 0 and step < num_steps:
            run.save(step, rng=rng, order=order)

    # ---- evaluation: held-out loss, and sampled completions scored by the toy gold reward ----
    summary = {"eval_loss": eval_loss(model, test_shard, tokenizer.pad_token_id, eval_batch_size, device)}
    model.eval()  # generation keeps its KV cache (gradient checkpointing acts in train mode only)
    queries, query_mask = common.pad(test_queries, tokenizer.pad_token_id, side="left")
    with common.autocast(device):
        responses, response_mask, ended, _ = common.generate(model, queries.to(device), query_mask.to(device),
                                                             tokenizer, args.max_new_tokens)
    samples = [{"prompt": r["prompt"], "response": t, "demonstration": r["completion"]}
               for r, t in zip(test_rows, common.decode_responses(tokenizer, responses, response_mask))]
    summary["eos_rate"] = ended.float().mean().item()
    if args.dataset_name == common.TOY:
        summary |= common.gold_metrics(samples)
        summary["demo_gold"] = sum(common.gold_reward(r["prompt"], r["completion"]) for r in test_rows) / len(test_rows)
    for s in samples[:4]:
        print(f"  prompt: {s['prompt']!r}\n  sample: {s['response']!r}")
    run.finish(model, tokenizer, summary, samples=samples)
