"""Markdown tables for benchmark/stability.sh: training metrics of ppo.py and ppo_max.py over seeds.

    python benchmark/stability_table.py runs/bench/stability

Runs are folders `<algo>_s<seed>` holding a finished run (summary.json). Each cell is the mean ±
half-range over seeds of the metric averaged over a window of iterations (one iteration's 64 samples
are noisy). The perplexities are computed the same way for both scripts from what ppo.py logs:
policy perplexity exp(sum of -log pi / response tokens) (= ppo_max.py's `monitor/perplexity`) and
reference perplexity exp((sum of -log pi + KL) / response tokens) (= `monitor/ref_perplexity`).
The score tail (90th percentile - median of the raw scores) is logged by ppo_max.py only.
"""

import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = {"gold": "gold/reward", "learned reward": "objective/scores", "KL": "objective/kl",
           "length": "response/length", "perplexity": "perplexity", "ref perplexity": "ref_perplexity",
           "well-formed": "gold/well_formed", "score p90-p50": "monitor/score_tail"}


def load(run: Path) -> dict[int, dict]:
    """Policy iterations (step >= 1) of a run's metrics.jsonl, with the derived perplexity."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "objective/kl" in m and m["step"] >= 1:
            tokens = m["response/length"] + m["response/eos_rate"]  # EOS is a response token too
            out[m["step"]] = m | {"perplexity": math.exp(m["objective/entropy"] / tokens),
                                  "ref_perplexity": math.exp((m["objective/entropy"] + m["objective/kl"]) / tokens)}
    return out


def cell(values: list[float | None]) -> str:
    if None in values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main(root: Path, window: int = 5) -> None:
    groups = defaultdict(list)
    for run in sorted(p for p in root.iterdir() if (p / "summary.json").exists()):
        groups[re.sub(r"_s\d+$", "", run.name)].append(load(run))
    last = min(max(m) for runs in groups.values() for m in runs)
    ends = [window, *range(2 * window, last + 1, 2 * window)]
    print(f"Training metrics, mean over iterations (end - {window}, end], then mean ± half-range over seeds.\n")
    print("| algo | seeds | iterations | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    first = [m[1] for runs in groups.values() for m in runs]  # iteration 1 samples the SFT model in every run
    cells = [f"{sum(vs) / len(vs):.2f}" if (vs := [m[key] for m in first if key in m]) else "-" for key in COLUMNS.values()]
    print(f"| SFT (iteration 1, all runs) | {len(first)} runs | 1 | " + " | ".join(cells) + " |")
    for name, runs in groups.items():
        for end in ends:
            steps = range(end - window + 1, end + 1)
            cells = [cell([sum(m[s][key] for s in steps) / window if key in m[1] else None for m in runs])
                     for key in COLUMNS.values()]
            print(f"| {name} | {len(runs)} | {steps[0]}-{end} | " + " | ".join(cells) + " |")
    print("\nPeak and final gold per seed (window means), and the iteration of the peak:\n")
    print("| algo | seed runs: peak gold @ iteration -> final gold |")
    print("|---|---|")
    for name, runs in groups.items():
        parts = []
        for m in runs:
            smooth = {e: sum(m[s]["gold/reward"] for s in range(e - window + 1, e + 1)) / window
                      for e in range(window, last + 1)}
            peak = max(smooth, key=smooth.get)
            parts.append(f"{smooth[peak]:.2f} @ {peak} -> {smooth[last]:.2f}")
        print(f"| {name} | {'; '.join(parts)} |")
    print("\nFinal held-out evaluation (summary.json), mean ± half-range over seeds:\n")
    keys = ("gold", "reward", "kl", "length", "well_formed", "eos_rate", "wall_time")
    print("| algo | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name in groups:
        summaries = [json.loads(p.read_text()) for p in sorted(root.glob(f"{name}_s*/summary.json"))]
        print(f"| {name} | " + " | ".join(cell([s[k] for s in summaries]) for k in keys) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python benchmark/stability_table.py runs/bench/stability [window]")
    main(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:]))
