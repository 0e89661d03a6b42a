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

Admission lives here too, in one place: :class:`ProblemLedger` knows its problem's
:class:`~orchestrator.types.Budget`, the run's shared :class:`RunBudget` (if any) and what
every unfinished sample may still generate (its reservation), so it alone says how much
room is left (:meth:`ProblemLedger.budget_left`), how many samples may launch now
(:meth:`ProblemLedger.admits`) and which cap refused one (:meth:`ProblemLedger.refusing_cap`).
Its ``changed`` event is set whenever its problem's state or the run's shared room may
have changed (a choice finished, a request closed, here or in another problem of the run);
the runtime's decision loop waits on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from orchestrator.errors import ConfigError
from orchestrator.snapshot import BudgetCap, BudgetLeft
from orchestrator.types import UNLIMITED, Budget, RequestKind, Usage, is_count

#: λ assumed before both a solution and a verification length have been measured
DEFAULT_LAMBDA = 1.0

#: what an estimated count came from (``Usage.estimated_from``)
ESTIMATE_SOURCES = {
    "logprobs": "logprob entries received, one per token; no server usage",
    "chunks": "one token per streamed chunk; no server usage",
    "prompt": "prompt size unknown: the server sent no usage, or a usage without a "
              "readable prompt_tokens (charged as 0)",
    "nothing": "no usage and no tokens received",
    "tokenize-text": "prompt counted with the server's tokenizer endpoint on the message "
                     "text: the chat template's own tokens are not included",
    "tokenize-stop": "completion counted with the server's tokenizer endpoint on the text "
                     "received, plus one token per choice that ended at a stop sequence "
                     "(the server generates and counts that token but does not send it; "
                     "one too many where it ended at its end-of-sequence token instead)",
    "streamed": "the server's count was below the tokens received (a count that is not a "
                "final one: an emulated n whose cut or failed streams sent no usage of their "
                "own; or any count below the tokens counted exactly by their logprobs): "
                "the tokens received were charged",
    "capped": "the server's count was above what the request could generate (n x "
              "max_tokens): that cap was charged",
    "abandoned": "tokens an attempt given up for another (a replica failed over) had "
                 "streamed, counted from its chunks and charged on top: it may have "
                 "generated more than it sent",
}


