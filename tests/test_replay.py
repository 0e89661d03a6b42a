"""The replay backend on a simulated clock, through the real runtime, and the sweep engines."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pools import Pool, PoolProblem, PoolSample, PoolVerification, load_pool
from benchmarks.replay import (
    FixedPlan,
    ReplayConfig,
    fixed_plan,
    horizon,
    replay_pool,
    summarise,
    sweep,
)
from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.backends.replay import PoolExhausted, ReplayBackend
from orchestrator.decisions import Sample, Stop
from orchestrator.errors import ConfigError
from orchestrator.events import SampleCancelled
from orchestrator.runtime import solve
from orchestrator.simclock import SimulatedClockLoop, simulated_runner
from orchestrator.types import Problem
from policies import GenRM, SelfConsistency
from tests.conftest_data import DATA, needs_data
from tests.helpers import StopAtFirst


def make_pool(problems: list[list[tuple[str | None, bool, int]]], name: str = "toy",
              **sample_kw) -> Pool:
    out = []
    for i, samples in enumerate(problems):
        prob = Problem(id=f"p{i}", problem=f"q{i}", answer="ok")
        out.append(PoolProblem(prob, tuple(
            PoolSample(pred=p, correct=c, tokens=t, **sample_kw) for p, c, t in samples)))
    return Pool(name, tuple(out))


def run_sim(coro):
    with simulated_runner() as runner:
        return runner.run(coro)



# ---- the simulated clock --------------------------------------------------------------------


def test_simulated_clock_jumps_to_the_next_timer():
    async def main():
        loop = asyncio.get_running_loop()
        assert isinstance(loop, SimulatedClockLoop)
        t0 = loop.time()
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(asyncio.sleep(3600, "a"))
            b = tg.create_task(asyncio.sleep(5, "b"))
        assert (a.result(), b.result()) == ("a", "b")
        return loop.time() - t0

    started = time.perf_counter()
    assert run_sim(main()) == pytest.approx(3600)
    # a hang guard, not a speed limit: a loop that really slept would take an hour
    assert time.perf_counter() - started < 600


# ---- the backend through the runtime -----------------------------------------------------------


def test_a_sample_finishes_ttft_plus_tokens_over_rate_after_it_starts():
    src = ReplaySource(make_pool([[("4", True, 100)]]))
    backend = ReplayBackend(src, decode_rate=50, ttft=0.5)
    result = run_sim(solve(src.problems[0], SelfConsistency(1), backend=backend, task=src.task))
    assert result.elapsed == pytest.approx(2.5)
    assert result.answer == "4" and result.correct is True
    assert result.usage.completion_tokens == 100 and not result.usage.estimated


def test_samples_are_served_without_replacement_in_the_seeded_order():
    pool = make_pool([[(str(j), j == 3, 1 + j) for j in range(10)]])
    src = ReplaySource(pool, seed=7)
    order = src.served_order("p0", 0)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert ReplaySource(pool, seed=7).served_order("p0", 0) == order
    assert src.served_order("p0", 1) != order
    backend = ReplayBackend(src, order=0)
    result = run_sim(solve(src.problems[0], SelfConsistency(10), backend=backend,
                           task=src.task, max_n=1))
    assert sorted(s.answer for s in result.solutions) == sorted(str(j) for j in range(10))
    assert backend.served("p0") == 10


def test_an_exhausted_pool_is_a_visible_failure_not_a_resample():
    src = ReplaySource(make_pool([[("4", True, 5), ("4", True, 6), ("5", False, 7)]]))
    backend = ReplayBackend(src)
    result = run_sim(solve(src.problems[0], SelfConsistency(5, max_failures=2),
                           backend=backend, task=src.task, max_n=1))
    assert len(result.solutions) == 3
    failed = [f for f in result.failed if f.reason == "failed"]
    assert len(failed) == 4 and all(isinstance(f.error, PoolExhausted) for f in failed)
    assert result.answer == "4" and "too many failed samples" in result.reason


def test_a_cancelled_sample_is_charged_the_tokens_generated_until_the_cut():
    src = ReplaySource(make_pool([[("4", True, 10), ("5", False, 100), ("6", False, 40)]]))
    backend = ReplayBackend(src, decode_rate=10, ttft=0.5)
    events = []
    result = run_sim(solve(src.problems[0], StopAtFirst(3), backend=backend, task=src.task,
                           max_n=1, sinks=[events.append]))
    # the 10-token sample ends at 0.5 + 1.0 s; the others are cut then, 10 tokens each
    assert result.answer == "4" and result.elapsed == pytest.approx(1.5)
    cut = sorted(e.sample.completion_tokens for e in events if isinstance(e, SampleCancelled))
    assert cut == [10, 10]
    assert result.usage.completion_tokens == 30 == backend.generated_tokens
    assert backend.aborted_streams == 2 and backend.open_streams == 0


def test_cancellation_charge_is_proportional_to_elapsed_time():
    src = ReplaySource(make_pool([[("4", True, 7), ("5", False, 1000)]]))
    backend = ReplayBackend(src, decode_rate=3.0)
    result = run_sim(solve(src.problems[0], StopAtFirst(2), backend=backend, task=src.task,
                           max_n=1))
    # cut at 7/3 s: floor(7/3 * 3) = 7 tokens of the long sample
    assert result.usage.completion_tokens == 14 == backend.generated_tokens


def test_the_policy_sees_in_flight_progress_at_every_decision():
    src = ReplaySource(make_pool([[("4", True, 10), ("4", True, 30), ("4", True, 50)]]))
    seen = []

    @dataclass(frozen=True)
    class Spy:
        spec: str = "spy"

        def decide(self, s):
            seen.append((len(s.solutions), sorted(s.in_flight.sample_tokens),
                         s.usage.completion_tokens))
            return SelfConsistency(3).decide(s)

    run_sim(solve(src.problems[0], Spy(), backend=ReplayBackend(src, decode_rate=10),
                  task=src.task, max_n=1))
    assert seen == [(0, [], 0), (1, [10, 10], 30), (2, [30], 70), (3, [], 90)]


def test_verifications_return_the_recorded_p_yes_and_run_out_visibly():
    ver = (PoolVerification(0.9, 4), PoolVerification(0.7, 6))
    pool = make_pool([[("4", True, 10), ("5", False, 10)]], verifications=ver)
    src = ReplaySource(pool)
    result = run_sim(solve(src.problems[0], GenRM(2, 3), backend=ReplayBackend(src),
                           task=src.task, max_n=1))
    ps = sorted(v.p_yes for v in result.verifications)
    assert ps == pytest.approx([0.7, 0.7, 0.9, 0.9])
    assert all(v.source == "logprobs" for v in result.verifications)
    assert result.verification_tokens == 20 and result.lam == pytest.approx(0.5)
    exhausted = [f for f in result.failed if f.kind == "verify"]
    assert len(exhausted) == 2 and all(isinstance(f.error, PoolExhausted) for f in exhausted)


def test_a_single_p_yes_reading_is_a_deterministic_verifier():
    pool = Pool("cap", (PoolProblem(Problem("p0", "q", "Paris"), (
        PoolSample("Paris", True, 2, p_yes=0.2), PoolSample("Lyon", False, 2, p_yes=0.8))),))
    src = ReplaySource(pool, verify_tokens=1)
    result = run_sim(solve(src.problems[0], GenRM(2, 2), backend=ReplayBackend(src),
                           task=src.task, max_n=1))
    assert result.answer == "Lyon" and result.correct is False  # a bad verifier, trusted
    assert result.verification_tokens == 4


# ---- the engines ---------------------------------------------------------------------------------


def random_pool(seed: int, problems: int = 12, n: int = 9, keys: str = "ab") -> Pool:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(problems):
        rows.append([(str(rng.choice(list(keys))), False, int(rng.integers(1, 60)))
                     for _ in range(n)])
    pool = make_pool(rows)
    # label "a" correct
    return Pool(pool.name, tuple(PoolProblem(p.problem, tuple(
        PoolSample(s.pred, s.pred == "a", s.tokens) for s in p.samples)) for p in pool.problems))


@pytest.mark.parametrize("concurrency", [None, 2])
def test_vectorised_engine_matches_the_runtime_exactly(concurrency):
    # two answers and odd sample counts: no vote can tie, so even the tie rules agree
    src = ReplaySource(random_pool(1), seed=3)
    specs = ["sc:n=1", "sc:n=3", "sc:n=all"]
    cfg = ReplayConfig(orders=3, workers=1, concurrency=concurrency, ttft=0.25, decode_rate=7)
    fast = replay_pool(src, specs, cfg)
    slow = replay_pool(src, specs, ReplayConfig(orders=3, workers=1, concurrency=concurrency,
                                                ttft=0.25, decode_rate=7, engine="runtime"))
    for f, s in zip(fast, slow, strict=True):
        assert (f.engine, s.engine) == ("vectorised", "runtime")
        for metric in ("correct", "tokens", "samples", "latency", "cancelled"):
            np.testing.assert_allclose(getattr(f, metric), getattr(s, metric), err_msg=metric)


def test_vectorised_genrm_matches_the_runtime_with_a_simulated_verifier():
    src = ReplaySource(random_pool(2, keys="abc"), seed=1,
                       verifier=SimulatedVerifier(lam=0.5, vmax=3))
    specs = ["genrm:s=3,v=2", "genrm:s=all,v=4"]  # v=4 > vmax: one verification runs out
    fast = replay_pool(src, specs, ReplayConfig(orders=2, workers=1, ttft=0.1))
    slow = replay_pool(src, specs, ReplayConfig(orders=2, workers=1, ttft=0.1, engine="runtime"))
    for f, s in zip(fast, slow, strict=True):
        for metric in ("correct", "tokens", "samples", "latency", "verify_tokens",
                       "verifications"):
            np.testing.assert_allclose(getattr(f, metric), getattr(s, metric), err_msg=metric)
    # s=3 answered solutions x 2 verifications each, at most; the split adds up
    assert 0 < fast[0].verifications.max() <= 6
    assert (fast[0].verify_tokens > 0).any()
    assert (fast[1].verifications <= 3 * fast[1].samples).all()
    runs = summarise(fast, ReplayConfig(orders=2, bootstrap=50))
    for r, o in zip(runs, fast, strict=True):
        assert r["solution_tokens_per_problem"] + r["verification_tokens_per_problem"] == \
            pytest.approx(r["tokens_per_problem"])
        assert r["verifications_per_problem"] == pytest.approx(o.verifications.mean())


def test_worker_processes_give_the_same_numbers():
    src = ReplaySource(random_pool(4), seed=2)
    one = replay_pool(src, ["ac:threshold=0.9", "esc:window=3"], ReplayConfig(orders=4, workers=1))
    two = replay_pool(src, ["ac:threshold=0.9", "esc:window=3"], ReplayConfig(orders=4, workers=2))
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.correct, b.correct)


def test_replay_is_deterministic_under_a_seed():
    pool = random_pool(5, keys="abc")

    def runs(seed):
        rep = sweep([ReplaySource(pool, seed=seed)], ["sc:n=3", "ac:threshold=0.9,max=9"],
                    ReplayConfig(orders=3, seed=seed, workers=1, bootstrap=200))
        return rep["runs"]

    assert runs(11) == runs(11)
    assert [r["tokens_per_problem"] for r in runs(11)] != [r["tokens_per_problem"]
                                                          for r in runs(12)]


def test_summary_schema_and_paired_comparison():
    src = ReplaySource(random_pool(6), seed=0)
    cfg = ReplayConfig(orders=2, workers=1, bootstrap=300)
    runs = summarise(replay_pool(src, ["sc:n=1", "sc:n=all"], cfg), cfg)
    for r in runs:
        assert {"pool", "policy", "problems", "orders", "accuracy", "accuracy_ci95",
                "tokens_per_problem", "samples_per_problem", "latency_per_problem"} <= set(r)
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert r["problems"] == 12 and r["orders"] == 2 and r["pool"] == "toy"
        assert r["verification_tokens_per_problem"] == 0 == r["verifications_per_problem"]
        assert r["solution_tokens_per_problem"] == r["tokens_per_problem"]
    assert "vs" not in runs[0] and runs[1]["vs"]["policy"] == "sc:n=1"
    assert runs[1]["vs"]["tokens_ratio"] == pytest.approx(
        runs[1]["tokens_per_problem"] / runs[0]["tokens_per_problem"])


def test_fixed_plans_are_chosen_by_type_and_all_is_the_pool_size():
    from policies.literature import AdaptiveConsistency

    assert fixed_plan("sc:n=all", 80) == FixedPlan("sc", 80)
    assert fixed_plan("sc:n=8") == FixedPlan("sc", 8) == fixed_plan(SelfConsistency(8))
    assert fixed_plan("genrm:s=all,v=2", 80) == FixedPlan("genrm", 80, 2)
    assert fixed_plan(GenRM(3, 1)) == FixedPlan("genrm", 3, 1)
    assert fixed_plan("sc:n=8,max_failures=2") is None  # not fixed: the lean engine
    assert fixed_plan("ac") is None and fixed_plan(AdaptiveConsistency()) is None

    class MySC(SelfConsistency):  # a subclass may decide differently: not vectorised
        pass

    assert fixed_plan(MySC(4)) is None
    with pytest.raises(ConfigError, match="pool size"):
        fixed_plan("sc:n=all")  # 'all' needs a pool size
    assert horizon("sc:n=all", 80) == "all (80)" == horizon("ac:max=all", 80)
    assert horizon("ac", 80) == "64" == horizon(AdaptiveConsistency(), 80)


def test_replay_takes_policy_objects():
    from policies.literature import AdaptiveConsistency

    src = ReplaySource(random_pool(8), seed=1)
    cfg = ReplayConfig(orders=2, workers=1)
    by_spec = replay_pool(src, ["sc:n=3", "ac:threshold=0.9"], cfg)
    by_obj = replay_pool(src, [SelfConsistency(3), AdaptiveConsistency(threshold=0.9)], cfg)
    assert [o.engine for o in by_obj] == ["vectorised", "direct"]
    assert [o.policy for o in by_obj] == ["sc:n=3", "ac:threshold=0.9,max=64"]
    for a, b in zip(by_spec, by_obj, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.correct, b.correct)
    with pytest.raises(ConfigError, match="given twice"):
        replay_pool(src, ["sc:n=3", "sc:n=3"], cfg)


def test_fixed_plans_and_spec_errors():
    src = ReplaySource(random_pool(7))
    with pytest.raises(ConfigError, match="needs verifications"):
        replay_pool(src, ["genrm:s=2,v=1"], ReplayConfig(orders=1, workers=1))
    with pytest.raises(ConfigError, match="unknown policy"):
        replay_pool(src, ["nope"], ReplayConfig(orders=1, workers=1))


# ---- the shipped pools -----------------------------------------------------------------

#: maj@N from the data README (most frequent whitespace-stripped pred over all samples)
README_MAJ = {
    "AM-Thinking-v1": 0.900, "Datarus-R1-14B-preview": 0.733, "EXAONE-Deep-32B": 0.867,
    "LIMO-v2": 0.800, "MetaStone-S1-32B": 0.867, "NVIDIA-Nemotron-Nano-9B-v2": 0.867,
    "Phi-4-reasoning": 0.867, "Qwen3-14B": 0.867, "Qwen3-30B-A3B-Thinking-2507": 0.933,
    "Qwen3-4B": 0.800, "gpt-oss-20b": 0.900,
}


@needs_data
def test_sc_all_reproduces_each_aime_pool_majority_vote_exactly():
    from benchmarks.replay import _votes, full_majority

    cfg = ReplayConfig(orders=3, workers=1, bootstrap=100)
    for model, maj in README_MAJ.items():
        src = ReplaySource(load_pool(DATA / "pools" / f"boinf_aime2024_{model}.jsonl"))
        a = src.pool.arrays
        full = full_majority(src)
        kc = a.key_correct[np.arange(len(full)), full] & (full >= 0)
        assert round(float(kc.mean()), 3) == maj, model  # maj@N, the agreement reference
        (out,) = replay_pool(src, ["sc:n=all"], cfg)
        # off exact ties sc:n=all answers maj@N in every order; on a tie the answer whose
        # first vote finished first wins (the policies' rule), which depends on the order
        counts = _votes(a.key[None], a.valid[None], a.key_correct.shape[1])[0]
        tied = (counts == counts.max(-1, keepdims=True)).sum(-1) > 1
        assert np.all(out.correct[:, ~tied] == kc[~tied]), model
        assert np.all(out.samples == src.pool.arrays.n)


@needs_data
@pytest.mark.parametrize("concurrency", [1, 16])
def test_ac_and_esc_run_on_an_aime_pool(concurrency):
    src = ReplaySource(load_pool(DATA / "pools" / "boinf_aime2024_Qwen3-4B.jsonl"))
    cfg = ReplayConfig(orders=2, workers=1, concurrency=concurrency, bootstrap=100)
    runs = summarise(replay_pool(src, ["sc:n=all", "ac:threshold=0.95", "esc:window=5"], cfg),
                     cfg)
    sc, ac, esc = runs
    for r in (ac, esc):
        assert r["engine"] == "runtime" and "errors" not in r
        assert 4 <= r["samples_per_problem"] < sc["samples_per_problem"]
        assert r["tokens_per_problem"] < 0.5 * sc["tokens_per_problem"]
        assert r["accuracy"] >= sc["accuracy"] - 0.1


# ---- the lean engine: identical to the runtime ---------------------------------------------
REPO = Path(__file__).resolve().parent.parent
#: a verifier profile whose scaling law prefers GenRM at c=32 and SC at c=4 (in the repo)
LAW = REPO / "benchmarks" / "results" / "profiles" / "quality_sweep" / "sim_c4-2_w2-4_lam1.json"
#: specs replayed for each registered policy (every registered name must appear)
IDENTITY_SPECS = {
    "sc": ["sc:n=3", "sc:n=all", "sc:n=5,max_failures=1"],
    "genrm": ["genrm:s=3,v=2", "genrm:s=all,v=1"],
    "ac": ["ac:threshold=0.9", "ac:threshold=0.95,max=all", "ac:criterion=dirichlet,max=8"],
    "esc": ["esc:window=3", "esc:window=2,max=all"],
    "boinf": ["boinf:bayes_factor=10", "boinf:max=all"],
    "adaptive": ["adaptive:width=2,wide=6,max=12,min_votes=2", "adaptive:max=all,width=3",
                 "adaptive:learn=false,wide=4,width=4",
                 "adaptive:rivals=all,width=2,wide=6,max=12,min_votes=2"],
    "optimal": [f"optimal:c=32,profile={LAW}", f"optimal:c=4,profile={LAW}"],
    "verify-contested": ["verify-contested:width=2,max=10,explore=2",
                         f"verify-contested:width=3,max=all,profile={LAW}"],
    "solverify": ["solverify:width=2,max=10,explore=2,min_auc=0.3",
                  f"solverify:width=3,profile={LAW}"],
}


def _runtime_order(src, policy, order, cfg, history):
    from benchmarks.replay import _run_problems

    with asyncio.Runner(loop_factory=SimulatedClockLoop) as runner:
        return runner.run(_run_problems(src, policy, order, cfg, history))


def assert_identical(src, spec, orders, **timing):
    """Every per-problem SolveResult (all fields) and the run history, lean vs runtime."""
    from benchmarks.engine import run_order
    from benchmarks.replay import policy_for
    from orchestrator.history import RunHistory

    policy = policy_for(spec, int(src.pool.arrays.n.max()))
    cfg = ReplayConfig(orders=1, **timing)
    for r in orders:
        h_rt, h_lean = RunHistory(), RunHistory()
        slow = _runtime_order(src, policy, r, cfg, h_rt)
        fast = run_order(src, policy, r, decode_rate=cfg.decode_rate, ttft=cfg.ttft,
                         chunks=cfg.chunks, history=h_lean)
        for a, b in zip(slow, fast, strict=True):
            assert a == b, (spec, r, a.problem.id, a.to_dict(), b.to_dict())
        assert h_rt.records == h_lean.records, (spec, r)


def tie_pool(seed: int, problems: int = 14) -> Pool:
    """Short samples (1-4 tokens: many exact-time ties within and across problems), three
    answers and some without one, pools of 4-12 samples (some run out)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(problems):
        n = int(rng.integers(4, 13))
        rows.append([(None if rng.random() < 0.1 else str(rng.choice(list("aab c"))).strip()
                      or None, False, int(rng.integers(1, 5))) for _ in range(n)])
    pool = make_pool(rows, name=f"ties{seed}")
    return Pool(pool.name, tuple(PoolProblem(p.problem, tuple(
        PoolSample(s.pred, s.pred == "a", s.tokens) for s in p.samples)) for p in pool.problems))


