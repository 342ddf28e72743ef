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


def test_scripts_run_without_the_toy_world(tmp_path):
    """A copier who deletes common.py's toy-world section (from its header to the end of the file) deletes nothing
    else: sft.py and ppo.py still run, from that common.py alone, on a saved tiny Llama and .jsonl data."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    import common
    text = (ROOT / "common.py").read_text()
    header = text.rindex("\n# ====", 0, text.index("# 4. The toy world"))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "common.py").write_text(text[:header] + "\n")
    for script in ("sft.py", "ppo.py"):
        shutil.copy(ROOT / script, copy / script)
    tokenizer = common.toy_tokenizer()  # saved as any hub tokenizer is: the copy never builds one itself
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    for name, cls in (("llama", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        cls.from_config(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = common.toy_dataset("sft", n_train=24, n_test=0)["train"].to_list()
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))

    def run(script: str, *flags: str) -> dict:
        result = subprocess.run([sys.executable, script, "--output_dir", str(tmp_path / script), *flags], cwd=copy,
                                capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / script / "summary.json").read_text())

    assert "def toy_dataset" not in (copy / "common.py").read_text()
    run("sft.py", "--model_name_or_path", str(tmp_path / "llama"), "--dataset_name", str(tmp_path / "sft.jsonl"),
        "--num_epochs", "1", "--batch_size", "8", "--eval_rows", "8", "--max_new_tokens", "4")
    summary = run("ppo.py", "--sft_model_path", str(tmp_path / "llama"),
                  "--reward_model_path", str(tmp_path / "reward"), "--dataset_name", str(tmp_path / "prompts.jsonl"),
                  "--total_episodes", "8", "--batch_size", "8", "--eval_rows", "4", "--max_new_tokens", "6")
    assert {"reward", "kl", "length", "eos_rate"} <= summary.keys() and "gold" not in summary
