"""Replay a recorded pool behind the Backend seam, on a simulated clock.

The runtime runs unchanged; only the model server is replaced:

* **Samples** of a problem are served without replacement in a seeded order (the
  :class:`ReplayData` decides the order; one backend instance replays one order). A sample
  of ``t`` recorded tokens finishes ``ttft + t / decode_rate`` simulated seconds after its
  stream opens (after the runtime's limiter let it start). When a problem's pool is used
  up, the next request fails with :class:`PoolExhausted` (a ``BackendError``, so the
  runtime records a failed sample that the policy sees) instead of silently re-serving.
* **Verifications** of a served sample return the recorded P(Yes) as the logprobs of a
  final ``Yes``/``No`` token; a recorded verification's own length sets its duration.
* **Token accounting** follows the Backend contract. Whenever a stream of a problem
  finishes or fails, every other open stream of that problem first reports its progress
  (``floor((now - start - ttft) * decode_rate)`` tokens) as a text delta plus a running
  usage report, *before* the runtime's decision loop wakes up. So the snapshot a policy
  sees is exact, and a sample cancelled by a ``Stop`` is charged exactly the tokens
  generated until the cut, with only a handful of stream events per sample.

Run it on :class:`orchestrator.simclock.SimulatedClockLoop` (any loop works, but on a
real clock the replay takes real time).

The matching :class:`ReplayTask` routes requests: the solution text the backend streams
is ``"[sample <i>] <answer>"``, where the answer is the sample's vote key in the pool; its
grader extracts it and groups votes by it (whitespace-stripped); correctness comes from the
pool's labels (``labels[problem_id][key]``), not from re-grading.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from orchestrator.backends.base import (
    Backend,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import BackendError, ConfigError
from orchestrator.types import Problem, Solution, TokenLogprob

__all__ = [
    "PoolExhausted",
    "ReplayBackend",
    "ReplayData",
    "ReplayGrader",
    "ReplayTask",
    "sample_text",
]

_EPS = 1e-9
_MARK_RE = re.compile(r"\A\[sample (\d+)\](?: (.*))?\Z", re.DOTALL)


class PoolExhausted(BackendError):
    """Every recorded sample (or verification) of this problem has been served."""


class ReplayData(Protocol):
    """What the replay backend reads from a recorded pool."""

    def served_order(self, problem_id: str, order: int) -> Sequence[int]:
        """Pool indices of the problem's samples in the order they are served."""
        ...

    def sample(self, problem_id: str, index: int) -> tuple[str | None, int]:
        """(answer, completion tokens) of one recorded sample (answer: its vote key)."""
        ...

    def verification(self, problem_id: str, index: int, j: int) -> tuple[float | None, int] | None:
        """(P(Yes), tokens) of the ``j``-th verification of sample ``index``; ``None`` when
        no ``j``-th verification exists."""
        ...


def sample_text(index: int, pred: str | None) -> str:
    """The text the replay backend streams for pool sample ``index``."""
    return f"[sample {index}]" if pred is None else f"[sample {index}] {pred}"


def parse_sample_text(text: str) -> tuple[int, str | None] | None:
    m = _MARK_RE.match(text)
    if m is None:
        return None
    return int(m.group(1)), m.group(2)


class ReplayGrader:
    """Grades replayed answers by the pool's labels: ``labels[problem_id][key]``."""

    def __init__(self, labels: Mapping[str, Mapping[str, bool | None]]) -> None:
        self._labels = labels

    def extract(self, text: str) -> str | None:
        parsed = parse_sample_text(text)
        return None if parsed is None else parsed[1]

    def key(self, answer: str) -> str | None:
        return answer.strip() or None

    def is_correct(self, answer: str | None, problem: Problem) -> bool | None:
        if answer is None:
            return False
        key = self.key(answer)
        if key is None:
            return False
        return self._labels.get(problem.id, {}).get(key)


@dataclass(frozen=True)
class ReplayTask:
    """The Task for replayed pools: requests carry the problem (and sample) they are for."""

    grader: ReplayGrader
    max_tokens: int = 1
    verify_max_tokens: int = 1
    _requests: dict[tuple[str, int], GenerationRequest] = field(
        default_factory=dict, compare=False, repr=False)

    def solve_request(self, problem: Problem, n: int) -> GenerationRequest:
        got = self._requests.get((problem.id, n))
        if got is None:  # requests are frozen: one per (problem, n) is enough
            got = GenerationRequest(kind="solve", prompt=problem.id, n=n,
                                    max_tokens=self.max_tokens,
                                    extra={"replay_problem": problem.id})
            self._requests[(problem.id, n)] = got
        return got

    def verify_request(self, problem: Problem, solution: Solution, n: int) -> GenerationRequest:
        parsed = parse_sample_text(solution.text)
        if parsed is None:
            raise ConfigError(f"solution {solution.id} was not served by a ReplayBackend")
        return GenerationRequest(kind="verify", prompt=problem.id, n=n,
                                 max_tokens=self.verify_max_tokens, top_logprobs=2,
                                 extra={"replay_problem": problem.id, "replay_sample": parsed[0]})

    def parse_verdict(self, text: str, logprobs: tuple[TokenLogprob, ...]
                      ) -> tuple[bool | None, float | None, Literal["logprobs", "text", "none"]]:
        if logprobs:
            top = dict(logprobs[-1].top)
            if "Yes" in top and "No" in top:
                p = math.exp(top["Yes"])
                return p >= 0.5, p, "logprobs"
        word = text.strip()
        if word in ("Yes", "No"):
            return word == "Yes", 1.0 if word == "Yes" else 0.0, "text"
        return None, None, "none"


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -math.inf


