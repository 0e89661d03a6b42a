"""OpenAIBackend against a real local HTTP server speaking the OpenAI protocol."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator import retry
from orchestrator.backends.base import (
    Backend,
    Capabilities,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
)
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.errors import (
    BackendError,
    EndpointUnreachable,
    ModelNotFound,
    RequestRejected,
    RetriesExhausted,
    StreamBroken,
)
from tests.helpers import sse_chunk, sse_server
from tests.openai_server import MathResponder, OpenAIServer, Tok

ANSWER = " The final answer is \\boxed{42}."
MakeBackend = Callable[..., OpenAIBackend]


def chat(**kw: Any) -> GenerationRequest:
    kw.setdefault("max_tokens", 64)
    kw.setdefault("kind", "solve")
    return GenerationRequest(messages=({"role": "user", "content": "2*21?"},), **kw)


def completion(**kw: Any) -> GenerationRequest:
    kw.setdefault("max_tokens", 64)
    kw.setdefault("kind", "solve")
    return GenerationRequest(prompt="Q: 2*21?\nA:", **kw)


async def collect(backend: OpenAIBackend, request: GenerationRequest) -> list[StreamEvent]:
    async with backend.stream(request) as events:
        return [event async for event in events]


def deltas(events: list[StreamEvent]) -> list[TextDelta]:
    return [e for e in events if isinstance(e, TextDelta)]


def usages(events: list[StreamEvent]) -> list[UsageReport]:
    return [e for e in events if isinstance(e, UsageReport)]


def texts(events: list[StreamEvent]) -> dict[int, str]:
    out: dict[int, str] = {}
    for d in deltas(events):
        out[d.choice] = out.get(d.choice, "") + d.text
    return out


def per_choice_answers(body: Mapping[str, Any]) -> list[list[str | Tok]]:
    n = int(body.get("n") or 1)
    return [[" choice", f" {i}", " says", f" {i * 10}"] for i in range(n)]


def long_answer(body: Mapping[str, Any]) -> list[list[str | Tok]]:
    return [[f" t{i}" for i in range(500)]]


@pytest.fixture
async def make_backend(openai_server: OpenAIServer) -> AsyncIterator[MakeBackend]:
    made: list[OpenAIBackend] = []

    def make(**kw: Any) -> OpenAIBackend:
        kw.setdefault("capabilities", Capabilities())
        kw.setdefault("backoff_base", 0.001)
        kw.setdefault("backoff_cap", 0.01)
        base_url = kw.pop("base_url", openai_server.url)
        model = kw.pop("model", "test-model")
        backend = OpenAIBackend(base_url, model, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


# ---------------------------------------------------------------------- streaming basics
async def test_is_a_backend(make_backend: MakeBackend) -> None:
    assert isinstance(make_backend(), Backend)


async def test_chat_stream_text_usage_and_exact_tokens(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    events = await collect(make_backend(), chat(temperature=0.7, top_p=0.9, seed=3, stop=("##",)))

    assert texts(events) == {0: ANSWER}
    ds = deltas(events)
    assert ds[-1].finish_reason == "stop"
    assert all(not d.estimated for d in ds)  # n == 1 with continuous usage: exact
    assert sum(d.tokens for d in ds) == 7 == openai_server.generation_tokens_total
    final = usages(events)[-1]
    assert final == UsageReport(final.prompt_tokens, 7, final=True)
    assert events[-1] is final
    body = openai_server.generation_requests()[0].body
    assert body is not None
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (0.7, 0.9, 3, ["##"])
    assert "n" not in body and "logprobs" not in body


async def test_completions_stream(openai_server: OpenAIServer, make_backend: MakeBackend) -> None:
    events = await collect(make_backend(), completion(max_tokens=4))

    assert texts(events) == {0: " The final answer is"}
    assert deltas(events)[-1].finish_reason == "length"
    assert sum(d.tokens for d in deltas(events)) == 4 == openai_server.generation_tokens_total
    assert usages(events)[-1].completion_tokens == 4 and usages(events)[-1].final
    assert openai_server.generation_requests()[0].path == "/v1/completions"


async def test_continuous_usage_reports_are_running_counts(make_backend: MakeBackend) -> None:
    events = await collect(make_backend(), chat())

    reports = usages(events)
    running = [r.completion_tokens for r in reports if not r.final]
    assert running == sorted(running) and running[-1] == 7
    assert [r.final for r in reports].count(True) == 1 and reports[-1].final
    # usage rides on content chunks: a running report follows each token's delta
    assert len(running) >= 7


async def test_n3_chat(openai_server: OpenAIServer, make_backend: MakeBackend) -> None:
    openai_server.responder = per_choice_answers
    events = await collect(make_backend(), chat(n=3))

    assert texts(events) == {i: f" choice {i} says {i * 10}" for i in range(3)}
    ds = deltas(events)
    assert {d.choice for d in ds if d.finish_reason == "stop"} == {0, 1, 2}
    # n > 1 without logprobs: vLLM-style per-choice running usage makes counts exact
    assert not any(d.estimated for d in ds)
    assert sum(d.tokens for d in ds) == 12 == openai_server.generation_tokens_total
    reports = usages(events)
    assert reports[-1] == UsageReport(reports[-1].prompt_tokens, 12, final=True)
    # vLLM's per-choice running counts are summed into a request-level running count
    assert max(r.completion_tokens for r in reports if not r.final) == 12
    assert openai_server.generation_requests()[0].body["n"] == 3  # type: ignore[index]


async def test_chat_logprobs(openai_server: OpenAIServer, make_backend: MakeBackend) -> None:
    top = ((" Yes", -0.1), (" No", -2.4), (" Maybe", -5.0))
    openai_server.responder = lambda body: [[Tok(" Yes", -0.1, top)]]
    events = await collect(make_backend(), chat(kind="verify", top_logprobs=2))

    (delta,) = deltas(events)
    assert delta.tokens == 1 and not delta.estimated
    assert delta.logprobs[0].token == " Yes"
    assert delta.logprobs[0].logprob == pytest.approx(-0.1)
    assert delta.logprobs[0].top == ((" Yes", -0.1), (" No", -2.4))
    body = openai_server.generation_requests()[0].body
    assert body is not None and body["logprobs"] is True and body["top_logprobs"] == 2


async def test_completions_logprobs_n2_are_exact(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.responder = per_choice_answers
    events = await collect(make_backend(), completion(n=2, top_logprobs=3))

    ds = deltas(events)
    assert all(not d.estimated and d.tokens == len(d.logprobs) == 1 for d in ds)
    first = ds[0].logprobs[0]
    assert first.token == " choice" and len(first.top) == 3
    assert [lp for _, lp in first.top] == sorted((lp for _, lp in first.top), reverse=True)
    assert sum(d.tokens for d in ds) == 8 == openai_server.generation_tokens_total
    body = openai_server.generation_requests()[0].body
    assert body is not None and body["logprobs"] == 3 and "top_logprobs" not in body


async def test_top_logprobs_clamped_to_capability(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    backend = make_backend(capabilities=Capabilities(max_top_logprobs=5))
    await collect(backend, chat(top_logprobs=50))
    assert openai_server.generation_requests()[0].body["top_logprobs"] == 5  # type: ignore[index]


# ---------------------------------------------------------------------- cancellation
async def test_leaving_the_stream_aborts_it_on_the_server(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.responder = long_answer
    openai_server.token_delay = 0.005
    backend = make_backend()
    received = 0
    async with backend.stream(chat(max_tokens=500)) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                received += event.tokens
            if received >= 3:
                break

    assert await openai_server.wait_until(lambda: openai_server.requests_aborted == 1)
    assert openai_server.requests_running == 0
    generated = openai_server.generation_tokens_total
    await asyncio.sleep(0.05)
    assert openai_server.generation_tokens_total == generated < 20


async def test_cancelling_the_consumer_aborts_and_propagates(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.responder = long_answer
    openai_server.token_delay = 0.005
    backend = make_backend()
    started = asyncio.Event()

    async def consume() -> None:
        async with backend.stream(chat(max_tokens=500)) as events:
            async for _ in events:
                started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await openai_server.wait_until(lambda: openai_server.requests_aborted == 1)
    generated = openai_server.generation_tokens_total
    await asyncio.sleep(0.05)
    assert openai_server.generation_tokens_total == generated < 50


# ---------------------------------------------------------------------- retries and errors
async def test_retries_429_honouring_retry_after(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.fail_next(1, 429, retry_after="0.3")
    start = time.monotonic()
    with capture_logs() as logs:
        events = await collect(make_backend(max_attempts=3), chat())

    assert time.monotonic() - start >= 0.3
    assert texts(events) == {0: ANSWER}
    assert len(openai_server.generation_requests()) == 2
    assert [e["event"] for e in logs].count("backend.retry") == 1


async def test_retries_503_then_succeeds(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.fail_next(2, 503)
    events = await collect(make_backend(max_attempts=3), completion())

    assert texts(events) == {0: ANSWER}
    assert len(openai_server.generation_requests()) == 3
    assert openai_server.generation_tokens_total == 7


async def test_persistent_503_exhausts_retries(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.fail_next(10, 503)
    with pytest.raises(RetriesExhausted, match=r"3 attempt\(s\).*503") as caught:
        await collect(make_backend(max_attempts=3), chat())

    assert caught.value.__cause__ is not None
    assert len(openai_server.generation_requests()) == 3


async def test_mid_stream_drop_is_stream_broken_and_not_retried(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.drop_after(3)
    seen: list[StreamEvent] = []
    with pytest.raises(StreamBroken):
        async with make_backend(max_attempts=5).stream(chat()) as events:
            async for event in events:
                seen.append(event)

    assert texts(seen) == {0: " The final answer"}
    assert len(openai_server.generation_requests()) == 1


async def test_drop_before_the_first_event_is_retried(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.drop_after(0)  # after the role chunk, which gives no event without usage
    backend = make_backend(capabilities=Capabilities(stream_usage=False, continuous_usage=False))
    events = await collect(backend, chat())

    assert texts(events) == {0: ANSWER}
    assert len(openai_server.generation_requests()) == 2


async def test_drop_before_the_first_token_is_retried_with_running_usage(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    """With running usage the role chunk carries a zero count, an event: a drop after it
    was a broken stream, not retried, though nothing was generated (found by review)."""
    openai_server.drop_after(0)
    events = await collect(make_backend(), chat())  # every capability: running usage on

    assert texts(events) == {0: ANSWER}
    assert len(openai_server.generation_requests()) == 2
    assert usages(events)[-1].final and usages(events)[-1].completion_tokens == 7


async def test_connection_refused_is_endpoint_unreachable(make_backend: MakeBackend) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = make_backend(base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2)
    with pytest.raises(EndpointUnreachable, match="2 attempt"):
        await collect(backend, chat())


async def test_unknown_model_is_model_not_found(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    with pytest.raises(ModelNotFound, match=r"'nope'.*serves: test-model"):
        await collect(make_backend(model="nope"), chat())
    assert len(openai_server.generation_requests()) == 1


async def test_400_is_rejected_without_retry(
    openai_server: OpenAIServer, make_backend: MakeBackend
) -> None:
    openai_server.fail_next(1, 400, message="prompt is too long")
    with pytest.raises(RequestRejected, match="prompt is too long") as caught:
        await collect(make_backend(), chat())
    assert caught.value.status_code == 400
    assert len(openai_server.generation_requests()) == 1


# ---------------------------------------------------------------------- fallbacks and probe
async def test_continuous_usage_rejected_falls_back(make_backend: MakeBackend) -> None:
    async with OpenAIServer(reject_continuous_usage=True) as server:
        backend = make_backend(base_url=server.url)
        with capture_logs() as logs:
            events = await collect(backend, chat())
            again = await collect(backend, chat())

        assert texts(events) == texts(again) == {0: ANSWER}
        assert usages(events) == [UsageReport(usages(events)[0].prompt_tokens, 7, final=True)]
        assert all(d.estimated for d in deltas(events))
        assert sum(d.tokens for d in deltas(events)) == 7
        assert backend.capabilities is not None
        assert not backend.capabilities.continuous_usage and backend.capabilities.stream_usage
        bodies = [r.body for r in server.generation_requests()]
        assert len(bodies) == 3  # rejected, re-issued, then remembered
        assert [b["stream_options"] for b in bodies[1:]] == [{"include_usage": True}] * 2  # type: ignore[index]
        assert [e["event"] for e in logs].count("backend.downgrade") == 1


async def test_top_logprobs_rejected_steps_down(make_backend: MakeBackend) -> None:
    async with OpenAIServer(max_logprobs=5) as server:
        backend = make_backend(base_url=server.url)
        events = await collect(backend, completion(top_logprobs=10))

        assert len(deltas(events)[0].logprobs[0].top) == 5
        assert [(r.body or {})["logprobs"] for r in server.generation_requests()] == [10, 5]
        assert backend.capabilities is not None and backend.capabilities.max_top_logprobs == 5


async def test_stream_options_rejected_falls_back(make_backend: MakeBackend) -> None:
    async with OpenAIServer(reject_stream_options=True) as server:
        backend = make_backend(base_url=server.url)
        events = await collect(backend, completion())

        assert texts(events) == {0: ANSWER} and usages(events) == []
        assert all(d.estimated for d in deltas(events))
        assert backend.capabilities == Capabilities(stream_usage=False, continuous_usage=False)
        assert "stream_options" not in (server.generation_requests()[-1].body or {})


async def test_probe_normal_server(openai_server: OpenAIServer) -> None:
    async with OpenAIBackend(openai_server.url, "test-model") as backend:
        with capture_logs() as logs:
            caps = await backend.probe()
            assert await backend.probe("completions") is caps  # cached
    assert caps == Capabilities(
        n=True, stream_usage=True, continuous_usage=True, logprobs=True, max_top_logprobs=20
    )
    assert [e["event"] for e in logs] == ["backend.capabilities"]
    bodies = [r.body or {} for r in openai_server.generation_requests()]
    assert all(b["max_tokens"] == 1 for b in bodies)


async def test_probe_limited_server() -> None:
    async with (
        OpenAIServer(ignore_n=True, reject_stream_options=True, max_logprobs=5) as server,
        OpenAIBackend(server.url, "test-model") as backend,
    ):
        caps = await backend.probe("completions")
    assert caps == Capabilities(
        n=False, stream_usage=False, continuous_usage=False, logprobs=True, max_top_logprobs=5
    )


async def test_probe_without_logprobs() -> None:
    async with (
        OpenAIServer(max_logprobs=None, reject_continuous_usage=True) as server,
        OpenAIBackend(server.url, "test-model") as backend,
    ):
        caps = await backend.probe()
    assert caps == Capabilities(continuous_usage=False, logprobs=False, max_top_logprobs=None)


async def test_lazy_probe_on_first_stream() -> None:
    async with (
        OpenAIServer(ignore_n=True) as server,
        OpenAIBackend(server.url, "test-model", backoff_base=0.001) as backend,
    ):
        assert backend.capabilities is None
        await asyncio.gather(collect(backend, chat()), collect(backend, chat()))
        assert backend.capabilities is not None and not backend.capabilities.n
        probes = [r for r in server.generation_requests() if (r.body or {}).get("max_tokens") == 1]
        assert len(probes) == 2  # one n/usage probe + one logprobs probe, run once


async def test_n_emulated_when_server_ignores_n(make_backend: MakeBackend) -> None:
    counter = iter(range(100))

    def numbered(body: Mapping[str, Any]) -> list[list[str | Tok]]:
        return [[" answer", f" {next(counter)}"]]

    async with OpenAIServer(numbered, ignore_n=True, token_delay=0.001) as server:
        backend = make_backend(base_url=server.url, capabilities=Capabilities(n=False))
        events = await collect(backend, chat(n=3, top_logprobs=1, seed=7))

        assert sorted(texts(events).values()) == [" answer 0", " answer 1", " answer 2"]
        assert set(texts(events)) == {0, 1, 2}
        assert [d.choice for d in deltas(events) if d.finish_reason] != []
        bodies = [r.body or {} for r in server.generation_requests()]
        assert len(bodies) == 3 and all("n" not in b for b in bodies)
        assert sorted(b["seed"] for b in bodies) == [7, 8, 9]  # seeded choices must differ
        final = usages(events)[-1]
        assert final.final and final.completion_tokens == 6 == server.generation_tokens_total
        assert sum(d.tokens for d in deltas(events)) == 6
        assert [u.final for u in usages(events)].count(True) == 1


async def test_reasoning_chunks_open_the_stream_and_are_counted(
        make_backend: MakeBackend) -> None:
    """A reasoning model streams ``reasoning_content`` with ``content`` null, and usage only
    at the end: each such chunk is a delta (one estimated token, its text apart from the
    answer), so the stream opens at the first of them. The server here holds the answer
    back until the reader has seen a reasoning delta; before, the open waited for the
    first content token, so long thinking ran into the request deadline, uncharged (found
    by review)."""
    gate = asyncio.Event()

    async def write(resp: Any) -> None:
        await resp.write(sse_chunk({"role": "assistant", "content": ""}))
        for i in range(5):
            await resp.write(sse_chunk({"content": None, "reasoning_content": f" think{i}"}))
        await resp.write(sse_chunk({"reasoning": " and so"}))  # OpenRouter's / Ollama's key
        await gate.wait()
        await resp.write(sse_chunk({"content": " 42"}, "stop"))
        await resp.write(sse_chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 7}))
        await resp.write(b"data: [DONE]\n\n")

    seen: list[StreamEvent] = []
    async with sse_server(write) as url:
        backend = make_backend(base_url=url, capabilities=Capabilities(
            n=False, continuous_usage=False, logprobs=False))
        async with backend.stream(chat()) as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, TextDelta) and event.reasoning:
                    gate.set()
    reasoning = [d for d in deltas(seen) if d.reasoning]
    assert "".join(d.reasoning for d in reasoning) == " think0 think1 think2 think3 think4 and so"
    assert all(d.text == "" and d.tokens == 1 and d.estimated for d in reasoning)
    assert texts(seen) == {0: " 42"}
    assert usages(seen)[-1] == UsageReport(5, 7, final=True)


async def test_a_tokenizer_count_never_goes_below_the_exact_logprob_count(
        make_backend: MakeBackend) -> None:
    """No usage in the stream (llama.cpp): the tokenizer re-counts the text at the end, but
    generated text may re-tokenize into fewer tokens than were generated; the logprob
    entries counted them exactly, and the final count is not below that (it was 1 for 4
    generated tokens here; found by review)."""
    def four_as_one(body: Mapping[str, Any]) -> list[list[str | Tok]]:
        return [[Tok("un"), Tok("be"), Tok("liev"), Tok("able")]]

    async with OpenAIServer(four_as_one, llamacpp=True) as server:
        backend = make_backend(base_url=server.url, capabilities=None)
        events = await collect(backend, completion(top_logprobs=1))
    assert sum(d.tokens for d in deltas(events)) == 4
    assert not any(d.estimated for d in deltas(events))
    assert usages(events)[-1].final and usages(events)[-1].completion_tokens >= 4


async def test_the_request_deadline_stops_while_the_rate_limit_holds_a_request(
        make_backend: MakeBackend) -> None:
    """The wait for ``rate_limit`` is this process's, not the endpoint's: it counted
    against the request deadline, so a burst queued behind the limiter failed as
    RetriesExhausted with nothing sent, and a MultiBackend failed a healthy replica over
    (found by review). While the limiter holds a request the deadline has no time set;
    afterwards it has the time that was left."""
    from orchestrator.backends import openai_compat

    seen: list[float | None] = []

    class Held:
        async def acquire(self) -> None:
            deadline = openai_compat._DEADLINE.get()
            assert deadline is not None
            seen.append(deadline.when())

    backend = make_backend(timeout=30)
    backend._throttler = Held()
    events = await collect(backend, chat())
    assert texts(events)
    assert seen == [None]


async def test_n_refused_mid_run_is_emulated(make_backend: MakeBackend) -> None:
    """Capabilities said n (given, not probed); the server refuses n=3 with a 400 naming
    it: the request is sent again as three single streams (not a fatal RequestRejected),
    and later requests go emulated at once."""
    counter = iter(range(100))

    def numbered(body: Mapping[str, Any]) -> list[list[str | Tok]]:
        return [[" answer", f" {next(counter)}"]]

    async with OpenAIServer(numbered) as server:
        backend = make_backend(base_url=server.url)
        assert backend.capabilities is not None and backend.capabilities.n
        server.fail_next(1, 400, message="'n' is not supported with this model")
        with capture_logs() as logs:
            events = await collect(backend, chat(n=3, seed=7))
            again = await collect(backend, chat(n=2))

        assert sorted(texts(events).values()) == [" answer 0", " answer 1", " answer 2"]
        assert set(texts(again)) == {0, 1}
        assert backend.capabilities is not None and not backend.capabilities.n
        bodies = [r.body or {} for r in server.generation_requests()]
        assert len(bodies) == 1 + 3 + 2
        assert bodies[0]["n"] == 3
        assert all("n" not in b for b in bodies[1:])
        assert sorted(b["seed"] for b in bodies[1:4]) == [7, 8, 9]
        assert sum(d.tokens for d in deltas(events + again)) == 10 == \
            server.generation_tokens_total
        assert [e["event"] for e in logs].count("backend.downgrade") == 1


async def test_a_400_naming_n_on_a_single_choice_stands(make_backend: MakeBackend) -> None:
    """n=1 asked for no n: a 400 that names it is not about n, and stands."""
    async with OpenAIServer() as server:
        backend = make_backend(base_url=server.url)
        server.fail_next(1, 400, message="'n' is not supported with this model")
        with pytest.raises(RequestRejected, match="'n' is not supported"):
            await collect(backend, chat())
        assert backend.capabilities is not None and backend.capabilities.n
        assert len(server.generation_requests()) == 1


async def test_n_emulation_a_dropped_choice_leaves_the_others_running(
    make_backend: MakeBackend,
) -> None:
    """One of three emulated choices is dropped by the server after 5 tokens: the other
    two finish and every generated token is in the stream; the drop is raised at the end."""
    forty = lambda body: [[f" w{i}" for i in range(40)]]  # noqa: E731
    async with OpenAIServer(forty, ignore_n=True, token_delay=0.002) as server:
        backend = make_backend(base_url=server.url, capabilities=Capabilities(n=False))
        server.drop_after(5)
        seen: list[StreamEvent] = []
        with pytest.raises(StreamBroken, match="broke"):
            async with backend.stream(chat(n=3, max_tokens=100)) as events:
                async for event in events:
                    seen.append(event)
        finished = sorted(d.choice for d in deltas(seen) if d.finish_reason)
        assert len(finished) == 2
        assert all(len(texts(seen)[c].split()) == 40 for c in finished)
        assert server.requests_aborted == 0
        assert sum(d.tokens for d in deltas(seen)) == 85 == server.generation_tokens_total


async def test_n_emulation_closes_every_stream_when_left(make_backend: MakeBackend) -> None:
    async with OpenAIServer(long_answer, ignore_n=True, token_delay=0.005) as server:
        backend = make_backend(base_url=server.url, capabilities=Capabilities(n=False))
        async with backend.stream(chat(n=3, max_tokens=500)) as events:
            async for event in events:
                if isinstance(event, TextDelta) and event.choice == 2:
                    break
        assert await server.wait_until(lambda: server.requests_aborted == 3)
        assert server.requests_running == 0
        generated = server.generation_tokens_total
        await asyncio.sleep(0.05)
        assert server.generation_tokens_total == generated


async def test_n_emulation_propagates_consumer_errors_unwrapped(make_backend: MakeBackend) -> None:
    async with OpenAIServer(long_answer, ignore_n=True, token_delay=0.005) as server:
        backend = make_backend(base_url=server.url, capabilities=Capabilities(n=False))
        with pytest.raises(KeyError):
            async with backend.stream(chat(n=2, max_tokens=500)) as events:
                async for _ in events:
                    raise KeyError("consumer bug")
        assert await server.wait_until(lambda: server.requests_running == 0)
        assert server.requests_aborted == len(server.generation_requests())


# ---------------------------------------------------------------------- misc API
async def test_list_models_and_idempotent_aclose(openai_server: OpenAIServer) -> None:
    backend = OpenAIBackend(openai_server.url, "test-model")
    assert await backend.list_models() == ["test-model"]
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(BackendError, match="closed"):
        await collect(backend, chat())


async def test_math_responder_for_smoke_runs(make_backend: MakeBackend) -> None:
    async with OpenAIServer(MathResponder(), models=None) as server:
        backend = make_backend(base_url=server.url, model="any-model")
        solved = await collect(backend, chat(n=4))
        assert all("\\boxed{" in t for t in texts(solved).values())
        verify = GenerationRequest(
            kind="verify",
            prompt="Solution: ... Is the answer correct (Yes/No)?",
            max_tokens=1,
            top_logprobs=2,
        )
        (delta,) = deltas(await collect(backend, verify))
        assert delta.text in (" Yes", " No")
        assert {t for t, _ in delta.logprobs[0].top} == {" Yes", " No"}


async def test_idle_connections_are_reused_until_keepalive_expiry(
        openai_server: OpenAIServer, make_backend: MakeBackend) -> None:
    """A finished stream's connection serves the next request while it is fresh, and is
    dropped once idle for ``keepalive_expiry`` (which must stay below the 5 s after which
    vLLM's uvicorn closes an idle connection: with equal timeouts, a request could go out
    on a connection the server is closing). Only the direction of time matters here: a
    slow machine only makes the idle gap longer."""
    from orchestrator import defaults
    from orchestrator.errors import ConfigError

    assert 0 < defaults.KEEPALIVE_EXPIRY_S < 5.0
    for expiry, idle, reused in ((60.0, 0.0, True), (0.05, 0.3, False)):
        backend = make_backend(keepalive_expiry=expiry)
        start = len(openai_server.generation_requests())
        await collect(backend, completion())
        await asyncio.sleep(idle)
        await collect(backend, completion())
        first, second = (r.peer for r in openai_server.generation_requests()[start:])
        assert first is not None and (first == second) is reused, (expiry, first, second)
    with pytest.raises(ConfigError, match="keepalive_expiry"):
        make_backend(keepalive_expiry=-1.0)


class _KeepsOpenAfterEOF(asyncio.Protocol):
    """A bare HTTP/1.1 server that answers every request with one whole SSE completion
    (one token, usage, ``[DONE]``) and keeps the connection open when the client
    half-closes it: what a client sees when its cut crosses the server's last chunk and
    the server's close has not arrived yet."""

    BODY = ('data: {"id":"c","object":"text_completion","model":"m","choices":[{"index":0,'
            '"text":" ok","logprobs":null,"finish_reason":"stop"}]}\n\n'
            'data: {"id":"c","object":"text_completion","model":"m","choices":[],'
            '"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
            'data: [DONE]\n\n')
    def __init__(self, peers: list[tuple[str, int]]) -> None:
        self.peers = peers  # the client's (host, port) of each request, in order

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.peers.append(self.transport.get_extra_info("peername")[:2])
            body = self.BODY.encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    def eof_received(self) -> bool:
        return True  # keep the connection (the server's close "has not arrived")


