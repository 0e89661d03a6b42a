"""The compute-matched estimators against brute force, and the analysis end to end."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import numpy as np
import pytest

from benchmarks.compute_matched import (
    CompareConfig,
    bon_expected,
    compute_matched,
    crossover,
    grid_success,
    powers_of_two,
    sc_expected,
)
from benchmarks.pools import Pool, PoolProblem, PoolSample, PoolVerification, load_pool
from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.errors import ConfigError
from orchestrator.types import Problem
from tests.conftest_data import DATA, needs_data


def brute_sc(keys, key_correct, size) -> float:
    """Majority vote over every subset; ties split uniformly; no answer scores 0."""
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(keys)), size))
    for sub in subsets:
        counts: dict[int, int] = {}
        for j in sub:
            if keys[j] >= 0:
                counts[keys[j]] = counts.get(keys[j], 0) + 1
        if counts:
            top = max(counts.values())
            tied = [k for k, c in counts.items() if c == top]
            total += Fraction(sum(bool(key_correct[k]) for k in tied), len(tied))
    return float(total / len(subsets))


def brute_bon(scores, correct, size) -> float:
    total = Fraction(0)
    subsets = list(itertools.combinations(range(len(scores)), size))
    for sub in subsets:
        best = max(scores[j] for j in sub)
        tied = [j for j in sub if scores[j] == best]
        total += Fraction(sum(bool(correct[j]) for j in tied), len(tied))
    return float(total / len(subsets))


@pytest.mark.parametrize("seed", range(40))
def test_sc_estimator_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    groups = rng.randint(1, 4)
    keys = [rng.randint(-1, groups - 1) for _ in range(n)]
    key_correct = [rng.random() < 0.5 for _ in range(groups)]
    sizes = list(range(1, n + 1))
    expected = [brute_sc(keys, key_correct, s) for s in sizes]
    np.testing.assert_allclose(sc_expected(keys, key_correct, sizes), expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_best_of_n_estimator_equals_brute_force(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(1, 10)
    scores = [rng.choice([0.2, 0.5, 0.9, -np.inf, round(rng.random(), 2)]) for _ in range(n)]
    correct = [rng.random() < 0.5 for _ in range(n)]
    sizes = list(range(1, n + 1))
    expected = [brute_bon(scores, correct, s) for s in sizes]
    np.testing.assert_allclose(bon_expected(scores, correct, sizes), expected, atol=1e-12)


def test_sc_of_one_and_of_everything():
    keys = [0, 0, 1, -1, 2, 0]
    key_correct = [True, False, False]
    got = sc_expected(keys, key_correct, [1, 6])
    assert got[0] == pytest.approx(3 / 6)  # pass@1
    assert got[1] == pytest.approx(1.0)  # group 0 wins with 3 of 5 votes


def test_estimators_reject_sizes_out_of_range():
    with pytest.raises(ValueError):
        sc_expected([0, 1], [True, False], [3])
    with pytest.raises(ValueError):
        bon_expected([0.1], [True], [0])


def test_powers_of_two():
    assert powers_of_two(80) == [1, 2, 4, 8, 16, 32, 64, 80]
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]


def toy_pool() -> Pool:
    """Two problems with recorded verifications: a good verifier on problem 0."""
    def sample(pred, ok, tokens, ps):
        return PoolSample(pred, ok, tokens, verifications=tuple(
            PoolVerification(p, tokens // 2) for p in ps))

    p0 = PoolProblem(Problem("a", "q", "1"), (
        sample("1", True, 10, [0.9, 0.8]), sample("2", False, 10, [0.1, 0.3]),
        sample("2", False, 20, [0.4, 0.2]), sample("3", False, 20, [0.2, 0.2])))
    p1 = PoolProblem(Problem("b", "q", "7"), (
        sample("7", True, 10, [0.6, 0.7]), sample("7", True, 30, [0.5, 0.9]),
        sample("8", False, 10, [0.7, 0.1]), sample(None, False, 10, [])))
    return Pool("toy", (p0, p1))


def test_grid_success_with_every_reading_is_exact_brute_force():
    src = ReplaySource(toy_pool())
    sc, genrm = grid_success(src, [1, 2, 4], [2])
    a = src.pool.arrays
    for i, pp in enumerate(src.pool.problems):
        n = len(pp.samples)
        keys = a.key[i, :n].tolist()
        for si, s in enumerate([1, 2, 4]):
            assert sc[i, si] == pytest.approx(brute_sc(keys, a.key_correct[i], s))
            scores = [np.mean([v.p_yes for v in smp.verifications]) if smp.key else -np.inf
                      for smp in pp.samples]
            assert genrm[i, si, 0] == pytest.approx(
                brute_bon(scores, [bool(x.correct) for x in pp.samples], s))


def test_grid_success_monte_carlo_over_verification_subsets_is_unbiased():
    src = ReplaySource(toy_pool())
    _, genrm = grid_success(src, [1, 2], [1], v_draws=4000, seed=1)
    # V=1: each solution's score is one of its two readings, uniformly
    pp = src.pool.problems[0]
    exact = 0.0
    for choice in itertools.product(range(2), repeat=4):
        scores = [pp.samples[j].verifications[c].p_yes for j, c in enumerate(choice)]
        exact += brute_bon(scores, [s.correct for s in pp.samples], 2) / 16
    assert genrm[0, 1, 0] == pytest.approx(exact, abs=0.02)


def test_crossover_after_sc_leads():
    sizes = [1, 2, 4, 8]
    sc = np.array([0.5, 0.6, 0.7, 0.72])
    costs = np.array([2.0, 4.0, 8.0, 16.0])
    genrm = np.array([0.5, 0.55, 0.71, 0.8])
    # budget 8: GenRM(cost 8) 0.71 < SC(S=8) 0.72; budget 16: 0.80 >= 0.72 (SC capped at N)
    assert crossover(sizes, sc, costs, genrm) == 16.0
    assert crossover(sizes, np.array([0.5, 0.6, 0.7, 0.705]), costs, genrm) == 8.0
    assert crossover(sizes, sc, costs, np.array([0.5, 0.5, 0.5, 0.6])) is None


def test_compute_matched_end_to_end_with_recorded_verifications():
    res = compute_matched(ReplaySource(toy_pool()), CompareConfig(bootstrap=50))
    assert res["lambda_source"] == "measured" and not res["simulated_verifier"]
    ver = [v.tokens for p in toy_pool().problems for s in p.samples for v in s.verifications]
    sol = [s.tokens for p in toy_pool().problems for s in p.samples]
    assert res["lambda"] == pytest.approx(np.mean(ver) / np.mean(sol))
    assert res["grid"] == {"S": [1, 2, 4], "V": [1, 2]}
    assert {(p["S"], p["V"]) for p in res["genrm"]} == {(s, v) for s in (1, 2, 4)
                                                        for v in (1, 2)}
    for p in res["genrm"]:
        assert p["C"] == pytest.approx(p["S"] * (1 + res["lambda"] * p["V"]))
    scaling = res["scaling"]
    assert len(scaling["budgets"]) == len(scaling["S_opt"]) == len(scaling["V_opt"])


def test_compute_matched_needs_a_verifier():
    pool = Pool("plain", (PoolProblem(Problem("a", "q", "1"),
                                      (PoolSample("1", True, 3), PoolSample("2", False, 4))),))
    with pytest.raises(ConfigError, match="simulated verifier"):
        compute_matched(ReplaySource(pool), CompareConfig())


def test_simulated_verifier_is_labelled_and_separates_labels():
    sv = SimulatedVerifier(lam=2.0, vmax=8)
    assert "simulated" in sv.label and 0.7 < sv.auc() < 0.8
    pool = Pool("plain", tuple(PoolProblem(Problem(f"p{i}", "q", "1"), tuple(
        PoolSample(str(j % 3), j % 3 == 0, 10 + j) for j in range(12))) for i in range(5)))
    src = ReplaySource(pool, verifier=sv)
    va = src.verifier_arrays(8)
    correct = src.pool.arrays.correct[:, :, None] & va.ok
    wrong = ~src.pool.arrays.correct[:, :, None] & va.ok
    assert va.p[correct].mean() > va.p[wrong].mean()
    assert va.tokens[0, 0, 0] == 20  # lambda x the solution's 10 tokens
    res = compute_matched(src, CompareConfig(bootstrap=20))
    assert res["simulated_verifier"] and res["lambda"] == 2.0
    assert res["lambda_source"] == "simulated verifier"


@needs_data
def test_compute_matched_on_an_aime_pool_runs_and_is_reproducible():
    pool = load_pool(DATA / "pools" / "boinf_aime2024_Qwen3-4B.jsonl")
    src = ReplaySource(pool, verifier=SimulatedVerifier(vmax=8))
    cfg = CompareConfig(bootstrap=50, sizes=(1, 4, 16, 80), verifications=(1, 4))
    a = compute_matched(src, cfg)
    b = compute_matched(ReplaySource(pool, verifier=SimulatedVerifier(vmax=8)), cfg)
    assert a == b
    sc_all = next(p for p in a["sc"] if p["S"] == 80)["success"]
    # exact SC over all 80 samples = the pool's majority vote (no tie on this pool)
    assert sc_all == pytest.approx(0.8)
