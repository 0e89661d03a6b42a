"""Memoised policy maths returns exactly what the computation it stands for returns."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.history import ProblemRecord
from policies.adaptive import (
    _PRIORS,
    Adaptive,
    _base_log_weights,
    _grid,
    _log_lik,
    _log_lik_raw,
    _posterior_risk,
    fit_prior,
    posterior_risk,
)
from policies.literature import AdaptiveConsistency


def _counts(horizon: int):
    for n in range(0, horizon + 1, 3):
        for a in range(n + 1):
            for b in range(min(a, n - a) + 1):
                yield a, b, n - a - b, horizon - n


def test_posterior_risk_memo_is_exact_and_repeatable():
    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3)
    learned.flags.writeable = False
    for lp in (_base_log_weights(1.0), learned):
        assert not lp.flags.writeable
        for a, b, rest, remaining in _counts(20):
            if remaining <= 0 or a - b > remaining:
                continue
            want = _posterior_risk(a, b, rest, remaining, lp, 20)
            assert posterior_risk(a, b, rest, remaining, lp, 20) == want
            assert posterior_risk(a, b, rest, remaining, lp, 20) == want  # from the memo


def test_a_writeable_prior_is_never_memoised():
    lp = np.array(_base_log_weights(1.0))  # a writeable copy
    before = posterior_risk(3, 1, 0, 10, lp, 16)
    lp[:] = _PRIORS.get([_record()], 1, 1.0, 4.0)
    assert posterior_risk(3, 1, 0, 10, lp, 16) == _posterior_risk(3, 1, 0, 10, lp, 16)
    assert posterior_risk(3, 1, 0, 10, lp, 16) != before


def _record() -> ProblemRecord:
    return ProblemRecord("x", "settled", "a", ("a",) * 6, (1,) * 6, (), 6, 0)


def test_histories_that_share_their_last_record_get_each_its_own_prior():
    """The prior cache was keyed by the last record and the length alone, so a second
    hand-built history ending in the same record got the first one's prior (found by
    review); the runtime's histories, which only grow, were not affected."""
    last = _record()
    split = ProblemRecord("y", "settled", "a", ("a", "b") * 3, (1,) * 6, (), 6, 0)
    unanimous = ProblemRecord("z", "settled", "a", ("a",) * 6, (1,) * 6, (), 6, 0)
    policy = Adaptive()
    first = policy.prior_for([split, last])
    second = policy.prior_for([unanimous, last])
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, fit_prior([(6, 0, 0), (6, 0, 0)]))
    np.testing.assert_array_equal(policy.prior_for([split, last]), first)
    # a growing tuple history is found again: the very same array
    history = (split, last)
    assert policy.prior_for(history) is policy.prior_for(history)


def test_priors_in_use_are_read_only():
    policy = Adaptive()
    assert not _PRIORS.get([_record()], 1, 1.0, 4.0).flags.writeable
    assert not _base_log_weights(policy.prior).flags.writeable


def test_memoised_log_likelihood_is_the_computed_one():
    g = _grid()
    for a, b, rest, _ in _counts(12):
        got = _log_lik(g, a, b, rest)
        assert not got.flags.writeable
        np.testing.assert_array_equal(got, _log_lik_raw(g, a, b, rest))


@pytest.mark.parametrize("criterion", ["beta", "dirichlet"])
@pytest.mark.parametrize("threshold", [0.8, 0.95, 0.99])
def test_optimistic_need_is_the_fewest_extra_votes_that_reach_the_threshold(criterion,
                                                                            threshold):
    ac = AdaptiveConsistency(threshold=threshold, criterion=criterion)
    for counts in ([], [0], [1], [3], [2, 2], [5, 3], [4, 4, 1], [6, 2, 2, 1], [9, 9, 9]):
        need = ac.optimistic_need(counts)
        cs = list(counts) or [0]
        assert ac.confidence([cs[0] + need, *cs[1:]]) >= threshold
        if need:
            assert ac.confidence([cs[0] + need - 1, *cs[1:]]) < threshold


def _risk_reference(a, b, rest, remaining, log_prior, horizon):
    """posterior_risk written plainly (the arithmetic its faster form must repeat)."""
    from policies.adaptive import _overturn_tables

    g = _grid()
    lp = log_prior + _log_lik_raw(g, a, b, rest)
    top = lp.max()
    if not np.isfinite(top):
        return 1.0, 1.0
    post = np.exp(lp - top)
    post /= post.sum()
    ot = _overturn_tables(max(horizon, remaining))[remaining][a - b]
    return float(post @ ot), float(post @ (ot * (g.v - g.u)))


def test_posterior_risk_is_bit_identical_to_the_plain_arithmetic():
    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3 + [(2, 2, 4)])
    for lp in (_base_log_weights(1.0), learned, _base_log_weights(0.5)):
        for a, b, rest, remaining in _counts(30):
            if remaining <= 0 or a - b > remaining:
                continue
            assert _posterior_risk(a, b, rest, remaining, lp, 30) == _risk_reference(
                a, b, rest, remaining, lp, 30)


def test_the_shared_fit_is_fit_prior_of_the_same_counts():
    from policies.adaptive import _distinct, _fit_shared

    for counts in ([(3, 0, 0)], [(3, 0, 0)] * 5, [(4, 1, 0), (3, 0, 0), (4, 1, 0)],
                   [(6, 2, 1), (2, 2, 0), (3, 0, 0), (6, 2, 1)] * 7):
        shared = _fit_shared(_distinct(counts), 1.0, 4.0)
        assert not shared.flags.writeable
        np.testing.assert_array_equal(shared, fit_prior(counts, 1.0, 4.0))
        assert _fit_shared(_distinct(counts), 1.0, 4.0) is shared
    # the order of first occurrence is part of what the fit depends on
    assert _distinct([(1, 0, 0), (2, 0, 0), (1, 0, 0)]) == (((1, 0, 0), 2), ((2, 0, 0), 1))


def test_adaptive_plan_memo_is_exact_for_each_policy_and_prior():
    from policies.adaptive import _PLANS

    learned = fit_prior([(5, 0, 0)] * 6 + [(3, 2, 1)] * 3)
    learned.flags.writeable = False
    policies = (Adaptive(), Adaptive(width=4, wide=12, max=24, min_votes=2),
                Adaptive(loss=0.0, confidence=0.8))
    for policy in policies:
        for lp in (_base_log_weights(1.0), learned):
            for a, b, rest, _ in _counts(policy.max):
                for flying in (0, 3, 8):
                    for failed, exhausted in ((0, False), (9, False), (0, True)):
                        want = policy.plan(lp, a, b, rest, flying, failed, exhausted)
                        for _ in range(2):  # computed, then from the memo
                            assert _PLANS.get(policy, lp, a, b, rest, flying, failed,
                                              exhausted) == want


def test_adaptive_plan_memo_skips_a_writeable_prior():
    from policies.adaptive import _PLANS

    policy = Adaptive(max=12)
    lp = np.array(_base_log_weights(1.0))  # a writeable copy, then changed in place
    before = _PLANS.get(policy, lp, 3, 0, 0, 0, 0, False)
    lp[:] = fit_prior([(1, 1, 1)] * 40)
    assert _PLANS.get(policy, lp, 3, 0, 0, 0, 0, False) == policy.plan(lp, 3, 0, 0, 0, 0,
                                                                         False)
    assert before == policy.plan(_base_log_weights(1.0), 3, 0, 0, 0, 0, False)
    assert before != policy.plan(lp, 3, 0, 0, 0, 0, False)  # the change shows