@dataclass(slots=True)
class RequestRecord:
    request_id: int
    kind: RequestKind
    n: int
    #: what each choice may generate (the request's ``max_tokens``; 0: nothing reserved)
    max_tokens: int = 0
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
    #: of those, the ones given up before their first token (timeout, dropped connection,
    #: cancellation): the server may have generated tokens for them that nothing reported
    #: (``backends.base.count_abandoned_request``), so the usage is then a lower bound
    abandoned_http_requests: int = 0
    #: the backend's own reasons why the usage it reported is inexact (see ESTIMATE_SOURCES)
    server_estimated: tuple[str, ...] = ()
    #: per choice: tokens streamed while it was unfinished, and whether it is finished
    choice_tokens: list[int] = field(default_factory=list)
    choice_done: list[bool] = field(default_factory=list)
    #: tokens streamed by an attempt given up for another that served the request (handed
    #: over, never read: a replica failed over), charged on top of the served count
    abandoned_completion: int = 0

    def add_delta(self, tokens: int, estimated: bool) -> None:
        self.counted_completion += tokens
        self.counted_estimated = self.counted_estimated or estimated
        self.counted_deltas += 1

    @property
    def server_usage_seen(self) -> bool:
        """The server has reported its own count for this request."""
        return self.server_completion is not None

    def reservation(self, choice: int) -> int:
        """Tokens choice ``choice`` may still generate (0 once it is finished)."""
        if self.choice_done[choice]:
            return 0
        return max(self.max_tokens - self.choice_tokens[choice], 0)

    @property
    def streamed_exceeds_server(self) -> bool:
        """The server's count is below the tokens received, and either not a final one or
        below tokens counted exactly (one logprob entry per token).

        A running count covers at least what it has sent, so this happens only when the
        count covers part of the request: the summed reports of an emulated ``n`` whose
        unfinished streams have not reported (a server that sends usage only in its last
        chunk). A final count below the exactly counted tokens is wrong (a closing chunk
        saying 0 after five tokens with logprobs charged 0; found by review). The tokens
        received are then the better (lower-bound) count."""
        return (self.server_completion is not None
                and self.counted_completion > self.server_completion
                and (not self.server_final or not self.counted_estimated))

    @property
    def estimated_from(self) -> tuple[str, ...]:
        """Why this record's usage is an estimate (empty when it is the server's own)."""
        if self.server_completion is not None:
            got = self.server_estimated if self.server_prompt is not None else ("prompt",)
            if self.streamed_exceeds_server:
                return tuple(sorted({*got, "streamed"}))
            return got
        # no server report at all: the prompt's size is unknown too (charged as 0)
        if self.counted_estimated:
            return ("chunks", "prompt")
        return ("logprobs", "prompt") if self.counted_deltas else ("nothing", "prompt")

    def add_usage(self, prompt: int, completion: int, final: bool,
                  cached_prompt: int | None = None,
                  estimated_from: tuple[str, ...] = ()) -> None:
        cap = self.n * self.max_tokens
        if self.max_tokens > 0 and completion > cap:
            # more than the request could generate: a server's impossible count (1e12 was
            # charged as it came; found by review) is charged as the most it could be
            completion = cap
            estimated_from = tuple(sorted({*estimated_from, "capped"}))
        if "prompt" in estimated_from:  # this report's prompt count was unreadable
            if self.server_prompt is not None and "prompt" not in self.server_estimated:
                prompt = self.server_prompt  # an earlier readable one stands
                estimated_from = tuple(s for s in estimated_from if s != "prompt")
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
        """Completion tokens charged: the server's latest count, else the counted deltas
        (and those where they exceed the count: :attr:`streamed_exceeds_server`), plus
        what an attempt given up for another had streamed (``abandoned_completion``)."""
        if self.server_completion is not None and not self.streamed_exceeds_server:
            return self.server_completion + self.abandoned_completion
        return self.counted_completion + self.abandoned_completion

    @property
    def usage(self) -> Usage:
        if self.streamed_exceeds_server:
            completion = self.counted_completion
            estimated = True
        elif self.server_completion is not None:
            completion = self.server_completion
            estimated = bool(self.server_estimated)
        else:
            completion = self.counted_completion
            estimated = self.counted_estimated
        # without any server report the prompt size is unknown: 0, flagged estimated
        prompt = self.server_prompt if self.server_prompt is not None else 0
        estimated = estimated or self.server_prompt is None
        sources = self.estimated_from if estimated else ()
        if self.abandoned_completion:
            completion += self.abandoned_completion
            estimated = True
            sources = tuple(sorted({*sources, "abandoned"}))
        return Usage(prompt, completion, estimated, self.server_cached, sources)

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
    return lambda_of_sums(len(sol), sum(sol), len(ver), sum(ver))


def lambda_of_sums(sol_n: int, sol_sum: int, ver_n: int, ver_sum: int) -> float | None:
    """:func:`measure_lambda` from running sums: the count and total length of the
    solutions and of the verifications (None without both, or with empty solutions)."""
    if not sol_n or not ver_n:
        return None
    mean_sol = sol_sum / sol_n
    if mean_sol <= 0:
        return None
    return (ver_sum / ver_n) / mean_sol


def cost_units(solutions: int, verifications: int, lam: float | None) -> float:
    """C = S + λ·(S·V) expressed with counts: solutions + λ × verifications."""
    return solutions + (DEFAULT_LAMBDA if lam is None else lam) * verifications