async def test_a_cut_connection_is_never_reused() -> None:
    """A stream cut (half-closed) just as the server finishes it ends cleanly, its whole
    body already sent, and the HTTP client would pool its connection as idle. That
    connection can no longer send: the next request must go out on a new one, not fail on
    it (a connection error, a retry, an abandoned request)."""
    peers: list[tuple[str, int]] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _KeepsOpenAfterEOF(peers), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_attempts=1,
                                 keepalive_expiry=60.0, capabilities=Capabilities()) as b:
            async with b.stream(completion()) as events:
                events.cut()  # after the first event, read by the backend before yielding
                first = [event async for event in events]
            assert texts(first) == {0: " ok"}
            for _ in range(2):
                assert texts(await collect(b, completion())) == {0: " ok"}
    finally:
        server.close()
    assert len(peers) == 3
    assert peers[0] != peers[1]
    assert peers[1] == peers[2]  # a connection that was not cut is reused


# ---------------------------------------------------------------------- retry decisions
def test_retry_decisions() -> None:
    assert retry.parse_retry_after("120") == 120.0
    assert retry.parse_retry_after("soon") is None and retry.parse_retry_after(None) is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry.parse_retry_after(date, now=now) == pytest.approx(30, abs=1)
    assert retry.parse_retry_after(email.utils.formatdate(now - 30, usegmt=True)) == 0.0
    assert retry.retry_after_from_headers({"Retry-After-Ms": "250", "Retry-After": "9"}) == 0.25
    assert retry.backoff_delay(1, base=0.5, cap=8, rng=lambda: 1.0) == 0.5
    assert retry.backoff_delay(10, base=0.5, cap=8, rng=lambda: 1.0) == 8
    assert retry.backoff_delay(3, base=0.5, cap=8, rng=lambda: 0.0) == 0.0
    for code in (408, 429, 500, 502, 503, 504):
        assert retry.is_retryable_status(code)
    for code in (400, 401, 403, 404, 422):
        assert not retry.is_retryable_status(code)
    assert retry.is_retryable(ConnectionRefusedError())
    assert not retry.is_retryable(asyncio.CancelledError())
    assert not retry.is_retryable(ValueError())
    with pytest.raises(ValueError):
        retry.build_retrying(0)


