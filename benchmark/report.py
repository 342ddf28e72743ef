"""Tables and learning curves from benchmark runs: folders `<name>_s<seed>` (metrics.jsonl, summary.json), where runs
of the same name are seeds of one configuration, shown as mean ± (max - min) / 2 and as min-max bands.

    python benchmark/report.py table runs/bench/pipeline --initial ppo      # --help: every command
"""

import json
import math
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
STABILITY_KEYS = {"gold": "gold/reward", "learned reward": "objective/scores", "KL": "objective/kl",
                  "length": "response/length", "perplexity": "perplexity", "ref perplexity": "ref_perplexity",
                  "well-formed": "gold/well_formed", "score p90-p50": "monitor/score_tail"}


@dataclass
class Args:
    command: tyro.conf.Positional[Literal["table", "curves", "points", "timing", "stability", "annotator",
                                          "quickstart", "show", "commits", "samples"]]
    """table: final summary.json values; curves: PNG learning curves (matplotlib); points: training metrics at
    iterations; timing: median seconds per iteration by stage; stability, annotator, quickstart, commits: those
    studies' tables; samples: each group's first final samples; show: print a file"""
    runs: tyro.conf.Positional[Path]
    """folder holding the `<name>_s<seed>` run folders (show: the file)"""
    keys: tuple[str, ...] = ()
    """metrics to show (default: a standard set per command)"""
    at: tuple[int, ...] = (10, 25, 50, 100)
    """`points`: iterations (`step`) to read"""
    out: Path = field(default_factory=lambda: Path("benchmark/figures/curves.png"))
    """`curves`: the PNG file"""
    smooth: int = 5
    """`curves`: moving-average window (iterations)"""
    only: tuple[str, ...] = ()
    """show only these run groups (names without `_s<seed>`), in this order"""
    per_seed: bool = False
    """`table`, `timing`: a row per run (seed) instead of per group"""
    initial: tuple[str, ...] = ()
    """`table`: add rows for these groups' policy before training (`samples`: their samples before training)"""
    n: int = 2
    """`samples`: how many samples per run"""


def group_runs(root: Path) -> dict[str, list[Path]]:
    groups = defaultdict(list)
    for run in sorted(p for p in root.iterdir() if p.is_dir() and re.search(r"_s\d+$", p.name)):
        groups[re.sub(r"_s\d+$", "", run.name)].append(run)
    return dict(groups)


def read_metrics(run: Path) -> list[dict]:
    """Training lines of metrics.jsonl (not the eval lines)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if not any(k.startswith("eval") for k in m)]


def mean_spread(values: list[float], digits: int = 2) -> str:
    """Mean ± half the range (the mean alone for one value; None and NaN left out, "-" if nothing is left)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean, spread = sum(values) / len(values), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def header(first: str, keys) -> list[str]:
    return [row(first, *keys), "|---" * (len(keys) + first.count("|") + 1) + "|"]


def table(groups: dict[str, list[Path]], keys: tuple[str, ...], initial: str | tuple[str, ...] = ()) -> str:
    rows = header("run | seeds", keys)
    summaries = {name: [json.loads((r / "summary.json").read_text()) for r in runs if (r / "summary.json").exists()]
                 for name, runs in groups.items()}
    if initial:  # the initial policy of those groups, or of each of their seeds (--per_seed)
        names = "|".join(re.escape(i) for i in ([initial] if isinstance(initial, str) else initial))
        summaries = {f"before RL ({n}'s initial policy)": [s["initial"] for s in v] for n, v in summaries.items()
                     if re.fullmatch(rf"(?:{names})(_s\d+)?", n)} | summaries
    for name, found in summaries.items():
        rows.append(row(name, len(found), *(mean_spread([s.get(k) for s in found]) for k in keys)))
    return "\n".join(rows)


def points(groups: dict[str, list[Path]], keys: tuple[str, ...], at: tuple[int, ...]) -> str:
    rows = header("run | iteration", keys)
    for name, runs in groups.items():
        metrics = [{m["step"]: m for m in read_metrics(r)} for r in runs]
        for step in at:
            if found := [m[step] for m in metrics if step in m]:
                rows.append(row(name, step, *(mean_spread([m.get(k) for m in found]) for k in keys)))
    return "\n".join(rows)


