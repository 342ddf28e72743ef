"""reward_model.py: the loss and the length interventions against hand examples and naive loops,
the score shift through a save/reload, the argument checks and the context rule in-process, and the
script end to end (with a resume, a diverging run and bad input)."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import common
import reward_model


def naive_bradley_terry(chosen, rejected, margin=None, center_coef=0.0) -> float:
    """The same loss, pair by pair, with math instead of torch."""
    total, center = 0.0, 0.0
    for i in range(len(chosen)):
        m = margin[i] if margin is not None else 0.0
        total += -math.log(1 / (1 + math.exp(-(chosen[i] - rejected[i] - m))))
        center += (chosen[i] + rejected[i]) ** 2
    return total / len(chosen) + center_coef * center / len(chosen)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bradley_terry_loss_matches_naive_loop(with_margin, center_coef):
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(7) * 2, torch.randn(7) * 2, torch.rand(7)
    loss = reward_model.bradley_terry_loss(chosen, rejected, margin if with_margin else None, center_coef)
    expected = naive_bradley_terry(chosen.tolist(), rejected.tolist(), margin.tolist() if with_margin else None,
                                   center_coef)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_length_balance_keeps_mirrored_bins_equal():
    # width 2: bins +2 {0: d=3, 1: d=4} vs -2 {4: d=-3}; +1 {2: d=1} vs -1 {3: d=-2}; 0 {5, 6};
    # +3 {7: d=5} and +4 {8: d=7} have no mirror and go
    diffs = [3, 4, 1, -2, -3, 0, 0, 5, 7]
    keep = reward_model.length_balance(diffs, 2, random.Random(0))
    assert keep == sorted(keep)
    assert {2, 3, 4, 5, 6} <= set(keep) and len(keep) == 6 and len({0, 1} & set(keep)) == 1

    diffs = [random.Random(1).randint(-10, 20) for _ in range(500)]
    kept = [diffs[i] for i in reward_model.length_balance(diffs, 3, random.Random(0))]
    for k in range(1, 8):  # each band of |d| holds as many positive as negative differences
        assert sum(3 * k - 2 <= d <= 3 * k for d in kept) == sum(-3 * k <= d <= 2 - 3 * k for d in kept)


def test_random_augment_pairs_chosen_with_another_prompts_chosen():
    rows = [{"prompt": p, "chosen": f"c{i}", "rejected": f"r{i}", "margin": 1.0}
            for i, p in enumerate(["a", "a", "b", "c"])]
    out = reward_model.random_augment(rows, 0.5, random.Random(0))
    assert out[:4] == rows and len(out) == 6
    chosen_of = {row["chosen"]: row["prompt"] for row in rows}
    for extra in out[4:]:
        assert chosen_of[extra["chosen"]] == extra["prompt"]  # the row's own prompt and chosen
        assert chosen_of[extra["rejected"]] != extra["prompt"]  # another prompt's chosen
        assert "margin" not in extra  # trained with the plain loss
    assert len({row["chosen"] for row in out[4:]}) == 2  # two distinct rows were augmented
    same_prompt = [dict(row, prompt="a") for row in rows]
    assert reward_model.random_augment(same_prompt, 0.5, random.Random(0)) == same_prompt


def toy_demos(n: int) -> tuple[object, list[list[int]]]:
    """The toy tokenizer and the token ids (prompt + completion + EOS) of n toy SFT demonstrations."""
    tokenizer = common.toy_tokenizer()
    return tokenizer, [common.encode_prompt(tokenizer, r["prompt"])
                       + common.encode_completion(tokenizer, r["completion"])
                       for r in common.toy_dataset("sft")["train"].select(range(n))]


def test_shift_scores_survives_reload(tmp_path: Path) -> None:
    tokenizer, demos = toy_demos(40)
    common.toy_model(tokenizer).save_pretrained(tmp_path / "lm")
    model = common.load_model(str(tmp_path / "lm"), tokenizer, "score")
    torch.nn.init.normal_(model.score.weight)  # a trained head, not the zero one
    before = reward_model.score_sequences(common.TokenScores(model), demos, tokenizer.pad_token_id, 16,
                                          torch.device("cpu"))
    assert abs(before.mean()) > 0.1

    assert reward_model.shift_scores(model, before.mean().item())
    model.save_pretrained(tmp_path / "rm")
    reloaded = common.TokenScores(AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm"))
    after = reward_model.score_sequences(reloaded, demos, tokenizer.pad_token_id, 16, torch.device("cpu"))
    torch.testing.assert_close(after, before - before.mean(), atol=1e-4, rtol=0)  # so the demonstrations' mean is 0


def test_score_sequences_reads_each_sequence_at_its_last_token_whatever_the_batch() -> None:
    """Right padding and the batch size change nothing: each score is that of the sequence alone."""
    tokenizer, demos = toy_demos(10)
    model = common.TokenScores(common.toy_model(tokenizer, "score"))
    torch.nn.init.normal_(model.classifier.score.weight)
    scores = reward_model.score_sequences(model, demos, tokenizer.pad_token_id, 4, torch.device("cpu"))
    alone = [model(torch.tensor([d]), torch.ones(1, len(d), dtype=torch.long))[0, -1].item() for d in demos]
    torch.testing.assert_close(scores, torch.tensor(alone), atol=1e-5, rtol=0)


def test_tokenize_leaves_out_pairs_that_do_not_fit_and_fails_when_none_does(capsys) -> None:
    tokenizer = common.toy_tokenizer()
    rows = [{"prompt": "the plot", "chosen": "was good .", "rejected": "was bad . it was bad ."},
            {"prompt": "the plot", "chosen": "was good .", "rejected": "was bad ."}]
    # <bos> the plot | was bad . it was bad . <eos> is 3 + 8 tokens; the second pair's longer one 3 + 4
    examples = reward_model.tokenize(rows, tokenizer, 10)
    assert [e["rejected_len"] for e in examples] == [3]
    assert examples[0]["chosen_ids"] == tokenizer("the plot was good .")["input_ids"] + [tokenizer.eos_token_id]
    assert "1 of 2 preference pairs are longer than 10 tokens" in capsys.readouterr().out
    assert len(reward_model.tokenize(rows, tokenizer, 11)) == 2
    with pytest.raises(SystemExit) as exit_info:
        reward_model.tokenize(rows, tokenizer, 6)
    assert exit_info.value.code == 2 and "no preference pair fits in 6 tokens" in capsys.readouterr().err


NUMERIC = [f.name for f in dataclasses.fields(reward_model.Args) if f.type in (int, float, int | None)
           and f.name != "seed"]


@pytest.mark.parametrize("flag", NUMERIC)
def test_every_numeric_flag_is_range_checked(flag: str, capsys) -> None:
    reward_model.check_args(reward_model.Args(), 1)  # the defaults pass
    with pytest.raises(SystemExit) as exit_info:
        reward_model.check_args(dataclasses.replace(reward_model.Args(), **{flag: -1}), 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and f"--{flag} " in lines[0]


@pytest.mark.parametrize("changes, says", [
    ({"learning_rate": 0.0}, "--learning_rate must be positive"),
    ({"learning_rate": float("nan")}, "--learning_rate must be positive"),
    ({"batch_size": 0}, "--batch_size must be positive"),
    ({"save_every": 0}, "--save_every must be positive"),
    ({"random_augment": 1.5}, "--random_augment is a fraction"),
    ({"resume": True, "overwrite": True}, "pass one of them"),
])
def test_bad_flags_are_one_line_errors(changes: dict, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        reward_model.check_args(dataclasses.replace(reward_model.Args(), **changes), 1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and says in lines[0]
    for fine in ({"center_rewards_coef": 0.0, "random_augment": 0.0}, {"random_augment": 1.0}):
        reward_model.check_args(dataclasses.replace(reward_model.Args(), **fine), 1)


def test_reward_model_end_to_end(sft_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "rm"
    run_script("reward_model.py", "--model_name_or_path", str(sft_model), "--output_dir", str(out),
               "--max_train_rows", "96", "--batch_size", "16", "--eval_rows", "32", "--eval_every", "3",
               "--demo_rows", "32", "--length_balance", "--random_augment", "0.25", "--center_rewards_coef", "0.01")
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy", "length_corr", "gold_accuracy", "label_ceiling", "accuracy_by_length_diff",
            "demo_score_mean", "world_size"} <= set(summary)
    assert 0 <= summary["accuracy"] <= 1 and -1 <= summary["length_corr"] <= 1
    assert sum(b["n"] for b in summary["accuracy_by_length_diff"].values()) == 32
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["step"] % 3 == 0 or m is metrics[-1] for m in metrics)
    assert all({"episode", "loss/train", "accuracy/train", "accuracy/eval", "grad_norm"} <= set(m) for m in metrics)
    assert [m["episode"] for m in metrics] == [m["step"] * 16 for m in metrics]

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    # the saved model scores the demonstrations used for the shift at 0 on average
    tokenizer = common.load_tokenizer(str(out))
    _, demos = toy_demos(32)
    scores = reward_model.score_sequences(common.TokenScores(model), demos, tokenizer.pad_token_id, 32,
                                          torch.device("cpu"))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_from_the_untrained_toy_model_and_resumed_from_a_checkpoint(tmp_path: Path) -> None:
    """`--model_name_or_path toy` (a fresh toy model, as sft.py accepts) trains a reward model; the
    saved model gives the summary's held-out accuracy; and a run resumed from its step-2 checkpoint
    ends with the same summary and weights."""
    out = tmp_path / "rm"
    flags = ["reward_model.py", "--model_name_or_path", "toy", "--output_dir", str(out), "--max_train_rows", "64",
             "--batch_size", "16", "--eval_rows", "16", "--demo_rows", "16", "--num_epochs", "1", "--eval_every", "2",
             "--save_every", "2"]
    run_script(*flags)
    summary = json.loads((out / "summary.json").read_text())
    weights = load_file(out / "model.safetensors")

    tokenizer = common.load_tokenizer(str(out))
    _, test_rows = common.load_data("toy", "preference", tokenizer, test_rows=16)
    test = reward_model.tokenize(test_rows, tokenizer, 128)
    model = common.TokenScores(AutoModelForSequenceClassification.from_pretrained(out))
    chosen, rejected = reward_model.score_pairs(model, test, tokenizer.pad_token_id, 16, torch.device("cpu"))
    assert reward_model.pairwise_accuracy(chosen - rejected) == summary["accuracy"]

    # the checkpoint of step 2 (of 4) stays beside the finished run; resuming from it redoes steps 3-4
    assert torch.load(out / "checkpoint.pt", weights_only=False)["loop"]["step"] == 2
    run_script(*flags, "--resume")
    resumed = json.loads((out / "summary.json").read_text())
    for k in ("wall_time", "peak_memory_mb"):
        del summary[k], resumed[k]
    assert resumed == summary
    for name, value in load_file(out / "model.safetensors").items():
        assert torch.equal(value, weights[name]), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]


def test_a_diverging_run_stops_with_a_one_line_error_and_saves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "rm"
    result = run_script("reward_model.py", "--model_name_or_path", "toy", "--output_dir", str(out),
                        "--max_train_rows", "64", "--batch_size", "16", "--eval_rows", "16", "--demo_rows", "16",
                        "--learning_rate", "1e6", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "diverged" in lines[0], result.stderr
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_script("reward_model.py", "--model_name_or_path", "/nonexistent/x", "--output_dir",
                        str(tmp_path), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "python sft.py" in result.stderr


def test_unusable_dataset_is_a_one_line_error(sft_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"foo": 1, "bar": "x"}\n{"foo": 2, "bar": "y"}\n')
    result = run_script("reward_model.py", "--model_name_or_path", str(sft_model), "--dataset_name", str(data),
                        "--output_dir", str(tmp_path / "rm"), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "foo" in result.stderr


# ---------------------------------------------------------------------------------------------
# The saved reward model under plain transformers: the same scores, centered where the model allows.
# ---------------------------------------------------------------------------------------------


def word_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the toy words: `gpt2` (one special token, <|endoftext|>, for BOS, EOS and
    unknown words, no pad, no BOS added), `llama` (<s> added in front, </s>, no pad), or `toy` (a pad of its own)."""
    if style == "toy":
        return common.toy_tokenizer()
    specials = {"gpt2": ["<|endoftext|>"], "llama": ["<unk>", "<s>", "</s>"]}[style]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + common.TOY_WORDS)},
                                         unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0],
                                   bos_token=specials[-2 if style == "llama" else 0], eos_token=specials[-1])


