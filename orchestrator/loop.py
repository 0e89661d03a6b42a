"""The decision loop of one problem: ask the policy, launch what it wants, wait, repeat.

Structure (one ``asyncio.TaskGroup`` per problem)::

    ProblemRun.run ──► TaskGroup ─┬─ request task ─► reader.read_request ─► backend.stream
      ▲  policy.decide(snapshot)  ├─ request task
      └── ledger.changed: a choice finished, a request closed (here or, with a shared
          run budget, anywhere in the run)

Who does what: the :class:`~orchestrator.ledger.ProblemLedger` charges tokens and admits
work (every budget question is answered there); :mod:`orchestrator.reader` reads each
stream and settles the cut ones; this module builds the snapshots, carries out the
policy's decisions, turns finished choices into solutions and verifications (the task's
grader and verdict parser), and records what did not finish. ``Cancel(kind)`` cancels
the requests of that kind in flight (their tasks end with ``CancelledError`` and close
their streams and ledger records as any cancelled request does). On ``Stop`` every request
still in flight is cut; leaving the TaskGroup waits for all of them, and each closes its
stream in ``finally``. When :meth:`ProblemRun.run` returns, no task it started is still
running.

Errors: a fatal backend error ends the problem with ``result.error`` set; a decision the
runtime cannot carry out is a :class:`~orchestrator.errors.PolicyError`; an exception
raised by user code (the policy's ``decide``, the task's requests and verdict parser, the
grader) propagates as itself, never wrapped in an ``ExceptionGroup``, with a note naming
the code and the problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterable, Sequence

from orchestrator.backends.base import Backend
from orchestrator.decisions import Cancel, Decision, Sample, Stop, StopCode, Verify
from orchestrator.errors import (
    FATAL_ERRORS,
    BackendError,
    PolicyError,
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
from orchestrator.ledger import ProblemLedger, RunBudget
from orchestrator.limiter import Limiter
from orchestrator.protocols import Policy, Task
from orchestrator.reader import Choice, Request, cut, read_request
from orchestrator.result import SolveResult, error_text, policy_name
from orchestrator.snapshot import Blocked, InFlight, ProblemSnapshot, VoteTally
from orchestrator.types import (
    Budget,
    FailedSample,
    Problem,
    RequestKind,
    Solution,
    Verification,
    is_count,
)

__all__ = ["FATAL_ERRORS", "ProblemRun", "first_exception", "majority_stop",
           "verify_reservation"]



def verify_reservation(task: Task) -> int:
    """Tokens one verification request reserves (``task.verify_max_tokens``; 1 when the
    task does not say, see :class:`orchestrator.protocols.Task`)."""
    value = getattr(task, "verify_max_tokens", None)
    return value if is_count(value) else 1


def blame(exc: BaseException, what: str, problem: Problem) -> None:
    """Note on an exception from user code which code raised it, on which problem."""
    exc.add_note(f"solverify: raised by {what} on problem {problem.id!r}")


class ProblemRun:
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
        self.verifier = verifier if verifier is not None else backend
        self.task = task
        self.limiter = limiter
        self.sinks = tuple(sinks)
        self.max_n = max_n
        try:
            sample_tokens = task.solve_request(problem, 1).max_tokens
        except Exception as exc:
            blame(exc, "the task's solve_request()", problem)
            raise
        self.ledger = ProblemLedger(budget, run_budget, sample_tokens=sample_tokens,
                                    verify_tokens=verify_reservation(task))
        self.solutions: list[Solution] = []
        self.verifications: list[Verification] = []
        self.failed: list[FailedSample] = []
        self.tally = VoteTally()
        self.open: dict[int, Request] = {}
        self._next_request = 0
        self._next_sample = 0
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._settlers: list[asyncio.Task] = []  # bound the settled cuts of Cancel decisions
        self.fatal: BackendError | None = None

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
            if req.cancelling:
                continue  # cancelled by the policy; only settling its last tokens
            record = req.record
            if req.kind == "solve":
                for i in range(record.n):
                    if not record.choice_done[i]:
                        in_flight_samples += 1
                        sample_tokens.append(record.choice_tokens[i])
            elif req.solution is not None:
                pending = req.pending()
                if pending:
                    sid = req.solution.id
                    verifying[sid] = verifying.get(sid, 0) + pending
        ledger = self.ledger
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
            samples_launched=ledger.solutions_launched,
            verifications_launched=ledger.verifications_launched,
            requests_launched=ledger.requests,
            usage=ledger.usage,
            budget=self.budget,
            budget_left=ledger.budget_left(),
            elapsed=self.now(),
            lam=ledger.lam,
            history=self.history.records if self.history is not None else (),
            blocked=blocked,
            tally=self.tally.ranked(),
        )

    # ---- launching -------------------------------------------------------------------
    def _launch(self, tg: asyncio.TaskGroup, kind: RequestKind, n: int,
                solution: Solution | None) -> int:
        """Launch up to ``n`` samples in one request; returns how many the budget admitted."""
        try:
            if kind == "solve":
                request = self.task.solve_request(self.problem, n)
            else:
                assert solution is not None
                request = self.task.verify_request(self.problem, solution, n)
        except Exception as exc:
            blame(exc, f"the task's {kind}_request()", self.problem)
            raise
        fits = self.ledger.admits(kind, n, request.max_tokens)
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
            choices.append(Choice(self._next_sample))
            self._next_sample += 1
        record = self.ledger.open(rid, kind, n, request.max_tokens)
        backend = self.verifier if kind == "verify" else self.backend
        req = Request(rid, kind, request, record, choices, self.now(), backend, solution)
        self.open[rid] = req
        if self.sinks:  # events are built only when someone listens (replays run many)
            self.emit(RequestStarted(self.problem.id, req.started_at, rid, kind, n,
                                     solution.id if solution else None))
        req.task = tg.create_task(read_request(req, self.ledger, self.limiter, self),
                                  name=f"{self.problem.id}/req{rid}")
        return n

    def _carry_out(self, tg: asyncio.TaskGroup, decisions: Sequence[Decision]) -> tuple[
            Stop | None, bool, list[RequestKind]]:
        """Launch (or cancel) what the decisions ask for. Returns (stop, whether anything
        was launched or cancelled, the kinds the budget refused, in the order asked)."""
        launched = False
        blocked: list[RequestKind] = []
        before = self._next_request  # a Cancel applies to the requests launched before this
        for d in decisions:
            if isinstance(d, Stop):
                return d, launched, blocked
            if isinstance(d, Cancel):
                launched = self._cancel(tg, before, d.kind) or launched
                continue
            if isinstance(d, Sample):
                kind, remaining, solution = "solve", d.k, None
            elif isinstance(d, Verify):
                solution = next((s for s in self.solutions if s.id == d.solution.id), None)
                if solution is None:
                    raise PolicyError(f"Verify of unknown solution id {d.solution.id}")
                if solution != d.solution:  # ids start at 0 in every problem
                    raise PolicyError(
                        f"Verify of solution id {d.solution.id} with a solution that is not "
                        "this problem's (another problem's, or altered)")
                kind, remaining = "verify", d.times
            else:
                raise PolicyError(f"policy returned {d!r}, not a Sample, Verify, Cancel or "
                                  "Stop")
            while remaining > 0:
                started = self._launch(tg, kind, min(remaining, self.max_n), solution)
                if started == 0:
                    if kind not in blocked:
                        blocked.append(kind)
                    break
                launched = True
                remaining -= started
        return None, launched, blocked

    def _cancel(self, tg: asyncio.TaskGroup, before: int, kind: RequestKind) -> bool:
        """``Cancel(kind)``: cancel the open requests of ``kind`` launched before this
        decision (ids below ``before``) and not cancelled yet; True when there was one.

        A request whose task has not run yet never will (its coroutine is cancelled before
        it starts), so it is closed here, as its reader would have closed it; one still
        waiting for a slot never reached the server and is cancelled. One on the server
        of a backend with ``cut_grace`` gets the settled cut, as at a stop (the tokens of
        its current step are on their way and the server counts them): a watcher in the
        problem's task group cuts it if its next step has not come within ``cut_grace``.
        Any other is cancelled at once."""
        settling: list[Request] = []
        any_ = False
        for req in list(self.open.values()):
            if req.kind != kind or req.cancelling or req.request_id >= before:
                continue
            req.cancelling = True
            any_ = True
            if req.sent and req.backend.cut_grace > 0:
                req.cut = True  # the reader settles it at its next event
                settling.append(req)
                continue
            if req.task is not None:
                req.task.cancel()
            if not req.begun:
                self.on_closed(req, "cancelled", None)
                self.ledger.close(req.record, "cancelled")
        if settling:
            self._settlers.append(tg.create_task(
                self._bound_settle(settling), name=f"{self.problem.id}/cancel{before}"))
        return any_

    async def _bound_settle(self, reqs: list[Request]) -> None:
        """Bound the settled cut of cancelled requests by their backends' ``cut_grace``:
        one whose next step has not come by then is cut now (and read to its end by its
        reader), or, still opening, as soon as it opens; one that cannot be cut is
        cancelled."""
        tasks = [req.task for req in reqs if req.task is not None]
        if not tasks:
            return
        grace = max(req.backend.cut_grace for req in reqs)
        _, late = await asyncio.wait(tasks, timeout=grace)
        for req in reqs:
            if req.task not in late or req.cut_sent or req.cut_on_open:
                continue
            if req.events is not None:
                cut(req)
            elif req.opening:
                req.cut_on_open = True
            else:
                req.task.cancel()

    # ---- what the reader reports (orchestrator.reader.RequestOwner) --------------------
    def on_finished(self, req: Request, index: int, finish_reason: str) -> None:
        now = self.now()
        choice = req.choices[index]
        tokens = req.tokens(index)
        text = choice.text
        if req.kind == "solve":
            grader = self.task.grader
            try:
                answer = grader.extract(text)
                key = grader.key(answer) if answer is not None else None
            except Exception as exc:
                blame(exc, "the grader", self.problem)
                raise
            if key is None:
                answer = None
            lps = [lp.logprob for lp in choice.logprobs if math.isfinite(lp.logprob)]
            solution = Solution(
                id=choice.sample_id, index=len(self.solutions), text=text, answer=answer,
                key=key, finish_reason=finish_reason, completion_tokens=tokens,
                started_at=req.started_at, finished_at=now, request_id=req.request_id,
                mean_logprob=(sum(lps) / len(lps)) if lps else None,
            )
            self.solutions.append(solution)
            self.tally.add(solution)
            if self.sinks:
                self.emit(SampleFinished(self.problem.id, now, solution))
        else:
            assert req.solution is not None
            try:
                verdict, p_yes, source = self.task.parse_verdict(text, tuple(choice.logprobs))
            except Exception as exc:
                blame(exc, "the task's parse_verdict()", self.problem)
                raise
            verification = Verification(
                id=choice.sample_id, solution_id=req.solution.id, text=text, verdict=verdict,
                p_yes=p_yes, source=source, completion_tokens=tokens,
                started_at=req.started_at, finished_at=now, request_id=req.request_id,
            )
            self.verifications.append(verification)
            if self.sinks:
                self.emit(VerificationFinished(self.problem.id, now, verification))

    def on_closed(self, req: Request, outcome: str, error: BackendError | None) -> None:
        """Synchronous cleanup: record unfinished choices (the reader then closes the
        ledger record)."""
        now = self.now()
        reason = "cancelled" if outcome == "cancelled" else "failed"
        for i, choice in enumerate(req.choices):
            if req.done(i):
                continue
            # a choice of an emulated n that failed while the others ran on is failed,
            # even when the request then ended cancelled (the problem stopped)
            failure = req.failed_choices.get(i)
            why = "failed" if failure is not None else reason
            sample = FailedSample(
                id=choice.sample_id, request_id=req.request_id, kind=req.kind, reason=why,
                error=failure if failure is not None else error, partial_text=choice.text,
                completion_tokens=req.tokens(i),
                solution_id=req.solution.id if req.solution else None,
            )
            self.failed.append(sample)
            cls = SampleCancelled if why == "cancelled" else SampleFailed
            if self.sinks:
                self.emit(cls(self.problem.id, now, sample))
        if self.fatal is None:
            # a fatal error of one choice of an emulated n (a choice's stream opened after
            # the others had begun: the request's own error is then a StreamBroken) is
            # fatal too, as it is when it is the request's
            for e in (error, *req.failed_choices.values()):
                if isinstance(e, FATAL_ERRORS):
                    self.fatal = e
                    break
        self.open.pop(req.request_id, None)
        if self.sinks:
            self.emit(RequestFinished(
                self.problem.id, now, req.request_id, req.kind, outcome, req.record.usage,
                error=None if error is None else error_text(error),
            ))

    # ---- the loop --------------------------------------------------------------------
    async def run(self) -> SolveResult:
        name = policy_name(self.policy)
        self.emit(ProblemStarted(self.problem.id, 0.0, name))
        with self.ledger.in_run():
            stop, error = await self._run_group()
        return self._result(stop, error, name)

    async def _run_group(self) -> tuple[Stop, BackendError | None]:
        failure: Exception | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                try:
                    stop, error = await self._loop_until_stop(tg)
                    await self._cut_in_flight()
                except Exception as exc:  # re-raised below, unwrapped, once the group is closed
                    failure = exc
                finally:
                    for settler in self._settlers:
                        settler.cancel()
                    for req in list(self.open.values()):
                        if req.task is not None:
                            req.task.cancel()
                        if not req.begun:  # launched with the Stop: its task never runs,
                            # so it cannot close its request itself (as in _cancel)
                            self.on_closed(req, "cancelled", None)
                            self.ledger.close(req.record, "cancelled")
        except BaseExceptionGroup as group:  # a request task raised: user code or a bug
            first = first_exception(group)
            raise first from first.__cause__
        if failure is not None:
            raise failure
        return stop, error

    async def _cut_in_flight(self) -> None:
        """The settled cut of everything in flight (:mod:`orchestrator.reader`): a stream
        whose next step has not come within its backend's ``cut_grace`` is cut then (and
        read to its end), or, if it cannot be cut, left to the caller to cancel."""
        for settler in self._settlers:
            settler.cancel()  # the stop's own cut takes over every open request
        if not self.open:
            return
        grace = 0.0
        waiting = []
        for req in list(self.open.values()):
            mine = req.backend.cut_grace
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
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=grace)
        reading = []
        for req in list(self.open.values()):
            if req.task not in late:
                continue
            if req.cut_sent or req.cut_on_open:
                pass  # cut already (by a Cancel's watcher): being read to its end
            elif req.events is not None:
                cut(req)  # no step came: cut it now and read what the server still sends
            elif req.opening:
                req.cut_on_open = True  # the server may have sent tokens already
            else:
                continue  # cannot be cut: cancelled by the caller
            reading.append(req.task)
        if reading:
            await asyncio.wait(reading)

    def _decide(self, snap: ProblemSnapshot) -> tuple[Decision, ...]:
        try:
            raw = self.policy.decide(snap)
            if not isinstance(raw, Iterable):
                raise PolicyError(f"policy {policy_name(self.policy)} returned {raw!r}, not "
                                  "a sequence of decisions (e.g. [Sample(4)] or [Stop(...)])")
            return tuple(raw)
        except Exception as exc:
            blame(exc, f"policy {policy_name(self.policy)}'s decide()", self.problem)
            raise

    async def _loop_until_stop(self, tg: asyncio.TaskGroup) -> tuple[Stop, BackendError | None]:
        """Ask the policy, launch what it wants, wait for a change; until it stops. Only a
        fatal backend error ends the problem without the policy: when the budget refuses
        work and nothing is in flight, the policy is asked once more with
        ``snapshot.blocked`` set (orchestrator.protocols) and must stop or ask for work
        that fits."""
        note: Blocked | None = None
        changed = self.ledger.changed
        while True:
            changed.clear()
            if self.fatal is not None:
                fallback = majority_stop(self.solutions, "ended on a backend error", "error")
                return fallback, self.fatal
            snap = self.snapshot(note)
            decisions = self._decide(snap)
            stop, launched, refused = self._carry_out(tg, decisions)
            if decisions:
                if self.sinks:
                    self.emit(DecisionMade(self.problem.id, self.now(), decisions,
                                           len(self.solutions), len(self.open)))
            if stop is not None:
                return stop, None
            if self.open:
                note = None
                await changed.wait()
                continue
            if refused or snap.budget_left.exhausted:
                if self.ledger.run_room_may_grow():
                    note = None
                    await changed.wait()  # another problem may free shared budget
                    continue
                if note is not None:
                    asked = (f"asked again for {' and '.join(refused)} work" if refused
                             else "returned no work and no Stop")
                    raise PolicyError(
                        f"policy {policy_name(self.policy)} {asked} after being told that "
                        f"{note.reason}, with nothing in flight; it must stop "
                        "(Stop(..., code='budget')) or ask for work that fits")
                note = Blocked(tuple(refused),
                               self.ledger.refusing_cap(refused[0] if refused else "solve"))
                continue
            if not launched:
                raise PolicyError(
                    f"policy {policy_name(self.policy)} returned no work and no Stop "
                    "with nothing in flight"
                )
            note = None

    def _result(self, stop: Stop, error: BackendError | None, name: str) -> SolveResult:
        correct = None
        if self.problem.answer is not None or self.problem.aliases:
            try:
                correct = (False if stop.answer is None
                           else self.task.grader.is_correct(stop.answer, self.problem))
            except Exception as exc:
                blame(exc, "the grader's is_correct()", self.problem)
                raise
        ledger = self.ledger
        usage = ledger.usage
        result = SolveResult(
            problem=self.problem, answer=stop.answer, key=stop.key, reason=stop.reason,
            correct=correct, usage=usage, requests=ledger.requests,
            solutions=tuple(self.solutions), verifications=tuple(self.verifications),
            failed=tuple(self.failed), elapsed=self.now(), lam=ledger.lam,
            cost_units=ledger.cost_units,
            solution_tokens=ledger.usage_of("solve").completion_tokens,
            verification_tokens=ledger.usage_of("verify").completion_tokens,
            policy=name, error=error, stop_code=stop.code,
            http_requests=ledger.http_requests,
            abandoned_http_requests=ledger.abandoned_http_requests,
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
            usage, result.requests, len(self.solutions), len(self.verifications),
            result.error_text,
        ))
        return result


def first_exception(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a (possibly nested) group."""
    first = group.exceptions[0]
    return first_exception(first) if isinstance(first, BaseExceptionGroup) else first


def majority_stop(solutions: Iterable[Solution], why: str, code: StopCode) -> Stop:
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
