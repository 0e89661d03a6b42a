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
    assert Adaptive(width=8, wide=8).decide(snap) == [Sample(3)]


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
    assert Adaptive(width=8, wide=8, max=64).decide(snap) == []
    assert Adaptive(width=8, wide=32, max=64).decide(snap) == [Sample(24)]


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
    (stop,) = Adaptive(confidence=0.9, loss=0).decide(snap)
    assert stop.answer == "7"
    assert Adaptive(confidence=0.99, loss=0).decide(snap) == []
    # the loss rule (default 0.01) settles it anyway: 6-1 risks 0.003 accuracy
    (stop,) = Adaptive(confidence=0.99).decide(snap)
    assert "expected accuracy lost" in stop.reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"width": 0}, "width"), ({"confidence": 1.0}, "confidence"), ({"max": 0}, "max"),
     ({"prior": 0}, "prior"), ({"min_votes": 0}, "min_votes"),
     # a bool is an int to Python, but its spec ("width=True") would not parse
     ({"width": True}, "width"), ({"max": True}, "max"), ({"min_votes": False}, "min_votes"),
     ({"wide": True, "width": 1}, "wide"), ({"width": 2.5}, "width")],
)
def test_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ConfigError, match=f"adaptive: {message}"):
        Adaptive(**kwargs)


# ---- the grid prior and the empirical-Bayes posterior ---------------------------------------
import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402

from orchestrator.backends.fake import FakeBackend, FakeReply, scripted  # noqa: E402
from orchestrator.history import ProblemRecord, RunHistory  # noqa: E402
from orchestrator.runtime import run_batch, solve  # noqa: E402
from orchestrator.types import Problem  # noqa: E402
from policies.adaptive import (  # noqa: E402
    _base_log_weights,
    _grid,
    checkpoint,
    fit_prior,
    posterior_overturn,
    posterior_risk,
    record_counts,
)
from tests.helpers import WordTask  # noqa: E402


def grid_overturn_brute_force(a, b, rest, remaining, log_prior, gain=False):
    """Exact for the discrete prior: posterior weight of each grid point times the
    probability of every multinomial split of the remaining samples, enumerated (times
    the point's accuracy difference v - u with ``gain``)."""
    g = _grid()
    total = 0.0
    norm = 0.0
    for k, (u, v) in enumerate(zip(g.u, g.v, strict=True)):
        s = max(1.0 - u - v, 0.0)
        lik = u ** a * v ** b * s ** rest
        w = math.exp(log_prior[k]) * lik
        if w == 0:
            continue
        p = 0.0
        for xa, xb in itertools.product(range(remaining + 1), repeat=2):
            xr = remaining - xa - xb
            if xr < 0 or b + xb < a + xa:
                continue
            p += (math.factorial(remaining) / (math.factorial(xa) * math.factorial(xb)
                                               * math.factorial(xr))
                  * u ** xa * v ** xb * s ** xr)
        total += w * p * ((v - u) if gain else 1.0)
        norm += w
    return total / norm


@pytest.mark.parametrize(("a", "b", "rest", "remaining"),
                         [(3, 0, 0, 5), (4, 2, 1, 6), (2, 2, 0, 4), (5, 1, 3, 8), (2, 0, 1, 7)])
def test_posterior_overturn_matches_brute_force_on_the_grid(a, b, rest, remaining):
    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3)
    for lp in (_base_log_weights(1.0), learned):
        assert posterior_overturn(a, b, rest, remaining, lp, 16) == pytest.approx(
            grid_overturn_brute_force(a, b, rest, remaining, lp), abs=1e-10)


@pytest.mark.parametrize(("a", "b", "rest", "remaining"),
                         [(3, 0, 0, 5), (4, 2, 1, 6), (2, 2, 0, 4), (5, 1, 3, 8), (3, 1, 0, 7)])
def test_posterior_risk_matches_brute_force_on_the_grid(a, b, rest, remaining):
    """The expected accuracy lost by stopping: sum over grid points of posterior weight x
    P(overturn) x (v - u), enumerated."""
    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3)
    for lp in (_base_log_weights(1.0), learned):
        p, lost = posterior_risk(a, b, rest, remaining, lp, 16)
        assert p == pytest.approx(grid_overturn_brute_force(a, b, rest, remaining, lp),
                                  abs=1e-10)
        assert lost == pytest.approx(
            grid_overturn_brute_force(a, b, rest, remaining, lp, gain=True), abs=1e-10)


def test_expected_loss_weighs_an_overturn_by_what_it_changes():
    """An overturn between two answers of about equal share costs little accuracy, so per
    unit of overturn probability a near tie risks less than a lead the votes cannot yet
    tell from a tie (where the runner-up may be the better answer); a clear lead is
    rarely overturned at all."""
    flat = _base_log_weights(1.0)
    tie_p, tie_loss = posterior_risk(30, 28, 2, 4, flat, 64)
    mid_p, mid_loss = posterior_risk(3, 1, 0, 60, flat, 64)
    lead_p, lead_loss = posterior_risk(12, 1, 0, 40, flat, 64)
    assert tie_p > 0.2 and tie_loss < 0.005
    assert tie_loss / tie_p < 0.1 * (mid_loss / mid_p)
    assert lead_p < 0.001 and 0 <= lead_loss < 1e-4
    # no sample left, or a lead no remaining sample can close: nothing to lose
    assert posterior_risk(5, 2, 0, 0, flat, 64) == (0.0, 0.0)
    assert posterior_risk(9, 2, 0, 6, flat, 64) == (0.0, 0.0)


