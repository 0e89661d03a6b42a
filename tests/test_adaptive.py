"""The adaptive policy on hand-built snapshots, and its maths against brute force."""

from fractions import Fraction

import pytest

from orchestrator.decisions import Sample, Stop
from orchestrator.errors import ConfigError
from orchestrator.snapshot import BudgetLeft
from orchestrator.testing import make_snapshot
from policies.adaptive import Adaptive, overturn_probability


def polya_overturn(a, b, rest, remaining, prior):
    """Brute force: draw the remaining samples one by one from the Pólya urn (the
    Dirichlet-multinomial predictive), with exact fractions."""
    prior = Fraction(prior)
    states = {(0, 0): Fraction(1)}  # (extra leader votes, extra runner-up votes) -> prob
    for drawn in range(remaining):
        total = a + b + rest + 3 * prior + drawn
        nxt: dict = {}
        for (xa, xb), p in states.items():
            wa = (a + prior + xa) / total
            wb = (b + prior + xb) / total
            for key, w in (((xa + 1, xb), wa), ((xa, xb + 1), wb), ((xa, xb), 1 - wa - wb)):
                nxt[key] = nxt.get(key, 0) + p * w
        states = nxt
    return float(sum(p for (xa, xb), p in states.items() if xb - xa >= a - b))


@pytest.mark.parametrize(
    ("a", "b", "rest", "remaining", "prior"),
    [(3, 0, 0, 5, 1.0), (4, 2, 1, 6, 1.0), (2, 2, 0, 4, 0.5), (5, 1, 3, 8, 2.0), (1, 0, 0, 3, 1.0)],
)
def test_overturn_probability_matches_brute_force(a, b, rest, remaining, prior):
    assert overturn_probability(a, b, rest, remaining, prior) == pytest.approx(
        polya_overturn(a, b, rest, remaining, prior), abs=1e-12)


def test_overturn_edge_cases():
    assert overturn_probability(5, 1, 0, 3) == 0.0  # lead 4 > 3 remaining: impossible
    assert overturn_probability(3, 3, 0, 0) == 1.0  # tie with nothing left
    assert overturn_probability(4, 3, 0, 0) == 0.0
    # more samples to come → more chance to overturn
    assert overturn_probability(4, 1, 0, 10) < overturn_probability(4, 1, 0, 40)


def test_starts_with_width_samples():
    assert Adaptive(width=6, max=64).decide(make_snapshot()) == [Sample(6)]


def test_tops_up_as_samples_finish():
    snap = make_snapshot(["1", "2"], in_flight=5)
    assert Adaptive(width=8).decide(snap) == [Sample(3)]


def test_never_asks_beyond_max():
    snap = make_snapshot(["1", "2", "3"], in_flight=1)
    assert Adaptive(width=8, max=5).decide(snap) == [Sample(1)]


def test_stops_on_a_settled_lead_and_says_why():
    snap = make_snapshot(["7", "7", "7", "7"], in_flight=4)
    (stop,) = Adaptive(width=8, confidence=0.85, max=64).decide(snap)
    assert isinstance(stop, Stop) and stop.answer == "7"
    assert "P(overturn" in stop.reason


def test_waits_when_votes_are_split():
    snap = make_snapshot(["7", "3", "7", "3", "5"], in_flight=8)
    assert Adaptive(width=8, max=64).decide(snap) == []


def test_exact_stop_when_no_remaining_sample_can_change_the_winner():
    snap = make_snapshot(["7", "7", "7", "3"], in_flight=1)
    (stop,) = Adaptive(width=8, max=5, confidence=0.999999).decide(snap)
    assert "exceeds the 1 samples left" in stop.reason


def test_min_votes_blocks_a_single_vote_stop():
    snap = make_snapshot(["7"], in_flight=0)
    assert Adaptive(width=1, max=2, confidence=0.5, min_votes=2).decide(snap) == [Sample(1)]


def test_reaching_max_stops_with_majority():
    snap = make_snapshot(["1", "2", "1", "2"])
    (stop,) = Adaptive(width=4, max=4).decide(snap)
    assert stop.answer == "1" and "reached max=4" in stop.reason


def test_budget_exhausted_waits_then_stops():
    left = BudgetLeft(0, None, None)
    assert Adaptive().decide(make_snapshot(["1", "2"], in_flight=2, budget_left=left)) == []
    (stop,) = Adaptive().decide(make_snapshot(["1", "2", "2"], budget_left=left))
    assert stop.answer == "2" and "budget exhausted" in stop.reason


def test_higher_confidence_needs_more_votes():
    snap = make_snapshot(["7", "7", "7", "7", "7", "7", "3"], in_flight=8)  # P ~ 0.03
    (stop,) = Adaptive(confidence=0.9).decide(snap)
    assert stop.answer == "7"
    assert Adaptive(confidence=0.99).decide(snap) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"width": 0}, "width"), ({"confidence": 1.0}, "confidence"), ({"max": 0}, "max"),
     ({"prior": 0}, "prior"), ({"min_votes": 0}, "min_votes")],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=f"adaptive: {message}"):
        Adaptive(**kwargs)