def timing(groups: dict[str, list[Path]], keys: tuple[str, ...]) -> str:
    """Median over every training iteration of every seed: robust to the odd slow iteration."""
    rows = header("run | iterations", keys)
    for name, runs in groups.items():
        if metrics := [m for r in runs for m in read_metrics(r) if "time/training" in m]:
            medians = [statistics.median(m[k] for m in metrics) if all(k in m for m in metrics) else None
                       for k in keys]
            rows.append(row(name, len(metrics), *("-" if v is None else f"{v:.3g}" for v in medians)))
    return "\n".join(rows)


def samples(groups: dict[str, list[Path]], n: int, initial: tuple[str, ...] = ()) -> str:
    """The first n held-out samples of each group's first run (and of the initial groups' policy before training)."""
    rows = ["| run | prompt | response | gold | reward |", "|---|---|---|---|---|"]
    files = [(f"before RL ({name}'s initial policy)", groups[name][0] / "initial_samples.jsonl") for name in initial]
    files += [(runs[0].name, runs[0] / "samples.jsonl") for runs in groups.values()]
    for name, path in files:
        for line in path.read_text().splitlines()[:n]:
            r = json.loads(line)
            prompt, response = r["prompt"].replace("|", "\\|"), r["response"].replace("|", "\\|")
            rows.append(row(name, prompt, response, f"{r['gold']:.2f}", f"{r['score']:.2f}"))
    return "\n".join(rows)


def stability(root: Path, window: int = 5) -> str:
    """The stability study's finished runs: training metrics over windows of iterations, peak and final gold per seed,
    the final evaluation. Perplexity: exp(sum of -log pi / response tokens), the reference's with the KL added."""
    def load(run: Path) -> dict[int, dict]:  # policy iterations (step >= 1)
        out = {}
        for m in read_metrics(run):
            if "objective/kl" in m and m["step"] >= 1:
                tokens = m["response/length"] + m["response/eos_rate"]  # EOS is a response token too
                out[m["step"]] = m | {"perplexity": math.exp(m["objective/entropy"] / tokens),
                                      "ref_perplexity": math.exp((m["objective/entropy"] + m["objective/kl"]) / tokens)}
        return out

    def cell(values: list[float | None]) -> str:
        if None in values:
            return "-"
        return f"{sum(values) / len(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"

    finished = {name: [r for r in runs if (r / "summary.json").exists()] for name, runs in group_runs(root).items()}
    finished = {name: runs for name, runs in finished.items() if runs}
    groups = {name: [load(r) for r in runs] for name, runs in finished.items()}
    last = min(max(m) for runs in groups.values() for m in runs)
    out = [f"Training metrics, mean over iterations (end - {window}, end], then mean ± half-range over seeds.\n",
           *header("algo | seeds | iterations", STABILITY_KEYS)]
    first = [m[1] for runs in groups.values() for m in runs]  # iteration 1 samples the SFT model in every run
    cells = [f"{sum(vs) / len(vs):.2f}" if (vs := [m[k] for m in first if k in m]) else "-"
             for k in STABILITY_KEYS.values()]
    out.append(row("SFT (iteration 1, all runs)", f"{len(first)} runs", 1, *cells))
    for name, runs in groups.items():
        for end in [window, *range(2 * window, last + 1, 2 * window)]:
            steps = range(end - window + 1, end + 1)
            cells = [cell([sum(m[s][k] for s in steps) / window if k in m[1] else None for m in runs])
                     for k in STABILITY_KEYS.values()]
            out.append(row(name, len(runs), f"{steps[0]}-{end}", *cells))
    out += ["\nPeak and final gold per seed (window means), and the iteration of the peak:\n",
            "| algo | seed runs: peak gold @ iteration -> final gold |", "|---|---|"]
    for name, runs in groups.items():
        parts = []
        for m in runs:
            smooth = {e: sum(m[s]["gold/reward"] for s in range(e - window + 1, e + 1)) / window
                      for e in range(window, last + 1)}
            peak = max(smooth, key=smooth.get)
            parts.append(f"{smooth[peak]:.2f} @ {peak} -> {smooth[last]:.2f}")
        out.append(f"| {name} | {'; '.join(parts)} |")
    keys = ("gold", "reward", "kl", "length", "well_formed", "eos_rate", "wall_time")
    out += ["\nFinal held-out evaluation (summary.json), mean ± half-range over seeds:\n", *header("algo", keys)]
    for name, runs in finished.items():
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        out.append(row(name, *(cell([s[k] for s in summaries]) for k in keys)))
    return "\n".join(out)


