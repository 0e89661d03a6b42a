"""The stream reader on its own (orchestrator.reader), on the simulated clock.

A scripted "server" stream stands behind each test: it counts the tokens it generated,
and after a cut it goes on sending what was already in transit (``lag`` more steps)
before it ends, the way a real server keeps writing until the half-close reaches it. The
settled cut must charge exactly what the server generated however far behind the reader
is, and must not wait on any clock to decide it: only the stream's own events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from orchestrator.backends.base import (
    Backend,
    EventStream,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import BackendError, StreamBroken
from orchestrator.ledger import ProblemLedger
from orchestrator.limiter import Limiter
from orchestrator.reader import Choice, Request, read_request
from orchestrator.simclock import simulated_runner


class Server:
    """``n`` choices, one token each per step (chunks in index order, each followed by
    its running usage, as vLLM writes them). ``cut_at``: the step at which the test's
    "Stop" happens (``req.cut`` is set by the stream itself just before that step's first
    chunk, as the decision loop would set it between two events). After a cut the server
    still sends ``lag`` whole steps, then ends: cleanly (closing usage) or, with
    ``broken``, mid-body (a connection closed by the server)."""

    def __init__(self, n: int, *, cut_at: int, lag: int, cuttable: bool = True,
                 broken: bool = False, usage: bool = True, steps: int = 100,
                 sending: int | None = None, lockstep: bool = True) -> None:
        self.n = n
        #: choices that send (the others are separate streams still waiting for a slot)
        self.sending = n if sending is None else sending
        self.lockstep = lockstep
        self.cut_at = cut_at
        self.lag = lag
        self.cuttable = cuttable
        self.broken = broken
        self.usage = usage
        self.steps = steps
        self.generated = 0
        self.cut_after_step: int | None = None
        self.req: Request | None = None

    async def events(self) -> AsyncIterator[StreamEvent]:
        for step in range(self.steps):
            if self.cut_after_step is not None and step > self.cut_after_step + self.lag:
                if self.broken:
                    raise StreamBroken("connection closed mid-body")
                break
            if step == self.cut_at:
                assert self.req is not None
                self.req.cut = True
            await asyncio.sleep(0.04)  # one engine step (simulated)
            for c in range(self.sending):
                self.generated += 1
                yield TextDelta(c, " w", 1)
                if self.usage:
                    yield UsageReport(3, self.generated, final=False)
        else:
            return
        if self.usage:
            yield UsageReport(3, self.generated, final=True)

    def cut(self, step_of: list[int]) -> None:
        self.cut_after_step = step_of[0]


class ScriptBackend(Backend):
    cut_grace = 5.0

    def __init__(self, server: Server) -> None:
        self.server = server
        self.closed = 0

    def stream(self, request: GenerationRequest):
        from contextlib import asynccontextmanager

        server = self.server

        @asynccontextmanager
        async def opened():
            gen = server.events()
            steps = [0]

            async def counted():
                async for event in gen:
                    if isinstance(event, TextDelta):
                        steps[0] = (server.generated - 1) // server.sending
                    yield event

            inner = counted()
            cut = (lambda: server.cut(steps)) if server.cuttable else None
            try:
                yield EventStream(inner, cut, lockstep=server.lockstep)
            finally:
                await inner.aclose()
                await gen.aclose()
                self.closed += 1

        return opened()

    async def aclose(self) -> None:
        pass


class Owner:
    def __init__(self) -> None:
        self.finished: list[tuple[int, str]] = []
        self.closed: list[tuple[str, BackendError | None]] = []

    def on_finished(self, req, choice, finish_reason):
        self.finished.append((choice, finish_reason))

    def on_closed(self, req, outcome, error):
        self.closed.append((outcome, error))


def read(server: Server) -> tuple[ProblemLedger, Request, Owner, ScriptBackend]:
    async def run():
        ledger = ProblemLedger()
        request = GenerationRequest(kind="solve", prompt="q", n=server.n, max_tokens=1000)
        record = ledger.open(0, "solve", server.n, 1000)
        backend = ScriptBackend(server)
        req = Request(0, "solve", request, record, [Choice(i) for i in range(server.n)],
                      0.0, backend)
        server.req = req
        owner = Owner()
        await read_request(req, ledger, Limiter(), owner)
        return ledger, req, owner, backend

    with simulated_runner() as runner:
        return runner.run(run())


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("lag", [0, 1, 7, 60])
def test_a_cut_stream_is_charged_what_the_server_sent_however_far_behind(n, lag):
    server = Server(n, cut_at=5, lag=lag)
    ledger, req, owner, backend = read(server)
    assert owner.closed == [("cancelled", None)]
    assert req.record.completion == ledger.usage.completion_tokens == server.generated
    # the step after the Stop is read before the cut, then `lag` steps in transit
    assert server.generated == n * (5 + 1 + lag)
    assert sum(req.record.choice_tokens) == server.generated
    assert backend.closed == 1


@pytest.mark.parametrize("n", [1, 3])
def test_the_cut_comes_after_the_step_of_the_last_running_choice(n):
    server = Server(n, cut_at=2, lag=0)
    read(server)
    assert server.cut_after_step == 2  # the step generated after the Stop, whole


def test_a_stream_closed_mid_body_after_the_cut_is_cancelled_not_failed():
    server = Server(2, cut_at=3, lag=2, broken=True)
    ledger, _req, owner, _ = read(server)
    assert owner.closed == [("cancelled", None)]
    assert ledger.usage.completion_tokens == server.generated == 2 * (3 + 1 + 2)


def test_a_stream_that_cannot_be_cut_is_closed_after_its_step():
    server = Server(3, cut_at=4, lag=10, cuttable=False)
    ledger, _req, owner, backend = read(server)
    assert owner.closed == [("cancelled", None)]
    assert ledger.usage.completion_tokens == server.generated == 3 * (4 + 1)
    assert backend.closed == 1


def test_without_running_usage_the_step_ends_on_the_last_choice_s_delta():
    server = Server(2, cut_at=3, lag=4, usage=False)
    ledger, _req, _owner, _ = read(server)
    assert server.cut_after_step == 3
    assert ledger.usage.completion_tokens == server.generated == 2 * (3 + 1 + 4)


def test_reservations_follow_the_stream_and_are_released_at_close():
    server = Server(2, cut_at=3, lag=0)
    ledger, req, _, _ = read(server)
    assert ledger.reserved == 0 and ledger.open_requests == 0
    assert req.record.choice_done == [True, True]


def test_a_stream_still_opening_when_cut_grace_ends_is_cut_once_open_and_read_to_its_end():
    """The server may already have sent tokens of a request whose stream the backend is
    still opening when the settle's cut_grace ends: it is cut as soon as it opens, and
    everything it sent is charged (nothing waits on a clock to decide what to read)."""
    from contextlib import asynccontextmanager

    from orchestrator.runtime import solve
    from tests.helpers import StopAtFirst, WordTask

    class SlowOpen(Backend):
        cut_grace = 1.0

        def __init__(self) -> None:
            self.calls = 0
            self.sent = 0
            self.cuts = 0

        @asynccontextmanager
        async def stream(self, request):
            self.calls += 1
            fast = self.calls == 1
            cut = [False]

            def on_cut() -> None:
                self.cuts += 1
                cut[0] = True

            async def events():
                if fast:
                    await asyncio.sleep(0.03)
                    yield TextDelta(0, " seven", 1, finish_reason="stop")
                    yield UsageReport(3, 1, final=True)
                    return
                for i in range(1, 100):  # sent while the client was still opening it
                    if cut[0] and i > 12:
                        break  # the half-close reached the server
                    self.sent += 1
                    yield TextDelta(0, " w", 1)
                    yield UsageReport(3, i, final=False)
                yield UsageReport(3, self.sent, final=True)

            if not fast:
                await asyncio.sleep(5.0)  # opening (headers, first event) takes long
            gen = events()
            try:
                yield EventStream(gen, on_cut)
            finally:
                await gen.aclose()

        async def aclose(self) -> None:
            pass

    async def run():
        backend = SlowOpen()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await solve("q", StopAtFirst(2), backend=backend,
                             task=WordTask(max_tokens=200), max_n=1)
        return loop.time() - t0, result, backend

    with simulated_runner() as runner:
        took, result, backend = runner.run(run())
    assert backend.cuts == 1 and took == pytest.approx(5.0)
    assert result.usage.completion_tokens == 1 + backend.sent == 1 + 12
    assert [f.reason for f in result.failed] == ["cancelled"]


def test_separate_streams_are_cut_after_the_step_of_those_that_have_started():
    """An emulated n on one stream slot: choice 1 has not started (it waits for choice 0's
    slot), so its step never comes; the cut waited for it until the stream's end (with a
    real server: for the whole cut grace, generating meanwhile; found by review)."""
    server = Server(2, cut_at=3, lag=1, sending=1, lockstep=False)
    ledger, _req, owner, _ = read(server)
    assert owner.closed == [("cancelled", None)]
    assert server.cut_after_step == 3
    assert ledger.usage.completion_tokens == server.generated == 3 + 1 + 1


async def test_chunks_for_a_choice_after_its_finish_are_charged_not_appended():
    """A server (llama.cpp-like, no usage) that sends chunks for a choice after its
    finish_reason: those tokens were dropped from the ledger (found by review). They are
    charged now; the solution's text stays what came up to the finish."""
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from policies import SelfConsistency
    from tests.helpers import ScriptedRequests, WordTask

    class AfterFinish(ScriptedRequests):
        async def events(self, index: int):
            for i, finish in enumerate([None, "stop", None, None]):
                self.generated += 1
                yield TextDelta(0, f" w{i}", 1, estimated=True, finish_reason=finish)

    backend = AfterFinish()
    result = await solve(Problem(id="p", problem="q"), SelfConsistency(1), backend=backend,
                         task=WordTask())
    assert backend.generated == 4
    assert result.usage.completion_tokens == 4
    assert result.solutions[0].text == " w0 w1"
