"""Turn benchmark runs into a markdown table and PNG learning curves.

Runs live in folders named `<name>_s<seed>` (each with metrics.jsonl and summary.json); runs with
the same name are seeds of one configuration, shown as mean ± spread (max - min) / 2 in tables
and as min-max bands in plots.

    python benchmark/report.py table runs/bench/pipeline --initial ppo  # markdown, from summary.json
    python benchmark/report.py curves runs/bench/overopt --out benchmark/figures/overopt.png
    python benchmark/report.py points runs/bench/overopt --at 20 50 100   # metrics at iterations
    python benchmark/report.py timing runs/bench/pipeline               # where the time goes
    python benchmark/report.py annotator runs/bench/annotator           # the annotator sweep, against its targets
    python benchmark/report.py quickstart runs/bench/quickstart         # the README's quick start: three runs
    python benchmark/report.py show runs/bench/length/table.md          # a table a study script wrote
    python benchmark/report.py samples runs/bench/stability --n 2       # what the final policies write
    python benchmark/report.py commits runs/bench                       # the commits the runs came from

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
    command: tyro.conf.Positional[Literal["table", "curves", "points", "timing", "annotator", "quickstart", "show",
                                          "commits", "samples"]]
    """table: final summary.json values; curves: PNG learning curves; points: training metrics at
    iterations; timing: median seconds per iteration in each stage, and throughput; annotator: the
    annotator sweep (benchmark/annotator.sh), one row per setting, checked against its targets; quickstart:
    the quick start's three runs (sft, reward_model, ppo); show: print a table file; commits: the commits
    benchmark/run_all.sh recorded; samples: the first final-evaluation samples of each group's first seed"""
    runs: tyro.conf.Positional[Path]
    """folder holding the `<name>_s<seed>` run folders (show: the file)"""
    keys: tuple[str, ...] = ()
    """metrics to show (default: a standard set per command)"""
    at: tuple[int, ...] = (10, 25, 50, 100)
    """iterations (`step`) at which `points` reads the training metrics"""
    out: Path = field(default_factory=lambda: Path("benchmark/figures/curves.png"))
    """PNG file written by `curves`"""
    smooth: int = 5
    """moving-average window (iterations) for `curves`"""
    only: tuple[str, ...] = ()
    """show only these run groups (names without the `_s<seed>` suffix), in this order"""
    per_seed: bool = False
    """`table`, `timing`: a row per run (seed) instead of per group"""
    initial: tuple[str, ...] = ()
    """`table`: add a row for the policy before training, read from these run groups' `initial` metrics (`samples`:
    their samples before training)"""
    n: int = 2
    """`samples`: how many samples per run"""


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


def table(groups: dict[str, list[Path]], keys: tuple[str, ...], initial: str | tuple[str, ...] = ()) -> str:
    rows = [f"| run | seeds | {' | '.join(keys)} |", "|---" * (len(keys) + 2) + "|"]
    summaries = {name: [json.loads((r / "summary.json").read_text()) for r in runs if (r / "summary.json").exists()]
                 for name, runs in groups.items()}
    if initial:  # the initial policy of those groups, or of each of their seeds (--per_seed)
        names = "|".join(re.escape(i) for i in ([initial] if isinstance(initial, str) else initial))
        firsts = {n: v for n, v in summaries.items() if re.fullmatch(rf"(?:{names})(_s\d+)?", n)}
        summaries = {f"before RL ({n}'s initial policy)": [s["initial"] for s in v] for n, v in firsts.items()} | summaries
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


