"""HTTP streams per endpoint: a limit on how many are open at once, and ``n`` emulated with
one stream per choice, for any :class:`~orchestrator.backends.base.Backend`.

:class:`StreamSlots` is an endpoint's limit: every stream opened through it holds one slot
from before its request is sent until it is closed (each stream of an emulated ``n`` takes
its own slot). ``limit=None`` leaves the number open; :meth:`StreamSlots.degrade` drops it to
one, once, and says so (a warning log line, and ``stats()``).

A server that *cuts* a running stream when another request arrives (llama-cpp-python's
server by default: ``--interrupt_requests True`` ends the running stream with ``[DONE]``
and no finish reason whenever another request waits) is detected from what it does: a
stream that ends normally while a choice has no finish reason, while another stream to the
same endpoint is open, degrades the endpoint to one stream at a time. The cut samples are
charged and recorded as failed (replaceable) by the runtime; later streams are not cut.

:class:`EmulatedN` is a backend wrapper: a request with ``n > 1`` for which ``native_n``
says no is sent as ``n`` single-choice requests run concurrently (as the slots allow) and
merged into one ``n``-choice stream, choices renumbered. A seeded request gives choice
``i`` the seed ``seed + i`` so the choices differ. A request with ``n == 1`` (or a native
``n``) is one stream, in one slot. A choice whose stream fails after the merged stream has
begun leaves the others running to their ends (their samples kept, every token they were
sent charged); the failure is then raised as the request's
:class:`~orchestrator.errors.StreamBroken`. After a fatal failure
(:data:`~orchestrator.errors.FATAL_ERRORS`: the problem ends on it) the choices still
waiting for a slot are not sent. A backend that finds out only when it sends the request
that the server refuses ``n > 1`` (a 400 naming ``n``, before anything was generated)
raises :class:`NativeNRefused`; the request is then emulated, and ``native_n`` (which
reads the backend's capabilities) says no from then on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from orchestrator import logs
from orchestrator.backends.base import (
    UNREAD_EVENTS,
    Backend,
    EventStream,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import FATAL_ERRORS, BackendError, ConfigError, StreamBroken

__all__ = ["EmulatedN", "NativeNRefused", "StreamSlots", "limited_stream"]

_log = logs.get_logger(__name__)

_MERGE_QUEUE_SIZE = 256


class NativeNRefused(BackendError):
    """Raised by a backend wrapped in :class:`EmulatedN` when the server refused an
    ``n > 1`` request before generating anything, and the backend will not ask for a
    native ``n`` again: :class:`EmulatedN` serves the request with single-choice streams.
    Never leaves :meth:`EmulatedN.stream`."""

_Item = tuple[int, StreamEvent | BaseException | None]


class _MergeQueue(asyncio.Queue[_Item]):
    """The queue from the single-choice streams to the merger, which also knows what a
    stream holds while it waits for room. An event a stream has received is charged by
    the server; a stream cancelled while it waits for a full queue (more than
    :data:`_MERGE_QUEUE_SIZE` events ahead of the reader) never queues it, so it stays
    in :attr:`in_hand` for :func:`_drain` (it was lost: 768 tokens generated, 767
    charged)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        #: choice -> the item its stream is waiting to queue (at most one per stream)
        self.in_hand: dict[int, StreamEvent | BaseException | None] = {}

    async def hand(self, index: int, item: StreamEvent | BaseException | None) -> None:
        """Queue ``item`` of choice ``index``, waiting for room."""
        if not self.full():
            self.put_nowait((index, item))
            return
        self.in_hand[index] = item
        await self.put((index, item))  # cancelled: not queued, and left in in_hand
        self.in_hand.pop(index, None)  # (taken by _drain if the stream was closed first)


NativeN = bool | Callable[[GenerationRequest], Awaitable[bool]]


