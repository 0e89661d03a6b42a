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
  their way (see :mod:`orchestrator.runtime`, "Cutting a stream exactly").

Errors are translated at this boundary into :mod:`orchestrator.errors`, with ``from exc``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import Any, Literal, TypeVar

import openai
import structlog
import tenacity
from asyncio_throttle import Throttler

from orchestrator.backends.base import (
    Capabilities,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.errors import (
    BackendError,
    ConfigError,
    EndpointUnreachable,
    ModelNotFound,
    RequestRejected,
    RetriesExhausted,
    StreamBroken,
)
from orchestrator.retry import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_MAX_ATTEMPTS,
    RETRY_AFTER_CAP,
    build_retrying,
    is_connection_error,
    is_retryable_status,
    status_code_of,
)
from orchestrator.types import TokenLogprob

__all__ = ["OpenAIBackend"]

Endpoint = Literal["chat", "completions"]
T = TypeVar("T")

_log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 600.0
"""Seconds for a whole request to make progress (read timeout)."""

CONNECT_TIMEOUT = 10.0
"""Seconds to establish a connection."""

DEFAULT_CUT_GRACE = 1.0
"""Seconds the runtime waits for a stopped stream's next chunk before cancelling it."""

PROBE_TOP_LOGPROBS: tuple[int, ...] = (20, 5, 1)
"""``top_logprobs`` values the probe tries, largest first."""

_PROBE_PROMPT = "Say OK."
_MERGE_QUEUE_SIZE = 256
_NEVER_CONNECTED = frozenset({"ConnectError", "ConnectTimeout", "gaierror"})
_MODEL_MISSING = re.compile(
    r"model\b.*\b(does not exist|not found|not exist|unknown|is not (served|available))"
    r"|(unknown|invalid|no such) model",
    re.IGNORECASE | re.DOTALL,
)


#: the header carrying ``GenerationRequest.affinity`` (the problem id): the first of the
#: session headers vllm-router's ``consistent_hash`` policy keys on
AFFINITY_HEADER = "X-Session-ID"
#: for verifications, the id of the verified solution (informational)
SOLUTION_HEADER = "X-Solverify-Solution"


