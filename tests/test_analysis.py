"""benchmark/analysis.py: the length-stratified reward gain (Singhal et al. 2023), on hand-computed
examples, against a naive loop over bins, and from a run folder's samples."""

import json
import math
import random
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
import analysis  # benchmark/analysis.py


def test_length_stratified_gain_hand_example() -> None:
    # bins of 10 tokens: bin 0 holds base 1.0 and policy 2.0 (gain 1, 2 responses); bin 1 holds
    # base 2.0 and policy 5.0 (gain 3, 2 responses); bin 2 has only a policy response: skipped.
    result = analysis.length_stratified_gain([1.0, 2.0], [3, 12], [2.0, 5.0, 6.0], [4, 13, 25], bin_width=10)
    assert result["length_stratified_gain"] == pytest.approx((2 * 1 + 2 * 3) / 4)
    assert result["reward_gain"] == pytest.approx(13 / 3 - 1.5)
    assert result["length_share"] == pytest.approx(1 - 2.0 / (13 / 3 - 1.5))


def test_pure_length_gain_has_share_one() -> None:
    # The policy is longer, and within each length the reward is unchanged: all of the gain is length.
    base = ([0.0, 0.0, 1.0], [2, 3, 12])
    policy = ([1.0, 1.0, 1.0], [11, 14, 15])
    result = analysis.length_stratified_gain(*base, *policy, bin_width=10)
    assert result["length_stratified_gain"] == pytest.approx(0.0)
    assert result["length_share"] == pytest.approx(1.0)


def test_policy_weights_count_only_the_trained_responses() -> None:
    # bin 0: 1 base and 3 policy responses, gain 1; bin 1: 3 base and 1 policy response, gain 3.
    base = ([0.0, 0.0, 0.0, 0.0], [1, 11, 12, 13])
    policy = ([1.0, 1.0, 1.0, 3.0], [2, 3, 4, 15])
    both = analysis.length_stratified_gain(*base, *policy, bin_width=10, weights="both")
    assert both["length_stratified_gain"] == pytest.approx((4 * 1 + 4 * 3) / 8)
    mine = analysis.length_stratified_gain(*base, *policy, bin_width=10)  # the default: the policy's counts
    assert mine["length_stratified_gain"] == pytest.approx((3 * 1 + 1 * 3) / 4)
    assert mine["reward_gain"] == both["reward_gain"] == pytest.approx(1.5)


def test_no_shared_bin_and_no_gain_give_nan() -> None:
    disjoint = analysis.length_stratified_gain([0.0], [1], [1.0], [30], bin_width=5)
    assert disjoint["reward_gain"] == 1.0 and math.isnan(disjoint["length_stratified_gain"])
    assert math.isnan(disjoint["length_share"])
    assert math.isnan(analysis.length_stratified_gain([1.0], [1], [1.0], [2])["length_share"])


def naive_gain(base: list[tuple[float, int]], policy: list[tuple[float, int]], width: int, weights: str) -> float:
    """The stratified gain bin by bin, from the definition: for every bin that both fill, the
    difference of the two means, weighted by the bin's counts."""
    total = weight = 0.0
    for b in range(max(n for _, n in base + policy) // width + 1):
        base_in = [r for r, n in base if b * width <= n < (b + 1) * width]
        policy_in = [r for r, n in policy if b * width <= n < (b + 1) * width]
        if base_in and policy_in:
            w = len(policy_in) + (len(base_in) if weights == "both" else 0)
            total += w * (sum(policy_in) / len(policy_in) - sum(base_in) / len(base_in))
            weight += w
    return total / weight


@pytest.mark.parametrize("weights", ["both", "policy"])
@pytest.mark.parametrize("width", [1, 2, 5])
def test_length_stratified_gain_matches_a_naive_loop(width: int, weights: str) -> None:
    rng = random.Random(width)
    base = [(rng.gauss(0, 1), rng.randint(0, 30)) for _ in range(200)]
    policy = [(rng.gauss(0.5, 1) + 0.05 * n, n) for n in (rng.randint(5, 40) for _ in range(150))]
    result = analysis.length_stratified_gain([r for r, _ in base], [n for _, n in base], [r for r, _ in policy],
                                             [n for _, n in policy], width, weights)
    assert result["length_stratified_gain"] == pytest.approx(naive_gain(base, policy, width, weights))
    total = sum(r for r, _ in policy) / len(policy) - sum(r for r, _ in base) / len(base)
    assert result["length_share"] == pytest.approx(1 - result["length_stratified_gain"] / total)


def write_samples(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def sample(score: float, length: int, gold: float | None = None) -> dict:
    """A line of samples.jsonl as the RL scripts write it (gold and well_formed on toy only)."""
    row = {"index": 0, "prompt": "it was", "response": "good .", "score": score, "kl": 0.0, "length": length,
           "eos": True}
    return row | ({"gold": gold, "well_formed": 1.0} if gold is not None else {})


def test_run_gains_read_a_run_folder_on_the_reward_and_on_gold(tmp_path: Path) -> None:
    write_samples(tmp_path / "initial_samples.jsonl", [sample(1.0, 3, gold=0.5), sample(2.0, 12, gold=0.0)])
    write_samples(tmp_path / "samples.jsonl", [sample(2.0, 4, gold=1.0), sample(5.0, 13, gold=0.0),
                                               sample(6.0, 25, gold=-1.0)])
    gains = analysis.run_gains(tmp_path, bin_width=10)
    assert gains["reward"] == analysis.length_stratified_gain([1.0, 2.0], [3, 12], [2.0, 5.0, 6.0], [4, 13, 25], 10)
    assert gains["gold"] == analysis.length_stratified_gain([0.5, 0.0], [3, 12], [1.0, 0.0, -1.0], [4, 13, 25], 10)
    write_samples(tmp_path / "samples.jsonl", [sample(2.0, 4)])  # not the toy world: no gold
    assert list(analysis.run_gains(tmp_path)) == ["reward"]


def run_cli(monkeypatch, *args: str) -> int:
    """Run `python benchmark/analysis.py ARGS` in this process; its exit status (0 if it ran to the end)."""
    monkeypatch.setattr(sys, "argv", ["analysis.py", *args])
    try:
        runpy.run_path(str(ROOT / "benchmark" / "analysis.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


def test_command_line_prints_both_gains_and_refuses_a_folder_without_samples(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    write_samples(tmp_path / "initial_samples.jsonl", [sample(1.0, 3, gold=0.5), sample(2.0, 12, gold=0.0)])
    write_samples(tmp_path / "samples.jsonl", [sample(2.0, 4, gold=1.0), sample(5.0, 13, gold=0.0)])
    assert run_cli(monkeypatch, str(tmp_path), "--bin_width", "10", "--weights", "policy") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["reward: reward_gain=2 length_stratified_gain=2 length_share=0",
                   "gold: reward_gain=0.25 length_stratified_gain=0.25 length_share=0"]
    assert run_cli(monkeypatch, str(tmp_path / "missing")) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'missing' / 'initial_samples.jsonl'} not found")
    assert run_cli(monkeypatch, str(tmp_path), "--bin_width", "0") == 2
