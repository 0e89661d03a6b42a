"""Tests of orchestrator.verification: prompts and verdict parsing."""

from __future__ import annotations

import math

import pytest

from orchestrator.types import TokenLogprob
from orchestrator.verification import (
    VERDICT_QUESTION,
    VerificationExample,
    parse_verdict,
    verification_messages,
    verification_prompt,
)

log = math.log


def tok(token: str, p: float, *top: tuple[str, float]) -> TokenLogprob:
    """A generated token with probability ``p`` and alternatives given as probabilities."""
    return TokenLogprob(token, log(p), tuple((t, log(q)) for t, q in top))


def plain(*tokens: str) -> list[TokenLogprob]:
    """Tokens generated with certainty and no alternatives listed."""
    return [TokenLogprob(t, 0.0) for t in tokens]


# ---- prompts -------------------------------------------------------------------------------


def test_question_wording() -> None:
    assert VERDICT_QUESTION == "Is the answer correct (Yes/No)?"


@pytest.mark.parametrize("step_by_step", [False, True])
def test_chat_messages_end_with_the_question(step_by_step: bool) -> None:
    messages = verification_messages("What is 2+2?", "2+2 = \\boxed{4}", step_by_step=step_by_step)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[-1]["content"]
    assert user.endswith(VERDICT_QUESTION)
    assert "What is 2+2?" in user and "\\boxed{4}" in user
    assert verification_messages("q", "s", system=None)[0]["role"] == "user"


def test_completions_prompt_with_examples() -> None:
    prompt = verification_prompt(
        "What is the capital of Peru?",
        "Lima",
        examples=[
            VerificationExample("What is 1+1?", "2", correct=True),
            VerificationExample("What is 2+2?", "5", correct=False),
        ],
        instruction="Check each answer.",
        problem_label="Q",
        solution_label="Proposed answer",
    )
    assert prompt == (
        "Check each answer.\n\n"
        f"Q: What is 1+1?\nProposed answer: 2\n{VERDICT_QUESTION} Yes\n\n"
        f"Q: What is 2+2?\nProposed answer: 5\n{VERDICT_QUESTION} No\n\n"
        f"Q: What is the capital of Peru?\nProposed answer: Lima\n{VERDICT_QUESTION}"
    )


def test_completions_prompt_without_examples_ends_with_question() -> None:
    prompt = verification_prompt("P", "S")
    assert prompt == f"Problem: P\nProposed solution: S\n{VERDICT_QUESTION}"


# ---- parse_verdict: logprobs ---------------------------------------------------------------


def test_renormalises_yes_like_and_no_like_alternatives() -> None:
    verdict_token = tok(" Yes", 0.6, (" Yes", 0.6), (" No", 0.2), ("Yes", 0.1), (" yes", 0.05))
    logprobs = [*plain(" The", " answer", " is", " right", "."), verdict_token]
    verdict, p_yes, source = parse_verdict("The answer is right. Yes", logprobs)
    assert verdict is True
    assert source == "logprobs"
    assert p_yes == pytest.approx(0.75 / (0.75 + 0.2))


def test_chosen_no_keeps_its_verdict_and_probability() -> None:
    logprobs = [tok(" No", 0.5, (" No", 0.5), (" Yes", 0.3), ("NO", 0.1), (" Maybe", 0.05))]
    assert parse_verdict(" No", logprobs) == (False, pytest.approx(0.3 / 0.9), "logprobs")


def test_only_the_chosen_token_known() -> None:
    assert parse_verdict(" Yes", [tok(" Yes", 0.7)]) == (True, pytest.approx(0.7), "logprobs")
    assert parse_verdict(" No", [tok(" No", 0.7)]) == (False, pytest.approx(0.3), "logprobs")
    # top holding just the chosen token is the same situation
    only_self = [tok("Yes", 0.9, ("Yes", 0.9))]
    assert parse_verdict("Yes", only_self) == (True, pytest.approx(0.9), "logprobs")