class OpenAIBackend:
    """A :class:`~orchestrator.backends.base.Backend` for an OpenAI-compatible endpoint.

    ``capabilities=None`` makes the backend :meth:`probe` the endpoint on first use.
    ``rate_limit`` caps requests per second sent by this backend (retries and probes
    included); a global concurrency limit is the runtime's business, not this class's.
    ``cut_grace``: how long the runtime may wait for a stopped stream's next chunk so that
    it is charged exactly what the server generated (0: close at once, which may leave a
    step's tokens, counted by the server, uncharged).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str = "EMPTY",
        timeout: float | None = DEFAULT_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        capabilities: Capabilities | None = None,
        rate_limit: float | None = None,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        retry_after_cap: float = RETRY_AFTER_CAP,
        cut_grace: float = DEFAULT_CUT_GRACE,
    ) -> None:
        if not base_url:
            raise ConfigError("OpenAIBackend needs a base_url, e.g. http://127.0.0.1:8000/v1")
        if not model:
            raise ConfigError("OpenAIBackend needs a model name")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise ConfigError(
                f"timeout must be a positive number of seconds or None, got {timeout!r}"
            )
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be >= 1, got {max_attempts}")
        if rate_limit is not None and not (math.isfinite(rate_limit) and rate_limit > 0):
            raise ConfigError(
                f"rate_limit must be a positive number of requests/s, got {rate_limit!r}"
            )
        for name, value in (
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
            ("retry_after_cap", retry_after_cap),
            ("cut_grace", cut_grace),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number of seconds, got {value!r}")

        self._base_url = base_url
        self._model = model
        self._max_attempts = max_attempts
        self._backoff = (backoff_base, backoff_cap, retry_after_cap)
        client_timeout = (
            None
            if timeout is None
            else openai.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
        )
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=client_timeout, max_retries=0
        )
        self._caps = capabilities
        self._probed: Capabilities | None = None
        self._probe_lock = asyncio.Lock()
        self._throttler = _make_throttler(rate_limit)
        self._closed = False
        self.cut_grace = cut_grace

    # ------------------------------------------------------------------ properties
    @property
    def base_url(self) -> str:
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
        caps = self._caps if self._caps is not None else await self.probe(request.endpoint)
        if request.n > 1 and not caps.n:
            async with self._emulated_n(request) as events:
                yield events
        else:
            async with self._one_stream(request) as events:
                yield events

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
            page = await self._client.models.list()
            return [m.id for m in page.data]

        return await self._with_retries(once)

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
            caps = await self._run_probe(endpoint)
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
        try:
            yield events
        finally:
            try:
                await events.aclose()
            finally:
                await _close_quietly(opened.raw)

    async def _open(self, request: GenerationRequest) -> _Opened:
        """Send the request and read up to its first event, retrying failures."""
        return await self._with_retries(lambda: self._open_once(request))

    async def _open_once(self, request: GenerationRequest) -> _Opened:
        while True:
            caps = self._caps or Capabilities()
            kwargs = self._request_kwargs(request, caps)
            await self._throttle()
            try:
                raw = await self._create(request.endpoint, kwargs)
            except openai.BadRequestError as exc:
                if not self._downgrade(exc, request, caps):
                    raise
                continue
            break
        decoder = _ChunkDecoder(n=request.n, chat=request.endpoint == "chat")
        first: list[StreamEvent] = []
        ended = False
        try:
            while not first:
                try:
                    chunk = await raw.__anext__()
                except StopAsyncIteration:
                    ended = True
                    break
                first = decoder.feed(chunk)
        except BaseException:
            await _close_quietly(raw)
            raise
        return _Opened(raw, first, decoder, ended)

    async def _events(self, opened: _Opened) -> AsyncIterator[StreamEvent]:
        for event in opened.first:
            yield event
        if opened.ended:
            return
        count = len(opened.first)
        while True:
            try:
                chunk = await opened.raw.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise StreamBroken(
                    f"stream from {self._base_url} broke after {count} event(s): {_describe(exc)}"
                ) from exc
            for event in opened.decoder.feed(chunk):
                count += 1
                yield event

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

    async def _create(self, endpoint: Endpoint, kwargs: dict[str, Any]) -> Any:
        if endpoint == "chat":
            return await self._client.chat.completions.create(**kwargs)
        return await self._client.completions.create(**kwargs)

    def _downgrade(
        self, exc: openai.BadRequestError, request: GenerationRequest, caps: Capabilities
    ) -> bool:
        """Remember what a 400 says the server does not support; True to send again."""
        message = _error_message(exc).lower()
        new: Capabilities | None = None
        if caps.stream_usage and caps.continuous_usage and "continuous_usage_stats" in message:
            new = dataclasses.replace(caps, continuous_usage=False)
        elif caps.stream_usage and "stream_options" in message:
            new = dataclasses.replace(caps, stream_usage=False, continuous_usage=False)
        elif request.top_logprobs is not None and caps.logprobs and "logprob" in message:
            asked = request.top_logprobs
            if caps.max_top_logprobs is not None:
                asked = min(asked, caps.max_top_logprobs)
            lower = [k for k in PROBE_TOP_LOGPROBS if k < asked]
            if lower:
                new = dataclasses.replace(caps, max_top_logprobs=lower[0])
            else:
                new = dataclasses.replace(caps, logprobs=False, max_top_logprobs=None)
        if new is None:
            return False
        _log.warning(
            "backend.downgrade",
            base_url=self._base_url,
            model=self._model,
            reason=_error_message(exc),
            capabilities=list(new.describe()),
        )
        self._caps = new
        return True

    # ------------------------------------------------------------------ n emulation
    @asynccontextmanager
    async def _emulated_n(
        self, request: GenerationRequest
    ) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """``n`` single-choice streams run concurrently and merged, choices renumbered.
        A seeded request gives stream ``i`` the seed ``seed + i`` so the choices differ.

        The pumps never raise (they hand failures to the merger), so the TaskGroup only
        ever sees cancellation; the consumer's own exception is held while the group is
        left and re-raised afterwards, unwrapped.
        """
        queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue(
            _MERGE_QUEUE_SIZE
        )
        held: BaseException | None = None
        async with asyncio.TaskGroup() as group:
            pumps = [
                group.create_task(self._pump(_single_choice(request, i), i, queue))
                for i in range(request.n)
            ]
            merged = _merge(queue, request.n, self._base_url)
            try:
                yield merged
            except BaseException as exc:
                held = exc
            finally:
                for pump in pumps:
                    pump.cancel()
                await merged.aclose()
        if held is not None:
            raise held

    async def _pump(
        self,
        request: GenerationRequest,
        index: int,
        queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]],
    ) -> None:
        try:
            async with self._one_stream(request) as events:
                async for event in events:
                    await queue.put((index, event))
        except Exception as exc:
            await queue.put((index, exc))
        else:
            await queue.put((index, None))

    # ------------------------------------------------------------------ probe
    async def _run_probe(self, endpoint: Endpoint) -> Capabilities:
        n = 2
        options: dict[str, bool] | None = {"include_usage": True, "continuous_usage_stats": True}
        while True:
            try:
                chunks = await self._probe_call(endpoint, n=n, stream_options=options)
                break
            except RequestRejected as exc:
                message = _error_message(exc.__cause__ or exc).lower()
                if exc.status_code != 400:
                    raise
                if (
                    options
                    and "continuous_usage_stats" in options
                    and ("continuous_usage_stats" in message)
                ):
                    options = {"include_usage": True}
                elif options is not None and "stream_options" in message:
                    options = None
                elif n > 1 and re.search(r"\bn\b", message):
                    n = 1
                else:
                    raise
        indices = {int(getattr(c, "index", 0) or 0) for ch in chunks for c in ch.choices or []}
        n_ok = n > 1 and len(indices) >= n
        usage_ok = any(ch.usage is not None and not ch.choices for ch in chunks)
        continuous_ok = any(ch.usage is not None and ch.choices for ch in chunks)

        logprobs_ok, max_top = False, None
        for k in PROBE_TOP_LOGPROBS:
            try:
                chunks = await self._probe_call(endpoint, n=1, stream_options=None, top_logprobs=k)
            except RequestRejected as exc:
                if exc.status_code in (400, 422):
                    continue
                raise
            decoder = _ChunkDecoder(n=1, chat=endpoint == "chat")
            entries = [
                lp
                for ch in chunks
                for ev in decoder.feed(ch)
                if isinstance(ev, TextDelta)
                for lp in ev.logprobs
            ]
            if entries:
                logprobs_ok, max_top = True, k
            break
        return Capabilities(
            n=n_ok,
            stream_usage=usage_ok,
            continuous_usage=continuous_ok,
            logprobs=logprobs_ok,
            max_top_logprobs=max_top,
        )

    async def _probe_call(
        self,
        endpoint: Endpoint,
        *,
        n: int,
        stream_options: Mapping[str, bool] | None,
        top_logprobs: int | None = None,
    ) -> list[Any]:
        kwargs: dict[str, Any] = {"model": self._model, "stream": True, "max_tokens": 1}
        if endpoint == "chat":
            kwargs["messages"] = [{"role": "user", "content": _PROBE_PROMPT}]
            if top_logprobs is not None:
                kwargs["logprobs"] = True
                kwargs["top_logprobs"] = top_logprobs
        else:
            kwargs["prompt"] = _PROBE_PROMPT
            if top_logprobs is not None:
                kwargs["logprobs"] = top_logprobs
        if n != 1:
            kwargs["n"] = n
        if stream_options is not None:
            kwargs["extra_body"] = {"stream_options": dict(stream_options)}

        async def once() -> list[Any]:
            await self._throttle()
            raw = await self._create(endpoint, kwargs)
            try:
                return [chunk async for chunk in raw]
            finally:
                await _close_quietly(raw)

        return await self._with_retries(once)

    # ------------------------------------------------------------------ retries and errors
    async def _with_retries(self, fn: Callable[[], Awaitable[T]]) -> T:
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await fn()

        base, cap, retry_after_cap = self._backoff
        retrying = build_retrying(
            self._max_attempts,
            base=base,
            cap=cap,
            retry_after_cap=retry_after_cap,
            before_sleep=self._log_retry,
        )
        try:
            return await retrying(attempt)
        except BackendError:
            raise
        except Exception as exc:
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
            error=_describe(exc) if exc is not None else None,
        )

    async def _translate(self, exc: Exception, attempts: int) -> BackendError:
        status = status_code_of(exc)
        where = f"{self._base_url} (model {self._model!r})"
        message = _error_message(exc)
        if status is not None:
            if _is_model_missing(status, exc):
                return await self._model_not_found(message)
            if is_retryable_status(status):
                return RetriesExhausted(
                    f"{where}: gave up after {attempts} attempt(s); last status {status}: {message}"
                )
            return RequestRejected(f"{where} answered {status}: {message}", status_code=status)
        if _never_connected(exc):
            return EndpointUnreachable(
                f"cannot reach {self._base_url} after {attempts} attempt(s): {_describe(exc)}"
            )
        if is_connection_error(exc):
            return RetriesExhausted(
                f"{where}: gave up after {attempts} attempt(s); last error: {_describe(exc)}"
            )
        return RequestRejected(f"{where} failed: {_describe(exc)}")

    async def _model_not_found(self, message: str) -> ModelNotFound:
        available: list[str] | None = None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                page = await self._client.models.list()
                available = [m.id for m in page.data]
        except Exception as exc:  # a courtesy lookup: its failure must not hide the real one
            _log.debug("backend.list_models_failed", error=_describe(exc))
        served = f"; it serves: {', '.join(available)}" if available else ""
        return ModelNotFound(
            f"model {self._model!r} is not served at {self._base_url} ({message}){served}"
        )

    # ------------------------------------------------------------------ helpers
    async def _throttle(self) -> None:
        if self._throttler is not None:
            await self._throttler.acquire()

    def _ensure_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self!r} is closed")


# ---------------------------------------------------------------------- stream decoding
@dataclasses.dataclass(slots=True)
class _Opened:
    raw: Any
    first: list[StreamEvent]
    decoder: _ChunkDecoder
    ended: bool


class _ChunkDecoder:
    """Turns openai stream chunks into :data:`StreamEvent` values for one request."""

    __slots__ = ("_chat", "_n", "_running")

    def __init__(self, *, n: int, chat: bool) -> None:
        self._n = n
        self._chat = chat
        self._running: dict[int, int] = {}

    def feed(self, chunk: Any) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        choices = list(getattr(chunk, "choices", None) or [])
        usage = getattr(chunk, "usage", None)
        completion = _int(getattr(usage, "completion_tokens", 0)) if usage is not None else 0
        for choice in choices:
            index = _int(getattr(choice, "index", 0))
            if self._chat:
                delta = getattr(choice, "delta", None)
                text = (getattr(delta, "content", None) or "") if delta is not None else ""
                logprobs = _chat_logprobs(getattr(choice, "logprobs", None))
            else:
                text = getattr(choice, "text", None) or ""
                logprobs = _completion_logprobs(getattr(choice, "logprobs", None))
            finish = getattr(choice, "finish_reason", None)
            estimated = False
            if logprobs:
                tokens = len(logprobs)
            elif usage is not None and len(choices) == 1:
                tokens = max(0, completion - self._running.get(index, 0))
            elif text:
                tokens, estimated = 1, True
            else:
                tokens = 0
            if text or tokens or finish or logprobs:
                events.append(
                    TextDelta(
                        choice=index,
                        text=text,
                        tokens=tokens,
                        estimated=estimated,
                        logprobs=logprobs,
                        finish_reason=finish,
                    )
                )
        if usage is not None:
            prompt = _int(getattr(usage, "prompt_tokens", 0))
            if not choices:
                events.append(UsageReport(prompt, completion, final=True,
                                          cached_prompt_tokens=_cached_tokens(usage)))
            else:
                if len(choices) == 1:
                    self._running[_int(getattr(choices[0], "index", 0))] = completion
                    total = sum(self._running.values())
                else:  # several choices in one chunk: treat the count as request-level
                    total = completion
                events.append(UsageReport(prompt, total, final=False))
        return events


def _cached_tokens(usage: Any) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens``, or None when the server left it out."""
    details = getattr(usage, "prompt_tokens_details", None)
    if isinstance(details, Mapping):
        cached = details.get("cached_tokens")
    else:
        cached = getattr(details, "cached_tokens", None)
    if cached is None or isinstance(cached, bool):
        return None
    try:
        return int(cached)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return -math.inf