# ---------------------------------------------------------------------- prefix-cache reports
async def test_cached_prompt_tokens_come_from_the_final_usage_chunk() -> None:
    async with (
        OpenAIServer(prefix_cache_block=2) as server,
        OpenAIBackend(server.url, "test-model", capabilities=Capabilities()) as backend,
    ):
        prompt = "one two three four five six seven"
        first = usages(await collect(backend, GenerationRequest("solve", 8, prompt=prompt)))
        second = usages(
            await collect(backend, GenerationRequest("solve", 8, prompt=prompt + " eight"))
        )
        chat_events = await collect(backend, chat())
    assert first[-1].final and first[-1].cached_prompt_tokens == 0
    assert second[-1].final and second[-1].cached_prompt_tokens == 6  # 7 shared, whole blocks
    assert all(u.cached_prompt_tokens is None for u in second[:-1])  # running reports: not sent
    assert usages(chat_events)[-1].cached_prompt_tokens is not None


async def test_cached_prompt_tokens_absent_when_the_server_does_not_say(
    make_backend: MakeBackend,
) -> None:
    events = await collect(make_backend(), completion())
    assert usages(events)[-1].final and usages(events)[-1].cached_prompt_tokens is None


async def test_run_charges_cached_prompt_tokens_per_request() -> None:
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from policies import SelfConsistency
    from tests.helpers import WordTask

    async with (
        OpenAIServer(prefix_cache_block=1) as server,
        OpenAIBackend(server.url, "test-model", capabilities=Capabilities()) as backend,
    ):
        problem = Problem(id="p", problem="alpha beta gamma delta")
        result = await solve(problem, SelfConsistency(3), backend=backend, task=WordTask(),
                             max_n=1)
    # 3 separate requests of one 4-word prompt: the 2nd and 3rd find 3 words cached
    assert result.requests == 3
    assert result.usage.cached_prompt_tokens == 6
    assert result.to_dict()["cached_prompt_tokens"] == 6


