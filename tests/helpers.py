"""A minimal task for runtime tests: answers are the last word; verdicts are Yes/No text.

Runtime tests use it so they exercise the scheduler, not the math grader. Also
:class:`Background`, an event loop in a thread for servers that a command's own
``asyncio.run`` talks to, and :func:`sse_chunk` / :func:`sse_server`, a server whose
every response is an event stream a test writes byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.backends.base import Backend, GenerationRequest
from orchestrator.decisions import Sample, Stop
from orchestrator.types import Problem, Solution, TokenLogprob


class WordGrader:
    def extract(self, text: str) -> str | None:
        words = text.split()
        return words[-1] if words and words[-1] != "?" else None

    def key(self, answer: str) -> str | None:
        return answer.strip().lower() or None

    def is_correct(self, answer: str | None, problem: Problem) -> bool | None:
        if problem.answer is None:
            return None
        return answer is not None and self.key(answer) == self.key(problem.answer)


@dataclass(frozen=True)
class WordTask:
    max_tokens: int = 64
    grader: WordGrader = field(default_factory=WordGrader)
    verify_max_tokens: int = 4

    def solve_request(self, problem: Problem, n: int) -> GenerationRequest:
        return GenerationRequest(kind="solve", prompt=problem.problem, n=n,
                                 max_tokens=self.max_tokens)

    def verify_request(self, problem: Problem, solution: Solution, n: int) -> GenerationRequest:
        return GenerationRequest(kind="verify", prompt=f"{problem.problem}|{solution.answer}",
                                 n=n, max_tokens=self.verify_max_tokens, top_logprobs=5)

    def parse_verdict(self, text: str, logprobs: tuple[TokenLogprob, ...]):
        word = text.strip().lower()
        if word == "yes":
            return True, 1.0, "text"
        if word == "no":
            return False, 0.0, "text"
        return None, None, "none"


@dataclass(frozen=True)
class StopAtFirst:
    """Asks for ``k`` samples at once and stops at the first solution that finishes."""

    k: int
    spec: str = "stop-at-first"

    def decide(self, s):
        if s.solutions:
            return [Stop(s.solutions[0].answer, "first", s.solutions[0].key)]
        return [] if s.samples_launched else [Sample(self.k)]


class Background:
    """An event loop in a thread, for servers that must outlive one ``asyncio.run``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ScriptedRequests(Backend):
    """A backend whose ``index``-th request (0, 1, ...) streams ``events(index)``, after
    ``opening(index)``; the generator is closed with the stream. ``generated``: the tokens
    handed over, as the server counts them (subclasses count them)."""

    cut_grace = 0.0

    def __init__(self) -> None:
        self.opened = 0
        self.generated = 0

    async def opening(self, index: int) -> None:
        """Before request ``index``'s stream is handed over (raise: it fails on opening)."""

    def events(self, index: int) -> AsyncIterator:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def stream(self, request: GenerationRequest):
        index = self.opened
        self.opened += 1
        await self.opening(index)
        gen = self.events(index)
        try:
            yield gen
        finally:
            await gen.aclose()

    async def aclose(self) -> None:
        pass


def sse_chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None,
              *, index: int = 0) -> bytes:
    """One chat-completion chunk as an SSE event: ``delta`` for choice ``index`` (None: no
    choices, a usage-only chunk), its ``finish`` reason, and ``usage`` when given."""
    body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "model": "m",
                            "choices": [] if delta is None else
                            [{"index": index, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


@contextlib.asynccontextmanager
async def sse_server(write: Callable[[Any], Any],
                     content_type: str = "text/event-stream") -> AsyncIterator[str]:
    """A server whose every response is a 200 of ``content_type`` whose body
    ``await write(response)`` writes; yields its ``/v1`` base URL."""
    from aiohttp import web

    from tests.openai_server import serve_handler

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": content_type})
        await resp.prepare(request)
        await write(resp)
        return resp

    runner, root = await serve_handler(handler)
    try:
        yield root + "/v1"
    finally:
        await runner.cleanup()
