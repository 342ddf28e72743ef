"""Where ppo.py's PPO epochs spend their time: one minibatch step (policy and value forward and backward, gradient
clipping, AdamW) on speed.py's toy models, under the variants of RESULTS.md's table, on random token ids (4 prompt
tokens + the response width, every position real). The variants take turns, 5 steps each per round after 3 warm-up
steps, so that a slow spell of the machine falls on all of them; each gets the median over its steps.

    python benchmark/ppo_step.py --profile      # and torch.profiler's table of the plain step
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common

QUERY = 4


def build(models: Path, attn: str = "sdpa", foreach: bool = False, compile: bool = False):
    policy = transformers.AutoModelForCausalLM.from_pretrained(models / "sft", attn_implementation=attn)
    value = common.TokenScores(transformers.AutoModelForSequenceClassification.from_pretrained(
        models / "reward_model", attn_implementation=attn))
    optimizer = torch.optim.AdamW([*policy.parameters(), *value.parameters()], lr=1e-7, eps=1e-5, foreach=foreach)
    if compile:
        policy.forward = torch.compile(policy.forward, dynamic=True)
        value.forward = torch.compile(value.forward, dynamic=True)
    return policy, value, optimizer


def step(models, parts: list[tuple[int, int]]) -> None:
    """One optimizer step over micro-batches (rows, response width)."""
    policy, value, optimizer = models
    optimizer.zero_grad()
    for rows, width in parts:
        ids = torch.randint(3, 100, (rows, QUERY + width))
        mask = torch.ones_like(ids)
        logprobs = common.response_logprobs(policy, ids, mask, QUERY)
        values = value(ids, mask)[:, QUERY - 1:-1]
        (logprobs.mean() + values.mean()).backward()
    torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
    optimizer.step()


def timed(variants: list, rounds: int) -> list[float]:
    """Median ms per step of each (name, models, parts), the variants taking turns."""
    for _, models, parts in variants:
        for _ in range(3):
            step(models, parts)
    times = [[] for _ in variants]
    for _ in range(rounds):
        for (_, models, parts), own in zip(variants, times):
            for _ in range(5):
                t = time.perf_counter()
                step(models, parts)
                own.append(time.perf_counter() - t)
    return [statistics.median(own) * 1000 for own in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's table of the plain step")
    parser.add_argument("--rounds", type=int, default=10, help="turns of 5 steps per variant")
    parser.add_argument("--models", type=Path, default=ROOT / "runs/bench/speed/models-toy-cpu",
                        help="speed.py's toy models (its work folder's models-toy-cpu)")
    args = parser.parse_args()
    if not (args.models / "reward_model" / "summary.json").exists():
        sys.exit(f"error: {args.models} has no models: run `python benchmark/speed.py` first")
    torch.manual_seed(0)
    plain = build(args.models)
    variants = [("plain step, sdpa, width 48", plain, [(32, 48)]),
                ("eager attention, width 48", build(args.models, "eager"), [(32, 48)]),
                ("width 40", plain, [(32, 40)]), ("width 32", plain, [(32, 32)]),
                ("2 length-sorted micro-batches, widths 33 and 48", plain, [(16, 33), (16, 48)]),
                ("4 length-sorted micro-batches, widths 31, 33, 36, 48", plain, [(8, 31), (8, 33), (8, 36), (8, 48)]),
                ("AdamW foreach=True, width 48", build(args.models, foreach=True), [(32, 48)])]
    t = time.perf_counter()
    compiled = build(args.models, compile=True)
    for width in (32, 40, 48):
        step(compiled, [(32, width)])
    name = f"torch.compile (dynamic shapes; compiling took {time.perf_counter() - t:.0f} s), width 48"
    variants.append((name, compiled, [(32, 48)]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms per minibatch step of 32 rows, "
          f"{args.rounds} rounds of 5 steps\n")
    print("| variant | ms |\n|---|---|")
    for (name, _, _), ms in zip(variants, timed(variants, args.rounds)):
        print(f"| {name} | {ms:.0f} |")
    if args.profile:
        with torch.profiler.profile() as prof:
            for _ in range(5):
                step(plain, [(32, 48)])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
