"""The k1.5 length reward (sec. 2.3.3) and its warm-up schedule.

For the k samples of one prompt, with min_len / max_len over those k:
    lambda_i      = 0.5 - (len_i - min_len) / (max_len - min_len)      (0 for all if max == min)
    len_reward_i  = lambda_i            if sample i is correct (r_i = 1)
                  = min(0, lambda_i)    otherwise
    r_total_i     = r_i + w_len * len_reward_i
The weight is 0 for the first `warmup_iterations` RL iterations, then the constant `weight`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydantic import NonNegativeFloat, NonNegativeInt

from moonforge.stages.config import Frozen


class LengthPenaltyConfig(Frozen):
    """Length reward: off during warm-up, then a constant weight (k1.5)."""

    weight: NonNegativeFloat
    """w_len once active (k1.5 leaves it unspecified; 0.1-0.5 is a sane range; 0 disables)."""
    warmup_iterations: NonNegativeInt = 0
    """RL iterations (0-based) before the penalty switches on."""


def length_weight(iteration: int, cfg: LengthPenaltyConfig) -> float:
    """w_len at 0-based `iteration`: 0 while iteration < warmup_iterations, else cfg.weight."""
    return 0.0 if iteration < cfg.warmup_iterations else cfg.weight


def length_rewards(lengths: Sequence[int], rewards: Sequence[float]) -> list[float]:
    """Per-sample len_reward for one prompt's k samples (a sample is correct iff its reward is 1).

    >>> length_rewards([10, 20, 30], [1, 1, 0])
    [0.5, 0.0, -0.5]
    """
    if len(lengths) != len(rewards):
        raise ValueError(f"{len(lengths)} lengths but {len(rewards)} rewards for one prompt group")
    if not lengths:
        raise ValueError("length_rewards needs at least one sample")
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, r in zip(lengths, rewards):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if r == 1 else min(0.0, lam))
    return out


def total_rewards(
    lengths: Sequence[int], rewards: Sequence[float], iteration: int, cfg: LengthPenaltyConfig
) -> list[float]:
    """r_total_i = r_i + w_len(iteration) * len_reward_i for one prompt group; NaN rewards raise."""
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"non-finite rewards {bad} in a prompt group; fix the verifier / RM first")
    w = length_weight(iteration, cfg)
    return [float(r) + w * lr for r, lr in zip(rewards, length_rewards(lengths, rewards))]