# ---------------------------------------------------------------------- runtime cuts over HTTP
class _OneShortReply:
    """The first n=1 request after ``short_left`` is set answers in 3 tokens; every other
    choice streams 300."""

    def __init__(self) -> None:
        self.short_left = 0

    def __call__(self, body: Mapping[str, Any]) -> list[list[str | Tok]]:
        n = int(body.get("n") or 1)
        if n == 1 and self.short_left:
            self.short_left -= 1
            return [[" one", " two", " three"]]
        return [[f" w{i}" for i in range(300)]]


class _Watching:
    """Wraps a backend and records which (stream, choice) pairs the runtime has read a
    token of: the test server's gates use it to know what the client has seen."""

    def __init__(self, backend: OpenAIBackend) -> None:
        self.backend = backend
        self.cut_grace = 30.0  # no wall-clock window: the gates decide when data comes
        self.read: set[tuple[int, int]] = set()
        self.changed = asyncio.Event()
        self._streams = 0

    def stream(self, request: GenerationRequest):
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def opened():
            self._streams += 1
            number = self._streams
            async with self.backend.stream(request) as events:

                async def watched():
                    async for event in events:
                        if isinstance(event, TextDelta) and event.tokens:
                            self.read.add((number, event.choice))
                            self.changed.set()
                        yield event

                gen = watched()
                try:
                    yield gen
                finally:
                    await gen.aclose()

        return opened()

    async def aclose(self) -> None:
        await self.backend.aclose()


