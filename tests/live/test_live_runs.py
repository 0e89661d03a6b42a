"""Live: Self-Consistency and GenRM end to end against the bundled vLLM, through the
completions endpoint (few-shot capitals, where answers matter) and chat (mechanics only: the
base model rambles), with the ledger equal to the server's own count of generated tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.grading import TextGrader
from orchestrator.runtime import SolveResult, run_batch
from orchestrator.serve import VLLMServer
from orchestrator.tasks import Task
from orchestrator.types import Problem
from policies import GenRM, SelfConsistency
from tests.live.livekit import GEN, capitals, needs_capitals, note, settled_tokens

pytestmark = pytest.mark.live


async def run_measured(server: VLLMServer, problems, policy, backend: OpenAIBackend, task,
                       **kw) -> tuple[list[SolveResult], int, float]:
    """Run a batch; return results, the server's generated-token delta and wall time, after
    checking that the delta read when the run returns is still the delta 0.3 s later."""
    before = await settled_tokens(server)
    t0 = time.monotonic()
    results = await run_batch(problems, policy, backend=backend, task=task, **kw)
    wall = time.monotonic() - t0
    at_return = server.metrics()[GEN] - before
    await asyncio.sleep(0.3)
    assert await settled_tokens(server) - before == at_return
    return results, int(at_return), wall


def ledger(results: list[SolveResult]) -> int:
    return sum(r.usage.completion_tokens for r in results)


@needs_capitals
@pytest.mark.parametrize("max_n", [16, 1], ids=["one-request-n4", "four-requests-n1"])
async def test_self_consistency_on_capitals(
    vllm_server: VLLMServer, backend: OpenAIBackend, max_n: int
) -> None:
    problems = capitals(4)
    results, server_count, wall = await run_measured(
        vllm_server, problems, SelfConsistency(4), backend, Task.short_answer(), max_n=max_n
    )
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(len(r.solutions) == 4 and not r.failed for r in results)
    assert sum(r.requests for r in results) == (4 if max_n > 1 else 16)
    assert not any(r.usage.estimated for r in results)
    assert ledger(results) == server_count
    correct = sum(bool(r.correct) for r in results)
    assert correct >= 1, [(r.problem.answer, [s.text for s in r.solutions]) for r in results]
    cached = sum(r.usage.cached_prompt_tokens or 0 for r in results)
    prompt = sum(r.usage.prompt_tokens for r in results)
    note(f"SC n=4 x 4 capitals, max_n={max_n}: ledger {ledger(results)} == /metrics "
         f"{server_count} completion tokens; {sum(r.requests for r in results)} requests; "
         f"prompt {prompt} ({cached} cached); {correct}/4 correct; {wall:.1f}s")


@needs_capitals
async def test_genrm_on_capitals_reads_p_yes_from_logprobs(
    vllm_server: VLLMServer, backend: OpenAIBackend
) -> None:
    problems = capitals(7)[4:]
    results, server_count, wall = await run_measured(
        vllm_server, problems, GenRM(3, 2), backend, Task.short_answer()
    )
    assert all(r.ok for r in results), [r.error for r in results]
    verifications = [v for r in results for v in r.verifications]
    answered = sum(1 for r in results for s in r.solutions if s.has_answer)
    assert answered >= 1 and len(verifications) == 2 * answered
    # every verdict's P(Yes) comes from the server's top-20 logprobs, never from the text.
    # A verifier that samples the stop "\n" first (about 1 in 90 here, at temperature 1)
    # returns no token at all: no verdict ("none").
    scored = [v for v in verifications if v.source == "logprobs"]
    assert all(v.source in ("logprobs", "none") for v in verifications), verifications
    assert len(scored) >= 0.75 * len(verifications), verifications
    assert all(v.p_yes is not None and 0.0 <= v.p_yes <= 1.0 for v in scored)
    assert all(v.p_yes is None for v in verifications if v.source == "none")
    assert ledger(results) == server_count
    cached = sum(r.usage.cached_prompt_tokens or 0 for r in results)
    assert cached > 0  # verifications share the few-shot verifier prompt and the problem
    p_yes = [round(v.p_yes or 0.0, 3) for v in scored]
    note(f"GenRM s=3,v=2 x 3 capitals: ledger {ledger(results)} == /metrics {server_count}; "
         f"{len(scored)}/{len(verifications)} verifications scored from logprobs, P(Yes) "
         f"{min(p_yes)}..{max(p_yes)}; prompt {sum(r.usage.prompt_tokens for r in results)} "
         f"({cached} cached); {wall:.1f}s")


async def test_chat_mechanics_sc_and_genrm(vllm_server: VLLMServer, backend: OpenAIBackend) -> None:
    # any first line counts as an answer, so that chat verifications happen at all
    task = dataclasses.replace(
        Task.math(endpoint="chat", max_tokens=16, verify_max_tokens=12, temperature=1.0),
        grader=TextGrader(),
    )
    problems = [Problem(id="add", problem="What is 7 + 5?", answer="12"),
                Problem(id="mul", problem="What is 6 * 4?", answer="24")]
    sc, sc_count, _ = await run_measured(vllm_server, problems, SelfConsistency(3), backend,
                                         task)
    genrm, genrm_count, _ = await run_measured(vllm_server, problems, GenRM(2, 2), backend,
                                               task)
    for results in (sc, genrm):
        assert all(r.ok for r in results), [r.error for r in results]
        assert all(s.finish_reason in ("stop", "length") for r in results for s in r.solutions)
        assert all(r.usage.prompt_tokens > 0 for r in results)
    assert all(len(r.solutions) == 3 for r in sc)
    answered = sum(1 for r in genrm for s in r.solutions if s.has_answer)
    assert len([v for r in genrm for v in r.verifications]) == 2 * answered
    assert ledger(sc) == sc_count and ledger(genrm) == genrm_count
    note(f"chat SC n=3 x 2: ledger {ledger(sc)} == /metrics {sc_count}; chat GenRM s=2,v=2 "
         f"x 2: ledger {ledger(genrm)} == /metrics {genrm_count}")