class StreamSlots:
    """How many HTTP streams may be open at once on one endpoint (``None``: any number).

    Waiters are served in arrival order. :meth:`degrade` lowers the limit to 1 for good.
    """

    def __init__(self, limit: int | None = None, *, name: str = "") -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ConfigError(f"max_streams must be a positive integer or None, got {limit!r}")
        self.name = name
        self.configured = limit
        self._limit = limit
        self._in_use = 0
        self._waiting = 0
        self.peak = 0
        self.opened = 0
        self.cut_streams = 0
        #: why the endpoint went down to one stream at a time (None: it did not)
        self.degraded: str | None = None
        self._cond = asyncio.Condition()

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return self._waiting

    def _room(self) -> bool:
        return self._limit is None or self._in_use < self._limit

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one stream slot for the body of the ``async with``."""
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(self._room)
            finally:
                self._waiting -= 1
            self._in_use += 1
            self.peak = max(self.peak, self._in_use)
        try:
            yield
        finally:
            self._in_use -= 1
            await self._notify()

    async def _notify(self) -> None:
        # shielded: a slot freed by a cancelled stream must still wake the next waiter
        async def wake() -> None:
            async with self._cond:
                self._cond.notify_all()

        await asyncio.shield(wake())

    def degrade(self, reason: str) -> None:
        """One stream at a time from now on; logged once, shown in :meth:`stats`."""
        if self.degraded is not None:
            return
        self.degraded = reason
        self._limit = 1
        _log.warning("backend.one_stream_at_a_time", endpoint=self.name, reason=reason,
                     limit_before=self.configured)

    def stats(self) -> dict[str, Any]:
        return {"max_streams": self._limit, "configured_max_streams": self.configured,
                "streams_opened": self.opened, "peak_streams": self.peak,
                "cut_streams": self.cut_streams, "one_stream_at_a_time": self.degraded}


@asynccontextmanager
async def limited_stream(
    backend: Backend, request: GenerationRequest, slots: StreamSlots | None,
    *, unwanted: Callable[[], bool] | None = None,
    failing: Callable[[Exception], None] | None = None,
) -> AsyncIterator[AsyncIterator[StreamEvent]]:
    """``backend.stream(request)`` in one slot of ``slots``, watched for server-side cuts.

    ``unwanted``: asked once a slot is free; True (the request was cut while this stream
    waited for its slot) yields an empty stream and sends nothing. ``failing``: told of an
    error of the stream (opening it or reading it) before its slot is freed, so that what
    it decides holds for the next stream the slot lets in."""
    if slots is None:
        async with backend.stream(request) as events:
            yield events
        return
    async with slots.slot():
        if unwanted is not None and unwanted():
            yield _nothing()
            return
        slots.opened += 1  # streams sent (one skipped above is not)
        try:
            async with backend.stream(request) as events:
                watched = _watch(events, request.n, slots)
                cut = events.cut if isinstance(events, EventStream) and events.cuttable else None
                try:
                    yield EventStream(watched, cut)
                finally:
                    await watched.aclose()
        except Exception as exc:
            if failing is not None:
                failing(exc)
            raise


async def _nothing() -> AsyncIterator[StreamEvent]:
    return
    yield  # an async generator with no events


async def _watch(events: AsyncIterator[StreamEvent], n: int,
                 slots: StreamSlots) -> AsyncIterator[StreamEvent]:
    finished: set[int] = set()
    async for event in events:
        if isinstance(event, TextDelta) and event.finish_reason is not None:
            finished.add(event.choice)
        yield event
    # the stream ended by itself (not closed, nor cut, by its reader): did the server cut it?
    if len(finished) < n and not (isinstance(events, EventStream) and events.cut_requested):
        slots.cut_streams += 1
        others = slots.in_use - 1
        if others > 0 and (slots.limit is None or slots.limit > 1):
            slots.degrade(
                f"a stream from {slots.name or 'the endpoint'} ended without a finish "
                f"reason while {others} other stream(s) were open: the server cuts a "
                "running stream when another request arrives (llama-cpp-python's default "
                "--interrupt_requests); sending one stream at a time from now on")


class EmulatedN(Backend):
    """A :class:`~orchestrator.backends.base.Backend` that serves ``n > 1`` with ``n``
    single-choice streams of ``backend`` when ``native_n`` (a bool, or an async callable of
    the request) says the backend cannot, every stream in a slot of ``slots`` (or of a new
    :class:`StreamSlots` of ``max_streams``)."""

    def __init__(
        self,
        backend: Backend,
        *,
        native_n: NativeN = False,
        max_streams: int | None = None,
        slots: StreamSlots | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self._native_n = native_n
        self.slots = slots if slots is not None else StreamSlots(max_streams, name=name)

    @property
    def cut_grace(self) -> float:
        """The wrapped backend's (see :mod:`orchestrator.backends.base`)."""
        return float(getattr(self.backend, "cut_grace", 0.0))

    def stats(self) -> dict[str, Any]:
        return self.slots.stats()

    async def _native(self, request: GenerationRequest) -> bool:
        if isinstance(self._native_n, bool):
            return self._native_n
        return await self._native_n(request)

    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        if request.n == 1 or await self._native(request):
            opened = False
            try:
                async with limited_stream(self.backend, request, self.slots) as events:
                    opened = True
                    yield events
                return
            except NativeNRefused:
                if opened or request.n == 1:
                    raise  # not from sending this request: not ours to handle
        async with self._emulated(request) as events:
            yield events

    async def aclose(self) -> None:
        await self.backend.aclose()

    @asynccontextmanager
    async def _emulated(self, request: GenerationRequest
                        ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """``n`` single-choice streams run concurrently and merged, choices renumbered.

        The pumps never raise (they hand failures to the merger), so the TaskGroup only
        ever sees cancellation; the consumer's own exception is held while the group is
        left and re-raised afterwards, unwrapped.

        The stream is handed over once one of its streams has sent its first event: a
        failure before any (the endpoint cannot be reached, the request is refused) is
        raised here, on opening, as it is for a single stream, so a caller that fails
        over on opening (:class:`~orchestrator.backends.multi.MultiBackend`) does so.
        """
        queue = _MergeQueue(_MERGE_QUEUE_SIZE)
        held: BaseException | None = None
        opening: BaseException | None = None  # the failure on opening, if that is how
        where = self.slots.name or repr(self.backend)
        streams: list[EventStream] = []  # the open single-choice streams, cut together
        cut = [False]
        fatal = [False]  # a choice failed fatally: send no more choices (see _pump)

        def cut_all() -> None:
            cut[0] = True
            for one in streams:
                one.cut()

        async with asyncio.TaskGroup() as group:
            pumps = [group.create_task(self._pump(single_choice(request, i), i, queue,
                                                  streams, cut, fatal))
                     for i in range(request.n)]
            try:
                first = await queue.get()
            except asyncio.CancelledError:
                # cancelled before the stream was handed over (the stop, cut_grace 0):
                # what the streams had already handed over goes to the reader's sink
                for pump in pumps:
                    pump.cancel()
                sink = UNREAD_EVENTS.get()
                if sink is not None:
                    _drain(queue, {}, {}, None, sink)
                raise
            if isinstance(first[1], BaseException):  # failed before any event: on opening
                held = opening = first[1]
                for pump in pumps:
                    pump.cancel()
            else:
                failed: dict[int, BaseException] = {}
                unread: list[StreamEvent] = []
                merged = EventStream(
                    merge_streams(queue, request.n, where, first, failed, unread),
                    cut_all, lockstep=False, failed=failed, unread=unread)
                try:
                    yield merged
                except BaseException as exc:
                    held = exc
                finally:
                    for pump in pumps:
                        pump.cancel()
                    await merged.aclose()
        if held is not None and held is opening:
            # other choices may have sent events by then (queued, or held waiting for
            # room): the server counts them, so the reader charges them (found by review)
            sink = UNREAD_EVENTS.get()
            if sink is not None:
                _drain(queue, {}, {}, None, sink)
        if held is not None:
            raise held

    async def _pump(
        self,
        request: GenerationRequest,
        index: int,
        queue: _MergeQueue,
        streams: list[EventStream],
        cut: list[bool],
        fatal: list[bool],
    ) -> None:
        def failing(exc: Exception) -> None:
            if not cut[0] and isinstance(exc, FATAL_ERRORS):
                # the problem ends on it (orchestrator.loop): the choices still waiting for
                # a slot are not sent; those running go on (their samples are kept)
                fatal[0] = True

        try:
            async with limited_stream(self.backend, request, self.slots,
                                      unwanted=lambda: cut[0] or fatal[0],
                                      failing=failing) as events:
                if isinstance(events, EventStream):
                    streams.append(events)
                    if cut[0]:  # opened after the request was cut
                        events.cut()
                async for event in events:
                    if (isinstance(event, TextDelta) and event.finish_reason is not None
                            and events in streams):
                        # finished: nothing left to stop, and half-closing a connection
                        # whose body is ending races its return to the pool (a request
                        # then sent on it fails and is asked again)
                        streams.remove(events)
                    await queue.hand(index, event)
        except Exception as exc:
            # after the request was cut, a stream ending with an error (a half-closed
            # connection closed mid-body) is the end of the cut, not a failed choice
            await queue.hand(index, None if cut[0] else exc)
        else:
            await queue.hand(index, None)


def single_choice(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice ``index`` of ``request`` as a request of its own (seed ``seed + index``)."""
    seed = None if request.seed is None else request.seed + index
    return dataclasses.replace(request, n=1, seed=seed)


async def merge_streams(
    queue: asyncio.Queue[_Item],
    k: int,
    where: str,
    first: _Item | None = None,
    failed: dict[int, BaseException] | None = None,
    unread: list[StreamEvent] | None = None,
) -> AsyncIterator[StreamEvent]:
    """Events of ``k`` single-choice streams as one ``n=k`` stream.

    Its usage reports count, per choice, the larger of the choice's latest server count
    and the tokens it has streamed (flagged ``"streamed"`` where the latter was used); a
    choice that has streamed text but not reported yet is charged the prompt of one that
    has (every choice sends the same prompt). Summed over the whole request instead (the
    tokens received against the reports), siblings whose server count exceeds what they
    streamed (an end token counted, not sent) hid the tokens of a choice that had not
    reported, one that failed or was cut before its report (found by review). While such
    a surplus exists, a delta of a choice that is ahead of its own count is preceded by
    a report that includes it, so the count is right wherever the reader stops.

    A choice that fails once the stream has begun does not end the others: they are
    streams of their own, so they run on (their samples are kept, their tokens charged)
    and the failure is raised when they have ended, as the
    :class:`~orchestrator.errors.StreamBroken` of the whole request; its reader records
    the failed choice as failed. A failure before any event is raised at once. Each
    failure is also put in ``failed`` (choice -> error) as it comes, for a reader that
    stops before the end (:attr:`~orchestrator.backends.base.EventStream.failed`).

    Closed before the end (the reader cancelled), what the streams had already handed
    over and the reader had not read is put in ``unread`` (their deltas, then a count
    that includes them), and failures among it in ``failed``: the server counts those
    tokens, so the reader charges them
    (:attr:`~orchestrator.backends.base.EventStream.unread`; found by review)."""
    finished = 0
    yielded = False
    failure: tuple[int, BaseException] | None = None  # the first choice that failed
    latest: dict[int, UsageReport] = {}
    sent: dict[int, int] = {}  # tokens each choice has streamed (choices that sent text)
    surplus: dict[int, int] = {}  # choices whose server count exceeds what they streamed
    try:
        while finished < k:
            if first is not None:  # taken from the queue already (EmulatedN._emulated)
                (index, item), first = first, None
            else:
                index, item = await queue.get()
            if item is None:
                finished += 1
            elif isinstance(item, BaseException):
                if not yielded:
                    raise item
                finished += 1
                if failure is None:
                    failure = (index, item)
                if failed is not None:
                    failed[index] = item
            elif isinstance(item, TextDelta):
                yielded = True
                sent[index] = streamed = sent.get(index, 0) + item.tokens
                surplus.pop(index, None)
                report = latest.get(index)
                if report is not None and report.completion_tokens > streamed:
                    surplus[index] = report.completion_tokens - streamed
                elif surplus and item.tokens and (report is None
                                                  or streamed > report.completion_tokens):
                    # ahead of its own count: charged before the text is handed on, so a
                    # reader that stops at this delta has the right count
                    yield _per_choice_report(latest, sent)
                yield dataclasses.replace(item, choice=index)
            else:
                latest[index] = item
                yielded = True
                if item.completion_tokens > sent.get(index, 0):
                    surplus[index] = item.completion_tokens - sent.get(index, 0)
                else:
                    surplus.pop(index, None)
                yield _per_choice_report(latest, sent)
    finally:
        if finished < k and unread is not None:  # closed early: what was handed over
            _drain(queue, sent, latest, failed, unread)
    settled = len(latest) == k and all(r.final for r in latest.values())
    if latest and not settled:
        yield _per_choice_report(latest, sent)
    if failure is not None:
        index, error = failure
        if isinstance(error, StreamBroken):
            raise error
        raise StreamBroken(
            f"choice {index} of an n={k} request emulated on {where} failed: {error}"
        ) from error
    if settled:
        yield _final_sum(latest.values())


def _drain(queue: asyncio.Queue[_Item], sent: dict[int, int], latest: dict[int, UsageReport],
           failed: dict[int, BaseException] | None, unread: list[StreamEvent]) -> None:
    """Move what is left in ``queue`` to ``unread`` (see :func:`merge_streams`), then
    what its streams hold waiting for room (:class:`_MergeQueue`; each stream's is the
    latest of its items)."""
    counted = False
    left = [queue.get_nowait() for _ in range(queue.qsize())]
    if isinstance(queue, _MergeQueue):
        left.extend(queue.in_hand.items())
        queue.in_hand.clear()
    for index, item in left:
        if isinstance(item, TextDelta):
            sent[index] = sent.get(index, 0) + item.tokens
            unread.append(dataclasses.replace(item, choice=index))
            counted = True
        elif isinstance(item, UsageReport):
            latest[index] = item
            counted = True
        elif isinstance(item, BaseException) and failed is not None:
            failed.setdefault(index, item)
    if counted and latest:
        unread.append(_per_choice_report(latest, sent))


def _per_choice_report(latest: dict[int, UsageReport], sent: dict[int, int]) -> UsageReport:
    """A count that is not final: per choice, its server count or the tokens it streamed,
    whichever is larger; a choice that streamed but never reported is charged the prompt
    of one that did."""
    prompt = next(iter(latest.values())).prompt_tokens
    completion = prompt_total = 0
    sources = {src for r in latest.values() for src in r.estimated_from}
    for choice in latest.keys() | sent.keys():
        report = latest.get(choice)
        streamed = sent.get(choice, 0)
        reported = report.completion_tokens if report is not None else 0
        if report is None or streamed > reported:
            sources.add("streamed")
        completion += max(streamed, reported)
        prompt_total += report.prompt_tokens if report is not None else prompt
    return UsageReport(prompt_total, completion, final=False,
                       estimated_from=tuple(sorted(sources)))


def _final_sum(reports: Any) -> UsageReport:
    """Every choice's final report, summed: the request's final count (the running ones
    are :func:`_per_choice_report`)."""
    reports = list(reports)
    cached = [r.cached_prompt_tokens for r in reports]
    sources = sorted({s for r in reports for s in r.estimated_from})
    return UsageReport(
        sum(r.prompt_tokens for r in reports),
        sum(r.completion_tokens for r in reports),
        final=True,
        cached_prompt_tokens=None if all(c is None for c in cached)
        else sum(c or 0 for c in cached),
        estimated_from=tuple(sources),
    )
