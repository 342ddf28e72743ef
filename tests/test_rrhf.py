"""RRHF: the score, ranking and fine-tuning losses against naive loops; end-to-end runs."""

import json

import pytest
import torch
from conftest import run_script

import common
from rrhf import finetune_loss, pack, rank_loss, sequence_scores

SUMMARY_KEYS = {"reward", "kl", "length", "eos_rate", "gold", "well_formed", "num_models"}


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
def test_sequence_scores_match_loop(length_penalty):
    torch.manual_seed(0)
    lengths = [1, 3, 7, 5]  # right-padded to 7 tokens
    logprobs = -torch.rand(len(lengths), 7) * 3
    mask = torch.tensor([[int(t < n) for t in range(7)] for n in lengths])
    expected = [sum(logprobs[i, t].item() for t in range(n)) / n**length_penalty for i, n in enumerate(lengths)]
    assert torch.allclose(sequence_scores(logprobs, mask, length_penalty), torch.tensor(expected), atol=1e-6)


def test_rank_loss_matches_double_loop_with_ties_and_padding():
    torch.manual_seed(0)
    scores = torch.randn(5, 6)
    rewards = torch.randint(0, 3, (5, 6)).float()  # few values: many ties, which form no pair
    valid = torch.ones(5, 6, dtype=torch.bool)
    valid[1, 4:] = valid[3, 2:] = False  # queries with fewer candidates
    rewards[~valid] = 99.0  # padding must not count, whatever its reward
    total = 0.0
    for q in range(5):
        for i in range(6):
            for j in range(6):
                if valid[q, i] and valid[q, j] and rewards[q, i] < rewards[q, j]:
                    total += max(0.0, scores[q, i].item() - scores[q, j].item())
    assert rank_loss(scores, rewards, valid).item() == pytest.approx(total / 5, rel=1e-5)
    assert rank_loss(rewards, rewards, valid).item() == 0.0  # scores ordered like rewards: no loss


def test_finetune_loss_picks_best_response():
    sum_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    rewards = torch.tensor([[0.1, 0.9, 0.5], [2.0, 1.0, 7.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])  # reward 7 is padding
    assert finetune_loss(sum_logprobs, rewards, valid).item() == pytest.approx((2.0 + 4.0) / 2)


@torch.no_grad()
def score(model, tokenizer, queries: list[str], responses: list[str]) -> torch.Tensor:
    """RRHF scores p_i of query + response texts, all in one padded batch."""
    q, q_mask, r, r_mask = pack([common.encode_prompt(tokenizer, p) for p in queries],
                                [common.encode_completion(tokenizer, c) for c in responses], tokenizer.pad_token_id)
    logprobs, _ = common.response_logprobs(model, torch.cat([q, r], 1), torch.cat([q_mask, r_mask], 1), q.shape[1])
    return sequence_scores(logprobs, r_mask)


def test_scores_of_padded_responses_match_unpadded():
    """Responses of different lengths behind queries of different lengths, in one padded batch,
    get the same scores as each alone (masking, position ids and the shift are right)."""
    torch.manual_seed(0)
    tokenizer = common.toy_tokenizer()
    model = common.toy_model(tokenizer).eval()
    queries = ["the plot", "i really loved", "it"]  # of different lengths, as their responses
    responses = ["was good .", "it .", "was not very bad . i hated it ."]
    alone = torch.cat([score(model, tokenizer, [q], [r]) for q, r in zip(queries, responses)])
    assert torch.allclose(score(model, tokenizer, queries, responses), alone, atol=1e-5)


TINY = ["--total_episodes", "8", "--queries_per_step", "4", "--num_samples", "2", "--max_new_tokens", "16",
        "--eval_rows", "8"]


def test_end_to_end_gold_with_kl(sft_model, tmp_path):
    run_script("rrhf.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--sources", "online", "initial",
               "demo", "--refresh_every", "2", "--kl_coef", "0.1", "--output_dir", str(tmp_path), *TINY)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and summary["num_models"] == 2  # policy + initial model
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and {"loss/rank", "loss/ft", "rank/accuracy", "objective/kl", "objective/scores_online",
                                  "gold/reward", "time/generation", "episode"} <= metrics[-1].keys()
    assert (tmp_path / "model.safetensors").exists()


def test_ready_made_rrhf_data_and_length_reward(sft_model, tmp_path):
    rows = common.toy_dataset("prompts")["train"].select(range(6))
    data = tmp_path / "rrhf.jsonl"
    data.write_text("".join(json.dumps({"query": r["prompt"], "responses": [r["completion"], "i loved it .", "."],
                                        "scores": [0.0, 2.0, -2.0]}) + "\n" for r in rows))
    run_script("rrhf.py", "--sft_model_path", str(sft_model), "--reward", "length", "--rrhf_data", str(data),
               "--output_dir", str(tmp_path / "out"), *TINY)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # the file replaces sampling and scoring; --reward length only evaluates
    assert SUMMARY_KEYS | {"length_error"} <= summary.keys() and summary["num_models"] == 1

    def score_of_best(path) -> float:  # p of the best-scored response for the first query
        tokenizer = common.load_tokenizer(str(path))
        return score(common.load_model(str(path), tokenizer).eval(), tokenizer, [rows[0]["prompt"]], ["i loved it ."])

    assert score_of_best(tmp_path / "out") > score_of_best(sft_model)


def test_missing_sft_model_exits_2(tmp_path):
    result = run_script("rrhf.py", "--sft_model_path", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "sft.py" in result.stderr


@pytest.mark.parametrize("content, says", [('{"query": "i", "responses": ["a"], "scores": [1.0]}\nnot json\n', "line 2"),
                                           ("[1, 2]\n", "line 1"), ("\n", "no rows")])
def test_bad_rrhf_data_is_a_one_line_error(sft_model, tmp_path, content, says):
    data = tmp_path / "rrhf.jsonl"
    data.write_text(content)
    result = run_script("rrhf.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--rrhf_data", str(data),
                        "--output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert says in result.stderr
