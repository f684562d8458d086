"""Partial rollouts with a replay buffer (k1.5 sec. 2.6.2), around an injected generator.

Each RL iteration gives every trajectory at most `segment_budget` new tokens. A trajectory that
uses its budget without finishing is parked in the `ReplayBuffer` (prompt, generated-so-far ids and
log-probs, start iteration) and resumed next iteration from exactly where it stopped: its context
is prompt + every generated token so far. Finished trajectories ("stop", "repeat", or "truncated" at
`max_total_tokens`) are returned for training. Each segment remembers the iteration that produced
it; segments older than `max_segment_age` iterations are kept but excluded from the loss.

`GenerateFn(contexts, max_new_tokens) -> [(new_ids, logprobs, finish_reason), ...]`, one per
context, finish_reason "stop" (EOS) or "length" (budget used up). Tests pass a deterministic fake;
the stage passes a wrapper around the model's sampler.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import NonNegativeInt, PositiveInt

from moonforge.stages.config import Frozen
from moonforge.stages.rl.repeat import RepeatConfig, find_repeat

GenerateFn = Callable[[list[list[int]], int], list[tuple[list[int], list[float], str]]]
FINISHED = ("stop", "repeat", "truncated")


class RolloutConfig(Frozen):
    """Token budgets and loss masking of partial rollouts."""

    segment_budget: PositiveInt
    """New tokens per trajectory per iteration; unfinished ones go to the replay buffer."""
    max_total_tokens: PositiveInt | None = None
    """Hard cap on a response over all iterations (long2short RL shrinks it); None = no cap."""
    max_segment_age: NonNegativeInt | None = None
    """Segments produced more than this many iterations ago get in_loss=False; None keeps all."""
    repeat: RepeatConfig | None = RepeatConfig()
    """Tail-loop detection after every segment; None disables it."""


@dataclass
class Segment:
    """Tokens one iteration generated for a trajectory, with their sampling log-probs."""

    ids: list[int]
    logprobs: list[float]
    iteration: int
    in_loss: bool = True


@dataclass
class Trajectory:
    """One response in progress or finished; `ids` is the concatenation of its segments."""

    prompt_id: Hashable
    prompt: list[int]
    start_iteration: int
    segments: list[Segment] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    @property
    def logprobs(self) -> list[float]:
        return [lp for s in self.segments for lp in s.logprobs]

    @property
    def num_generated(self) -> int:
        return sum(len(s.ids) for s in self.segments)

    @property
    def context(self) -> list[int]:
        """What the generator continues from: prompt + everything generated so far."""
        return self.prompt + self.ids

    def loss_mask(self) -> list[bool]:
        """Per generated token: does it count in the loss (its segment's in_loss)."""
        return [s.in_loss for s in self.segments for _ in s.ids]

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first `num_tokens` generated tokens (drops / trims trailing segments)."""
        kept, left = [], num_tokens
        for s in self.segments:
            if left <= 0:
                break
            kept.append(Segment(s.ids[:left], s.logprobs[:left], s.iteration, s.in_loss))
            left -= len(s.ids)
        self.segments = kept


class ReplayBuffer:
    """FIFO of unfinished trajectories waiting for their next segment."""

    def __init__(self) -> None:
        self._items: list[Trajectory] = []

    def __len__(self) -> int:
        return len(self._items)

    def push(self, traj: Trajectory) -> None:
        self._items.append(traj)

    def drain(self) -> list[Trajectory]:
        """Remove and return everything, oldest first."""
        items, self._items = self._items, []
        return items


def _extend(
    traj: Trajectory, out: tuple[list[int], list[float], str], budget: int, iteration: int, cfg: RolloutConfig
) -> None:
    ids, lps, reason = list(out[0]), [float(x) for x in out[1]], out[2]
    if len(ids) != len(lps) or len(ids) > budget:
        raise ValueError(
            f"generate_fn returned {len(ids)} ids / {len(lps)} logprobs for a budget of {budget}"
        )
    if reason not in ("stop", "length", "repeat"):
        raise ValueError(f"generate_fn finish_reason {reason!r}; expected 'stop', 'length' or 'repeat'")
    if reason == "length" and not ids:
        raise ValueError("generate_fn made no progress (0 tokens, reason 'length'): it would loop forever")
    traj.segments.append(Segment(ids, lps, iteration))
    if cfg.repeat is not None and reason != "stop":
        hit = find_repeat(traj.ids, cfg.repeat)
        if hit is not None:
            traj.truncate(hit[0])
            reason = "repeat"
    if reason == "length" and cfg.max_total_tokens and traj.num_generated >= cfg.max_total_tokens:
        reason = "truncated"
    traj.finish_reason = None if reason == "length" else reason


def rollout_step(
    prompts: Sequence[tuple[Hashable, list[int]]],
    buffer: ReplayBuffer,
    generate_fn: GenerateFn,
    iteration: int,
    cfg: RolloutConfig,
) -> list[Trajectory]:
    """Run one iteration: resume buffered trajectories, start `prompts`, return the finished ones.

    Unfinished trajectories are pushed back into `buffer`. Returned trajectories have their
    segments' in_loss set from `max_segment_age` relative to `iteration`.
    """
    active = buffer.drain() + [Trajectory(pid, list(p), iteration) for pid, p in prompts]
    by_budget: dict[int, list[Trajectory]] = {}
    for t in active:
        left = cfg.max_total_tokens - t.num_generated if cfg.max_total_tokens else cfg.segment_budget
        by_budget.setdefault(min(cfg.segment_budget, left), []).append(t)
    for budget, group in by_budget.items():
        outs = generate_fn([t.context for t in group], budget)
        if len(outs) != len(group):
            raise ValueError(f"generate_fn returned {len(outs)} results for {len(group)} contexts")
        for t, out in zip(group, outs):
            _extend(t, out, budget, iteration, cfg)
    finished = []
    for t in active:
        if t.finish_reason is None:
            buffer.push(t)
            continue
        for s in t.segments:
            s.in_loss = cfg.max_segment_age is None or iteration - s.iteration <= cfg.max_segment_age
        finished.append(t)
    return finished


def training_tensors(trajs: Sequence[Trajectory], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids_BL, response_mask_BL) for `sequence_logprobs`: prompt + response, right-padded.

    The mask is True on generated tokens whose segment is in the loss.
    """
    if not trajs:
        raise ValueError("no finished trajectories to build a training batch from")
    rows = [(t.prompt + t.ids, [False] * len(t.prompt) + t.loss_mask()) for t in trajs]
    width = max(len(ids) for ids, _ in rows)
    ids_BL = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, (ids, mask) in enumerate(rows):
        ids_BL[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask_BL[b, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return ids_BL, mask_BL


def long_tailed_lengths(
    n: int, median: float, sigma: float, max_len: int, seed: int, min_len: int = 1
) -> list[int]:
    """`n` response lengths from a log-normal (median `median`, log-std `sigma`) clipped to
    [min_len, max_len]: most short, a few very long, as RL rollouts are. Seeded."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(max_len, max(min_len, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]
