"""Adaptive-Consistency and ESC on hand-built snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from orchestrator.decisions import Sample, Stop
from orchestrator.errors import ConfigError
from orchestrator.snapshot import BudgetLeft
from orchestrator.testing import make_snapshot
from policies import parse_policy
from policies.literature import (
    AdaptiveConsistency,
    EarlyStoppingSC,
    beta_confidence,
    dirichlet_confidence,
)

# ---- the stopping criteria ------------------------------------------------------------------


def test_beta_confidence_is_the_regularised_incomplete_beta():
    assert beta_confidence(4, 0) == pytest.approx(1 - 0.5 ** 5)
    assert beta_confidence(5, 2) == pytest.approx(special.betainc(3, 6, 0.5))
    assert beta_confidence(3, 3) == pytest.approx(0.5)


def test_dirichlet_with_two_answers_equals_beta():
    for a, b in [(1, 0), (4, 0), (5, 2), (9, 7), (3, 3)]:
        assert dirichlet_confidence([a, b]) == pytest.approx(beta_confidence(a, b), abs=1e-9)
    # one answer seen: a zero-count second category is added
    assert dirichlet_confidence([4]) == pytest.approx(beta_confidence(4, 0), abs=1e-9)


def test_dirichlet_matches_monte_carlo_with_three_answers():
    counts = [6, 3, 2]
    rng = np.random.default_rng(0)
    draws = rng.dirichlet(np.array(counts) + 1.0, size=200_000)
    mc = float(np.mean(draws.argmax(axis=1) == 0))
    assert dirichlet_confidence(counts) == pytest.approx(mc, abs=0.005)
    # more competitors can only lower the leader's confidence
    assert dirichlet_confidence([6, 3, 2]) < dirichlet_confidence([6, 3])


def test_dirichlet_quadrature_matches_adaptive_integration():
    from scipy import integrate

    def reference(counts):
        lead, rest = counts[0] + 1.0, [c + 1.0 for c in counts[1:]]

        def f(x):
            return float(np.exp((lead - 1) * np.log(x) - x - special.gammaln(lead))
                         * np.prod([special.gammainc(a, x) for a in rest]))

        return integrate.quad(f, 0, np.inf, limit=500, epsabs=1e-13)[0]

    rng = np.random.default_rng(1)
    cases = [(1, 0), (80, 79), (60, 1, 1, 1), (2, 1, 1, 1, 1, 1, 1, 1, 1, 1)]
    cases += [tuple(sorted(rng.integers(0, 40, rng.integers(2, 12)).tolist(), reverse=True))
              for _ in range(30)]
    for counts in cases:
        assert dirichlet_confidence(counts) == pytest.approx(reference(counts), abs=1e-8)


def test_dirichlet_rejects_a_non_leading_first_count():
    with pytest.raises(ValueError, match="largest"):
        dirichlet_confidence([1, 3])


# ---- Adaptive-Consistency ---------------------------------------------------------------------


def test_ac_first_asks_for_the_optimistic_need():
    ac = AdaptiveConsistency(threshold=0.95)
    assert ac.optimistic_need([]) == 4  # 1 - 2^-5 >= 0.95 needs 4 agreeing votes
    assert list(ac.decide(make_snapshot())) == [Sample(4)]


def test_ac_waits_while_the_needed_samples_are_in_flight():
    ac = AdaptiveConsistency(threshold=0.95)
    assert list(ac.decide(make_snapshot(["7"], in_flight=3))) == []


def test_ac_tops_up_when_a_dissenting_vote_raises_the_need():
    ac = AdaptiveConsistency(threshold=0.95)
    snap = make_snapshot(["7", "8"], in_flight=2)
    need = ac.optimistic_need([1, 1])
    assert list(ac.decide(snap)) == [Sample(need - 2)]


def test_ac_stops_when_confident_and_says_why():
    ac = AdaptiveConsistency(threshold=0.95)
    (stop,) = ac.decide(make_snapshot(["7", "7", "7", "7"], in_flight=2))
    assert isinstance(stop, Stop) and stop.answer == "7"
    assert "confidence 0.969" in stop.reason


def test_ac_does_not_stop_on_a_contested_vote():
    ac = AdaptiveConsistency(threshold=0.95)
    decisions = ac.decide(make_snapshot(["7", "7", "7", "8", "8"]))
    assert decisions and isinstance(decisions[0], Sample)


def test_ac_unanswered_samples_never_vote():
    ac = AdaptiveConsistency(threshold=0.95)
    decisions = ac.decide(make_snapshot([None, None, None, None]))
    assert decisions == [Sample(4)]


def test_ac_max_caps_samples_then_majority():
    ac = AdaptiveConsistency(threshold=0.95, max=5)
    snap = make_snapshot(["7", "8", "7"], in_flight=2)
    assert list(ac.decide(snap)) == []  # at the cap: wait for what is in flight
    (stop,) = ac.decide(make_snapshot(["7", "8", "7", "9", "8"]))
    assert isinstance(stop, Stop) and stop.answer == "7"  # tie 2-2: earliest first vote
    assert "max 5 samples" in stop.reason


def test_ac_never_launches_past_max():
    ac = AdaptiveConsistency(threshold=0.99, max=3)
    assert list(ac.decide(make_snapshot())) == [Sample(3)]


def test_ac_stops_after_too_many_failures_or_on_budget():
    ac = AdaptiveConsistency(threshold=0.95, max=None)
    (stop,) = ac.decide(make_snapshot(["7"], failed=9))
    assert isinstance(stop, Stop) and "9 failed samples" in stop.reason
    exhausted = BudgetLeft(tokens=0, requests=None, cost_units=None, sample_tokens=10)
    (stop,) = ac.decide(make_snapshot(["7", "8"], budget_left=exhausted))
    assert isinstance(stop, Stop) and "budget exhausted" in stop.reason


def test_ac_dirichlet_counts_every_answer():
    beta = AdaptiveConsistency(threshold=0.9)
    dirichlet = AdaptiveConsistency(threshold=0.9, criterion="dirichlet")
    snap = make_snapshot(["7"] * 6 + ["8", "9", "10"])
    assert isinstance(beta.decide(snap)[0], Stop)
    # three rivals of one vote each: the Dirichlet posterior is less sure
    assert dirichlet.confidence([6, 1, 1, 1]) < beta.confidence([6, 1])


def test_ac_spec_round_trip_and_validation():
    ac = parse_policy("ac:threshold=0.9,max=all,criterion=dirichlet")
    assert ac == AdaptiveConsistency(0.9, None, "dirichlet")
    assert ac.spec == "ac:threshold=0.9,max=all,criterion=dirichlet"
    assert parse_policy("ac") == AdaptiveConsistency()
    for bad in ("ac:threshold=1.5", "ac:threshold=0.5", "ac:max=0", "ac:criterion=gauss",
                "ac:window=5"):
        with pytest.raises(ConfigError):
            parse_policy(bad)


# ---- ESC -----------------------------------------------------------------------------------


def test_esc_samples_one_window_then_waits():
    esc = EarlyStoppingSC(window=5)
    assert list(esc.decide(make_snapshot())) == [Sample(5)]
    assert list(esc.decide(make_snapshot(["7", "7"], in_flight=3))) == []


def test_esc_stops_on_a_unanimous_window():
    esc = EarlyStoppingSC(window=3)
    (stop,) = esc.decide(make_snapshot(["7", "7", "7"]))
    assert isinstance(stop, Stop) and stop.answer == "7" and "window 1 unanimous" in stop.reason


def test_esc_second_window_after_a_split_one():
    esc = EarlyStoppingSC(window=3)
    assert list(esc.decide(make_snapshot(["7", "8", "7"]))) == [Sample(3)]
    (stop,) = esc.decide(make_snapshot(["7", "8", "7", "8", "8", "8"]))
    assert isinstance(stop, Stop) and stop.answer == "8"  # the unanimous window's


def test_esc_answers_with_the_unanimous_window_not_the_overall_majority():
    """As the authors' code does: a unanimous window ends the loop with its own answer.
    It answered with the vote over every sample, here 7 (4 votes against 3), while its
    reason named window 3 (found by review)."""
    esc = EarlyStoppingSC(window=3)
    (stop,) = esc.decide(make_snapshot(["7", "7", "8", "7", "7", "9", "8", "8", "8"]))
    assert isinstance(stop, Stop) and stop.answer == "8" and stop.code == "settled"
    assert "window 3 unanimous" in stop.reason


def test_esc_launches_the_next_window_early_when_the_current_cannot_agree():
    esc = EarlyStoppingSC(window=4)
    # two different answers among the first finishers: the window is doomed
    assert list(esc.decide(make_snapshot(["7", "8"], in_flight=2))) == [Sample(4)]
    # already launched: nothing more until something changes
    assert list(esc.decide(make_snapshot(["7", "8"], in_flight=6))) == []
    # an unanswered sample also dooms its window
    assert list(esc.decide(make_snapshot(["7", None], in_flight=2))) == [Sample(4)]


def test_esc_unanswered_window_is_not_unanimous():
    esc = EarlyStoppingSC(window=2)
    assert list(esc.decide(make_snapshot([None, None]))) == [Sample(2)]


def test_esc_respects_max_and_falls_back_to_majority():
    esc = EarlyStoppingSC(window=4, max=6)
    assert list(esc.decide(make_snapshot(["7", "8", "7", "9"]))) == [Sample(2)]
    (stop,) = esc.decide(make_snapshot(["7", "8", "7", "9", "8", "7"]))
    assert isinstance(stop, Stop) and stop.answer == "7" and "max 6" in stop.reason


def test_esc_spec_and_validation():
    assert parse_policy("esc:window=5,max=all") == EarlyStoppingSC(5, None)
    assert parse_policy("esc").spec == "esc:window=5,max=64"
    for bad in ("esc:window=1", "esc:max=0", "esc:threshold=0.9"):
        with pytest.raises(ConfigError):
            parse_policy(bad)


# ---- Best-of-infinity -------------------------------------------------------------------------
from policies.literature import BestOfInfinity, bayes_factor  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_bayes_factor_of_a_unanimous_vote_is_closed_form(n):
    # Dirichlet(n + 1, 1) over (leader, unseen): P(leader larger) = 1 - 2^-(n+1)
    assert bayes_factor([n]) == pytest.approx(2.0 ** (n + 1) - 1, rel=1e-6)
    # alpha = 1/2: P(Beta(n + 1/2, 1/2) > 1/2) = I_{1/2}(1/2, n + 1/2)
    p = special.betainc(0.5, n + 0.5, 0.5)
    assert bayes_factor([n], alpha=0.5) == pytest.approx(p / (1 - p), rel=1e-6)


@pytest.mark.parametrize("counts", [(3, 1), (5, 2, 1), (4, 4), (6, 1, 1, 1)])
def test_bayes_factor_matches_monte_carlo(counts):
    rng = np.random.default_rng(7)
    theta = rng.dirichlet(np.array([*counts, 0]) + 1.0, size=400_000)
    p = float(np.mean(theta[:, 0] > theta[:, 1:].max(axis=1)))
    got = bayes_factor(counts)
    assert got / (1 + got) == pytest.approx(p, abs=3e-3)


def test_boinf_samples_one_at_a_time_and_stops_on_the_bayes_factor():
    pol = BestOfInfinity(bayes_factor=30)
    assert pol.decide(make_snapshot()) == [Sample(1)]
    assert pol.decide(make_snapshot(["7"], in_flight=1)) == []
    assert pol.decide(make_snapshot(["7", "7", "7"])) == [Sample(1)]  # BF 15 < 30
    (stop,) = pol.decide(make_snapshot(["7", "7", "7", "7"]))  # BF 31 >= 30
    assert isinstance(stop, Stop) and stop.answer == "7" and stop.code == "settled"
    (cap,) = BestOfInfinity(bayes_factor=1000, max=3).decide(make_snapshot(["7", "3", "7"]))
    assert cap.answer == "7" and cap.code == "max"


def test_boinf_spec_and_bad_values():
    assert parse_policy("boinf:bayes_factor=30").spec == "boinf:bayes_factor=30,max=64"
    assert parse_policy("boinf:bayes_factor=10,max=all,alpha=0.5").spec == (
        "boinf:bayes_factor=10,max=all,alpha=0.5")
    with pytest.raises(ConfigError, match="bayes_factor"):
        BestOfInfinity(bayes_factor=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        BestOfInfinity(alpha=0)
