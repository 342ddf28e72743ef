"""Real-size plumbing on toy models: fp32 master weights whatever the checkpoint's dtype, --micro_batch_size (memory,
not results), --gradient_checkpointing (really recomputing) and --max_prompt_length."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import run_script
from safetensors.torch import load_file

import common


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def rl_flags(sft_model: Path, reward_model: Path) -> list[str]:
    return ["--sft_model_path", str(sft_model), "--reward_model_path", str(reward_model), "--eval_rows", "8",
            "--max_new_tokens", "16"]


def script_flags(script: str, sft_model: Path, reward_model: Path) -> list[str]:
    """Tiny settings of each script, with micro-batches of 3 rows that do not divide its batches."""
    return {
        "sft.py": ["--num_epochs", "1", "--max_train_rows", "64", "--batch_size", "16", "--eval_rows", "16",
                   "--eval_every", "2", "--max_new_tokens", "8"],
        "reward_model.py": ["--model_name_or_path", str(sft_model), "--num_epochs", "1", "--max_train_rows", "64",
                            "--batch_size", "16", "--eval_rows", "16", "--demo_rows", "16", "--eval_every", "2"],
        "ppo.py": [*rl_flags(sft_model, reward_model), "--total_episodes", "32", "--batch_size", "16"],
        "ppo_max.py": [*rl_flags(sft_model, reward_model), "--total_episodes", "32", "--batch_size", "16",
                       "--critic_warmup_steps", "1", "--ptx_coef", "0.5"],
        "rcfd.py": [*rl_flags(sft_model, reward_model), "--total_episodes", "32", "--batch_size", "16",
                    "--rewards", "model", "loglik"],
        "rrhf.py": [*rl_flags(sft_model, reward_model), "--total_queries", "8", "--queries_per_step", "4",
                    "--num_samples", "2", "--sources", "initial", "demo", "online", "--kl_coef", "0.1"],
    }[script]


@pytest.mark.parametrize("script", ["sft.py", "reward_model.py", "ppo.py", "ppo_max.py", "rcfd.py", "rrhf.py"])
def test_micro_batches_change_memory_not_results(script, sft_model, reward_model, tmp_path):
    """The same seed gives the same samples and, to fp32 rounding, the same training and model: every loss is a
    mean over the whole (mini)batch, not a mean of micro-batch means."""
    flags = script_flags(script, sft_model, reward_model)
    run_script(script, *flags, "--output_dir", str(tmp_path / "whole"), threads=1)
    run_script(script, *flags, "--output_dir", str(tmp_path / "micro"), "--micro_batch_size", "3", threads=1)
    whole, micro = metrics(tmp_path / "whole"), metrics(tmp_path / "micro")
    assert [m["step"] for m in whole] == [m["step"] for m in micro]
    for a, b in zip(whole, micro):
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith("time") and k not in ("eps", "tokens_per_second"):
                # a clip fraction counts ties (a value at its old value on the first epoch) that rounding can
                # tip either way: a few tokens of a thousand; every other statistic agrees to rounding
                tolerance = {"abs": 0.01} if "clipfrac" in k else {"rel": 1e-4, "abs": 1e-5}
                assert b[k] == pytest.approx(v, **tolerance), k
    # the trained weights differ by rounding only: by a small fraction of how far training moved them
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "micro")
    start = weights(sft_model) if script != "sft.py" else {}
    for name in a:
        moved = (a[name] - start[name]).abs().max().item() if name in start else a[name].abs().max().item()
        assert (a[name] - b[name]).abs().max().item() <= 0.01 * moved + 1e-7, name


def test_micro_batch_size_and_max_prompt_length_in_args_and_errors(sft_model, tmp_path):
    result = run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "length", "--micro_batch_size", "0",
                        "--output_dir", str(tmp_path / "bad"), check=False)
    assert result.returncode == 2 and "--micro_batch_size must be positive" in result.stderr
    result = run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "length", "--max_prompt_length", "2",
                        "--total_episodes", "16", "--batch_size", "16", "--eval_rows", "8", "--max_new_tokens", "8",
                        "--output_dir", str(tmp_path / "short"))
    assert "prompts are longer than 2 tokens and lose their start" in result.stdout
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "short" / "samples.jsonl").read_text().splitlines()]
    assert len(prompts) == 8  # the prompt text is kept whole in the samples; the policy saw its last 2 tokens


def count_block_passes(monkeypatch) -> dict:
    """Count the passes through GPT-2 decoder blocks (through their MLP, which a block's checkpointed forward calls
    again in the backward pass): with gradients (training passes, and their recomputation under checkpointing) and,
    without gradients, those over one new token (generation reusing its KV cache)."""
    counts = {"grad": 0, "cached": 0}
    forward = transformers.models.gpt2.modeling_gpt2.GPT2MLP.forward

    def counted(self, hidden_states, *args, **kwargs):
        counts["grad"] += torch.is_grad_enabled()
        counts["cached"] += not torch.is_grad_enabled() and hidden_states.shape[1] == 1
        return forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(transformers.models.gpt2.modeling_gpt2.GPT2MLP, "forward", counted)
    return counts


@pytest.mark.parametrize("script", ["ppo.py", "sft.py"])
def test_gradient_checkpointing_recomputes_and_keeps_the_kv_cache(script, sft_model, reward_model, tmp_path,
                                                                  monkeypatch):
    flags = script_flags(script, sft_model, reward_model)
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        counts = count_block_passes(monkeypatch)
        run_script(script, *flags, *extra, "--output_dir", str(tmp_path / name), threads=1)
        runs[name] = dict(counts)
    # every block's forward with gradients runs again in the backward pass; generation still decodes token by token
    assert runs["checkpointed"]["grad"] == 2 * runs["plain"]["grad"] > 0
    assert runs["checkpointed"]["cached"] == runs["plain"]["cached"] > 0
    # and the results are those of the plain run (the same ops, recomputed)
    for a, b in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "checkpointed")):
        assert {k: v for k, v in a.items()
                if k != "time" and "time" not in k and k not in ("eps", "tokens_per_second")} == \
            {k: v for k, v in b.items() if k != "time" and "time" not in k and k not in ("eps", "tokens_per_second")}


def tiny_llama(tok, dtype: torch.dtype, path: Path) -> None:
    """A tiny Llama, stored in `dtype` as hub checkpoints are; the same bf16-representable weights either way."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_a_bf16_checkpoint_trains_in_fp32_like_the_same_weights_stored_in_fp32(tmp_path):
    """transformers 5 loads a bf16 checkpoint in bf16; AdamW on bf16 weights at a small learning rate would round
    most updates away. With fp32 master weights, the bf16-stored model trains exactly as the fp32-stored one, and is
    saved back in bf16 with config.dtype saying so."""
    tok = common.toy_tokenizer()
    flags = ["--num_epochs", "1", "--max_train_rows", "128", "--batch_size", "16", "--eval_rows", "16",
             "--eval_every", "2", "--max_new_tokens", "8", "--learning_rate", "1e-5"]
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        tiny_llama(tok, dtype, tmp_path / f"base-{name}")
        run_script("sft.py", "--model_name_or_path", str(tmp_path / f"base-{name}"), *flags,
                   "--output_dir", str(tmp_path / name), threads=1)
    bf16, fp32 = metrics(tmp_path / "bfloat16"), metrics(tmp_path / "float32")
    assert [m["loss/eval"] for m in bf16] == [m["loss/eval"] for m in fp32]
    assert bf16[-1]["loss/eval"] < bf16[0]["loss/eval"]  # it learns at 1e-5
    saved_bf16, saved_fp32 = weights(tmp_path / "bfloat16"), weights(tmp_path / "float32")
    assert {v.dtype for v in saved_bf16.values()} == {torch.bfloat16}
    assert {v.dtype for v in saved_fp32.values()} == {torch.float32}
    assert all(torch.equal(saved_bf16[k], saved_fp32[k].to(torch.bfloat16)) for k in saved_fp32)
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["dtype"] == name
        assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).dtype == dtype
    # the optimizer held fp32 state: after an update, the fp32 master weights moved where bf16 would not have
    start = weights(tmp_path / "base-float32")
    moved = sum((saved_fp32[k] != start[k]).float().mean().item() for k in start) / len(start)
    assert moved > 0.9


