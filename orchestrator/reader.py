"""The stream reader: one request's stream read into its ledger record, and the settled cut.

:func:`read_request` runs one request: it waits for a slot of the run's
:class:`~orchestrator.limiter.Limiter`, opens the backend's stream, charges every event to
the request's :class:`~orchestrator.ledger.RequestRecord` as it arrives, hands each
finished choice to its owner (the decision loop, :mod:`orchestrator.loop`) and closes the
stream in ``finally``. It knows nothing about policies or grading.

Cutting a stream exactly
------------------------
A server counts a token when it generates it, not when the client reads it. vLLM steps
every running request together, so when one stream's last token arrives, the other
streams' tokens of that same step are usually still on their way: closing them at once
leaves those tokens counted by the server and missing from the ledger. A backend whose
``cut_grace`` is > 0 (the OpenAI-compatible one) therefore gets a *settled cut* when the
problem stops (its owner sets ``request.cut``; the reader acts on it at the stream's next event):

1. a request not yet sent (waiting for a slot) is dropped at once, by its owner;
2. a sent request is read to the end of its next engine step: the next chunk that carries
   tokens of its last running choice (vLLM writes a step's choices in index order; for
   ``n = 1`` every chunk is a step), with the running usage that comes with it;
3. then, if the stream is an :class:`~orchestrator.backends.base.EventStream` that can
   be cut, it is cut (the OpenAI backend half-closes the connection: the server aborts
   the request and closes its side) and read on until it ends, so every token the server
   sent is charged, however far behind the reader was; a stream that cannot be cut is
   closed right after the step.

Nothing here waits on a clock: the stream's own events decide when it is settled. The
owner bounds step 2 by the backend's ``cut_grace``: a stream whose next step has not come
by then is cut at once (:func:`cut`), and one still being opened (the server may already
have sent its first tokens) is cut as soon as it opens; a stream that cannot be cut is
cancelled. Once cut, a
stream is read until the backend says it has ended (the server closed it, or the
backend's own idle timeout gave up on it); no runtime clock cuts that reading short, so
no token the server sent is lost to a slow or starved reader. What remains assumed is
the server's side: that
the abort reaches it before its next step is done (the bundled CPU server steps every
40 ms or more), and that it stops on a half-closed connection (vLLM's uvicorn, aiohttp and
vllm-router do). Tokens read while settling are charged; a choice that finishes while
settling is not a solution (the policy has stopped): it is recorded as cancelled with all
its tokens. A stream that breaks after it was cut ended the way a cut ends: cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.backends.base import (
    HTTP_REQUESTS,
    UNREAD_EVENTS,
    Backend,
    EventStream,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import BackendError, StreamBroken
from orchestrator.ledger import ProblemLedger, RequestRecord
from orchestrator.limiter import Limiter
from orchestrator.types import RequestKind, Solution, TokenLogprob

__all__ = ["Choice", "Request", "RequestOwner", "cut", "read_request"]


@dataclass(slots=True)
class Choice:
    """One choice of a request: its sample id and what it streamed (its token count and
    whether it is finished live in the request's ledger record)."""

    sample_id: int
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True)
class Request:
    """One launched request while it runs."""

    request_id: int
    kind: RequestKind
    request: GenerationRequest
    record: RequestRecord
    choices: list[Choice]
    started_at: float
    backend: Backend  # who serves it: the solver's or the verifier's
    solution: Solution | None = None  # for a verification: the solution it verifies
    task: asyncio.Task | None = None
    sent: bool = False  # holds a concurrency slot: the request may be on the server
    cut: bool = False  # the problem stopped: settle the stream, then close it
    cut_sent: bool = False  # the stream was cut (asked to stop): read to its end
    events: EventStream | None = None  # the open stream, when it can be cut
    opening: bool = False  # the backend is opening the stream (the server may be sending)
    cut_on_open: bool = False  # cut the stream as soon as it opens (it was opening late)
    begun: bool = False  # its task has run: however it ends, it closes the request itself
    cancelling: bool = False  # a Cancel decision cancelled it (it may still be closing)
    #: choices that failed while the others ran on (``EventStream.failed``), with errors
    failed_choices: dict[int, BackendError] = field(default_factory=dict)
    #: the first event for a choice the request does not have (the request fails with it)
    stray: BackendError | None = None

    def done(self, choice: int) -> bool:
        return self.record.choice_done[choice]

    def tokens(self, choice: int) -> int:
        return self.record.choice_tokens[choice]

    def pending(self) -> int:
        """Choices not finished yet."""
        return self.record.choice_done.count(False)


