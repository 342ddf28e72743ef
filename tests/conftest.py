"""Shared fixtures: run scripts as subprocesses (as CleanRL's tests do), offline, on the CPU."""

import contextlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")


def run_script(script: str, *args: str, check: bool = True, env: dict | None = None,
               threads: int | None = None) -> subprocess.CompletedProcess:
    """Run a script with its flags and return its exit status and output; fail the test if it fails (check). It
    runs in this process, which saves seconds of imports per run (on `threads` torch threads, to match a
    subprocess's OMP_NUM_THREADS bit for bit), unless `env` asks for a new interpreter."""
    if env is None:
        stdout, stderr, saved_threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
        torch.set_num_threads(threads or saved_threads)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                status = run_main(script, *args)
        finally:
            torch.set_num_threads(saved_threads)
        result = subprocess.CompletedProcess([script, *args], status, stdout.getvalue(), stderr.getvalue())
    else:
        result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                                check=False, text=True, timeout=900, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}")
    return result


def kill_9_after(script: str, *args: str, out: Path, lines: int) -> None:
    """Run `python <script> <args> --output_dir <out>` on one thread and kill -9 it once its metrics.jsonl has
    `lines` lines; fail the test if it ended first."""
    process = subprocess.Popen([sys.executable, str(ROOT / script), *args, "--output_dir", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    while process.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < lines):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "summary.json").exists(), "the run ended before it could be killed"


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same run, bit for bit: summary (but its wall-clock fields), metrics (but
    timings) and model weights."""
    summaries = [{k: v for k, v in json.loads((d / "summary.json").read_text()).items()
                  if k != "wall_time" and not k.startswith("peak_memory")} for d in (a, b)]
    assert summaries[0] == summaries[1]
    lines = [[{k: v for k, v in json.loads(line).items()
               if not k.startswith("time") and k not in ("eps", "tokens_per_second")}
              for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert lines[0] == lines[1]
    weights = [load_file(d / "model.safetensors") for d in (a, b)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def run_main(script: str, *args: str) -> int:
    """Run a script's main in this process, as `python <script> <args>` from the repository root would: no new
    interpreter, so no seconds of imports. Returns the exit status (0 if it ran to the end)."""
    argv, handler, cwd = sys.argv, signal.getsignal(signal.SIGINT), os.getcwd()
    sys.argv = [script, *args]
    os.chdir(ROOT)
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
        signal.signal(signal.SIGINT, handler)
        os.chdir(cwd)
    return 0


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    """A toy SFT model trained for a few seconds (enough to emit EOS, not to be good)."""
    out = tmp_path_factory.mktemp("sft")
    run_script("sft.py", "--output_dir", str(out), "--num_epochs", "1", "--max_train_rows", "512",
               "--eval_rows", "32", "--eval_every", "4", "--learning_rate", "3e-3")
    return out


@pytest.fixture(scope="session")
def reward_model(sft_model, tmp_path_factory) -> Path:
    """A toy reward model trained for a few seconds on top of the SFT model."""
    out = tmp_path_factory.mktemp("reward_model")
    run_script("reward_model.py", "--model_name_or_path", str(sft_model), "--output_dir", str(out), "--num_epochs", "1",
               "--max_train_rows", "256", "--eval_rows", "32", "--demo_rows", "64")
    return out
