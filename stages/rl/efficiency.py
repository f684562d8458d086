"""Token efficiency: accuracy bought per generated token, and picking a checkpoint by it.

long2short RL starts from "the RL checkpoint with the best performance / token-efficiency balance"
(k1.5 sec. 2.4); `pick_best` makes that choice explicit: among candidates whose accuracy is within
`acc_tolerance` of the best accuracy, the one with the most accuracy per 1k generated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

Candidate = tuple[str, float, float]
"""(name, accuracy in [0, 1], mean generated tokens per response)."""


def accuracy_per_1k_tokens(accuracy: float, mean_len: float) -> float:
    """accuracy / (mean_len / 1000): e.g. 0.8 at 400 tokens -> 2.0."""
    if mean_len <= 0:
        raise ValueError(f"mean generated length must be > 0, got {mean_len}")
    return accuracy * 1000.0 / mean_len


def efficiency_of(correct: Sequence[bool], lengths: Sequence[int]) -> float:
    """Correct answers per 1k generated tokens over an eval set (= accuracy / mean length * 1k)."""
    if len(correct) != len(lengths) or not lengths:
        raise ValueError(f"need equal, non-empty lists; got {len(correct)} flags, {len(lengths)} lengths")
    return accuracy_per_1k_tokens(sum(map(bool, correct)) / len(correct), sum(lengths) / len(lengths))


def pick_best(candidates: Sequence[Candidate], acc_tolerance: float) -> Candidate:
    """The most token-efficient candidate with accuracy >= best accuracy - acc_tolerance.

    Ties on efficiency go to the higher accuracy, then to the earlier candidate.

    >>> pick_best([("long", 0.80, 2000), ("mid", 0.78, 800), ("short", 0.60, 200)], 0.05)
    ('mid', 0.78, 800)
    """
    if not candidates:
        raise ValueError("pick_best needs at least one candidate")
    if acc_tolerance < 0:
        raise ValueError(f"acc_tolerance must be >= 0, got {acc_tolerance}")
    best_acc = max(c[1] for c in candidates)
    ok = [(i, c) for i, c in enumerate(candidates) if c[1] >= best_acc - acc_tolerance - 1e-12]
    _, chosen = max(ok, key=lambda ic: (accuracy_per_1k_tokens(ic[1][1], ic[1][2]), ic[1][1], -ic[0]))
    return chosen
