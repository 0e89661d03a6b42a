"""The OpenAI-compatible HTTP backend (vLLM first), built on ``openai.AsyncOpenAI``.

One :meth:`OpenAIBackend.stream` call is one streaming request to ``/v1/chat/completions``
(``request.messages``) or ``/v1/completions`` (``request.prompt``). The openai client's own
retries are off (``max_retries=0``); this module retries with :mod:`orchestrator.retry`,
and only while opening the stream, before its first event reaches the consumer.

Token counts (see :mod:`orchestrator.backends.base` for the contract):

* Usage is asked for with ``stream_options={"include_usage": true,
  "continuous_usage_stats": true}``. ``continuous_usage_stats`` is a vLLM extension the
  openai client has no typed field for, so the whole ``stream_options`` object travels in
  ``extra_body`` (a shallow merge into the JSON body). A server that rejects it (400 naming
  ``continuous_usage_stats`` or ``stream_options``) is remembered as not supporting it and
  the request is sent again without it.
* vLLM's continuous usage on a content chunk is the running completion count *of that
  chunk's choice*. It becomes ``UsageReport(final=False)`` with the sum over choices of
  their latest running counts (for ``n == 1``: just the count). The closing chunk (empty
  ``choices``) becomes ``UsageReport(final=True)``.
* ``TextDelta.tokens``: the number of logprob entries when logprobs were asked for
  (exact); else, with continuous usage on a one-choice chunk, the growth of that choice's
  running count (exact, also for ``n > 1``); else 1 per non-empty chunk
  (``estimated=True``).
* Prompt tokens served from the prefix cache: ``usage.prompt_tokens_details.cached_tokens``
  (vLLM sends it in the closing usage chunk when run with
  ``--enable-prompt-tokens-details``) becomes ``UsageReport.cached_prompt_tokens``.
* ``cut_grace`` (default :data:`DEFAULT_CUT_GRACE`) tells the runtime to settle a stream it
  stops instead of closing it at once, because the server has counted tokens still on
  their way (see :mod:`orchestrator.reader`, "Cutting a stream exactly"). Streams are
  :class:`~orchestrator.backends.base.EventStream` objects whose ``cut()`` half-closes the
  connection (``shutdown(SHUT_WR)``): the server sees the client's end of input, aborts
  the request and closes its side once what it wrote is flushed, so the runtime reads
  every token the server sent. (vLLM closes at once and counts the steps its engine
  finishes until the abort arrives; on a loaded server a step can be counted that the
  closed stream never carried: README "Accounting against a real server".)

Streams are read as raw server-sent events (``with_streaming_response``), so that a
malformed ``data:`` line (not JSON, truncated JSON) is a *broken stream* like a cut
connection rather than an exception that ends the read: the stream is read on to its end so
that every token the server streamed after the bad line is still charged (its text is
dropped: the sample is broken and the runtime records it as failed, replaceable), and
:class:`~orchestrator.errors.StreamBroken` is raised at the end. Malformed data before the
stream's first event is retried like any failure before the first event, unless tokens
followed it (those are charged; no retry after a first token).

Time limits: ``timeout`` is the request deadline, time to the first event of a stream
(retries included) or to the answer of a small call; ``idle_timeout`` is how long a stream
(or a response) may send no bytes at all. A hung endpoint fails within ``timeout``.

Every message and log line names the endpoint by its redacted URL (no ``user:password@``,
see :mod:`orchestrator.redact`); each request carries ``X-Solverify-Request`` (one id per
stream, the same on its retries) and ``X-Solverify-Attempt`` headers, so a proxy or server
log can tell a retry from a new request.

Errors are translated at this boundary into :mod:`orchestrator.errors`, with ``from exc``.

The parts, one module each: :mod:`~orchestrator.backends.openai_wire` (SSE lines -> chunks ->
events), :mod:`~orchestrator.backends.openai_caps` (the probe, and downgrading on a 400),
:mod:`~orchestrator.backends.openai_errors` (the one table of error translations). This
module sends the requests, retries them and reads the streams. ``n`` on a server without
it, and the limit on open streams (``max_streams``), are
:class:`~orchestrator.backends.streams.EmulatedN` in front of this module's single
streams: every HTTP stream holds a slot of the endpoint's
:class:`~orchestrator.backends.streams.StreamSlots`, and a server that cuts a running
stream when another arrives is served one stream at a time once seen doing it. A 400
naming ``n`` on a real request (capabilities given, not probed, or a server behind a
router that stopped accepting it) drops ``n`` from the capabilities and the request is
emulated (:class:`~orchestrator.backends.streams.NativeNRefused`).

HTTP requests are counted for the logical request being served
(:func:`~orchestrator.backends.base.count_http_request`): every generation POST, retries
and each stream of an emulated ``n`` included; the probe's are counted apart
(``stats()["probe_requests"]``), as are tokenizer calls.

Without usage in streams (the probe found none), a stream that ends by itself is counted
with the server's tokenizer endpoint when it has one
(:class:`~orchestrator.backends.tokenizer.ServerTokenizer`): its prompt, and each choice's
text, reported as a final ``UsageReport``. A choice that stopped at a stop sequence is
charged one more token (servers count the stop sequence's token but do not send it),
flagged ``tokenize-stop``; a chat prompt counted from its message text is flagged
``tokenize-text``. Without a tokenizer the counts are the per-chunk estimates, flagged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import os
import sys
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

import openai
import tenacity
from asyncio_throttle import Throttler

from orchestrator import defaults, logs
from orchestrator.backends.base import (
    HTTP_REQUESTS,
    Backend,
    Capabilities,
    EventStream,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
    count_abandoned_request,
    count_http_request,
)
from orchestrator.backends.lazytls import LazyTLSTransport
from orchestrator.backends.openai_caps import downgraded, narrower, probe_kwargs, run_probe
from orchestrator.backends.openai_errors import (
    Failure,
    Malformed,
    describe,
    error_message,
    translate,
    translate_deadline,
)
from orchestrator.backends.openai_wire import (
    ChunkDecoder,
    RawResponse,
    SSEReader,
    blind,
    carries_tokens,
    close_quietly,
    decode,
    ends_something,
    parse_chunk,
    probe_tokens,
    snippet,
)
from orchestrator.backends.streams import EmulatedN, NativeNRefused, StreamSlots
from orchestrator.backends.tokenizer import ServerTokenizer, root_url
from orchestrator.errors import (
    BackendError,
    ConfigError,
    RequestRejected,
    StreamBroken,
)
from orchestrator.redact import redact_text, redact_url, secrets_of_url
from orchestrator.retry import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_MAX_ATTEMPTS,
    RETRY_AFTER_CAP,
    MalformedStream,
    build_retrying,
    is_connection_error,
    make_throttler,
)

__all__ = ["OpenAIBackend"]

Endpoint = Literal["chat", "completions"]
T = TypeVar("T")

_log = logs.get_logger(__name__)

DEFAULT_TIMEOUT = defaults.REQUEST_TIMEOUT_S
"""Request deadline (s): a stream's first event, retries included, or a small call's answer."""

DEFAULT_IDLE_TIMEOUT = defaults.IDLE_TIMEOUT_S
"""Seconds a stream (or any response) may send no bytes before it counts as broken."""

CONNECT_TIMEOUT = defaults.CONNECT_TIMEOUT_S
"""Seconds to establish a connection."""

DEFAULT_CUT_GRACE = defaults.CUT_GRACE_S
"""Seconds the runtime waits for a stopped stream's next chunk before cancelling it."""

