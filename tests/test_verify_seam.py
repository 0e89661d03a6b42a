"""The seam verifying policies stand on: the policy always has the last word under a
budget, verifications are launched only when the budget holds them, verification settings
and a separate verifier backend, per-answer aggregates in the snapshot."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.decisions import Sample, Stop, Verify
from orchestrator.errors import ConfigError, PolicyError
from orchestrator.events import DecisionMade
from orchestrator.runtime import run_batch, solve
from orchestrator.snapshot import BudgetLeft
from orchestrator.tasks import Task
from orchestrator.testing import make_snapshot
from orchestrator.types import Budget, Problem
from policies import GenRM, SelfConsistency
from policies.adaptive import Adaptive
from policies.literature import AdaptiveConsistency, EarlyStoppingSC
from tests.helpers import WordTask

PROBLEM = Problem(id="p1", problem="q", answer="seven")


def word_backend(solution: str = "w w seven", verdict: str = "yes") -> FakeBackend:
    return FakeBackend(scripted(lambda req, i: FakeReply.text(
        verdict if req.kind == "verify" else solution)))


@dataclass(frozen=True)
class VerifyOrOwnAnswer:
    """Samples twice, then asks to verify; when told the budget blocks it, stops with an
    answer of its own that no majority would give."""

    spec: str = "verify-or-own"
    seen: list | None = None

    def decide(self, s):
        if s.blocked is not None:
            if self.seen is not None:
                self.seen.append(s.blocked)
            return [Stop("mine", f"told: {s.blocked.reason}", "mine", code="budget")]
        if s.in_flight.samples or s.in_flight.verification_total:
            return []
        if len(s.solutions) < 2:
            return [Sample(2 - len(s.solutions))]
        if not s.verifications:
            return [Verify(s.solutions[0])]
        return [Stop(s.solutions[0].answer, "verified", s.solutions[0].key)]


async def test_runtime_asks_the_policy_again_instead_of_stopping_for_it():
    seen: list = []
    task = WordTask(max_tokens=5, verify_max_tokens=8)
    # two 3-token samples fit (10 reserved of 12); then 6 left < the 8 a verification reserves
    result = await solve(PROBLEM, VerifyOrOwnAnswer(seen=seen), Budget(tokens=12),
                         word_backend(), task=task)
    assert result.answer == "mine" and result.stop_code == "budget"  # the policy's answer
    assert len(seen) == 1 and seen[0].kinds == ("verify",) and seen[0].cap == "tokens"
    assert "cannot hold verifications" in result.reason
    assert result.verifications == ()


async def test_asking_again_for_blocked_work_is_a_policy_error():
    @dataclass(frozen=True)
    class Stubborn:
        spec: str = "stubborn"

        def decide(self, s):
            if s.in_flight.samples or s.in_flight.verification_total:
                return []
            return [Verify(s.solutions[0])] if s.solutions else [Sample(1)]

    with pytest.raises(PolicyError, match="asked again for verify work"):
        await solve(PROBLEM, Stubborn(), Budget(tokens=7), word_backend(),
                    task=WordTask(max_tokens=5, verify_max_tokens=8))


async def test_returning_nothing_when_told_about_the_budget_is_a_policy_error():
    @dataclass(frozen=True)
    class Silent:
        spec: str = "silent"

        def decide(self, s):
            if s.in_flight.samples or s.budget_left.exhausted:
                return []
            return [Sample(1)]

    with pytest.raises(PolicyError, match="returned no work and no Stop after being told"):
        await solve(PROBLEM, Silent(), Budget(tokens=7), word_backend(),
                    task=WordTask(max_tokens=5))


@pytest.mark.parametrize("policy", [
    SelfConsistency(8), GenRM(4, 2), Adaptive(width=2, max=16, min_votes=8),
    AdaptiveConsistency(threshold=0.99), EarlyStoppingSC(window=8)])
async def test_builtin_policies_stop_themselves_on_the_budget(policy):
    events: list = []
    result = await solve(PROBLEM, policy, Budget(tokens=14),
                         word_backend(solution="w w seven", verdict="yes"),
                         task=WordTask(max_tokens=5, verify_max_tokens=4), max_n=1,
                         sinks=[events.append])
    assert result.stop_code == "budget" and result.answer == "seven"
    assert result.usage.completion_tokens <= 14
    assert "budget" in result.reason


async def test_genrm_never_asks_for_a_verification_the_budget_cannot_hold():
    events: list = []
    task = WordTask(max_tokens=5, verify_max_tokens=8)
    backend = word_backend()
    result = await solve(PROBLEM, GenRM(2, 1), Budget(tokens=12), backend, task=task,
                         sinks=[events.append])
    assert [r.kind for r in backend.requests] == ["solve"]
    asked = [d for e in events if isinstance(e, DecisionMade) for d in e.decisions]
    assert not any(isinstance(d, Verify) for d in asked)
    assert result.stop_code == "budget" and result.answer == "seven"


async def test_verifications_that_fit_use_the_room_and_the_policy_uses_their_scores():
    # 2 samples x 3 tokens leave 10 of 16: 8-token reservations let one verification run at
    # a time, three in all (1 token each); then GenRM stops itself and uses the scores
    task = WordTask(max_tokens=5, verify_max_tokens=8)
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(
        ("yes" if "|eight" in req.prompt else "no") if req.kind == "verify"
        else ("w w seven" if i == 0 else "w w eight"))))
    result = await solve(PROBLEM, GenRM(2, 2), Budget(tokens=16), backend, task=task, max_n=1)
    assert [r.kind for r in backend.requests].count("verify") == 3 == len(result.verifications)
    assert result.usage.completion_tokens <= 16
    assert result.stop_code == "budget" and result.answer == "eight"  # by score, not votes


async def test_budget_too_small_for_one_request_is_a_config_error_before_any_request():
    backend = word_backend()
    with pytest.raises(ConfigError, match="cannot hold one solution request"):
        await solve(PROBLEM, SelfConsistency(2), Budget(tokens=10), backend,
                    task=WordTask(max_tokens=64))
    with pytest.raises(ConfigError, match="cannot hold one verification request"):
        await solve(PROBLEM, GenRM(2, 1), Budget(tokens=10), backend,
                    task=WordTask(max_tokens=5, verify_max_tokens=16))
    with pytest.raises(ConfigError, match="run token budget"):
        await run_batch([PROBLEM], SelfConsistency(2), backend=backend,
                        task=WordTask(max_tokens=64), run_tokens=10)
    assert backend.requests == []
    # a policy that does not verify is not held to the verification reservation
    result = await solve(PROBLEM, SelfConsistency(1), Budget(tokens=10), backend,
                         task=WordTask(max_tokens=5, verify_max_tokens=16))
    assert result.answer == "seven"


async def test_a_separate_verifier_backend_serves_every_verification():
    solver = FakeBackend(scripted(lambda req, i: FakeReply.text("a b c seven")))
    judge = FakeBackend(scripted(lambda req, i: FakeReply.text("yes")))
    result = await solve(PROBLEM, GenRM(2, 2), backend=solver, verifier=judge, task=WordTask())
    assert {r.kind for r in solver.requests} == {"solve"}
    assert {r.kind for r in judge.requests} == {"verify"}
    assert len(result.verifications) == 4
    # lambda from the verifier's own counts: 1 token per verification, 4 per solution
    assert result.lam == pytest.approx(1 / 4)
    assert result.verification_tokens == judge.generated_tokens == 4


def test_budget_left_views_follow_the_launch_rule():
    left = BudgetLeft(tokens=9, requests=None, cost_units=None, sample_tokens=5,
                      verify_tokens=10)
    assert left.can_sample and not left.can_verify and not left.exhausted
    assert BudgetLeft(None, 1, None, verify_tokens=10).can_verify
    assert not BudgetLeft(None, 0, None).can_verify
    units = BudgetLeft(None, None, 1.2, verify_units=1.5)
    assert units.can_sample and not units.can_verify
    assert BudgetLeft(None, None, 1.5, verify_units=1.5).can_verify


def test_answers_aggregate_votes_readings_and_representatives():
    s = make_snapshot(["7", "8", "7", "7", None, "8"],
                      scores={0: [0.9, 0.8], 1: [0.2], 3: [None]},
                      verifying={2: 1}, failed_verifications={5: 1})
    seven, eight = s.answers()
    assert (seven.key, seven.votes, seven.first_index) == ("7", 3, 0)
    assert seven.scores == (0.9, 0.8) and seven.readings_of(0) == (0.9, 0.8)
    assert seven.verified == 3 and seven.verifying == 1  # solution 3's unparsed reading counts
    # solution 0 has 2 requested, 2 has 1 in flight, 3 has 1 (unparsed): 2 and 3 tie -> 2
    assert seven.representative.id == 2
    assert eight.votes == 2 and eight.failed_verifications == 1 and eight.scores == (0.2,)
    assert eight.representative.id == 1  # 1: one reading; 5: one broken -> tie, earliest
    assert seven.mean_score == pytest.approx(0.85)
    assert make_snapshot([None]).answers() == ()


def test_verification_settings_and_prompt_template():
    task = Task.math(verify_max_tokens=12, verify_temperature=0.0)
    task = Task(**{**{f: getattr(task, f) for f in task.__slots__},
                   "verify_template": "Q {problem}\nA {solution}\nIs the answer correct?"})
    sol = make_snapshot(["4"]).solutions[0]
    req = task.verify_request(Problem("x", "What is 2+2?"), sol, 1)
    assert req.max_tokens == 12 and req.temperature == 0.0
    assert req.messages[-1]["content"].startswith("Q What is 2+2?\nA ... \\boxed{4}")
    short = Task.short_answer()
    import dataclasses

    short = dataclasses.replace(short, verify_template="{problem} -> {solution}?")
    assert short.verify_request(Problem("x", "Capital of France?"), sol, 2).prompt == \
        "Capital of France? -> 4?"
    with pytest.raises(ConfigError, match="verify_template"):
        dataclasses.replace(short, verify_template="no placeholders")
    # a problem that itself holds a placeholder's text (LaTeX's \text{solution}) is shown
    # as it is, not with the solution pasted into it (found by review)
    odd = Problem("x", r"Let $S$ be \text{solution} of {problem}; find {solution}.")
    assert short.verify_request(odd, sol, 1).prompt == \
        r"Let $S$ be \text{solution} of {problem}; find {solution}. -> 4?"


# ---- the CLI --------------------------------------------------------------------------
def _problems(tmp_path):
    import json

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} plus {i}?",
                                     "answer": str(2 * i)}) + "\n" for i in range(2)))
    return p


def test_cli_budget_too_small_is_exit_2_before_any_request(tmp_path):
    from tests.conftest import run_solverify

    # an unreachable endpoint: the budget error must come first, without a request
    base = ["run", "--no-progress", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
            "--problems", str(_problems(tmp_path)), "--out", str(tmp_path / "o.jsonl")]
    r = run_solverify(*base, "--policy", "sc:n=2", "--budget-tokens", "10",
                      "--max-tokens", "64")
    assert r.returncode == 2 and "cannot hold one solution request" in r.stderr
    r = run_solverify(*base, "--policy", "genrm:s=4,v=2", "--budget-tokens", "400",
                      "--max-tokens", "64", "--verify-max-tokens", "500")
    assert r.returncode == 2 and "cannot hold one verification request" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_verifier_endpoint_is_probed_and_settings_apply(server_url, tmp_path):
    import json

    from tests.conftest import run_solverify

    prompt = tmp_path / "verify.txt"
    prompt.write_text("Problem: {problem}\nAnswer: {solution}\nIs the answer correct (Yes/No)?")
    base = ["run", "--no-progress", "--base-url", server_url, "--model", "test-model",
            "--problems", str(_problems(tmp_path)), "--policy", "genrm:s=2,v=1"]
    r = run_solverify(*base, "--out", str(tmp_path / "a.jsonl"),
                      "--verifier-model", "no-such-model")
    assert r.returncode == 2 and "no-such-model" in r.stderr
    out = tmp_path / "b.jsonl"
    r = run_solverify(*base, "--out", str(out), "--verifier-base-url", server_url,
                      "--verify-max-tokens", "3", "--verify-temperature", "0",
                      "--verify-prompt", str(prompt), "--budget-tokens", "100000")
    assert r.returncode == 0, r.stderr
    assert "verifier test-model at " + server_url in r.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(row["verifications"]) == 2 for row in rows)
    assert all(v["completion_tokens"] <= 3 for row in rows for v in row["verifications"])
