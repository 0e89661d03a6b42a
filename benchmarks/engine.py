"""The lean replay engine: one order of a recorded pool under a policy, without asyncio.

It gives the same :class:`~orchestrator.runtime.SolveResult` per problem (answer, key,
tokens, latency, stop code, solutions, verifications, failed samples, ...) and the same
run history as :func:`benchmarks.replay.run_runtime_order`, which runs every problem of
the order through :func:`orchestrator.runtime.solve` on a
:class:`~orchestrator.backends.replay.ReplayBackend` on the simulated clock. It calls the
same policy's ``decide`` on the same :class:`~orchestrator.snapshot.ProblemSnapshot`;
what it leaves out is the machinery: no task per request, no async generator per stream,
no events, no per-delta dataclasses.

Why it is a small event loop and not a plain heap of finish times. The problems of an
order share one :class:`~orchestrator.history.RunHistory`, and policies that learn from
it (``adaptive``, the verifying policies) decide differently depending on which other
problems had finished when they decided. Many events fall on the same simulated instant
(every capitals sample is 1-3 tokens long), and then what a decision sees depends on the
order in which asyncio ran the callbacks of that instant: the timer heap's order among
equal deadlines (``heapq`` is not stable), then one loop iteration per hop (a timer wakes
a stream, the stream's finished choice wakes the decision loop, a ``Stop`` cancels the
streams, their done-callbacks wake the problem's TaskGroup, which then records the
problem in the history). So this engine keeps asyncio's order: a ``heapq`` of timer
entries compared by deadline only, pushed, cancelled and cleaned up exactly like
:meth:`asyncio.BaseEventLoop._run_once` does (the same clock arithmetic, clock
resolution and cancelled-timer clean-up rule), and a FIFO of callbacks run one loop
iteration at a time, with one entry for each hop the runtime's tasks make. The tests
(``tests/test_replay.py``) check per-problem identity against the runtime on many
orders and pools, for every registered policy.

What it supports: what ``bench replay`` uses without a concurrency cap (one request per
up to ``max_n`` samples, no budget, no fatal errors; ``PoolExhausted`` handled like the
backend raises it). With a per-problem concurrency cap the benchmarks use the runtime.
"""

from __future__ import annotations

import gc
import heapq
import math
import time
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

from benchmarks.source import ReplaySource
from orchestrator.backends.replay import PoolExhausted, parse_sample_text, sample_text
from orchestrator.decisions import Cancel, Sample, Stop, Verify
from orchestrator.errors import BackendError, ConfigError, PolicyError, error_text
from orchestrator.fastinit import builder
from orchestrator.history import ProblemRecord, RunHistory
from orchestrator.ledger import DEFAULT_LAMBDA, cost_units, lambda_of_sums
from orchestrator.result import SolveResult, policy_name
from orchestrator.snapshot import (
    BudgetLeft,
    InFlight,
    ProblemSnapshot,
    VoteTally,
    broken_samples,
)
from orchestrator.types import (
    UNLIMITED,
    FailedSample,
    Problem,
    Solution,
    TokenLogprob,
    Usage,
    Verification,
)

__all__ = ["run_order"]

_EPS = 1e-9  # as orchestrator.backends.replay
#: the estimated_from of a request that closed without any usage report
_UNREPORTED = ("nothing", "prompt")
#: asyncio.base_events: the cancelled-timer clean-up rule and the longest select timeout
_MIN_SCHEDULED = 100
_MIN_CANCELLED_FRACTION = 0.5
_MAX_SELECT_TIMEOUT = 24 * 3600
_RESOLUTION = time.get_clock_info("monotonic").resolution


# Constructors without the frozen dataclasses' __init__ (orchestrator.fastinit): every
# field positional, in field order (tests/test_snapshot_tally.py checks the orders)
_solution = builder(Solution)
_verification = builder(Verification)
_snapshot = builder(ProblemSnapshot)
_in_flight = builder(InFlight)
_usage = builder(Usage)
_result = builder(SolveResult)
_record = builder(ProblemRecord)
# FailedSample(...) with the error_text its __post_init__ computes passed last
_failed_sample = builder(FailedSample, computed=True)


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


class _Timer:
    """A timer entry; compared by deadline only, like asyncio's TimerHandle."""

    __slots__ = ("cancelled", "scheduled", "stream", "when")

    def __init__(self, when: float, stream: _Stream) -> None:
        self.when = when
        self.stream = stream
        self.cancelled = False
        self.scheduled = True

    def __lt__(self, other: _Timer) -> bool:
        return self.when < other.when