def label_agreement(k: float, c: float, pairs: int) -> float:
    """How often the toy annotator's training labels agree with gold, on the pairs whose gold differs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import common

    rows = common.toy_dataset("preference", n_train=pairs, k=k, c=c)["train"]
    golds = [[common.gold_reward(r["prompt"], r[key]) for key in ("chosen", "rejected")] for r in rows]
    decided = [a > b for a, b in golds if a != b]
    return sum(decided) / len(decided)


def annotator(root: Path) -> str:
    """A row per annotator setting (rm_<setting>_s<seed>, ppo_<setting>_s<seed>), against the study's targets."""
    rows = header("annotator k, c, pairs | c/k | seeds", ("labels' agreement with gold", "reward model accuracy",
                  "its agreement with gold", "its score-length correlation", "PPO gold gain (lowest seed)",
                  "PPO length (SFT policy)", "well-formed", "meets the targets"))
    done = {p.name for p in root.glob("*_s*") if (p / "summary.json").exists()}
    settings = {re.sub(r"^rm_(.*)_s\d+$", r"\1", n) for n in done if n.startswith("rm_")}
    for name in sorted(settings, key=lambda n: [float(x[1:]) for x in n.split("_")]):
        seeds = sorted(n[len(f"ppo_{name}"):] for n in done if re.fullmatch(rf"ppo_{re.escape(name)}_s\d+", n))
        seeds = [s for s in seeds if f"rm_{name}{s}" in done]
        if not seeds:
            continue
        rms = [json.loads((root / f"rm_{name}{s}" / "summary.json").read_text()) for s in seeds]
        ppos = [json.loads((root / f"ppo_{name}{s}" / "summary.json").read_text()) for s in seeds]
        k, c, pairs = (float(x[1:]) for x in name.split("_"))
        agreement = label_agreement(k, c, int(pairs))
        gains = [p["gold"] - p["initial"]["gold"] for p in ppos]
        col = lambda runs, key: [r[key] for r in runs]
        mean = lambda v: sum(v) / len(v)
        checks = {  # the annotator study's targets for the default pipeline
            "gain >= 1.0": mean(gains) >= 1.0, "every seed >= 0.7": min(gains) >= 0.7,
            "every seed well-formed >= 0.95": min(col(ppos, "well_formed")) >= 0.95,
            "length r in 0.3-0.5": 0.3 <= mean(col(rms, "length_corr")) <= 0.5,
            "labels 0.72-0.82": 0.72 <= agreement <= 0.82,
            "length grows": mean(col(ppos, "length")) > mean([p["initial"]["length"] for p in ppos]) + 1}
        failed = ", ".join(t for t, ok in checks.items() if not ok)
        verdict = f"no: {failed}" if failed else "yes" if len(seeds) >= 3 else f"so far ({len(seeds)} of 3 seeds)"
        rows.append(f"| {k:g}, {c:g}, {pairs:.0f} | {c / k:.3g} | {len(ppos)} | {agreement:.3f} | "
                    f"{mean_spread(col(rms, 'accuracy'))} | {mean_spread(col(rms, 'gold_accuracy'))} | "
                    f"{mean_spread(col(rms, 'length_corr'))} | {mean_spread(gains)} ({min(gains):.2f}) | "
                    f"{mean_spread(col(ppos, 'length'))} ({mean([p['initial']['length'] for p in ppos]):.1f}) | "
                    f"{mean_spread(col(ppos, 'well_formed'))} | {verdict} |")
    return "\n".join(rows)


def quickstart(root: Path) -> str:
    """The three stages of the README's quick start (run_all.sh's quickstart study), a line each, as a code block."""
    sft, rm, ppo = (json.loads((root / name / "summary.json").read_text()) for name in ("sft", "reward_model", "ppo"))
    stages = [("sft.py", sft, "eval_loss {eval_loss:.3f}, gold {gold:.2f}, well_formed {well_formed:.2f}"),
              ("reward_model.py", rm, ("accuracy {accuracy:.2f}, gold_accuracy {gold_accuracy:.2f}, "
                                       "length_corr {length_corr:.2f}")),
              ("ppo.py", ppo, ("gold {initial[gold]:.2f} -> {gold:.2f}, reward {initial[reward]:.2f} -> {reward:.2f}, "
                               "kl {kl:.1f}, length {initial[length]:.1f} -> {length:.1f}"))]
    lines = [f"{name:<16}{s['wall_time']:4.0f} s   " + text.format(**s) for name, s, text in stages]
    total = sft["wall_time"] + rm["wall_time"] + ppo["wall_time"]
    return "\n".join(["```", *lines, f"{'total':<16}{total:4.0f} s", "```"])


