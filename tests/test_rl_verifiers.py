"""Verifiers: extraction, the three rule verifiers, the registry, error counting, NaN handling."""

import math

import pytest

from moonforge.stages.rl.verifiers import (
    RewardError,
    VerifierConfig,
    VerifyStats,
    exact_match,
    extract_answer,
    extract_choice,
    get_verifier,
    multiple_choice,
    numeric_match,
    parse_last_number,
    register_verifier,
    score,
)


def test_extract_answer_marker_then_last_line():
    assert extract_answer("reasoning\nAnswer:  42 \n") == "42"
    assert extract_answer("answer: first\nmore\nANSWER: second") == "second"
    assert extract_answer("step 1\nstep 2\n\n  final line  \n") == "final line"
    assert extract_answer("x\n#### 7", marker="####") == "7"
    assert extract_answer("") == ""


def test_exact_match_normalises_whitespace_and_case():
    assert exact_match("  Paris  France. ", "paris france") == 1.0
    assert exact_match("Paris", "London") == 0.0


@pytest.mark.parametrize(
    "answer,ref,want",
    [
        ("3.0", "3", 1.0),
        ("so x = 3", "3", 1.0),
        ("between 2 and 5", "5", 1.0),
        ("1,000 apples", "1000", 1.0),
        ("-2.50", "-2.5", 1.0),
        ("3/4", "0.75", 1.0),
        ("1e-3", "0.001", 1.0),
        ("3.1", "3", 0.0),
        ("no number", "3", 0.0),
    ],
)
def test_numeric_match(answer, ref, want):
    assert numeric_match(answer, ref) == want


def test_numeric_tolerance_and_last_number():
    assert parse_last_number("7 then 8 then 9.5") == 9.5
    assert numeric_match("3.001", "3", abs_tol=0.01) == 1.0
    assert numeric_match("3.001", "3", abs_tol=1e-6, rel_tol=0.0) == 0.0


@pytest.mark.parametrize(
    "answer,want",
    [
        ("B", "B"),
        ("(c)", "C"),
        ("The answer is (D).", "D"),
        ("b", "B"),
        ("Option A", "A"),
        ("A good guess is C", "C"),
        ("no option here", None),
    ],
)
def test_extract_choice(answer, want):
    assert extract_choice(answer) == want


def test_multiple_choice():
    assert multiple_choice("The answer is (B)", "B") == 1.0
    assert multiple_choice("C.", "(c)") == 1.0
    assert multiple_choice("A", "B") == 0.0


def test_registry_and_score_with_marker():
    stats = VerifyStats()
    assert score("numeric", "think 1+2\nAnswer: 3.0", "3", stats) == 1.0
    assert score("exact", "blah\nAnswer: Blue", "blue", stats) == 1.0
    final = VerifierConfig(answer_marker="Final:")
    assert score("multiple_choice", "hmm\nFinal: (a)", "A", stats, final) == 1.0
    assert stats.num_calls == 3 and stats.num_errors == 0
    with pytest.raises(KeyError, match="unknown verifier 'nope'"):
        get_verifier("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("exact", exact_match)


def test_raising_verifier_counts_error_and_returns_zero():
    def boom(answer, ref):
        raise RuntimeError("sandbox died")

    register_verifier("test_boom", boom, overwrite=True)
    stats = VerifyStats()
    assert score("test_boom", "Answer: 1", "1", stats) == 0.0
    assert score("numeric", "Answer: 1", "no number in ref", stats) == 0.0  # bad reference raises
    assert stats.num_errors == 2 and stats.num_calls == 2
    assert "sandbox died" in stats.errors[0]
    with pytest.raises(RewardError, match="2/2 verifier calls raised"):
        stats.check(max_error_rate=0.5)


def test_nan_reward_raises_clearly():
    register_verifier("test_nan", lambda a, r: math.nan, overwrite=True)
    with pytest.raises(RewardError, match="returned nan"):
        score("test_nan", "Answer: 1", "1", VerifyStats())