DEFAULT_KEEPALIVE_EXPIRY = defaults.KEEPALIVE_EXPIRY_S
"""Seconds an idle connection is kept for reuse (below vLLM's 5 s idle timeout)."""

PROBE_TOP_LOGPROBS = defaults.PROBE_TOP_LOGPROBS
"""``top_logprobs`` values the probe tries, largest first."""

_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}

#: the request deadline in force (``asyncio.timeout``) while a request is being sent
_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("solverify_deadline", default=None)


@contextmanager
def _in_force(deadline: asyncio.Timeout):
    """``deadline`` is the one in force (for :meth:`OpenAIBackend._throttle`, which stops
    it while the rate limit holds a request back) for the duration of the block."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _env_proxies() -> bool:
    """Does the environment name an HTTP proxy (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``, any case)?"""
    return any(os.environ.get(name) for base in ("http_proxy", "https_proxy", "all_proxy")
               for name in (base, base.upper()))


#: the HTTP response class of the HTTP package the openai client sits on (httpx, or httpx2
#: in recent releases): asked for as ``cast_to``, the client hands the response back unread
#: (the openai README's way for undocumented endpoints). Found through the public
#: ``openai.DefaultAsyncHttpxClient``, whose base class is that package's ``AsyncClient``.
_HTTP: Any = next(
    sys.modules[cls.__module__.partition(".")[0]]
    for cls in openai.DefaultAsyncHttpxClient.__mro__
    if cls.__name__ == "AsyncClient"
    and hasattr(sys.modules.get(cls.__module__.partition(".")[0]), "Response"))
_HTTP_RESPONSE: type = _HTTP.Response
#: the connection pool's size (the openai client's own defaults); only the idle expiry
#: differs from them (``keepalive_expiry``)
MAX_CONNECTIONS = 1000
MAX_KEEPALIVE = 100


#: the header carrying ``GenerationRequest.affinity`` (the problem id): the first of the
#: session headers vllm-router's ``consistent_hash`` policy keys on
AFFINITY_HEADER = "X-Session-ID"
#: for verifications, the id of the verified solution (informational)
SOLUTION_HEADER = "X-Solverify-Solution"


def _note_abandoned(exc: BaseException) -> None:
    """Count an HTTP request given up before its first token (a timeout, a dropped
    connection, a cancellation; not a status error: the server answered that one), whose
    generation the server may have gone on with (``count_abandoned_request``)."""
    if isinstance(exc, asyncio.CancelledError) or (
            isinstance(exc, Exception) and is_connection_error(exc)):
        count_abandoned_request()


class OpenAIBackend(Backend):
    """A :class:`~orchestrator.backends.base.Backend` for an OpenAI-compatible endpoint.

    ``capabilities=None`` makes the backend :meth:`probe` the endpoint on first use.
    ``rate_limit`` caps HTTP requests per second sent by this backend (retries, probes,
    the tokenizer's counting calls and each stream of an emulated n included): a number
    of requests/s, or a throttler from :func:`orchestrator.retry.make_throttler` shared
    with other backends, so that the limit is theirs together (the CLI's ``--rate`` gives
    one to every replica and the verifier). A global concurrency limit is the runtime's
    business, not this class's.
    ``cut_grace``: how long the runtime may wait for a stopped stream's next chunk so that
    it is charged exactly what the server generated (0: close at once, which may leave a
    step's tokens, counted by the server, uncharged). ``keepalive_expiry``: seconds an
    idle connection is kept for the next request (0: never reused); keep it below the
    server's own idle timeout (5 s on vLLM), or a request can go out on a connection the
    server is closing and fail before its first token (it is then retried, and counted in
    ``abandoned_http_requests``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        timeout: float | None = DEFAULT_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        capabilities: Capabilities | None = None,
        rate_limit: float | Throttler | None = None,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        retry_after_cap: float = RETRY_AFTER_CAP,
        cut_grace: float = DEFAULT_CUT_GRACE,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        max_streams: int | None = None,
        count_with_tokenizer: bool = True,
    ) -> None:
        if not base_url:
            raise ConfigError("OpenAIBackend needs a base_url, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ConfigError("OpenAIBackend needs a model name")
        for name, limit in (("timeout", timeout), ("idle_timeout", idle_timeout)):
            if limit is not None and not (math.isfinite(limit) and limit > 0):
                raise ConfigError(
                    f"{name} must be a positive number of seconds or None, got {limit!r}"
                )
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        if isinstance(rate_limit, bool) or not (
                rate_limit is None or isinstance(rate_limit, Throttler)
                or (isinstance(rate_limit, int | float) and math.isfinite(rate_limit)
                    and rate_limit > 0)):
            raise ConfigError(
                f"rate_limit must be a positive number of requests/s or a throttler from "
                f"make_throttler, got {rate_limit!r}"
            )
        for name, value in (
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
            ("retry_after_cap", retry_after_cap),
            ("cut_grace", cut_grace),
            ("keepalive_expiry", keepalive_expiry),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number of seconds, got {value!r}")

        self._raw_base_url = base_url
        self._secrets = tuple(secrets_of_url(base_url)) + ((api_key,) if api_key else ())
        self._base_url = redact_url(base_url)  # what messages and logs show
        self._model = model
        self._max_attempts = max_attempts
        # one retry policy for every request of this backend: tenacity keeps each call's
        # state in its own RetryCallState, and every hook here is synchronous, so calls
        # that interleave do not share anything that matters (tested)
        self._retrying = build_retrying(
            max_attempts,
            base=backoff_base,
            cap=backoff_cap,
            retry_after_cap=retry_after_cap,
            before_sleep=self._log_retry,
        )
        self._deadline = timeout
        self._idle = idle_timeout
        connect = min(x for x in (timeout, idle_timeout, CONNECT_TIMEOUT) if x is not None)
        client_timeout = openai.Timeout(idle_timeout, connect=connect)
        self._tag = uuid.uuid4().hex[:8]
        self._serial = itertools.count(1)
        limits = _HTTP.Limits(max_connections=MAX_CONNECTIONS,
                              max_keepalive_connections=MAX_KEEPALIVE,
                              keepalive_expiry=keepalive_expiry)
        # a transport given to the client turns off the proxies of the environment
        # (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY): with any set, the package's own transports
        # (which honour them and NO_PROXY) and TLS set up at once (found by review)
        http_client = (openai.DefaultAsyncHttpxClient(limits=limits) if _env_proxies()
                       else openai.DefaultAsyncHttpxClient(
                           transport=LazyTLSTransport(_HTTP, limits)))
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=client_timeout, max_retries=0,
            http_client=http_client,
        )
        self._caps = capabilities
        self._probed: Capabilities | None = None
        self._probe_lock = asyncio.Lock()
        #: completion tokens the capability probe made the server generate (charged to no
        #: problem; the CLI prints them so a server-side count can be reconciled)
        self.probe_completion_tokens = 0
        self._throttler = (rate_limit if isinstance(rate_limit, Throttler)
                           else make_throttler(rate_limit))
        self._closed = False
        self.cut_grace = cut_grace
        #: the endpoint's limit on open HTTP streams (``max_streams``; None: no limit);
        #: lowered to one for good when the server is seen cutting streams
        self.slots = StreamSlots(max_streams, name=self._base_url)
        self._front = EmulatedN(_SingleStreams(self), native_n=self._native_n,
                                slots=self.slots)
        #: generation requests the capability probe sent (charged to no problem)
        self.probe_requests = 0
        self._tokenizer = ServerTokenizer(self._post_root, model) if count_with_tokenizer \
            else None
        self._root = self._client.with_options(base_url=root_url(base_url))

    # ------------------------------------------------------------------ properties
    @property
    def base_url(self) -> str:
        """The endpoint's URL as shown in messages: without any ``user:password@``."""
        return self._base_url

    @property
    def model(self) -> str:
        return self._model

    @property
    def capabilities(self) -> Capabilities | None:
        """What the endpoint is known to support (None until given or probed)."""
        return self._caps

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self._base_url!r}, model={self._model!r})"

    # ------------------------------------------------------------------ Backend protocol
    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Open one streaming generation; leaving the context closes its connection."""
        self._ensure_open()
        if self._caps is None:
            await self.probe(request.endpoint)
        async with self._front.stream(request) as events:
            yield events

    async def _native_n(self, request: GenerationRequest) -> bool:
        caps = self._caps if self._caps is not None else await self.probe(request.endpoint)
        return caps.n

    def stats(self) -> dict[str, Any]:
        """The endpoint's streams (limit, opened, peak, cut by the server, whether it went
        down to one at a time and why), probe requests and tokenizer calls."""
        tokenizer = self._tokenizer
        return {**self.slots.stats(), "probe_requests": self.probe_requests,
                "tokenizer": tokenizer.shape if tokenizer is not None else None,
                "tokenize_calls": tokenizer.calls if tokenizer is not None else 0}

    async def aclose(self) -> None:
        """Close the HTTP client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._client.close()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ other public API
    async def list_models(self) -> list[str]:
        """The model ids the endpoint lists under ``GET /models``."""
        self._ensure_open()

        async def once() -> list[str]:
            await self._throttle()
            return await self._fetch_models()

        return await self._with_retries(once)

    async def _fetch_models(self) -> list[str]:
        """``GET /models``, read as JSON by hand: a reply that is not a model list (an
        HTML page, an event stream: usually a URL that is not an OpenAI-compatible API)
        is a clear :class:`RequestRejected`, not a parse error deep in the client."""
        # the client's plain GET (its auth, retries off, error types), not
        # ``client.models``, whose resource and pagination modules cost some 5 ms to load
        response = await self._client.get("/models", cast_to=_HTTP_RESPONSE)
        kind = response.headers.get("content-type") or "no content type"
        text = response.text
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            what = "JSON without a 'data' list" if body is not None else "not JSON"
            raise RequestRejected(
                f"GET {self._base_url}/models answered {response.status_code} with {kind}, "
                f"{what} ({snippet(text)}): this does not look like an OpenAI-compatible "
                f"API{self._v1_hint()}",
                status_code=response.status_code,
            )
        return [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]

    def _v1_hint(self) -> str:
        """A hint when the base URL's path does not end in ``/v1`` (empty otherwise)."""
        try:
            path = urllib.parse.urlsplit(self._raw_base_url).path.rstrip("/")
        except ValueError:
            return ""
        if path.endswith("/v1"):
            return ""
        return (f"; the base URL does not end in /v1, where OpenAI-compatible servers "
                f"(vLLM, llama.cpp, OpenAI) serve their API: try --base-url "
                f"{self._base_url.rstrip('/')}/v1")

    async def probe(self, endpoint: Endpoint = "chat") -> Capabilities:
        """Learn with tiny requests (``max_tokens=1``) what the endpoint supports.

        Runs once per backend (later calls return the cached result) and replaces the
        backend's capabilities. It checks, on ``endpoint``: whether ``n=2`` yields two
        choices; whether a stream with ``stream_options`` ends with a usage chunk and
        carries continuous usage (falling back when either is rejected); and the largest
        ``top_logprobs`` of :data:`PROBE_TOP_LOGPROBS` accepted, if any. The probe's own
        few tokens are not reported to any ledger.
        """
        self._ensure_open()
        async with self._probe_lock:
            if self._probed is not None:
                return self._probed
            outside = HTTP_REQUESTS.set(None)  # the probe's requests belong to no problem
            try:
                caps = await self._run_probe(endpoint)
            finally:
                HTTP_REQUESTS.reset(outside)
            self._probed = caps
            self._caps = caps
            _log.info(
                "backend.capabilities",
                base_url=self._base_url,
                model=self._model,
                endpoint=endpoint,
                **dataclasses.asdict(caps),
            )
            return caps

    # ------------------------------------------------------------------ one stream
    @asynccontextmanager
    async def _one_stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        opened = await self._open(request)
        events = self._events(opened)
        caps = self._caps or Capabilities()
        if not caps.stream_usage and self._tokenizer is not None:
            events = self._counted(events, request)
        try:
            yield EventStream(events, opened.response.half_close)
        finally:
            try:
                await events.aclose()
            finally:
                await close_quietly(opened.response)

    async def _open(self, request: GenerationRequest) -> _Opened:
        """Send the request and read up to its first event, retrying failures."""
        rid = f"{self._tag}-{next(self._serial)}"
        attempt = itertools.count(1)
        return await self._with_retries(lambda: self._open_once(request, rid, next(attempt)))

    async def _open_once(self, request: GenerationRequest, rid: str, attempt: int) -> _Opened:
        while True:
            caps = self._caps or Capabilities()
            kwargs = self._request_kwargs(request, caps)
            kwargs["extra_headers"] = {**kwargs.get("extra_headers", {}),
                                       "X-Solverify-Request": rid,
                                       "X-Solverify-Attempt": str(attempt)}
            await self._throttle()
            count_http_request()
            try:
                response = await self._create(request.endpoint, kwargs)
            except openai.BadRequestError as exc:
                if not self._downgrade(exc, request, caps):
                    raise
                if request.n > 1 and self._caps is not None and not self._caps.n:
                    # n refused, nothing generated: EmulatedN sends it as n single streams
                    raise NativeNRefused(self._scrub(
                        f"{self._base_url} refused n={request.n}: {error_message(exc)}"
                    )) from exc
                continue
            except BaseException as exc:
                _note_abandoned(exc)
                raise
            break
        kind = response.http_response.headers.get("content-type")
        if kind is not None and "event-stream" not in kind:
            # a page, or a server that ignored stream=true: not something to read as SSE
            # (it read as an empty stream: "ended without a finish_reason", uncharged)
            await close_quietly(response)
            raise RequestRejected(
                f"{self._base_url} answered a streaming {request.endpoint} request with "
                f"{kind}, not an event stream (text/event-stream): it does not look like an "
                "OpenAI-compatible streaming endpoint, or it ignores stream=true")
        sse = SSEReader.of(response)
        decoder = ChunkDecoder(n=request.n, chat=request.endpoint == "chat")
        opened = _Opened(response, sse, [], decoder)
        try:
            # Opened at the first event that carries a token: what comes before it (a
            # role chunk, a zero count of running usage) is held, so a failure until then
            # is retried as one before the first token (nothing was generated)
            while not opened.first:
                item = await sse.next()
                if item is None:
                    opened.ended = True
                    if opened.malformed is None and not any(
                            ends_something(e) for e in opened.held):
                        # ended before a token, a finish or a final count: nothing was
                        # generated, so it is retried as a stream cut before its first
                        # token is (it was a failed sample, and a vLLM endpoint was
                        # made one stream at a time for good as if it cut streams;
                        # found by review)
                        raise MalformedStream(
                            f"stream from {self._base_url} ended before its first token "
                            "(no finish_reason, no usage)")
                    if opened.malformed is None:
                        opened.first = opened.held  # a stream without a token: all of it
                    break
                try:
                    events = decode(opened.decoder, self._parse(item))
                except Malformed as exc:
                    opened.malformed = opened.malformed or exc
                    continue
                if opened.malformed is not None:
                    events = [blind(e) for e in events]
                if not any(carries_tokens(e) for e in events):
                    opened.held.extend(events)  # no token yet: a retry is still clean
                    continue
                opened.first = opened.held + events
            if opened.malformed is not None and not opened.first:
                raise MalformedStream(
                    f"stream from {self._base_url} sent malformed data before its first "
                    f"token: {opened.malformed}")
        except BaseException as exc:
            _note_abandoned(exc)
            await close_quietly(response)
            raise
        return opened

    def _parse(self, item: tuple[str | None, str]) -> dict[str, Any]:
        """One SSE event's data as a chunk (see :func:`~.openai_wire.parse_chunk`)."""
        return parse_chunk(item, self._scrub)

    async def _events(self, opened: _Opened) -> AsyncIterator[StreamEvent]:
        for event in opened.first:
            yield event
        malformed = opened.malformed
        count = len(opened.first)
        sse = opened.sse
        # past the first token only --idle-timeout bounds a stream, and any byte resets
        # the transport's read timeout: one that kept sending keep-alive comments or
        # empty deltas and no token was read forever (found by review)
        sse.watch(self._idle)
        while not opened.ended:
            try:
                item = await sse.next()
                if item is None:
                    break
                try:
                    events = decode(opened.decoder, self._parse(item))
                except Malformed as exc:
                    malformed = malformed or exc  # read on: what follows is still charged
                    events = []
                if any(carries_tokens(e) or ends_something(e) for e in events):
                    sse.progressed()
                else:
                    sse.check_quiet()
            except Exception as exc:
                raise StreamBroken(self._scrub(
                    f"stream from {self._base_url} broke after {count} event(s): "
                    f"{describe(exc)}")) from exc
            for event in events:
                count += 1
                yield blind(event) if malformed is not None else event
        if malformed is not None:
            raise StreamBroken(
                f"stream from {self._base_url} carried malformed data: {malformed}; it was "
                f"read to its end ({count} event(s)) so that every token it streamed is charged")

    async def _counted(self, events: AsyncIterator[StreamEvent],
                       request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """``events``, then (when the stream ended by itself with no server usage) its
        counts from the server's tokenizer as a final ``UsageReport``."""
        texts: dict[int, list[str]] = {}
        exact: dict[int, int] = {}  # per choice: tokens its deltas counted exactly
        finishes: dict[int, str | None] = {}
        reported = False
        async for event in events:
            if isinstance(event, TextDelta):
                parts = texts.setdefault(event.choice, [])
                if event.reasoning:
                    parts.append(event.reasoning)
                parts.append(event.text)
                if not event.estimated:
                    exact[event.choice] = exact.get(event.choice, 0) + event.tokens
                if event.finish_reason is not None:
                    finishes[event.choice] = event.finish_reason
            elif event.final:
                reported = True
            yield event
        if reported:
            return
        report = await self._tokenizer_usage(request, texts, finishes, exact)
        if report is not None:
            yield report

    async def _tokenizer_usage(self, request: GenerationRequest, texts: dict[int, list[str]],
                               finishes: dict[int, str | None], exact: dict[int, int]
                               ) -> UsageReport | None:
        """The final count from the server's tokenizer: the prompt, and each choice's text
        (its reasoning text included) re-tokenized, but never below the tokens its deltas
        counted exactly (logprob entries: generated text often re-tokenizes into fewer)."""
        tokenizer = self._tokenizer
        assert tokenizer is not None
        try:
            # in force for the tokenizer's requests too (as for generation: without it,
            # time queued behind the rate limit timed the count out; found by review)
            async with asyncio.timeout(self._deadline) as deadline:
                with _in_force(deadline):
                    if await tokenizer.probe() is None:
                        return None
                    prompt, prompt_estimated = await tokenizer.count_prompt(
                        request.prompt, request.messages)
                    completion, stopped = 0, False
                    for choice, parts in texts.items():
                        completion += max(await tokenizer.count_text("".join(parts)),
                                          exact.get(choice, 0))
                        if request.stop and finishes.get(choice) == "stop":
                            completion += 1  # the stop sequence's token: generated, not sent
                            stopped = True
        except Exception as exc:  # counting is a courtesy: the chunk estimates stand
            if isinstance(exc, TimeoutError):  # the deadline: the endpoint hangs
                tokenizer.deadline_passed()
            _log.warning("backend.tokenize_failed", base_url=self._base_url,
                         error=self._scrub(describe(exc)))
            return None
        sources = (("tokenize-text",) if prompt_estimated else ()) + (
            ("tokenize-stop",) if stopped else ())
        return UsageReport(prompt, completion, final=True, estimated_from=sources)

    async def _post_root(self, path: str, body: dict[str, Any]) -> Any:
        """``POST`` a JSON body at the server root (the tokenizer endpoints); the JSON reply."""
        await self._throttle()
        return await self._root.post(path, body=body, cast_to=object)

    def _request_kwargs(self, request: GenerationRequest, caps: Capabilities) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self._model,
            "stream": True,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.messages is not None:
            kwargs["messages"] = [dict(m) for m in request.messages]
        else:
            kwargs["prompt"] = request.prompt
        if request.n != 1:
            kwargs["n"] = request.n
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.stop:
            kwargs["stop"] = list(request.stop)
        k = request.top_logprobs
        if k is not None and caps.logprobs:
            if caps.max_top_logprobs is not None:
                k = min(k, caps.max_top_logprobs)
            if request.messages is not None:
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = k
            else:
                kwargs["logprobs"] = k
        extra_body: dict[str, Any] = {}
        if caps.stream_usage:
            options: dict[str, bool] = {"include_usage": True}
            if caps.continuous_usage:
                options["continuous_usage_stats"] = True
            extra_body["stream_options"] = options
        extra_body.update(request.extra)
        if extra_body:
            kwargs["extra_body"] = extra_body
        if request.affinity:
            headers = {AFFINITY_HEADER: request.affinity}
            if request.verifies is not None:
                headers[SOLUTION_HEADER] = str(request.verifies)
            kwargs["extra_headers"] = headers
        return kwargs

    async def _create(self, endpoint: Endpoint, kwargs: dict[str, Any]) -> RawResponse:
        """Send a streaming request; returns the open response (status checked, body not
        read). The body goes through the openai client's ``post`` as it is (our
        ``kwargs`` are already plain JSON): the client still applies its base URL, auth
        headers, timeouts and status-error types, but skips the per-request parameter
        transform of ``create`` (about 0.4 ms of CPU per request here)."""
        body = {k: v for k, v in kwargs.items() if k not in ("extra_body", "extra_headers")}
        body.update(kwargs.get("extra_body") or {})
        options: dict[str, Any] = {}
        if kwargs.get("extra_headers"):
            options["headers"] = kwargs["extra_headers"]
        path = _PATHS[endpoint]
        response = await self._client.post(path, cast_to=_HTTP_RESPONSE, body=body,
                                           options=options, stream=True)
        return RawResponse(response)

    def _downgrade(
        self, exc: openai.BadRequestError, request: GenerationRequest, caps: Capabilities
    ) -> bool:
        """Remember what a 400 says the server does not support; True to send again.
        ``caps``: those the refused request was sent with; what other requests dropped
        meanwhile stays dropped (:func:`~.openai_caps.narrower`)."""
        new = downgraded(caps, error_message(exc), n=request.n,
                         top_logprobs=request.top_logprobs)
        if new is None:
            return False
        if self._caps is not None:
            new = narrower(new, self._caps)
        _log.warning(
            "backend.downgrade",
            base_url=self._base_url,
            model=self._model,
            reason=error_message(exc),
            capabilities=list(new.describe()),
        )
        self._caps = new
        return True

    # ------------------------------------------------------------------ probe
    async def _run_probe(self, endpoint: Endpoint) -> Capabilities:
        async def call(*, n: int, stream_options: Mapping[str, bool] | None,
                       top_logprobs: int | None = None) -> list[Any]:
            return await self._probe_call(endpoint, n=n, stream_options=stream_options,
                                          top_logprobs=top_logprobs)

        return await run_probe(call, endpoint)

    async def _probe_call(
        self,
        endpoint: Endpoint,
        *,
        n: int,
        stream_options: Mapping[str, bool] | None,
        top_logprobs: int | None = None,
    ) -> list[Any]:
        kwargs = probe_kwargs(self._model, endpoint, n=n, stream_options=stream_options,
                              top_logprobs=top_logprobs)

        async def once() -> list[Any]:
            await self._throttle()
            self.probe_requests += 1
            response = await self._create(endpoint, kwargs)
            chunks: list[Any] = []
            try:
                sse = SSEReader.of(response)
                while (item := await sse.next()) is not None:
                    try:
                        chunks.append(self._parse(item))
                    except Malformed as exc:
                        raise MalformedStream(f"probe stream sent malformed data: {exc}"
                                              ) from None
                return chunks
            finally:
                try:
                    await close_quietly(response)
                finally:
                    # an attempt given up (a busy error after its tokens, then asked
                    # again) cost what it had sent too
                    self.probe_completion_tokens += probe_tokens(chunks, n,
                                                                 endpoint == "chat")

        return await self._with_retries(once)

    # ------------------------------------------------------------------ retries and errors
    async def _with_retries(self, fn: Callable[[], Awaitable[T]]) -> T:
        attempts = 0
        last: BaseException | None = None

        async def attempt() -> T:
            nonlocal attempts, last
            attempts += 1
            try:
                return await fn()
            except Exception as exc:
                last = exc
                raise

        try:
            async with asyncio.timeout(self._deadline) as deadline:
                with _in_force(deadline):
                    return await self._retrying(attempt)
        except BackendError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and self._deadline is not None:
                raise self._scrubbed(translate_deadline(
                    last, base_url=self._base_url, model=self._model, attempts=attempts,
                    deadline=self._deadline)) from exc
            error = await self._translate(exc, attempts)
            raise error from exc

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        _log.info(
            "backend.retry",
            base_url=self._base_url,
            attempt=state.attempt_number,
            of=self._max_attempts,
            sleep=round(state.upcoming_sleep, 3),
            error=self._scrub(describe(exc)) if exc is not None else None,
        )

    def _scrub(self, text: str) -> str:
        """``text`` without this backend's secrets (URL userinfo, API key)."""
        return redact_text(text, self._secrets)

    async def _translate(self, exc: Exception, attempts: int) -> BackendError:
        """The error users see for a failure that ended the retries (one table:
        :data:`~.openai_errors.TRANSLATIONS`), without this backend's secrets."""
        failure = Failure(exc, self._base_url, self._model, attempts, self._v1_hint())
        return self._scrubbed(await translate(failure, self._served_models))

    def _scrubbed(self, error: BackendError) -> BackendError:
        error.args = tuple(self._scrub(str(a)) for a in error.args)
        return error

    async def _served_models(self) -> list[str] | None:
        """The models the endpoint lists, for a "model not served" message; None when the
        lookup fails (a courtesy: its failure must not hide the real one)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self._fetch_models()
        except Exception as exc:
            _log.debug("backend.list_models_failed", error=describe(exc))
            return None

    # ------------------------------------------------------------------ helpers
    async def _throttle(self) -> None:
        """Wait for the rate limit (``rate_limit``). The wait is this process's own, not
        the endpoint's: the request deadline in force is stopped while it lasts, so a
        burst queued behind the limiter is not a timeout, nor a replica failed over
        (found by review)."""
        if self._throttler is None:
            return
        deadline = _DEADLINE.get()
        when = deadline.when() if deadline is not None else None
        if deadline is None or when is None:
            await self._throttler.acquire()
            return
        loop = asyncio.get_running_loop()
        left = when - loop.time()
        deadline.reschedule(None)  # the clock stops while this process holds it back
        try:
            await self._throttler.acquire()
        finally:
            deadline.reschedule(loop.time() + left)

    def _ensure_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self!r} is closed")


@dataclasses.dataclass(slots=True)
class _Opened:
    """A stream opened up to its first event (what :meth:`OpenAIBackend._open` returns)."""

    response: RawResponse
    sse: SSEReader
    first: list[StreamEvent]
    decoder: ChunkDecoder
    ended: bool = False
    malformed: Malformed | None = None  # bad data seen: read on, charge, then StreamBroken
    held: list[StreamEvent] = dataclasses.field(default_factory=list)


class _SingleStreams:
    """The backend's single HTTP streams as a Backend (what :class:`EmulatedN` wraps)."""

    __slots__ = ("_backend",)

    def __init__(self, backend: OpenAIBackend) -> None:
        self._backend = backend

    @property
    def cut_grace(self) -> float:
        return self._backend.cut_grace

    def stream(self, request: GenerationRequest) -> Any:  # an async context manager
        return self._backend._one_stream(request)

    async def aclose(self) -> None:
        await self._backend.aclose()

    def __repr__(self) -> str:
        return repr(self._backend)

