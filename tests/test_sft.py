"""End-to-end tests of sft.py, run as a subprocess with tiny settings (as CleanRL's tests do)."""

import json
import math
from pathlib import Path

import pytest
from conftest import run_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import common
import sft


def test_toy_run_writes_a_reloadable_model_and_its_metrics(sft_model: Path) -> None:
    summary = json.loads((sft_model / "summary.json").read_text())
    assert {"eval_loss", "gold", "well_formed", "eos_rate"} <= summary.keys()
    assert 0.0 <= summary["well_formed"] <= 1.0 and 0.0 <= summary["eos_rate"] <= 1.0
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    assert summary["eval_loss"] < math.log(len(tokenizer))  # it learned something: below a uniform guess

    args = json.loads((sft_model / "args.json").read_text())
    assert args["model_name_or_path"] == "toy" and args["max_train_rows"] == 512
    metrics = [json.loads(line) for line in (sft_model / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8]
    assert [m["episode"] for m in metrics] == [m["step"] * args["batch_size"] for m in metrics]

    # The saved model is the trained one: reloaded, it gives the summary's held-out loss.
    model = AutoModelForCausalLM.from_pretrained(sft_model)
    assert tokenizer.get_vocab() == common.toy_tokenizer().get_vocab()
    _, test_rows = common.load_data("toy", "sft", tokenizer, test_rows=args["eval_rows"])
    examples = sft.tokenize(test_rows, tokenizer, args["max_length"])
    loss = sft.eval_loss(model, examples, tokenizer.pad_token_id, args["batch_size"], "cpu")
    assert loss == pytest.approx(summary["eval_loss"], rel=1e-4)


def save_tiny_llama(path: Path) -> PreTrainedTokenizerFast:
    """A ~90k-parameter Llama with its own byte-level BPE tokenizer (not the toy world's), saved
    the way a hub model is: config, weights and tokenizer files in one folder."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [f"{row['prompt']} {row['completion']}" for row in common.toy_dataset("sft")["train"].select(range(500))]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def test_local_llama_with_its_own_tokenizer_and_a_jsonl_dataset(tmp_path: Path) -> None:
    tokenizer = save_tiny_llama(tmp_path / "model")
    data = tmp_path / "demos.jsonl"
    rows = common.toy_dataset("sft")["test"].select(range(96))
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    run_script("sft.py", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(data),
               "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "16", "--eval_rows", "16",
               "--eval_every", "5", "--max_new_tokens", "8")

    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss"]) and "gold" not in summary  # gold exists only on the toy data
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5] and metrics[0]["episode"] == 80  # 80 rows trained, 16 held out
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), LlamaForCausalLM)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("the plot was good .")["input_ids"] == tokenizer("the plot was good .")["input_ids"]


@pytest.mark.parametrize("flags, says", [
    (["--model_name_or_path", "/nonexistent/model"], "/nonexistent/model not found"),
    (["--dataset_name", "{bad}"], "fit no accepted format"),
])
def test_bad_input_gives_a_one_line_error_and_status_2(flags: list[str], says: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": "it was good .", "label": i % 2}) + "\n" for i in range(8)))
    flags = [str(bad) if flag == "{bad}" else flag for flag in flags]
    result = run_script("sft.py", *flags, "--output_dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