def test_every_registered_policy_has_identity_specs():
    from policies import registered

    assert {e.name for e in registered()} == set(IDENTITY_SPECS)


@pytest.mark.parametrize("name", sorted(IDENTITY_SPECS))
def test_lean_engine_is_identical_to_the_runtime_on_tied_toy_pools(name):
    for seed in (0, 1):
        src = ReplaySource(tie_pool(seed), seed=seed,
                           verifier=SimulatedVerifier(lam=0.5, vmax=3, seed=seed))
        for spec in IDENTITY_SPECS[name]:
            assert_identical(src, spec, range(3))


@pytest.mark.parametrize("name", ["adaptive", "esc", "verify-contested", "solverify"])
def test_lean_engine_is_identical_with_ttft_chunks_and_long_samples(name):
    src = ReplaySource(random_pool(9, problems=10, n=11, keys="abc"), seed=4,
                       verifier=SimulatedVerifier(vmax=2, corr=0.5))
    for spec in IDENTITY_SPECS[name]:
        assert_identical(src, spec, range(3), ttft=0.3, decode_rate=7.0, chunks=3)


@needs_data
@pytest.mark.parametrize("spec", ["adaptive", "adaptive:max=all", "esc", "verify-contested",
                                  "solverify", "genrm:s=8,v=2"])
