"""long2short by preference (k1.5 sec. 2.4): DPO pairs, the DPO loss, shortest rejection sampling.

For each question, from responses sampled by the long-CoT model:
    chosen   y_w = the shortest correct response (first one on a length tie)
    rejected y_l = every wrong response longer than y_w, and
                   every correct response with length >= long_factor * len(y_w)  (k1.5: 1.5)
Each (y_w, y_l) is one pair; a question with no correct response gives no pairs.
    L_DPO = -mean log sigmoid(beta * [(logp_w - ref_w) - (logp_l - ref_l)])
with summed response log-probs under the policy (logp) and the frozen starting model (ref).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor

from moonforge.stages.config import Frozen


class DPOConfig(Frozen):
    """DPO pair construction and loss."""

    beta: PositiveFloat = 0.1
    """Inverse temperature of the implicit reward (k1.5 unspecified; TRL/torchtune default 0.1)."""
    long_factor: float = Field(1.5, gt=1.0)
    """A correct response this many times longer than the chosen one is also rejected."""


@dataclass(frozen=True)
class Sample:
    """One sampled response: its content (text or ids), length in tokens, and correctness."""

    content: Any
    length: int
    correct: bool


@dataclass(frozen=True)
class DPOPair:
    question: Hashable
    chosen: Sample
    rejected: Sample


def shortest_correct(samples: Sequence[Sample]) -> Sample | None:
    """Shortest rejection sampling: the shortest correct sample (first on ties), None if none."""
    correct = [s for s in samples if s.correct]
    return min(correct, key=lambda s: s.length) if correct else None


def question_pairs(question: Hashable, samples: Sequence[Sample], long_factor: float = 1.5) -> list[DPOPair]:
    """The DPO pairs of one question, rejected in sample order (see module docstring)."""
    if long_factor <= 1.0:
        raise ValueError(f"long_factor={long_factor} must be > 1 or the chosen response rejects itself")
    chosen = shortest_correct(samples)
    if chosen is None:
        return []
    out = []
    for s in samples:
        if s is chosen:
            continue
        wrong_longer = not s.correct and s.length > chosen.length
        correct_too_long = s.correct and s.length >= long_factor * chosen.length
        if wrong_longer or correct_too_long:
            out.append(DPOPair(question, chosen, s))
    return out


def build_dpo_pairs(by_question: Mapping[Any, Sequence[Sample]], long_factor: float = 1.5) -> list[DPOPair]:
    """All pairs over questions, in question order."""
    return [p for q, samples in by_question.items() for p in question_pairs(q, samples, long_factor)]


def dpo_loss(
    logp_w: Tensor, logp_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
) -> tuple[Tensor, dict[str, float]]:
    """DPO loss over P pairs (all inputs (P,) summed log-probs; refs are detached).

    Metrics: mean implicit-reward margin and the fraction of pairs the policy already prefers.
    """
    if logp_w.numel() == 0:
        raise ValueError("empty DPO batch: no pairs (did every question lack a correct response?)")
    margin = (logp_w - ref_w.detach()) - (logp_l - ref_l.detach())
    loss = -F.logsigmoid(beta * margin).mean()
    if not torch.isfinite(loss.detach()):
        raise ValueError(f"non-finite DPO loss {loss.item()}; check the log-probs for -inf")
    return loss, {
        "dpo_margin": float(beta * margin.detach().mean()),
        "dpo_accuracy": float((margin.detach() > 0).float().mean()),
    }