def _chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return ()
    out = []
    for entry in content:
        top = tuple(
            (str(alt.token), _float(alt.logprob))
            for alt in (getattr(entry, "top_logprobs", None) or [])
        )
        out.append(TokenLogprob(str(entry.token), _float(entry.logprob), top))
    return tuple(out)


def _completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    if logprobs is None:
        return ()
    tokens = getattr(logprobs, "tokens", None) or []
    values = getattr(logprobs, "token_logprobs", None) or []
    tops = getattr(logprobs, "top_logprobs", None) or []
    out = []
    for i, token in enumerate(tokens):
        value = _float(values[i]) if i < len(values) else -math.inf
        alternatives = tops[i] if i < len(tops) and tops[i] else {}
        top = tuple(
            sorted(((str(t), _float(lp)) for t, lp in alternatives.items()), key=lambda x: -x[1])
        )
        out.append(TokenLogprob(str(token), value, top))
    return tuple(out)


async def _merge(
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]],
    k: int,
    base_url: str,
) -> AsyncIterator[StreamEvent]:
    """Events of ``k`` single-choice streams as one ``n=k`` stream."""
    finished = 0
    yielded = False
    latest: dict[int, UsageReport] = {}
    while finished < k:
        index, item = await queue.get()
        if item is None:
            finished += 1
        elif isinstance(item, BaseException):
            if yielded and not isinstance(item, StreamBroken):
                raise StreamBroken(
                    f"choice {index} of an n={k} request emulated on {base_url} failed: {item}"
                ) from item
            raise item
        elif isinstance(item, TextDelta):
            yielded = True
            yield dataclasses.replace(item, choice=index)
        else:
            latest[index] = item
            yielded = True
            yield UsageReport(
                sum(r.prompt_tokens for r in latest.values()),
                sum(r.completion_tokens for r in latest.values()),
                final=False,
            )
    if len(latest) == k and all(r.final for r in latest.values()):
        cached = [r.cached_prompt_tokens for r in latest.values()]
        yield UsageReport(
            sum(r.prompt_tokens for r in latest.values()),
            sum(r.completion_tokens for r in latest.values()),
            final=True,
            cached_prompt_tokens=None
            if all(c is None for c in cached)
            else sum(c or 0 for c in cached),
        )


