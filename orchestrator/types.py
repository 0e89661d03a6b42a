"""Core value types: problems, solutions, verifications, usage, budgets.

Everything here is a frozen, slotted dataclass built from tuples, so a snapshot handed to a
policy cannot be changed by it and can be shared between concurrent problems.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator.errors import ConfigError, error_text


def is_count(value: object, least: int = 1) -> bool:
    """An int of at least ``least``, and not a bool (``True`` is an int to Python, but as
    a count it is a mistake; a policy given it would write a spec that does not parse).
    The one check every count parameter of the core and the policies goes through."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least

FinishReason = Literal["stop", "length", "cancelled", "failed"] | str
RequestKind = Literal["solve", "verify"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem to answer.

    ``answer`` is the ground truth when known (used for grading only, never shown to the
    model); ``aliases`` are extra accepted spellings for text answers; ``meta`` keeps any
    other fields from the problem file.
    """

    id: str
    problem: str
    answer: str | None = None
    aliases: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, or a sum of several.

    ``estimated`` is true when some completion tokens were counted without the server's
    own usage report (e.g. one token per streamed chunk from a server that sends no usage).
    ``cached_prompt_tokens`` is how many of the prompt tokens the server served from its
    prefix cache (``usage.prompt_tokens_details.cached_tokens``); ``None`` when no server
    said (vLLM reports it only with ``--enable-prompt-tokens-details``). A sum is ``None``
    only when no part reported it.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cached_prompt_tokens: int | None = None
    #: when ``estimated``: what the counts were estimated from (see ``orchestrator.ledger``)
    estimated_from: tuple[str, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        mine, theirs = self.cached_prompt_tokens, other.cached_prompt_tokens
        sources = self.estimated_from
        if other.estimated_from and other.estimated_from != sources:
            sources = tuple(sorted(set(sources) | set(other.estimated_from)))
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.estimated or other.estimated,
            None if mine is None and theirs is None else (mine or 0) + (theirs or 0),
            sources,
        )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its logprob and the top alternatives (token, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Solution:
    """A finished sampled solution.

    ``answer`` is the extracted answer string (``None`` when none could be extracted);
    ``key`` is its canonical form, so equivalent answers share one vote. ``index`` is the
    order in which solutions finished (0, 1, ...). ``completion_tokens`` is this
    solution's own length; ``usage`` (the request's prompt+completion) is charged once
    per request in the ledger, not per solution.
    """

    id: int
    index: int
    text: str
    answer: str | None
    key: str | None
    finish_reason: str
    completion_tokens: int
    started_at: float
    finished_at: float
    request_id: int
    mean_logprob: float | None = None

    @property
    def has_answer(self) -> bool:
        return self.key is not None

    @property
    def latency(self) -> float:
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class FailedSample:
    """A sample that did not produce a solution: cut by a stream failure or cancelled.

    ``error`` is the exception its stream failed with (``None`` when cancelled, or when
    it ended without one); :attr:`error_text` is that error written down (``"ErrorType:
    message"``), which is what equality compares and what results files store.
    """

    id: int
    request_id: int
    kind: RequestKind
    reason: Literal["failed", "cancelled"]
    error: BaseException | None = field(compare=False)
    partial_text: str
    completion_tokens: int
    solution_id: int | None = None  # for verifications: the solution being verified
    error_text: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "error_text",
                           None if self.error is None else error_text(self.error))


@dataclass(frozen=True, slots=True)
class Verification:
    """One generative verification of one solution.

    ``p_yes`` is P(Yes) renormalised over Yes/No from the final verdict token's logprobs,
    or 1.0 / 0.0 from the text when no logprobs were available (``source`` says which),
    or ``None`` when the verdict could not be parsed at all.
    """

    id: int
    solution_id: int
    text: str
    verdict: bool | None
    p_yes: float | None
    source: Literal["logprobs", "text", "none"]
    completion_tokens: int
    started_at: float
    finished_at: float
    request_id: int


@dataclass(frozen=True, slots=True)
class Budget:
    """Caps for one problem (``None`` = no cap).

    ``tokens`` caps *completion* tokens (generated compute, what the cost model counts);
    ``requests`` caps HTTP requests; ``cost_units`` caps the paper's C(S, V) = S·(1+λV),
    i.e. solutions launched plus λ per verification launched, with λ as measured so far
    (1.0 until both kinds have been seen). Caps are checked before work is launched:
    requests are counted at launch, and for tokens every sample in flight holds a
    reservation of what it may still generate (its ``max_tokens`` minus what it has
    streamed), so neither cap is ever exceeded; a sample that does not fit is not launched.
    Cost units are counted at launch with λ as measured then; λ is measured on, so the
    C(S, V) of the end (the final λ) can exceed ``cost_units`` when the verifications
    turn out longer against the solutions than measured at launch (no bound on λ can be
    known before they finish): a cap on C, not a hard one; ``tokens`` is.
    """

    tokens: int | None = None
    requests: int | None = None
    cost_units: float | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "requests", "cost_units"):
            value = getattr(self, name)
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"Budget.{name} must be a positive number or None, "
                                  f"got {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.tokens is None and self.requests is None and self.cost_units is None


UNLIMITED = Budget()
