"""Live: ``solverify`` on capitals through the real runtime, against the bundled vLLM, whose
verifier (the model judging its own answers) is worse than chance.

With the measured profile it must never verify; with the online estimate it may read a few
solutions while it learns (at most the first solution of each answer that led), and either
way every answer must be its own votes' majority: a useless verifier never picks the
answer. The ledger never exceeds the server's own count of generated tokens, and falls short
of it by at most one token a cut choice (see the test).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.runtime import SolveResult, run_batch
from orchestrator.serve import VLLMServer
from orchestrator.tasks import Task
from policies.profile import VerifierProfile
from policies.verifying import Solverify
from tests.live.livekit import capitals, needs_capitals, note, settled_tokens

pytestmark = pytest.mark.live

PROFILE = (Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "profiles"
           / "capitals_v4_gemma3-270m.json")


def majority_answer(r: SolveResult) -> bool:
    votes = Counter(s.key for s in r.solutions if s.key is not None)
    return r.key is None if not votes else votes.get(r.key, 0) == max(votes.values())


@needs_capitals
@pytest.mark.parametrize("profiled", [True, False], ids=["measured-profile", "online"])
async def test_solverify_does_not_let_a_useless_verifier_choose(
    vllm_server: VLLMServer, backend: OpenAIBackend, profiled: bool
) -> None:
    assert not VerifierProfile.load(PROFILE).useful()  # AUC 0.46: worse than chance
    policy = Solverify(profile=str(PROFILE)) if profiled else Solverify()
    problems = capitals(40)
    before = await settled_tokens(vllm_server)
    finished: list[SolveResult] = []
    results = await run_batch(problems, policy, backend=backend, task=Task.short_answer(),
                              on_result=finished.append)
    await asyncio.sleep(0.3)
    generated = await settled_tokens(vllm_server) - before
    assert all(r.ok for r in results), [r.error for r in results]
    charged = sum(r.usage.completion_tokens for r in results)
    abandoned = sum(r.abandoned_http_requests for r in results)
    cut = sum(1 for r in results for f in r.failed if f.reason == "cancelled")
    # Never more than the server generated. Less by at most one token a cut choice, unless
    # a request was given up before its first token (the server may have generated tokens
    # for it that no stream reported: README "Scaling out"). Why not exact when ~100
    # streams are cut under load: vLLM closes the connection at the half-close and counts
    # every step its engine finishes until the abort reaches its output processor, but a
    # step still queued for the closed stream is never sent (README "Accounting against a
    # real server"; CI on Dec 3: ledger 1973 vs 1977, none abandoned). That the settled cut
    # reads the step in transit is test_live_accounting's cut runs' job: exact, in quiet
    # runs of 3 cut streams.
    assert charged <= generated, (charged, generated, abandoned, cut)
    assert abandoned > 0 or generated - charged <= cut, (charged, generated, cut)
    assert all(majority_answer(r) for r in results), [
        (r.key, [s.key for s in r.solutions]) for r in results if not majority_answer(r)]
    reads = [len(r.verifications) for r in finished]  # in the order problems finished
    if profiled:
        assert sum(reads) == 0
    else:
        # exploration reads at most the first solution of each answer that led
        for r in results:
            verified = [next(s for s in r.solutions if s.id == v.solution_id)
                        for v in r.verifications]
            assert len({s.key for s in verified}) == len(verified), r.problem.id
    correct = sum(bool(r.correct) for r in results)
    half = len(results) // 2
    note(f"solverify ({'measured profile' if profiled else 'online estimate'}) x 40 capitals: "
         f"{correct}/40 correct, {sum(len(r.solutions) for r in results)} samples, "
         f"{sum(reads)} verifications ({sum(reads[:half])} in the first 20 to finish, "
         f"{sum(reads[half:])} in the last 20); ledger {charged} vs /metrics {generated:.0f} "
         f"({cut} choices cut), {abandoned} HTTP requests abandoned before a first token")
