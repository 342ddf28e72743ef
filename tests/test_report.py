"""benchmark/report.py: the tables the README shows, from runs written here by hand."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmark" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def write_run(folder: Path, summary: dict, metrics: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_table_and_timing_aggregate_seeds(tmp_path):
    for seed, gold, t in ((1, 0.2, [1.0, 3.0, 2.0]), (2, 0.6, [10.0, 2.5, 2.0])):
        metrics = [{"step": i + 1, "episode": 64 * (i + 1), "time/training": x, "objective/kl": 0.0}
                   for i, x in enumerate(t)]
        metrics.append({"step": 3, "episode": 192, "eval/gold": 9.0})  # eval lines are not training lines
        write_run(tmp_path / f"ppo_s{seed}", {"gold": gold, "initial": {"gold": -0.1}}, metrics)
    (tmp_path / "notes").mkdir()  # a folder without a _s<seed> suffix is not a run

    groups = report.group_runs(tmp_path)
    assert list(groups) == ["ppo"] and len(groups["ppo"]) == 2

    table = report.table(groups, ("gold",), initial="ppo").splitlines()
    assert table[2] == "| before RL (ppo's initial policy) | 2 | -0.10 ± 0.00 |"
    assert table[3] == "| ppo | 2 | 0.40 ± 0.20 |"  # mean, and half the range

    timing = report.timing(groups, ("time/training",)).splitlines()
    assert timing[2] == "| ppo | 6 | 2.25 |"  # median of 1, 3, 2, 10, 2.5, 2: the slow outlier does not count

    points = report.points(groups, ("time/training",), (2,)).splitlines()
    assert points[2] == "| ppo | 2 | 2.75 ± 0.25 |"


def test_default_table_keys_are_all_in_an_rl_summary(tmp_path):
    """The `table` command's default columns read keys that the RL scripts' summary.json holds
    (Run.finish adds world_size, peak_memory_mb and wall_time to the script's own)."""
    summary = {"reward": 1.0, "kl": 2.0, "length": 17.0, "eos_rate": 1.0, "gold": 0.5, "well_formed": 0.97,
               "greedy": {"reward": 1.1}, "initial": {"reward": 0.2}, "world_size": 1, "peak_memory_mb": 900.0,
               "wall_time": 60.0}
    write_run(tmp_path / "ppo_s1", summary, [])
    row = report.table(report.group_runs(tmp_path), report.TABLE_KEYS).splitlines()[2]
    assert row == "| ppo | 1 | 0.50 | 1.00 | 2.00 | 17.00 | 0.97 | 1.00 | 60.00 | 900.00 |"
