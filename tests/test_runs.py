"""Runs you can trust: bad flags refused before any work, no silent overwrite, checkpoints that
resume bit for bit after kill -9, the divergence guard, the context-length rule."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, assert_same_run, kill_9_after, run_main, run_script

SCRIPTS = ["sft.py", "reward_model.py", "ppo.py", "ppo_max.py", "rrhf.py", "rcfd.py"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, says", [
    (["--learning_rate", "-1"], "--learning_rate must be positive, got -1.0"),
    (["--learning_rate", "nan"], "--learning_rate must be positive, got nan"),
    (["--save_every", "0"], "--save_every must be positive, got 0"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--device", "tpu"], "--device tpu: use auto, cpu or cuda"),
    (["--device", "cuda"], "--device cuda, but torch finds no CUDA device: use --device cpu"),
])
def test_bad_flags_stop_before_anything_is_written(script, flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    status = run_main(script, *flags, "--output_dir", str(tmp_path / "run"))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script, flags", [("ppo.py", ["--temperature", "0"]), ("rrhf.py", ["--temperature", "0"]),
                                           ("rcfd.py", ["--temperature", "0"]), ("sft.py", ["--batch_size", "0"]),
                                           ("reward_model.py", ["--num_epochs", "0"]),
                                           ("ppo.py", ["--kl_coef", "-0.1"])])
def test_more_flags_out_of_range(script, flags, tmp_path, capsys):
    assert run_main(script, *flags, "--output_dir", str(tmp_path / "run")) == 2
    assert f"error: {flags[0]} must be" in capsys.readouterr().err


def test_an_output_dir_that_holds_a_run_is_refused(sft_model, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in sft_model.iterdir()}
    for script in SCRIPTS:
        assert run_main(script, "--output_dir", str(sft_model)) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: {sft_model} already holds a run: pass --resume to continue it "
                       "or --overwrite to replace it")
    assert {p.name: p.stat().st_mtime_ns for p in sft_model.iterdir()} == before  # nothing touched
    (tmp_path / "notes.txt").write_text("mine")
    assert run_main("sft.py", "--output_dir", str(tmp_path)) == 2
    assert "holds files that are not a run" in capsys.readouterr().err
    assert run_main("sft.py", "--output_dir", str(tmp_path / "notes.txt" / "run")) == 2
    assert "cannot write to --output_dir" in capsys.readouterr().err
    assert run_main("sft.py", "--resume", "--output_dir", str(tmp_path / "fresh")) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_the_divergence_guard_stops_and_keeps_no_diverged_model(tmp_path):
    out = tmp_path / "run"
    result = run_script("sft.py", "--learning_rate", "1e3", "--max_train_rows", "256", "--num_epochs", "2",
                        "--eval_rows", "16", "--save_every", "1", "--output_dir", str(out), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "training diverged (is --learning_rate too high?)" in lines[0] and lines[0].startswith("error: step ")
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    if (out / "checkpoint.pt").exists():  # a checkpoint written before the divergence holds finite weights
        state = torch.load(out / "checkpoint.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_context_length_rule(sft_model, tmp_path, capsys):
    # the toy model has 128 positions: a 128-token response leaves none for the prompt
    status = run_main("ppo.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--max_new_tokens", "128",
                      "--output_dir", str(tmp_path / "ppo"))
    assert status == 2 and "--max_new_tokens leaves 0 of the model's positions to the prompt" in capsys.readouterr().err
    status = run_main("sft.py", "--max_length", "3", "--max_train_rows", "64", "--output_dir", str(tmp_path / "sft"))
    assert status == 2 and "no example fits in 3 tokens" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()


def test_kill_9_then_resume_ends_as_the_uninterrupted_run(sft_model, reward_model, tmp_path):
    """The checkpoint contract: killed at any moment (here mid-run, possibly mid-save) and resumed,
    a run ends with the same summary, metrics and weights as the run that was never stopped."""
    flags = ["--sft_model_path", str(sft_model), "--reward_model_path", str(reward_model), "--total_episodes", "96",
             "--batch_size", "16", "--eval_rows", "16", "--eval_every", "2", "--save_every", "1",
             "--max_new_tokens", "16"]
    run_script("ppo.py", *flags, "--output_dir", str(tmp_path / "full"), threads=1)
    kill_9_after("ppo.py", *flags, out=tmp_path / "cut", lines=4)
    run_script("ppo.py", *flags, "--output_dir", str(tmp_path / "cut"), "--resume", threads=1)
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), "--max_train_rows", "512", "--num_epochs", "100",
                                "--eval_rows", "16", "--eval_every", "1", "--save_every", "1",
                                "--output_dir", str(out)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (out / "checkpoint.pt").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 130 and len(lines) == 1, err
    assert lines[0].startswith("interrupted: the last checkpoint (step ") and f"{out / 'checkpoint.pt'}" in lines[0]
    assert lines[0].endswith(f"resume with: python {ROOT / 'sft.py'} --max_train_rows 512 --num_epochs 100 "
                             f"--eval_rows 16 --eval_every 1 --save_every 1 --output_dir {out} --resume")


def test_resume_keeps_the_run_s_own_flags_and_knows_a_finished_run(sft_model, tmp_path, capsys):
    assert run_main("sft.py", "--resume", "--output_dir", str(sft_model)) == 2  # finished, no checkpoint left
    assert capsys.readouterr().err.strip() == f"error: --resume: {sft_model} holds a finished run"
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text((sft_model / "args.json").read_text())
    (run / "checkpoint.pt").write_bytes(b"")  # setup() reads args.json only: the checkpoint is loaded later
    assert run_main("sft.py", "--resume", "--output_dir", str(run), "--num_epochs", "7") == 2
    assert capsys.readouterr().err.strip() == (f"error: --resume continues a run with its own flags, but --num_epochs "
                                               f"differs: 1 in {run / 'args.json'}")
