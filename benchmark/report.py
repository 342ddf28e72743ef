"""Turn benchmark runs into a markdown table and PNG learning curves.

Runs live in folders named `<name>_s<seed>` (each with metrics.jsonl and summary.json); runs with
the same name are seeds of one configuration, shown as mean ± spread (max - min) / 2 in tables
and as min-max bands in plots.

    python benchmark/report.py table runs/bench/pipeline --initial ppo  # markdown, from summary.json
    python benchmark/report.py curves runs/bench/overopt --out benchmark/figures/overopt.png
    python benchmark/report.py points runs/bench/overopt --at 20 50 100   # metrics at iterations
    python benchmark/report.py timing runs/bench/pipeline               # where the time goes

matplotlib is needed only for `curves` (pip install matplotlib).
"""

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

TABLE_KEYS = ("gold", "reward", "kl", "length", "well_formed", "eos_rate", "wall_time", "peak_memory_mb")
TIMING_KEYS = ("time/generation", "time/scoring", "time/training", "eps", "tokens_per_second")
CURVE_KEYS = ("gold/reward", "objective/scores", "objective/kl", "response/length", "gold/well_formed")


@dataclass
class Args:
    command: tyro.conf.Positional[Literal["table", "curves", "points", "timing"]]
    """table: final summary.json values; curves: PNG learning curves; points: training metrics at
    iterations; timing: median seconds per iteration in each stage, and throughput"""
    runs: tyro.conf.Positional[Path]
    """folder holding the `<name>_s<seed>` run folders"""
    keys: tuple[str, ...] = ()
    """metrics to show (default: a standard set per command)"""
    at: tuple[int, ...] = (10, 25, 50, 100)
    """iterations (`step`) at which `points` reads the training metrics"""
    out: Path = field(default_factory=lambda: Path("benchmark/figures/curves.png"))
    """PNG file written by `curves`"""
    smooth: int = 5
    """moving-average window (iterations) for `curves`"""
    only: tuple[str, ...] = ()
    """show only these run groups (names without the `_s<seed>` suffix)"""
    initial: str | None = None
    """`table`: add a row for the policy before training, read from this run group's `initial` metrics"""


def group_runs(root: Path) -> dict[str, list[Path]]:
    groups = defaultdict(list)
    for run in sorted(p for p in root.iterdir() if p.is_dir() and re.search(r"_s\d+$", p.name)):
        groups[re.sub(r"_s\d+$", "", run.name)].append(run)
    return dict(groups)


def read_metrics(run: Path) -> list[dict]:
    """Training lines of metrics.jsonl (the ones with objective/kl or loss, not eval lines)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if not any(k.startswith("eval") for k in m)]


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else f"{mean:.2f}"


def table(groups: dict[str, list[Path]], keys: tuple[str, ...], initial: str | None = None) -> str:
    rows = [f"| run | seeds | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    summaries = {name: [json.loads((r / "summary.json").read_text()) for r in runs if (r / "summary.json").exists()]
                 for name, runs in groups.items()}
    if initial:
        summaries = {f"before RL ({initial}'s initial policy)": [s["initial"] for s in summaries[initial]]} | summaries
    for name, found in summaries.items():
        rows.append(f"| {name} | {len(found)} | {' | '.join(mean_spread([s.get(k) for s in found]) for k in keys)} |")
    return "\n".join(rows)


def points(groups: dict[str, list[Path]], keys: tuple[str, ...], at: tuple[int, ...]) -> str:
    rows = [f"| run | iteration | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    for name, runs in groups.items():
        metrics = [{m["step"]: m for m in read_metrics(r)} for r in runs]
        for step in at:
            found = [m[step] for m in metrics if step in m]
            if found:
                rows.append(f"| {name} | {step} | " + " | ".join(mean_spread([m.get(k) for m in found]) for k in keys) + " |")
    return "\n".join(rows)


def timing(groups: dict[str, list[Path]], keys: tuple[str, ...]) -> str:
    """Median over every training iteration of every seed: robust to the odd slow iteration."""
    rows = [f"| run | iterations | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    for name, runs in groups.items():
        metrics = [m for r in runs for m in read_metrics(r) if "time/training" in m]
        if metrics:
            medians = [statistics.median(m[k] for m in metrics) if all(k in m for m in metrics) else None
                       for k in keys]
            rows.append(f"| {name} | {len(metrics)} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in medians) + " |")
    return "\n".join(rows)


def curves(groups: dict[str, list[Path]], keys: tuple[str, ...], out: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for name, runs in groups.items():
        series = []
        for run in runs:
            ms = [m for m in read_metrics(run) if "episode" in m]
            xs = [m["episode"] for m in ms]
            series.append((xs, {k: [m.get(k, float("nan")) for m in ms] for k in keys}))
        n = min(len(xs) for xs, _ in series)
        xs = series[0][0][:n]
        for ax, key in zip(axes[0], keys):
            ys = [[sum(v[key][max(0, i - smooth + 1):i + 1]) / len(v[key][max(0, i - smooth + 1):i + 1])
                   for i in range(n)] for _, v in series]
            mean = [sum(col) / len(col) for col in zip(*ys)]
            (line,) = ax.plot(xs, mean, label=name)
            if len(ys) > 1:
                ax.fill_between(xs, [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)],
                                color=line.get_color(), alpha=0.2)
            ax.set_title(key)
            ax.set_xlabel("episode")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of runs: run a benchmark/*.sh script first", file=sys.stderr)
        sys.exit(2)
    groups = {k: v for k, v in group_runs(args.runs).items() if not args.only or k in args.only}
    if args.command == "table":
        print(table(groups, args.keys or TABLE_KEYS, args.initial))
    elif args.command == "points":
        print(points(groups, args.keys or CURVE_KEYS, args.at))
    elif args.command == "timing":
        print(timing(groups, args.keys or TIMING_KEYS))
    else:
        curves(groups, args.keys or CURVE_KEYS, args.out, args.smooth)
