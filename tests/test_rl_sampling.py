"""Prompt sampling: curriculum switch, prioritized distribution, floor, determinism."""

from collections import Counter

import pytest

from moonforge.stages.rl.sampling import PromptSampler, SamplerConfig, SuccessTracker

DIFF = [0.1, 0.2, 0.6, 0.9]  # prompts 2 and 3 are hard at threshold 0.5


def test_curriculum_uniform_then_hard_only():
    cfg = SamplerConfig(warmup_iterations=3, hard_threshold=0.5, use_priority=False, replacement=True)
    s = PromptSampler(DIFF, cfg, seed=0)
    assert s.probabilities(0).tolist() == [0.25] * 4
    assert s.probabilities(2).tolist() == [0.25] * 4
    assert s.probabilities(3).tolist() == [0.0, 0.0, 0.5, 0.5]
    assert set(s.sample(3, 500)) == {2, 3}
    assert set(s.sample(0, 500)) == {0, 1, 2, 3}


def test_prioritized_distribution_matches_within_tolerance():
    cfg = SamplerConfig(use_curriculum=False, priority_floor=0.05, replacement=True)
    s = PromptSampler(DIFF, cfg, seed=1)
    s.update(0, [1, 1, 1, 1])  # solved -> floor 0.05
    s.update(1, [1, 0, 1, 0])  # s=0.5 -> 0.5
    s.update(2, [0, 0, 0, 1])  # s=0.25 -> 0.75; prompt 3 unseen -> 1.0
    w = [0.05, 0.5, 0.75, 1.0]
    want = [x / sum(w) for x in w]
    assert s.probabilities(0).tolist() == pytest.approx(want)
    n = 40000
    counts = Counter(s.sample(0, n))
    for i in range(4):
        assert counts[i] / n == pytest.approx(want[i], abs=0.01)
    assert counts[0] > 0  # the floor keeps a solved prompt alive


def test_curriculum_and_priority_compose():
    cfg = SamplerConfig(warmup_iterations=0, hard_threshold=0.5)
    s = PromptSampler(DIFF, cfg, seed=0)
    s.update(2, [1, 1])
    assert s.probabilities(5).tolist() == pytest.approx([0, 0, 0.05 / 1.05, 1 / 1.05])


def test_seeded_and_distinct_without_replacement():
    cfg = SamplerConfig(use_curriculum=False)
    a = PromptSampler(DIFF, cfg, seed=7)
    b = PromptSampler(DIFF, cfg, seed=7)
    draws_a = [a.sample(i, 3) for i in range(5)]
    assert draws_a == [b.sample(i, 3) for i in range(5)]
    assert all(len(set(d)) == 3 for d in draws_a)


def test_success_tracker_cumulative_and_ema():
    t = SuccessTracker(1)
    t.update(0, [1, 0])
    t.update(0, [1, 1])
    assert t.rate[0] == pytest.approx(0.75)
    e = SuccessTracker(1, decay=0.5)
    e.update(0, [1, 1])
    e.update(0, [0, 0])
    assert e.rate[0] == pytest.approx(0.5)


def test_no_hard_prompts_is_a_clear_error():
    s = PromptSampler([0.1, 0.2], SamplerConfig(hard_threshold=0.5), seed=0)
    with pytest.raises(ValueError, match="no prompt has difficulty >= 0.5"):
        s.sample(0, 1)