def test_loss_rule_stops_a_near_tie_the_confidence_rule_keeps_sampling():
    tie = make_snapshot(["7", "3"] * 28 + ["7", "7", None, None], in_flight=4)
    assert Adaptive(confidence=0.9, loss=0).decide(tie) == []
    (stop,) = Adaptive(confidence=0.9, loss=0.005).decide(tie)
    assert isinstance(stop, Stop) and stop.answer == "7"
    assert "expected accuracy lost" in stop.reason


@pytest.mark.parametrize(("a", "b", "rest", "remaining"),
                         [(3, 0, 0, 61), (4, 1, 0, 59), (5, 2, 1, 56), (10, 4, 2, 48)])
def test_flat_grid_prior_is_the_dirichlet_rule(a, b, rest, remaining):
    """With no history the grid prior is a discretised Dirichlet(1, 1, 1): the overturn
    probability is the exact Dirichlet-multinomial one to within the grid's resolution."""
    got = posterior_overturn(a, b, rest, remaining, _base_log_weights(1.0), 64)
    assert got == pytest.approx(overturn_probability(a, b, rest, remaining), abs=0.01)


def test_fitted_prior_is_symmetric_and_follows_the_run():
    g = _grid()
    assert np.allclose(fit_prior([]), _base_log_weights(1.0))
    easy = fit_prior([(6, 0, 0)] * 20)
    hard = fit_prior([(3, 3, 2)] * 20)
    assert np.allclose(easy, easy[g.mirror]) and np.allclose(hard, hard[g.mirror])
    flat = _base_log_weights(1.0)
    p = {name: posterior_overturn(3, 0, 0, 61, lp, 64)
         for name, lp in (("easy", easy), ("flat", flat), ("hard", hard))}
    assert p["easy"] < p["flat"] < p["hard"]
    # more shrinkage: closer to the flat prior
    strong = fit_prior([(6, 0, 0)] * 20, shrink=1000.0)
    assert p["easy"] < posterior_overturn(3, 0, 0, 61, strong, 64) < p["flat"]


def test_record_counts_and_checkpoints():
    rec = ProblemRecord("p", "settled", "7", ("7", "3", None, "7", "5", "7"), (1,) * 6, (),
                        6, 0)
    assert record_counts(rec) == (3, 1, 2)
    assert [checkpoint(n) for n in (0, 1, 4, 5, 6, 7, 8, 11, 12, 13, 16, 23, 24, 100)] == [
        0, 1, 4, 4, 6, 6, 8, 8, 12, 12, 16, 16, 24, 96]


def test_widens_when_contested_and_not_when_settling():
    split = make_snapshot(["7", "3", "7", "3"], in_flight=4)
    assert Adaptive(width=8, wide=32, max=64).decide(split) == [Sample(28)]
    assert Adaptive(width=8, wide=8, max=64).decide(split) == [Sample(4)]
    # one vote so far: no evidence yet, the plain width
    assert Adaptive(width=8, wide=32).decide(make_snapshot(["7"], in_flight=8)) == []
    # a clear lead that a few more votes settle: stays near width
    lead = make_snapshot(["7", "7", "7", "3"], in_flight=4)
    (more,) = Adaptive(width=8, wide=32, confidence=0.95, max=64).decide(lead)
    assert isinstance(more, Sample) and more.k <= 4


def test_learned_prior_changes_the_decision():
    history = tuple(ProblemRecord(f"h{i}", "settled", "7", ("7",) * 6, (10,) * 6, (), 60, 0)
                    for i in range(12))
    snap = make_snapshot(["7", "7", "7"], in_flight=8)
    snap = type(snap)(**{**{f: getattr(snap, f) for f in snap.__dataclass_fields__},
                         "history": history})
    policy = Adaptive(width=8, wide=8, confidence=0.97, max=64, loss=0)
    assert policy.decide(make_snapshot(["7", "7", "7"], in_flight=8)) == []  # flat: go on
    (stop,) = policy.decide(snap)  # twelve unanimous problems: 3-0 is settled
    assert isinstance(stop, Stop) and stop.answer == "7"
    assert Adaptive(width=8, wide=8, confidence=0.97, max=64, learn=False,
                    loss=0).decide(snap) == []
    # the loss rule reads the same prior: 3-0 risks 0.008 accuracy under the flat prior,
    # far less after twelve unanimous problems
    assert Adaptive(width=8, wide=8, confidence=0.999, max=64, loss=0.005).decide(
        make_snapshot(["7", "7", "7"], in_flight=8)) == []
    (stop,) = Adaptive(width=8, wide=8, confidence=0.999, max=64, loss=0.005).decide(snap)
    assert "expected accuracy lost" in stop.reason


