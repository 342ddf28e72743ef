"""ppo_max.py: each new piece of math against numpy or a naive loop; an end-to-end run that checks
the critic warmup leaves the policy untouched and that the pattern-collapse monitors are logged."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_script

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
    rows = [{"prompt": "the plot was", "completion": "very good ."}, {"prompt": "i", "completion": "loved it . it was fun ."}]
    loss = ppo_max.ptx_loss(model, rows, tokenizer, torch.device("cpu"))
    total, count = 0.0, 0
    for row in rows:  # one unpadded sequence at a time; score only the completion and its EOS
        prompt = common.encode_prompt(tokenizer, row["prompt"])
        ids = prompt + common.encode_completion(tokenizer, row["completion"])
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        for t in range(len(prompt), len(ids)):
            total, count = total - logp[t - 1, ids[t]].item(), count + 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_ppo_max_end_to_end_warmup_freezes_policy_and_monitors_are_logged(sft_model, tmp_path):
    out = tmp_path / "ppo_max"
    run_script("ppo_max.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--total_episodes", "32",
               "--batch_size", "16", "--critic_warmup_steps", "2", "--ptx_coef", "0.1", "--advantage_clip", "0.5",
               "--eval_prompts", "16", "--max_new_tokens", "24", "--output_dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward", "kl", "length", "eos_rate", "gold", "well_formed"):
        assert math.isfinite(summary[key]), key
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m for m in train if "objective/kl" in m}
    assert sorted(train) == [-2, -1, 1, 2]  # two critic-warmup iterations, then two policy iterations
    for key in ("monitor/perplexity", "monitor/ref_perplexity", "monitor/score_std", "monitor/score_tail",
                "monitor/score_running_std", "objective/kl", "response/length", "gold/reward", "gold/well_formed",
                "loss/policy_avg", "loss/value_avg"):
        assert all(math.isfinite(m[key]) for m in train.values()), key
    # The rollouts of iteration 1 were sampled after both warmup iterations and before any policy
    # update: the policy must still be the SFT model (KL to it 0 up to float error, equal perplexities)...
    for step in (-2, -1, 1):
        assert abs(train[step]["objective/kl"]) < 1e-4, (step, train[step]["objective/kl"])
        assert train[step]["monitor/perplexity"] == pytest.approx(train[step]["monitor/ref_perplexity"], rel=1e-4)
    # ...while the value model (zero-initialized head with --reward gold) did learn during warmup.
    assert train[-2]["val/mean"] == 0 and train[-1]["val/mean"] != 0
    assert abs(train[2]["objective/kl"]) > 1e-4  # and the policy moves once policy updates begin
    assert (out / "args.json").exists() and (out / "config.json").exists()