class _Choice:
    __slots__ = ("answer", "done", "emitted", "end", "key", "logprobs", "sample_id", "text",
                 "total")

    def __init__(self, sample_id: int) -> None:
        self.sample_id = sample_id
        self.done = False
        self.emitted = 0
        # set when the request opens its stream, for the choices it serves: text, total
        # (tokens), end (when its last token comes), a solution's extracted answer and its
        # key, a verification's logprobs
        self.text: str
        self.answer: str | None
        self.key: str | None
        self.total: int
        self.end: float
        self.logprobs: tuple[TokenLogprob, ...]


class _Stream:
    """One request: the runtime's request task and the backend's stream in one."""

    __slots__ = ("armed", "cancel", "choices", "emitted", "handle", "kind", "n_served",
                 "next_end", "pending", "prob", "reported", "request_id", "solution", "start",
                 "started_at", "state", "waiting", "wakeups")

    def __init__(self, prob: _Problem, request_id: int, kind: str, choices: list[_Choice],
                 solution: Solution | None, started_at: float) -> None:
        self.prob = prob
        self.request_id = request_id
        self.kind = kind
        self.choices = choices
        self.solution = solution
        self.started_at = started_at
        self.state = "new"  # new -> open -> closed
        self.cancel = False  # Task.cancel() asked (asyncio's _must_cancel / cancelled waiter)
        self.waiting = False  # awaiting its waiter future (not done; else a wake-up is queued)
        self.handle: _Timer | None = None
        # set when the stream opens: the time it opened, the choices served, the unfinished
        # served choices and the earliest end among them, the deadline its timer is armed
        # for, and with chunks > 1 its wake-up times still to come (sorted; None with one
        # chunk per choice, where the next wake-up is the earliest end of a pending choice)
        self.start: float
        self.n_served: int
        self.pending: list[_Choice]
        self.next_end: float
        self.armed: float
        self.wakeups: list[float] | None
        # The request's ledger record (orchestrator.ledger.RequestRecord) reduced to what a
        # replay sets: every delta is followed by a usage report of the tokens streamed so
        # far (prompt 0), so the record's completion is ``emitted`` once ``reported``, and
        # a choice's streamed tokens are its ``emitted``.
        self.emitted = 0  # tokens the stream has reported, all choices
        self.reported = False


class _Problem:
    __slots__ = (
        "changed",
        "closed_tokens",
        "closed_unreported",
        "cursor",
        "done",
        "failed",
        "index",
        "lam_sums",
        "launched",
        "next_request",
        "next_sample",
        "open",
        "problem",
        "result",
        "served",
        "solutions",
        "stop",
        "streams",
        "tally",
        "tg_tasks",
        "verifications",
        "verified",
        "waiting_changed",
        "waiting_tg",
    )

    def __init__(self, index: int, problem: Problem) -> None:
        self.index = index
        self.problem = problem
        # The problem's ledger (orchestrator.ledger.ProblemLedger, no budget) as totals:
        # choices launched per kind, finished choices' (count, tokens) per kind (for λ),
        # closed requests' completion tokens per kind and whether any closed unreported.
        self.launched = {"solve": 0, "verify": 0}
        self.lam_sums = [0, 0, 0, 0]  # solutions n, sum; verifications n, sum
        self.closed_tokens = {"solve": 0, "verify": 0}
        self.closed_unreported = False
        self.tally = VoteTally()
        # tuples, extended as work finishes: a snapshot holds them without copying
        self.solutions: tuple[Solution, ...] = ()
        self.verifications: tuple[Verification, ...] = ()
        self.failed: tuple[FailedSample, ...] = ()
        self.open: dict[int, _Stream] = {}  # the runtime's self.open (request order)
        self.streams: list[_Stream] = []  # the backend's open streams (open order)
        self.tg_tasks = 0  # request tasks whose done-callback has not run
        self.next_request = 0
        self.next_sample = 0
        self.changed = False  # the runtime's asyncio.Event
        self.waiting_changed = False
        self.waiting_tg = False
        self.stop: Stop | None = None
        self.done = False
        self.result: SolveResult | None = None
        self.cursor = 0  # samples served
        self.served: list[int] | None = None
        self.verified: dict[int, int] = {}

    @property
    def lam(self) -> float | None:
        """``ProblemLedger.lam``: mean verification / mean solution length, finished ones."""
        return lambda_of_sums(*self.lam_sums)

    def usage(self, open_tokens: int = 0, open_unreported: bool = False) -> Usage:
        """``ProblemLedger.usage``: the closed requests' usage summed, plus the open ones'.

        A reported record's usage is Usage(0, its tokens) and an unreported one's
        Usage(0, 0, estimated, sources "nothing" and "prompt"), so the sum is this."""
        est = self.closed_unreported or open_unreported
        total = self.closed_tokens["solve"] + self.closed_tokens["verify"] + open_tokens
        return _usage(0, total, est, None, _UNREPORTED if est else ())


