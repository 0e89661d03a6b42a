"""Live: a second real OpenAI-compatible server nobody here wrote — llama.cpp's, as
llama-cpp-python's server, on its DEFAULT settings, serving the same Gemma-3-270M GGUF as
the bundled vLLM (provisioned by the project: ``solverify serve provision --server
llamacpp``; the first time compiles llama.cpp).

First what a user hits there (raw HTTP, no solverify in between): ``n`` ignored, no usage
in streams, a running stream cut (``[DONE]``, no finish reason) when another request
arrives, the tokenizer at ``/extras/tokenize``. Then that solverify copes: ``sc:n=8`` on
20 capitals scores, the cutting server is detected and served one stream at a time, every
logical request's HTTP requests are counted (and equal the server's own access log), and
token counts come from the server's tokenizer and match its own non-streaming usage for
the same (seeded) requests.

Run it alone: ``pytest -m live tests/live/test_live_llamacpp.py`` (one command; it
provisions and starts the server itself).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator.backends.base import GenerationRequest, TextDelta, UsageReport
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.runtime import run_batch
from orchestrator.serve.llamacpp import LlamaCppServer, provision_llamacpp
from orchestrator.tasks import Task
from policies import SelfConsistency
from tests.live.livekit import capitals, needs_capitals, note

pytestmark = pytest.mark.live

COUNTING = "1, 2, 3, 4, 5, 6, 7,"  # a prompt the base model continues for a long while


@pytest.fixture(scope="module")
def llamacpp(pytestconfig: pytest.Config) -> Iterator[LlamaCppServer]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[live llamacpp] {line}")

    t0 = time.monotonic()
    paths = provision_llamacpp(progress=say)
    provisioned = time.monotonic() - t0
    server = LlamaCppServer(paths, started_by="pytest -m live (llama.cpp)")
    say(f"starting llama.cpp's server on {server.base_url} (log: {server.log_path})")
    server.start()
    try:
        healthy = asyncio.run(server.wait_healthy_async())
        note(f"llama.cpp: provisioning check {provisioned:.1f}s, healthy after {healthy:.1f}s")
        yield server
    finally:
        asyncio.run(server.stop_async())


class Http:
    """Plain JSON and SSE calls at the server root (no solverify in between)."""

    def __init__(self, session: aiohttp.ClientSession, root: str) -> None:
        self.session, self.root = session, root

    async def post(self, path: str, body: dict) -> tuple[int, object]:
        async with self.session.post(self.root + path, json=body) as reply:
            text = await reply.text()
            try:
                return reply.status, json.loads(text)
            except ValueError:
                return reply.status, text


@pytest.fixture
async def http(llamacpp: LlamaCppServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield Http(session, llamacpp.root_url)


def posts(log: Path, since: int) -> dict[str, int]:
    """POSTs in the server's access log after byte ``since``, by path."""
    counts: dict[str, int] = {}
    with log.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode("utf-8", errors="replace")
    for path in re.findall(r'"POST (\S+) HTTP/1\.[01]"', text):
        counts[path] = counts.get(path, 0) + 1
    return counts


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                return
            yield json.loads(data)