@pytest.mark.parametrize("max_n", [1, 3])
async def test_a_cut_run_is_charged_exactly_what_the_server_generated(max_n: int,
                                                                      monkeypatch) -> None:
    """Long streams are cut when a short one finishes. The step the server generates
    right after the ``Stop`` is in transit at the cut (counted by the server, not yet
    read); the settled cut reads it before closing, and the ledger equals the server's
    count. Explicit gates in the test server, not sleeps, decide which tokens exist when:
    the short stream's last token waits until the client has read every long choice's
    first token; the long streams' second step waits for the ``Stop``; their third never
    comes (until the client closes)."""
    from orchestrator.decisions import Stop
    from orchestrator.events import DecisionMade
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from tests.helpers import StopAtFirst, WordTask
    from tests.openai_server import Step

    reply = _OneShortReply()
    stopped = asyncio.Event()
    never = asyncio.Event()

    def on_event(event: object) -> None:
        if isinstance(event, DecisionMade) and any(isinstance(d, Stop) for d in event.decisions):
            stopped.set()

    async with (
        OpenAIServer(reply) as server,
        OpenAIBackend(server.url, "test-model", capabilities=Capabilities()) as http,
    ):
        backend = _Watching(http)

        async def gate(step: Step) -> None:
            if step.length == 3:  # the short stream: its last token once all are read
                while step.step == 2 and len(backend.read) < 4:
                    backend.changed.clear()
                    await backend.changed.wait()
            elif step.step == 1:
                await stopped.wait()  # generated after the Stop: in transit at the cut
            elif step.step >= 2:
                await never.wait()

        server.step_gate = gate
        for round_ in range(4):
            reply.short_left = 1
            stopped.clear()
            backend.read.clear()
            before = server.generation_tokens_total
            result = await solve(Problem(id=f"r{round_}", problem="q"), StopAtFirst(4),
                                 backend=backend, task=WordTask(max_tokens=300), max_n=max_n,
                                 sinks=[on_event])
            assert [s.text for s in result.solutions] == [" one two three"]
            assert sorted(f.completion_tokens for f in result.failed) == [2, 2, 2]
            assert await server.wait_until(lambda: server.requests_running == 0, within=30)
            assert server.generation_tokens_total - before == 3 + 3 * 2
            assert result.usage.completion_tokens == server.generation_tokens_total - before


