"""RRHF: the score, ranking and fine-tuning losses against naive loops; argument and data checks in
process; end-to-end runs (outputs, resuming, ready-made rows, two processes) as subprocesses."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file

import common
import rrhf
from rrhf import finetune_loss, pack, rank_loss, sequence_scores

SUMMARY_KEYS = {"reward", "kl", "length", "eos_rate", "gold", "well_formed", "num_models", "initial"}


@pytest.mark.parametrize("length_power", [0.0, 0.5, 1.0, 2.0])
def test_sequence_scores_match_loop(length_power):
    torch.manual_seed(0)
    lengths = [1, 3, 7, 5]  # right-padded to 7 tokens
    logprobs = -torch.rand(len(lengths), 7) * 3
    mask = torch.tensor([[int(t < n) for t in range(7)] for n in lengths])
    expected = [sum(logprobs[i, t].item() for t in range(n)) / n**length_power for i, n in enumerate(lengths)]
    assert torch.allclose(sequence_scores(logprobs, mask, length_power), torch.tensor(expected), atol=1e-6)


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
    logprobs = common.response_logprobs(model, torch.cat([q, r], 1), torch.cat([q_mask, r_mask], 1), q.shape[1])
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


def test_given_candidates_of_ready_made_rows_and_demonstrations():
    tokenizer = common.toy_tokenizer()
    eos = tokenizer.eos_token_id
    ids = {text: tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("i loved it .", "it was bad .")}
    ready = {"prompt": "the plot", "responses": ["i loved it .", "it was bad ."], "scores": [2, -1.5]}
    assert rrhf.given_candidates(ready, tokenizer, 48, demo=False) == [
        (ids["i loved it ."] + [eos], "data", 2.0), (ids["it was bad ."] + [eos], "data", -1.5)]
    # a preference row brings its chosen (the completion) and rejected response, unscored; cut to 3 tokens
    preference = {"prompt": "the plot", "completion": "i loved it .", "chosen": "i loved it .",
                  "rejected": "it was bad ."}
    assert rrhf.given_candidates(preference, tokenizer, 3, demo=True) == [
        (ids["i loved it ."][:3], "demo", None), (ids["it was bad ."][:3], "demo", None)]
    assert rrhf.given_candidates(preference, tokenizer, 48, demo=False) == []
    assert rrhf.given_candidates({"prompt": "the plot", "completion": None}, tokenizer, 48, demo=True) == []


def numeric_flags() -> list[str]:
    return [f.name for f in dataclasses.fields(rrhf.Args) if f.type in (int, float, int | None, float | None)
            and f.name != "seed"]


@pytest.mark.parametrize("name", numeric_flags())
def test_every_numeric_flag_is_range_checked(name, capsys):
    rrhf.check_args(rrhf.Args(), 1)  # the defaults pass
    with pytest.raises(SystemExit) as exit_info:
        rrhf.check_args(rrhf.Args(**{name: -1}), 1)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: --{name} must be")


@pytest.mark.parametrize("flags, says", [
    ({"total_queries": 8, "queries_per_step": 16}, "--total_queries 8 must be at least --queries_per_step 16"),
    ({"sources": ()}, "--sources is empty"),
    ({"learning_rate": 0.0}, "--learning_rate must be positive"),
    ({"resume": True, "overwrite": True}, "pass one of them"),
])
def test_inconsistent_flags_fail_with_one_line(flags, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rrhf.check_args(rrhf.Args(**flags), 1)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err


@pytest.mark.parametrize("content, says", [
    ('{"query": "i", "responses": ["a"], "scores": [1.0]}\nnot json\n', "line 2 is not JSON"),
    ("[1, 2]\n", "line 1: need a query"),
    ('{"query": "i", "responses": ["a", "b"], "scores": [1.0]}\n', "line 1: need a query"),
    ('{"query": "i", "responses": [], "scores": []}\n', "line 1: need a query"),
    ('{"query": "i", "responses": ["a"], "scores": ["high"]}\n', "line 1: need a query"),
    ("\n", "has no rows"),
    (None, "not found"),
])
def test_bad_rrhf_data_is_a_one_line_error(tmp_path, capsys, content, says):
    data = tmp_path / "rrhf.jsonl"
    if content is not None:
        data.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        rrhf.read_rrhf_data(str(data))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


def save_toy_reward_model(path: Path) -> None:
    """A toy score model with a random (not zero) head, saved as a reward model is."""
    tokenizer = common.toy_tokenizer()
    model = common.toy_model(tokenizer, "score")
    torch.nn.init.normal_(model.score.weight, generator=torch.Generator().manual_seed(0), std=0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def metrics_of(run: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock values."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "eps") and not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary_of(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("wall_time", "peak_memory_mb")}


def test_end_to_end_reward_model_online_with_kl_and_bit_identical_resume(sft_model, tmp_path):
    """Every source, the KL term and OP-3 (candidates sampled for 3 steps at once) on a reward
    model. The checkpoint of step 2 holds step 3's candidates; resuming from it must end exactly as
    the uninterrupted run did (as if killed any time after step 2)."""
    save_toy_reward_model(tmp_path / "rm")
    out = tmp_path / "run"
    flags = ["--sft_model_path", str(sft_model), "--reward_model_path", str(tmp_path / "rm"), "--sources", "online",
             "initial", "demo", "--refresh_every", "3", "--kl_coef", "0.1", "--total_queries", "16",
             "--queries_per_step", "4", "--num_samples", "2", "--max_new_tokens", "16", "--eval_rows", "8",
             "--save_every", "2", "--output_dir", str(out)]
    run_script("rrhf.py", *flags)
    summary = summary_of(out)
    assert SUMMARY_KEYS <= summary.keys() and summary["num_models"] == 3  # policy, initial model, reward model
    assert abs(summary["initial"]["kl"]) < 1e-4  # before training the policy is the initial model
    metrics = metrics_of(out)
    train = [m for m in metrics if "loss/rank" in m]
    assert [m["episode"] for m in train] == [4, 8, 12, 16]
    assert {"loss/ft", "rank/accuracy", "objective/kl", "objective/scores_online", "objective/scores_initial",
            "objective/scores_demo", "gold/reward", "gold/well_formed", "response/length"} <= train[-1].keys()
    assert [m["step"] for m in metrics if "eval/reward" in m] == [0, 4]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    initial = [json.loads(line) for line in (out / "initial_samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(initial) == 8 and {"prompt", "response", "score", "gold"} <= samples[0].keys()
    weights = (out / "model.safetensors").read_bytes()

    run_script("rrhf.py", *flags, "--resume")  # the checkpoint left is step 2's
    assert summary_of(out) == summary and metrics_of(out) == metrics
    assert (out / "model.safetensors").read_bytes() == weights
    assert [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] == samples


def test_ready_made_rows_take_the_same_path_as_demonstrations(sft_model, tmp_path):
    """A preference file's chosen and rejected responses as `demo` candidates, scored by gold in
    the loop, train exactly as the same responses given as ready-made rows with their gold scores."""
    rows = common.toy_dataset("preference")["train"].select(range(12))
    preference = tmp_path / "preference.jsonl"
    preference.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    ready = tmp_path / "rrhf.jsonl"  # the first 8 rows: the last 4 are held out for evaluation
    ready.write_text("".join(json.dumps({
        "query": r["prompt"], "responses": list(dict.fromkeys((r["chosen"], r["rejected"]))),
        "scores": [common.gold_reward(r["prompt"], c) for c in dict.fromkeys((r["chosen"], r["rejected"]))]}) + "\n"
        for r in rows.select(range(8))))
    assert all(len(r[k].split()) < 48 for r in rows for k in ("chosen", "rejected"))  # no response is cut
    flags = ["--sft_model_path", str(sft_model), "--reward", "gold", "--dataset_name", str(preference),
             "--total_queries", "8", "--queries_per_step", "4", "--max_new_tokens", "48", "--eval_rows", "4"]
    run_script("rrhf.py", *flags, "--sources", "demo", "--output_dir", str(tmp_path / "demo"))
    run_script("rrhf.py", *flags, "--rrhf_data", str(ready), "--output_dir", str(tmp_path / "ready"))
    assert ((tmp_path / "demo" / "model.safetensors").read_bytes()
            == (tmp_path / "ready" / "model.safetensors").read_bytes())
    assert summary_of(tmp_path / "demo") == summary_of(tmp_path / "ready")
    demo, data = metrics_of(tmp_path / "demo"), metrics_of(tmp_path / "ready")
    assert [m.get("objective/scores_demo") for m in demo] == [m.get("objective/scores_data") for m in data]
    assert [m.get("loss/rank") for m in demo] == [m.get("loss/rank") for m in data]


def test_ready_made_rows_with_length_reward_and_two_processes_train_like_one(sft_model, tmp_path):
    rows = common.toy_dataset("prompts")["train"].select(range(6))
    data = tmp_path / "rrhf.jsonl"
    data.write_text("".join(json.dumps({"query": r["prompt"], "responses": [r["completion"], "i loved it .", "."],
                                        "scores": [0.0, 2.0, -2.0]}) + "\n" for r in rows))
    flags = ["--sft_model_path", str(sft_model), "--reward", "length", "--rrhf_data", str(data),
             "--total_queries", "8", "--queries_per_step", "4", "--max_new_tokens", "16", "--eval_rows", "8"]
    run_script("rrhf.py", *flags, "--output_dir", str(tmp_path / "one"))
    summary = summary_of(tmp_path / "one")
    # the file replaces sampling and scoring; --reward length only evaluates
    assert SUMMARY_KEYS | {"length_error"} <= summary.keys() and summary["num_models"] == 1

    def score_of_best(path) -> float:  # p of the best-scored response for the first query
        tokenizer = common.load_tokenizer(str(path))
        return score(common.load_model(str(path), tokenizer).eval(), tokenizer, [rows[0]["prompt"]], ["i loved it ."])

    assert score_of_best(tmp_path / "one") > score_of_best(sft_model)

    # Two processes, each with half of every batch: the loss is the mean over all queries, so the
    # weights are those of one process (up to the order of float sums).
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*torchrun, str(ROOT / "rrhf.py"), *flags, "--output_dir", str(tmp_path / "two")],
                            cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(tmp_path / "two")["world_size"] == 2
    one, two, initial = (load_file(path / "model.safetensors")
                         for path in (tmp_path / "one", tmp_path / "two", sft_model))
    assert max((one[k] - initial[k]).abs().max() for k in one) > 1e-4  # it trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)


def test_missing_sft_model_exits_2(tmp_path):
    result = run_script("rrhf.py", "--sft_model_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"),
                        check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "sft.py" in result.stderr

