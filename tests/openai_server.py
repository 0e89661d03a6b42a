"""A real local HTTP server that speaks enough of the OpenAI protocol for the openai client.

It serves ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as SSE, or a
plain JSON body), ``GET /v1/models`` and ``GET /metrics`` on 127.0.0.1, and behaves like
vLLM where that matters to solverify:

* ``stream_options.include_usage`` adds a closing chunk with empty ``choices`` and the
  request's usage; ``stream_options.continuous_usage_stats`` adds to every content chunk
  the running completion-token count *of that chunk's choice* (vLLM's semantics).
* ``n`` choices are generated in lock-step and their chunks interleaved, one choice a chunk.
* ``top_logprobs``/``logprobs`` give per-token logprobs (capped by ``max_logprobs``,
  above which the request is rejected with 400, as vLLM does).
* A client that goes away aborts its request: generation stops, ``requests_aborted``
  counts it, and ``generation_tokens_total`` only counts tokens actually generated.
* ``prefix_cache_block=B`` imitates vLLM's automatic prefix caching as reported with
  ``--enable-prompt-tokens-details``: the closing usage (and a plain JSON body's usage)
  carries ``prompt_tokens_details.cached_tokens``, the longest word prefix shared with an
  earlier prompt, in whole blocks of ``B`` words, always leaving the last word uncached.

What the server answers is scripted by a ``responder``: a callable from the request's
JSON body to one list of tokens per choice (``str`` or :class:`Tok` with a logprob and
alternatives). Faults are injected with :meth:`OpenAIServer.fail_next` (status, optional
``Retry-After``), :meth:`OpenAIServer.drop_after` (close the connection mid-stream) and the
``reject_continuous_usage`` / ``reject_stream_options`` / ``ignore_n`` switches;
:meth:`OpenAIServer.garble_next` sends a malformed ``data:`` line (not JSON) at a chosen
event of the next streams, the stream going on after it.

``llamacpp=True`` behaves like llama-cpp-python's server on its default settings (the
one fact set solverify must cope with on "any OpenAI-compatible server"): ``n`` ignored,
``stream_options`` ignored (no usage in streams; a plain JSON body still has usage), one
generation at a time, and a running stream *cut* (``[DONE]`` without a finish reason)
right after its next chunk whenever another request waits (``--interrupt_requests``,
on by default there). ``POST /extras/tokenize`` (``{"input": text}`` -> ``{"tokens":
[...]}``, a ``<bos>`` id first, as llama-cpp-python) and ``POST /tokenize`` (vLLM's
shape: ``prompt`` or ``messages`` -> ``{"count", "tokens", "max_model_len"}``) count
whitespace-led words, the server's own token unit; like llama-cpp-python's, the
tokenizer waits for (and interrupts) a running generation. ``tokenize_paths`` chooses which
of the two are served (default: ``/extras/tokenize`` in ``llamacpp`` mode, none otherwise).

``step_gate`` makes a test's timing explicit instead of wall-clock: an async callable given
a :class:`Step` (stream number, step index, script length) that each stream awaits before
generating each step (one token per running choice), so a test decides exactly which
tokens exist when.

Run standalone with a deterministic maths-and-verification responder::

    python -m tests.openai_server --port 8011
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

VERIFY_MARKER = "Is the answer correct (Yes/No)?"


@dataclass(frozen=True, slots=True)
class Tok:
    """A scripted token: its text, its logprob and optional (token, logprob) alternatives."""

    text: str
    logprob: float = -0.25
    top: tuple[tuple[str, float], ...] = ()


Scripted = str | Tok
Responder = Callable[[Mapping[str, Any]], Sequence[Sequence[Scripted]]]


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    body: Mapping[str, Any] | None
    at: float
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased
    #: the client's (host, port): one per TCP connection, so reuse shows as a repeat
    peer: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What a stream is about to generate: step ``step`` (0-based) of stream ``stream``
    (1-based, in arrival order), whose longest choice has ``length`` tokens."""

    stream: int
    step: int
    length: int
    n: int


StepGate = Callable[[Step], Any]


@dataclass(slots=True)
class _Failure:
    status: int
    retry_after: str | None
    message: str | None


@dataclass(slots=True)
class _Stats:
    generation_tokens_total: int = 0
    prompt_tokens_total: int = 0
    requests_running: int = 0
    requests_aborted: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    received: list[ReceivedRequest] = field(default_factory=list)


class _ClientGone(Exception):
    """The client closed the connection; stop generating."""


