"""The incremental pieces a snapshot is built from give exactly what the snapshot would
compute from scratch."""

from __future__ import annotations

import dataclasses
import random

import pytest

from orchestrator.snapshot import BudgetLeft, InFlight, ProblemSnapshot, VoteTally
from orchestrator.types import UNLIMITED, Problem, Solution, Usage


def _solution(i: int, key: str | None) -> Solution:
    return Solution(id=100 + i, index=i, text=f"t{i}", answer=None if key is None else
                    f" {key} ", key=key, finish_reason="stop", completion_tokens=i + 1,
                    started_at=0.0, finished_at=float(i), request_id=0)


def _snapshot(solutions: tuple[Solution, ...], tally=None) -> ProblemSnapshot:
    return ProblemSnapshot(
        problem=Problem("p", "q"), solutions=solutions, verifications=(), failed=(),
        in_flight=InFlight(), samples_launched=len(solutions), verifications_launched=0,
        requests_launched=1, usage=Usage(), budget=UNLIMITED,
        budget_left=BudgetLeft(None, None, None), elapsed=0.0, tally=tally)


@pytest.mark.parametrize("seed", range(40))
def test_vote_tally_ranks_exactly_like_votes_after_every_solution(seed):
    rng = random.Random(seed)
    answers = [None, *"abcdefg"[: rng.randint(1, 7)]]
    weights = [rng.random() for _ in answers]
    tally = VoteTally()
    sols: tuple[Solution, ...] = ()
    for i in range(rng.randint(1, 80)):
        s = _solution(i, rng.choices(answers, weights)[0])
        sols += (s,)
        tally.add(s)
        assert tally.ranked() == _snapshot(sols).votes()
        assert _snapshot(sols, tally.ranked()).votes() == _snapshot(sols).votes()


def test_vote_tally_ties_go_to_the_earliest_first_vote():
    tally = VoteTally()
    for i, k in enumerate("bab a  cc"):
        tally.add(_solution(i, None if k == " " else k))
    assert [(v.key, v.votes, v.first_index) for v in tally.ranked()] == [
        ("b", 2, 0), ("a", 2, 1), ("c", 2, 7)]


def test_the_lean_engine_builds_snapshots_and_solutions_in_field_order():
    # benchmarks.engine passes these fields positionally, in this order
    assert [f.name for f in dataclasses.fields(Solution)] == [
        "id", "index", "text", "answer", "key", "finish_reason", "completion_tokens",
        "started_at", "finished_at", "request_id", "mean_logprob"]
    assert [f.name for f in dataclasses.fields(ProblemSnapshot)] == [
        "problem", "solutions", "verifications", "failed", "in_flight", "samples_launched",
        "verifications_launched", "requests_launched", "usage", "budget", "budget_left",
        "elapsed", "lam", "history", "blocked", "tally"]
