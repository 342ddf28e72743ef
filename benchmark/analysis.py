"""How much of an RL run's reward gain is only longer responses: the length-stratified reward gain of "A Long Way
to Go" (Singhal et al. 2023). Bin the responses by length; in each bin holding responses of both the initial policy
(initial_samples.jsonl) and the trained one (samples.jsonl), take the gain in mean reward; average the gains weighted
by the trained policy's counts (--weights both: both policies' counts). A gain that only moves into longer,
higher-scoring bins vanishes from the average: `length_share` = 1 - stratified gain / total gain.

    python benchmark/analysis.py runs/ppo --bin_width 2 --weights both
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

Weights = Literal["both", "policy"]


@dataclass
class Args:
    run_dir: tyro.conf.Positional[Path]
    """a finished RL run's folder (it holds initial_samples.jsonl and samples.jsonl)"""
    bin_width: int = 5
    """length bin width in tokens"""
    weights: Weights = "policy"
    """weight of a bin's gain: its count of trained responses (`policy`) or of both policies' (`both`)"""


def length_stratified_gain(base_rewards: list[float], base_lengths: list[int], rewards: list[float],
                           lengths: list[int], bin_width: int = 5, weights: Weights = "policy") -> dict:
    """{reward_gain, length_stratified_gain, length_share}; the last two are NaN when no bin holds both policies'
    responses, the share also when the total gain is 0."""
    bins: dict[int, tuple[list[float], list[float]]] = {}
    for group, (rs, ls) in enumerate(((base_rewards, base_lengths), (rewards, lengths))):
        for r, n in zip(rs, ls):
            bins.setdefault(n // bin_width, ([], []))[group].append(r)
    shared = [(base, new) for base, new in bins.values() if base and new]
    weight = [len(new) + (len(base) if weights == "both" else 0) for base, new in shared]
    gains = [sum(new) / len(new) - sum(base) / len(base) for base, new in shared]
    stratified = sum(w * g for w, g in zip(weight, gains)) / sum(weight) if shared else float("nan")
    total = sum(rewards) / len(rewards) - sum(base_rewards) / len(base_rewards)
    return {"reward_gain": total, "length_stratified_gain": stratified,
            "length_share": 1 - stratified / total if total else float("nan")}


def read_samples(path: Path) -> list[dict]:
    if not path.exists():
        print(f"error: {path} not found: pass the folder of a finished RL run (ppo.py, ppo_max.py, rrhf.py, rcfd.py)",
              file=sys.stderr)
        sys.exit(2)
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not samples:
        print(f"error: {path} holds no samples", file=sys.stderr)
        sys.exit(2)
    return samples


def run_gains(run_dir: Path, bin_width: int = 5, weights: Weights = "policy") -> dict[str, dict]:
    """length_stratified_gain of a run's final samples against its initial ones, on its reward ("reward": the
    samples' `score`) and, on the toy world, on the gold reward ("gold")."""
    base, final = read_samples(Path(run_dir) / "initial_samples.jsonl"), read_samples(Path(run_dir) / "samples.jsonl")
    keys = {"reward": "score"} | ({"gold": "gold"} if all("gold" in s for s in base + final) else {})
    return {name: length_stratified_gain([s[key] for s in base], [s["length"] for s in base],
                                         [s[key] for s in final], [s["length"] for s in final], bin_width, weights)
            for name, key in keys.items()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.bin_width < 1:
        print(f"error: --bin_width must be positive, got {args.bin_width}", file=sys.stderr)
        sys.exit(2)
    for name, gain in run_gains(args.run_dir, args.bin_width, args.weights).items():
        print(f"{name}: " + " ".join(f"{k}={v:.4g}" for k, v in gain.items()))