class _Drop(Exception):
    """Injected fault: cut the connection now."""


class _Interrupted(Exception):
    """llamacpp mode: another request waits; end this stream with ``[DONE]`` now."""


BOS_ID = 2
_WORD_RE = re.compile(r"\s*\S+")


def _word_tokens(text: str) -> list[str]:
    """The test server's token unit: whitespace-led words (a prompt's count is the same)."""
    return _WORD_RE.findall(text)


def _token_id(word: str) -> int:
    return 3 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:3], "big")


def echo_responder(body: Mapping[str, Any]) -> list[list[Scripted]]:
    """Default: every choice answers ``" The final answer is \\boxed{42}."`` in 7 tokens."""
    tokens: list[Scripted] = [" The", " final", " answer", " is", " \\boxed{", "42", "}."]
    return [tokens]


def prompt_text(body: Mapping[str, Any]) -> str:
    """The request's prompt, or its messages' contents joined by newlines."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        return "\n".join(str(p) for p in prompt)
    return str(prompt)


def _count_prompt_tokens(body: Mapping[str, Any]) -> int:
    return max(1, len(prompt_text(body).split()))


def _error_body(message: str, status: int, err_type: str, param: str | None = None) -> str:
    return json.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    )


def _error_response(
    status: int, message: str, err_type: str, *, retry_after: str | None = None
) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return web.Response(
        status=status,
        text=_error_body(message, status, err_type),
        content_type="application/json",
        headers=headers,
    )


_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeout",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


class OpenAIServer:
    """The server. Use ``async with OpenAIServer(...) as server:`` then ``server.url``."""

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        models: Sequence[str] | None = ("test-model",),
        token_delay: float = 0.0,
        max_logprobs: int | None = 20,
        ignore_n: bool = False,
        reject_continuous_usage: bool = False,
        reject_stream_options: bool = False,
        prefix_cache_block: int | None = None,
        llamacpp: bool = False,
        tokenize_paths: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.ssl_context = ssl_context  # serve HTTPS with it (url: https://)
        self.responder: Responder = responder or echo_responder
        self.models = tuple(models) if models is not None else None
        self.token_delay = token_delay
        self.max_logprobs = max_logprobs
        self.ignore_n = ignore_n
        self.reject_continuous_usage = reject_continuous_usage
        self.reject_stream_options = reject_stream_options
        self.prefix_cache_block = prefix_cache_block
        self.llamacpp = llamacpp
        if llamacpp:
            self.ignore_n = True
        if tokenize_paths is None:
            tokenize_paths = ("/extras/tokenize",) if llamacpp else ()
        self.tokenize_paths = tuple(tokenize_paths)
        # llama-cpp-python's double lock: a request takes the outer lock, then the inner
        # one, then lets the outer go; a stream that sees the outer lock taken (another
        # request waits) is cut
        self._outer = asyncio.Lock()
        self._inner = asyncio.Lock()
        #: streams this server cut because another request arrived (llamacpp mode)
        self.streams_cut = 0
        self.tokenize_calls = 0
        #: every HTTP request that arrived, any path or method, answered or not (an
        #: access log's count: ``received`` holds only the routed ones)
        self.http_requests = 0
        self._seen_prompts: list[list[str]] = []
        self.host = host
        self._port = port
        self._failures: list[_Failure] = []
        self._drops: list[int] = []
        self._garbles: list[int] = []
        self.step_gate: StepGate | None = None
        self._streams = 0
        self._stats = _Stats()
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.http_requests += 1
            return await handler(request)

        app = web.Application(middlewares=[count])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)  # as vLLM: 200, empty body
        for path in self.tokenize_paths:
            app.router.add_post(path, self._tokenize)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        address = runner.addresses[0]
        self._port = int(address[1])

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> OpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client: ``http://127.0.0.1:PORT/v1`` (https with
        an ``ssl_context``)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self._port}/v1"

    # ------------------------------------------------------------------ faults
    def fail_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: float | str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``count`` generation requests with ``status`` (and a JSON error)."""
        value = None if retry_after is None else str(retry_after)
        self._failures.extend(_Failure(status, value, message) for _ in range(count))

    def drop_after(self, tokens: int, *, requests: int = 1) -> None:
        """Close the connection of the next ``requests`` streams after ``tokens`` tokens
        (``0``: right after the chat role chunks, before any token)."""
        self._drops.extend(tokens for _ in range(requests))

    def garble_next(self, at: int, *, requests: int = 1,
                    line: str = "data: {\"id\": \"cmpl-x\", \"choi") -> None:
        """The next ``requests`` streams send ``line`` (default: a truncated JSON event)
        before their event number ``at`` (0: before the first), then go on normally."""
        self._garbles.extend(at for _ in range(requests))
        self._garble_line = line

    # ------------------------------------------------------------------ metrics
    @property
    def generation_tokens_total(self) -> int:
        return self._stats.generation_tokens_total

    @property
    def prompt_tokens_total(self) -> int:
        return self._stats.prompt_tokens_total

    @property
    def requests_running(self) -> int:
        return self._stats.requests_running

    @property
    def requests_aborted(self) -> int:
        return self._stats.requests_aborted

    @property
    def requests_finished(self) -> int:
        return self._stats.requests_finished

    @property
    def received(self) -> list[ReceivedRequest]:
        return self._stats.received

    def generation_requests(self) -> list[ReceivedRequest]:
        """Received POSTs to the chat or completions endpoints, in order."""
        return [r for r in self._stats.received if r.method == "POST"
                and r.path.endswith("/completions")]

    async def wait_until(self, predicate: Callable[[], bool], within: float = 2.0) -> bool:
        """Wait until ``predicate()`` holds (checked whenever the counters change)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.05))
        return True

    def _touch(self) -> None:
        self._changed.set()

    def _cached_tokens(self, body: Mapping[str, Any]) -> int | None:
        """Prompt words served from the imitated prefix cache (None: caching not reported)."""
        if self.prefix_cache_block is None:
            return None
        words = prompt_text(body).split()
        shared = 0
        for seen in self._seen_prompts:
            common = 0
            for a, b in zip(seen, words, strict=False):
                if a != b:
                    break
                common += 1
            shared = max(shared, common)
        self._seen_prompts.append(words)
        block = self.prefix_cache_block
        return min(shared, max(len(words) - 1, 0)) // block * block

    # ------------------------------------------------------------------ handlers
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    @contextlib.asynccontextmanager
    async def _model_lock(self):
        """llamacpp mode: one request on the model at a time (llama-cpp-python's locks)."""
        if not self.llamacpp:
            yield
            return
        await self._outer.acquire()
        outer_held = True
        try:
            await self._inner.acquire()
            try:
                self._outer.release()
                outer_held = False
                yield
            finally:
                self._inner.release()
        finally:
            if outer_held:
                self._outer.release()

    def _someone_waits(self) -> bool:
        return self.llamacpp and self._outer.locked()

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._stats.received.append(ReceivedRequest("POST", request.path, body, time.time(),
                                                    {k.lower(): v for k, v
                                                     in request.headers.items()}))
        self.tokenize_calls += 1
        self._touch()
        async with self._model_lock():
            if request.path == "/tokenize":  # vLLM's shape
                text = prompt_text(body)
                ids = [_token_id(w) for w in _word_tokens(text)]
                return web.json_response({"count": len(ids), "max_model_len": 2048,
                                          "tokens": ids})
            if not isinstance(body.get("input"), str):
                return _error_response(422, "input: field required", "BadRequestError")
            ids = [BOS_ID] + [_token_id(w) for w in _word_tokens(body["input"])]
            return web.json_response({"tokens": ids})

    async def _models(self, request: web.Request) -> web.Response:
        self._stats.received.append(ReceivedRequest("GET", request.path, None, time.time()))
        names = self.models or ("test-model",)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "solverify-tests"}
            for name in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def _metrics(self, request: web.Request) -> web.Response:
        s = self._stats
        lines = [
            f"vllm:generation_tokens_total {s.generation_tokens_total}",
            f"vllm:prompt_tokens_total {s.prompt_tokens_total}",
            f"vllm:num_requests_running {s.requests_running}",
            f"vllm:request_aborted_total {s.requests_aborted}",
            f"vllm:request_success_total {s.requests_finished}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    def _reject(self, body: Mapping[str, Any], chat: bool) -> web.Response | None:
        """The error a real server would give for this body, or None."""
        if self._failures:
            failure = self._failures.pop(0)
            message = failure.message or f"injected failure with status {failure.status}"
            err_type = _ERROR_TYPES.get(failure.status, "InternalServerError")
            return _error_response(
                failure.status, message, err_type, retry_after=failure.retry_after
            )
        model = body.get("model")
        if self.models is not None and model not in self.models:
            return _error_response(404, f"The model `{model}` does not exist.", "NotFoundError")
        if chat and not isinstance(body.get("messages"), list):
            return _error_response(400, "messages: field required", "BadRequestError")
        if not chat and "prompt" not in body:
            return _error_response(400, "prompt: field required", "BadRequestError")
        options = None if self.llamacpp else body.get("stream_options")
        if options is not None:
            if self.reject_stream_options:
                return _error_response(
                    400, "stream_options: Extra inputs are not permitted", "BadRequestError"
                )
            if not body.get("stream"):
                return _error_response(
                    400, "stream_options can only be set if stream is true", "BadRequestError"
                )
            if self.reject_continuous_usage and "continuous_usage_stats" in options:
                return _error_response(
                    400,
                    "stream_options.continuous_usage_stats: Extra inputs are not permitted",
                    "BadRequestError",
                )
        k = self._requested_logprobs(body, chat)
        if k is not None:
            if self.max_logprobs is None:
                return _error_response(400, "logprobs are not supported", "BadRequestError")
            if k > self.max_logprobs:
                return _error_response(
                    400,
                    f"Requested sample logprobs of {k}, which is greater than max allowed: "
                    f"{self.max_logprobs}",
                    "BadRequestError",
                )
        return None

    @staticmethod
    def _requested_logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
        if chat:
            if not body.get("logprobs"):
                return None
            return int(body.get("top_logprobs") or 0)
        value = body.get("logprobs")
        return None if value is None else int(value)

    def _script(self, body: Mapping[str, Any], n: int) -> list[list[Tok]]:
        return self._script_and_hidden(body, n)[0]

    def _script_and_hidden(self, body: Mapping[str, Any], n: int
                           ) -> tuple[list[list[Tok]], list[int]]:
        """The tokens each choice sends, and (llamacpp mode) the tokens it generates
        without sending them: the one that completed a stop sequence (llama-cpp-python
        counts it in its usage; its end-of-sequence token it does not count)."""
        scripted = [list(choice) for choice in self.responder(body)]
        if not scripted:
            scripted = [[]]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        stops = body.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        out: list[list[Tok]] = []
        hidden: list[int] = []
        for i in range(n):
            tokens = [t if isinstance(t, Tok) else Tok(t) for t in scripted[i % len(scripted)]]
            kept: list[Tok] = []
            text = ""
            stopped = False
            for tok in tokens:
                if any(s in text + tok.text for s in stops):
                    stopped = True
                    break
                kept.append(tok)
                text += tok.text
            out.append(kept[: int(max_tokens)])
            hidden.append(1 if self.llamacpp and stopped and len(kept) < int(max_tokens)
                          else 0)
        return out, hidden

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error_response(400, "body is not valid JSON", "BadRequestError")
        headers = {k.lower(): v for k, v in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self._stats.received.append(ReceivedRequest("POST", request.path, body, time.time(),
                                                    headers, peer[:2] if peer else None))
        self._touch()
        rejection = self._reject(body, chat)
        if rejection is not None:
            self._stats.requests_failed += 1
            return rejection
        n = 1 if self.ignore_n else int(body.get("n") or 1)
        script, hidden = self._script_and_hidden(body, n)
        prompt_tokens = _count_prompt_tokens(body) + (1 if self.llamacpp else 0)  # <bos>
        cached = self._cached_tokens(body)
        self._stats.prompt_tokens_total += prompt_tokens
        async with self._model_lock():
            if body.get("stream"):
                return await self._stream(request, body, script, prompt_tokens, cached,
                                          chat=chat, hidden=hidden)
            return await self._full(body, script, prompt_tokens, cached, chat=chat,
                                    hidden=hidden)

    def _lp_k(self, body: Mapping[str, Any], chat: bool) -> int | None:
        return self._requested_logprobs(body, chat)

    async def _full(
        self,
        body: Mapping[str, Any],
        script: list[list[Tok]],
        prompt_tokens: int,
        cached: int | None,
        *,
        chat: bool,
        hidden: Sequence[int] = (),
    ) -> web.Response:
        self._stats.requests_running += 1
        try:
            for _ in range(max((len(c) for c in script), default=0)):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
            generated = sum(len(c) for c in script) + sum(hidden)
            self._stats.generation_tokens_total += generated
        finally:
            self._stats.requests_running -= 1
        k = self._lp_k(body, chat)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        choices = []
        for i, tokens in enumerate(script):
            text = "".join(t.text for t in tokens)
            finish = "length" if len(tokens) >= int(max_tokens) else "stop"
            if chat:
                choice: dict[str, Any] = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                    "logprobs": None
                    if k is None
                    else {"content": [_chat_logprob(t, k) for t in tokens]},
                }
            else:
                choice = {
                    "index": i,
                    "text": text,
                    "finish_reason": finish,
                    "logprobs": None if k is None else _completion_logprobs(tokens, k, 0),
                }
            choices.append(choice)
        self._stats.requests_finished += 1
        self._touch()
        return web.json_response(
            {
                "id": "cmpl-test",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": choices,
                "usage": _usage(prompt_tokens, generated, cached),
            }
        )

    async def _stream(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        script: list[list[Tok]],
        prompt_tokens: int,
        cached: int | None,
        *,
        chat: bool,
        hidden: Sequence[int] = (),
    ) -> web.StreamResponse:
        options = {} if self.llamacpp else (body.get("stream_options") or {})
        include_usage = bool(options.get("include_usage"))
        continuous = bool(options.get("continuous_usage_stats"))
        k = self._lp_k(body, chat)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        drop_at = self._drops.pop(0) if self._drops else None
        garble_at = self._garbles.pop(0) if self._garbles else None
        self._streams += 1
        stream_no = self._streams
        sent = [0]
        model = body.get("model")
        created = int(time.time())
        object_type = "chat.completion.chunk" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{len(self._stats.received)}"

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        self._stats.requests_running += 1
        self._touch()
        produced = [0] * len(script)

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None) -> bytes:
            payload: dict[str, Any] = {
                "id": rid,
                "object": object_type,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None or not chat:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n".encode()

        async def send(data: bytes) -> None:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise _ClientGone
            if garble_at is not None and sent[0] == garble_at:
                data = (self._garble_line + "\n\n").encode() + data
            sent[0] += 1
            try:
                await response.write(data)
            except (ConnectionError, RuntimeError) as exc:
                raise _ClientGone from exc
            if self._someone_waits() and data != b"data: [DONE]\n\n":
                raise _Interrupted

        def running_usage(i: int) -> dict[str, int] | None:
            return _usage(prompt_tokens, produced[i]) if continuous else None

        try:
            if chat:
                for i in range(len(script)):
                    role = {"role": "assistant", "content": ""}
                    choice = {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                    await send(chunk([choice], running_usage(i)))
            steps = max((len(c) for c in script), default=0)
            total = 0
            for step in range(max(steps, 1)):
                if drop_at is not None and total >= drop_at:
                    raise _Drop
                if self.step_gate is not None:
                    gate = self.step_gate(Step(stream_no, step, steps, len(script)))
                    if gate is not None:
                        await gate
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                transport = request.transport
                if transport is None or transport.is_closing():
                    raise _ClientGone
                for i, tokens in enumerate(script):
                    if step >= max(len(tokens), 1):
                        continue  # this choice has finished
                    tok = tokens[step] if tokens else None  # None: an empty answer
                    last = step >= len(tokens) - 1
                    if tok is not None:
                        produced[i] += 1
                        total += 1
                        self._stats.generation_tokens_total += 1
                        self._touch()
                    finish = None
                    if last:
                        finish = "length" if len(tokens) >= max_tokens else "stop"
                        extra = hidden[i] if i < len(hidden) else 0
                        produced[i] += extra
                        self._stats.generation_tokens_total += extra
                    text = tok.text if tok is not None else ""
                    if chat:
                        choice = {
                            "index": i,
                            "delta": {"content": text},
                            "logprobs": None
                            if k is None or tok is None
                            else {"content": [_chat_logprob(tok, k)]},
                            "finish_reason": finish,
                        }
                    else:
                        offset = sum(len(t.text) for t in tokens[:step])
                        choice = {
                            "index": i,
                            "text": text,
                            "logprobs": None
                            if k is None or tok is None
                            else _completion_logprobs([tok], k, offset),
                            "finish_reason": finish,
                        }
                    await send(chunk([choice], running_usage(i)))
                    if drop_at is not None and total >= drop_at:
                        raise _Drop
            if include_usage:
                await send(chunk([], _usage(prompt_tokens, sum(produced), cached)))
            await send(b"data: [DONE]\n\n")
            await response.write_eof()
            self._stats.requests_finished += 1
        except _Interrupted:
            # llama-cpp-python with --interrupt_requests: end the stream as if complete
            if any(produced[i] < len(tokens) for i, tokens in enumerate(script)):
                self.streams_cut += 1
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
        except _Drop:
            # Simulate a crashed server: cut the TCP connection in the middle of the body.
            if request.transport is not None:
                request.transport.close()
            self._stats.requests_failed += 1
        except _ClientGone:
            self._stats.requests_aborted += 1
        except asyncio.CancelledError:
            self._stats.requests_aborted += 1
            raise
        finally:
            self._stats.requests_running -= 1
            self._touch()
        return response


def _usage(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _alternatives(tok: Tok, k: int) -> list[tuple[str, float]]:
    """``k`` (token, logprob) alternatives, the sampled token first unless scripted."""
    top = list(tok.top) if tok.top else [(tok.text, tok.logprob)]
    j = 1
    while len(top) < k:
        top.append((f" alt{j}", min(lp for _, lp in top) - 1.0))
        j += 1
    return top[:k]


def _chat_logprob(tok: Tok, k: int) -> dict[str, Any]:
    return {
        "token": tok.text,
        "logprob": tok.logprob,
        "bytes": list(tok.text.encode()),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode())}
            for t, lp in _alternatives(tok, k)
        ],
    }


