"""The Backend seam: one streaming call plus ``aclose()``.

A backend turns a :class:`GenerationRequest` into an async stream of :class:`StreamEvent`
values. The stream is an async context manager: leaving it (normally, by an exception, or
by cancellation) closes the underlying connection, which is how a server learns that a
request was aborted.

Token accounting contract
-------------------------
* ``TextDelta.tokens`` is the backend's count of new completion tokens for that choice in
  this delta: exact when it comes from logprobs entries or from per-choice usage, else an
  estimate (``estimated=True``; one token per non-empty chunk).
* ``UsageReport`` is the server's own request-level count (all choices together). With
  ``final=False`` it is a running count (vLLM's ``continuous_usage_stats``); with
  ``final=True`` it is the closing usage chunk. The ledger trusts the latest server report
  over the sum of deltas, so a cancelled stream is charged what the server generated up
  to the last chunk received.
* Retries happen inside the backend only before the first event of a stream has been
  yielded; after that a failure raises :class:`~orchestrator.errors.StreamBroken`.
* ``cut_grace`` (seconds, :class:`Backend` default 0): a backend whose server counts
  tokens that may still be on their way when a stream is closed (a real HTTP server) sets
  it > 0, and the runtime then *settles* each stream it stops instead of closing it at
  once (:mod:`orchestrator.reader`): it reads the stream to the end of its next engine
  step, then, if the stream is an :class:`EventStream` that can be cut, calls
  :meth:`EventStream.cut` (the server is asked to stop; the HTTP backend half-closes the
  connection) and reads every event the server still sends until the stream ends.
  ``cut_grace`` bounds the wait for that next step: a stream whose step has not come by
  then is cut at once (one that cannot be cut is cancelled). A cut stream is read until
  it ends, which the backend must ensure happens (the server closes it, or the backend's
  own idle timeout ends it). Backends that count only what they hand over (replay) keep
  0: their streams are cancelled at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from orchestrator.defaults import MAX_TOP_LOGPROBS
from orchestrator.errors import ConfigError
from orchestrator.types import RequestKind, TokenLogprob


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation request. Exactly one of ``prompt`` (completions) or ``messages``
    (chat) is set. ``n`` asks for that many choices of the same prompt; ``top_logprobs``
    (``None`` = no logprobs) asks for per-token logprobs with that many alternatives.
    ``affinity`` is the request's routing key (the runtime sets the problem id): requests
    with one key belong on one replica, whose prefix cache then holds their prompt
    (:class:`~orchestrator.backends.multi.MultiBackend` routes by it; the OpenAI backend
    sends it as the ``X-Session-ID`` header, which a router's session affinity keys on).
    ``verifies`` is, for a verification, the id of the solution it verifies."""

    kind: RequestKind
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    affinity: str | None = None
    verifies: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ConfigError("GenerationRequest needs exactly one of prompt= or messages=")
        if not _positive_int(self.n):
            raise ConfigError(f"GenerationRequest.n must be an integer >= 1, got {self.n!r}")
        if not _positive_int(self.max_tokens):
            raise ConfigError(f"GenerationRequest.max_tokens must be an integer >= 1, "
                              f"got {self.max_tokens!r}")

    @property
    def endpoint(self) -> str:
        return "completions" if self.prompt is not None else "chat"


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text for choice ``choice``; ``finish_reason`` is set on the choice's last delta.
    ``reasoning``: text the server sent apart from the answer (a reasoning model's
    ``reasoning_content`` / ``reasoning``): generated and counted, not part of ``text``."""

    choice: int
    text: str
    tokens: int
    estimated: bool = False
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    reasoning: str = ""


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The server's own token count for the whole request so far (or at the end).

    ``cached_prompt_tokens``: prompt tokens served from the server's prefix cache, when the
    server says (vLLM: in the final usage chunk only, with ``--enable-prompt-tokens-details``).
    """

    prompt_tokens: int
    completion_tokens: int
    final: bool
    cached_prompt_tokens: int | None = None
    #: not the server's own usage but a count the backend made (e.g. with the server's
    #: tokenizer endpoint) that is known to be inexact: keys of
    #: :data:`orchestrator.ledger.ESTIMATE_SOURCES` saying how
    estimated_from: tuple[str, ...] = ()


StreamEvent = TextDelta | UsageReport


class HttpCounter(Protocol):
    """What counts the HTTP requests made for one logical request (the runtime's ledger
    record: :class:`orchestrator.ledger.RequestRecord`)."""

    http_requests: int
    abandoned_http_requests: int


#: The counter of the logical request being served in this task (None: count nowhere).
#: A backend adds 1 for every generation HTTP request it sends for a stream: retries and
#: each stream of an emulated ``n`` included. Tasks a backend starts inherit it.
HTTP_REQUESTS: ContextVar[HttpCounter | None] = ContextVar("solverify_http_requests",
                                                           default=None)


