"""Repeat detection for rollouts (k1.5 sec. 2.6.2): stop degenerate loops early, optionally penalise.

A generation "repeats" when its tail is periodic: for some period p <= max_period, the suffix in
which ids[j] == ids[j - p] holds spans at least `min_repeats` copies of the period and at least
`min_span` tokens. This covers an n-gram repeated m times back to back, including a tail that stops
mid-copy ("abcabcabcab"). The cut keeps everything before the loop plus ONE copy of the period.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from moonforge.stages.config import Frozen


class RepeatConfig(Frozen):
    """When a rollout's tail counts as a loop, and what it costs."""

    max_period: PositiveInt = 32
    """Longest repeated n-gram (period, in tokens) looked for."""
    min_repeats: int = Field(4, ge=2)
    """Consecutive copies of the period needed to call it a loop."""
    min_span: NonNegativeInt = 16
    """Minimum tokens covered by the loop (keeps "0000" in a number from tripping p=1)."""
    penalty: NonNegativeFloat = 0.0
    """Subtracted from the reward of a trajectory that was cut for repeating (0 = no penalty)."""


def periodic_tail(ids: Sequence[int], period: int) -> int:
    """Length of the longest suffix of `ids` with the given period (>= period when len >= period)."""
    n = len(ids)
    if n < period:
        return n
    run = 0
    while run < n - period and ids[n - 1 - run] == ids[n - 1 - run - period]:
        run += 1
    return run + period


def find_repeat(ids: Sequence[int], cfg: RepeatConfig) -> tuple[int, int] | None:
    """(cut, period) for the smallest period whose tail loop qualifies, else None.

    `ids[:cut]` is the generation without the loop (one copy kept).

    >>> find_repeat([9, 1, 2, 1, 2, 1, 2, 1, 2], RepeatConfig(min_repeats=4, min_span=0))
    (3, 2)
    """
    n = len(ids)
    for p in range(1, min(cfg.max_period, n // cfg.min_repeats) + 1):
        span = periodic_tail(ids, p)
        if span >= cfg.min_repeats * p and span >= cfg.min_span:
            return n - span + p, p
    return None


def repeat_penalty(reward: float, repeated: bool, cfg: RepeatConfig) -> float:
    """The reward after the optional repeat penalty (unchanged when not repeated)."""
    return reward - cfg.penalty if repeated else reward
