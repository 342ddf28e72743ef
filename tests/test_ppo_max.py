"""ppo_max.py: each new piece of math against numpy or a naive loop; flags checked in-process; an
end-to-end run that checks the critic warm-up leaves the policy untouched and that the
pattern-collapse monitors are logged; and a run killed with kill -9 in the warm-up and resumed that
ends as the uninterrupted one."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_same_run, kill_9_after, run_main, run_script

import common
import ppo_max

# Three responses of different lengths: the second has no EOS (mask full), the third is one token.
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)


def random_like_mask(seed: int) -> torch.Tensor:
    return torch.randn(MASK.shape, generator=torch.Generator().manual_seed(seed)) * MASK


def test_running_moments_match_numpy_over_the_whole_history():
    rng = np.random.default_rng(0)
    moments, history = ppo_max.RunningMoments(), []
    for size, loc, scale in [(64, 3.0, 2.0), (1, -5.0, 1.0), (17, 0.0, 0.1), (64, 10.0, 4.0), (2, 0.0, 1.0)]:
        batch = rng.normal(loc, scale, size)
        moments.update(torch.tensor(batch, dtype=torch.float32))
        history.extend(batch.astype(np.float32).tolist())
        assert moments.count == len(history)
        assert moments.mean == pytest.approx(np.mean(history), rel=1e-6, abs=1e-9)
        assert moments.std == pytest.approx(np.std(history), rel=1e-6)


def test_normalize_and_clip_scores_matches_naive_loop():
    scores = torch.tensor([3.0, -1.0, 0.2, 10.0, -7.0])
    out = ppo_max.normalize_and_clip_scores(scores, mean=0.5, std=2.0, clip=0.8)
    want = [min(max((s - 0.5) / 2.0, -0.8), 0.8) for s in scores.tolist()]
    torch.testing.assert_close(out, torch.tensor(want))


def naive_whiten_and_clip(x, mask, clip):
    valid = [x[i, t].item() for i in range(x.shape[0]) for t in range(x.shape[1]) if mask[i, t]]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / len(valid))
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[i, t]:
                a = (x[i, t].item() - mean) / std
                out[i, t] = a if clip is None else min(max(a, -clip), clip)
    return out


@pytest.mark.parametrize("clip", [None, 0.5])
def test_normalize_advantages_whitens_then_clips(clip):
    advantages = random_like_mask(0) * 3.0 + 1.0 * MASK + 50.0 * (1 - MASK)  # garbage on padding
    out = ppo_max.normalize_advantages(advantages, MASK, clip)
    torch.testing.assert_close(out, naive_whiten_and_clip(advantages, MASK, clip), atol=1e-4, rtol=1e-4)
    if clip is not None:
        assert out.abs().max() <= clip and (out.abs() == clip).any()  # some were clipped


def test_collapse_monitors_match_naive_computation():
    logprobs, ref_logprobs = -random_like_mask(1).abs(), -random_like_mask(2).abs() * 2
    scores = torch.tensor([0.5, -1.0, 4.0])
    out = ppo_max.collapse_monitors(logprobs, ref_logprobs, MASK, scores)
    n, nll, ref_nll = 0, 0.0, 0.0
    for i in range(MASK.shape[0]):
        for t in range(MASK.shape[1]):
            if MASK[i, t]:
                n, nll, ref_nll = n + 1, nll - logprobs[i, t].item(), ref_nll - ref_logprobs[i, t].item()
    assert out["monitor/perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert out["monitor/ref_perplexity"] == pytest.approx(math.exp(ref_nll / n), rel=1e-5)
    s = scores.numpy()
    assert out["monitor/score_std"] == pytest.approx(np.std(s), rel=1e-5)
    assert out["monitor/score_tail"] == pytest.approx(np.percentile(s, 90) - np.median(s), rel=1e-5)
    assert out["monitor/score_low_tail"] == pytest.approx(np.median(s) - np.percentile(s, 10), rel=1e-5)


def test_ptx_loss_is_mean_cross_entropy_of_completion_tokens():
    torch.manual_seed(0)
    tokenizer = common.toy_tokenizer()
    model = common.toy_model(tokenizer).eval()
    rows = [{"prompt": "the plot was", "completion": "very good ."},
            {"prompt": "i", "completion": "loved it . it was fun ."}]
    ids, mask, targets = ppo_max.ptx_batch(rows, tokenizer, torch.device("cpu"))
    loss = ppo_max.ptx_loss(model, ids, mask, targets)
    # in micro-batches of one row, each a share of the whole batch's token mean, the losses add up to it
    count = targets[:, 1:].sum()
    halves = sum(ppo_max.ptx_loss(model, ids[i:i + 1], mask[i:i + 1], targets[i:i + 1], count) for i in range(2))
    assert halves.item() == pytest.approx(loss.item(), rel=1e-6)
    total, count = 0.0, 0
    for row in rows:  # one unpadded sequence at a time; score only the completion and its EOS
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        ids = prompt + common.encode_completion(tokenizer, row["completion"])
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        for t in range(len(prompt), len(ids)):
            total, count = total - logp[t - 1, ids[t]].item(), count + 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("flags, says", [
    (["--reward_clip", "0"], "--reward_clip must be positive, got 0.0"),
    (["--advantage_clip", "-0.5"], "--advantage_clip must be positive, got -0.5"),
    (["--critic_warmup_steps", "-1"], "--critic_warmup_steps must be at least 0, got -1"),
    (["--ptx_coef", "-0.1"], "--ptx_coef must be at least 0, got -0.1"),
    (["--num_mini_batches", "0"], "--num_mini_batches must be positive, got 0"),
    (["--eval_rows", "0"], "--eval_rows must be positive, got 0"),
    (["--total_episodes", "8", "--batch_size", "16"], "--total_episodes 8 must be at least --batch_size 16"),
    (["--batch_size", "18"], "must be divisible by 1 processes x --num_mini_batches 4"),
])
def test_ppo_max_bad_flags_are_one_line_errors(flags, says, tmp_path, capsys):
    assert run_main("ppo_max.py", *flags, "--output_dir", str(tmp_path / "run")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_ppo_max_missing_sft_model_fails_with_one_line(tmp_path, capsys):
    assert run_main("ppo_max.py", "--sft_model_path", str(tmp_path / "nope"),
                    "--output_dir", str(tmp_path / "run")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "sft.py" in lines[0]


def flags(sft_model) -> list[str]:
    """Two critic warm-up iterations, then two policy iterations; a checkpoint after every one."""
    return ["--sft_model_path", str(sft_model), "--reward", "gold", "--total_episodes", "32", "--batch_size", "16",
            "--critic_warmup_steps", "2", "--ptx_coef", "0.1", "--advantage_clip", "0.5", "--adaptive_kl",
            "--eval_rows", "16", "--eval_every", "1", "--save_every", "1", "--max_new_tokens", "24"]


@pytest.fixture(scope="module")
def full_run(sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_max") / "full"
    run_script("ppo_max.py", *flags(sft_model), "--output_dir", str(out), threads=1)
    return out


def test_ppo_max_end_to_end_warmup_freezes_policy_and_monitors_are_logged(full_run):
    out = full_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward", "kl", "length", "eos_rate", "gold", "well_formed"):
        assert math.isfinite(summary[key]), key
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m for m in lines if "objective/kl" in m}
    assert sorted(train) == [-2, -1, 1, 2]  # two critic-warmup iterations, then two policy iterations
    assert [m["step"] for m in lines if "eval/reward" in m] == [0, 1, 2]  # no evaluation in the warm-up
    for key in ("monitor/perplexity", "monitor/ref_perplexity", "monitor/score_std", "monitor/score_tail",
                "monitor/score_running_std", "objective/kl", "response/length", "gold/reward", "gold/well_formed",
                "loss/policy_avg", "loss/value_avg"):
        assert all(math.isfinite(m[key]) for m in train.values()), key
    # The rollouts of iteration 1 were sampled after both warmup iterations and before any policy
    # update: the policy must still be the SFT model (KL to it 0 up to float error, equal perplexities)...
    for step in (-2, -1, 1):
        assert abs(train[step]["objective/kl"]) < 1e-4, (step, train[step]["objective/kl"])
        assert train[step]["monitor/perplexity"] == pytest.approx(train[step]["monitor/ref_perplexity"], rel=1e-4)
    # ...while the value model (zero-initialized head with --reward gold) did learn during warmup,
    # and neither the learning-rate schedule nor the KL controller moved.
    assert train[-2]["val/mean"] == 0 and train[-1]["val/mean"] != 0
    assert train[-2]["lr"] == train[-1]["lr"] == train[1]["lr"] * 2 and train[2]["lr"] == 0
    assert train[-2]["kl_coef"] == train[-1]["kl_coef"] == train[1]["kl_coef"] == 0.05 != train[2]["kl_coef"]
    assert abs(train[2]["objective/kl"]) > 1e-4  # and the policy moves once policy updates begin
    # the running moments hold every score so far, the warm-up's included (16 per iteration)
    want = sum(train[step]["objective/scores"] for step in train) / len(train)
    assert train[2]["monitor/score_running_mean"] == pytest.approx(want, rel=1e-6)
    for name in ("samples", "initial_samples"):
        samples = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(samples) == 16 and all(math.isfinite(s["gold"]) for s in samples)
    assert (out / "args.json").exists() and (out / "config.json").exists()


def test_ppo_max_killed_in_the_warmup_resumes_as_the_uninterrupted_run(sft_model, full_run, tmp_path):
    """kill -9 once the warm-up has begun (a checkpoint at step -2, maybe -1), then --resume: the
    running score moments, the RNGs and the step after the checkpoint's come back."""
    cut = tmp_path / "cut"
    # 3 lines: the initial evaluation, steps -2 and -1; step -2's checkpoint was written before step -1's line
    kill_9_after("ppo_max.py", *flags(sft_model), out=cut, lines=3)
    result = run_script("ppo_max.py", *flags(sft_model), "--output_dir", str(cut), "--resume", threads=1)
    first = next(line for line in result.stdout.splitlines() if line.startswith("step="))
    assert first.split()[0] in ("step=-1", "step=1"), first  # the entry after the checkpoint's step (-2 or -1)

    assert_same_run(full_run, cut)
