"""rcfd.py: calibrated reward, whitening and the alignment metric against naive loops; demonstration
rewards scored once; flags checked in-process; an end-to-end run, and a run killed with kill -9 and
resumed that ends as the uninterrupted one."""

import json
import math

import pytest
import torch
from conftest import assert_same_run, kill_9_after, run_main, run_script

import rcfd


def naive_whiten(column: list[float]) -> list[float]:
    mean = sum(column) / len(column)
    std = math.sqrt(sum((v - mean) ** 2 for v in column) / len(column))
    return [(v - mean) / std for v in column]


def test_whiten_matches_naive_loop_per_column():
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 10.0, 0.1]) + 5
    got = rcfd.whiten(x)
    for k in range(3):
        torch.testing.assert_close(got[:, k], torch.tensor(naive_whiten(x[:, k].tolist())), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rcfd.whiten(x[:, 1]), got[:, 1])  # a 1-D batch is one column


def test_calibrated_reward_matches_naive_loop_with_several_components():
    gen = torch.Generator().manual_seed(1)
    scores, demo_scores = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    scores[:, 2] *= 50  # a component on another scale must not dominate: each is whitened
    want = [0.0] * 6
    for k in range(3):
        calibrated = [-(scores[i, k].item() - demo_scores[i, k].item()) ** 2 for i in range(6)]
        for i, value in enumerate(naive_whiten(calibrated)):
            want[i] += value
    torch.testing.assert_close(rcfd.calibrated_reward(scores, demo_scores), torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_calibrated_reward_prefers_the_demonstrations_reward_not_the_maximum():
    demo = torch.full((4, 1), 1.0)
    scores = torch.tensor([[1.0], [1.5], [3.0], [-1.0]])  # exact match, close, over-optimized, under
    reward = rcfd.calibrated_reward(scores, demo)
    assert reward.argmax() == 0 and reward[1] > reward[2] and reward[2] == reward[3]


def naive_alignment_kl(demo: list[float], policy: list[float], bins: int, eps: float) -> float:
    lo, hi = min(demo + policy), max(demo + policy)
    edges = [lo + (hi - lo) * b / bins for b in range(bins + 1)]

    def histogram(values):
        counts = [0] * bins
        for v in values:
            for b in range(bins):  # [edge_b, edge_b+1), the last bin closed on the right
                if edges[b] <= v < edges[b + 1] or (b == bins - 1 and v == hi):
                    counts[b] += 1
                    break
        p = [c / len(values) + eps for c in counts]
        return [v / sum(p) for v in p]

    p, q = histogram(demo), histogram(policy)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.mark.parametrize("bins", [1, 4, 10])
def test_alignment_kl_matches_naive_histograms(bins):
    gen = torch.Generator().manual_seed(2)
    demo, policy = torch.randn(50, generator=gen), torch.randn(40, generator=gen) * 2 + 1
    got = rcfd.alignment_kl(demo, policy, bins, eps=1e-6)
    assert got == pytest.approx(naive_alignment_kl(demo.tolist(), policy.tolist(), bins, 1e-6), rel=1e-6, abs=1e-9)


def test_alignment_kl_hand_example():
    # edges 0, 1, 2 (2 bins): demo histogram (1/2, 1/2), policy (1/4, 3/4)
    demo, policy = torch.tensor([0.0, 0.5, 1.5, 2.0]), torch.tensor([0.2, 1.2, 1.7, 1.9])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert rcfd.alignment_kl(demo, policy, bins=2, eps=0.0) == pytest.approx(want)
    assert rcfd.alignment_kl(demo, demo, bins=2) == pytest.approx(0.0, abs=1e-12)
    assert rcfd.alignment_kl(demo, torch.full((4,), 7.0), bins=5) > 5  # collapsed far away: large, finite


def test_demo_rewards_scores_each_demonstration_once():
    rows = [{"prompt": f"p{i}", "completion": "x" * i} for i in range(10)]
    scored: list[str] = []

    def score_fn(prompts, completions):
        scored.extend(prompts)
        return torch.tensor([[len(c), -len(c)] for c in completions], dtype=torch.float)

    cache: dict[int, torch.Tensor] = {}
    first = rcfd.demo_rewards([3, 1, 3, 7], rows, cache, score_fn, batch_size=2)
    torch.testing.assert_close(first, torch.tensor([[3.0, -3.0], [1.0, -1.0], [3.0, -3.0], [7.0, -7.0]]))
    second = rcfd.demo_rewards([7, 0, 1, 9], rows, cache, score_fn, batch_size=2)
    torch.testing.assert_close(second[:, 0], torch.tensor([7.0, 0.0, 1.0, 9.0]))
    assert sorted(scored) == ["p0", "p1", "p3", "p7", "p9"]  # each once, whatever the repeats


def flags(sft_model) -> list[str]:
    """Three reward components; four iterations with a checkpoint after every one."""
    return ["--sft_model_path", str(sft_model), "--rewards", "gold", "length", "loglik", "--total_episodes", "64",
            "--batch_size", "16", "--eval_rows", "16", "--eval_every", "2", "--save_every", "1",
            "--max_new_tokens", "24", "--kl_coef", "0.1"]


@pytest.fixture(scope="module")
def full_run(sft_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("rcfd") / "full"
    run_script("rcfd.py", *flags(sft_model), "--output_dir", str(out), threads=1)
    return out


def test_rcfd_end_to_end_writes_the_contracted_outputs(full_run):
    out = full_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("reward", "kl", "length", "eos_rate", "gold", "well_formed", "demo_reward", "alignment_kl",
                "reward_length", "demo_reward_length", "length_error", "reward_loglik", "alignment_kl_loglik"):
        assert math.isfinite(summary[key]), key
    assert summary["demo_reward"] == pytest.approx(summary["demo_gold"])  # the first component is gold
    assert summary["reward"] == pytest.approx(summary["gold"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "objective/kl" in m]
    assert [m["episode"] for m in train] == [16, 32, 48, 64]
    for key in ("objective/entropy", "objective/scores", "objective/demo_scores", "objective/calibrated",
                "objective/calibrated_length", "alignment/kl", "policy/approxkl_avg", "policy/clipfrac_avg",
                "loss/policy_avg", "val/ratio", "eps", "response/length", "response/eos_rate",
                "objective/scores_length", "gold/reward", "gold/well_formed"):
        assert key in train[-1], key
    for name in ("samples", "initial_samples"):
        samples = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(samples) == 16 and all(s["score"] == pytest.approx(s["gold"], abs=1e-5) for s in samples)
    assert (out / "args.json").exists() and (out / "config.json").exists()


def test_rcfd_killed_and_resumed_ends_as_the_uninterrupted_run(sft_model, full_run, tmp_path):
    """kill -9 mid-run, then --resume: the demonstrations' cached rewards come back with the checkpoint."""
    cut = tmp_path / "cut"
    # 3 lines: the initial evaluation, steps 1 and 2; step 1's checkpoint was written before step 2's line
    kill_9_after("rcfd.py", *flags(sft_model), out=cut, lines=3)
    loop = torch.load(cut / "checkpoint.pt", weights_only=False)["loop"]
    assert len(loop["demo_cache"]) >= 16 and loop["step"] < 4
    run_script("rcfd.py", *flags(sft_model), "--output_dir", str(cut), "--resume", threads=1)

    assert_same_run(full_run, cut)


@pytest.mark.parametrize("flags, says", [
    (["--rewards", "gold", "gold"], "--rewards gold gold: name each component once"),
    (["--kl_coef", "-0.1"], "--kl_coef must be at least 0, got -0.1"),
    (["--missing_eos_margin", "-1"], "--missing_eos_margin must be at least 0, got -1.0"),
    (["--alignment_bins", "0"], "--alignment_bins must be positive, got 0"),
    (["--cliprange", "0"], "--cliprange must be positive, got 0.0"),
    (["--num_mini_batches", "0"], "--num_mini_batches must be positive, got 0"),
    (["--eval_every", "0"], "--eval_every must be positive, got 0"),
    (["--eval_rows", "0"], "--eval_rows must be positive, got 0"),
    (["--target_length", "0"], "--target_length must be positive, got 0"),
    (["--total_episodes", "8", "--batch_size", "16"], "--total_episodes 8 must be at least --batch_size 16"),
])
def test_rcfd_bad_flags_are_one_line_errors(flags, says, tmp_path, capsys):
    assert run_main("rcfd.py", *flags, "--output_dir", str(tmp_path / "run")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_rcfd_missing_sft_model_fails_with_one_line(tmp_path, capsys):
    assert run_main("rcfd.py", "--sft_model_path", str(tmp_path / "nope"), "--rewards", "gold",
                    "--output_dir", str(tmp_path / "run")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "sft.py" in lines[0]


def test_rcfd_dataset_without_demonstrations_fails_with_one_line(sft_model, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the movie was {w}"}) + "\n" for w in ("good", "bad") * 4))
    assert run_main("rcfd.py", "--sft_model_path", str(sft_model), "--rewards", "gold", "--dataset_name", str(data),
                    "--output_dir", str(tmp_path / "out")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "demonstration" in lines[0]