def samples(groups: dict[str, list[Path]], n: int, initial: tuple[str, ...] = ()) -> str:
    """The first n held-out samples (samples.jsonl: the same prompts for every run) of each group's first run, and,
    with initial, of those groups' policy before training (initial_samples.jsonl)."""
    rows = ["| run | prompt | response | gold | reward |", "|---|---|---|---|---|"]
    files = [(f"before RL ({name}'s initial policy)", groups[name][0] / "initial_samples.jsonl") for name in initial]
    files += [(runs[0].name, runs[0] / "samples.jsonl") for runs in groups.values()]
    cell = lambda text: text.replace("|", "\\|")
    for name, path in files:
        for line in path.read_text().splitlines()[:n]:
            r = json.loads(line)
            rows.append(f"| {name} | {cell(r['prompt'])} | {cell(r['response'])} | {r['gold']:.2f} | {r['score']:.2f} |")
    return "\n".join(rows)


def label_agreement(k: float, c: float, pairs: int) -> float:
    """How often the toy annotator's training labels agree with gold, on the pairs whose gold differs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import common

    rows = common.toy_dataset("preference", n_train=pairs, k=k, c=c)["train"]
    golds = [(common.gold_reward(r["prompt"], r["chosen"]), common.gold_reward(r["prompt"], r["rejected"])) for r in rows]
    decided = [a > b for a, b in golds if a != b]
    return sum(decided) / len(decided)


def annotator(root: Path) -> str:
    """One row per annotator setting (rm_<setting>_s<seed>, ppo_<setting>_s<seed>, seeds with both finished): the
    labels, the reward model, and PPO's gold gain over its initial (SFT) policy, mean ± spread over seeds. A setting
    meets the targets ("yes") only on 3 seeds or more."""
    rows = [("| annotator k, c, pairs | c/k | seeds | labels' agreement with gold | reward model accuracy | its agreement "
             "with gold | its score-length correlation | PPO gold gain (lowest seed) | PPO length (SFT policy) | "
             "well-formed | meets the targets |"), "|---" * 11 + "|"]
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
        checks = {  # issue 19's targets for the default pipeline
            "gain >= 1.0": mean(gains) >= 1.0, "every seed >= 0.7": min(gains) >= 0.7,
            "every seed well-formed >= 0.95": min(col(ppos, "well_formed")) >= 0.95,
            "length r in 0.3-0.5": 0.3 <= mean(col(rms, "length_corr")) <= 0.5,
            "labels 0.72-0.82": 0.72 <= agreement <= 0.82,
            "length grows": mean(col(ppos, "length")) > mean([p["initial"]["length"] for p in ppos]) + 1}
        failed = [t for t, ok in checks.items() if not ok]
        verdict = "no: " + ", ".join(failed) if failed else "yes" if len(seeds) >= 3 else f"so far ({len(seeds)} of 3 seeds)"
        rows.append(f"| {k:g}, {c:g}, {pairs:.0f} | {c / k:.3g} | {len(ppos)} | {agreement:.3f} | "
                    f"{mean_spread(col(rms, 'accuracy'))} | {mean_spread(col(rms, 'gold_accuracy'))} | "
                    f"{mean_spread(col(rms, 'length_corr'))} | {mean_spread(gains)} ({min(gains):.2f}) | "
                    f"{mean_spread(col(ppos, 'length'))} ({mean([p['initial']['length'] for p in ppos]):.1f}) | "
                    f"{mean_spread(col(ppos, 'well_formed'))} | {verdict} |")
    return "\n".join(rows)


def quickstart(root: Path) -> str:
    """The three stages of the README's quick start (benchmark/quickstart.sh), a line each, as a code block."""
    sft, rm, ppo = (json.loads((root / name / "summary.json").read_text()) for name in ("sft", "reward_model", "ppo"))
    first = ppo["initial"]
    return "\n".join(["```",
        (f"sft.py          {sft['wall_time']:4.0f} s   eval_loss {sft['eval_loss']:.3f}, gold {sft['gold']:.2f}, "
         f"well_formed {sft['well_formed']:.2f}"),
        (f"reward_model.py {rm['wall_time']:4.0f} s   accuracy {rm['accuracy']:.2f}, gold_accuracy {rm['gold_accuracy']:.2f}, "
         f"length_corr {rm['length_corr']:.2f}"),
        (f"ppo.py          {ppo['wall_time']:4.0f} s   gold {first['gold']:.2f} -> {ppo['gold']:.2f}, reward {first['reward']:.2f} -> "
         f"{ppo['reward']:.2f}, kl {ppo['kl']:.1f}, length {first['length']:.1f} -> {ppo['length']:.1f}"),
        f"total           {sft['wall_time'] + rm['wall_time'] + ppo['wall_time']:4.0f} s", "```"])