class RequestOwner(Protocol):
    """What the reader reports to (the decision loop)."""

    def on_finished(self, req: Request, choice: int, finish_reason: str) -> None:
        """Choice ``choice`` of ``req`` finished (before any cut): a solution or a
        verification. Called before the ledger marks it finished."""
        ...

    def on_closed(self, req: Request, outcome: str, error: BackendError | None) -> None:
        """The request is over (``"ok"``, ``"cancelled"`` or ``"failed"``); its unfinished
        choices are still open in the ledger, which the reader closes right after."""
        ...


async def read_request(req: Request, ledger: ProblemLedger, limiter: Limiter,
                       owner: RequestOwner) -> None:
    """Run ``req`` to its end (module docstring). However it ends, ``owner.on_closed`` is
    called and then the request's ledger record is closed (its charge final, its
    reservations released)."""
    req.begun = True
    outcome = "failed"
    error: BackendError | None = None
    counting = HTTP_REQUESTS.set(req.record)  # the backend counts its HTTP requests
    unread: list[StreamEvent] = []  # received, not handed over: the backend puts them here
    sink = UNREAD_EVENTS.set(unread)
    stream: EventStream | None = None
    try:
        async with limiter.slot():
            req.sent = True
            req.opening = True
            async with req.backend.stream(req.request) as events:
                req.opening = False
                if isinstance(events, EventStream):
                    stream = events
                if isinstance(events, EventStream) and events.cuttable:
                    req.events = events
                    if req.cut_on_open:
                        cut(req)
                if not (req.cut_on_open and req.events is None):  # else: close at once
                    async for event in events:
                        if req.cut:
                            await settle(req, ledger, events, event)
                            break
                        _on_event(req, ledger, owner, event)
        outcome = "cancelled" if req.cut else "ok"
        if req.stray is not None and not req.cut:
            outcome, error = "failed", req.stray
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    except BackendError as exc:
        if req.cut_sent:  # a cut connection may end mid-body: that is the end of the cut
            outcome = "cancelled"
        else:
            error = exc
    finally:
        HTTP_REQUESTS.reset(counting)
        UNREAD_EVENTS.reset(sink)
        if stream is not None:
            unread.extend(stream.unread)
        served = req.record.server_usage_seen  # before the unread events add theirs
        for event in unread:  # handed over by the server, not read: it counts them
            _on_unread(req, ledger, event, served)
        if stream is not None and stream.failed:  # recorded failed, however it ended
            req.failed_choices.update({
                i: e if isinstance(e, BackendError) else StreamBroken(f"choice {i}: {e}")
                for i, e in stream.failed.items()})
        if outcome == "ok" and req.pending():
            outcome = "failed"
            given_up = [req.failed_choices[i] for i in range(req.record.n)
                        if not req.done(i) and i in req.failed_choices]
            error = (given_up[0] if len(given_up) == req.pending() else BackendError(
                "stream ended without a finish_reason for every choice"))
        owner.on_closed(req, outcome, error)
        ledger.close(req.record, outcome)


#: finish reasons with which a server gives a choice up rather than ends it (vLLM's
#: ``abort``, OpenRouter's ``error``): a failed sample, not a solution
FAILED_FINISHES = frozenset({"abort", "error"})


