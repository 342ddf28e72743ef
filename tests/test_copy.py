"""Copying an algorithm: one script and common.py alone, in an empty folder, run end to end."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("script, flags", [
    ("ppo.py", ["--total_episodes", "16", "--batch_size", "16"]),
    ("rcfd.py", ["--total_episodes", "16", "--batch_size", "16"]),
    ("rrhf.py", ["--total_queries", "4", "--queries_per_step", "4", "--num_samples", "2"]),
])
def test_a_script_runs_with_common_py_alone(script, flags, sft_model, reward_model, tmp_path):
    for name in (script, "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    result = subprocess.run([sys.executable, script, "--sft_model_path", str(sft_model), "--reward_model_path",
                             str(reward_model), "--eval_rows", "8", "--max_new_tokens", "8", *flags], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["common.py", script]
    summary = json.loads((tmp_path / "runs" / script.removesuffix(".py") / "summary.json").read_text())
    assert {"reward", "kl", "length", "eos_rate", "gold", "well_formed"} <= summary.keys()
