"""reward_model.py: the loss and the length interventions against hand examples and naive loops,
the score shift through a save/reload, and the script end to end."""

import json
import math
import random

import pytest
import torch
from conftest import run_script
from transformers import AutoModelForSequenceClassification

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


def test_shift_scores_survives_reload(tmp_path):
    tokenizer = common.toy_tokenizer()
    common.toy_model(tokenizer).save_pretrained(tmp_path / "lm")
    model = common.load_model(str(tmp_path / "lm"), tokenizer, "score")
    torch.nn.init.normal_(model.score.weight)  # a trained head, not the zero one
    demos = [common.encode_prompt(tokenizer, r["prompt"]) + common.encode_completion(tokenizer, r["completion"])
             for r in common.toy_dataset("sft")["train"].select(range(40))]
    before = reward_model.score_sequences(model, demos, tokenizer.pad_token_id, 16, torch.device("cpu"))
    assert abs(before.mean()) > 0.1

    assert reward_model.shift_scores(model, before.mean().item())
    model.save_pretrained(tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    after = reward_model.score_sequences(reloaded, demos, tokenizer.pad_token_id, 16, torch.device("cpu"))
    assert after.mean().item() == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(after, before - before.mean(), atol=1e-4, rtol=0)


def test_reward_model_end_to_end(sft_model, tmp_path):
    out = tmp_path / "rm"
    run_script("reward_model.py", "--model_name_or_path", str(sft_model), "--output_dir", str(out),
               "--max_train_rows", "96", "--batch_size", "16", "--eval_rows", "32", "--eval_every", "3",
               "--demo_rows", "32", "--length_balance", "--random_augment", "0.25", "--center_rewards_coef", "0.01")
    summary = json.loads((out / "summary.json").read_text())
    assert {"accuracy", "length_corr", "gold_accuracy", "label_ceiling", "accuracy_by_length_diff",
            "demo_score_mean"} <= set(summary)
    assert 0 <= summary["accuracy"] <= 1 and -1 <= summary["length_corr"] <= 1
    assert sum(b["n"] for b in summary["accuracy_by_length_diff"].values()) == 32
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all("step" in m and "episode" in m for m in metrics)
    assert any("accuracy/eval" in m for m in metrics)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    # the saved model scores the demonstrations used for the shift at 0 on average
    tokenizer = common.load_tokenizer(str(out))
    demos = [common.encode_prompt(tokenizer, r["prompt"]) + common.encode_completion(tokenizer, r["completion"])
             for r in common.toy_dataset("sft")["train"].select(range(32))]
    scores = reward_model.score_sequences(model, demos, tokenizer.pad_token_id, 32, torch.device("cpu"))
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)


def test_missing_model_is_a_one_line_error(tmp_path):
    result = run_script("reward_model.py", "--model_name_or_path", "/nonexistent/x", "--output_dir",
                        str(tmp_path), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "python sft.py" in result.stderr


def test_unusable_dataset_is_a_one_line_error(sft_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"foo": 1, "bar": "x"}\n{"foo": 2, "bar": "y"}\n')
    result = run_script("reward_model.py", "--model_name_or_path", str(sft_model), "--dataset_name", str(data),
                        "--output_dir", str(tmp_path / "rm"), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "foo" in result.stderr


def test_reward_model_from_the_untrained_toy_model(tmp_path):
    """`--model_name_or_path toy` (a fresh toy model, as sft.py accepts) trains a reward model too."""
    out = tmp_path / "rm"
    run_script("reward_model.py", "--model_name_or_path", "toy", "--output_dir", str(out), "--max_train_rows", "64",
               "--batch_size", "16", "--eval_rows", "16", "--demo_rows", "16", "--num_epochs", "1")
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