def test_lean_engine_is_identical_on_the_capitals_pool(spec):
    # every capitals sample is 1-3 tokens long: whole batches of problems finish at the same
    # simulated instant, and what adaptive learns from the run depends on asyncio's order
    src = ReplaySource(load_pool(DATA / "pools" / "live_capitals_gemma3-270m.jsonl"))
    assert_identical(src, spec, range(1))


@needs_data
@pytest.mark.parametrize("spec", ["adaptive", "ac:threshold=0.95,max=all", "esc:window=5",
                                  "boinf", f"solverify:profile={LAW}", "verify-contested",
                                  "adaptive:rivals=all"])
def test_lean_engine_is_identical_on_an_aime_pool(spec):
    src = ReplaySource(load_pool(DATA / "pools" / "boinf_aime2024_Phi-4-reasoning.jsonl"),
                       seed=5, verifier=SimulatedVerifier(seed=5))
    assert_identical(src, spec, range(2))


@needs_data
def test_lean_engine_is_identical_on_part_of_a_math500_pool():
    src = ReplaySource(load_pool(DATA / "pools" / "boinf_math500_Qwen3-14B.jsonl", limit=120))
    for spec in ("adaptive", "ac:threshold=0.95"):
        assert_identical(src, spec, range(1))


class _SampleThenStop:
    """Two samples; once one is in, one more launched together with the Stop."""

    spec = "sample-then-stop"

    def decide(self, snapshot):
        if not snapshot.solutions:
            return [] if snapshot.in_flight.samples else [Sample(2)]
        s = snapshot.solutions[0]
        return [Sample(1), Stop(s.answer, "first", s.key)]


