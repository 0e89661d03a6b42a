"""Live: the ledger against vLLM's own count when streams are cut midway, what a cut
leaves running, capability probing, and prefix-cache reports."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from orchestrator.backends.base import Capabilities
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.runtime import solve
from orchestrator.serve import DEFAULT_BLOCK_SIZE, VLLMServer
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.live.livekit import (
    GEN,
    HANG_GUARD_S,
    RAMBLE,
    RUNNING,
    FirstFinished,
    RambleTask,
    StopWatch,
    note,
    seconds_until_idle,
    settled_tokens,
)

pytestmark = pytest.mark.live

MAX_TOKENS = 200


@pytest.mark.parametrize("max_n", [1, 4], ids=["four-requests-n1", "one-request-n4"])
async def test_cut_streams_are_charged_exactly_and_stop_at_once(
    vllm_server: VLLMServer, backend: OpenAIBackend, max_n: int
) -> None:
    """Four long samples (up to 200 tokens); the first to end its first sentence stops the
    problem and the others are cut midway. What must hold on any machine, however busy:
    the ledger equals the server's count at return and after, and the cut streams were
    aborted (each ended short of its max_tokens, and the server generated nothing that
    was not charged)."""
    rows = []
    for i in range(3):
        before = await settled_tokens(vllm_server)
        watch = StopWatch(vllm_server)
        result = await solve(Problem(id=f"ramble-{i}", problem=RAMBLE), FirstFinished(4),
                             backend=backend, task=RambleTask(max_tokens=MAX_TOKENS),
                             max_n=max_n, sinks=[watch])
        returned = time.monotonic()
        metrics = vllm_server.metrics()
        at_return, running_at_return = metrics[GEN] - before, metrics[RUNNING]
        idle = await seconds_until_idle(vllm_server, limit=HANG_GUARD_S)
        await asyncio.sleep(0.5)
        later = vllm_server.metrics()[GEN] - before
        (stopped_at, count_at_stop), = watch.cuts
        cut = [f.completion_tokens for f in result.failed]
        assert all(f.reason == "cancelled" for f in result.failed)
        assert result.usage.completion_tokens == at_return == later
        assert all(tokens < MAX_TOKENS for tokens in cut), cut  # aborted, not run out
        after_stop = before + later - count_at_stop
        assert after_stop >= 0
        rows.append((result.usage.completion_tokens, int(later), cut, int(after_stop),
                     int(running_at_return), idle, returned - stopped_at + idle))
    assert sum(len(r[2]) for r in rows) >= 3, rows  # streams really were cut midway
    for ledger, server, cut, after_stop, running, idle, idle_stop in rows:
        note(f"cut run max_n={max_n}: ledger {ledger} == /metrics {server}; cut streams at "
             f"{cut} tokens; {after_stop} token(s) generated after the Stop (one engine "
             f"step = {len(cut)}); running {running} at return -> 0 in {idle:.2f}s "
             f"({idle_stop:.2f}s after the Stop)")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
async def test_probe_reports_what_vllm_supports(vllm_server: VLLMServer, endpoint) -> None:
    async with OpenAIBackend(vllm_server.base_url, vllm_server.model_name) as backend:
        caps = await backend.probe(endpoint)
    assert caps == Capabilities(
        n=True, stream_usage=True, continuous_usage=True, logprobs=True, max_top_logprobs=20
    )
    note(f"probe ({endpoint}): {', '.join(caps.describe())}")


async def test_prefix_cache_hits_are_reported(
    vllm_server: VLLMServer, backend: OpenAIBackend
) -> None:
    def problem() -> Problem:  # a prompt no earlier request started with
        tag = uuid.uuid4().hex
        text = f"Log {tag}. " + " ".join(f"Entry {i} of the travel log of {tag}." for i in
                                         range(8)) + " Entry 8:"
        return Problem(id=tag, problem=text)

    task = RambleTask(max_tokens=4, stop=())
    cold = problem()
    first = await solve(cold, SelfConsistency(1), backend=backend, task=task)
    second = await solve(cold, SelfConsistency(1), backend=backend, task=task)
    assert first.usage.cached_prompt_tokens == 0
    cached = second.usage.cached_prompt_tokens
    assert cached is not None and 0 < cached < second.usage.prompt_tokens
    assert cached % DEFAULT_BLOCK_SIZE == 0  # whole KV blocks only
    # how the runtime's two shapes of Sample(4) fare on a cold prompt
    one_request = await solve(problem(), SelfConsistency(4), backend=backend, task=task)
    separate = await solve(problem(), SelfConsistency(4), backend=backend, task=task, max_n=1)
    note(f"prefix cache: {second.usage.prompt_tokens}-token prompt sent twice: cached "
         f"{first.usage.cached_prompt_tokens}, then {cached}; cold Sample(4) as one n=4 "
         f"request: {one_request.usage.cached_prompt_tokens} of "
         f"{one_request.usage.prompt_tokens} cached; as 4 n=1 requests: "
         f"{separate.usage.cached_prompt_tokens} of {separate.usage.prompt_tokens}")