@dataclass(slots=True)
class _Choice:
    text: str
    tokens: int
    end: float
    logprobs: tuple[TokenLogprob, ...] = ()
    emitted: int = 0
    done: bool = False


@dataclass(slots=True)
class _OpenStream:
    problem_id: str
    start: float
    waiter: asyncio.Future | None = None
    finished: bool = False


@dataclass
class ReplayBackend(Backend):
    """Serves one order of a recorded pool (see the module docstring).

    ``decode_rate``: tokens per simulated second per sample; ``ttft``: seconds before the
    first token; ``chunks``: pieces each sample streams in besides the progress reports
    (1 = only the final piece); ``verify_tokens``: length charged for a verification whose
    pool entry records none. Counters mirror a server's metrics: ``generated_tokens``
    (what the simulated server generated, cancelled work included), ``open_streams``,
    ``aborted_streams``.
    """

    data: ReplayData
    order: int = 0
    decode_rate: float = 50.0
    ttft: float = 0.0
    chunks: int = 1
    verify_tokens: int = 1
    generated_tokens: int = 0
    open_streams: int = 0
    max_open_streams: int = 0
    aborted_streams: int = 0
    closed: bool = False
    _cursor: dict[str, int] = field(default_factory=dict, repr=False)
    _verified: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)
    _orders: dict[str, Sequence[int]] = field(default_factory=dict, repr=False)
    _open: dict[str, list[_OpenStream]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (self.decode_rate > 0 and math.isfinite(self.decode_rate)):
            raise ConfigError(f"decode_rate must be a positive number, got {self.decode_rate}")
        if not (self.ttft >= 0 and math.isfinite(self.ttft)):
            raise ConfigError(f"ttft must be >= 0 seconds, got {self.ttft}")
        if self.chunks < 1:
            raise ConfigError(f"chunks must be >= 1, got {self.chunks}")

    # ---- bookkeeping -----------------------------------------------------------------
    def served(self, problem_id: str) -> int:
        """How many samples of ``problem_id`` have been served so far."""
        return self._cursor.get(problem_id, 0)

    def _next_samples(self, pid: str, n: int) -> list[int]:
        order = self._orders.get(pid)
        if order is None:
            order = self._orders[pid] = self.data.served_order(pid, self.order)
        pos = self._cursor.get(pid, 0)
        picked = list(order[pos: pos + n])
        self._cursor[pid] = pos + len(picked)
        return picked

    def _poke(self, pid: str, me: _OpenStream | None) -> None:
        """Make every other open stream of ``pid`` report its progress before the runtime
        reacts to what just happened."""
        for other in self._open.get(pid, ()):
            if other is not me and other.waiter is not None and not other.waiter.done():
                other.waiter.set_result(None)

    def _choices(self, request: GenerationRequest, pid: str, now: float) -> list[_Choice]:
        start = now + self.ttft
        if request.kind == "solve":
            picked = self._next_samples(pid, request.n)
            out = []
            for idx in picked:
                pred, tokens = self.data.sample(pid, idx)
                out.append(_Choice(sample_text(idx, pred), tokens,
                                   start + tokens / self.decode_rate))
            return out
        index = request.extra.get("replay_sample")
        if not isinstance(index, int):
            raise BackendError("replay verify request without 'replay_sample'")
        out = []
        for _ in range(request.n):
            j = self._verified.get((pid, index), 0)
            reading = self.data.verification(pid, index, j)
            if reading is None:
                break
            self._verified[(pid, index)] = j + 1
            p, tokens = reading
            if tokens is None:
                tokens = self.verify_tokens
            if p is None:
                text, lps = "unparsable", ()
            else:
                text = "Yes" if p >= 0.5 else "No"
                lps = (TokenLogprob(text, _log(p if text == "Yes" else 1 - p),
                                    (("Yes", _log(p)), ("No", _log(1 - p)))),)
            out.append(_Choice(text, tokens, start + tokens / self.decode_rate, lps))
        return out

    def _progress(self, c: _Choice, stream: _OpenStream, now: float) -> int:
        generated = math.floor((now - stream.start - self.ttft) * self.decode_rate + _EPS)
        return max(0, min(generated, c.tokens - 1))

    # ---- the seam --------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> AbstractAsyncContextManager[
            AsyncIterator[StreamEvent]]:
        return _ReplayStream(self, request)

    async def _events(self, st: _OpenStream, choices: list[_Choice], wakeups: list[float],
                      short: bool, kind: str) -> AsyncIterator[StreamEvent]:
        loop = asyncio.get_running_loop()
        pid = st.problem_id
        pending = list(range(len(choices)))
        handle: asyncio.TimerHandle | None = None
        armed = math.inf
        try:
            while pending:
                now = loop.time()
                while wakeups and wakeups[0] <= now + _EPS:
                    wakeups.pop(0)
                if all(choices[i].end > now + _EPS for i in pending):
                    # one timer per wake-up time; a poke only swaps the future it sets
                    if armed != wakeups[0]:
                        if handle is not None:
                            handle.cancel()
                        armed = wakeups[0]
                        handle = loop.call_at(armed, _wake_stream, st)
                    st.waiter = loop.create_future()
                    await st.waiter
                    now = loop.time()
                ending = [i for i in pending if choices[i].end <= now + _EPS]
                if ending:
                    self._poke(pid, st)
                changed = bool(ending)
                for i in list(pending):
                    c = choices[i]
                    if i in ending:
                        pending.remove(i)
                        new = c.tokens - c.emitted
                        c.emitted = c.tokens
                        c.done = True
                        self.generated_tokens += new
                        yield TextDelta(i, c.text, new, logprobs=c.logprobs, finish_reason="stop")
                    else:
                        got = self._progress(c, st, now)
                        if got > c.emitted:
                            self.generated_tokens += got - c.emitted
                            changed = True
                            yield TextDelta(i, "", got - c.emitted)
                            c.emitted = got
                if changed:
                    yield UsageReport(0, sum(c.emitted for c in choices), final=not pending)
        finally:
            st.waiter = None
            if handle is not None:
                handle.cancel()
        if short:
            self._poke(pid, st)
            raise PoolExhausted(f"only {len(choices)} recorded {kind} items were left for "
                                f"problem {pid!r}")
        st.finished = True

    async def aclose(self) -> None:
        self.closed = True