async def test_what_users_hit_on_default_settings(llamacpp: LlamaCppServer,
                                                  http: Http) -> None:
    model = llamacpp.model_name
    url = llamacpp.base_url + "/completions"
    # n is ignored
    status, reply = await http.post("/v1/completions", {
        "model": model, "prompt": "The capital of France is", "max_tokens": 3, "n": 3})
    assert status == 200 and len(reply["choices"]) == 1  # type: ignore[index]
    # no usage in streams, asked for or not
    async with http.session.post(url, json={
            "model": model, "prompt": "The capital of France is", "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = [c async for c in sse(response)]
    assert chunks and not any(c.get("usage") for c in chunks)
    # a running stream is cut when another request arrives
    body = {"model": model, "prompt": COUNTING, "max_tokens": 200, "temperature": 0.0,
            "stream": True}
    async with http.session.post(url, json=body) as first:
        events = sse(first)
        head = [await anext(events)]  # the first stream is running
        second = asyncio.create_task(http.post("/v1/completions", {
            "model": model, "prompt": "The capital of France is", "max_tokens": 2}))
        rest = [c async for c in events]
    await second
    seen = head + rest
    finishes = [ch.get("finish_reason") for c in seen for ch in c["choices"]]
    assert not any(finishes), finishes  # ended by [DONE] with no finish reason
    assert len(seen) < 200
    note(f"llama.cpp defaults: n=3 gave 1 choice; no usage in {len(chunks)} stream chunks; a "
         f"stream of max_tokens=200 cut after {len(seen)} chunks when another request came")
    # the tokenizer: /extras/tokenize, <bos> first; no /tokenize
    status, tok = await http.post("/extras/tokenize", {"model": model, "input": "Hello world"})
    _, empty = await http.post("/extras/tokenize", {"model": model, "input": ""})
    assert status == 200 and len(tok["tokens"]) >= 2  # type: ignore[index]
    assert empty["tokens"] == tok["tokens"][:1]  # type: ignore[index]  # just <bos>
    assert (await http.post("/tokenize", {"content": "Hello"}))[0] == 404


@needs_capitals
async def test_capitals_sc8_on_default_settings(llamacpp: LlamaCppServer) -> None:
    """The issue's run: ``sc:n=8`` on 20 capitals, ``--concurrency 16`` (the CLI's default,
    which also caps the HTTP streams), against the server's defaults."""
    problems = capitals(20)
    since = llamacpp.log_path.stat().st_size
    t0 = time.monotonic()
    async with OpenAIBackend(llamacpp.base_url, llamacpp.model_name, max_streams=16) as backend:
        results = await run_batch(problems, SelfConsistency(8), backend=backend,
                                  task=Task.short_answer(), concurrency=16)
        stats = backend.stats()
        caps = backend.capabilities
    wall = time.monotonic() - t0
    await asyncio.sleep(0.5)  # the access log line of the last request
    server_posts = posts(llamacpp.log_path, since)
    assert caps is not None and not caps.n and not caps.stream_usage
    assert all(r.ok for r in results), [r.error for r in results]
    accuracy = sum(bool(r.correct) for r in results) / len(results)
    assert accuracy > 0.3, [(r.problem.answer, r.answer) for r in results]
    # the cutting server was detected and served one stream at a time from then on
    assert stats["one_stream_at_a_time"], stats
    assert stats["max_streams"] == 1
    # HTTP requests: the ledger's (generation) + the probe's = the server's own count
    http_requests = sum(r.http_requests for r in results)
    generation_posts = server_posts.get("/v1/completions", 0)
    assert http_requests + stats["probe_requests"] == generation_posts, (server_posts, stats)
    # tokenizer calls: the probe's one 404 on /tokenize, then /extras/tokenize
    assert stats["tokenize_calls"] == server_posts.get("/extras/tokenize", 0) + \
        server_posts.get("/tokenize", 0)
    logical = sum(r.requests for r in results)
    assert http_requests >= 8 * logical  # every choice of an emulated n is its own POST
    # tokens: counted with the server's tokenizer; prompt tokens never 0
    assert all(r.usage.prompt_tokens > 0 for r in results)
    samples = sum(len(r.solutions) + len(r.failed) for r in results)
    completion = sum(r.usage.completion_tokens for r in results)
    sources = sorted({s for r in results for s in r.usage.estimated_from})
    note(f"llama.cpp sc:n=8 on 20 capitals, defaults: accuracy {accuracy:.2f}, {wall:.0f} s, "
         f"{logical} logical requests, {http_requests} generation POSTs (+{stats['probe_requests']}"
         f" probe = server {generation_posts}), {stats['tokenize_calls']} tokenizer calls, "
         f"{stats['cut_streams']} streams cut by the server, {samples} samples, "
         f"{completion} completion tokens, prompt "
         f"{sum(r.usage.prompt_tokens for r in results)}, estimated from {sources}")


@needs_capitals
async def test_ledger_matches_the_servers_non_streaming_usage(llamacpp: LlamaCppServer,
                                                              http: Http) -> None:
    """The same seeded requests, streamed through solverify and sent plainly: the counts
    solverify charges equal the server's own usage (prompt and completion), one stream at a
    time (as the backend serves this server once it knows)."""
    task = Task.short_answer()
    problems = capitals(6)
    compared = exact = 0
    async with OpenAIBackend(llamacpp.base_url, llamacpp.model_name, max_streams=1) as backend:
        for i, problem in enumerate(problems):
            request = task.solve_request(problem, 1)
            request = GenerationRequest(kind="solve", prompt=request.prompt,
                                        max_tokens=request.max_tokens,
                                        temperature=request.temperature,
                                        stop=request.stop, seed=1000 + i)
            text, final = "", None
            async with backend.stream(request) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        text += event.text
                    elif isinstance(event, UsageReport) and event.final:
                        final = event
            _, plain = await http.post("/v1/completions", {
                "model": llamacpp.model_name, "prompt": request.prompt,
                "max_tokens": request.max_tokens, "temperature": request.temperature,
                "stop": list(request.stop), "seed": request.seed})
            assert isinstance(plain, dict), plain
            assert plain["choices"][0]["text"] == text  # the same generation
            assert final is not None
            usage = plain["usage"]
            assert final.prompt_tokens == usage["prompt_tokens"]
            compared += 1
            exact += final.completion_tokens == usage["completion_tokens"]
            assert abs(final.completion_tokens - usage["completion_tokens"]) <= 1
    note(f"llama.cpp ledger vs the server's non-streaming usage: prompt equal {compared}/"
         f"{compared}, completion equal {exact}/{compared} (the rest within one token)")