def tiny_lm(arch: str, tokenizer) -> AutoModelForCausalLM:
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = (GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **ids) if arch == "gpt2" else
              LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, max_position_embeddings=64, **ids))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("style", ["pad is EOS", "own pad"])
def test_a_saved_reward_model_gives_the_same_scores_under_plain_transformers(arch: str, style: str,
                                                                               tmp_path: Path) -> None:
    """reward_model.py's path (score model from a causal LM, the shift, prepare_for_transformers, save_pretrained)
    against AutoModelForSequenceClassification + AutoTokenizer on the texts: the same scores, right-padded in a
    batch, centered where the final norm has a bias (GPT-2), uncentered but still equal where not (Llama)."""
    word_tokenizer({"pad is EOS": arch, "own pad": "toy"}[style]).save_pretrained(tmp_path / "sft")
    tokenizer = common.load_tokenizer(str(tmp_path / "sft"))
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == (style == "pad is EOS")
    tiny_lm(arch, tokenizer).save_pretrained(tmp_path / "sft")
    model = common.load_model(str(tmp_path / "sft"), tokenizer, "score")
    torch.nn.init.normal_(model.score.weight)  # a trained head, not the zero one
    rows = common.toy_dataset("sft")["train"].select(range(12)).to_list()
    demos = [common.encode_prompt(tokenizer, r["prompt"]) + common.encode_completion(tokenizer, r["completion"],
                                                                                      prompt=r["prompt"]) for r in rows]
    assert len({len(d) for d in demos}) > 1  # a batch of them is padded
    scorer, cpu = common.TokenScores(model), torch.device("cpu")
    demo_mean = reward_model.score_sequences(scorer, demos, tokenizer.pad_token_id, 4, cpu).mean().item()
    assert reward_model.shift_scores(model, demo_mean) == (arch == "gpt2")  # Llama's RMSNorm has no bias
    ours = reward_model.score_sequences(scorer, demos, tokenizer.pad_token_id, 4, cpu)
    if arch == "gpt2":
        assert ours.mean().item() == pytest.approx(0.0, abs=1e-5)

    texts = [f"{r['prompt']} {r['completion']} {tokenizer.eos_token}" for r in rows]

    def plain_scores(path: Path) -> torch.Tensor:
        plain_tokenizer = AutoTokenizer.from_pretrained(path)
        batch = plain_tokenizer(texts, padding=True, return_tensors="pt")
        assert [ids[m == 1].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])] == demos
        with torch.no_grad():
            return AutoModelForSequenceClassification.from_pretrained(path)(**batch).logits[:, 0]

    if style == "pad is EOS":  # the trap: saved as it is, transformers reads the token before the EOS
        model.save_pretrained(tmp_path / "as_is")
        tokenizer.save_pretrained(tmp_path / "as_is")
        assert (plain_scores(tmp_path / "as_is") - ours).abs().max() > 1e-3
    reward_model.prepare_for_transformers(model, tokenizer)
    model.save_pretrained(tmp_path / "rm")  # as run.finish saves them
    tokenizer.save_pretrained(tmp_path / "rm")
    torch.testing.assert_close(plain_scores(tmp_path / "rm"), ours, atol=1e-5, rtol=0)

    # The RL scripts load it back with our code: the same scores; and the policy's ids mean the same tokens to it
    # (its vocabulary holds the policy's, id for id, plus its own pad), so it may read them without retokenize.
    rm_tokenizer = common.load_tokenizer(str(tmp_path / "rm"))
    reloaded = common.TokenScores(common.load_model(str(tmp_path / "rm"), rm_tokenizer, "score"))
    torch.testing.assert_close(reward_model.score_sequences(reloaded, demos, rm_tokenizer.pad_token_id, 4, cpu), ours,
                               atol=1e-5, rtol=0)
    policy_tokenizer = common.load_tokenizer(str(tmp_path / "sft"))
    assert rm_tokenizer.get_vocab().items() >= policy_tokenizer.get_vocab().items()
    assert len(rm_tokenizer) == len(policy_tokenizer) + (style == "pad is EOS")