class _Engine:
    def __init__(self, src: ReplaySource, policy: Any, order: int, *, decode_rate: float,
                 ttft: float, chunks: int, max_n: int, history: RunHistory) -> None:
        if not (decode_rate > 0 and math.isfinite(decode_rate)):
            raise ConfigError(f"decode_rate must be a positive number, got {decode_rate}")
        if not (ttft >= 0 and math.isfinite(ttft)):
            raise ConfigError(f"ttft must be >= 0 seconds, got {ttft}")
        if chunks < 1:
            raise ConfigError(f"chunks must be >= 1, got {chunks}")
        if max_n < 1:
            raise ConfigError(f"max_n must be >= 1, got {max_n}")
        self.src = src
        self.policy = policy
        self.order = order
        self.rate = decode_rate
        self.ttft = ttft
        self.chunks = chunks
        self.max_n = max_n
        self.history = history
        self.task = src.task
        self.grader = self.task.grader
        self.sample_max_tokens = self.task.solve_request(src.problems[0], 1).max_tokens \
            if src.problems else 1
        vmax = getattr(self.task, "verify_max_tokens", None)
        self.verify_max_tokens = vmax if isinstance(vmax, int) and vmax >= 1 else 1
        self.name = policy_name(policy)
        # adaptive (exactly: a subclass may decide differently) is asked for its plan on
        # the numbers its decide reads, without a snapshot, unless it is to stop
        from policies.adaptive import _PLANS, Adaptive

        self.plans = _PLANS if type(policy) is Adaptive else None
        self.all_rivals = self.plans is not None and policy.rivals == "all"
        self.prior_records: tuple | None = None
        self.prior: Any = None
        self.samples = _served_samples(src)
        self.served_rows: list[list[int]] | None = None  # src.orders(order), as lists
        self.served_n: list[int] = []  # samples per problem
        self.budget_left: dict[float | None, BudgetLeft] = {}  # by λ: the same every time
        self.clock = 0.0
        # (deadline, timer): heapq then compares deadlines in C, and only equal ones call
        # _Timer.__lt__ (False), so every comparison, hence the heap, is asyncio's
        self.timers: list[tuple[float, _Timer]] = []
        self.cancelled_timers = 0
        self.ready: deque[tuple[int, Any]] = deque()

    # ---- the loop (asyncio.BaseEventLoop._run_once, for our callbacks) ---------------
    def run(self) -> list[SolveResult]:
        probs = [_Problem(i, p) for i, p in enumerate(self.src.problems)]
        ready = self.ready
        for p in probs:  # _run_problems creates one task per problem, in order
            ready.append((_DECIDE, p))
        timers = self.timers
        handlers = (self._decide, self._wake, self._step, self._start, self._task_done,
                    self._parent)
        heappop = heapq.heappop
        popleft = ready.popleft
        append = ready.append
        min_scheduled, min_fraction = _MIN_SCHEDULED, _MIN_CANCELLED_FRACTION
        resolution, max_timeout = _RESOLUTION, _MAX_SELECT_TIMEOUT
        pop_once = _RESOLUTION <= _EPS
        popped_at: float | None = None  # the clock when the due timers were last popped
        while True:
            if timers:
                sched = len(timers)
                # cancelled / sched > fraction, without the division (the same for ints)
                if sched > min_scheduled and self.cancelled_timers > sched * min_fraction:
                    kept = []
                    for e in timers:
                        if e[1].cancelled:
                            e[1].scheduled = False
                        else:
                            kept.append(e)
                    heapq.heapify(kept)
                    self.timers = timers = kept
                    self.cancelled_timers = 0
                elif timers[0][1].cancelled:
                    while timers and timers[0][1].cancelled:
                        self.cancelled_timers -= 1
                        heappop(timers)[1].scheduled = False
            if not ready:
                if not timers:
                    break
                popped_at = None  # nothing ready: look at the timers whatever the clock
                timeout = timers[0][0] - self.clock
                if timeout > 0:
                    self.clock += timeout if timeout < max_timeout else max_timeout
            # Every timer is pushed at least _EPS past the clock it is pushed at (_wait), so
            # with _RESOLUTION <= _EPS none falls due at the instant it is pushed: once the
            # due timers of an instant are popped, later iterations of it find none.
            if timers and (self.clock != popped_at or not pop_once):
                popped_at = self.clock
                end_time = popped_at + resolution
                while timers and timers[0][0] < end_time:
                    h = heappop(timers)[1]
                    h.scheduled = False
                    append((_TIMER, h))
            for _ in range(len(ready)):
                kind, obj = popleft()
                handlers[kind](obj)
        missing = [p.problem.id for p in probs if p.result is None]
        if missing:
            raise RuntimeError(f"lean replay engine: problems never finished: {missing[:5]}")
        return [p.result for p in probs]  # type: ignore[misc]

    def _cancel_timer(self, h: _Timer) -> None:
        if not h.cancelled:
            if h.scheduled:
                self.cancelled_timers += 1
            h.cancelled = True

    # ---- hops --------------------------------------------------------------------------
    def _wake(self, h: _Timer) -> None:
        """A timer fired (``_wake_stream``)."""
        if h.cancelled:
            return
        st = h.stream
        if st.waiting:
            st.waiting = False
            self.ready.append((_RESUME, st))

    def _poke(self, p: _Problem, me: _Stream | None) -> None:
        """Wake the problem's other waiting streams (the replay backend's notify). Each
        wakes in a hop of its own, even when all it will do is emit what it has streamed
        by now: a stop that cancels it before that hop runs finds the wake-up queued, and
        its cancellation then runs in that place of the ready queue, not a later one."""
        for other in p.streams:
            if other is not me and other.waiting:
                other.waiting = False
                self.ready.append((_RESUME, other))

    def _set_changed(self, p: _Problem) -> None:
        if not p.changed:
            p.changed = True
            if p.waiting_changed:
                p.waiting_changed = False
                self.ready.append((_DECIDE, p))

    # ---- the decision loop (_ProblemRun._loop_until_stop) ------------------------------
    def _snapshot(self, p: _Problem) -> ProblemSnapshot:
        sample_tokens: list[int] = []
        verifying: dict[int, int] | None = None
        open_tokens = 0
        open_unreported = False
        for st in p.open.values():
            if st.reported:
                open_tokens += st.emitted
            else:
                open_unreported = True
            if st.kind == "solve":
                for c in st.choices:  # a loop: cheaper than a comprehension for a few
                    if not c.done:
                        sample_tokens.append(c.emitted)
            elif st.solution is not None:
                k = 0
                for c in st.choices:
                    if not c.done:
                        k += 1
                if k:
                    sid = st.solution.id
                    if verifying is None:
                        verifying = {}
                    verifying[sid] = verifying.get(sid, 0) + k
        sums = p.lam_sums
        lam = p.lam if sums[0] and sums[2] else None  # no verification finished: no λ
        budget_left = self.budget_left.get(lam)
        if budget_left is None:
            budget_left = self.budget_left[lam] = BudgetLeft(
                None, None, None, self.sample_max_tokens, self.verify_max_tokens,
                DEFAULT_LAMBDA if lam is None else lam)
        launched = p.launched
        # positional, in the field order of ProblemSnapshot (tests/test_snapshot_tally.py)
        return _snapshot(
            p.problem, p.solutions, p.verifications, p.failed,
            _in_flight(len(sample_tokens),
                       () if verifying is None else tuple(sorted(verifying.items())),
                       tuple(sample_tokens)),
            launched["solve"], launched["verify"], p.next_request,
            p.usage(open_tokens, open_unreported), UNLIMITED, budget_left, self.clock, lam,
            self.history.records, None, p.tally.ranked(),
        )

    def _adaptive_plan(self, p: _Problem) -> tuple | None:
        """``adaptive``'s decision without its snapshot, when it is to sample or to wait:
        :meth:`policies.adaptive.Adaptive.plan` (which its ``decide`` looks up in the same
        memo) on what the snapshot would hold; ``None`` when it is to stop (the snapshot
        is then built and ``decide`` called, for the Stop's answer and reason)."""
        ranked = p.tally.ranked()
        a = ranked[0].votes if ranked else 0
        b = ranked[1].votes if len(ranked) > 1 else 0
        flying = 0
        for st in p.open.values():
            if st.kind == "solve":
                for c in st.choices:
                    if not c.done:
                        flying += 1
        failed = broken_samples(p.failed)
        policy = self.policy
        records = self.history.records  # a tuple replaced on each add: its prior, once
        if records is not self.prior_records:
            self.prior_records = records
            self.prior = policy.prior_for(records)
        plans = self.plans
        assert plans is not None  # only asked for adaptive
        others = tuple([r.votes for r in ranked[2:]]) if self.all_rivals else ()
        plan = plans.get(policy, self.prior, a, b, len(p.solutions) - a - b, flying, failed,
                         False, others)
        return None if plan[0] == "stop" else plan

    def _decide(self, p: _Problem) -> None:
        p.changed = False
        plan = self._adaptive_plan(p) if self.plans is not None else None
        if plan is None:
            decisions = tuple(self.policy.decide(self._snapshot(p)))
        elif plan[0] == "sample":
            decisions = (Sample(plan[1]),)
        else:
            decisions = ()
        stop = None
        launched = cancelled = False
        before = p.next_request  # a Cancel applies to the requests launched before this
        for d in decisions:
            if isinstance(d, Stop):
                stop = d
                break
            if isinstance(d, Cancel):
                if p.open and self._cancel_kind(p, before, d.kind):
                    cancelled = True
                continue
            if isinstance(d, Sample):
                kind, remaining, solution = "solve", d.k, None
            elif isinstance(d, Verify):
                if d.solution.id not in {s.id for s in p.solutions}:
                    raise PolicyError(f"Verify of unknown solution id {d.solution.id}")
                kind, remaining, solution = "verify", d.times, d.solution
            else:
                raise PolicyError(f"policy returned {d!r}, not a Sample, Verify, Cancel or "
                                  "Stop")
            while remaining > 0:
                n = min(remaining, self.max_n)
                self._launch(p, kind, n, solution)
                launched = True
                remaining -= n
        if stop is not None:
            p.stop = stop
            for st in list(p.open.values()):
                if st.state == "new":  # launched with the Stop: closed here, its task
                    st.cancel = True  # only ends (the runtime's _run_group)
                    self._close(st, "cancelled", None, task_done=False)
                else:
                    self._cancel(st)
            if p.tg_tasks:
                p.waiting_tg = True
            else:
                self._finish(p)
            return
        if p.open:
            if p.changed:  # Event.wait() returns at once when set: decide again now
                self._decide(p)
            else:
                p.waiting_changed = True
            return
        if launched:  # launched, yet nothing open: impossible (a launch opens a request)
            raise AssertionError("launched work is not open")
        if not cancelled:
            raise PolicyError(f"policy {self.name} returned no work and no Stop "
                              "with nothing in flight")
        self._decide(p)  # what it cancelled closed at once: the runtime asks again

    def _cancel_kind(self, p: _Problem, before: int, kind: str) -> bool:
        """``_ProblemRun._cancel``: ``Cancel(kind)`` of the requests in flight when the
        decision was made (ids below ``before``); one whose task never ran is closed here,
        at once."""
        any_ = False
        for st in list(p.open.values()):
            if st.kind != kind or st.cancel or st.request_id >= before:
                continue
            any_ = True
            if st.state == "new":
                st.cancel = True  # its first step throws: _start then only ends the task
                self._close(st, "cancelled", None, task_done=False)
            else:
                self._cancel(st)
        return any_

    def _launch(self, p: _Problem, kind: str, n: int, solution: Solution | None) -> None:
        rid = p.next_request
        p.next_request += 1
        first = p.next_sample
        p.next_sample = first + n
        choices = [_Choice(first)] if n == 1 else [_Choice(i) for i in range(first, first + n)]
        p.launched[kind] += n
        st = _Stream(p, rid, kind, choices, solution, self.clock)
        p.open[rid] = st
        p.tg_tasks += 1
        self.ready.append((_START, st))

    def _cancel(self, st: _Stream) -> None:
        """``Task.cancel()`` of a request task."""
        if st.state == "closed":
            return
        st.cancel = True
        if st.state == "new":
            return  # its first step throws at once: the coroutine never runs
        if st.waiting:
            st.waiting = False
            self.ready.append((_RESUME, st))
        # else: a wake-up is queued; it runs the cancellation

    def _finish(self, p: _Problem) -> None:
        """``_result``: the SolveResult and the history record."""
        stop = p.stop
        assert stop is not None
        prob = p.problem
        correct = None
        if prob.answer is not None or prob.aliases:
            correct = False if stop.answer is None else self.grader.is_correct(stop.answer, prob)
        # every request is closed by now
        solution_tokens = p.closed_tokens["solve"]
        verification_tokens = p.closed_tokens["verify"]
        lam = p.lam
        # positional, in SolveResult's field order (tests/test_snapshot_tally.py)
        result = _result(
            prob, stop.answer, stop.key, stop.reason, correct, p.usage(), p.next_request,
            p.solutions, p.verifications, p.failed, self.clock, lam,
            cost_units(p.launched["solve"], p.launched["verify"], lam),
            solution_tokens, verification_tokens, self.name, None, stop.code, 0, 0)
        readings: tuple = ()
        reading_solutions: tuple = ()
        if p.verifications:
            by_id = {s.id: s.key for s in p.solutions}
            index_of = {s.id: s.index for s in p.solutions}
            readings = tuple((by_id.get(v.solution_id), v.p_yes) for v in p.verifications
                             if v.p_yes is not None)
            reading_solutions = tuple(index_of[v.solution_id] for v in p.verifications
                                      if v.p_yes is not None)
        # positional, in ProblemRecord's field order (tests/test_snapshot_tally.py)
        self.history.add(_record(
            prob.id, stop.code, stop.key, tuple([s.key for s in p.solutions]),
            tuple([s.completion_tokens for s in p.solutions]), readings, solution_tokens,
            verification_tokens, reading_solutions))
        p.result = result
        p.done = True

    def _task_done(self, st: _Stream) -> None:
        """TaskGroup._on_task_done of a request task."""
        p = st.prob
        p.tg_tasks -= 1
        if p.waiting_tg and not p.tg_tasks:
            p.waiting_tg = False
            self.ready.append((_PARENT, p))

    def _parent(self, p: _Problem) -> None:
        self._finish(p)

    # ---- one request (_ProblemRun._run_request and the replay stream) ----------------
    def _start(self, st: _Stream) -> None:
        p = st.prob
        if st.cancel:  # cancelled before its first step: the coroutine never ran
            st.state = "closed"
            self.ready.append((_TASK_DONE, st))
            return
        now = self.clock
        start = now + self.ttft
        src = self.src
        pid = p.problem.id
        choices = st.choices
        rate = self.rate
        if st.kind == "solve":
            if p.served is None:
                p.served = self._served_order(pid)
            picked = p.served[p.cursor: p.cursor + len(choices)]
            n_served = len(picked)
            p.cursor += n_served
            known = self.samples.get(pid)
            if known is None:
                known = self.samples[pid] = {}
            for j, idx in enumerate(picked):  # choices beyond the picked ones: not served
                c = choices[j]
                got = known.get(idx)
                if got is None:
                    got = known[idx] = self._served_sample(pid, idx)
                c.text, tokens, c.answer, c.key = got
                c.total = tokens
                c.end = start + tokens / rate
        else:
            assert st.solution is not None
            parsed = parse_sample_text(st.solution.text)
            if parsed is None:
                raise ConfigError(f"solution {st.solution.id} was not served by a "
                                  "ReplayBackend")
            index = parsed[0]
            n_served = 0
            for c in choices:
                j = p.verified.get(index, 0)
                reading = src.verification(pid, index, j)
                if reading is None:
                    break
                p.verified[index] = j + 1
                pr, tokens = reading
                if tokens is None:
                    tokens = src.verify_tokens
                if pr is None:
                    c.text = "unparsable"
                    c.logprobs = ()
                else:
                    c.text = text = "Yes" if pr >= 0.5 else "No"
                    c.logprobs = (TokenLogprob(text, _log(pr if text == "Yes" else 1 - pr),
                                               (("Yes", _log(pr)), ("No", _log(1 - pr)))),)
                c.total = tokens
                c.end = start + tokens / rate
                n_served += 1
        if not n_served:
            self._poke(p, None)
            what = "sample" if st.kind == "solve" else "verification"
            self._close(st, "failed", PoolExhausted(
                f"no recorded {what} left for problem {pid!r}"))
            return
        st.state = "open"
        st.start = now
        st.n_served = n_served
        st.armed = math.inf
        p.streams.append(st)
        served = choices if n_served == len(choices) else choices[:n_served]
        if self.chunks > 1:
            wakeups = {c.end for c in served}
            for c in served:
                step = (c.end - now - self.ttft) / self.chunks
                wakeups.update(now + self.ttft + step * k for k in range(1, self.chunks))
            st.wakeups = sorted(wakeups)
        else:
            st.wakeups = None
        st.next_end = served[0].end if len(served) == 1 else min([c.end for c in served])
        st.pending = served  # the unfinished served choices, in choice order
        self._step(st, top=True)

    def _served_order(self, pid: str) -> list[int]:
        """``src.served_order(pid, order)`` (the same list), from the whole order's array
        made lists at once."""
        rows = self.served_rows
        if rows is None:
            rows = self.served_rows = self.src.orders(self.order).tolist()
            self.served_n = self.src.pool.arrays.n.tolist()
        i = self.src.pool.index[pid]
        return rows[i][: self.served_n[i]]

    def _served_sample(self, pid: str, idx: int) -> tuple[str, int, str | None, str | None]:
        return served_sample(self.src, self.grader, pid, idx)

    def _step(self, st: _Stream, top: bool = False) -> None:
        """The backend's ``_events`` loop, with the runtime reading each event (its
        ``_on_delta``, ``_finish_choice`` and usage reports), up to the stream's next wait.

        ``top``: the stream's own wake-up (its start or its timer), which emits nothing
        unless a choice ends now; else a poke by another stream of the problem, which emits
        the tokens each pending choice has streamed by now. Both then wait for the next
        wake-up; what a pass emits, the next pass at the same instant no longer can.

        Without ``top`` it is also the stream's resumption after a wake-up (its ``_RESUME``
        entry), where a cancelled stream closes instead (its start checks that itself)."""
        if not top and st.cancel:
            self._cancelled(st)
            return
        pending = st.pending
        if pending:
            lim = self.clock + _EPS
            if st.next_end > lim:  # no choice ends now: the pending ones stay as they are
                if not top:  # what each has streamed by now
                    got = self._streamed(st)
                    changed = False
                    for c in pending:
                        g = c.total - 1
                        if got < g:
                            g = got
                        if g > c.emitted:
                            changed = True
                            st.emitted += g - c.emitted  # the reader's _on_event
                            c.emitted = g
                    if changed:  # UsageReport(0, emitted, final): RequestRecord.add_usage
                        st.reported = True
                if st.wakeups is None and st.armed == st.next_end:
                    st.waiting = True  # _wait, with the timer already armed for next_end
                else:
                    self._wait(st, lim)
                return
            p = st.prob
            if len(p.streams) > 1:
                self._poke(p, st)
            changed = True
            got = -1
            keep = []
            next_end = math.inf
            for c in pending:
                end = c.end
                if end <= lim:
                    st.emitted += c.total - c.emitted
                    c.emitted = c.total
                    self._final(st, c)
                else:
                    if got < 0:
                        got = self._streamed(st)
                    g = c.total - 1
                    if got < g:
                        g = got
                    if g > c.emitted:
                        changed = True
                        st.emitted += g - c.emitted  # the reader's _on_event
                        c.emitted = g
                    keep.append(c)
                    if end < next_end:
                        next_end = end
            st.pending = keep
            st.next_end = next_end
            if changed:  # UsageReport(0, emitted, final): RequestRecord.add_usage
                st.reported = True
            if keep:
                self._wait(st, lim)
                return
        # the stream ended
        p = st.prob
        if st.handle is not None:
            self._cancel_timer(st.handle)
        if st.n_served < len(st.choices):  # short: PoolExhausted after the last one
            self._poke(p, st)
            what = "solve" if st.kind == "solve" else "verify"
            self._close(st, "failed", PoolExhausted(
                f"only {st.n_served} recorded {what} items were left for problem "
                f"{p.problem.id!r}"))
            return
        self._close(st, "ok", None)

    def _streamed(self, st: _Stream) -> int:
        """Tokens each unfinished choice of ``st`` has streamed by now (before its last):
        the replay backend's arithmetic."""
        return max(0, math.floor((self.clock - st.start - self.ttft) * self.rate + _EPS))

    def _wait(self, st: _Stream, lim: float) -> None:
        """Nothing ends now: (re)arm the stream's timer for its next wake-up and wait."""
        wakeups = st.wakeups
        if wakeups is None:
            when = st.next_end
        else:
            while wakeups and wakeups[0] <= lim:
                wakeups.pop(0)
            when = wakeups[0]
        if st.armed != when:
            if st.handle is not None:
                self._cancel_timer(st.handle)
            st.armed = when
            st.handle = h = _Timer(when, st)
            heapq.heappush(self.timers, (when, h))
        st.waiting = True

    def _final(self, st: _Stream, c: _Choice) -> None:
        """The reader's ``_on_event`` of a choice's last delta: the loop's
        ``on_finished``, then the ledger's ``finish``."""
        p = st.prob
        c.done = True
        tokens = c.emitted
        sums = p.lam_sums  # ProblemLedger.finish: the lengths λ is measured from
        if st.kind == "solve":
            # positional, in Solution's field order (tests/test_snapshot_tally.py)
            sol = _solution(c.sample_id, len(p.solutions), c.text, c.answer, c.key, "stop",
                            tokens, st.started_at, self.clock, st.request_id, None)
            p.solutions += (sol,)
            p.tally.add(sol)
            sums[0] += 1
            sums[1] += tokens
        else:
            assert st.solution is not None
            verdict, p_yes, source = self.task.parse_verdict(c.text, c.logprobs)
            # positional, in Verification's field order (tests/test_snapshot_tally.py)
            p.verifications += (_verification(
                c.sample_id, st.solution.id, c.text, verdict, p_yes, source, tokens,
                st.started_at, self.clock, st.request_id),)
            sums[2] += 1
            sums[3] += tokens
        self._set_changed(p)

    def _cancelled(self, st: _Stream) -> None:
        """CancelledError at the stream's wait: close it as cancelled."""
        if st.handle is not None:
            self._cancel_timer(st.handle)
        self._close(st, "cancelled", None)

    def _close(self, st: _Stream, outcome: str, error: BackendError | None,
               task_done: bool = True) -> None:
        """The stream's exit and the runtime's ``_close_request``."""
        p = st.prob
        if st.state == "open":
            p.streams.remove(st)
        st.state = "closed"
        # "ok" comes only from a stream that served every choice and finished each (the
        # runtime's "stream ended without a finish_reason for every choice" cannot happen)
        if outcome != "ok":
            reason = "cancelled" if outcome == "cancelled" else "failed"
            err_text = None if error is None else error_text(error)
            for c in st.choices:
                if c.done:
                    continue
                c.done = True
                # positional, in FailedSample's field order (tests/test_fastinit.py)
                p.failed += (_failed_sample(
                    c.sample_id, st.request_id, st.kind, reason, error, "", c.emitted,
                    st.solution.id if st.solution else None, err_text),)
        p.open.pop(st.request_id, None)
        st.handle = None  # no cycle stream <-> timer: freed by reference counting
        if st.reported:  # ProblemLedger.close: the record's usage joins the closed total
            p.closed_tokens[st.kind] += st.emitted
        else:
            p.closed_unreported = True
        self._set_changed(p)
        if task_done:
            self.ready.append((_TASK_DONE, st))


