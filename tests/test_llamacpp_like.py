"""The local test server's llama.cpp-like mode (what llama-cpp-python's server does on its
defaults), and the tokenizer-endpoint client against it (gates, not sleeps)."""

from __future__ import annotations

import asyncio
import json
import ssl

import aiohttp
import pytest

from orchestrator.backends.tokenizer import (
    PROBE_ATTEMPTS,
    PROBE_SPACING_S,
    ServerTokenizer,
    root_url,
)
from tests.openai_server import OpenAIServer, Step


def words(text: str) -> list[str]:
    out = text.split(" ")
    return [out[0]] + [" " + w for w in out[1:]]


def answer(body):
    return [words("The final answer is seven")]


async def sse(response: aiohttp.ClientResponse) -> list[dict]:
    out = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def post_of(client: aiohttp.ClientSession, root: str):
    async def post(path: str, body: dict):
        async with client.post(root + path, json=body) as reply:
            reply.raise_for_status()
            return await reply.json()
    return post


def test_root_url():
    assert root_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert root_url("http://h:1/api/v1/") == "http://h:1/api"
    assert root_url("http://h:1") == "http://h:1"


async def test_llamacpp_mode_ignores_n_and_usage():
    async with OpenAIServer(answer, llamacpp=True) as server, aiohttp.ClientSession() as client:
        async with client.post(server.url + "/completions", json={
                "model": "test-model", "prompt": "q", "n": 3, "max_tokens": 8}) as reply:
            plain = await reply.json()
        assert len(plain["choices"]) == 1 and plain["usage"]["completion_tokens"] == 5
        async with client.post(server.url + "/completions", json={
                "model": "test-model", "prompt": "q", "n": 2, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            chunks = await sse(response)
        assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0}
        assert not any(c.get("usage") for c in chunks)


async def test_llamacpp_mode_cuts_the_running_stream_when_another_waits():
    first_at_step_2 = asyncio.Event()
    go = asyncio.Event()

    async def gate(step: Step) -> None:
        if step.stream == 1 and step.step == 2:
            first_at_step_2.set()
            await go.wait()

    server = OpenAIServer(answer, llamacpp=True)
    server.step_gate = gate
    async with server, aiohttp.ClientSession() as client:
        body = {"model": "test-model", "prompt": "q", "max_tokens": 8, "stream": True}

        async def read() -> list[dict]:
            async with client.post(server.url + "/completions", json=body) as response:
                return await sse(response)

        first = asyncio.create_task(read())
        await first_at_step_2.wait()
        second = asyncio.create_task(read())
        assert await server.wait_until(lambda: len(server.generation_requests()) == 2)
        go.set()
        cut, whole = await first, await second
        assert [c["choices"][0]["text"] for c in cut] == ["The", " final", " answer"]
        assert not any(c["choices"][0]["finish_reason"] for c in cut)
        assert whole[-1]["choices"][0]["finish_reason"] == "stop"
        assert server.streams_cut == 1


async def test_tokenizer_finds_llamacpp_python_shape_and_counts_without_bos():
    async with OpenAIServer(answer, llamacpp=True) as server, aiohttp.ClientSession() as client:
        tokenizer = ServerTokenizer(post_of(client, root_url(server.url)), "test-model")
        assert await tokenizer.probe() == "llamacpp-python"
        assert await tokenizer.count_text(" The final answer") == 3
        assert await tokenizer.count_prompt("a b c d", None) == (5, False)  # <bos> + 4
        count, estimated = await tokenizer.count_prompt(None, ({"role": "user",
                                                                "content": "a b"},))
        assert (count, estimated) == (3, True)  # the chat template's tokens not known
        calls = tokenizer.calls
        assert await tokenizer.count_prompt("a b c d", None) == (5, False)  # cached
        # every call the server answered, plus the probe's 404 on /tokenize
        assert tokenizer.calls == calls == server.tokenize_calls + 1


async def test_tokenizer_finds_vllm_shape_with_exact_chat_prompts():
    async with OpenAIServer(answer, tokenize_paths=("/tokenize",)) as server, \
            aiohttp.ClientSession() as client:
        tokenizer = ServerTokenizer(post_of(client, root_url(server.url)), "test-model")
        assert await tokenizer.probe() == "vllm"
        assert await tokenizer.count_text(" The final") == 2
        assert await tokenizer.count_prompt(None, ({"role": "user", "content": "a b"},)) == (
            2, False)


async def test_no_tokenizer_is_none():
    async with OpenAIServer(answer) as server, aiohttp.ClientSession() as client:
        tokenizer = ServerTokenizer(post_of(client, root_url(server.url)), "test-model")
        assert await tokenizer.probe() is None
        assert await tokenizer.probe() is None and tokenizer.calls == 2  # probed once


class _Status(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


def scripted_post(failures: list[BaseException | None]):
    """A tokenizer ``post`` that fails as ``failures`` says (one entry per call; None: the
    call reaches a vLLM-shaped /tokenize), then answers like vLLM."""
    calls: list[str] = []

    async def post(path: str, body: dict):
        calls.append(path)
        failure = failures.pop(0) if failures else None
        if failure is not None:
            raise failure
        if path != "/tokenize":
            raise _Status(404)
        return {"count": 1, "tokens": [1], "max_model_len": 8}
    return post, calls


class Clock:
    """A monotonic clock that moves only when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_probe_the_server_could_not_answer_is_asked_again():
    # no connection, then a 503 (the server busy): neither says the path is missing
    post, calls = scripted_post([ConnectionError("refused"), ConnectionError("refused"),
                                 _Status(503), _Status(503)])
    clock = Clock()
    tokenizer = ServerTokenizer(post, "m", clock=clock)
    assert await tokenizer.probe() is None
    clock.now += PROBE_SPACING_S
    assert await tokenizer.probe() is None
    clock.now += 2 * PROBE_SPACING_S
    assert await tokenizer.probe() == "vllm"  # answered at last, and kept
    assert await tokenizer.probe() == "vllm" and len(calls) == 5


async def test_a_probe_never_answered_gives_up_after_its_attempts():
    post, calls = scripted_post([ConnectionError("refused")] * 100)
    clock = Clock()
    tokenizer = ServerTokenizer(post, "m", clock=clock)
    for _ in range(PROBE_ATTEMPTS + 2):
        assert await tokenizer.probe() is None
        clock.now += 1000
    assert len(calls) == 2 * PROBE_ATTEMPTS  # both paths tried on each attempt, then no more


async def test_a_probe_refused_by_certificate_verification_is_not_asked_again():
    # the same call would fail the same way (as generation requests are not retried)
    def refused() -> ConnectionError:
        exc = ConnectionError("TLS handshake failed")
        exc.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
        return exc

    post, calls = scripted_post([refused(), refused()])
    clock = Clock()
    tokenizer = ServerTokenizer(post, "m", clock=clock)
    assert await tokenizer.probe() is None
    clock.now += 1000
    assert await tokenizer.probe() is None
    assert len(calls) == 2  # one probe of both paths, then taken as no tokenizer


async def test_counts_in_one_outage_use_one_probe_attempt():
    # many streams ending together while the server is down: one attempt, not all three
    # (found by review); once the spacing has passed and the server is back, it is found
    post, calls = scripted_post([ConnectionError("refused")] * 2)
    clock = Clock()
    tokenizer = ServerTokenizer(post, "m", clock=clock)
    for _ in range(6):
        assert await tokenizer.probe() is None
        clock.now += PROBE_SPACING_S / 10
    assert len(calls) == 2  # the first probe's two paths; the rest made no call
    clock.now += PROBE_SPACING_S
    assert await tokenizer.probe() == "vllm"


def hanging_post():
    """A tokenizer ``post`` whose first call never answers and whose later calls find no
    connection; ``calls`` lists the paths asked."""
    calls: list[str] = []

    async def post(path: str, body: dict):
        calls.append(path)
        if len(calls) == 1:
            await asyncio.Event().wait()  # never answers
        raise ConnectionError("refused")
    return post, calls


async def test_a_probe_cut_off_by_the_deadline_spaces_the_next():
    # a hung /tokenize: the backend's deadline cut the count off. No attempt was counted
    # and no spacing set, so every stream ending in the hang probed again and waited out
    # the deadline (found by review). Now the next probe waits as after an unanswered one.
    from orchestrator.backends.base import GenerationRequest

    post, calls = hanging_post()
    clock = Clock()
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout=0.01)
    backend._tokenizer = ServerTokenizer(post, "m", clock=clock)
    request = GenerationRequest(kind="solve", prompt="q", max_tokens=8)
    assert await backend._tokenizer_usage(request, {0: ["a"]}, {0: "stop"}, {}) is None
    assert await backend._tokenizer.probe() is None  # too soon: no call
    assert calls == ["/tokenize"]
    clock.now += PROBE_SPACING_S
    assert await backend._tokenizer.probe() is None and len(calls) == 3  # asked again
    await backend.aclose()


async def test_a_probe_the_caller_cancels_spaces_nothing():
    # the caller stopping (a Cancel) says nothing about the server: the next count asks
    post, calls = hanging_post()
    tokenizer = ServerTokenizer(post, "m", clock=Clock())
    probe = asyncio.ensure_future(tokenizer.probe())
    for _ in range(5):
        await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert await tokenizer.probe() is None and len(calls) == 3  # asked at once


async def test_a_missing_path_is_an_answer_kept_at_once():
    post, calls = scripted_post([_Status(404), _Status(405)])
    tokenizer = ServerTokenizer(post, "m")
    assert await tokenizer.probe() is None
    assert await tokenizer.probe() is None and len(calls) == 2  # 404 and 405: not there


# ---------------------------------------------------------------------- through solverify
from orchestrator.backends.openai_compat import OpenAIBackend  # noqa: E402
from orchestrator.runtime import run_batch  # noqa: E402
from orchestrator.types import Problem  # noqa: E402
from policies import SelfConsistency  # noqa: E402
from tests.helpers import WordTask  # noqa: E402


def seven(body):
    return [words("so seven")]


async def test_sc8_on_a_llamacpp_like_server_with_its_defaults():
    """``sc:n=8`` with 16 streams allowed, on a server that ignores ``n``, sends no usage
    and cuts the running stream when another arrives: the cut is seen, the endpoint goes
    down to one stream at a time, every problem is answered; every POST is counted; the
    tokens come from the server's tokenizer and equal the server's own counts."""
    server = OpenAIServer(seven, llamacpp=True)
    released = asyncio.Event()
    held: list[OpenAIBackend] = []

    async def gate(step: Step) -> None:
        # the first stream after the probe waits until another request queues behind it
        if not released.is_set() and held and held[0].capabilities is not None:
            released.set()
            assert await server.wait_until(lambda: server._outer.locked(), within=60.0)

    server.step_gate = gate
    problems = [Problem(id=f"p{i}", problem="q", answer="seven") for i in range(4)]
    async with server, OpenAIBackend(server.url, "test-model", max_streams=16) as backend:
        held.append(backend)
        results = await run_batch(problems, SelfConsistency(8), backend=backend,
                                  task=WordTask(), concurrency=16)
        stats = backend.stats()
        caps = backend.capabilities
    assert caps is not None and not caps.n and not caps.stream_usage
    assert all(r.correct for r in results), [(r.answer, r.error) for r in results]
    assert server.streams_cut >= 1 and stats["cut_streams"] == server.streams_cut
    assert stats["max_streams"] == 1 and stats["configured_max_streams"] == 16
    assert "ended without a finish reason" in stats["one_stream_at_a_time"]
    assert stats["peak_streams"] <= 16
    # every generation POST is on some problem's ledger, or the probe's
    posts = [r for r in server.generation_requests() if r.path.endswith("/completions")]
    assert sum(r.http_requests for r in results) + stats["probe_requests"] == len(posts)
    assert sum(r.requests for r in results) < sum(r.http_requests for r in results)
    # tokens: exactly what the server generated (the probe's apart), prompts with <bos>
    completion = sum(r.usage.completion_tokens for r in results)
    assert completion == server.generation_tokens_total - backend.probe_completion_tokens
    for r in results:
        streams = len(r.solutions) + len(r.failed)
        assert r.usage.prompt_tokens == 2 * streams  # "q" and <bos>, once per stream
        assert not r.usage.estimated
    assert stats["tokenizer"] == "llamacpp-python"
    assert stats["tokenize_calls"] == server.tokenize_calls + 1  # + the probe's 404


async def test_a_stop_sequence_token_is_charged_and_flagged():
    """llama-cpp-python counts the token that completed a stop sequence but does not send
    it: solverify charges it too (one per choice), and says the count is an estimate."""
    def stopping(body):
        return [["so", " seven", "\n", "Q:"]]

    task = WordTask()
    async with OpenAIServer(stopping, llamacpp=True) as server, \
            OpenAIBackend(server.url, "test-model", max_streams=1) as backend:
        from orchestrator.backends.base import GenerationRequest, UsageReport

        request = GenerationRequest(kind="solve", prompt="q", n=2, max_tokens=task.max_tokens,
                                    stop=("\n",))
        async with backend.stream(request) as events:
            got = [e async for e in events]
        final = [e for e in got if isinstance(e, UsageReport) and e.final]
    assert len(final) == 1
    assert final[0].completion_tokens == 6 == server.generation_tokens_total - \
        backend.probe_completion_tokens
    assert final[0].estimated_from == ("tokenize-stop",)


async def test_without_a_tokenizer_counts_stay_flagged_estimates():
    server = OpenAIServer(seven, llamacpp=True, tokenize_paths=())
    async with server, OpenAIBackend(server.url, "test-model", max_streams=1) as backend:
        results = await run_batch([Problem(id="p", problem="q", answer="seven")],
                                  SelfConsistency(2), backend=backend, task=WordTask())
        assert backend.stats()["tokenizer"] is None
    usage = results[0].usage
    assert usage.estimated and "prompt" in usage.estimated_from
    assert usage.completion_tokens == 4


async def test_the_rate_limit_stops_the_deadline_for_the_tokenizer_calls_too():
    """b2b86da stopped the request deadline while ``rate_limit`` holds a generation request
    back; the tokenizer calls that count a stream at its end ran under a deadline of their
    own that _throttle could not see, so time queued behind the limiter timed the count
    out (found by review). Each acquire now finds a deadline in force, stopped."""
    from orchestrator.backends import openai_compat
    from orchestrator.backends.base import Capabilities, GenerationRequest, UsageReport

    seen: list[object] = []

    class Recording:
        async def acquire(self) -> None:
            deadline = openai_compat._DEADLINE.get()
            seen.append(None if deadline is None else ("stopped", deadline.when()))

    server = OpenAIServer(lambda body: [words("un be liev able")], llamacpp=True)
    caps = Capabilities(n=False, stream_usage=False, continuous_usage=False, logprobs=False)
    async with server, OpenAIBackend(server.url, "test-model", timeout=30.0,
                                     capabilities=caps) as backend:
        backend._throttler = Recording()
        request = GenerationRequest(kind="solve", prompt="hello there", max_tokens=16)
        async with backend.stream(request) as events:
            got = [e async for e in events]
    final = [e for e in got if isinstance(e, UsageReport) and e.final]
    assert len(final) == 1 and final[0].completion_tokens >= 4
    assert len(seen) >= 3  # the generation request, then the tokenizer's probe and counts
    assert seen == [("stopped", None)] * len(seen)


async def test_run_rate_paces_every_http_request_of_every_backend(tmp_path, monkeypatch):
    """``--rate`` paced requests as the run launched them: a request for 3 samples on a
    server that ignores n went out as 3 streams at once, and retries were not paced
    (documented until Dec 7). Now one throttler is shared by every backend the run makes,
    and each HTTP request of the run passes it: the two replicas' generation streams, a
    retry of a 503, the probes, GET /models and the tokenizer's calls, on both servers."""
    from asyncio_throttle import Throttler

    from orchestrator import retry
    from orchestrator.cli import _run, build_parser

    made: list[Counting] = []

    class Counting(Throttler):
        def __init__(self, rate: float) -> None:
            super().__init__(rate_limit=10_000, period=1.0)
            self.rate, self.acquired = rate, 0
            made.append(self)

        async def acquire(self) -> None:
            self.acquired += 1
            await super().acquire()

    real = retry.make_throttler
    monkeypatch.setattr(retry, "make_throttler",
                        lambda rate: None if rate is None else Counting(rate))
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"{i} plus {i}?",
                                            "answer": str(2 * i)}) + "\n" for i in range(4)))
    async with OpenAIServer(answer, llamacpp=True) as one, \
            OpenAIServer(answer, llamacpp=True) as two:
        one.fail_next(1, 503)  # the first request to the first replica: retried
        args = build_parser().parse_args(
            ["run", "--base-url", one.url, "--base-url", two.url, "--model", "test-model",
             "--problems", str(problems), "--policy", "sc:n=3", "--out",
             str(tmp_path / "o.jsonl"), "--no-progress", "--rate", "7.5"])
        rc = await _run(args)
        sent = one.http_requests + two.http_requests
    assert rc == 0
    assert [t.rate for t in made] == [7.5]  # one throttler for the run
    generation = len(one.generation_requests()) + len(two.generation_requests())
    assert generation >= 4 * 3 and len(one.generation_requests()) > 0 < len(
        two.generation_requests())
    # every HTTP request, not only the streams: the 404s of the tokenizer's probe too
    assert made[0].acquired == sent > len(one.received) + len(two.received) > generation
    assert real(2.5) is not None  # the patch did not replace the real one for others


def test_the_backends_a_run_makes_share_its_throttler():
    from orchestrator.cli import build_parser
    from orchestrator.cliargs import endpoint_backend, verifier_backend
    from orchestrator.retry import make_throttler

    args = build_parser().parse_args(
        ["run", "--base-url", "http://127.0.0.1:9/v1", "--base-url", "http://127.0.0.1:8/v1",
         "--model", "m", "--problems", "p.jsonl", "--policy", "sc:n=2", "--out", "o.jsonl",
         "--verifier-base-url", "http://127.0.0.1:7/v1"])
    pace = make_throttler(4.0)
    solver = endpoint_backend(args, "EMPTY", pace)
    verifier = verifier_backend(args, "EMPTY", pace)
    assert [b._throttler for b in (*solver.backends, verifier)] == [pace] * 3
    assert endpoint_backend(args, "EMPTY").backends[0]._throttler is None