def test_lean_engine_is_identical_for_work_launched_with_the_stop():
    """The request launched with the Stop is closed as cancelled in both (its samples in
    ``failed``), and the results agree field by field."""
    from benchmarks.engine import run_order
    from orchestrator.history import RunHistory

    src = ReplaySource(tie_pool(5), seed=2)
    cfg = ReplayConfig(orders=1)
    for r in range(3):
        h_rt, h_lean = RunHistory(), RunHistory()
        slow = _runtime_order(src, _SampleThenStop(), r, cfg, h_rt)
        fast = run_order(src, _SampleThenStop(), r, history=h_lean)
        assert slow == fast and h_rt.records == h_lean.records
        assert all(any(f.request_id == 1 and f.reason == "cancelled" for f in x.failed)
                   for x in slow if x.solutions)


def test_bench_engines_agree_and_auto_uses_the_direct_and_lean_engines():
    src = ReplaySource(tie_pool(3), seed=1, verifier=SimulatedVerifier(vmax=2))
    specs = ["sc:n=all", "ac:threshold=0.9", "adaptive:width=2,max=8",
             "solverify:width=2,explore=1,min_auc=0.3"]
    runs = {e: replay_pool(src, specs, ReplayConfig(orders=3, workers=1, engine=e))
            for e in ("auto", "lean", "runtime")}
    assert [o.engine for o in runs["auto"]] == ["vectorised", "direct", "lean", "lean"]
    assert {o.engine for o in runs["lean"]} == {"lean"}
    for a, b in zip(runs["lean"], runs["runtime"], strict=True):
        for metric in ("correct", "tokens", "samples", "latency", "cancelled", "agree",
                       "verify_tokens", "verifications"):
            np.testing.assert_array_equal(getattr(a, metric), getattr(b, metric),
                                          err_msg=f"{a.policy} {metric}")
        assert a.errors == b.errors
    for a, b in zip(runs["auto"], runs["lean"], strict=True):  # vectorised and direct: the
        for metric in ("correct", "tokens", "samples", "latency", "cancelled", "agree",
                       "verify_tokens", "verifications"):  # same numbers, time to rounding
            np.testing.assert_allclose(getattr(a, metric), getattr(b, metric), rtol=1e-12,
                                       err_msg=f"{a.policy} {metric}")
    # under a concurrency cap the lean engine hands over to the runtime
    capped = replay_pool(src, ["ac:threshold=0.9"], ReplayConfig(orders=1, workers=1,
                                                                concurrency=1, engine="lean"))
    assert capped[0].engine == "runtime"


