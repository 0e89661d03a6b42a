"""bench verifier (profile measured on labelled pools), the online pseudo-label estimate,
the simulated verifier's quality parameters, and compute-matched's saved scaling law."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from benchmarks.cli import main
from benchmarks.compute_matched import CompareConfig, compute_matched, joint_scaling
from benchmarks.pools import Pool, PoolProblem, PoolSample, PoolVerification
from benchmarks.source import ReplaySource, SimulatedVerifier
from benchmarks.verifier import measure_verifier, online_estimate, pool_readings
from orchestrator.errors import ConfigError
from orchestrator.history import ProblemRecord
from orchestrator.types import Problem
from policies.profile import VerifierProfile, auc


def v(p, tokens=6):
    return PoolVerification(p, tokens)


def toy_pool() -> Pool:
    """Two problems; each sample read twice (identical readings); answer 'a' is right."""
    p1 = (PoolSample("a", True, 10, verifications=(v(0.8), v(0.8))),
          PoolSample("a", True, 20, verifications=(v(0.6), v(0.6))),
          PoolSample("b", False, 30, verifications=(v(0.7), v(0.7))),
          PoolSample(None, False, 40))  # no answer: never read
    p2 = (PoolSample("a", True, 10, verifications=(v(0.3), v(0.3))),
          PoolSample("c", False, 10, verifications=(v(0.2), v(None, 2))),
          PoolSample("c", False, 10, verifications=(v(0.1), v(0.1))))
    return Pool("toy", (PoolProblem(Problem("p1", "q", "a"), p1),
                        PoolProblem(Problem("p2", "q", "a"), p2)))


def test_profile_of_a_recorded_pool_matches_hand_computation():
    src = ReplaySource(toy_pool())
    readings = pool_readings(src)
    assert len(readings) == 12 and sum(p is None for _, _, p in readings) == 1
    prof, report = measure_verifier([src], online_sizes=())
    # per-solution means: correct 0.8, 0.6, 0.3; wrong 0.7, 0.2, 0.1 -> 7 of 9 pairs won
    assert prof.auc == pytest.approx(auc([0.8, 0.6, 0.3], [0.7, 0.2, 0.1])) == \
        pytest.approx(7 / 9)
    assert prof.n_correct == 3 and prof.n_wrong == 3
    assert prof.parse_rate == pytest.approx(11 / 12)
    # lambda: mean verification tokens (11 x 6 + 2) / 12 over mean solution tokens 130 / 7
    assert prof.lam == pytest.approx(((11 * 6 + 2) / 12) / (130 / 7))
    assert prof.repeat_icc == pytest.approx(1.0) and prof.within_sd == pytest.approx(0.0)
    entry = report["pools"][0]
    assert entry["correct"]["n"] == 6 and entry["wrong"]["n"] == 5
    assert sum(entry["correct"]["histogram"]) == 6
    assert entry["correct"]["histogram"][8] == 2  # the two 0.8 readings
    # Best-of-N over the whole pool: p1 picks 'a' (0.8), p2 picks 'a' (0.3 > 0.2, 0.1)
    assert entry["bon_at_n"] == pytest.approx(1.0)
    assert entry["majority_at_n"] == pytest.approx(0.5)  # p2's majority is 'c'
    assert not report["simulated_verifier"]


def test_a_pool_without_readings_is_a_config_error():
    pool = Pool("plain", (PoolProblem(Problem("a", "q", "1"), (PoolSample("1", True, 3),)),))
    with pytest.raises(ConfigError, match="simulated-verifier"):
        measure_verifier([ReplaySource(pool)])


def record(pid, answer, readings, code="settled", keys=("a", "a", "b")):
    return ProblemRecord(pid, code, answer, keys, (10,) * len(keys), readings,
                         solution_tokens=10 * len(keys), verification_tokens=5 * len(readings))


def test_from_history_labels_readings_by_the_vote_majority():
    recs = [record("p1", "a", (("a", 0.9), ("b", 0.4))),
            # stopped with 'b' (a verifier's pick) although the votes are a, a, b: the
            # labels are the votes', so the high reading of 'b' is a pseudo-negative
            record("p2", "b", (("a", 0.8), ("b", 0.7))),
            record("p3", "a", (("a", 0.1), ("b", 0.95)), code="max"),  # not settled: ignored
            record("p4", "a", ()),
            # the top vote tied: no majority to label by, left out
            record("p5", "a", (("a", 0.99), ("b", 0.01)), keys=("a", "b"))]
    prof = VerifierProfile.from_history(recs)
    assert prof is not None
    assert prof.n_correct == 2 and prof.n_wrong == 2
    assert prof.auc == pytest.approx(auc([0.9, 0.8], [0.4, 0.7])) == 1.0
    assert prof.lam == pytest.approx(5 / 10)
    assert prof.repeat_icc is None and prof.within_sd is None
    assert VerifierProfile.from_history(recs[2:]) is None
    assert VerifierProfile.from_history(recs, settled=("settled", "max")).n_correct == 3


def test_online_estimate_equals_the_true_auc_when_majorities_are_right():
    # every problem's majority ('a', 5 of 8) is right, so pseudo-labels are true labels
    probs = []
    rng = np.random.default_rng(3)
    for i in range(12):
        samples = tuple(PoolSample("a" if j < 5 else "b", j < 5, 10,
                                   verifications=(v(float(rng.random())),))
                        for j in range(8))
        probs.append(PoolProblem(Problem(f"p{i}", "q", "a"), samples))
    src = ReplaySource(Pool("maj", tuple(probs)))
    (got,) = online_estimate(src, sizes=(8,), orders=3)
    assert got["settled_share"]["mean"] == 1.0
    assert got["pseudo_label_accuracy"]["mean"] == 1.0
    assert got["auc_pseudo"]["mean"] == pytest.approx(got["auc_true_same_readings"]["mean"])


def test_online_estimate_is_attenuated_when_majorities_are_wrong():
    # a perfect verifier, but the majority ('b') is wrong: pseudo-labels invert it
    probs = tuple(PoolProblem(Problem(f"p{i}", "q", "a"), tuple(
        PoolSample("a" if j < 3 else "b", j < 3, 10, verifications=(v(0.9 if j < 3 else 0.1),))
        for j in range(8))) for i in range(5))
    (got,) = online_estimate(ReplaySource(Pool("bad", probs)), sizes=(8,), orders=2)
    assert got["auc_true_same_readings"]["mean"] == 1.0
    assert got["auc_pseudo"]["mean"] == 0.0
    assert got["pseudo_label_accuracy"]["mean"] == 0.0


def labelled_pool(n_problems=40, n=16) -> Pool:
    return Pool("sim", tuple(PoolProblem(Problem(f"p{i}", "q", "1"), tuple(
        PoolSample(str(j % 3), j % 3 == 0, 10 + j) for j in range(n))) for i in range(n_problems)))


def test_simulated_verifier_quality_parameters():
    good = SimulatedVerifier((4, 2), (2, 4))
    assert good.auc() == pytest.approx(0.8968, abs=1e-3)
    assert SimulatedVerifier((2, 2), (2, 2)).auc() == pytest.approx(0.5, abs=1e-6)
    lab = good.label
    assert "simulated" in lab and "AUC 0.897" in lab
    with pytest.raises(ConfigError, match="corr"):
        SimulatedVerifier(corr=1.5)
    # the one-reading AUC measured on drawn readings agrees with the quadrature
    src = ReplaySource(labelled_pool(200), verifier=SimulatedVerifier((4, 2), (2, 4), vmax=1))
    prof, _ = measure_verifier([src], online_sizes=())
    assert prof.auc == pytest.approx(0.897, abs=0.02)
    assert prof.simulated


def test_within_solution_correlation_of_simulated_readings():
    pool = labelled_pool()
    same = ReplaySource(pool, verifier=SimulatedVerifier(vmax=4, corr=1.0)).verifier_arrays(4)
    assert np.allclose(same.p[..., 0:1], same.p)  # corr 1: every reading repeats the first
    indep = SimulatedVerifier(vmax=4, corr=0.0)
    mid = SimulatedVerifier(vmax=4, corr=0.6)
    icc = {}
    for sv in (indep, mid):
        src = ReplaySource(pool, verifier=sv)
        prof, _ = measure_verifier([src], online_sizes=())
        icc[sv.corr] = prof.repeat_icc
        va = src.verifier_arrays(4)
        good = va.p[src.pool.arrays.correct]
        assert good.mean() == pytest.approx(0.6, abs=0.02)  # the Beta(3,2) marginal is kept
    assert icc[0.0] < icc[0.6] < 1.0
    # corr 0: independent Beta draws, seeded by the seed, the pool's name and the problem
    a = ReplaySource(pool, verifier=indep).verifier_arrays(4).p[0, :16]
    rng = np.random.default_rng([0, 0x5EED, zlib.crc32(b"sim"), 0])
    pc, pw = rng.beta(3, 2, size=(16, 4)), rng.beta(2, 3, size=(16, 4))
    assert np.array_equal(a, np.where(pool.arrays.correct[0, :16, None], pc, pw))


def test_joint_scaling_law_and_compute_matched_profile(tmp_path):
    src = ReplaySource(labelled_pool(), verifier=SimulatedVerifier((4, 2), (2, 4), vmax=8))
    cfg = CompareConfig(bootstrap=10, sizes=(1, 2, 4, 8, 16), verifications=(1, 2, 4, 8))
    res = compute_matched(src, cfg)
    law = joint_scaling([res, res])
    assert law.lam == 1.0 and law.c_max == 128.0
    assert law.s_exp == pytest.approx(res["scaling"]["S_exponent"])
    assert law.s_coef == pytest.approx(res["scaling"]["S_coefficient"])
    assert law.verify_pays == (res["crossover_budget"] is not None)


def write_pool(path: Path) -> Path:
    rows = []
    for i in range(8):
        samples = [{"pred": "a" if (i + j) % 3 else "b", "correct": bool((i + j) % 3),
                    "tokens": 5 + j, "verifications": [{"p_yes": 0.7, "tokens": 2}] * 2}
                   for j in range(8)]
        rows.append({"id": f"p{i}", "problem": "q", "answer": "a", "samples": samples})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_verifier_compute_matched_profile_and_optimal_replay(tmp_path, capsys):
    pool = write_pool(tmp_path / "toy.jsonl")
    prof_path = tmp_path / "prof.json"
    assert main(["verifier", "--pool", str(pool), "--out", str(prof_path),
                 "--json", str(tmp_path / "v.json"), "--online-orders", "2"]) == 0
    out = capsys.readouterr().out
    assert "AUC 0.500" in out and "online estimate" in out
    prof = VerifierProfile.load(prof_path)
    assert prof.auc == 0.5 and prof.repeat_icc == 1.0 and not prof.simulated
    law_path = tmp_path / "law.json"
    assert main(["compute-matched", "--pool", str(pool), "--simulated-verifier",
                 "--sim-correct", "5,1", "--sim-wrong", "1,5", "--sim-vmax", "4",
                 "--bootstrap", "5", "--profile-out", str(law_path)]) == 0
    law_prof = VerifierProfile.load(law_path)
    assert law_prof.simulated and law_prof.scaling is not None
    assert "simulated" in capsys.readouterr().out
    rj = tmp_path / "r.json"
    assert main(["replay", "--pool", str(pool), "--simulated-verifier", "--sim-correct", "5,1",
                 "--sim-wrong", "1,5", "--sim-corr", "0.5", "--policy", "sc:n=all",
                 "--policy", f"optimal:c=12,profile={law_path}", "--orders", "2",
                 "--workers", "1", "--json", str(rj)]) == 0
    runs = json.loads(rj.read_text())["runs"]
    assert all("simulated" in r["verifier"] for r in runs)
    assert runs[1]["accuracy"] >= 0


def test_quality_sweep_end_to_end_on_small_pools(tmp_path):
    from benchmarks.quality_sweep import Quality, frontier, quality_sweep, sweep_markdown
    from benchmarks.replay import ReplayConfig

    def pool(name, shift):
        return Pool(name, tuple(PoolProblem(Problem(f"p{i}", "q", "1"), tuple(
            PoolSample(str((j + shift) % 3), (j + shift) % 3 == 0, 10 + j) for j in range(8)))
            for i in range(6)))

    cm = CompareConfig(sizes=(1, 2, 4, 8), verifications=(1, 2, 4), bootstrap=1, v_draws=2)
    rep = quality_sweep([pool("a", 0)], [pool("b", 1)], [Quality.parse("4,2/2,4")], [1.0],
                        ["sc:n=all", "optimal:c=4,profile={profile}"], [4, 16],
                        profile_dir=tmp_path, cm=cm,
                        replay=ReplayConfig(orders=2, workers=1, bootstrap=10), vmax=4)
    (s,) = rep["settings"]
    assert s["simulated_verifier"] and "simulated" in s["verifier"]
    assert s["one_reading_auc"] == pytest.approx(0.897, abs=1e-3)
    assert [r["policy"] for r in s["runs"]] == ["optimal:c=4", "optimal:c=16", "sc:n=all",
                                                 "optimal:c=4,profile={profile}"]
    # {profile} is the setting's fitted profile: the replayed optimal resolves as the exact
    assert s["runs"][3]["compute"] == pytest.approx(s["runs"][0]["compute"], rel=0.1)
    sc_all = s["runs"][2]
    assert sc_all["compute"] == pytest.approx(8.0)  # 8 mean-length solutions
    assert sc_all["best_fixed_at_compute"] == frontier(s["compute_matched"][0], 8.0)[0]
    for r, c in zip(s["runs"][:2], (4, 16), strict=True):
        s_opt, v_opt = r["allocation"]
        assert r["compute"] == s_opt * (1 + v_opt) <= c
        # a fixed allocation scores what the grid says for it (exactly for SC; GenRM with
        # fewer readings than recorded: Monte Carlo over which readings, so roughly)
        grid = {(g["S"], g["V"]): g["success"] for g in s["compute_matched"][0]["genrm"]}
        scs = {g["S"]: g["success"] for g in s["compute_matched"][0]["sc"]}
        want = scs.get(s_opt) if v_opt == 0 else grid.get((s_opt, v_opt))
        if want is not None:
            assert r["accuracy"] == pytest.approx(want, abs=1e-9 if v_opt == 0 else 0.1)
    text = sweep_markdown(rep)
    assert "SIMULATED" in text and "| `optimal:c=16 (S=" in text
    with pytest.raises(ConfigError, match="overlap"):
        quality_sweep([pool("a", 0)], [pool("a", 0)], [Quality.parse("4,2/2,4")], [1.0],
                      [], [4], profile_dir=tmp_path, cm=cm, replay=ReplayConfig(orders=1))
    with pytest.raises(ConfigError, match="A,B/C,D"):
        Quality.parse("4,2")
