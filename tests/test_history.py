"""Run history: finished problems are shown to the problems that decide after them."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.history import RunHistory
from orchestrator.runtime import run_batch, solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import WordTask

TASK = WordTask()


@dataclass
class Recording:
    """SC(3) that remembers how many finished problems each of its decisions saw."""

    seen: list[tuple[str, int]] = field(default_factory=list)
    inner: SelfConsistency = field(default_factory=lambda: SelfConsistency(3))

    def decide(self, s):
        self.seen.append((s.problem.id, len(s.history)))
        return self.inner.decide(s)


async def test_problems_run_one_at_a_time_see_every_earlier_one():
    answers = ["so seven", "so eight", "so seven"]
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(*answers[:req.n])))
    problems = [Problem(id=f"p{i}", problem="q", answer="seven") for i in range(3)]
    policy = Recording()
    results = await run_batch(problems, policy, backend=backend, task=TASK,
                              problems_in_flight=1)
    assert [r.answer for r in results] == ["seven"] * 3
    first_seen = {}
    for pid, n in policy.seen:
        first_seen.setdefault(pid, n)
    assert first_seen == {"p0": 0, "p1": 1, "p2": 2}


async def test_a_record_holds_votes_lengths_and_no_ground_truth():
    answers = ["so seven", "so eight", "so seven"]
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(*answers[:req.n])))
    history = RunHistory()
    await solve(Problem(id="p", problem="q", answer="seven"), SelfConsistency(3),
                backend=backend, task=TASK, history=history)
    (rec,) = history.records
    assert rec.problem_id == "p" and rec.stop_code == "max" and rec.answer_key == "seven"
    assert sorted(rec.keys) == ["eight", "seven", "seven"]
    assert rec.votes == {"seven": 2, "eight": 1}
    assert sum(rec.lengths) == rec.solution_tokens and rec.readings == ()
    assert not hasattr(rec, "correct") and not hasattr(rec, "answer")
