"""benchmarks.problem_gaps: the per-problem accuracy gaps that make up a pool's gap."""

from __future__ import annotations

import pytest

from benchmarks.problem_gaps import problem_gaps, vote_summary
from benchmarks.replay import ReplayConfig
from benchmarks.source import ReplaySource
from orchestrator.errors import ConfigError
from tests.test_replay import make_pool

# p0: a 2-2 tie at the whole pool, the right answer's traces the shortest (sc:n=all wins
# it by its tie rule in every order; one sample is right half the time); p1: unanimous
TIE = [("a", True, 10), ("b", False, 30), ("a", True, 12), ("b", False, 31)]
EASY = [("c", True, 10), ("c", True, 11), ("c", True, 12), ("c", True, 13)]


def _src() -> ReplaySource:
    return ReplaySource(make_pool([TIE, EASY]))


def test_vote_summary_counts_and_labels():
    src = _src()
    assert vote_summary(src, 0) == [(2, True), (2, False)]
    assert vote_summary(src, 1) == [(4, True)]


def test_gaps_list_the_tie_and_add_up_to_the_pool_gap():
    cfg = ReplayConfig(orders=20, workers=1, bootstrap=1)
    r = problem_gaps(_src(), ["sc:n=all", "sc:n=1"], cfg, min_gap=0.0)
    assert r["baseline"] == "sc:n=all"
    by_id = {row["problem"]: row for row in r["rows"]}
    assert by_id["p0"]["accuracy"]["sc:n=all"] == 1.0
    assert 0.0 < by_id["p0"]["accuracy"]["sc:n=1"] < 1.0
    assert by_id["p1"]["gap"]["sc:n=1"] == 0.0
    assert r["listed_gap"]["sc:n=1"] == pytest.approx(r["pool_gap"]["sc:n=1"])
    # with a threshold the unanimous problem drops out and the tie stays
    r2 = problem_gaps(_src(), ["sc:n=all", "sc:n=1"], cfg, min_gap=0.02)
    assert [row["problem"] for row in r2["rows"]] == ["p0"]


def test_needs_a_baseline_and_another_policy():
    with pytest.raises(ConfigError, match="baseline"):
        problem_gaps(_src(), ["sc:n=all"], ReplayConfig(orders=1), 0.0)
