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