async def test_one_retry_policy_serves_interleaved_requests(make_backend: MakeBackend) -> None:
    """The backend builds its retry policy once; calls that interleave (each failing and
    sleeping while the other runs) keep their own attempt counts and outcomes."""
    backend = make_backend(max_attempts=3, backoff_base=0.0, backoff_cap=0.0)
    turn = {"a": asyncio.Event(), "b": asyncio.Event()}
    attempts: dict[str, int] = {"a": 0, "b": 0}

    def flaky(me: str, other: str, succeed_on: int | None) -> Callable[[], Any]:
        async def once() -> str:
            attempts[me] += 1
            await turn[me].wait()  # take turns: a1, b1, a2, b2, a3, b3
            turn[me].clear()
            turn[other].set()
            if attempts[me] == succeed_on:
                return f"{me} after {attempts[me]}"
            raise ConnectionResetError(f"{me} attempt {attempts[me]} reset")

        return once

    turn["a"].set()
    with capture_logs() as logs:
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(backend._with_retries(flaky("a", "b", succeed_on=3)))
            b = tg.create_task(_failure(backend._with_retries(flaky("b", "a", None))))
    assert a.result() == "a after 3"
    error = b.result()
    assert isinstance(error, RetriesExhausted)
    assert "gave up after 3 attempt(s)" in str(error) and "b attempt 3 reset" in str(error)
    assert attempts == {"a": 3, "b": 3}
    retries = sorted((e["error"].split(": ")[1].split()[0], e["attempt"])
                     for e in logs if e["event"] == "backend.retry")
    assert retries == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


