"""ppo.py: each piece of math against a naive per-row, per-token loop; end-to-end and learning runs."""

import json
import math
import statistics

import pytest
import torch
from conftest import run_script

import ppo
import ppo_max

# Three responses of different lengths: the second has no EOS (mask full), the third is one token.
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)


def random_like_mask(seed: int) -> torch.Tensor:
    return torch.randn(MASK.shape, generator=torch.Generator().manual_seed(seed)) * MASK


def naive_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    rewards = torch.zeros_like(logprobs)
    for i in range(len(scores)):
        n = int(mask[i].sum())
        for t in range(n):
            rewards[i, t] = -kl_coef * (logprobs[i, t] - ref_logprobs[i, t])
        rewards[i, n - 1] += scores[i]
    return rewards


def naive_gae(rewards, values, mask, gamma, lam):
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(len(rewards)):
        n = int(mask[i].sum())
        for t in range(n):  # A_t = sum_l (gamma lam)^l delta_{t+l}, with V(n) = 0
            total = 0.0
            for k in range(t, n):
                next_value = values[i, k + 1] if k + 1 < n else 0.0
                delta = rewards[i, k] + gamma * next_value - values[i, k]
                total += (gamma * lam) ** (k - t) * delta
            advantages[i, t] = total
            returns[i, t] = total + values[i, t]
    return advantages, returns


def test_kl_penalized_rewards_put_score_on_last_real_token():
    scores = torch.tensor([1.0, -2.0, 0.5])
    logprobs, ref_logprobs = random_like_mask(0), random_like_mask(1)
    rewards, kl = ppo.kl_penalized_rewards(scores, logprobs, ref_logprobs, MASK, kl_coef=0.1)
    torch.testing.assert_close(rewards, naive_rewards(scores, logprobs, ref_logprobs, MASK, 0.1))
    assert torch.all(rewards[MASK == 0] == 0) and torch.all(kl[MASK == 0] == 0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_naive_sum_of_discounted_deltas(gamma, lam):
    rewards = random_like_mask(2)
    values = torch.randn(MASK.shape, generator=torch.Generator().manual_seed(3))  # garbage on padding
    advantages, returns = ppo.compute_gae(rewards, values, MASK, gamma, lam)
    want_adv, want_ret = naive_gae(rewards, values * MASK, MASK, gamma, lam)
    torch.testing.assert_close(advantages, want_adv)
    torch.testing.assert_close(returns, want_ret)


def test_gae_with_lambda_one_and_no_kl_is_score_minus_value():
    values = random_like_mask(4)
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, _ = ppo.kl_penalized_rewards(scores, torch.zeros_like(MASK), torch.zeros_like(MASK), MASK, 0.0)
    advantages, returns = ppo.compute_gae(rewards, values, MASK, 1.0, 1.0)
    torch.testing.assert_close(returns, scores[:, None] * MASK)
    torch.testing.assert_close(advantages, (scores[:, None] - values) * MASK)


def test_masked_whiten_ignores_padding():
    x = random_like_mask(5) + 3.0 * MASK
    x_padded = x + 100.0 * (1 - MASK)  # padding values must not matter
    valid = x[MASK == 1]
    want = (valid - valid.mean()) / valid.std(unbiased=False)
    torch.testing.assert_close(ppo.masked_whiten(x_padded, MASK)[MASK == 1], want, atol=1e-4, rtol=1e-4)
    kept = ppo.masked_whiten(x_padded, MASK, shift_mean=False)[MASK == 1]
    torch.testing.assert_close(kept, want + valid.mean(), atol=1e-4, rtol=1e-4)
    assert torch.all(ppo.masked_whiten(x_padded, MASK)[MASK == 0] == 0)


@pytest.mark.parametrize("script", [ppo, ppo_max], ids=["ppo", "ppo_max"])
def test_explained_variance_and_masked_moments_against_the_real_tokens_alone(script):
    """The masked mean and (biased) variance, and val/explained_variance = 1 - Var(returns - values) / Var(returns)
    (CleanRL's), against plain formulas over the real tokens alone; padding holds garbage, which must not count."""
    values, returns = random_like_mask(3), random_like_mask(4) + 0.5
    garbage = 100.0 * (1 - MASK)
    real = MASK.bool()
    mean, var = script.masked_mean_var(returns + garbage, MASK)
    y = returns[real].tolist()
    naive_mean = sum(y) / len(y)
    assert mean.item() == pytest.approx(naive_mean, abs=1e-6)
    assert var.item() == pytest.approx(sum((v - naive_mean) ** 2 for v in y) / len(y), abs=1e-6)
    residual = (returns - values)[real].tolist()
    naive = 1 - statistics.pvariance(residual) / statistics.pvariance(y)
    assert script.explained_variance(values + garbage, returns, MASK).item() == pytest.approx(naive, abs=1e-5)
    assert script.explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)  # a perfect value model