_DECIDE, _TIMER, _RESUME, _START, _TASK_DONE, _PARENT = range(6)

#: per source: problem id -> pool index -> (text, tokens, answer, key) of the samples served
#: so far, kept across orders (a sample's text, length and grading do not depend on the
#: order it is served in; the source's grader is fixed)
_SERVED: weakref.WeakKeyDictionary[ReplaySource, dict[str, dict[int, tuple]]] = \
    weakref.WeakKeyDictionary()


def served_sample(src: ReplaySource, grader: Any, pid: str, idx: int
                  ) -> tuple[str, int, str | None, str | None]:
    """(text, tokens, answer, key) of pool sample ``idx`` as the replay backend streams it
    and the runtime grades it (the grader's extract, then its key)."""
    pred, tokens = src.sample(pid, idx)
    text = sample_text(idx, pred)
    answer = grader.extract(text)
    key = grader.key(answer) if answer is not None else None
    return text, tokens, None if key is None else answer, key


def _served_samples(src: ReplaySource) -> dict[str, dict[int, tuple]]:
    got = _SERVED.get(src)
    if got is None:
        got = _SERVED[src] = {}
    return got


def run_order(src: ReplaySource, policy: Any, order: int, *, decode_rate: float = 50.0,
              ttft: float = 0.0, chunks: int = 1, max_n: int = 16,
              history: RunHistory | None = None) -> list[SolveResult]:
    """Every problem of ``src`` under ``policy`` for served order ``order``, sharing one
    run history, as :func:`benchmarks.replay.run_runtime_order` runs them; results in
    problem order."""
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"policy {policy!r} has no decide(snapshot) method")
    engine = _Engine(src, policy, order, decode_rate=decode_rate, ttft=ttft, chunks=chunks,
                     max_n=max_n, history=RunHistory() if history is None else history)
    # An order allocates some 10^5 objects that live until it ends; the cyclic collector
    # would traverse them (and the pool) again and again: a third of the CPU, measured.
    # Nothing here needs it during the order (what is garbage is freed by reference
    # counting or collected once it is enabled again).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return engine.run()
    finally:
        if collecting:
            gc.enable()


def results_equal(a: Sequence[SolveResult], b: Sequence[SolveResult]) -> bool:
    """Per-problem identity of two result lists (every field, solutions included)."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b, strict=True))
