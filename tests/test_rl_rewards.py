"""k1.5 length penalty: exact values, the equal-length case, the warm-up schedule."""

import math

import pytest

from moonforge.stages.rl.rewards import LengthPenaltyConfig, length_rewards, length_weight, total_rewards


def test_length_rewards_match_the_formula():
    lengths, rewards = [10, 20, 30, 50], [1, 0, 1, 0]
    lam = [0.5 - (n - 10) / 40 for n in lengths]  # 0.5, 0.25, 0.0, -0.5
    assert length_rewards(lengths, rewards) == pytest.approx([lam[0], min(0, lam[1]), lam[2], min(0, lam[3])])
    assert length_rewards(lengths, rewards) == pytest.approx([0.5, 0.0, 0.0, -0.5])


def test_equal_lengths_give_zero():
    assert length_rewards([7, 7, 7], [1, 0, 1]) == [0.0, 0.0, 0.0]


def test_wrong_short_answer_is_not_rewarded_for_brevity():
    assert length_rewards([5, 100], [0, 1]) == [0.0, -0.5]


def test_warmup_schedule_and_total():
    cfg = LengthPenaltyConfig(weight=0.2, warmup_iterations=3)
    assert [length_weight(i, cfg) for i in range(5)] == [0.0, 0.0, 0.0, 0.2, 0.2]
    assert total_rewards([10, 30], [1, 1], 0, cfg) == [1.0, 1.0]
    assert total_rewards([10, 30], [1, 1], 3, cfg) == pytest.approx([1.1, 0.9])
    assert total_rewards([10, 30], [0, 0], 9, cfg) == pytest.approx([0.0, -0.1])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 lengths but 1 rewards"):
        length_rewards([1, 2], [1])
    with pytest.raises(ValueError, match="non-finite"):
        total_rewards([1, 2], [1.0, math.nan], 0, LengthPenaltyConfig(weight=0.1))
