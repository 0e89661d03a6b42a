"""The scheduler: runs one problem (``solve``) or many (``run_batch``) under a policy.

Structure (one ``asyncio.TaskGroup`` per problem)::

    solve ──► _ProblemRun.run ──► TaskGroup ─┬─ request task ─► backend.stream(...)
                 ▲  policy.decide(snapshot)   ├─ request task
                 └── wake-up on every state change (sample/verification done or broken)

On ``Stop`` every request still in flight is cut; leaving the TaskGroup waits for all of
them, and each closes its stream in ``finally`` (the backend closes the HTTP connection,
which makes vLLM abort the generation). When ``solve`` returns, no task it started is
still running.

Cutting a stream exactly
------------------------
A server counts a token when it generates it, not when the client reads it. vLLM steps
every running request together, so when one stream's last token arrives, the other
streams' tokens of that same step are usually still on their way: closing them at once
leaves those tokens counted by the server and missing from the ledger. A backend whose
``cut_grace`` attribute is > 0 (the OpenAI-compatible one) therefore gets a *settled cut*
on ``Stop``:

* a request not yet sent (waiting for a concurrency slot) is dropped at once;
* a sent request is read to the end of its next burst (one burst: the chunks of one
  engine step; waiting at most ``cut_grace`` s for it, else it is cancelled outright) and
  closed, unless more data had already arrived behind that burst (it comes within
  :data:`CUT_DRAIN_S`): then the reader was behind, and it reads on through the backlog
  and one burst that arrives live after it, and closes then. With ``n > 1`` vLLM writes
  one chunk per choice, in index order: a burst ends with the usage of a chunk of the last
  running choice (for ``n = 1``: every chunk is a burst), or when nothing more arrives
  within :data:`CUT_QUIET_S`.

The close then comes right after a step's last chunk was delivered, before the next
step's tokens exist, so the ledger ends equal to the server's count. A reader that keeps
up lets each cut stream run at most one engine step past the ``Stop`` (charged), and the
``Stop`` takes at most a step longer. What remains assumed: the abort reaches the server
before its next step is done (the bundled CPU server steps every 40 ms or more).
Tokens read while settling are charged; a choice that finishes while settling is not a
solution (the policy has stopped), it is recorded as cancelled with all its tokens.
Backends without ``cut_grace`` (fake, replay: they count only what they hand over) are
cancelled at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import structlog
from asyncio_throttle import Throttler

from orchestrator.backends.base import (
    HTTP_REQUESTS,
    Backend,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.decisions import Decision, Sample, Stop, StopCode, Verify
from orchestrator.errors import (
    BackendError,
    ConfigError,
    EndpointUnreachable,
    ModelNotFound,
    PolicyError,
    RequestRejected,
    SolverifyError,
)
from orchestrator.events import (
    DecisionMade,
    Event,
    ProblemDone,
    ProblemStarted,
    RequestFinished,
    RequestStarted,
    SampleCancelled,
    SampleFailed,
    SampleFinished,
    Sink,
    VerificationFinished,
)
from orchestrator.history import ProblemRecord, RunHistory
from orchestrator.ledger import DEFAULT_LAMBDA, ProblemLedger, RequestRecord, RunBudget
from orchestrator.protocols import Policy, Task, policy_verifies
from orchestrator.snapshot import Blocked, BudgetCap, BudgetLeft, InFlight, ProblemSnapshot
from orchestrator.types import (
    UNLIMITED,
    Budget,
    FailedSample,
    Problem,
    RequestKind,
    Solution,
    TokenLogprob,
    Usage,
    Verification,
)

log = structlog.get_logger("solverify.runtime")

#: errors after which a problem cannot make progress: it ends with the error recorded
FATAL_ERRORS: tuple[type[BackendError], ...] = (EndpointUnreachable, ModelNotFound, RequestRejected)
#: largest ``n`` put in one request; bigger ``Sample(k)`` are split
DEFAULT_MAX_N = 16
#: settling a cut stream (see "Cutting a stream exactly"): a pause this long (s) ends a
#: burst of chunks ...
CUT_QUIET_S = 0.01
#: ... and data that comes sooner than this after a burst had already arrived
CUT_DRAIN_S = 0.002


class Limiter:
    """Run-wide limits shared by every problem: concurrent requests and requests/second."""

    def __init__(self, concurrency: int | None = None, rate: float | None = None) -> None:
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 or None, got {concurrency}")
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate must be a positive number of requests/second, got {rate}")
        self.concurrency = concurrency
        self.rate = rate
        self._sem = asyncio.Semaphore(concurrency) if concurrency else None
        if rate is None:
            self._throttler = None
        elif rate >= 1:
            self._throttler = Throttler(rate_limit=int(rate), period=int(rate) / rate)
        else:
            self._throttler = Throttler(rate_limit=1, period=1.0 / rate)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem is not None:
            await self._sem.acquire()
        try:
            if self._throttler is not None:
                await self._throttler.acquire()
            yield
        finally:
            if self._sem is not None:
                self._sem.release()


@dataclass(frozen=True, slots=True)
class SolveResult:
    """The outcome of one problem. ``error`` is set when it ended on a fatal error."""

    problem: Problem
    answer: str | None
    key: str | None
    reason: str
    correct: bool | None
    usage: Usage
    requests: int
    solutions: tuple[Solution, ...]
    verifications: tuple[Verification, ...]
    failed: tuple[FailedSample, ...]
    elapsed: float
    lam: float | None
    cost_units: float
    solution_tokens: int
    verification_tokens: int
    policy: str = ""
    error: str | None = None
    #: the structured stop reason (``Stop.code``): settled, max, budget, failures, error
    stop_code: StopCode = "settled"
    #: generation HTTP requests sent for ``requests`` logical ones (retries and emulated
    #: ``n`` included; 0 for backends without HTTP)
    http_requests: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, *, texts: bool = False) -> dict:
        """A JSON-ready summary (solution texts only when ``texts``)."""
        return {
            "id": self.problem.id,
            "policy": self.policy,
            "answer": self.answer,
            "key": self.key,
            "ground_truth": self.problem.answer,
            "correct": self.correct,
            "reason": self.reason,
            "stop_code": self.stop_code,
            "error": self.error,
            "prompt_tokens": self.usage.prompt_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "tokens_estimated": self.usage.estimated,
            "tokens_estimated_from": list(self.usage.estimated_from),
            "solution_tokens": self.solution_tokens,
            "verification_tokens": self.verification_tokens,
            "requests": self.requests,
            "http_requests": self.http_requests,
            "cost_units": round(self.cost_units, 4),
            "lambda": self.lam,
            "elapsed_s": round(self.elapsed, 4),
            "solutions": [
                {
                    "id": s.id,
                    "answer": s.answer,
                    "key": s.key,
                    "finish_reason": s.finish_reason,
                    "completion_tokens": s.completion_tokens,
                    **({"text": s.text} if texts else {}),
                }
                for s in self.solutions
            ],
            "verifications": [
                {"solution_id": v.solution_id, "p_yes": v.p_yes, "verdict": v.verdict,
                 "source": v.source, "completion_tokens": v.completion_tokens}
                for v in self.verifications
            ],
            "failed": [
                {"kind": f.kind, "reason": f.reason, "error": f.error,
                 "completion_tokens": f.completion_tokens}
                for f in self.failed
            ],
        }


@dataclass(slots=True)
class _Choice:
    sample_id: int
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True)
class _Request:
    request_id: int
    kind: RequestKind
    request: GenerationRequest
    record: RequestRecord
    choices: list[_Choice]
    started_at: float
    solution: Solution | None = None
    task: asyncio.Task | None = None
    backend: Backend | None = None  # who serves it: the solver's or the verifier's
    sent: bool = False  # holds a concurrency slot: the request may be on the server
    cut: bool = False  # the problem stopped: read to the end of the next burst, then close


def policy_name(policy: object) -> str:
    spec = getattr(policy, "spec", None)
    return spec if isinstance(spec, str) else type(policy).__name__


class _ProblemRun:
    """Mutable state of one problem while it runs; only the runtime touches it."""

    def __init__(
        self,
        problem: Problem,
        policy: Policy,
        budget: Budget,
        backend: Backend,
        task: Task,
        limiter: Limiter,
        sinks: Sequence[Sink],
        max_n: int,
        run_budget: RunBudget | None = None,
        history: RunHistory | None = None,
        verifier: Backend | None = None,
    ) -> None:
        self.problem = problem
        self.history = history
        self.policy = policy
        self.budget = budget
        self.backend = backend
        self.task = task
        self.limiter = limiter
        self.sinks = tuple(sinks)
        self.max_n = max_n
        self.ledger = ProblemLedger()
        self.solutions: list[Solution] = []
        self.verifications: list[Verification] = []
        self.failed: list[FailedSample] = []
        self.open: dict[int, _Request] = {}
        self._next_request = 0
        self._next_sample = 0
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self.fatal: BackendError | None = None
        self._sample_max_tokens = task.solve_request(problem, 1).max_tokens
        self._verify_max_tokens = _verify_reservation(task)
        self.run_budget = run_budget
        self.verifier = verifier

    # ---- clock & events --------------------------------------------------------------
    def now(self) -> float:
        return self._loop.time() - self._t0

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)

    # ---- snapshot --------------------------------------------------------------------
    def snapshot(self, blocked: Blocked | None = None) -> ProblemSnapshot:
        in_flight_samples = 0
        sample_tokens: list[int] = []
        verifying: dict[int, int] = {}
        for req in self.open.values():
            pending = [c for c in req.choices if not c.done]
            if req.kind == "solve":
                in_flight_samples += len(pending)
                sample_tokens.extend(c.tokens for c in pending)
            elif req.solution is not None and pending:
                sid = req.solution.id
                verifying[sid] = verifying.get(sid, 0) + len(pending)
        tokens, requests, units = self.ledger.left(self.budget, self._reserved())
        if self.run_budget is not None:
            room = self.run_budget.room()
            tokens = room if tokens is None else min(tokens, room)
        return ProblemSnapshot(
            problem=self.problem,
            solutions=tuple(self.solutions),
            verifications=tuple(self.verifications),
            failed=tuple(self.failed),
            in_flight=InFlight(
                samples=in_flight_samples,
                verifications=tuple(sorted(verifying.items())),
                sample_tokens=tuple(sample_tokens),
            ),
            samples_launched=self.ledger.solutions_launched,
            verifications_launched=self.ledger.verifications_launched,
            requests_launched=self.ledger.requests,
            usage=self.ledger.usage,
            budget=self.budget,
            budget_left=BudgetLeft(tokens, requests, units, self._sample_max_tokens,
                                   self._verify_max_tokens, self._verify_units()),
            elapsed=self.now(),
            lam=self.ledger.lam,
            history=self.history.records if self.history is not None else (),
            blocked=blocked,
        )

    def _verify_units(self) -> float:
        lam = self.ledger.lam
        return DEFAULT_LAMBDA if lam is None else lam

    def _refusing_cap(self, kind: RequestKind) -> BudgetCap:
        """The cap that keeps one more request of ``kind`` from launching now."""
        max_tokens = self._sample_max_tokens if kind == "solve" else self._verify_max_tokens
        tokens, requests, units = self.ledger.left(self.budget, self._reserved())
        if requests is not None and requests < 1:
            return "requests"
        if tokens is not None and tokens < max_tokens:
            return "tokens"
        per = 1.0 if kind == "solve" else self._verify_units()
        if units is not None and units + 1e-9 < per:
            return "cost_units"
        return "run_tokens" if self.run_budget is not None else "tokens"

    # ---- launching -------------------------------------------------------------------
    def _run_room_may_grow(self) -> bool:
        """Blocked only by the run-level budget while other problems still hold
        reservations that may come back unspent?"""
        if self.run_budget is None or self.ledger.admits(
                self.budget, "solve", 1, self._sample_max_tokens, 0) < 1:
            return False
        return self.run_budget.others_in_flight(id(self))

    def _reserved(self) -> int:
        """Tokens promised to work in flight: what each unfinished sample may still generate."""
        return sum(
            max(req.request.max_tokens - c.tokens, 0)
            for req in self.open.values()
            for c in req.choices
            if not c.done
        )

    def _launch(self, tg: asyncio.TaskGroup, kind: RequestKind, n: int,
                solution: Solution | None) -> int:
        """Launch up to ``n`` samples in one request; returns how many the budget admitted."""
        if kind == "solve":
            request = self.task.solve_request(self.problem, n)
        else:
            assert solution is not None
            request = self.task.verify_request(self.problem, solution, n)
        fits = self.ledger.admits(self.budget, kind, n, request.max_tokens, self._reserved())
        if self.run_budget is not None:
            fits = min(fits, max(self.run_budget.room(), 0) // request.max_tokens)
        if fits < 1:
            return 0
        changes: dict = {}
        if fits < n:
            n = changes["n"] = fits
        if request.affinity is None:  # all of a problem's requests belong on one replica
            changes["affinity"] = self.problem.id
            changes["verifies"] = solution.id if solution is not None else None
        if changes:
            request = dataclasses.replace(request, **changes)
        rid = self._next_request
        self._next_request += 1
        choices = []
        for _ in range(n):
            choices.append(_Choice(self._next_sample))
            self._next_sample += 1
        record = self.ledger.open(rid, kind, n)
        backend = self.verifier if kind == "verify" and self.verifier is not None \
            else self.backend
        req = _Request(rid, kind, request, record, choices, self.now(), solution, backend=backend)
        self.open[rid] = req
        if self.sinks:  # events are built only when someone listens (replays run many)
            self.emit(RequestStarted(self.problem.id, req.started_at, rid, kind, n,
                                     solution.id if solution else None))
        req.task = tg.create_task(self._run_request(req), name=f"{self.problem.id}/req{rid}")
        return n

    def _carry_out(self, tg: asyncio.TaskGroup, decisions: Sequence[Decision]) -> tuple[
            Stop | None, bool, list[RequestKind]]:
        """Launch what the decisions ask for. Returns (stop, launched_any, the kinds the
        budget refused, in the order asked)."""
        launched = False
        blocked: list[RequestKind] = []
        for d in decisions:
            if isinstance(d, Stop):
                return d, launched, blocked
            if isinstance(d, Sample):
                kind, remaining, solution = "solve", d.k, None
            elif isinstance(d, Verify):
                if d.solution.id not in {s.id for s in self.solutions}:
                    raise PolicyError(f"Verify of unknown solution id {d.solution.id}")
                kind, remaining, solution = "verify", d.times, d.solution
            else:
                raise PolicyError(f"policy returned {d!r}, not a Sample, Verify or Stop")
            while remaining > 0:
                started = self._launch(tg, kind, min(remaining, self.max_n), solution)
                if started == 0:
                    if kind not in blocked:
                        blocked.append(kind)
                    break
                launched = True
                remaining -= started
        return None, launched, blocked

    # ---- one request -----------------------------------------------------------------
    async def _run_request(self, req: _Request) -> None:
        outcome = "failed"
        error: BackendError | None = None
        counting = HTTP_REQUESTS.set(req.record)  # the backend counts its HTTP requests
        try:
            async with self.limiter.slot():
                req.sent = True
                async with (req.backend or self.backend).stream(req.request) as stream:
                    events = aiter(stream)
                    async for event in events:
                        if req.cut:
                            await self._settle(req, events, event)
                            break
                        self._on_event(req, event)
            outcome = "cancelled" if req.cut else "ok"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except BackendError as exc:
            error = exc
        finally:
            HTTP_REQUESTS.reset(counting)
            self._close_request(req, outcome, error)

    def _on_event(self, req: _Request, event: StreamEvent) -> None:
        if isinstance(event, TextDelta):
            self._on_delta(req, event)
        elif isinstance(event, UsageReport):
            req.record.add_usage(event.prompt_tokens, event.completion_tokens, event.final,
                                 event.cached_prompt_tokens, event.estimated_from)

    async def _settle(self, req: _Request, events: AsyncIterator[StreamEvent],
                      event: StreamEvent) -> None:
        """The settled cut of one stream, from ``event``, the first one after the cut
        (see the module docstring)."""
        behind = False  # data was waiting behind a burst: the reader had fallen behind
        while await self._read_burst(req, events, event):
            probe = asyncio.create_task(_next_event(events))
            try:
                received, _ = await asyncio.wait({probe}, timeout=CUT_DRAIN_S)
                if not received and not behind:
                    return  # nothing more had arrived: close right after the latest chunk
                nxt = await probe
                if nxt is None:
                    return
                if not received:  # arrived live after draining a backlog: read it, close
                    await self._read_burst(req, events, nxt)
                    return
                behind, event = True, nxt
            finally:
                if not probe.done():  # the stream's iterator must be idle before it is closed
                    probe.cancel()
                    await _wait_out(probe)

    async def _read_burst(self, req: _Request, events: AsyncIterator[StreamEvent],
                          event: StreamEvent) -> bool:
        """Charge ``event`` and the rest of its step's burst. True when the burst ended on
        its last running choice's usage (by index: vLLM writes a step's choices in index
        order), so the stream may be read on; False when the stream ended or went quiet
        for :data:`CUT_QUIET_S` (which ends the stream's iterator). Only chunks that
        carried tokens count: a chat stream's role chunk comes just before the first
        token's."""
        last_choice: int | None = None  # choice of the latest delta that carried tokens
        while True:
            self._on_event(req, event)
            if isinstance(event, TextDelta) and event.tokens > 0:
                last_choice = event.choice
            elif isinstance(event, UsageReport):
                if event.final:
                    return False
                running = [i for i, c in enumerate(req.choices) if not c.done]
                if last_choice is not None and last_choice == max(running, default=-1):
                    return True
            try:
                async with asyncio.timeout(CUT_QUIET_S):
                    event = await anext(events)
            except (TimeoutError, StopAsyncIteration):
                return False

    def _on_delta(self, req: _Request, delta: TextDelta) -> None:
        if not 0 <= delta.choice < len(req.choices):
            raise BackendError(
                f"backend sent choice {delta.choice} for a request of n={len(req.choices)}"
            )
        choice = req.choices[delta.choice]
        if choice.done:
            return
        if delta.text:
            choice.parts.append(delta.text)
        choice.tokens += delta.tokens
        choice.logprobs.extend(delta.logprobs)
        req.record.add_delta(delta.tokens, delta.estimated)
        if delta.finish_reason is not None and not req.cut:
            choice.done = True
            self._finish_choice(req, choice, delta.finish_reason)

    def _finish_choice(self, req: _Request, choice: _Choice, finish_reason: str) -> None:
        now = self.now()
        text = choice.text
        if req.kind == "solve":
            grader = self.task.grader
            answer = grader.extract(text)
            key = grader.key(answer) if answer is not None else None
            if key is None:
                answer = None
            lps = [lp.logprob for lp in choice.logprobs if math.isfinite(lp.logprob)]
            solution = Solution(
                id=choice.sample_id, index=len(self.solutions), text=text, answer=answer,
                key=key, finish_reason=finish_reason, completion_tokens=choice.tokens,
                started_at=req.started_at, finished_at=now, request_id=req.request_id,
                mean_logprob=(sum(lps) / len(lps)) if lps else None,
            )
            self.solutions.append(solution)
            self.ledger.solution_lengths.append(choice.tokens)
            if self.sinks:
                self.emit(SampleFinished(self.problem.id, now, solution))
        else:
            assert req.solution is not None
            verdict, p_yes, source = self.task.parse_verdict(text, tuple(choice.logprobs))
            verification = Verification(
                id=choice.sample_id, solution_id=req.solution.id, text=text, verdict=verdict,
                p_yes=p_yes, source=source, completion_tokens=choice.tokens,
                started_at=req.started_at, finished_at=now, request_id=req.request_id,
            )
            self.verifications.append(verification)
            self.ledger.verification_lengths.append(choice.tokens)
            if self.sinks:
                self.emit(VerificationFinished(self.problem.id, now, verification))
        self._changed.set()

    def _close_request(self, req: _Request, outcome: str, error: BackendError | None) -> None:
        """Synchronous cleanup: record unfinished choices, close the ledger entry."""
        now = self.now()
        if outcome == "ok" and any(not c.done for c in req.choices):
            outcome = "failed"
            error = BackendError("stream ended without a finish_reason for every choice")
        reason = "cancelled" if outcome == "cancelled" else "failed"
        for choice in req.choices:
            if choice.done:
                continue
            choice.done = True
            sample = FailedSample(
                id=choice.sample_id, request_id=req.request_id, kind=req.kind, reason=reason,
                error=None if error is None else f"{type(error).__name__}: {error}",
                partial_text=choice.text, completion_tokens=choice.tokens,
                solution_id=req.solution.id if req.solution else None,
            )
            self.failed.append(sample)
            cls = SampleCancelled if reason == "cancelled" else SampleFailed
            if self.sinks:
                self.emit(cls(self.problem.id, now, sample))
        self.ledger.close(req.record, outcome)
        self.open.pop(req.request_id, None)
        if self.sinks:
            self.emit(RequestFinished(
                self.problem.id, now, req.request_id, req.kind, outcome, req.record.usage,
                error=None if error is None else f"{type(error).__name__}: {error}",
            ))
        if error is not None and isinstance(error, FATAL_ERRORS) and self.fatal is None:
            self.fatal = error
        self._changed.set()
        if self.run_budget is not None:
            self.run_budget.notify()

    # ---- the loop --------------------------------------------------------------------
    async def run(self) -> SolveResult:
        name = policy_name(self.policy)
        self.emit(ProblemStarted(self.problem.id, 0.0, name))
        if self.run_budget is not None:
            self.run_budget.join(id(self), self.ledger, self._reserved, self._changed.set)
        try:
            stop, error = await self._run_group()
        finally:
            if self.run_budget is not None:
                self.run_budget.leave(id(self))
        return self._result(stop, error, name)

    async def _run_group(self) -> tuple[Stop, str | None]:
        failure: Exception | None = None
        async with asyncio.TaskGroup() as tg:
            try:
                stop, error = await self._loop_until_stop(tg)
                await self._cut_in_flight()
            except Exception as exc:  # re-raised below, unwrapped, once the group is closed
                failure = exc
            finally:
                for req in list(self.open.values()):
                    if req.task is not None:
                        req.task.cancel()
        if failure is not None:
            raise failure
        return stop, error

    async def _cut_in_flight(self) -> None:
        """The settled cut of everything in flight (module docstring); what is left after
        the backend's ``cut_grace`` is cancelled by the caller."""
        if not self.open:
            return
        grace = 0.0
        waiting = []
        for req in list(self.open.values()):
            mine = getattr(req.backend or self.backend, "cut_grace", 0.0) or 0.0
            if mine <= 0:
                continue  # cancelled by the caller at once
            req.cut = True
            if req.task is None:
                continue
            if req.sent:
                waiting.append(req.task)
                grace = max(grace, mine)
            else:
                req.task.cancel()  # never reached the server: nothing to settle
        if waiting:
            await asyncio.wait(waiting, timeout=grace)

    async def _loop_until_stop(self, tg: asyncio.TaskGroup) -> tuple[Stop, str | None]:
        """Ask the policy, launch what it wants, wait for a change; until it stops. Only a
        fatal backend error ends the problem without the policy: when the budget refuses
        work and nothing is in flight, the policy is asked once more with
        ``snapshot.blocked`` set (orchestrator.protocols) and must stop or ask for work
        that fits."""
        note: Blocked | None = None
        while True:
            self._changed.clear()
            if self.fatal is not None:
                fallback = _majority_stop(self.solutions, "ended on a backend error", "error")
                return fallback, f"{type(self.fatal).__name__}: {self.fatal}"
            snap = self.snapshot(note)
            decisions = tuple(self.policy.decide(snap))
            stop, launched, refused = self._carry_out(tg, decisions)
            if decisions:
                if self.sinks:
                    self.emit(DecisionMade(self.problem.id, self.now(), decisions,
                                           len(self.solutions), len(self.open)))
            if stop is not None:
                return stop, None
            if self.open:
                note = None
                await self._changed.wait()
                continue
            if refused or snap.budget_left.exhausted:
                if self._run_room_may_grow():
                    note = None
                    await self._changed.wait()  # another problem may free shared budget
                    continue
                if note is not None:
                    asked = (f"asked again for {' and '.join(refused)} work" if refused
                             else "returned no work and no Stop")
                    raise PolicyError(
                        f"policy {policy_name(self.policy)} {asked} after being told that "
                        f"{note.reason}, with nothing in flight; it must stop "
                        "(Stop(..., code='budget')) or ask for work that fits")
                note = Blocked(tuple(refused), self._refusing_cap(refused[0] if refused
                                                                   else "solve"))
                continue
            if not launched:
                raise PolicyError(
                    f"policy {policy_name(self.policy)} returned no work and no Stop "
                    "with nothing in flight"
                )
            note = None

    def _result(self, stop: Stop, error: str | None, name: str) -> SolveResult:
        correct = None
        if self.problem.answer is not None or self.problem.aliases:
            correct = (
                False if stop.answer is None else self.task.grader.is_correct(stop.answer,
                                                                               self.problem)
            )
        usage = self.ledger.usage
        result = SolveResult(
            problem=self.problem, answer=stop.answer, key=stop.key, reason=stop.reason,
            correct=correct, usage=usage, requests=self.ledger.requests,
            solutions=tuple(self.solutions), verifications=tuple(self.verifications),
            failed=tuple(self.failed), elapsed=self.now(), lam=self.ledger.lam,
            cost_units=self.ledger.cost_units,
            solution_tokens=self.ledger.usage_of("solve").completion_tokens,
            verification_tokens=self.ledger.usage_of("verify").completion_tokens,
            policy=name, error=error, stop_code=stop.code,
            http_requests=self.ledger.http_requests,
        )
        if self.history is not None:
            by_id = {s.id: s.key for s in self.solutions}
            index_of = {s.id: s.index for s in self.solutions}
            self.history.add(ProblemRecord(
                problem_id=self.problem.id, stop_code=stop.code, answer_key=stop.key,
                keys=tuple(s.key for s in self.solutions),
                lengths=tuple(s.completion_tokens for s in self.solutions),
                readings=tuple((by_id.get(v.solution_id), v.p_yes) for v in self.verifications
                               if v.p_yes is not None),
                reading_solutions=tuple(index_of[v.solution_id] for v in self.verifications
                                        if v.p_yes is not None),
                solution_tokens=result.solution_tokens,
                verification_tokens=result.verification_tokens,
            ))
        self.emit(ProblemDone(
            self.problem.id, result.elapsed, result.answer, result.reason, result.correct,
            usage, result.requests, len(self.solutions), len(self.verifications), error,
        ))
        return result


async def _next_event(events: AsyncIterator[StreamEvent]) -> StreamEvent | None:
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


async def _wait_out(task: asyncio.Task) -> None:
    """Wait until ``task`` (already cancelled) is done, even if this task is cancelled
    meanwhile (a TaskGroup cancels its children again when it aborts); a cancellation
    received while waiting is raised afterwards."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _majority_stop(solutions: Iterable[Solution], why: str, code: StopCode) -> Stop:
    """Fallback answer when the runtime (not the policy) ends a problem: only on a fatal
    backend error (the budget never ends a problem on the policy's behalf)."""
    counts: dict[str, list] = {}
    for s in solutions:
        if s.key is not None:
            counts.setdefault(s.key, [s.answer, 0, s.index])[1] += 1
    if not counts:
        return Stop(None, f"{why}; no answer", code=code)
    key, (answer, votes, _) = min(counts.items(), key=lambda kv: (-kv[1][1], kv[1][2]))
    return Stop(answer, f"{why}; majority of {votes} vote(s)", key, code)


def _verify_reservation(task: Task) -> int:
    """Tokens one verification request reserves (``task.verify_max_tokens``; 1 when the
    task does not say, see :class:`orchestrator.protocols.Task`)."""
    value = getattr(task, "verify_max_tokens", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def check_budget_fits(policy: Policy, budget: Budget, task: Task, problem: Problem,
                      run_tokens: int | None = None) -> None:
    """A ``ConfigError`` when a token cap cannot hold even one request of a kind the
    policy needs: one solution sample (every policy), one verification (a policy that
    declares ``verifies``). Checked before any request is sent."""
    sample = task.solve_request(problem, 1).max_tokens
    verify = _verify_reservation(task) if policy_verifies(policy) else None
    for what, cap, flag in (("token budget", budget.tokens, "--budget-tokens"),
                            ("run token budget", run_tokens, "--run-budget-tokens")):
        if cap is None:
            continue
        if cap < sample:
            raise ConfigError(
                f"a {what} of {cap} completion tokens cannot hold one solution request "
                f"(it reserves max_tokens={sample}); raise {flag} or lower --max-tokens")
        if verify is not None and cap < verify:
            raise ConfigError(
                f"policy {policy_name(policy)} verifies, and a {what} of {cap} completion "
                f"tokens cannot hold one verification request (it reserves "
                f"verify_max_tokens={verify}); raise {flag} or lower --verify-max-tokens")


def as_problem(problem: Problem | str) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, str):
        if not problem.strip():
            raise ConfigError("problem text is empty")
        return Problem(id="problem", problem=problem)
    raise ConfigError(f"problem must be a Problem or a str, got {type(problem).__name__}")


async def solve(
    problem: Problem | str,
    policy: Policy,
    budget: Budget | None = None,
    backend: Backend | None = None,
    *,
    task: Task | None = None,
    limiter: Limiter | None = None,
    sinks: Sequence[Sink] = (),
    max_n: int = DEFAULT_MAX_N,
    run_budget: RunBudget | None = None,
    history: RunHistory | None = None,
    verifier: Backend | None = None,
) -> SolveResult:
    """Answer one problem under ``policy`` within ``budget`` using ``backend``.

    ``task`` (prompts, grader, verifier) defaults to :func:`orchestrator.tasks.task_for`
    on this problem. A fatal backend error (unreachable endpoint, unknown model, rejected
    request) ends the problem with ``result.error`` set rather than raising, so batch runs
    keep every result; a policy bug raises :class:`PolicyError`. ``history`` (a
    :class:`~orchestrator.history.RunHistory`) is what earlier problems of the same run
    looked like: the snapshot shows it to the policy, and this problem is added to it
    when it finishes. ``verifier`` serves the verification requests (another model or
    endpoint; default: ``backend``); the measured λ (``result.lam``) is then the
    verifier's tokens per verification over the solver's per solution.

    A token cap that cannot hold one solution request (or one verification, for a
    policy that ``verifies``) is a ``ConfigError`` before any request is sent.
    """
    if backend is None:
        raise ConfigError("solve() needs a backend (e.g. OpenAIBackend(base_url=..., model=...))")
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"policy {policy!r} has no decide(snapshot) method")
    if max_n < 1:
        raise ConfigError(f"max_n must be >= 1, got {max_n}")
    prob = as_problem(problem)
    if task is None:
        from orchestrator.tasks import task_for

        task = task_for([prob])
    budget = budget or UNLIMITED
    check_budget_fits(policy, budget, task, prob,
                      run_budget.tokens if run_budget is not None else None)
    run = _ProblemRun(prob, policy, budget, backend, task,
                      limiter or Limiter(), sinks, max_n, run_budget, history, verifier)
    return await run.run()


async def run_batch(
    problems: Sequence[Problem],
    policy: Policy,
    budget: Budget | None = None,
    backend: Backend | None = None,
    *,
    task: Task | None = None,
    concurrency: int | None = 32,
    rate: float | None = None,
    problems_in_flight: int | None = None,
    sinks: Sequence[Sink] = (),
    on_result: Callable[[SolveResult], None] | None = None,
    max_n: int = DEFAULT_MAX_N,
    run_tokens: int | None = None,
    verifier: Backend | None = None,
) -> list[SolveResult]:
    """Run many problems concurrently; results come back in input order.

    ``concurrency`` caps requests in flight across the whole batch, ``rate`` caps
    requests/second, ``problems_in_flight`` caps problems started at once (default: as many
    as ``concurrency``). ``on_result`` is called as each problem finishes (write results as
    they come, so none are lost if the run is interrupted). A problem that ends on a
    fatal backend error is returned with ``error`` set; it does not stop the others.
    The problems share one :class:`~orchestrator.history.RunHistory` (``snapshot.history``).
    ``verifier``: as in :func:`solve`. Budgets too small for one request: a
    ``ConfigError`` before any problem starts.
    """
    if not problems:
        raise ConfigError("run_batch() got no problems")
    if task is None:
        from orchestrator.tasks import task_for

        task = task_for(problems)
    check_budget_fits(policy, budget or UNLIMITED, task, problems[0], run_tokens)
    limiter = Limiter(concurrency, rate)
    shared = RunBudget(run_tokens) if run_tokens is not None else None
    history = RunHistory()
    gate = asyncio.Semaphore(problems_in_flight or concurrency or len(problems))
    results: list[SolveResult | None] = [None] * len(problems)

    async def one(i: int, prob: Problem) -> None:
        async with gate:
            result = await solve(prob, policy, budget, backend, task=task, limiter=limiter,
                                 sinks=sinks, max_n=max_n, run_budget=shared,
                                 history=history, verifier=verifier)
        results[i] = result
        if on_result is not None:
            on_result(result)

    async with asyncio.TaskGroup() as tg:
        for i, prob in enumerate(problems):
            tg.create_task(one(i, prob), name=f"problem:{prob.id}")
    return [r for r in results if r is not None]


__all__ = ["Limiter", "SolveResult", "SolverifyError", "check_budget_fits", "run_batch",
           "solve"]