def test_missing_other_class_renormalises_to_certainty() -> None:
    logprobs = [tok(" Yes", 0.8, (" Yes", 0.8), (" Correct", 0.1))]
    assert parse_verdict(" Yes", logprobs) == (True, 1.0, "logprobs")


def test_minus_infinity_and_nan_are_guarded() -> None:
    logprobs = [TokenLogprob(" Yes", -0.1, ((" Yes", -0.1), (" No", -math.inf), ("no", math.nan)))]
    assert parse_verdict(" Yes", logprobs) == (True, 1.0, "logprobs")


def test_tiny_logprobs_are_stable() -> None:
    logprobs = [TokenLogprob(" No", -1001.0, ((" Yes", -1000.0), (" No", -1001.0)))]
    verdict, p_yes, source = parse_verdict(" No", logprobs)
    assert verdict is False and source == "logprobs"
    assert p_yes == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_last_verdict_token_wins_after_reasoning() -> None:
    logprobs = [
        tok("Yes", 0.4, ("Yes", 0.4), ("No", 0.4)),
        *plain(",", " step", " 2", " is", " wrong", ".", " Is", " the", " answer", " correct"),
        *plain(" (", "Yes", "/", "No", ")?"),
        tok(" No", 0.9, (" No", 0.9), (" Yes", 0.1)),
    ]
    text = "".join(t.token for t in logprobs)
    assert parse_verdict(text, logprobs) == (False, pytest.approx(0.1), "logprobs")


def test_question_choices_are_not_a_verdict() -> None:
    """A reply cut right after repeating the question has no verdict, not a "No"."""
    logprobs = plain(" Is", " the", " answer", " correct", " (", "Yes", "/", "No", ")?")
    text = "".join(t.token for t in logprobs)
    assert parse_verdict(text, logprobs) == (None, None, "none")


def test_first_token_verdict_ignores_later_rambling() -> None:
    logprobs = [
        tok(" Yes", 0.7, (" Yes", 0.7), (" No", 0.28)),
        *plain("\n", "\n", "Q", ":", " Is", " it", "?", " No"),
    ]
    text = "".join(t.token for t in logprobs)
    assert parse_verdict(text, logprobs, verdict_at="first") == (
        True,
        pytest.approx(0.7 / 0.98),
        "logprobs",
    )
    assert parse_verdict(text, logprobs, verdict_at="last")[0] is False


def test_first_position_alternatives_give_the_verdict_distribution() -> None:
    logprobs = [tok(" Maybe", 0.5, (" Maybe", 0.5), (" Yes", 0.3), (" No", 0.1))]
    assert parse_verdict(" Maybe", logprobs, verdict_at="first") == (
        True,
        pytest.approx(0.75),
        "logprobs",
    )


def test_sentencepiece_markers_and_punctuation() -> None:
    logprobs = [tok("\u2581Yes.", 0.6, ("\u2581Yes.", 0.6), ("\u2581No", 0.4))]
    assert parse_verdict("Yes.", logprobs) == (True, pytest.approx(0.6), "logprobs")


# ---- parse_verdict: fallbacks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("After checking, the answer is correct. Yes", (True, 1.0, "text")),
        ("No, step two is wrong... Is the answer correct (Yes/No)? No.", (False, 0.0, "text")),
        ("yes", (True, 1.0, "text")),
        ("I cannot tell.", (None, None, "none")),
        ("", (None, None, "none")),
        ("Is the answer correct (Yes/No)?", (None, None, "none")),
    ],
)
def test_text_fallback(text: str, expected: tuple) -> None:
    assert parse_verdict(text, []) == expected


def test_text_fallback_when_logprobs_hold_no_verdict() -> None:
    assert parse_verdict("Looks fine: Yes", plain("Looks", " fine")) == (True, 1.0, "text")


def test_text_fallback_first() -> None:
    assert parse_verdict(" No\nQ: ... Yes", [], verdict_at="first") == (False, 0.0, "text")