def commits(root: Path) -> str:
    """Each start of a study by benchmark/run_all.sh: when, at which commit, and (timing.log) its wall time."""
    lines = [line for line in (root / "commits.log").read_text().splitlines() if line.strip()]
    timing = (root / "timing.log").read_text() if (root / "timing.log").exists() else ""
    minutes = dict(re.findall(r"^\S+ (\S+) done in (\d+) min$", timing, re.MULTILINE))
    rows = ["| started (UTC) | commit | study | wall time |", "|---|---|---|---|"]
    for line in lines:
        start, commit, studies = re.match(r"(\S+) (\S+(?: \([^)]*\))?) ?(.*)", line).groups()
        rows.append(f"| {start} | {commit} | {studies} | {minutes[studies] + ' min' if studies in minutes else '-'} |")
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
            series.append(([m["episode"] for m in ms], {k: [m.get(k, float("nan")) for m in ms] for k in keys}))
        n = min(len(xs) for xs, _ in series)
        xs = series[0][0][:n]
        for ax, key in zip(axes[0], keys):
            ys = [[sum(v[key][max(0, i - smooth + 1):i + 1]) / len(v[key][max(0, i - smooth + 1):i + 1])
                   for i in range(n)] for _, v in series]
            (line,) = ax.plot(xs, [sum(col) / len(col) for col in zip(*ys)], label=name)
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


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(args: Args) -> str | None:
    if args.command == "show":
        if not args.runs.is_file():
            fail(f"{args.runs} does not exist: run its study first")
        return args.runs.read_text().rstrip("\n")
    if not args.runs.is_dir():
        fail(f"{args.runs} is not a folder of runs: run its study first (bash benchmark/run_all.sh STUDY)")
    needs = {"quickstart": [args.runs / n / "summary.json" for n in ("sft", "reward_model", "ppo")],
             "commits": [args.runs / "commits.log"]}.get(args.command, [])
    if missing := [str(p) for p in needs if not p.exists()]:
        fail(f"{', '.join(missing)} missing: run its study first")
    if args.command in ("annotator", "quickstart", "commits", "stability"):
        rows = {"annotator": annotator, "quickstart": quickstart, "commits": commits, "stability": stability}
        text = rows[args.command](args.runs)
        if args.command == "annotator" and len(text.splitlines()) < 3:
            fail(f"{args.runs} holds no finished pair of rm_<setting>_s<seed> and ppo_<setting>_s<seed> runs: "
                 "run its study first")
        return text
    groups = group_runs(args.runs)
    groups = {k: groups[k] for k in args.only if k in groups} if args.only else groups  # in --only's order
    if missing := [name for name in args.only if name not in groups]:
        fail(f"{args.runs} has no runs named {', '.join(missing)}_s<seed>")
    if args.per_seed:
        groups = {run.name: [run] for runs in groups.values() for run in runs}
    if args.command == "samples" and (missing := [name for name in args.initial if name not in groups]):
        fail(f"{args.runs} has no runs named {', '.join(missing)}_s<seed>")
    unfinished = [r.name for runs in groups.values() for r in runs if not (r / "summary.json").exists()]
    if args.command != "curves" and (unfinished or not groups):
        fail(f"{args.runs}: {'unfinished runs: ' + ', '.join(unfinished) if unfinished else 'no runs'}: "
             "finish its study first")
    if args.command == "table":
        return table(groups, args.keys or TABLE_KEYS, args.initial)
    if args.command == "points":
        return points(groups, args.keys or CURVE_KEYS, args.at)
    if args.command == "timing":
        return timing(groups, args.keys or TIMING_KEYS)
    if args.command == "samples":
        if args.n < 1:
            fail(f"--n {args.n}: give at least 1 sample per run")
        return samples(groups, args.n, args.initial)
    curves(groups, args.keys or CURVE_KEYS, args.out, args.smooth)
    return None


if __name__ == "__main__":
    if (text := main(tyro.cli(Args, use_underscores=True))) is not None:
        print(text)