def test_policy_loss_matches_naive_loop():
    logprobs, old_logprobs = random_like_mask(6) * 0.3, random_like_mask(7) * 0.3
    advantages = random_like_mask(8)
    loss, stats = ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, MASK, cliprange=0.2)
    terms, clipped_count, n = 0.0, 0, 0
    for i in range(MASK.shape[0]):
        for t in range(MASK.shape[1]):
            if MASK[i, t]:
                ratio = math.exp(logprobs[i, t] - old_logprobs[i, t])
                a = advantages[i, t].item()
                unclipped, clipped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
                terms += max(unclipped, clipped)
                clipped_count += clipped > unclipped
                n += 1
    assert loss.item() == pytest.approx(terms / n, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(clipped_count / n)


def test_policy_loss_gradient_vanishes_outside_the_clip_range():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 (clipped) and e^0.05
    loss, _ = ppo.ppo_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0


def test_value_loss_matches_naive_loop():
    values, old_values, returns = random_like_mask(9), random_like_mask(10), random_like_mask(11)
    loss, clipfrac = ppo.ppo_value_loss(values, old_values, returns, MASK, cliprange_value=0.2)
    terms, clipped_count, n = 0.0, 0, 0
    for i in range(MASK.shape[0]):
        for t in range(MASK.shape[1]):
            if MASK[i, t]:
                v, v_old, r = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
                v_clip = v_old + min(max(v - v_old, -0.2), 0.2)
                terms += 0.5 * max((v - r) ** 2, (v_clip - r) ** 2)
                clipped_count += (v_clip - r) ** 2 > (v - r) ** 2
                n += 1
    assert loss.item() == pytest.approx(terms / n, rel=1e-5)
    assert clipfrac.item() == pytest.approx(clipped_count / n)


def test_adaptive_kl_controller_moves_beta_toward_target():
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=12.0, n_episodes=100)  # KL too high: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(current_kl=3.0, n_episodes=100)  # KL too low: error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_ppo_end_to_end_writes_the_contracted_outputs(sft_model, tmp_path):
    out = tmp_path / "ppo"
    run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--total_episodes", "32",
               "--batch_size", "16", "--eval_rows", "16", "--max_new_tokens", "24", "--output_dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward", "kl", "length", "eos_rate", "gold", "well_formed"):
        assert math.isfinite(summary[key]), key
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "objective/kl" in m]
    assert [m["episode"] for m in train] == [16, 32]
    for key in ("objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/clipfrac_avg",
                "eps", "response/length", "response/eos_rate", "gold/reward", "gold/well_formed",
                "val/explained_variance"):
        assert key in train[-1], key
    assert (out / "config.json").exists()
    args = json.loads((out / "args.json").read_text())  # the flags, and the sizes the script derives from them
    assert args["batch_size"] == 16 and args["world_size"] == 1
    assert args["derived"] == {"num_iterations": 2, "local_batch_size": 16, "minibatch_size": 8, "micro_batch_size": 8}


def test_ppo_missing_inputs_fail_with_one_line(tmp_path, sft_model):
    result = run_script("ppo.py", "--sft_model_path", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "a"),
                        check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "sft.py" in result.stderr
    result = run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward_model_path",
                        str(tmp_path / "no_rm"), "--output_dir", str(tmp_path / "b"), check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "reward_model.py" in result.stderr


def test_ppo_length_reward_moves_length_toward_target(sft_model, tmp_path):
    """Learning test: the golden length reward is exact, so PPO must move the mean length to N."""
    out = tmp_path / "ppo_len"
    run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "length", "--target_length", "6",
               "--total_episodes", "384", "--batch_size", "32", "--eval_rows", "64",
               "--max_new_tokens", "32", "--learning_rate", "5e-4", "--output_dir", str(out))
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["initial"]["length_error"], summary["length_error"]
    assert after < 0.6 * before, (before, after)


def test_ppo_bad_flags_and_a_dataset_smaller_than_the_batch(sft_model, tmp_path):
    result = run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "gold", "--eval_every", "0",
                        "--output_dir", str(tmp_path / "c"), check=False)
    assert result.returncode == 2 and result.stderr.strip() == "error: --eval_every must be positive, got 0"
    # 12 prompts, 6 held out: a batch of 16 takes training prompts several times over
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the plot was", "i", "it was not"] * 4))
    out = tmp_path / "ppo"
    run_script("ppo.py", "--sft_model_path", str(sft_model), "--reward", "length", "--dataset_name", str(data),
               "--total_episodes", "32", "--batch_size", "16", "--max_new_tokens", "8", "--output_dir", str(out))
    assert (out / "summary.json").exists()