def _on_event(req: Request, ledger: ProblemLedger, owner: RequestOwner | None,
              event: StreamEvent) -> None:
    """Charge one event; a choice's finish (before any cut) goes to ``owner``."""
    if isinstance(event, TextDelta):
        record = req.record
        if not 0 <= event.choice < record.n:
            # no choice of this request: its tokens are charged and the stream read on
            # to its end, like malformed data, so that the usage after it is charged too
            # (raised at once, the server's count of 7 was charged 0; found by review);
            # the request then fails with this error
            if event.tokens:
                record.add_delta(event.tokens, event.estimated)
            if req.stray is None:
                req.stray = BackendError(
                    f"backend sent choice {event.choice} for a request of n={record.n}")
            return
        if record.choice_done[event.choice] or event.choice in req.failed_choices:
            # a chunk for a choice after its finish_reason: not part of its text, but
            # tokens the server sent, charged (they were dropped; found by review)
            if event.tokens:
                record.add_delta(event.tokens, event.estimated)
            return
        choice = req.choices[event.choice]
        if event.text:
            choice.parts.append(event.text)
        choice.logprobs.extend(event.logprobs)
        ledger.add_delta(record, event.choice, event.tokens, event.estimated)
        if event.finish_reason in FAILED_FINISHES and not req.cut:
            # the server gave the choice up: its text is cut short (an interim \boxed{}
            # in it voted as a finished solution; found by review), so it is a failed
            # sample, charged, that the policy may replace; later chunks for it are not
            # its text any more. After a cut an abort is the cut's: cancelled, as before
            req.failed_choices.setdefault(event.choice, StreamBroken(
                f"the server ended choice {event.choice} with finish_reason "
                f"{event.finish_reason!r}: its text is cut short"))
            return
        if event.finish_reason is not None and not req.cut and owner is not None:
            owner.on_finished(req, event.choice, event.finish_reason)
            ledger.finish(record, event.choice)
    elif isinstance(event, UsageReport):
        req.record.add_usage(event.prompt_tokens, event.completion_tokens, event.final,
                             event.cached_prompt_tokens, event.estimated_from)


def _on_unread(req: Request, ledger: ProblemLedger, event: StreamEvent,
               served: bool) -> None:
    """Charge an event handed over but not read. For a choice already finished, or a count
    once the served stream has reported its own, it comes from an attempt given up for
    another (a replica failed over while a sibling of an emulated ``n`` had streamed):
    its tokens are charged on top, its count does not replace the served one (the tokens
    were dropped and the prompt count overwritten; found by review)."""
    record = req.record
    if isinstance(event, TextDelta):
        if 0 <= event.choice < record.n and record.choice_done[event.choice]:
            record.abandoned_completion += event.tokens
            return
    elif isinstance(event, UsageReport) and served:
        return
    _on_event(req, ledger, None, event)


class _Ended(Exception):
    """The stream ended while its step was being read."""


async def settle(req: Request, ledger: ProblemLedger, events: AsyncIterator[StreamEvent],
                 event: StreamEvent) -> None:
    """The settled cut of one stream from ``event``, the first one read after the cut
    (module docstring); ``req.cut_sent`` says whether the stream was cut."""
    try:
        await _read_step(req, ledger, events, event)
    except _Ended:
        return
    if req.events is None:
        return  # closed by the caller right after the step
    cut(req)
    async for event in events:
        _on_event(req, ledger, None, event)


def cut(req: Request) -> None:
    """Cut ``req``'s stream now (it must be one that can be cut): the reader then reads
    it to its end, however it is reading it at the moment."""
    assert req.events is not None
    req.cut_sent = True
    req.events.cut()


async def _read_step(req: Request, ledger: ProblemLedger,
                     events: AsyncIterator[StreamEvent], event: StreamEvent) -> None:
    """Charge events up to the end of the stream's next engine step: the running usage
    after a token-carrying delta of its last running choice (the delta itself on a stream
    that sends no running usage). Raises :class:`_Ended` if the stream ends first."""
    running = [i for i in range(req.record.n) if not req.done(i)]
    if req.events is not None and not getattr(req.events, "lockstep", True):
        # separate streams: one that has sent nothing may be waiting for a stream slot
        # behind the others, and its step would not come before the cut grace ran out.
        # With none mid-step, cut at once: waiting for a waiting one's step sent it and
        # ran it (and those behind it) to that step after the stop (found by review)
        running = [i for i in running if req.tokens(i) > 0]
        if not running:
            _on_event(req, ledger, None, event)
            return
    last = max(running, default=-1)
    stepped = False  # the last running choice's tokens of this step were read
    while True:
        _on_event(req, ledger, None, event)
        if isinstance(event, TextDelta):
            if event.tokens > 0 and event.choice == last:
                stepped = True
                if not req.record.server_usage_seen:
                    return
        elif isinstance(event, UsageReport):
            if event.final:
                raise _Ended
            if stepped:
                return
        try:
            event = await anext(events)
        except StopAsyncIteration:
            raise _Ended from None
