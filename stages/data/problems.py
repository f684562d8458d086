"""Checkable problems with step-by-step solutions and difficulty labels; arithmetic lives here.

Shared by the `reasoning` (verified traces) and `rl_prompts` (answers + difficulty) builders, and
by `sft` for its held-out rule. A `Problem` is a question, a checkable answer, the verifier that
checks it, a difficulty in [0, 1], its solution lines and a deliberately wrong variant. Kinds:

* arithmetic (here): a random expression tree such as "(3+4)*2" with 1..n operations, never
  negative, solved innermost-first with one line per operation and a closing check;
* counting, colour and chart problems over toy-world images: image_problems.py.

Every solution ends in the line "Answer: X" (the verifiers' marker). `wrong_solution` writes a
plausible but wrong variant (one miscalculated step carried to the end); builders use these as
negatives that the verifier must reject. All randomness comes from the caller's
`random.Random`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace
from typing import Literal

FINAL = "Answer: {}"


@dataclass(frozen=True)
class Problem:
    """A question (with "<image>\\n" in front when `image` is set) and its checkable answer."""

    key: str
    """Identity for de-duplication (question text, plus the image for image problems)."""
    question: str
    answer: str
    verifier: str
    difficulty: float
    image: str | None
    steps: tuple[str, ...]
    """Solution lines before the final "Answer:" line."""
    wrong: tuple[tuple[str, ...], str] | None = None
    """(steps, answer) of a deliberately wrong solution, when one exists."""

    @property
    def kind(self) -> Literal["text", "image"]:
        return "image" if self.image else "text"

    def solution(self) -> str:
        return "\n".join([*self.steps, FINAL.format(self.answer)])

    def wrong_solution(self) -> str | None:
        if self.wrong is None:
            return None
        steps, answer = self.wrong
        return "\n".join([*steps, FINAL.format(answer)])


def held_out(key: str, val_frac: float) -> bool:
    """Val membership by a hash of the problem, so every dataset splits the same problem alike."""
    return int(hashlib.sha1(f"heldout/{key}".encode()).hexdigest()[:8], 16) < val_frac * 2**32


def clip_unit(x: float) -> float:
    """`x` clamped to [0, 1] and rounded to 3 decimals (a difficulty label)."""
    return round(min(1.0, max(0.0, x)), 3)


# ----- arithmetic ---------------------------------------------------------------------------

_PREC = {"+": 1, "-": 1, "*": 2}


@dataclass(frozen=True)
class Expr:
    """A leaf (op None, value) or a binary node (op, left, right, value)."""

    value: int
    op: str | None = None
    left: Expr | None = None
    right: Expr | None = None


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _sample(rng: random.Random, num_ops: int, max_leaf: int) -> Expr:
    if num_ops == 0:
        return Expr(rng.randint(1, max_leaf))
    k = rng.randint(0, num_ops - 1)
    left, right = _sample(rng, k, max_leaf), _sample(rng, num_ops - 1 - k, max_leaf)
    op = rng.choice("+-*")
    if op == "-" and right.value > left.value:
        left, right = right, left
    if op == "*" and left.value * right.value > 150:  # keep numbers small for a tiny model
        op = "+"
    return Expr(_apply(op, left.value, right.value), op, left, right)


def render(e: Expr) -> str:
    """Infix text with only the parentheses precedence needs, e.g. "(3+4)*2", "9-(2+3)"."""
    if e.op is None:
        return str(e.value)
    assert e.left is not None and e.right is not None  # an operation node has both children
    left, right = render(e.left), render(e.right)
    if e.left.op and _PREC[e.left.op] < _PREC[e.op]:
        left = f"({left})"
    if e.right.op and (_PREC[e.right.op] < _PREC[e.op] or (e.op == "-" and _PREC[e.right.op] == 1)):
        right = f"({right})"
    return f"{left}{e.op}{right}"


def _reduce(e: Expr, errors: dict[int, int], lines: list[tuple[int, str, int, int]]) -> Expr:
    """Post-order evaluation; step k's result is shifted by errors.get(k, 0) (wrong traces)."""
    if e.op is None:
        return e
    assert e.left is not None and e.right is not None  # an operation node has both children
    a = _reduce(e.left, errors, lines).value
    b = _reduce(e.right, errors, lines).value
    value = _apply(e.op, a, b) + errors.get(len(lines), 0)
    lines.append((a, e.op, b, value))
    return Expr(value)


def _arith_steps(e: Expr, errors: dict[int, int]) -> tuple[tuple[str, ...], int]:
    """Solution lines (plan, one line per operation with the reduced expression, check), value."""
    lines: list[tuple[int, str, int, int]] = []
    value = _reduce(e, errors, lines).value
    steps = [
        "Plan: work out one operation at a time, innermost parentheses first, "
        "multiplication before addition and subtraction."
    ]
    partial = e
    for i, (a, op, b, v) in enumerate(lines):
        partial = _replace_first(partial, v)
        tail = f", so the expression becomes {render(partial)}." if partial.op else "."
        steps.append(f"Step {i + 1}: {a}{op}{b} = {v}{tail}")
    a, op, b, v = lines[-1]
    if op == "+":
        steps.append(f"Check: {v}-{b} = {v - b}, which gives back {a}.")
    elif op == "-":
        steps.append(f"Check: {v}+{b} = {v + b}, which gives back {a}.")
    elif b != 0:
        steps.append(f"Check: {v}/{b} = {v / b:g}, which gives back {a}.")
    else:
        steps.append("Check: anything times 0 is 0.")
    return tuple(steps), value


def _replace_first(e: Expr, value: int) -> Expr:
    """Replace the first post-order operation node whose children are leaves by `value`."""
    if e.op is None:
        return e
    assert e.left is not None and e.right is not None  # an operation node has both children
    if e.left.op is None and e.right.op is None:
        return Expr(value)
    if e.left.op is not None:
        return replace(e, left=_replace_first(e.left, value))
    return replace(e, right=_replace_first(e.right, value))


def _leaves(e: Expr) -> list[int]:
    if e.op is None:
        return [e.value]
    assert e.left is not None and e.right is not None  # an operation node has both children
    return _leaves(e.left) + _leaves(e.right)


def arithmetic_problem(rng: random.Random, num_ops: int, max_ops: int) -> Problem:
    """A `num_ops`-operation expression; difficulty from the operation count and operand size."""
    max_leaf = rng.choice((9, 12))
    e = _sample(rng, num_ops, max_leaf)
    expr = render(e)
    steps, value = _arith_steps(e, {})
    wrong = None
    for delta in (rng.choice((-2, -1, 1, 2)), 1, 3):
        k = rng.randrange(num_ops)
        w_steps, w_value = _arith_steps(e, {k: delta})
        if w_value != value:
            wrong = (w_steps, str(w_value))
            break
    q = rng.choice(
        ("Compute {e}.", "What is {e}?", "Calculate {e}. Show your steps.", "Evaluate the expression {e}.")
    )
    # 0.8 for the operation count, 0.2 when a two-digit operand (10-12) appears.
    difficulty = 0.8 * (num_ops - 1) / max(1, max_ops - 1) + 0.2 * (max(_leaves(e)) > 9)
    return Problem(expr, q.format(e=expr), str(value), "numeric", clip_unit(difficulty), None, steps, wrong)
