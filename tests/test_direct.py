"""The direct replay engine (benchmarks.direct): the lean engine's per-problem numbers for
``ac``, ``esc`` and ``boinf``, or a hand-over to the lean engine where it cannot tell."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.direct import supports
from benchmarks.pools import Pool, PoolProblem, PoolSample, load_pool
from benchmarks.replay import (
    METRICS,
    ReplayConfig,
    policy_for,
    replay_pool,
    run_direct_order,
    run_lean_order,
)
from benchmarks.source import ReplaySource
from policies.literature import AdaptiveConsistency, EarlyStoppingSC
from tests.conftest_data import DATA, needs_data
from tests.test_replay import make_pool, tie_pool

SPECS = ("ac:threshold=0.95", "ac:threshold=0.8,max=all",
         "ac:threshold=0.9,criterion=dirichlet", "esc:window=5", "esc:window=2,max=6",
         "boinf:bayes_factor=30", "boinf:bayes_factor=5,max=all")
LATENCY = METRICS.index("latency")


def labelled(pool: Pool) -> Pool:
    """``pool`` with answer "a" labelled correct."""
    return Pool(pool.name, tuple(PoolProblem(p.problem, tuple(
        PoolSample(s.pred, s.pred == "a", s.tokens) for s in p.samples)) for p in pool.problems))


def compare(src: ReplaySource, spec: str, orders, **timing) -> tuple[int, int]:
    """Direct vs lean on each order: every metric equal (latency to rounding) where the
    direct engine replays the order; returns (orders replayed, orders handed over)."""
    policy = policy_for(spec, int(src.pool.arrays.n.max()))
    cfg = ReplayConfig(orders=1, **timing)
    direct = handed = 0
    for r in orders:
        got = run_direct_order(src, policy, r, cfg)
        want, errors = run_lean_order(src, policy, r, cfg)
        if got is None:
            handed += 1
            continue
        direct += 1
        row, err = got
        assert err == errors == 0
        for m, name in enumerate(METRICS):
            if m == LATENCY:
                np.testing.assert_allclose(row[m], want[m], rtol=1e-12, atol=1e-12,
                                           err_msg=f"{spec} order {r} {name}")
            else:
                np.testing.assert_array_equal(row[m], want[m],
                                              err_msg=f"{spec} order {r} {name}")
    return direct, handed


@pytest.mark.parametrize("spec", SPECS)
def test_direct_equals_lean_on_long_samples(spec):
    # 200-4000 tokens (as reasoning traces) at 7 tokens/s and a ttft: few exact ties; three
    # answers and some without one; 70 samples, so that a horizon of 64 does not run out
    rng = np.random.default_rng(9)
    rows = [[(None if rng.random() < 0.05 else str(rng.choice(list("aabc"))), False,
              int(rng.integers(200, 4000))) for _ in range(70)] for _ in range(12)]
    src = ReplaySource(labelled(make_pool(rows, name="long")), seed=4)
    direct, handed = compare(src, spec, range(12), ttft=0.3, decode_rate=7.0)
    assert direct >= 6, (direct, handed)


def instant_pool(seed: int, problems: int = 14, n: int = 70, tokens: tuple[int, int] = (1, 5)
                 ) -> Pool:
    """Samples of 1-4 tokens: samples of different requests of a problem (and of different
    problems) often finish at one instant; three answers and some without one; 70 samples,
    so that a horizon of 64 does not run out."""
    rng = np.random.default_rng(seed)
    rows = [[(None if rng.random() < 0.1 else str(rng.choice(list("aab c"))).strip() or None,
              False, int(rng.integers(*tokens))) for _ in range(n)] for _ in range(problems)]
    return labelled(make_pool(rows, name=f"instants{seed}"))


@pytest.mark.parametrize("spec", SPECS)
def test_direct_equals_lean_or_hands_over_where_samples_finish_together(spec):
    # what the direct engine replays must be exact; the rest is handed over (all of it, for
    # ESC's windows of 5 here: some window always has samples of two requests finishing
    # together with different answers, and windows follow completion order)
    total = [0, 0]
    for seed in range(4):
        for tokens in ((1, 5), (3, 9)):
            src = ReplaySource(instant_pool(seed, tokens=tokens), seed=seed)
            d, h = compare(src, spec, range(4), decode_rate=2.0)
            total[0] += d
            total[1] += h
    assert total[0] > 0 or spec == "esc:window=5"
    assert total[1] > 0 or spec.startswith(("ac", "boinf"))


@pytest.mark.parametrize("spec", ["ac:threshold=0.95", "esc:window=5"])
def test_near_simultaneous_finishes_and_instant_samples_are_handed_over(spec):
    # 2,000,000 tokens/s: samples a few tokens apart finish within TIE of each other
    # (beyond the loops' 1e-9 s batching), too close to be sure of the loops' order
    near = ReplaySource(instant_pool(0, tokens=(1000, 1004)), seed=0)
    assert compare(near, spec, range(3), decode_rate=2e6)[1] == 3
    # a sample of 0 tokens without a ttft finishes at the instant it is launched
    rows = [[("a", False, 0 if j % 3 == 0 else 5 + j) for j in range(70)] for _ in range(3)]
    zero = ReplaySource(labelled(make_pool(rows, name="zero")), seed=0)
    assert compare(zero, spec, range(2))[1] == 2


@pytest.mark.parametrize("spec", SPECS)
def test_direct_hands_over_when_the_pool_runs_out(spec):
    # 4-12 samples a problem: horizons of 64 (and ESC's windows) run them out
    for seed in (0, 1):
        src = ReplaySource(tie_pool(seed), seed=seed)
        compare(src, spec, range(3))


def test_same_instant_finishes_with_one_answer_or_an_order_free_rule_stay_direct():
    # two answers, 5-6 tokens at 1 token/s: requests of one problem often finish together
    rng = np.random.default_rng(3)
    rows = [[(str(rng.choice(list("ab"))), False, int(rng.integers(5, 7))) for _ in range(20)]
            for _ in range(10)]
    src = ReplaySource(labelled(make_pool(rows, name="instants")), seed=2)
    for spec in ("ac:threshold=0.95,max=all", "boinf:bayes_factor=30,max=all"):
        direct, _ = compare(src, spec, range(8), decode_rate=1.0)
        assert direct > 0, spec


@needs_data
@pytest.mark.parametrize("spec", ["ac:threshold=0.95", "ac:threshold=0.95,max=all",
                                  "esc:window=5", "boinf:bayes_factor=30"])
def test_direct_equals_lean_on_part_of_a_math500_pool(spec):
    src = ReplaySource(load_pool(DATA / "pools" / "boinf_math500_Qwen3-14B.jsonl", limit=150))
    direct, handed = compare(src, spec, range(6))
    assert direct >= 4, (direct, handed)


@needs_data
@pytest.mark.parametrize("spec", ["ac:threshold=0.95,max=all", "esc:window=5", "boinf"])
def test_direct_equals_lean_on_an_aime_pool(spec):
    src = ReplaySource(load_pool(DATA / "pools" / "boinf_aime2024_Phi-4-reasoning.jsonl"),
                       seed=5)
    direct, handed = compare(src, spec, range(6), ttft=0.5)
    assert direct >= 3, (direct, handed)


def test_an_answer_the_pool_does_not_label_is_ungraded_as_in_the_lean_engine():
    # answer "b" carries no label (correct None): the grader cannot say, correct is NaN
    rng = np.random.default_rng(5)
    rows = [[(str(rng.choice(list("ab"))), None, int(rng.integers(200, 4000)))
             for _ in range(70)] for _ in range(8)]
    pool = make_pool(rows, name="unlabelled")
    pool = Pool(pool.name, tuple(PoolProblem(p.problem, tuple(
        PoolSample(s.pred, True if s.pred == "a" else None, s.tokens) for s in p.samples))
        for p in pool.problems))
    src = ReplaySource(pool, seed=1)
    for spec in ("ac:threshold=0.95", "esc:window=5", "boinf"):
        direct, _ = compare(src, spec, range(4))
        assert direct > 0, spec
    row, _ = run_direct_order(src, policy_for("ac:threshold=0.95", 70), 0, ReplayConfig())
    assert np.isnan(row[METRICS.index("correct")]).any()


def test_direct_engine_is_chosen_by_type_and_setting():
    ac = AdaptiveConsistency()
    assert supports(ac) and supports(EarlyStoppingSC())
    assert not supports(ac, concurrency=2) and not supports(ac, chunks=3)

    class MyAC(AdaptiveConsistency):  # a subclass may decide differently
        __slots__ = ()

    assert not supports(MyAC())
    assert not supports(policy_for("adaptive"))


def test_replay_pool_uses_the_direct_engine_and_counts_the_hand_overs():
    src = ReplaySource(tie_pool(1), seed=1)
    specs = ["ac:threshold=0.9", "esc:window=3"]
    auto = replay_pool(src, specs, ReplayConfig(orders=5, workers=1))
    lean = replay_pool(src, specs, ReplayConfig(orders=5, workers=1, engine="lean"))
    for a, b in zip(auto, lean, strict=True):
        assert (a.engine, b.engine) == ("direct", "lean")
        for m in METRICS:
            np.testing.assert_allclose(getattr(a, m), getattr(b, m), rtol=1e-12, atol=1e-12,
                                       err_msg=f"{a.policy} {m}")
    handed = [o.notes for o in auto]
    assert any(handed), "tie pools send some orders to the lean engine"
    for notes in handed:
        for note in notes:
            assert "orders replayed by the lean engine" in note
    # worker processes give the same numbers
    forked = replay_pool(src, specs, ReplayConfig(orders=5, workers=2))
    for a, b in zip(auto, forked, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.correct, b.correct)
        assert a.notes == b.notes