# ---------------------------------------------------------------------- small helpers
def _single_choice(request: GenerationRequest, index: int) -> GenerationRequest:
    seed = None if request.seed is None else request.seed + index
    return dataclasses.replace(request, n=1, seed=seed)


def _make_throttler(rate_limit: float | None) -> Throttler | None:
    """A throttler for ``rate_limit`` requests/s (0.5 -> 1 request every 2 s)."""
    if rate_limit is None:
        return None
    ratio = Fraction(rate_limit).limit_denominator(100)
    return Throttler(rate_limit=max(1, ratio.numerator), period=float(ratio.denominator))


async def _close_quietly(raw: Any) -> None:
    """Close an openai stream (its HTTP response and connection)."""
    try:
        await raw.close()
    except Exception as exc:  # closing a broken connection may fail; nothing to do about it
        _log.debug("backend.close_failed", error=_describe(exc))


def _error_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {_error_message(exc)}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def _is_model_missing(status: int, exc: BaseException) -> bool:
    if status not in (400, 404):
        return False
    body = getattr(exc, "body", None)
    code = str(body.get("code") or "") if isinstance(body, Mapping) else ""
    if code == "model_not_found":
        return True
    return bool(_MODEL_MISSING.search(_error_message(exc)))


def _never_connected(exc: BaseException) -> bool:
    """True when the chain of causes shows that no connection was ever made."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if {cls.__name__ for cls in type(current).__mro__} & _NEVER_CONNECTED:
            return True
        current = current.__cause__ or current.__context__
    return False
