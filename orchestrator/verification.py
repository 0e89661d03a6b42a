"""The generative verifier (GenRM): a prompt that ends with a Yes/No question, and a parser
that turns the model's reply into a verdict and P(Yes).

Every prompt here ends with exactly :data:`VERDICT_QUESTION`, so the verdict is the next
token (a direct verdict) or the last Yes/No token of a reply that first checks the solution
step by step (the chat variant's ``step_by_step=True``).

:func:`parse_verdict` reads P(Yes) from the verdict token's logprobs, renormalised over the
yes-like and no-like alternatives (the GenRM score), and falls back to the reply's text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.types import TokenLogprob

__all__ = [
    "DEFAULT_VERIFIER_SYSTEM",
    "VERDICT_QUESTION",
    "VerdictSource",
    "VerificationExample",
    "parse_verdict",
    "verification_messages",
    "verification_prompt",
]

VERDICT_QUESTION = "Is the answer correct (Yes/No)?"
"""The question every verification prompt ends with; the verdict follows it."""

VerdictSource = Literal["logprobs", "text", "none"]

DEFAULT_VERIFIER_SYSTEM = (
    "You are a strict reviewer of solutions to problems. A solution counts as correct "
    "only when its final answer is right."
)

_CHAT_DIRECT = (
    "Below are a problem and a proposed solution. Decide whether the solution's final "
    "answer is right. Reply with one word only, Yes or No."
)
_CHAT_STEP_BY_STEP = (
    "Below are a problem and a proposed solution. Review the solution one step at a time "
    "and check its final answer independently. Then end your reply with a last line made "
    f"of the question `{VERDICT_QUESTION}` followed by one word, Yes or No."
)


@dataclass(frozen=True, slots=True)
class VerificationExample:
    """A worked verification for a few-shot prompt: a problem, a proposed solution (or
    answer) and whether it is correct."""

    problem: str
    solution: str
    correct: bool


def verification_messages(
    problem: str,
    solution: str,
    *,
    step_by_step: bool = False,
    system: str | None = DEFAULT_VERIFIER_SYSTEM,
) -> tuple[dict[str, str], ...]:
    """Chat messages asking whether ``solution`` answers ``problem`` correctly.

    The user message ends with :data:`VERDICT_QUESTION`. With ``step_by_step`` the model
    is asked to review the solution first and finish on the question and its verdict (the
    verdict is then the reply's last Yes/No); otherwise to reply with the verdict alone.
    """
    instruction = _CHAT_STEP_BY_STEP if step_by_step else _CHAT_DIRECT
    user = (
        f"{instruction}\n\n"
        f"Problem:\n{problem.strip()}\n\n"
        f"Proposed solution:\n{solution.strip()}\n\n"
        f"{VERDICT_QUESTION}"
    )
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    return tuple(messages)


def _completion_block(problem: str, solution: str, problem_label: str, solution_label: str) -> str:
    """One "problem / proposed solution / question" block of a completions prompt."""
    return (
        f"{problem_label}: {problem.strip()}\n"
        f"{solution_label}: {solution.strip()}\n"
        f"{VERDICT_QUESTION}"
    )


def verification_prompt(
    problem: str,
    solution: str,
    *,
    examples: Sequence[VerificationExample] = (),
    instruction: str | None = None,
    problem_label: str = "Problem",
    solution_label: str = "Proposed solution",
) -> str:
    """A completions prompt: optional ``instruction``, the worked ``examples`` (each
    answered " Yes" or " No"), then ``problem`` and ``solution``, ending with exactly
    :data:`VERDICT_QUESTION` so that the next token is the verdict."""
    parts: list[str] = []
    if instruction:
        parts.append(instruction.strip())
    for example in examples:
        block = _completion_block(example.problem, example.solution, problem_label, solution_label)
        parts.append(f"{block} {'Yes' if example.correct else 'No'}")
    parts.append(_completion_block(problem, solution, problem_label, solution_label))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------
# Verdict parsing
# --------------------------------------------------------------------------------------

_TOKEN_EDGES = " \t\r\n.,:;!?*_\"'`()[]{}<>|\u2581\u0120\u010a"
"""Stripped from a token before it is read as a verdict (``\u2581``/``\u0120`` are the
sentencepiece / byte-level BPE space markers some servers return undecoded)."""

_QUESTION_CHOICES_RE = re.compile(r"\(\s*yes\s*/\s*no\s*\)", re.IGNORECASE)
_VERDICT_WORD_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _verdict_of(token: str) -> bool | None:
    """True for a yes-like token (" Yes", "yes", "YES."), False for a no-like one."""
    word = token.strip(_TOKEN_EDGES).casefold()
    if word == "yes":
        return True
    if word == "no":
        return False
    return None


def _finite_logprob(logprob: float) -> float:
    """A logprob made safe: NaN → -inf, anything above 0 → 0."""
    if math.isnan(logprob):
        return -math.inf
    return min(logprob, 0.0)


def _logsumexp(logprobs: Sequence[float]) -> float:
    """log(sum(exp(x))) without overflow; -inf for an empty or all -inf sequence."""
    top = max(logprobs, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in logprobs))


def _sigmoid_of_difference(log_yes: float, log_no: float) -> float:
    """exp(log_yes) / (exp(log_yes) + exp(log_no)), stable for any finite/-inf inputs."""
    if log_no == -math.inf:
        return 1.0
    if log_yes == -math.inf:
        return 0.0
    diff = log_no - log_yes
    if diff > 0:
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


def _p_yes_at(position: TokenLogprob) -> float | None:
    """P(Yes) at one generated position, renormalised over yes-like and no-like tokens.

    The candidates are the position's ``top`` alternatives plus the chosen token. When
    nothing but the chosen token is known, its own probability is weighed against the
    rest (P(Yes) = p for a chosen Yes, 1 - p for a chosen No). None when no candidate
    is a verdict token or every verdict candidate has probability 0.
    """
    candidates = {token: _finite_logprob(lp) for token, lp in position.top}
    candidates.setdefault(position.token, _finite_logprob(position.logprob))
    if len(candidates) == 1:
        chosen = _verdict_of(position.token)
        if chosen is None:
            return None
        p = math.exp(candidates[position.token])
        return p if chosen else 1.0 - p
    log_yes = _logsumexp([lp for tok, lp in candidates.items() if _verdict_of(tok) is True])
    log_no = _logsumexp([lp for tok, lp in candidates.items() if _verdict_of(tok) is False])
    if log_yes == -math.inf and log_no == -math.inf:
        return None
    return _sigmoid_of_difference(log_yes, log_no)


def _token_spans(logprobs: Sequence[TokenLogprob]) -> list[tuple[int, int]]:
    """The character span of each token in the concatenation of all tokens."""
    spans, offset = [], 0
    for position in logprobs:
        spans.append((offset, offset + len(position.token)))
        offset += len(position.token)
    return spans


def _verdict_positions(logprobs: Sequence[TokenLogprob]) -> list[int]:
    """Indices of generated verdict tokens, leaving out the "(Yes/No)" of a repeated
    question, which names both choices and is no verdict."""
    joined = "".join(position.token for position in logprobs)
    excluded = [m.span() for m in _QUESTION_CHOICES_RE.finditer(joined)]
    positions = []
    for index, (start, end) in enumerate(_token_spans(logprobs)):
        if _verdict_of(logprobs[index].token) is None:
            continue
        if any(start < x_end and x_start < end for x_start, x_end in excluded):
            continue
        positions.append(index)
    return positions


def _first_content_index(logprobs: Sequence[TokenLogprob]) -> int | None:
    """Index of the first generated token that is not only whitespace."""
    for index, position in enumerate(logprobs):
        if position.token.strip():
            return index
    return None


def _from_logprobs(
    logprobs: Sequence[TokenLogprob], verdict_at: Literal["last", "first"]
) -> tuple[bool, float] | None:
    """(verdict, P(Yes)) from the logprobs, or None when they hold no usable verdict."""
    if not logprobs:
        return None
    if verdict_at == "first":
        index = _first_content_index(logprobs)
        if index is None:
            return None
        p_yes = _p_yes_at(logprobs[index])
        if p_yes is None:
            return None
        chosen = _verdict_of(logprobs[index].token)
        return (p_yes >= 0.5 if chosen is None else chosen), p_yes
    positions = _verdict_positions(logprobs)
    if not positions:
        return None
    position = logprobs[positions[-1]]
    p_yes = _p_yes_at(position)
    if p_yes is None:
        return None
    return bool(_verdict_of(position.token)), p_yes


def _from_text(text: str, verdict_at: Literal["last", "first"]) -> bool | None:
    """The last (or first) Yes/No word of ``text``, ignoring a repeated "(Yes/No)"."""
    words = _VERDICT_WORD_RE.findall(_QUESTION_CHOICES_RE.sub(" ", text))
    if not words:
        return None
    word = words[-1] if verdict_at == "last" else words[0]
    return word.casefold() == "yes"


def parse_verdict(
    text: str,
    logprobs: Sequence[TokenLogprob],
    *,
    verdict_at: Literal["last", "first"] = "last",
) -> tuple[bool | None, float | None, VerdictSource]:
    """Read a verifier's reply: ``(verdict, p_yes, source)``.

    ``verdict_at="last"`` (a reply that may reason first): the verdict is the last
    generated yes/no token (whitespace, punctuation and case ignored; the "(Yes/No)" of a
    repeated question skipped). ``verdict_at="first"`` (a completions prompt that ends
    with the question, so the verdict is the first token): the first non-blank generated
    token; its alternatives give P(Yes) even when the sampled token itself was no verdict.

    P(Yes) sums the probabilities of the yes-like and no-like alternatives at that
    position and renormalises: P(yes) / (P(yes) + P(no)); with only the chosen token
    known it is p (chosen Yes) or 1 - p (chosen No). The verdict is the chosen token's.
    Without usable logprobs the reply's last (first) Yes/No word gives P(Yes) 1.0 or
    0.0 with source ``"text"``; with neither, ``(None, None, "none")``.
    """
    found = _from_logprobs(logprobs, verdict_at)
    if found is not None:
        verdict, p_yes = found
        return verdict, p_yes, "logprobs"
    verdict = _from_text(text, verdict_at)
    if verdict is not None:
        return verdict, 1.0 if verdict else 0.0, "text"
    return None, None, "none"
