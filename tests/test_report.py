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


def test_annotator_table_reads_the_sweep_and_checks_the_targets(tmp_path):
    """One row per annotator setting, mean ± half-range over seeds, and each of the annotator study's targets named when
    missed. The labels' agreement with gold is recomputed from the toy data of that setting (pairs of different
    gold)."""
    for seed, gain, corr in ((1, 1.2, 0.40), (2, 0.9, 0.44)):
        write_run(tmp_path / f"rm_k3_c0.1_n4000_s{seed}", {"accuracy": 0.74, "label_ceiling": 0.79,
                  "gold_accuracy": 0.77, "length_corr": corr}, [])
        write_run(tmp_path / f"ppo_k3_c0.1_n4000_s{seed}", {"gold": gain, "length": 20.0, "well_formed": 0.98,
                  "initial": {"gold": 0.0, "length": 17.0}}, [])
    write_run(tmp_path / "rm_k2_c0.1_n4000_s1", {"accuracy": 0.72, "label_ceiling": 0.73, "gold_accuracy": 0.70,
              "length_corr": 0.57}, [])
    write_run(tmp_path / "ppo_k2_c0.1_n4000_s1", {"gold": 0.4, "length": 17.5, "well_formed": 0.98,
              "initial": {"gold": 0.0, "length": 17.0}}, [])
    rows = report.annotator(tmp_path).splitlines()
    assert len(rows) == 4  # header, rule, and the settings sorted by k, c, pairs
    assert rows[2].startswith("| 2, 0.1, 4000 | 0.05 | 1 | 0.752 |")  # the toy annotator's labels, recomputed
    assert rows[2].endswith("| no: gain >= 1.0, every seed >= 0.7, length r in 0.3-0.5, length grows |")
    assert rows[3] == ("| 3, 0.1, 4000 | 0.0333 | 2 | 0.820 | 0.74 ± 0.00 | 0.77 ± 0.00 | 0.42 ± 0.02 | "
                       "1.05 ± 0.15 (0.90) | 20.00 ± 0.00 (17.0) | 0.98 ± 0.00 | so far (2 of 3 seeds) |")


def test_quickstart_lines(tmp_path):
    write_run(tmp_path / "sft", {"eval_loss": 1.3491, "gold": 0.037, "well_formed": 0.99, "wall_time": 52.4}, [])
    write_run(tmp_path / "reward_model", {"accuracy": 0.72, "gold_accuracy": 0.71, "length_corr": 0.55,
                                          "wall_time": 41.0}, [])
    write_run(tmp_path / "ppo", {"gold": 0.6, "reward": 1.66, "kl": 3.42, "length": 28.8, "wall_time": 158.0,
                                 "initial": {"gold": -0.001, "reward": 0.18, "length": 17.0}}, [])
    lines = report.quickstart(tmp_path).splitlines()[1:-1]  # inside the code block's fences
    assert lines[0] == "sft.py            52 s   eval_loss 1.349, gold 0.04, well_formed 0.99"
    assert lines[2] == "ppo.py           158 s   gold -0.00 -> 0.60, reward 0.18 -> 1.66, kl 3.4, length 17.0 -> 28.8"
    assert lines[3] == "total            251 s"