class _ReplayStream:
    """The context manager of one replayed stream (a class: cheaper than contextlib)."""

    __slots__ = ("_backend", "_choices", "_gen", "_request", "_st")

    def __init__(self, backend: ReplayBackend, request: GenerationRequest) -> None:
        self._backend = backend
        self._request = request
        self._gen: AsyncGenerator[StreamEvent, None] | None = None

    async def __aenter__(self) -> AsyncIterator[StreamEvent]:
        b, request = self._backend, self._request
        if b.closed:
            raise BackendError("ReplayBackend is closed")
        pid = request.extra.get("replay_problem")
        if not isinstance(pid, str):
            raise BackendError("replay request without 'replay_problem' (use ReplayTask)")
        now = asyncio.get_running_loop().time()
        choices = b._choices(request, pid, now)
        if not choices:
            b._poke(pid, None)
            what = "sample" if request.kind == "solve" else "verification"
            raise PoolExhausted(f"no recorded {what} left for problem {pid!r}")
        st = _OpenStream(pid, now)
        b._open.setdefault(pid, []).append(st)
        b.open_streams += 1
        b.max_open_streams = max(b.max_open_streams, b.open_streams)
        wakeups = {c.end for c in choices}
        if b.chunks > 1:
            for c in choices:
                step = (c.end - now - b.ttft) / b.chunks
                wakeups.update(now + b.ttft + step * k for k in range(1, b.chunks))
        self._st, self._choices = st, choices
        self._gen = b._events(st, choices, sorted(wakeups), len(choices) < request.n,
                              request.kind)
        return self._gen

    async def __aexit__(self, *exc: object) -> None:
        b, st = self._backend, self._st
        assert self._gen is not None
        try:
            await self._gen.aclose()
        finally:
            b._open[st.problem_id].remove(st)
            b.open_streams -= 1
            if not st.finished:
                b.aborted_streams += 1
                # the cut: what the simulated server generated until now
                now = asyncio.get_running_loop().time()
                for c in self._choices:
                    if not c.done:
                        got = b._progress(c, st, now)
                        b.generated_tokens += max(got - c.emitted, 0)
                        c.emitted = max(got, c.emitted)


def _wake_stream(st: _OpenStream) -> None:
    fut = st.waiter
    if fut is not None and not fut.done():
        fut.set_result(None)
