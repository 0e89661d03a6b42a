"""Through a real router: vllm-router (PyPI, Rust binary) in front of two local test servers.

Everything must work unchanged against the router's URL (probing, n, usage, cancellation),
and the affinity header solverify sends (``X-Session-ID``: the problem id) must keep every
request of a problem on one replica under the router's ``consistent_hash`` policy.
"""

from __future__ import annotations

import pytest

from orchestrator.backends.base import Capabilities
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.runtime import run_batch, solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import StopAtFirst, WordTask
from tests.openai_server import OpenAIServer
from tests.routerkit import replicas_by_affinity, router_installed, vllm_router

TASK = WordTask()
pytestmark = pytest.mark.skipif(not router_installed(),
                                reason="vllm-router is not installed (pip install -e '.[dev]')")


def _answer(body):
    return [[" so", " x"]] * int(body.get("n", 1))


async def _run_through(policy_name: str, problems: list[Problem]):
    async with OpenAIServer(_answer) as s1, OpenAIServer(_answer) as s2:
        async with vllm_router(policy_name, [s1.url, s2.url]) as url:
            backend = OpenAIBackend(url, "test-model", max_attempts=1)
            try:
                caps = await backend.probe("completions")  # probing works through it
                before = s1.generation_tokens_total + s2.generation_tokens_total
                results = await run_batch(problems, SelfConsistency(4), backend=backend,
                                          task=TASK, max_n=1)
            finally:
                await backend.aclose()
            generated = s1.generation_tokens_total + s2.generation_tokens_total - before
            return caps, results, generated, replicas_by_affinity((s1, s2))


async def test_consistent_hash_keeps_each_problem_on_one_replica_and_the_ledger_exact():
    problems = [Problem(id=f"p{i}", problem=f"question {i}") for i in range(16)]
    caps, results, generated, where = await _run_through("consistent_hash", problems)
    # vllm-router 0.1.17 forwards include_usage but drops continuous_usage_stats: the
    # probe sees a final usage chunk only, and the counts per chunk come from the deltas
    assert caps.n and caps.stream_usage
    assert all(r.ok and r.answer == "x" and len(r.solutions) == 4 for r in results)
    assert set(where) == {p.id for p in problems}
    assert all(len(v) == 1 for v in where.values())  # affinity: one replica per problem
    assert {min(v) for v in where.values()} == {0, 1}  # and both replicas used
    assert sum(r.usage.completion_tokens for r in results) == generated


async def test_round_robin_spreads_a_problem_over_replicas():
    # one problem: its requests are the only ones, so consecutive ones alternate replicas.
    # With four problems in flight, which replicas a problem got hung on the order their
    # requests reached the router: on a busy machine two problems in lockstep could each
    # stay on one replica, and the test failed once with both cores saturated
    problems = [Problem(id="p0", problem="question 0")]
    _, results, generated, where = await _run_through("round_robin", problems)
    assert all(r.ok for r in results)
    assert len(where["p0"]) == 2  # what affinity prevents
    assert sum(r.usage.completion_tokens for r in results) == generated


async def test_a_stop_through_the_router_aborts_the_requests_on_the_replica():
    calls = []

    def slow_but_first(body):
        calls.append(1)
        words = [" so", " x"] if len(calls) == 1 else [" w"] * 2000
        return [words] * int(body.get("n", 1))

    async with OpenAIServer(slow_but_first, token_delay=0.005) as s1, \
            OpenAIServer(slow_but_first, token_delay=0.005) as s2:
        async with vllm_router("consistent_hash", [s1.url, s2.url]) as url:
            # no probe: the first request sent is the one that answers
            backend = OpenAIBackend(url, "test-model", max_attempts=1, cut_grace=0.0,
                                    capabilities=Capabilities())
            try:
                result = await solve(Problem(id="p", problem="q"), StopAtFirst(4),
                                     backend=backend, task=TASK, max_n=1)
            finally:
                await backend.aclose()
            assert result.answer == "x" and len(result.failed) == 3
            servers = (s1, s2)
            # the client's disconnect reached the replica through the router: all 3 aborted
            assert await s1.wait_until(
                lambda: sum(s.requests_aborted for s in servers) == 3
                and sum(s.requests_running for s in servers) == 0, within=60)


async def test_a_request_given_up_before_its_first_token_is_counted_as_abandoned():
    """A client that gives up before the first token (here: its first-token deadline)
    closes the connection. vllm-router 0.1.17 notices only when it has a chunk to forward,
    so the replica generates at least that first token, which no stream reports: the
    ledger cannot count it, so the result says how many requests were abandoned (the
    usage is a lower bound then) instead of claiming an exact count."""
    def words(body):
        return [[" w"] * 50] * int(body.get("n", 1))

    # the first token comes 2 s after the request; the client waits 0.4 s for it (the
    # margin keeps a slow event loop on a saturated machine from reordering the two)
    async with OpenAIServer(words, token_delay=2.0) as server:
        async with vllm_router("round_robin", [server.url]) as url:
            backend = OpenAIBackend(url, "test-model", max_attempts=2, timeout=0.4,
                                    idle_timeout=0.4, capabilities=Capabilities())
            try:
                result = await solve(Problem(id="p", problem="q"), SelfConsistency(1),
                                     backend=backend, task=TASK, max_n=1)
            finally:
                await backend.aclose()
            assert await server.wait_until(lambda: server.requests_running == 0, within=120)
    assert result.answer is None and result.failed
    assert result.http_requests >= 2  # every attempt of every replacement sample
    assert result.abandoned_http_requests == result.http_requests
    assert result.usage.completion_tokens == 0
    # what the abandoned requests cost upstream, and no stream reported
    assert server.generation_tokens_total >= result.abandoned_http_requests
    assert result.to_dict()["abandoned_http_requests"] == result.abandoned_http_requests

