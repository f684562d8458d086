"""LR multipliers: linear warmup from start_ratio, then constant / cosine / linear decay to min_ratio.

A re-warm (SFT phase 2, long-context) is a new phase with its own schedule; the multiplier is always
relative to that phase's peak LR.
"""

from __future__ import annotations

import math

from moonforge.stages.config import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, num_steps: int) -> int:
    if cfg.warmup_frac is not None:
        return int(cfg.warmup_frac * num_steps)
    return min(cfg.warmup_steps, max(num_steps - 1, 0))


def lr_multiplier(step: int, num_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier for the optimizer step `step` (0-based) of a phase with `num_steps` steps.

    >>> lr_multiplier(0, 100, ScheduleConfig(kind="cosine", warmup_steps=10))
    0.0
    """
    warm = warmup_steps(cfg, num_steps)
    if step < warm:
        return cfg.start_ratio + (1.0 - cfg.start_ratio) * step / warm
    if cfg.kind == "constant":
        return 1.0
    span = max(num_steps - 1 - warm, 1)
    t = min(max(step - warm, 0) / span, 1.0)
    if cfg.kind == "cosine":
        return cfg.min_ratio + (1.0 - cfg.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0 - (1.0 - cfg.min_ratio) * t
