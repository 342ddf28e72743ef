"""--fsdp (FSDP2 under torchrun, gloo on the CPU): the trained models sharded across 2 processes train as DDP does,
save a plain transformers folder, and resume bit for bit after kill -9 from torch.distributed.checkpoint shards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from conftest import ROOT, assert_same_run, run_main
from safetensors.torch import load_file
from test_distributed import torchrun

import common


def ppo_flags(sft_model, reward_model, out) -> list[str]:
    return [str(ROOT / "ppo.py"), "--sft_model_path", str(sft_model), "--reward_model_path", str(reward_model),
            "--total_episodes", "32", "--batch_size", "16", "--eval_rows", "5", "--max_new_tokens", "12",
            "--micro_batch_size", "3", "--save_every", "1", "--output_dir", str(out)]


def test_fsdp_finds_the_decoder_layers_or_says_it_cannot(capsys):
    tok = common.toy_tokenizer()
    gpt2, scorer = common.toy_model(tok), common.TokenScores(common.toy_model(tok, "score"))
    assert common.decoder_layers(gpt2) == list(gpt2.transformer.h)
    assert common.decoder_layers(scorer) == list(scorer.classifier.transformer.h)
    with pytest.raises(SystemExit) as stop:
        common.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --fsdp: cannot find the decoder layers of Sequential (its "
                                               "_no_split_modules names none of its modules): train it without --fsdp")


def test_fsdp_needs_torchrun(tmp_path, capsys):
    assert run_main("ppo.py", "--fsdp", "--output_dir", str(tmp_path / "run")) == 2
    assert "--fsdp shards the models across processes: launch with torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_ppo_under_fsdp_trains_as_ddp_saves_a_plain_model_and_resumes_after_kill_9(sft_model, reward_model, tmp_path):
    """With micro-batches and gradient checkpointing too, which change nothing but memory."""
    torchrun(*ppo_flags(sft_model, reward_model, tmp_path / "ddp"))
    torchrun(*ppo_flags(sft_model, reward_model, tmp_path / "fsdp"), "--fsdp", "--gradient_checkpointing")
    # the same samples, losses and statistics, to fp32 rounding (gradients reduced in another order)
    ddp, fsdp = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                  if "time/generation" in line] for run in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 2
    for a, b in zip(ddp, fsdp):
        assert a["response/length"] == b["response/length"] and a["objective/scores"] == b["objective/scores"]
        for k in ("loss/policy_avg", "loss/value_avg", "objective/kl", "val/ratio"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), k
    # the final policy: a plain transformers folder, in the checkpoint's dtype, with DDP's weights to rounding
    weights = {run: load_file(tmp_path / run / "model.safetensors") for run in ("ddp", "fsdp")}
    assert weights["ddp"].keys() == weights["fsdp"].keys()
    for k in weights["ddp"]:
        torch.testing.assert_close(weights["fsdp"][k], weights["ddp"][k], rtol=0, atol=1e-5, msg=k)
    tokenizer = common.load_tokenizer(str(tmp_path / "fsdp"))
    ids = torch.tensor([common.encode_prompt(tokenizer, "the plot was very good .")])
    logits = {run: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / run)(ids).logits for run in weights}
    torch.testing.assert_close(logits["fsdp"], logits["ddp"], rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "fsdp" / "config.json").read_text())["dtype"] == "float32"
    assert sorted(p.name for p in (tmp_path / "fsdp").glob("shards-*")) == ["shards-1"]  # the last checkpoint's only

    # kill -9 (every process) once iteration 1 is logged, then --resume: the uninterrupted run, bit for bit
    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *ppo_flags(sft_model, reward_model, cut), "--fsdp", "--gradient_checkpointing"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    metrics = cut / "metrics.jsonl"
    while process.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < 2):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (cut / "summary.json").exists(), "the run ended before it could be killed"
    torchrun(*ppo_flags(sft_model, reward_model, cut), "--fsdp", "--gradient_checkpointing", "--resume")
    assert_same_run(tmp_path / "fsdp", cut)


def test_sft_and_reward_model_under_fsdp(tmp_path):
    torchrun(str(ROOT / "sft.py"), "--fsdp", "--num_epochs", "1", "--max_train_rows", "32", "--batch_size", "16",
             "--eval_rows", "7", "--eval_every", "1", "--max_new_tokens", "8", "--micro_batch_size", "3",
             "--output_dir", str(tmp_path / "sft"))
    torchrun(str(ROOT / "reward_model.py"), "--fsdp", "--model_name_or_path", str(tmp_path / "sft"), "--num_epochs",
             "1", "--max_train_rows", "32", "--batch_size", "16", "--eval_rows", "7", "--demo_rows", "7",
             "--eval_every", "2", "--output_dir", str(tmp_path / "rm"))
    for run in ("sft", "rm"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert summary["world_size"] == 2
    # the reward model saved from a plain copy scores under transformers as it did here
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert classifier.config.num_labels == 1


def test_the_divergence_guard_stops_every_process_under_fsdp(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "sft.py"), "--fsdp", "--learning_rate", "1e3", "--max_train_rows", "64",
                             "--batch_size", "16", "--num_epochs", "4", "--eval_rows", "8", "--output_dir", str(out)],
                            cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            check=False)
    assert result.returncode != 0 and "training diverged (is --learning_rate too high?)" in result.stderr
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
