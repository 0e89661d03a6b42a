"""Token ledger and the cost model C(S, V) = S·(1 + λV).

One :class:`RequestRecord` per HTTP request, charged as its stream arrives. A request's
completion tokens are the server's latest own count when it sent one (final usage chunk,
or vLLM's continuous per-chunk usage), else the sum of per-delta counts (flagged
``estimated`` when those were estimates). A record is closed exactly once, so a cancelled
stream is charged what it generated up to the cut, never twice. Prompt tokens served from
the server's prefix cache are recorded when the server reports them
(``Usage.cached_prompt_tokens``).

When a request's server usage is unavailable its count is flagged ``estimated`` and
``Usage.estimated_from`` says from what (:data:`ESTIMATE_SOURCES`): the logprob entries
received (one per token), one token per streamed chunk, or nothing at all received.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orchestrator.types import Budget, RequestKind, Usage

#: λ assumed before both a solution and a verification length have been measured
DEFAULT_LAMBDA = 1.0

#: what an estimated count came from (``Usage.estimated_from``)
ESTIMATE_SOURCES = {
    "logprobs": "logprob entries received, one per token; no server usage",
    "chunks": "one token per streamed chunk; no server usage",
    "prompt": "prompt size unknown: the server sent no usage",
    "nothing": "no usage and no tokens received",
    "tokenize-text": "prompt counted with the server's tokenizer endpoint on the message "
                     "text: the chat template's own tokens are not included",
    "tokenize-stop": "completion counted with the server's tokenizer endpoint on the text "
                     "received, plus one token per choice that ended at a stop sequence "
                     "(the server generates and counts that token but does not send it; "
                     "one too many where it ended at its end-of-sequence token instead)",
}


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    kind: RequestKind
    n: int
    counted_completion: int = 0
    counted_estimated: bool = False
    server_prompt: int | None = None
    server_completion: int | None = None
    server_final: bool = False
    server_cached: int | None = None
    outcome: str | None = None  # None while open; "ok" | "cancelled" | "failed"

    counted_deltas: int = 0
    #: generation HTTP requests sent for this logical request (retries and each stream of
    #: an emulated ``n`` included), as the backend counted them; 0 for backends without HTTP
    http_requests: int = 0
    #: the backend's own reasons why the usage it reported is inexact (see ESTIMATE_SOURCES)
    server_estimated: tuple[str, ...] = ()

    def add_delta(self, tokens: int, estimated: bool) -> None:
        self.counted_completion += tokens
        self.counted_estimated = self.counted_estimated or estimated
        self.counted_deltas += 1

    @property
    def estimated_from(self) -> tuple[str, ...]:
        """Why this record's usage is an estimate (empty when it is the server's own)."""
        if self.server_completion is not None:
            return self.server_estimated if self.server_prompt is not None else ("prompt",)
        # no server report at all: the prompt's size is unknown too (charged as 0)
        if self.counted_estimated:
            return ("chunks", "prompt")
        return ("logprobs", "prompt") if self.counted_deltas else ("nothing", "prompt")

    def add_usage(self, prompt: int, completion: int, final: bool,
                  cached_prompt: int | None = None,
                  estimated_from: tuple[str, ...] = ()) -> None:
        self.server_prompt = prompt
        self.server_estimated = estimated_from
        if cached_prompt is not None:
            self.server_cached = cached_prompt
        # running counts only grow; a final report is authoritative
        if final or self.server_completion is None or completion >= self.server_completion:
            self.server_completion = completion
        self.server_final = self.server_final or final

    @property
    def completion(self) -> int:
        """Completion tokens charged: the server's latest count, else the counted deltas."""
        if self.server_completion is not None:
            return self.server_completion
        return self.counted_completion

    @property
    def usage(self) -> Usage:
        if self.server_completion is not None:
            completion = self.server_completion
            estimated = bool(self.server_estimated)
        else:
            completion = self.counted_completion
            estimated = self.counted_estimated
        # without any server report the prompt size is unknown: 0, flagged estimated
        prompt = self.server_prompt if self.server_prompt is not None else 0
        estimated = estimated or self.server_prompt is None
        return Usage(prompt, completion, estimated, self.server_cached,
                     self.estimated_from if estimated else ())

    def close(self, outcome: str) -> None:
        if self.outcome is not None:
            raise RuntimeError(f"request {self.request_id} closed twice")
        self.outcome = outcome


def _sum_usage(records: Iterable[RequestRecord]) -> Usage:
    """Usage of several requests, summed field by field (same result as adding Usages)."""
    prompt = completion = cached = 0
    estimated = any_cached = False
    sources: set[str] = set()
    for r in records:
        u = r.usage
        prompt += u.prompt_tokens
        completion += u.completion_tokens
        estimated = estimated or u.estimated
        sources.update(u.estimated_from)
        if u.cached_prompt_tokens is not None:
            cached += u.cached_prompt_tokens
            any_cached = True
    return Usage(prompt, completion, estimated, cached if any_cached else None,
                 tuple(sorted(sources)))


def measure_lambda(
    solution_lengths: Iterable[int], verification_lengths: Iterable[int]
) -> float | None:
    """λ = mean verification completion tokens / mean solution completion tokens."""
    sol = list(solution_lengths)
    ver = list(verification_lengths)
    if not sol or not ver:
        return None
    mean_sol = sum(sol) / len(sol)
    if mean_sol <= 0:
        return None
    return (sum(ver) / len(ver)) / mean_sol