#: where a backend puts the events it had already received for the logical request served
#: in this task when that request is cancelled before its stream was handed over (an
#: emulated ``n`` reads its streams ahead): the reader charges them (None: no reader)
UNREAD_EVENTS: ContextVar[list[StreamEvent] | None] = ContextVar("solverify_unread_events",
                                                                 default=None)


def count_http_request(count: int = 1) -> None:
    """Add ``count`` HTTP requests to the logical request served in this task, if any."""
    counter = HTTP_REQUESTS.get()
    if counter is not None:
        counter.http_requests += count


def count_abandoned_request() -> None:
    """Note that an HTTP request of the logical request served in this task was given up
    (a timeout, a dropped connection, a cancellation) before its first token: the server
    may have generated tokens for it that no stream reported. A server that aborts a
    request when its client goes (vLLM, directly) generates none; a proxy that notices
    the client is gone only when it has a chunk to forward (vllm-router 0.1.17, measured:
    tests/test_router.py) lets it run until its first chunk."""
    counter = HTTP_REQUESTS.get()
    if counter is not None:
        counter.abandoned_http_requests += 1


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class EventStream:
    """A stream's events, and a way to *cut* it: ask the server to stop generating while
    what it already sent stays readable; the stream then ends (``StopAsyncIteration``, or
    the backend's error for a connection closed mid-body) once the server has stopped.

    A backend whose ``cut_grace`` is > 0 yields one from :meth:`Backend.stream` so the
    runtime can end a stopped stream exactly where the server's count ends (module
    docstring). ``cut`` is called at most once, synchronously; ``None``: the stream cannot
    be cut (the runtime closes it after the step it reads). ``lockstep``: its choices
    advance together, one engine step for all (one request with ``n``); False for choices
    that are streams of their own (an emulated ``n``), some of which may not have started.
    ``failed``: choices that failed while the others ran on (an emulated ``n``), with
    their errors, so a stream that ends cut or closed still says which choices failed.
    ``unread``: once the stream is closed early, events the server had already handed
    over that the reader did not read (an emulated ``n`` reads its streams ahead), for
    the reader to charge.
    """

    __slots__ = ("_cut", "_events", "cut_requested", "failed", "lockstep", "unread")

    def __init__(self, events: AsyncIterator[StreamEvent],
                 cut: Callable[[], None] | None = None, *, lockstep: bool = True,
                 failed: dict[int, BaseException] | None = None,
                 unread: list[StreamEvent] | None = None) -> None:
        self._events = events
        self._cut = cut
        self.lockstep = lockstep
        self.failed: dict[int, BaseException] = failed if failed is not None else {}
        self.unread: list[StreamEvent] = unread if unread is not None else []
        #: :meth:`cut` was called
        self.cut_requested = False

    def __aiter__(self) -> EventStream:
        return self

    def __anext__(self):  # the wrapped iterator's awaitable, handed on as is
        return self._events.__anext__()

    @property
    def cuttable(self) -> bool:
        return self._cut is not None

    def cut(self) -> None:
        """Ask the server to stop this stream (once; a no-op when it cannot be cut)."""
        if self.cut_requested or self._cut is None:
            return
        self.cut_requested = True
        self._cut()

    async def aclose(self) -> None:
        if isinstance(self._events, AsyncGenerator | EventStream):
            await self._events.aclose()


@runtime_checkable
class Backend(Protocol):
    """What the runtime needs from a model server.

    Subclass it (``class MyBackend(Backend)``) to inherit the defaults; the runtime
    refuses, with a :class:`~orchestrator.errors.ConfigError`, an object that lacks any
    of its members.
    """

    #: seconds the runtime waits for a stopped stream's next step before cutting it anyway
    #: (module docstring); 0: the server counts only what it hands over, so stopped
    #: streams are cancelled at once
    cut_grace: float = 0.0

    def stream(
        self, request: GenerationRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Open one streaming generation; the context manager closes it."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an endpoint was found (or assumed) to support."""

    n: bool = True
    stream_usage: bool = True
    continuous_usage: bool = True
    logprobs: bool = True
    max_top_logprobs: int | None = MAX_TOP_LOGPROBS

    def describe(self) -> Sequence[str]:
        return [
            f"n={'yes' if self.n else 'no'}",
            f"stream_usage={'yes' if self.stream_usage else 'no'}",
            f"continuous_usage={'yes' if self.continuous_usage else 'no'}",
            f"logprobs={'yes' if self.logprobs else 'no'}",
            f"max_top_logprobs={self.max_top_logprobs}",
        ]
