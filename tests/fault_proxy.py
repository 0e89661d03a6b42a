"""A seeded fault-injecting reverse proxy for OpenAI-compatible servers (tests only).

It sits between a client and an upstream server (e.g. ``tests/openai_server.py``) and,
for a fraction ``rate`` of the generation requests (``POST .../chat/completions`` or
``.../completions``), injects one fault drawn from :data:`FAULT_KINDS` with a seeded RNG:

========== ================================================================================
kind       what the client gets
========== ================================================================================
500/502/503 that status with a JSON error body (upstream never asked)
429        429 with ``Retry-After`` (upstream never asked)
reset      the connection closed before any response header
hang       the stream stops at a random point (possibly before the headers) and stays silent
cut        the stream is cut (connection closed) after a random number of events
garbage    a line ``data: <not json>`` inserted at a random point; the stream goes on
truncated  one event's JSON cut short at a random point; the stream goes on
no_usage   the closing usage chunk (empty ``choices``) left out
========== ================================================================================

It counts what it *forwarded*: ``tokens_forwarded`` is the number of completion tokens in
the events it passed on to the client (a truncated event counts: the upstream streamed that
token and the client was sent it, damaged), which is what a client's ledger must equal.
Requests whose prompt is the backend's capability probe (``"Say OK."``) and ``GET``
requests are passed through untouched and uncounted (the probe is not a ledger item).

Every generation request is logged as an :class:`Attempt` with the client's
``X-Solverify-Request``/``X-Solverify-Attempt`` headers, so a test can check that no
request was retried after a token had reached the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

FAULT_KINDS: tuple[str, ...] = ("500", "502", "503", "429", "reset", "hang", "cut",
                                "garbage", "truncated", "no_usage")
PROBE_PROMPT = "Say OK."
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
        "accept-encoding"}


@dataclass
class Attempt:
    """One generation request as the proxy saw it."""

    request: str | None  # X-Solverify-Request
    attempt: int | None  # X-Solverify-Attempt
    fault: str | None
    tokens_forwarded: int = 0
    done: bool = False  # the handler finished (normally, faulted, or client gone)


@dataclass
class ProxyStats:
    injected: Counter = field(default_factory=Counter)
    attempts: list[Attempt] = field(default_factory=list)
    tokens_forwarded: int = 0
    requests: int = 0

    def retries_after_first_token(self) -> list[str]:
        """Request ids that were sent again after an attempt had forwarded a token."""
        seen_token: dict[str, int] = {}
        bad = []
        for a in sorted((a for a in self.attempts if a.request), key=lambda a: a.attempt or 0):
            assert a.request is not None
            if a.request in seen_token and (a.attempt or 0) > seen_token[a.request]:
                bad.append(a.request)
            if a.tokens_forwarded > 0 and a.request not in seen_token:
                seen_token[a.request] = a.attempt or 0
        return bad

    def retried(self) -> int:
        return sum(1 for a in self.attempts if (a.attempt or 1) > 1)


def _is_probe(body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    if body.get("prompt") == PROBE_PROMPT:
        return True
    messages = body.get("messages")
    return (isinstance(messages, list) and len(messages) == 1
            and isinstance(messages[0], dict) and messages[0].get("content") == PROBE_PROMPT)


def _tokens_in(payload: str) -> int:
    """Completion tokens in one forwarded event: the test server sends one token per
    content chunk (an empty text carries none)."""
    try:
        chunk = json.loads(payload)
    except ValueError:
        return 0
    if not isinstance(chunk, dict):
        return 0
    count = 0
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        text = (delta or {}).get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            count += 1
    return count


class FaultProxy:
    """``async with FaultProxy(upstream_root) as proxy:`` then ``proxy.url`` (``.../v1``)."""

    def __init__(self, upstream_root: str, *, rate: float = 0.2, seed: int = 0,
                 kinds: Sequence[str] = FAULT_KINDS, retry_after: str = "0.05",
                 host: str = "127.0.0.1") -> None:
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}")
        self.upstream = upstream_root.rstrip("/")
        self.rate = rate
        self.kinds = tuple(kinds)
        self.retry_after = retry_after
        self.host = host
        self._rng = random.Random(seed)
        self._bag: list[str] = []
        self.stats = ProxyStats()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0
        self.open_client_connections = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, 0)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}/v1"

    # ------------------------------------------------------------------ handling
    def _draw(self) -> str | None:
        """Fault or not with probability ``rate``; the kinds come from a seeded shuffled
        bag, so every kind is injected once per ``len(kinds)`` faults."""
        if self._rng.random() >= self.rate:
            return None
        if not self._bag:
            self._bag = list(self.kinds)
            self._rng.shuffle(self._bag)
        return self._bag.pop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.open_client_connections += 1
        try:
            return await self._handle_inner(request)
        finally:
            self.open_client_connections -= 1

    async def _handle_inner(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        target = self.upstream + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        generation = request.method == "POST" and request.path.endswith("completions")
        body: Any = None
        if generation:
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
        if not generation or _is_probe(body):
            return await self._pass_through(request, target, headers, raw)

        self.stats.requests += 1
        attempt_header = request.headers.get("X-Solverify-Attempt")
        fault = self._draw()
        attempt = Attempt(request.headers.get("X-Solverify-Request"),
                          int(attempt_header) if attempt_header else None, fault)
        self.stats.attempts.append(attempt)
        try:
            if fault in ("500", "502", "503", "429", "reset"):
                self.stats.injected[fault] += 1
            if fault in ("500", "502", "503", "429"):
                status = int(fault)
                extra = {"Retry-After": self.retry_after} if status == 429 else None
                return web.json_response(
                    {"error": {"message": f"injected {status}", "type": "fault", "code": status}},
                    status=status, headers=extra)
            if fault == "reset":
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            return await self._stream(request, target, headers, raw, fault, attempt)
        finally:
            attempt.done = True

    async def _pass_through(self, request: web.Request, target: str, headers: dict,
                            raw: bytes) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.request(request.method, target, headers=headers,
                                         data=raw or None) as up:
            data = await up.read()
            return web.Response(status=up.status, body=data,
                                content_type=up.content_type or "application/json")

    async def _stream(self, request: web.Request, target: str, headers: dict, raw: bytes,
                      fault: str | None, attempt: Attempt) -> web.StreamResponse:
        assert self._session is not None
        rng = self._rng
        # the event at which a stream fault strikes (at the last one if the stream is shorter)
        point = rng.choice((0, 1, 2, 3, 5, 8, 13, 21))
        struck = False
        if fault == "hang" and rng.random() < 0.25:
            self.stats.injected["hang"] += 1
            await asyncio.Event().wait()  # before the headers; the client's deadline ends it
        async with self._session.post(target, headers=headers, data=raw) as up:
            if up.status != 200 or "event-stream" not in (up.content_type or ""):
                data = await up.read()
                return web.Response(status=up.status, body=data,
                                    content_type=up.content_type or "application/json")
            response = web.StreamResponse(status=200, headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            index = 0
            async for payload in _events(up):
                strike = (not struck and fault in ("hang", "cut", "garbage", "truncated")
                          and (index == point or payload == "[DONE]"))
                struck = struck or strike
                if strike and fault in ("hang", "cut", "garbage"):
                    self.stats.injected[fault] += 1
                if strike and fault == "hang":
                    await asyncio.Event().wait()  # silent until the client gives up
                if strike and fault == "cut":
                    if request.transport is not None:
                        request.transport.close()  # flushes what was sent, then FIN
                    return response
                if strike and fault == "garbage":
                    await response.write(b"data: <html>not json</html>\n\n")
                is_usage_only = payload.startswith("{") and '"choices": []' in payload
                if fault == "no_usage" and is_usage_only:
                    self.stats.injected[fault] += 1
                    index += 1
                    continue
                out = payload
                if strike and fault == "truncated":
                    self.stats.injected[fault] += 1
                    if payload == "[DONE]":  # nothing left to damage: a cut-short event
                        await response.write(b'data: {"id": "x", "choi\n\n')
                    else:
                        out = payload[: max(1, len(payload) // 2)]
                await response.write(f"data: {out}\n\n".encode())
                tokens = _tokens_in(payload) if payload != "[DONE]" else 0
                attempt.tokens_forwarded += tokens
                self.stats.tokens_forwarded += tokens
                index += 1
            await response.write_eof()
            return response


async def _events(up: aiohttp.ClientResponse):
    """The data payloads of an upstream SSE response, one per event."""
    data: list[str] = []
    async for line_bytes in up.content:
        line = line_bytes.decode().rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)