async def _failure(call: Any) -> BaseException:
    try:
        await call
    except Exception as exc:
        return exc
    raise AssertionError("expected a failure")


def test_a_certificate_that_failed_verification_is_not_retried() -> None:
    import ssl

    def chained(cause: BaseException) -> BaseException:
        outer = ConnectionError("Connection error.")
        outer.__cause__ = cause
        return outer

    refused = ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    assert retry.certificate_refused(chained(refused))
    assert not retry.is_retryable(chained(refused))
    assert not retry.is_retryable(refused)
    # other TLS trouble (a handshake cut short) and plain connection errors may pass
    assert retry.is_retryable(chained(ssl.SSLEOFError(8, "EOF occurred in violation")))
    assert retry.is_retryable(ConnectionResetError())
    assert not retry.certificate_refused(ConnectionResetError())


# ---------------------------------------------------------------------- odd byte streams
_NO_CAPS = Capabilities(n=False, continuous_usage=False, logprobs=False)


async def _collect_written(make_backend: MakeBackend, write: Callable[[Any], Any],
                           content_type: str = "text/event-stream", **kw: Any
                           ) -> list[StreamEvent]:
    """The events of one chat stream whose bytes ``write`` sends (:func:`sse_server`)."""
    async with sse_server(write, content_type) as url:
        backend = make_backend(base_url=url, capabilities=_NO_CAPS,
                               count_with_tokenizer=False, **kw)
        return await collect(backend, chat())


