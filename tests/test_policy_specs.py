"""Every policy's ``spec`` parses back to an equal policy, whatever its parameters (found
by review: ``max_failures``, ``min_auc`` and ``max_icc`` were left out, floats cut to six
digits, and ``optimal``'s spec did not parse), and what the parameters refuse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.errors import ConfigError
from policies import parse_policy
from policies.adaptive import MAX_HORIZON, Adaptive, _base_log_weights, _grid
from policies.spec import registered

SPECS = {
    "sc": ["sc:n=16", "sc:n=16,max_failures=2"],
    "genrm": ["genrm:s=4,v=2,max_failures=0"],
    "ac": ["ac:threshold=0.9,max=all,criterion=dirichlet,max_failures=3",
           "ac:threshold=0.9999999,max=10"],
    "esc": ["esc:window=3,max=all,max_failures=5"],
    "boinf": ["boinf:bayes_factor=10,max=all,alpha=0.5,max_failures=0",
              "boinf:bayes_factor=1234567.5"],
    "adaptive": ["adaptive:width=4,wide=4,max=32,max_failures=7",
                 "adaptive:confidence=0.9999999,loss=0.00123456789,prior=0.5",
                 "adaptive:width=32", "adaptive:rivals=all,max=16"],
    "verify-contested": ["verify-contested:min_auc=0.7,max_icc=0.2,max_failures=2,floor=0.1",
                         "verify-contested:width=24", "verify-contested:rivals=all"],
    "solverify": ["solverify:explore=3,min_auc=0.6,max_icc=0.9,min_gain=0.002,doubt=0.05"],
    "optimal": [],  # needs a profile file: below
}


def test_every_registered_policy_is_covered():
    assert {e.name for e in registered()} == set(SPECS)


@pytest.mark.parametrize("spec", [s for specs in SPECS.values() for s in specs])
def test_the_spec_parses_back_to_the_same_policy(spec):
    policy = parse_policy(spec)
    again = parse_policy(policy.spec)
    assert again == policy and again.spec == policy.spec


def test_optimal_spec_names_its_profile_and_parses_back(tmp_path):
    from policies.profile import BetaFit, ScalingLaw, VerifierProfile

    path = tmp_path / "law.json"
    law = ScalingLaw(1.0, 0.6, 0.5, 0.4, crossover=8.0, verify_pays=True, lam=1.0)
    VerifierProfile(BetaFit(4, 2), BetaFit(2, 4), auc=0.9, lam=1.0, scaling=law).save(path)
    policy = parse_policy(f"optimal:c=64,profile={path},max_failures=1")
    assert policy.spec == f"optimal:c=64,profile={path},max_failures=1"
    assert parse_policy(policy.spec) == policy


def test_an_optimal_allocation_that_verifies_says_so(tmp_path):
    """An ``optimal`` that resolves to GenRM sends solutions to the verifier: it must say
    so, or the runtime skips the check that a budget holds one verification and the
    resume fingerprint leaves the verifier out (found by review)."""
    from orchestrator.protocols import policy_verifies
    from policies.profile import BetaFit, ScalingLaw, VerifierProfile

    path = tmp_path / "law.json"
    law = ScalingLaw(1.0, 0.6, 0.5, 0.4, crossover=8.0, verify_pays=True, lam=1.0)
    VerifierProfile(BetaFit(4, 2), BetaFit(2, 4), auc=0.9, lam=1.0, scaling=law).save(path)
    genrm = parse_policy(f"optimal:c=64,profile={path}")
    assert genrm.allocation[1] > 0 and policy_verifies(genrm)
    sc = parse_policy(f"optimal:c=2,profile={path}")
    assert sc.allocation[1] == 0 and not policy_verifies(sc)


def test_verifying_specs_with_a_profile_round_trip_their_explore_settings(tmp_path):
    """With a profile the spec left out ``explore``/``explore_others``, so it parsed back
    to a different policy (found by review)."""
    from policies.profile import BetaFit, VerifierProfile
    from policies.verifying import Solverify, VerifyContested

    path = tmp_path / "p.json"
    VerifierProfile(BetaFit(4, 2), BetaFit(2, 4), auc=0.9, lam=1.0).save(path)
    for cls in (VerifyContested, Solverify):
        policy = cls(profile=str(path), explore=3, explore_others=2)
        assert parse_policy(policy.spec) == policy


@pytest.mark.parametrize("kw", [{"max_failures": 2.5}, {"max_failures": True},
                                {"learn": "false"}, {"learn": 1}])
def test_adaptive_refuses_a_count_or_a_flag_of_the_wrong_type(kw):
    # accepted before, and the spec they wrote did not parse or parsed to another policy
    with pytest.raises(ConfigError, match=r"max_failures|learn"):
        Adaptive(**kw)


@pytest.mark.parametrize("spec", ["adaptive:prior=inf", "adaptive:shrink=inf",
                                  "verify-contested:prior=inf", "boinf:alpha=inf",
                                  f"adaptive:max={MAX_HORIZON + 1}"])
def test_non_finite_values_and_too_long_a_horizon_are_refused(spec):
    with pytest.raises(ConfigError):
        parse_policy(spec)


def test_wide_below_width_counts_as_width():
    assert Adaptive(width=32).widest == 32 and Adaptive(width=4).widest == 16
    assert parse_policy("verify-contested:width=24")._adaptive.widest == 24


def test_a_prior_below_one_is_not_all_on_the_simplex_edge():
    """Dirichlet(0.5) on the grid: the share of mass on the edge points stays of the order
    of their share of points (it was all of it, so a 3-0 lead looked certain)."""
    g = _grid()
    w = np.exp(_base_log_weights(0.5))
    edge = (g.u == 0) | (g.v == 0) | (np.abs(1 - g.u - g.v) < 1e-12)
    assert 0.2 < w[edge].sum() < 0.5
    flat = Adaptive(prior=1.0, confidence=0.999, loss=0.0, learn=False)
    sharp = Adaptive(prior=0.5, confidence=0.999, loss=0.0, learn=False)
    for policy in (flat, sharp):  # a 3-0 lead with 61 to come is not settled at 0.999
        assert policy.plan(policy.prior_for(()), 3, 0, 0, 0, 0, False)[0] == "sample"
    # and the grid's overturn probability is close to the exact Dirichlet(0.5) one (0.0310)
    p = sharp.overturn(3, 0, 0, 61, sharp.prior_for(()))
    assert math.isclose(p, 0.0310, abs_tol=0.003)


def test_rivals_is_runner_up_or_all_and_all_there_is_not_a_horizon():
    """``rivals=all`` is a string value, not "the pool size": the replay tables read the
    horizon from ``max`` (they said "all (80-160)" for ``adaptive:rivals=all``)."""
    from benchmarks.replay import horizon
    from policies.spec import uses_all

    with pytest.raises(ConfigError, match="rivals"):
        parse_policy("adaptive:rivals=some")
    assert parse_policy("adaptive:rivals=all").rivals == "all"
    assert not uses_all("adaptive:rivals=all") and uses_all("adaptive:max=all,rivals=all")
    assert horizon("adaptive:rivals=all", 80) == "64"
    assert horizon("adaptive:rivals=all,max=all", 80) == "all (80)"
    assert horizon("ac:max=all", 80) == "all (80)"
