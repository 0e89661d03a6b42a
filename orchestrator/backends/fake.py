"""An in-memory backend for tests and examples, with deterministic gates.

Each request is answered by a ``responder(request, index) -> FakeReply``. A reply streams
its tokens choice by choice, round-robin (as a server interleaves ``n`` choices), reports
running usage after every token (like vLLM's ``continuous_usage_stats``) and a final usage
chunk at the end. ``hold`` pauses a reply after ``hold_after`` tokens per choice until the
test sets the event, so tests decide the order in which things happen without sleeping.

The backend counts, like a server's ``/metrics``, the tokens it actually generated and the
streams open right now, so tests can compare the ledger with the "server's" own numbers.

``cut_grace > 0`` makes it behave like a server the runtime must settle a stopped stream
with (:mod:`orchestrator.reader`): its streams can then be cut, and a cut stream generates
no token after the one in progress (a held one is released) and ends with its closing
usage chunk.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from orchestrator.backends.base import (
    Backend,
    EventStream,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import BackendError, ConfigError, StreamBroken
from orchestrator.types import TokenLogprob

_TOKEN_RE = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> tuple[str, ...]:
    """Split text into whitespace-led word tokens (``"a b"`` → ``("a", " b")``)."""
    return tuple(_TOKEN_RE.findall(text))


@dataclass(frozen=True)
class FakeReply:
    """What one request streams back.

    ``choices[i]`` are the tokens of choice ``i`` (if fewer choices than ``n`` were given,
    they are reused cyclically). ``logprobs`` optionally gives per-choice per-token
    ``TokenLogprob`` values. ``fail_after``: raise ``StreamBroken`` after that many tokens in
    total (``0`` = fail before the first token with ``error``). ``hold``/``hold_after``:
    wait for the event once every choice has streamed ``hold_after`` tokens.
    """

    choices: tuple[tuple[str, ...], ...]
    finish_reason: str = "stop"
    logprobs: tuple[tuple[TokenLogprob, ...], ...] | None = None
    hold: asyncio.Event | None = None
    hold_after: int = 0
    fail_after: int | None = None
    error: BackendError | None = None
    prompt_tokens: int = 10
    delay: float = 0.0

    @classmethod
    def text(cls, *texts: str, **kwargs) -> FakeReply:
        return cls(choices=tuple(tokenize(t) for t in texts), **kwargs)


Responder = Callable[[GenerationRequest, int], FakeReply]


@dataclass
class FakeBackend(Backend):
    """In-memory :class:`~orchestrator.backends.base.Backend`.

    ``usage``: ``"continuous"`` (running usage after each token and a final chunk),
    ``"final"`` (only the closing usage chunk), or ``"none"`` (no usage: deltas carry
    estimated counts). ``cut_grace``: see the module docstring.
    """

    responder: Responder
    usage: str = "continuous"
    cut_grace: float = 0.0
    requests: list[GenerationRequest] = field(default_factory=list)
    generated_tokens: int = 0
    open_streams: int = 0
    max_open_streams: int = 0
    closed_streams: int = 0
    aborted_streams: int = 0
    #: streams the runtime cut (asked to stop) before they ended
    cut_streams: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        if self.usage not in ("continuous", "final", "none"):
            raise ConfigError(f"usage must be continuous, final or none, got {self.usage!r}")

    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        if self.closed:
            raise BackendError("FakeBackend is closed")
        index = len(self.requests)
        self.requests.append(request)
        reply = self.responder(request, index)
        if reply.fail_after == 0:
            raise reply.error or BackendError("fake failure before the first token")
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        finished = False
        stopped = False  # cut: generate nothing more
        aborted = asyncio.Event()

        def cut() -> None:
            nonlocal stopped
            stopped = True
            aborted.set()
            self.cut_streams += 1

        async def events() -> AsyncIterator[StreamEvent]:
            nonlocal finished
            n = request.n
            scripts = [reply.choices[i % len(reply.choices)] for i in range(n)]
            lps = (
                [reply.logprobs[i % len(reply.logprobs)] for i in range(n)]
                if reply.logprobs is not None
                else None
            )
            pos = [0] * n
            total = 0
            held = reply.hold is None
            while not stopped and any(pos[i] < len(scripts[i]) for i in range(n)):
                if not held and all(pos[i] >= min(reply.hold_after, len(scripts[i]))
                                    for i in range(n)):
                    assert reply.hold is not None
                    if self.cut_grace > 0:  # a cut ends the wait, as an abort would
                        await _first_of(reply.hold, aborted)
                    else:
                        await reply.hold.wait()
                    held = True
                for i in range(n):
                    if stopped:
                        break
                    if pos[i] >= len(scripts[i]):
                        continue
                    if not held and pos[i] >= reply.hold_after:
                        continue
                    if reply.fail_after is not None and total >= reply.fail_after:
                        raise StreamBroken(f"fake stream broke after {total} tokens")
                    if reply.delay:
                        await asyncio.sleep(reply.delay)
                    else:
                        await asyncio.sleep(0)
                    token = scripts[i][pos[i]]
                    pos[i] += 1
                    total += 1
                    self.generated_tokens += 1
                    last = pos[i] == len(scripts[i])
                    yield TextDelta(
                        choice=i,
                        text=token,
                        tokens=1,
                        estimated=self.usage == "none",
                        logprobs=(lps[i][pos[i] - 1],) if lps is not None else (),
                        finish_reason=reply.finish_reason if last else None,
                    )
                    if self.usage == "continuous":
                        yield UsageReport(reply.prompt_tokens, total, final=False)
            if self.usage != "none":
                yield UsageReport(reply.prompt_tokens, total, final=True)
            finished = all(pos[i] >= len(scripts[i]) for i in range(n))

        gen = events()
        try:
            yield EventStream(gen, cut) if self.cut_grace > 0 else gen
        finally:
            await gen.aclose()
            self.open_streams -= 1
            self.closed_streams += 1
            if not finished:
                self.aborted_streams += 1

    async def aclose(self) -> None:
        self.closed = True


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until one of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def scripted(replies: Sequence[FakeReply] | Callable[[GenerationRequest, int], FakeReply]
             ) -> Responder:
    """A responder from a list (request i gets ``replies[i]``; the last one repeats)."""
    if callable(replies):
        return replies
    items = list(replies)
    if not items:
        raise ConfigError("scripted() needs at least one reply")

    def respond(request: GenerationRequest, index: int) -> FakeReply:
        return items[min(index, len(items) - 1)]

    return respond
