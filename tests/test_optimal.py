"""optimal:c=C: the compute-optimal allocation from a fitted scaling law, on hand-built
snapshots (it must behave exactly as the fixed policy it resolves to)."""

from __future__ import annotations

import json
import random

import pytest

from orchestrator.decisions import Sample, Stop, Verify
from orchestrator.errors import ConfigError, DataError
from orchestrator.testing import make_snapshot
from policies import parse_policy
from policies.fixed import GenRM, SelfConsistency
from policies.optimal import Optimal, allocate
from policies.profile import BetaFit, ScalingLaw, VerifierProfile


def profile(law: ScalingLaw | None, lam: float | None = 1.0, auc: float = 0.9
            ) -> VerifierProfile:
    return VerifierProfile(BetaFit(4, 2), BetaFit(2, 4), auc=auc, lam=lam, scaling=law)


LAW = ScalingLaw(1.0, 0.6, 0.5, 0.4, crossover=8.0, verify_pays=True, lam=1.0)


def test_below_the_crossover_and_without_payoff_it_is_self_consistency():
    assert allocate(profile(LAW), 4) == (4, 0)
    assert allocate(profile(LAW), 7.9) == (7, 0)
    never = ScalingLaw(1.0, 0.6, 0.5, 0.4, crossover=None, verify_pays=False, lam=1.0)
    for c in (1, 8, 64, 1000):
        assert allocate(profile(never), c) == (int(c), 0)


def test_above_the_crossover_it_follows_the_law_and_never_exceeds_the_compute():
    # c = 64: S = 64^0.6 = 12.1 -> 12, V = 0.5 * 64^0.4 = 2.64 -> 3; cost 12 * 4 = 48 <= 64
    assert allocate(profile(LAW), 64) == (12, 3)
    rng = random.Random(0)
    for _ in range(300):
        law = ScalingLaw(rng.uniform(0.2, 3), rng.uniform(0, 1), rng.uniform(0.2, 3),
                         rng.uniform(0, 1), lam=rng.uniform(0.1, 3))
        c = rng.uniform(1, 5000)
        s, v = allocate(profile(law, lam=None), c)
        assert s >= 1 and v >= 0
        assert s * (1 + law.lam * v) <= c + 1e-6 if v else s <= c + 1e-9


def test_lambda_comes_from_the_law_else_the_profile():
    law = ScalingLaw(4.0, 0.0, 4.0, 0.0)  # S = V = 4 at every compute, no lambda of its own
    assert allocate(profile(law, lam=0.5), 12) == (4, 4)  # 4 * (1 + 0.5 * 4) = 12
    assert allocate(profile(law, lam=1.0), 12) == (4, 2)  # V lowered until 4 * 3 <= 12
    with pytest.raises(ConfigError, match="lambda"):
        allocate(profile(law, lam=None), 12)


def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="scaling law"):
        allocate(profile(None), 16)
    with pytest.raises(ConfigError, match="c must be"):
        allocate(profile(LAW), 0.5)
    with pytest.raises(ConfigError, match="profile=FILE"):
        parse_policy("optimal:c=16")
    with pytest.raises(DataError):
        parse_policy(f"optimal:c=16,profile={tmp_path / 'missing.json'}")


def snapshots():
    yield make_snapshot()
    yield make_snapshot(["4", "5"], in_flight=3)
    yield make_snapshot(["4", "4", "5", None], scores={0: [0.9]}, verifying={1: 1})
    yield make_snapshot(["4", "5", "5"] * 4, scores={i: [0.2 + 0.05 * i] * 3 for i in range(12)})


@pytest.mark.parametrize("c", [4.0, 64.0, 300.0])
def test_decides_exactly_as_the_fixed_policy_it_resolves_to(tmp_path, c):
    path = tmp_path / "prof.json"
    profile(LAW).save(path)
    pol = parse_policy(f"optimal:c={c:g},profile={path}")
    assert isinstance(pol, Optimal)
    s, v = allocate(profile(LAW), c)
    fixed = SelfConsistency(s) if v == 0 else GenRM(s, v)
    assert pol.allocation == (s, v) and pol.resolved == fixed
    assert pol.resolved.spec == fixed.spec and pol.spec.startswith(f"optimal:c={c:g},profile=")
    for snap in snapshots():
        assert list(pol.decide(snap)) == list(fixed.decide(snap))


def test_a_verifier_that_never_pays_is_never_consulted():
    never = ScalingLaw(1.0, 0.6, 0.5, 0.4, verify_pays=False, lam=1.0)
    pol = Optimal(64, profile(never, auc=0.43))
    for snap in snapshots():
        decisions = pol.decide(snap)
        assert not any(isinstance(d, Verify) for d in decisions)
    done = pol.decide(make_snapshot(["4"] * 40 + ["5"] * 24))
    assert isinstance(done[0], Stop) and done[0].answer == "4"
    assert pol.decide(make_snapshot(["4"] * 10)) == [Sample(54)]


def test_profiles_written_before_the_new_law_fields_still_load(tmp_path):
    d = profile(None).to_dict()
    d["scaling"] = {"s_coef": 2.0, "s_exp": 0.5, "v_coef": 1.0, "v_exp": 0.25}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    law = VerifierProfile.load(path).scaling
    assert law == ScalingLaw(2.0, 0.5, 1.0, 0.25)
    assert law.verify_pays and law.crossover is None and not law.prefers_sc(1.0)
    full = profile(LAW)
    full.save(path)
    assert VerifierProfile.load(path) == full


def test_replay_runs_optimal_as_the_plan_it_resolves_to(tmp_path):
    from benchmarks.replay import FixedPlan, fixed_plan

    path = tmp_path / "prof.json"
    profile(LAW).save(path)
    assert fixed_plan(f"optimal:c=64,profile={path}") == FixedPlan("genrm", 12, 3)
    assert fixed_plan(f"optimal:c=4,profile={path}") == FixedPlan("sc", 4)