# ---- the vectorised engine's shortcuts: the same numbers as the plain computation ----------
@pytest.mark.parametrize("seed", range(6))
def test_row_argsort_is_the_stable_argsort_wherever_it_matters(seed):
    from benchmarks.source import _argsort_rows

    rng = np.random.default_rng(seed)
    u = rng.random((40, 30))
    u[rng.random(u.shape) < 0.2] = np.inf  # padding: equal infinities
    tied = rng.random(40) < 0.5  # rows with equal finite values too
    u[tied, ::3] = np.round(u[tied, ::3], 1)
    u[tied, 1] = u[tied, 4]
    got, want = _argsort_rows(u), np.argsort(u, axis=1, kind="stable")
    finite = np.isfinite(np.take_along_axis(u, want, axis=1))
    assert np.array_equal(np.where(finite, got, -1), np.where(finite, want, -1))
    assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1))  # a permutation


def test_served_orders_are_the_stable_sort_of_the_seeded_draws():
    pool = random_pool(3, problems=9, n=11)
    rows = [list(pp.samples[: int(i % 4) + 8]) for i, pp in enumerate(pool.problems)]
    pool = Pool(pool.name, tuple(PoolProblem(pp.problem, tuple(r))
                                 for pp, r in zip(pool.problems, rows, strict=True)))
    src = ReplaySource(pool, seed=2)
    a = pool.arrays
    for r in range(20):
        u = np.random.default_rng([2, r]).random(a.shape)
        u[~a.valid] = np.inf
        want = np.argsort(u, axis=1, kind="stable").astype(np.int32)
        want[~np.take_along_axis(a.valid, want, axis=1)] = -1
        got = src.orders(r)
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("concurrency", [None, 2])
def test_vectorised_sc_on_the_drawn_positions_only_equals_every_position(concurrency):
    from benchmarks.replay import _vector_sc

    src = ReplaySource(tie_pool(4, problems=20), seed=1)
    cfg = ReplayConfig(orders=6, concurrency=concurrency, ttft=0.2)
    for n in (1, 2, 3, 5, 8, 12, None):
        plan = fixed_plan(f"sc:n={'all' if n is None else n}", int(src.pool.arrays.n.max()))
        assert plan is not None
        trimmed, full = _vector_sc(src, plan, cfg), _vector_sc(src, plan, cfg, trim=False)
        assert trimmed.keys() == full.keys()
        for k in full:
            assert trimmed[k].dtype == full[k].dtype and np.array_equal(trimmed[k], full[k]), k
