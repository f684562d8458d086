"""Answer verifiers: rule-based 0/1 rewards on the final answer only (Kimi-VL "RL on answer only").

The final answer is the text after the last answer marker ("Answer:" by default, case-insensitive),
else the last non-empty line. A verifier gets that extracted answer and the reference and returns 0
or 1. Verifiers live in a registry by name, so a prompt record names the one it uses.

`score` is what the RL loop calls: a verifier that raises yields reward 0 and is counted in
`VerifyStats` (with the first messages kept), so errors are visible, never silent; a NaN/inf reward
raises `RewardError`, because it would poison every gradient of its prompt group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import NonNegativeFloat

from moonforge.stages.config import Frozen

Verifier = Callable[[str, str], float]
"""(extracted_answer, reference) -> reward in {0, 1}."""

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+/\d+|-?\d*\.?\d+(?:[eE][-+]?\d+)?")
_PAREN_OPTION = re.compile(r"\(([A-Za-z])\)")
_BARE_OPTION = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


class RewardError(RuntimeError):
    """A reward is NaN/inf (or otherwise unusable): the RL loop must stop, not train on it."""


class VerifierConfig(Frozen):
    """How answers are extracted and compared."""

    answer_marker: str = "Answer:"
    """The final answer follows the last occurrence of this marker (case-insensitive)."""
    abs_tol: NonNegativeFloat = 1e-6
    """Absolute tolerance of the numeric verifier."""
    rel_tol: NonNegativeFloat = 1e-6
    """Relative tolerance of the numeric verifier."""


def extract_answer(response: str, marker: str = "Answer:") -> str:
    """Text after the last `marker` (case-insensitive), else the last non-empty line, stripped.

    >>> extract_answer("think...\\nAnswer: 42")
    '42'
    """
    if marker:
        idx = response.lower().rfind(marker.lower())
        if idx >= 0:
            return response[idx + len(marker) :].strip()
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(".")


def exact_match(answer: str, reference: str) -> float:
    """1 if equal after collapsing whitespace, lower-casing and dropping a trailing period."""
    return float(_normalise(answer) == _normalise(reference))


def parse_last_number(text: str) -> float | None:
    """The last number in `text` ("1,000", "-2.5", "3/4", "1e-3"), or None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    tok = found[-1].replace(",", "")
    if "/" in tok:
        num, den = tok.split("/")
        return float(num) / float(den) if float(den) != 0 else None
    return float(tok)


def numeric_match(answer: str, reference: str, abs_tol: float = 1e-6, rel_tol: float = 1e-6) -> float:
    """1 if the last number of `answer` equals the reference's within tolerance ("3.0" == "3")."""
    got, want = parse_last_number(answer), parse_last_number(reference)
    if want is None:
        raise ValueError(f"numeric verifier: reference {reference!r} contains no number")
    if got is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol))


def extract_choice(text: str) -> str | None:
    """The chosen option letter: a lone letter, else the last "(x)", else the last standalone capital."""
    lone = text.strip().strip(".():").strip()
    if len(lone) == 1 and lone.isalpha():
        return lone.upper()
    paren = _PAREN_OPTION.findall(text)
    if paren:
        return paren[-1].upper()
    bare = _BARE_OPTION.findall(text)
    return bare[-1] if bare else None


def multiple_choice(answer: str, reference: str) -> float:
    """1 if the option letter in `answer` equals the reference's ("(b)", "B.", "option B" all = B)."""
    want = extract_choice(reference.upper())
    if not want:
        raise ValueError(f"multiple-choice verifier: reference {reference!r} names no option")
    return float(extract_choice(answer) == want)


VERIFIERS: dict[str, Verifier] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "multiple_choice": multiple_choice,
}


def register_verifier(name: str, fn: Verifier, *, overwrite: bool = False) -> None:
    """Add a verifier under `name` (a code-test runner, a learned answer-matching RM, ...)."""
    if name in VERIFIERS and not overwrite:
        raise ValueError(f"verifier {name!r} is already registered; pass overwrite=True to replace it")
    VERIFIERS[name] = fn


def get_verifier(name: str) -> Verifier:
    """The verifier registered as `name`; a clear KeyError lists the known ones otherwise."""
    try:
        return VERIFIERS[name]
    except KeyError:
        raise KeyError(f"unknown verifier {name!r}; registered: {sorted(VERIFIERS)}") from None


@dataclass
class VerifyStats:
    """Counts over a run of `score` calls; `errors` keeps the first `max_messages` messages."""

    num_calls: int = 0
    num_errors: int = 0
    errors: list[str] = field(default_factory=list)
    max_messages: int = 20

    @property
    def error_rate(self) -> float:
        return self.num_errors / self.num_calls if self.num_calls else 0.0

    def check(self, max_error_rate: float) -> None:
        """Raise RewardError if more than `max_error_rate` of the calls raised (a broken verifier)."""
        if self.num_calls and self.error_rate > max_error_rate:
            raise RewardError(
                f"{self.num_errors}/{self.num_calls} verifier calls raised "
                f"(> {max_error_rate:.0%}); first errors: {self.errors[:3]}"
            )


def score(
    verifier: str, response: str, reference: str, stats: VerifyStats, cfg: VerifierConfig = VerifierConfig()
) -> float:
    """Reward of `response` against `reference` under the named verifier, in [0, 1].

    A raising verifier gives 0.0 and increments `stats.num_errors`. A non-finite result raises
    RewardError naming the verifier and the response head.
    """
    fn = get_verifier(verifier)
    stats.num_calls += 1
    answer = extract_answer(response, cfg.answer_marker)
    try:
        if fn is numeric_match:
            r = numeric_match(answer, reference, abs_tol=cfg.abs_tol, rel_tol=cfg.rel_tol)
        else:
            r = fn(answer, reference)
    except Exception as exc:  # noqa: BLE001 -- any verifier failure is a counted zero reward
        stats.num_errors += 1
        if len(stats.errors) < stats.max_messages:
            stats.errors.append(f"{verifier}: {type(exc).__name__}: {exc}")
        return 0.0
    r = float(r)
    if not math.isfinite(r):
        raise RewardError(
            f"verifier {verifier!r} returned {r} for response {response[:80]!r} "
            f"(reference {reference!r}); rewards must be finite"
        )
    return r