async def test_online_prior_on_a_deterministic_fake_run():
    """Problems run one at a time; every sample says "seven". With learning, later
    problems stop sooner than the first one, and sooner than without learning."""
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(*["so seven"] * req.n)))
    problems = [Problem(id=f"p{i}", problem="q", answer="seven") for i in range(10)]

    async def samples(policy):
        results = await run_batch(problems, policy, backend=backend, task=WordTask(),
                                  problems_in_flight=1)
        assert all(r.answer == "seven" for r in results)
        return [len(r.solutions) for r in results]

    learned = await samples(Adaptive(width=1, wide=1, confidence=0.98, max=64, loss=0))
    flat = await samples(Adaptive(width=1, wide=1, confidence=0.98, max=64, learn=False,
                                  loss=0))
    assert len(set(flat)) == 1  # no history: every problem the same
    assert learned[0] == flat[0]
    assert learned[-1] < flat[-1]
    assert learned == sorted(learned, reverse=True)  # more evidence, never more samples
    # solve() with a history shared by hand gives the same as the batch
    history = RunHistory()
    alone = []
    for p in problems:
        r = await solve(p, Adaptive(width=1, wide=1, confidence=0.98, max=64, loss=0),
                        backend=backend, task=WordTask(), history=history)
        alone.append(len(r.solutions))
    assert alone == learned


# ---- rivals=all: the union bound over every answer that can still reach the leader ------
def test_all_rivals_sum_each_rivals_risk_on_the_grid():
    """With ``rivals=all`` the risk is the runner-up's plus each lower answer's that can
    still reach the leader (equal ones counted once each), each the grid brute force in
    the three-outcome model of that rival against everything else."""
    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3)
    policy = Adaptive(rivals="all", max=16)
    a, b, others, unanswered, remaining = 5, 2, (1, 1, 0), 1, 7
    rest = sum(others) + unanswered
    n = a + b + rest
    for lp in (_base_log_weights(1.0), learned):
        p, lost = policy.risk(a, b, rest, remaining, lp, others)
        want_p = want_lost = 0.0
        for c in (b, *others):
            want_p += grid_overturn_brute_force(a, c, n - a - c, remaining, lp)
            want_lost += grid_overturn_brute_force(a, c, n - a - c, remaining, lp, gain=True)
        assert p == pytest.approx(want_p, abs=1e-10)
        assert lost == pytest.approx(want_lost, abs=1e-10)
        # without the others: the runner-up's alone, as with rivals=runner-up
        assert policy.risk(a, b, rest, remaining, lp) == posterior_risk(
            a, b, rest, remaining, lp, 16)
    # a rival the remaining samples cannot bring level adds nothing; the sum is capped at 1
    flat = _base_log_weights(1.0)
    assert policy.risk(9, 3, 2, 6, flat, (1,)) == posterior_risk(9, 3, 2, 6, flat, 16)
    assert policy.risk(1, 1, 6, 8, flat, (1,) * 6)[0] == 1.0


def test_all_rivals_keep_sampling_where_many_answers_sit_behind_the_runner_up():
    """At votes 5-1-1-1-1-1-1 the runner-up alone is unlikely to catch the leader, but one
    of six such answers is not (a review's Monte Carlo put it at 0.19): the runner-up rule
    stops, the union bound samples on; with the runner-up alone behind, they agree."""
    crowd = make_snapshot(["7"] * 5 + ["1", "2", "3", "4", "5", "6"], in_flight=4)
    (stop,) = Adaptive(wide=4).decide(crowd)  # P(overturn) 0.048 by the runner-up
    assert isinstance(stop, Stop) and stop.answer == "7" and "at 5-1:" in stop.reason
    assert Adaptive(wide=4, rivals="all").decide(crowd) == []  # 0.29 summed
    duel = make_snapshot(["7"] * 5 + ["1"], in_flight=4)
    assert Adaptive(wide=4).decide(duel) == Adaptive(wide=4, rivals="all").decide(duel)


def test_the_widening_extrapolation_keeps_the_rivals_inside_the_rest():
    """need() scales the lower answers' votes with the rest: rounded one by one they could
    hold more votes than the rest does (four 1s of 8 votes became four 2s of a rest of 6,
    found by review), and the bound then over-counted and widened too far."""
    from policies.adaptive import _scaled

    assert _scaled((1, 1, 1, 1), 8, 4, 6) == (2, 2, 2)
    assert _scaled((3, 1), 8, 8, 8) == (6, 2)
    assert _scaled((2, 1), 4, 0, 3) == (2, 1)
    assert _scaled((), 5, 5, 4) == ()
    # a policy that counts the runner-up alone ignores any others it is handed
    flat = _base_log_weights(1.0)
    assert Adaptive().risk(5, 1, 5, 53, flat, (1,) * 4) == posterior_risk(5, 1, 5, 53, flat, 64)