@pytest.mark.parametrize("filler", [b": ping\n\n", sse_chunk({})], ids=["comments", "empty-deltas"])
async def test_a_stream_that_keeps_sending_but_no_token_breaks_at_the_idle_timeout(
        make_backend: MakeBackend, filler: bytes) -> None:
    """After its first token a stream was bounded only by the transport's read timeout,
    which any byte resets: one that went on sending keep-alive comments (what proxies do
    while the upstream is stuck) or empty deltas was read forever (found by review). Now
    no token for more than ``idle_timeout`` is a broken stream, the token it sent kept."""
    async def write(resp: Any) -> None:
        await resp.write(sse_chunk({"role": "assistant", "content": " 4"}))
        while True:  # until the client goes away
            await resp.write(filler)
            await asyncio.sleep(0.02)

    seen: list[StreamEvent] = []
    async with sse_server(write) as url:
        backend = make_backend(base_url=url, capabilities=_NO_CAPS,
                               idle_timeout=0.3, count_with_tokenizer=False)
        with pytest.raises(StreamBroken, match=r"no token for over 0.3 s"):
            async with asyncio.timeout(60):  # a hang fails the test instead of the suite
                async with backend.stream(chat()) as events:
                    async for event in events:
                        seen.append(event)
    assert texts(seen) == {0: " 4"}


async def test_keep_alive_comments_between_tokens_do_not_break_a_stream(
        make_backend: MakeBackend) -> None:
    """The quiet time is between tokens, not the stream's length: a slow stream whose
    tokens come inside the idle timeout, comments between them, is read to its end."""
    async def write(resp: Any) -> None:
        for word in (" 4", " 2", " !"):
            await resp.write(sse_chunk({"content": word}))
            await resp.write(b": ping\n\n")
        await resp.write(sse_chunk({}, "stop"))
        await resp.write(b"data: [DONE]\n\n")

    events = await _collect_written(make_backend, write, idle_timeout=30)
    assert texts(events) == {0: " 4 2 !"}
    assert deltas(events)[-1].finish_reason == "stop"


@pytest.mark.parametrize("content_type", ["text/event-stream",
                                          "text/event-stream; charset=iso-8859-1"])
async def test_sse_is_read_as_utf8_and_a_leading_byte_order_mark_is_dropped(
        make_backend: MakeBackend, content_type: str) -> None:
    """SSE is UTF-8: a byte-order mark before the first event glued itself to its field
    name and that event was lost without an error, and a charset header of iso-8859-1
    garbled every non-ASCII character of the answer (found by review)."""
    async def write(resp: Any) -> None:
        await resp.write(b"\xef\xbb\xbf" + sse_chunk({"content": " 2\u03c0"}))
        await resp.write(sse_chunk({}, "stop", {"prompt_tokens": 3, "completion_tokens": 2}))
        await resp.write(b"data: [DONE]\n\n")

    events = await _collect_written(make_backend, write, content_type)
    assert texts(events) == {0: " 2\u03c0"}


async def test_an_event_type_without_data_does_not_carry_over_to_the_next_event(
        make_backend: MakeBackend) -> None:
    """``event: error`` ended by a blank line with no data is dispatched as nothing; the
    type was kept and made the next, ordinary chunk a server error, fatal for the problem
    (found by review). The SSE spec resets the type at every blank line."""
    async def write(resp: Any) -> None:
        await resp.write(sse_chunk({"content": " 4"}))
        await resp.write(b"event: error\n\n")
        await resp.write(sse_chunk({"content": "2"}, "stop"))
        await resp.write(b"data: [DONE]\n\n")

    events = await _collect_written(make_backend, write)
    assert texts(events) == {0: " 42"}