def test_results_fills_generated_blocks_verbatim_and_keeps_a_failed_one(tmp_path):
    """benchmark/results.py: each block gets its command's output; a failing command leaves its block as it was."""
    import subprocess
    import sys
    table = tmp_path / "table.md"
    table.write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    page = tmp_path / "page.md"
    keep = (f"<!-- generated by: python benchmark/report.py show {tmp_path}/missing.md -->\n"
            "old text\n<!-- end generated -->\n")
    page.write_text(f"# Page\n\nProse mentions `<!-- generated by: X -->` inline.\n\n<!-- generated by: python "
                    f"benchmark/report.py show {table} -->\nstale\n<!-- end generated -->\n\n{keep}")
    done = subprocess.run([sys.executable, str(ROOT / "benchmark" / "results.py"), str(page)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1 and "missing.md" in done.stderr  # the failed block is named
    text = page.read_text()
    assert f"show {table} -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- end generated -->" in text
    assert keep in text and "`<!-- generated by: X -->` inline" in text
    again = subprocess.run([sys.executable, str(ROOT / "benchmark" / "results.py"), str(page), "--check"],
                           capture_output=True, text=True, check=False)
    assert "would change: nothing" in again.stdout  # filling is idempotent


def test_results_refuses_an_unclosed_block_and_ignores_markers_in_code_fences(tmp_path):
    import subprocess
    import sys
    table = tmp_path / "table.md"
    table.write_text("| x |\n")
    show = f"<!-- generated by: python benchmark/report.py show {table} -->"
    page = tmp_path / "page.md"
    fenced = f"```\n{show}\nan example\n<!-- end generated -->\n```\n"
    page.write_text(f"{fenced}\n{show}\nold\n<!-- end generated -->\n")
    script = [sys.executable, str(ROOT / "benchmark" / "results.py"), str(page)]
    assert subprocess.run(script, capture_output=True, check=False).returncode == 0
    assert page.read_text() == f"{fenced}\n{show}\n| x |\n<!-- end generated -->\n"  # the fenced example untouched
    page.write_text(f"{show}\nold\n\nprose that must not be swallowed\n\n{show}\nold\n<!-- end generated -->\n")
    before = page.read_text()
    done = subprocess.run(script, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "without its end line" in done.stderr
    assert page.read_text() == before  # nothing written


def test_table_per_seed_gives_each_seed_its_own_initial_row(tmp_path):
    for seed, gold in ((1, 0.5), (2, 0.7)):
        write_run(tmp_path / f"ppo_s{seed}", {"gold": gold, "initial": {"gold": seed / 10}}, [])
    per_seed = {run.name: [run] for runs in report.group_runs(tmp_path).values() for run in runs}  # --per_seed
    rows = report.table(per_seed, ("gold",), initial="ppo").splitlines()[2:]
    assert rows == ["| before RL (ppo_s1's initial policy) | 1 | 0.10 |",
                    "| before RL (ppo_s2's initial policy) | 1 | 0.20 |",
                    "| ppo_s1 | 1 | 0.50 |", "| ppo_s2 | 1 | 0.70 |"]


def test_missing_inputs_are_one_line_errors(tmp_path):
    """A results page or a study that is not there: exit 2 and one line on stderr, no traceback."""
    import subprocess
    import sys
    for command in (["results.py", str(tmp_path / "missing.md")], ["report.py", "quickstart", str(tmp_path)],
                    ["report.py", "commits", str(tmp_path)], ["report.py", "annotator", str(tmp_path)],
                    ["annotator.py", "3", "0.1", "0", "reward_model.py"]):
        done = subprocess.run([sys.executable, str(ROOT / "benchmark" / command[0]), *command[1:]], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 2 and done.stderr.startswith("error: "), command
        assert len(done.stderr.strip().splitlines()) == 1, command


def test_samples_shows_each_groups_first_seed_and_escapes_pipes(tmp_path):
    for name in ("ppo_s1", "ppo_s2", "rcfd_s1"):
        write_run(tmp_path / name, {"gold": 0.0}, [])
        lines = [{"prompt": "i liked", "response": f"{name} it || a lot .", "gold": 1.0, "score": 0.5},
                 {"prompt": "the plot", "response": "second", "gold": -1.0, "score": 0.25}]
        (tmp_path / name / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (tmp_path / name / "initial_samples.jsonl").write_text(json.dumps({**lines[1], "response": "before"}) + "\n")
    rows = report.samples(report.group_runs(tmp_path), 1, initial=("ppo",)).splitlines()
    assert rows[2:] == ["| before RL (ppo's initial policy) | the plot | before | -1.00 | 0.25 |",
                        "| ppo_s1 | i liked | ppo_s1 it \\|\\| a lot . | 1.00 | 0.50 |",
                        "| rcfd_s1 | i liked | rcfd_s1 it \\|\\| a lot . | 1.00 | 0.50 |"]


def test_commits_names_each_studys_commit_and_wall_time(tmp_path):
    (tmp_path / "commits.log").write_text("2026-11-26T09:38:33Z 09e56ad quickstart\n"
                                          "2026-11-26T09:42:40Z 09e56ad (with uncommitted changes) pipeline\n"
                                          "2026-11-26T10:03:00Z 09e56ad ddp\n")
    (tmp_path / "timing.log").write_text("09:42:40 quickstart done in 4 min\n09:58:01 pipeline done in 15 min\n"
                                         "all studies: 19 min\n")
    assert report.commits(tmp_path).splitlines()[2:] == [
        "| 2026-11-26T09:38:33Z | 09e56ad | quickstart | 4 min |",
        "| 2026-11-26T09:42:40Z | 09e56ad (with uncommitted changes) | pipeline | 15 min |",
        "| 2026-11-26T10:03:00Z | 09e56ad | ddp | - |"]  # still running, or stopped
