"""Prompt sampling for RL (k1.5 sec. 2.3.4): curriculum and prioritized sampling, seeded.

Difficulty labels are floats where larger = harder (e.g. 1 - SFT pass rate from 10 samples). The
curriculum samples uniformly over every prompt for `warmup_iterations`, then only over prompts with
difficulty >= `hard_threshold` (k1.5 Fig. 9 switches at iteration 24). Prioritized sampling weights
each eligible prompt by max(1 - s_i, floor), s_i its running success rate (unseen prompts: s = 0);
the floor keeps solved prompts at a small, non-zero probability. Both compose: the curriculum picks
the eligible set, the priorities weight it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, NonNegativeInt

from moonforge.stages.config import Frozen


class SamplerConfig(Frozen):
    """Which prompts an RL iteration draws, and with what probability."""

    use_curriculum: bool = True
    """Uniform warm-up over all prompts, then only hard ones."""
    warmup_iterations: NonNegativeInt = 0
    """Iterations (0-based) that sample from every prompt before the switch to hard only."""
    hard_threshold: float = 0.5
    """A prompt is hard when its difficulty >= this."""
    use_priority: bool = True
    """Weight prompts by 1 - running success rate."""
    priority_floor: float = Field(0.05, gt=0.0, le=1.0)
    """Minimum weight, so a fully solved prompt keeps a small probability."""
    success_decay: float | None = Field(None, gt=0.0, lt=1.0)
    """None: s_i is the cumulative success rate; else an EMA s <- d * s + (1 - d) * mean reward."""
    replacement: bool = False
    """Draw a batch with replacement (otherwise distinct prompts while enough are eligible)."""


class SuccessTracker:
    """Running success rate per prompt index (cumulative mean, or an EMA with `decay`)."""

    def __init__(self, num_prompts: int, decay: float | None = None) -> None:
        self.decay = decay
        self.rate = [0.0] * num_prompts
        self.count = [0] * num_prompts

    def update(self, prompt: int, rewards: Sequence[float]) -> None:
        """Fold one group's rewards (clipped to [0, 1]) into prompt's success rate."""
        if not rewards:
            return
        batch = sum(min(1.0, max(0.0, float(r))) for r in rewards) / len(rewards)
        if self.decay is None:
            n = self.count[prompt]
            self.rate[prompt] = (self.rate[prompt] * n + batch * len(rewards)) / (n + len(rewards))
        elif self.count[prompt] == 0:
            self.rate[prompt] = batch
        else:
            self.rate[prompt] = self.decay * self.rate[prompt] + (1 - self.decay) * batch
        self.count[prompt] += len(rewards)


class PromptSampler:
    """Seeded prompt sampler; `probabilities(i)` is the exact distribution `sample(i, n)` draws."""

    def __init__(self, difficulties: Sequence[float], cfg: SamplerConfig, seed: int) -> None:
        if not difficulties:
            raise ValueError("PromptSampler needs at least one prompt")
        self.difficulty = torch.tensor([float(d) for d in difficulties], dtype=torch.float64)
        self.cfg = cfg
        self.tracker = SuccessTracker(len(difficulties), cfg.success_decay)
        self.generator = torch.Generator().manual_seed(seed)

    def eligible(self, iteration: int) -> torch.Tensor:
        """Bool mask of prompts the curriculum allows at `iteration`."""
        if not self.cfg.use_curriculum or iteration < self.cfg.warmup_iterations:
            return torch.ones_like(self.difficulty, dtype=torch.bool)
        mask = self.difficulty >= self.cfg.hard_threshold
        if not mask.any():
            raise ValueError(
                f"curriculum: no prompt has difficulty >= {self.cfg.hard_threshold} "
                "after warm-up; lower hard_threshold or add hard prompts"
            )
        return mask

    def probabilities(self, iteration: int) -> torch.Tensor:
        """P(i) at `iteration`: (num_prompts,) float64 summing to 1."""
        weight = self.eligible(iteration).to(torch.float64)
        if self.cfg.use_priority:
            rate = torch.tensor(self.tracker.rate, dtype=torch.float64)
            weight = weight * (1.0 - rate).clamp(min=self.cfg.priority_floor)
        return weight / weight.sum()

    def sample(self, iteration: int, n: int) -> list[int]:
        """Draw `n` prompt indices; distinct unless replacement=True or too few are eligible."""
        probs = self.probabilities(iteration)
        replace = self.cfg.replacement or n > int((probs > 0).sum())
        return torch.multinomial(probs, n, replacement=replace, generator=self.generator).tolist()

    def update(self, prompt: int, rewards: Sequence[float]) -> None:
        """Record one group's rewards for `prompt` (moves its priority)."""
        self.tracker.update(prompt, rewards)
