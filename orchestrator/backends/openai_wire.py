"""The OpenAI wire format, read by hand: server-sent event lines -> JSON chunks -> events.

Nothing here sends a request. :class:`SSEReader` turns the lines of an open streaming
response into ``(event, data)`` pairs, :func:`parse_chunk` turns one pair's data into a
chunk (a plain ``dict``), and :class:`ChunkDecoder` turns chunks into
:data:`~orchestrator.backends.base.StreamEvent` values following the token-count rules of
:mod:`orchestrator.backends.openai_compat`. Chunks stay plain dicts from the JSON decoder
all the way: no per-chunk model objects.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from orchestrator import logs
from orchestrator.backends.base import StreamEvent, TextDelta, UsageReport
from orchestrator.backends.openai_errors import Malformed, ServerSaid, describe
from orchestrator.retry import is_retryable_status
from orchestrator.types import TokenLogprob

__all__ = [
    "ChunkDecoder",
    "Malformed",
    "QuietStream",
    "RawResponse",
    "SSEReader",
    "ServerSaid",
    "blind",
    "carries_tokens",
    "close_quietly",
    "decode",
    "ends_something",
    "parse_chunk",
    "probe_tokens",
    "retryable_status",
    "snippet",
]

_log = logs.get_logger("orchestrator.backends.openai_compat")

DRAIN_S = 1.0
"""The most a finished stream is read on after its ``[DONE]``."""


class RawResponse:
    """An open streaming HTTP response (the openai client's HTTP package's ``Response``,
    status already checked); :meth:`close` closes it and its connection, once."""

    __slots__ = ("_closed", "_half_closed", "http_response")

    def __init__(self, http_response: Any) -> None:
        self.http_response = http_response
        self._closed = False
        self._half_closed = False

    def iter_lines(self) -> AsyncIterator[str]:
        # SSE is UTF-8 whatever the charset header says, and one leading byte-order mark
        # is dropped (the spec's decoding): read as the header's charset, a BOM glued
        # itself to the first field name and lost that event, and a server announcing
        # iso-8859-1 garbled every non-ASCII answer, all silently (found by review)
        self.http_response.encoding = "utf-8-sig"
        return self.http_response.aiter_lines()

    def _socket(self) -> socket.socket | None:
        stream = self.http_response.extensions.get("network_stream")
        return stream.get_extra_info("socket") if stream is not None else None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._half_closed:
                self._shut(socket.SHUT_RDWR)
            await self.http_response.aclose()

    def half_close(self) -> None:
        """Shut down the sending side of the connection: the server reads the end of the
        client's input (and aborts the request) while what it sent stays readable. The
        connection can no longer carry a request: when the response is closed it is shut
        down both ways, which the HTTP client's pool sees (it reads as closed by the
        server) and drops instead of sending the next request on it, also when the body
        had ended cleanly before the server took the half-close in."""
        self._half_closed = True
        self._shut(socket.SHUT_WR)

    def _shut(self, how: int) -> None:
        try:
            sock = self._socket()
            if sock is not None:
                sock.shutdown(how)
        except OSError as exc:  # already closed by the server: nothing to ask for
            _log.debug("backend.shutdown_failed", how=how, error=describe(exc))


async def close_quietly(raw: Any) -> None:
    """Close an open response (its HTTP response and connection); failures are logged."""
    try:
        await raw.close()
    except Exception as exc:  # closing a broken connection may fail; nothing to do about it
        _log.debug("backend.close_failed", error=describe(exc))


class QuietStream(Exception):
    """A stream that went on sending bytes (keep-alive comments, empty chunks) but no
    token for longer than its idle timeout: the transport's read timeout never fires on
    it, so without this check it is read forever."""


class SSEReader:
    """Server-sent events of a response: ``(event, data)`` pairs; None at ``[DONE]`` or
    at the end of the body. Transport failures (a cut, the idle timeout) propagate.

    After :meth:`watch` a stream that sends only comments, or events for which the reader
    does not call :meth:`progressed`, for more than ``quiet_s`` seconds raises
    :class:`QuietStream` (a silent one is the transport's idle timeout)."""

    __slots__ = ("_lines", "_quiet_s", "_since")

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines
        self._quiet_s: float | None = None
        self._since = 0.0

    def watch(self, quiet_s: float | None) -> None:
        """From now on, at most ``quiet_s`` seconds between tokens (None: no limit)."""
        self._quiet_s = quiet_s
        self.progressed()

    def progressed(self) -> None:
        """A token (or the stream's end) arrived: the quiet time starts again."""
        self._since = time.monotonic()

    def check_quiet(self) -> None:
        """:class:`QuietStream` when the stream has been without a token too long."""
        if self._quiet_s is not None and time.monotonic() - self._since > self._quiet_s:
            raise QuietStream(f"no token for over {self._quiet_s:g} s although the server "
                              "kept sending (keep-alive comments or empty chunks)")

    @classmethod
    def of(cls, raw: RawResponse) -> SSEReader:
        return cls(aiter(raw.iter_lines()))

    async def _drain(self) -> None:
        """Read the body to its end after ``[DONE]`` (a moment at most), so the connection
        can be reused and the reading generators finish instead of being left suspended."""
        try:
            async with asyncio.timeout(DRAIN_S):
                async for _ in self._lines:
                    pass
        except Exception as exc:  # a server that ends badly after [DONE]: nothing lost
                _log.debug("backend.drain_failed", error=describe(exc))

    async def next(self) -> tuple[str | None, str] | None:
        data: list[str] = []
        event: str | None = None
        while True:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:  # an event the body ends in without its blank
                # line: kept (it may carry the usage), and a bare [DONE] is the end
                if not data or "\n".join(data).strip() == "[DONE]":
                    return None
                return event, "\n".join(data)
            if not line:
                if data:
                    payload = "\n".join(data)
                    if payload.strip() == "[DONE]":
                        await self._drain()
                        return None
                    return event, payload
                event = None  # an event without data ends too: its type does not carry
                self.check_quiet()  # over to the next (the spec's dispatch; by review)
                continue
            if line.startswith(":"):
                self.check_quiet()
                continue  # an SSE comment (keep-alive)
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value


def parse_chunk(item: tuple[str | None, str], scrub: Callable[[str], str]) -> dict[str, Any]:
    """One SSE event's data as a chunk; :class:`Malformed` when it is not a JSON object;
    an error the server sent in the stream raises :class:`ServerSaid` (its message passed
    through ``scrub``)."""
    event, data = item
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise Malformed(f"unreadable data line ({snippet(data)})")
    error = chunk.get("error")
    if error or event == "error":
        if event == "error" and not error:
            error = chunk  # an ``event: error`` whose data is the error object itself
        message = error.get("message") if isinstance(error, dict) else error
        # {"error": "Overloaded", "code": 503}: the status beside a plain-text error
        status = retryable_status(error if isinstance(error, dict) else chunk)
        raise ServerSaid(scrub(str(message or snippet(data))), status)
    return chunk


_STATUS_DIGITS = re.compile(r"[0-9]{3}")
"""A status code as a string: three ASCII digits (a longer string is no status, and
``int()`` refuses one of over 4300 digits)."""

_RETRYABLE_ERROR_TYPES = {
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "overloaded_error": 503,
}
"""Error types (or string codes) that name a busy server without giving its status."""


def retryable_status(error: object) -> int | None:
    """The status an in-stream error object names, when a retry may fix it; else None.

    A numeric ``code`` (an int or a string of three ASCII digits) counts when it is in
    :data:`~orchestrator.retry.RETRYABLE_STATUS_CODES`; a ``type`` or string ``code`` in
    :data:`_RETRYABLE_ERROR_TYPES` maps to its status. Anything else (a 400, an unknown
    type) is None, so the error stays a rejection that is not retried.
    """
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if isinstance(code, str) and _STATUS_DIGITS.fullmatch(code.strip()):
        code = int(code.strip())  # "\u00b2".isdigit() is True and int() refuses it
    if isinstance(code, int) and not isinstance(code, bool):
        return code if is_retryable_status(code) else None
    for name in (code, error.get("type")):
        if isinstance(name, str) and name.lower() in _RETRYABLE_ERROR_TYPES:
            return _RETRYABLE_ERROR_TYPES[name.lower()]
    return None


def blind(event: StreamEvent) -> StreamEvent:
    """After malformed data a stream's text cannot be trusted: keep a delta's token count
    (it is charged), drop its text, logprobs and finish (the sample stays unfinished)."""
    if isinstance(event, TextDelta):
        return TextDelta(choice=event.choice, text="", tokens=event.tokens,
                         estimated=event.estimated)
    return event


def carries_tokens(event: StreamEvent) -> bool:
    if isinstance(event, TextDelta):
        return event.tokens > 0
    return event.completion_tokens > 0


def ends_something(event: StreamEvent) -> bool:
    """A choice's finish or the request's final usage: progress without a token."""
    if isinstance(event, TextDelta):
        return event.finish_reason is not None
    return event.final


def probe_tokens(chunks: list[Any], n: int, chat: bool) -> int:
    """Completion tokens of a probe stream: its closing usage, else its running counts,
    else its per-delta counts; a chunk the decoder cannot read is left out (counting an
    attempt given up must not raise in place of the error that ended it)."""
    for chunk in reversed(chunks):
        usage = get(chunk, "usage")
        if usage is not None and not get(chunk, "choices"):
            return to_int(get(usage, "completion_tokens", 0))
    decoder = ChunkDecoder(n=n, chat=chat)
    running = counted = 0
    for chunk in chunks:
        try:
            events = decode(decoder, chunk)
        except Malformed:
            continue
        for event in events:
            if isinstance(event, UsageReport):
                running = max(running, event.completion_tokens)
            else:
                counted += event.tokens
    return running or counted


def snippet(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


class ChunkDecoder:
    """Turns stream chunks (JSON objects) into :data:`StreamEvent` values for one request."""

    __slots__ = ("_chat", "_counted", "_n", "_running")

    def __init__(self, *, n: int, chat: bool) -> None:
        self._n = n
        self._chat = chat
        self._running: dict[int, int] = {}  # per choice: the server's latest count
        self._counted: dict[int, int] = {}  # per choice: the tokens given to its deltas

    def feed(self, chunk: Any) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        choices = list(get(chunk, "choices") or [])
        usage = get(chunk, "usage")
        completion = 0
        if usage is not None:
            count = _token_count(get(usage, "completion_tokens"))
            if count is None:  # no readable count: not a count of 0 (deltas stand)
                usage = None
            else:
                completion = count
        for choice in choices:
            index = to_int(get(choice, "index", 0))
            reasoning = ""
            if self._chat:
                delta = get(choice, "delta")
                text = (get(delta, "content") or "") if delta is not None else ""
                if delta is not None:
                    reasoning = _reasoning_of(delta)
                logprobs = chat_logprobs(get(choice, "logprobs"))
            else:
                text = get(choice, "text") or ""
                logprobs = completion_logprobs(get(choice, "logprobs"))
            finish = get(choice, "finish_reason")
            estimated = False
            if logprobs:
                tokens = len(logprobs)
            elif usage is not None and len(choices) == 1:
                # what the count adds to what this choice's deltas were given (the same
                # as its last count with running usage; with a count only on the last
                # content chunk, not the whole count again on top of one per chunk)
                tokens = max(0, completion - self._counted.get(index, 0))
            elif text or reasoning:
                tokens, estimated = 1, True
            else:
                tokens = 0
            if tokens:
                self._counted[index] = self._counted.get(index, 0) + tokens
            if text or tokens or finish or logprobs or reasoning:
                events.append(
                    TextDelta(
                        choice=index,
                        text=text,
                        tokens=tokens,
                        estimated=estimated,
                        logprobs=logprobs,
                        finish_reason=finish,
                        reasoning=reasoning,
                    )
                )
        if usage is not None:
            # a count a server may write; missing, unreadable or negative (-7 was stored):
            # 0, flagged as an unknown prompt size (it read as an exact 0; by review)
            readable = _token_count(get(usage, "prompt_tokens"))
            prompt = readable or 0
            unknown = ("prompt",) if readable is None else ()
            if not choices:
                events.append(UsageReport(prompt, completion, final=True,
                                          cached_prompt_tokens=cached_tokens(usage),
                                          estimated_from=unknown))
            else:
                if len(choices) == 1:
                    self._running[to_int(get(choices[0], "index", 0))] = completion
                    total = sum(self._running.values())
                else:  # several choices in one chunk: treat the count as request-level
                    total = completion
                events.append(UsageReport(prompt, total, final=False,
                                          estimated_from=unknown))
        return events


def _reasoning_of(delta: Any) -> str:
    """A chat delta's reasoning text: ``reasoning_content`` (vLLM's reasoning parsers,
    DeepSeek, llama.cpp) or ``reasoning`` (OpenRouter, Ollama); "" when neither is text."""
    for key in ("reasoning_content", "reasoning"):
        value = get(delta, key)
        if isinstance(value, str) and value:
            return value
    return ""


def cached_tokens(usage: Any) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens``, or None when the server left it out."""
    details = get(usage, "prompt_tokens_details")
    if isinstance(details, Mapping):
        cached = details.get("cached_tokens")
    else:
        cached = get(details, "cached_tokens")
    if cached is None or isinstance(cached, bool):
        return None
    try:
        return int(cached)
    except (TypeError, ValueError, OverflowError):
        return None


def decode(decoder: ChunkDecoder, chunk: Any) -> list[StreamEvent]:
    """``decoder.feed(chunk)``; :class:`Malformed` when a field of the chunk has a shape or
    value the decoder cannot read (``"choices": 5``), so the stream treats it as it treats
    an unreadable line (read on, charged) instead of failing with a non-backend error."""
    try:
        return decoder.feed(chunk)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError,
            OverflowError) as exc:
        raise Malformed(f"undecodable chunk ({type(exc).__name__}: {exc})") from None


def get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` of a JSON object (or ``obj.key`` of an object); ``default`` if absent."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        value = obj.get(key, default)
    else:
        value = getattr(obj, key, default)
    return default if value is None else value


def _token_count(value: Any) -> int | None:
    """A usage count as a server may write it (``3``, ``3.0``, ``"3"``), or None when it is
    missing or not a whole number >= 0."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


def to_int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400)
        return 0


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit integer
        return -math.inf


def chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    content = get(logprobs, "content") if logprobs is not None else None
    if not content:
        return ()
    out = []
    for entry in content:
        top = tuple(
            (str(get(alt, "token")), to_float(get(alt, "logprob")))
            for alt in (get(entry, "top_logprobs") or [])
        )
        out.append(TokenLogprob(str(get(entry, "token")), to_float(get(entry, "logprob")), top))
    return tuple(out)


def completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    if logprobs is None:
        return ()
    tokens = get(logprobs, "tokens") or []
    values = get(logprobs, "token_logprobs") or []
    tops = get(logprobs, "top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        value = to_float(values[i]) if i < len(values) else -math.inf
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], Mapping) else {}
        top = tuple(
            sorted(((str(t), to_float(lp)) for t, lp in alternatives.items()), key=lambda x: -x[1])
        )
        out.append(TokenLogprob(str(token), value, top))
    return tuple(out)
