"""How much of an RL run's reward gain is only longer responses: the length-stratified reward gain of
"A Long Way to Go" (Singhal et al. 2023; their WRG, later NRG).

Bucket the responses by length (bins of `bin_width` tokens, EOS excluded). In each bin that holds
responses of both the initial policy (the run's initial_samples.jsonl, its evaluation before
training) and the trained one (samples.jsonl, its final evaluation), take the gain
mean(reward) - mean(initial reward); average those gains, weighted by the trained policy's counts in the
bins (--weights both: by both policies' counts). A gain that
comes only from moving into longer, higher-scoring bins vanishes from this average, so
`length_share` = 1 - stratified gain / total gain is near 1 when the gain is length and near 0 when
it is not.

    python benchmark/analysis.py runs/ppo                   # the run's reward, and gold on toy
    python benchmark/analysis.py runs/ppo --bin_width 2 --weights both

Other benchmark code imports `length_stratified_gain` (from lists) or `run_gains` (from a run folder).
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
    """weight of a bin's gain: `policy`, the trained policy's count (the policy's gain over what the initial
    policy scores at the same lengths; a bin holding a few trained responses and many initial ones weighs
    little); `both`, its initial + trained response counts"""


def length_stratified_gain(base_rewards: list[float], base_lengths: list[int], rewards: list[float],
                           lengths: list[int], bin_width: int = 5, weights: Weights = "policy") -> dict:
    """The total reward gain, the length-stratified gain and the share of the gain that is length.

    total = mean(rewards) - mean(base_rewards);
    stratified = sum_b w_b (mean_b(rewards) - mean_b(base_rewards)) / sum_b w_b over the bins b that
    hold both, with w_b = n_b(base) + n_b(policy) (weights="both") or n_b(policy) ("policy");
    length_share = 1 - stratified / total. The stratified gain and the share are NaN when no bin
    holds both, and the share when the total gain is 0."""
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
    """The samples of a run's <name>.jsonl, one dict per line."""
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
    """length_stratified_gain of a run's final samples against its initial ones, on the reward the
    run trained on ("reward": the samples' `score`) and, on the toy world, on the gold reward ("gold")."""
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