def cost_units(solutions: int, verifications: int, lam: float | None) -> float:
    """C = S + λ·(S·V) expressed with counts: solutions + λ × verifications."""
    return solutions + (DEFAULT_LAMBDA if lam is None else lam) * verifications


@dataclass(slots=True)
class ProblemLedger:
    """All requests of one problem."""

    records: dict[int, RequestRecord] = field(default_factory=dict)
    solutions_launched: int = 0
    verifications_launched: int = 0
    solution_lengths: list[int] = field(default_factory=list)
    verification_lengths: list[int] = field(default_factory=list)
    # a closed record never changes: its usage is summed once, so totals cost O(open)
    _open: dict[int, RequestRecord] = field(default_factory=dict)
    _closed_usage: Usage = field(default_factory=Usage)

    def open(self, request_id: int, kind: RequestKind, n: int) -> RequestRecord:
        record = RequestRecord(request_id, kind, n)
        self.records[request_id] = record
        self._open[request_id] = record
        if kind == "solve":
            self.solutions_launched += n
        else:
            self.verifications_launched += n
        return record

    def close(self, record: RequestRecord, outcome: str) -> None:
        """Close a request exactly once; its charge is final from here on."""
        record.close(outcome)
        del self._open[record.request_id]
        self._closed_usage = self._closed_usage + record.usage

    @property
    def usage(self) -> Usage:
        if not self._open:
            return self._closed_usage
        return self._closed_usage + _sum_usage(self._open.values())

    def usage_of(self, kind: RequestKind) -> Usage:
        return _sum_usage(r for r in self.records.values() if r.kind == kind)

    @property
    def completion_tokens(self) -> int:
        """Completion tokens charged so far (the hot path of budget checks)."""
        return self._closed_usage.completion_tokens + sum(r.completion
                                                          for r in self._open.values())

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def http_requests(self) -> int:
        """HTTP requests the backend sent for this problem's requests (see RequestRecord)."""
        return sum(r.http_requests for r in self.records.values())

    @property
    def open_requests(self) -> int:
        return len(self._open)

    @property
    def lam(self) -> float | None:
        return measure_lambda(self.solution_lengths, self.verification_lengths)

    @property
    def cost_units(self) -> float:
        return cost_units(self.solutions_launched, self.verifications_launched, self.lam)

    def left(self, budget: Budget, reserved: int = 0
             ) -> tuple[int | None, int | None, float | None]:
        """Room left under each cap; ``reserved`` tokens are promised to work in flight."""
        tokens = (None if budget.tokens is None
                  else budget.tokens - self.completion_tokens - reserved)
        requests = None if budget.requests is None else budget.requests - self.requests
        units = None if budget.cost_units is None else budget.cost_units - self.cost_units
        return tokens, requests, units

    def admits(self, budget: Budget, kind: RequestKind, n: int, max_tokens: int,
               reserved: int) -> int:
        """How many of ``n`` samples of ``kind`` (each up to ``max_tokens``) may launch now.

        Tokens: the worst case of everything in flight (``reserved``: the ``max_tokens``
        each unfinished sample may still generate) plus the new samples must fit under the
        cap, so a token cap is never exceeded. Requests and cost units are counted at
        launch, so those caps are never exceeded either.
        """
        tokens, requests, _ = self.left(budget, reserved)
        if requests is not None and requests < 1:
            return 0
        if tokens is not None:
            n = min(n, max(tokens, 0) // max_tokens)
        if budget.cost_units is not None and n > 0:
            lam = DEFAULT_LAMBDA if self.lam is None else self.lam
            per = 1.0 if kind == "solve" else lam
            room = budget.cost_units - self.cost_units + 1e-9
            n = min(n, int(room // per)) if per > 0 else n
        return max(n, 0)


class RunBudget:
    """A completion-token cap shared by every problem of one run.

    Problems that settle early stop spending, which leaves the rest of the pool to the
    problems still contested. The same reservation rule as per problem applies: a sample
    launches only if the worst case of everything in flight, across all problems, plus the
    new sample fits, so the run-level cap is never exceeded.
    """

    def __init__(self, tokens: int) -> None:
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"RunBudget tokens must be a positive integer, got {tokens!r}")
        self.tokens = tokens
        self._closed = 0
        self._active: dict[int, tuple[ProblemLedger, Callable[[], int], Callable[[], None]]] = {}

    def join(self, key: int, ledger: ProblemLedger, reserved: Callable[[], int],
             wake: Callable[[], None]) -> None:
        """Register a running problem: its ledger, its reservations, and how to wake it
        when room may have been freed elsewhere."""
        self._active[key] = (ledger, reserved, wake)

    def leave(self, key: int) -> None:
        entry = self._active.pop(key, None)
        if entry is not None:
            self._closed += entry[0].completion_tokens
        self.notify()

    def notify(self) -> None:
        """A request finished somewhere: reservations shrank, so room may have grown."""
        for _, _, wake in self._active.values():
            wake()

    def others_in_flight(self, key: int) -> bool:
        """Could room still grow for ``key``: does another problem hold reservations?"""
        return any(res() > 0 for k, (_, res, _) in self._active.items() if k != key)

    @property
    def spent(self) -> int:
        active = sum(led.completion_tokens for led, _, _ in self._active.values())
        return self._closed + active

    def room(self) -> int:
        """Tokens neither charged nor promised to work in flight."""
        return self.tokens - self.spent - sum(res() for _, res, _ in self._active.values())