def commits(root: Path) -> str:
    """Each start of a study by benchmark/run_all.sh: when, at which commit, and (timing.log) its wall time."""
    lines = [line for line in (root / "commits.log").read_text().splitlines() if line.strip()]
    timing = root / "timing.log"
    minutes = dict(re.findall(r"^\S+ (\S+) done in (\d+) min$", timing.read_text(), re.MULTILINE)) if timing.exists() else {}
    rows = ["| started (UTC) | commit | study | wall time |", "|---|---|---|---|"]
    for line in lines:
        start, commit, studies = re.match(r"(\S+) (\S+(?: \([^)]*\))?) ?(.*)", line).groups()
        time = f"{minutes[studies]} min" if studies in minutes else "-"
        rows.append(f"| {start} | {commit} | {studies} | {time} |")
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
    if args.command == "show":
        if not args.runs.is_file():
            print(f"error: {args.runs} does not exist: run its study first", file=sys.stderr)
            sys.exit(2)
        print(args.runs.read_text().rstrip("\n"))
        sys.exit(0)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a folder of runs: run a benchmark/*.sh script first", file=sys.stderr)
        sys.exit(2)
    groups = group_runs(args.runs)
    groups = {k: groups[k] for k in args.only if k in groups} if args.only else groups  # in --only's order
    if missing := [name for name in args.only if name not in groups]:
        print(f"error: {args.runs} has no runs named {', '.join(missing)}_s<seed>", file=sys.stderr)
        sys.exit(2)
    if args.per_seed:
        groups = {run.name: [run] for runs in groups.values() for run in runs}
    unfinished = [r.name for runs in groups.values() for r in runs if not (r / "summary.json").exists()]
    if args.command in ("table", "points", "timing", "samples") and (unfinished or not groups):
        print(f"error: {args.runs}: {'unfinished runs: ' + ', '.join(unfinished) if unfinished else 'no runs'}: "
              "finish its study first", file=sys.stderr)
        sys.exit(2)
    needs = {"quickstart": [args.runs / n / "summary.json" for n in ("sft", "reward_model", "ppo")],
             "commits": [args.runs / "commits.log"]}.get(args.command, [])
    if missing := [str(p) for p in needs if not p.exists()]:
        print(f"error: {', '.join(missing)} missing: run its study first", file=sys.stderr)
        sys.exit(2)
    if args.command == "table":
        print(table(groups, args.keys or TABLE_KEYS, args.initial))
    elif args.command == "points":
        print(points(groups, args.keys or CURVE_KEYS, args.at))
    elif args.command == "timing":
        print(timing(groups, args.keys or TIMING_KEYS))
    elif args.command == "annotator":
        rows = annotator(args.runs)
        if len(rows.splitlines()) < 3:
            print(f"error: {args.runs} holds no finished pair of rm_<setting>_s<seed> and ppo_<setting>_s<seed> runs: "
                  "run benchmark/annotator.sh first", file=sys.stderr)
            sys.exit(2)
        print(rows)
    elif args.command == "quickstart":
        print(quickstart(args.runs))
    elif args.command == "samples":
        if args.n < 1:
            print(f"error: --n {args.n}: give at least 1 sample per run", file=sys.stderr)
            sys.exit(2)
        if missing := [n for n in args.initial if n not in groups]:
            print(f"error: {args.runs} has no runs named {', '.join(missing)}_s<seed>", file=sys.stderr)
            sys.exit(2)
        print(samples(groups, args.n, args.initial))
    elif args.command == "commits":
        print(commits(args.runs))
    else:
        curves(groups, args.keys or CURVE_KEYS, args.out, args.smooth)