class ProblemLedger:
    """All requests of one problem, and the admission of new ones (module docstring).

    ``sample_tokens`` / ``verify_tokens``: what one more solution sample / verification
    reserves (shown to policies in :class:`~orchestrator.snapshot.BudgetLeft`).
    """

    __slots__ = ("_closed_usage", "_open", "_reserved", "_sol_n", "_sol_sum", "_ver_n",
                 "_ver_sum", "budget", "changed", "records", "run", "sample_tokens",
                 "solutions_launched", "verifications_launched", "verify_tokens")

    def __init__(self, budget: Budget = UNLIMITED, run: RunBudget | None = None, *,
                 sample_tokens: int = 1, verify_tokens: int = 1) -> None:
        self.budget = budget
        self.run = run
        self.sample_tokens = sample_tokens
        self.verify_tokens = verify_tokens
        self.records: dict[int, RequestRecord] = {}
        self.solutions_launched = 0
        self.verifications_launched = 0
        #: set when this problem's state or the run's shared room may have changed
        self.changed = asyncio.Event()
        # a closed record never changes: its usage is summed once, so totals cost O(open)
        self._open: dict[int, RequestRecord] = {}
        self._closed_usage = Usage()
        self._reserved = 0  # what every unfinished choice may still generate
        self._sol_n = self._sol_sum = self._ver_n = self._ver_sum = 0

    # ---- requests --------------------------------------------------------------------
    def open(self, request_id: int, kind: RequestKind, n: int, max_tokens: int = 0
             ) -> RequestRecord:
        """Record a launched request of ``n`` choices, each reserving ``max_tokens``."""
        record = RequestRecord(request_id, kind, n, max_tokens,
                               choice_tokens=[0] * n, choice_done=[False] * n)
        self.records[request_id] = record
        self._open[request_id] = record
        self._reserved += n * max_tokens
        if kind == "solve":
            self.solutions_launched += n
        else:
            self.verifications_launched += n
        return record

    def add_delta(self, record: RequestRecord, choice: int, tokens: int,
                  estimated: bool) -> None:
        """Charge ``tokens`` streamed by unfinished choice ``choice`` of ``record``."""
        before = record.reservation(choice)
        record.choice_tokens[choice] += tokens
        self._reserved += record.reservation(choice) - before
        record.add_delta(tokens, estimated)

    def finish(self, record: RequestRecord, choice: int) -> int:
        """Choice ``choice`` of ``record`` finished (a solution or a verification); its
        length counts toward λ. Returns its completion tokens."""
        self._reserved -= record.reservation(choice)
        record.choice_done[choice] = True
        tokens = record.choice_tokens[choice]
        if record.kind == "solve":
            self._sol_n += 1
            self._sol_sum += tokens
        else:
            self._ver_n += 1
            self._ver_sum += tokens
        self.changed.set()
        return tokens

    def close(self, record: RequestRecord, outcome: str) -> None:
        """Close a request exactly once; its charge is final from here on, and what its
        unfinished choices had reserved is released."""
        record.close(outcome)
        for i in range(record.n):
            self._reserved -= record.reservation(i)
            record.choice_done[i] = True
        del self._open[record.request_id]
        self._closed_usage = self._closed_usage + record.usage
        self.changed.set()
        if self.run is not None:
            self.run.notify()

    # ---- totals ----------------------------------------------------------------------
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
    def reserved(self) -> int:
        """Tokens promised to work in flight: what each unfinished choice may still
        generate (its request's ``max_tokens`` minus what it has streamed)."""
        return self._reserved

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def http_requests(self) -> int:
        """HTTP requests the backend sent for this problem's requests (see RequestRecord)."""
        return sum(r.http_requests for r in self.records.values())

    @property
    def abandoned_http_requests(self) -> int:
        """HTTP requests given up before their first token (see RequestRecord)."""
        return sum(r.abandoned_http_requests for r in self.records.values())

    @property
    def open_requests(self) -> int:
        return len(self._open)

    @property
    def lam(self) -> float | None:
        """λ = mean verification length / mean solution length (:func:`measure_lambda`
        over the finished choices, kept as running sums)."""
        return lambda_of_sums(self._sol_n, self._sol_sum, self._ver_n, self._ver_sum)

    @property
    def cost_units(self) -> float:
        return cost_units(self.solutions_launched, self.verifications_launched, self.lam)

    # ---- admission: the one place budget room is computed ------------------------------
    def _own_left(self) -> tuple[int | None, int | None, float | None]:
        """Room under this problem's own caps (tokens net of reservations)."""
        budget = self.budget
        tokens = (None if budget.tokens is None
                  else budget.tokens - self.completion_tokens - self._reserved)
        requests = None if budget.requests is None else budget.requests - self.requests
        units = None if budget.cost_units is None else budget.cost_units - self.cost_units
        return tokens, requests, units

    def left(self) -> tuple[int | None, int | None, float | None]:
        """Room left now under each cap (``None`` = uncapped): completion tokens neither
        charged nor reserved (the run's shared room included), requests, cost units."""
        tokens, requests, units = self._own_left()
        if self.run is not None:
            room = self.run.room()
            tokens = room if tokens is None else min(tokens, room)
        return tokens, requests, units

    def verify_units(self) -> float:
        """Cost units one verification counts: λ as measured, 1 before."""
        lam = self.lam
        return DEFAULT_LAMBDA if lam is None else lam

    def budget_left(self) -> BudgetLeft:
        """What a snapshot shows a policy (:class:`~orchestrator.snapshot.BudgetLeft`)."""
        tokens, requests, units = self.left()
        return BudgetLeft(tokens, requests, units, self.sample_tokens, self.verify_tokens,
                          self.verify_units())

    def admits(self, kind: RequestKind, n: int, max_tokens: int) -> int:
        """How many of ``n`` samples of ``kind`` (each up to ``max_tokens``) may launch now.

        Tokens: the worst case of everything in flight (every unfinished choice's
        reservation, in every problem of the run) plus the new samples must fit under
        the problem's cap and the run's, so no token cap is ever exceeded. Requests are
        counted at launch, so that cap is never exceeded either; cost units too, with λ
        as measured now, so the cost recomputed with a λ measured later can exceed its
        cap (:class:`~orchestrator.types.Budget`).
        """
        tokens, requests, _ = self.left()
        if requests is not None and requests < 1:
            return 0
        if tokens is not None:
            n = min(n, max(tokens, 0) // max_tokens)
        if self.budget.cost_units is not None and n > 0:
            per = 1.0 if kind == "solve" else self.verify_units()
            room = self.budget.cost_units - self.cost_units + 1e-9
            n = min(n, int(room // per)) if per > 0 else n
        return max(n, 0)

    def refusing_cap(self, kind: RequestKind) -> BudgetCap:
        """The cap that keeps one more request of ``kind`` from launching now."""
        max_tokens = self.sample_tokens if kind == "solve" else self.verify_tokens
        tokens, requests, units = self._own_left()
        if requests is not None and requests < 1:
            return "requests"
        if tokens is not None and tokens < max_tokens:
            return "tokens"
        per = 1.0 if kind == "solve" else self.verify_units()
        if units is not None and units + 1e-9 < per:
            return "cost_units"
        return "run_tokens" if self.run is not None else "tokens"

    def run_room_may_grow(self) -> bool:
        """Blocked only by the run's shared budget while other problems still hold
        reservations that may come back unspent?"""
        if self.run is None:
            return False
        tokens, requests, _ = self._own_left()
        if requests is not None and requests < 1:
            return False
        if tokens is not None and tokens < self.sample_tokens:
            return False
        if self.budget.cost_units is not None and \
                self.budget.cost_units - self.cost_units + 1e-9 < 1.0:
            return False
        return self.run.others_in_flight(self)

    @contextmanager
    def in_run(self) -> Iterator[None]:
        """While the problem runs, its charges and reservations count in the run's
        shared budget (no-op without one)."""
        if self.run is None:
            yield
            return
        self.run.join(self)
        try:
            yield
        finally:
            self.run.leave(self)


class RunBudget:
    """A completion-token cap shared by every problem of one run.

    Problems that settle early stop spending, which leaves the rest of the pool to the
    problems still contested. The same reservation rule as per problem applies: a sample
    launches only if the worst case of everything in flight, across all problems, plus the
    new sample fits, so the run-level cap is never exceeded. Problems take part through
    their :class:`ProblemLedger` (``ProblemLedger(budget, run=...)``).
    """

    __slots__ = ("_active", "_closed", "tokens")

    def __init__(self, tokens: int) -> None:
        if not is_count(tokens):
            raise ConfigError(f"RunBudget tokens must be a positive integer, got {tokens!r}")
        self.tokens = tokens
        self._closed = 0
        self._active: dict[int, ProblemLedger] = {}

    def join(self, ledger: ProblemLedger) -> None:
        """A problem starts: its ledger's charges and reservations count from now."""
        self._active[id(ledger)] = ledger

    def leave(self, ledger: ProblemLedger) -> None:
        """A problem ended: its charge is final; the others may use what it left."""
        if self._active.pop(id(ledger), None) is not None:
            self._closed += ledger.completion_tokens
        self.notify()

    def notify(self) -> None:
        """A request finished somewhere: reservations shrank, so room may have grown."""
        for ledger in self._active.values():
            ledger.changed.set()

    def others_in_flight(self, ledger: ProblemLedger) -> bool:
        """Could room still grow for ``ledger``: does another problem hold reservations?"""
        return any(other.reserved > 0 for other in self._active.values() if other is not ledger)

    @property
    def spent(self) -> int:
        return self._closed + sum(led.completion_tokens for led in self._active.values())

    def room(self) -> int:
        """Tokens neither charged nor promised to work in flight."""
        return self.tokens - self.spent - sum(led.reserved for led in self._active.values())
