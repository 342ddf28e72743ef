"""The length-stratified reward gain (Singhal et al. 2023) on a hand-computed example."""

import pytest

import common


def test_length_stratified_gain_hand_example():
    # bins of 10 tokens: bin 0 holds base 1.0 and policy 2.0 (gain 1, 2 responses); bin 1 holds
    # base 2.0 and policy 5.0 (gain 3, 2 responses); bin 2 has only a policy response: skipped.
    result = common.length_stratified_gain([1.0, 2.0], [3, 12], [2.0, 5.0, 6.0], [4, 13, 25], bin_width=10)
    assert result["length_stratified_gain"] == pytest.approx((2 * 1 + 2 * 3) / 4)
    assert result["reward_gain"] == pytest.approx(13 / 3 - 1.5)
    assert result["length_share"] == pytest.approx(1 - 2.0 / (13 / 3 - 1.5))


def test_pure_length_gain_has_share_one():
    # The policy is longer, and within each length the reward is unchanged: all of the gain is length.
    base = ([0.0, 0.0, 1.0], [2, 3, 12])
    policy = ([1.0, 1.0, 1.0], [11, 14, 15])
    result = common.length_stratified_gain(*base, *policy, bin_width=10)
    assert result["length_stratified_gain"] == pytest.approx(0.0)
    assert result["length_share"] == pytest.approx(1.0)