def test_load_model_precision_by_role(tmp_path):
    tok = common.toy_tokenizer()
    tiny_llama(tok, torch.bfloat16, tmp_path / "llama")
    trained = common.load_model(str(tmp_path / "llama"), tok)
    frozen = common.load_model(str(tmp_path / "llama"), tok, frozen=True)
    assert trained.dtype == torch.float32 and trained.stored_dtype == torch.bfloat16
    assert all(p.requires_grad for p in trained.parameters())
    assert frozen.dtype == torch.float32 and not any(p.requires_grad for p in frozen.parameters())  # CPU: fp32
    assert not frozen.training


def test_load_model_turns_off_dropout_kept_as_plain_floats(tmp_path):
    """OPT keeps its dropout and layerdrop as floats that act in train() mode, where the update passes run."""
    tok = common.toy_tokenizer()
    config = transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                    dropout=0.3, attention_dropout=0.3, layerdrop=0.3, pad_token_id=tok.pad_token_id)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    model = common.load_model(str(tmp_path / "opt"), tok).train()
    ids = torch.tensor([common.encode_prompt(tok, "the plot was very good .")])
    assert torch.equal(model(ids).logits, model(ids).logits)
    floats = [v for m in model.modules() for k, v in vars(m).items()
              if isinstance(v, float) and ("dropout" in k or k == "layerdrop")]
    assert floats and not any(floats)