def _completion_logprobs(tokens: Sequence[Tok], k: int, offset: int) -> dict[str, Any]:
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(_alternatives(t, k)) if k > 0 else None for t in tokens],
        "text_offset": offsets,
    }


# ---------------------------------------------------------------------- standalone responder
def _hash(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _question(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
    return prompt_text(body)


def _words(text: str) -> list[str]:
    out: list[str] = []
    for i, word in enumerate(text.split(" ")):
        out.append(word if i == 0 else " " + word)
    return out


class MathResponder:
    """Deterministic answers with some spread, for smoke runs of the CLI.

    * A verification prompt (containing ``"Is the answer correct (Yes/No)?"``) gets
      ``" Yes"`` or ``" No"`` with both in its top logprobs; P(Yes) depends on a hash of the
      prompt, so different solutions get different scores.
    * Anything else is a problem: the answer is ``N = words in the question mod 7`` most of
      the time, else ``N+1`` or ``N+2``, chosen by a hash of (prompt, choice, request number).
    """

    def __init__(self) -> None:
        self._requests = 0

    def __call__(self, body: Mapping[str, Any]) -> list[list[Scripted]]:
        self._requests += 1
        text = prompt_text(body)
        n = int(body.get("n") or 1)
        if VERIFY_MARKER in text:
            return [self._verdict(text, i) for i in range(n)]
        question = _question(body)
        base = len(question.split()) % 7
        choices: list[list[Scripted]] = []
        for i in range(n):
            roll = _hash(question, i, self._requests) % 10
            answer = base if roll < 6 else base + 1 if roll < 9 else base + 2
            reply = (
                f"Let's count carefully. There are {len(question.split())} words. "
                f"The final answer is \\boxed{{{answer}}}."
            )
            choices.append(list(_words(reply)))
        return choices

    def _verdict(self, text: str, choice: int) -> list[Scripted]:
        p_yes = 0.15 + 0.7 * ((_hash(text, choice) % 1000) / 999)
        yes, no = math.log(p_yes), math.log(1.0 - p_yes)
        top = ((" Yes", yes), (" No", no)) if yes >= no else ((" No", no), (" Yes", yes))
        word = top[0][0]
        return [Tok(word, top[0][1], top)]


async def serve_handler(handler: Callable[[web.Request], Any]) -> tuple[web.AppRunner, str]:
    """A plain HTTP server on 127.0.0.1 that answers every path and method with
    ``handler``: its runner (``await runner.cleanup()`` stops it) and its root URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def _serve(
    host: str, port: int, delay: float, models: Sequence[str] | None, block: int | None,
    llamacpp: bool = False,
) -> None:
    server = OpenAIServer(
        MathResponder(),
        models=models,
        token_delay=delay,
        prefix_cache_block=block,
        llamacpp=llamacpp,
        host=host,
        port=port,
    )
    async with server:
        print(f"serving OpenAI-compatible test server at {server.url}", flush=True)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="serve only this model name (repeatable); default: accept any name",
    )
    parser.add_argument(
        "--prefix-cache-block",
        type=int,
        default=None,
        metavar="B",
        help="report prompt_tokens_details.cached_tokens, imitating a prefix cache with "
        "blocks of B words (default: not reported)",
    )
    parser.add_argument("--llamacpp", action="store_true",
                        help="behave like llama-cpp-python's server on its defaults (n and "
                             "stream usage ignored, a running stream cut when another "
                             "request waits, /extras/tokenize)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _serve(args.host, args.port, args.delay, args.model, args.prefix_cache_block,
                   args.llamacpp)
        )


if __name__ == "__main__":
    main()
