"""The quality sweep's curve analysis on hand-built settings (numbers worked out by hand)."""

from __future__ import annotations

import pytest

from benchmarks.sweep_analysis import (
    analysis_markdown,
    cross_validate,
    curve_name,
    curves,
    frontier_gaps,
    genrm_grid,
    point_name,
    verification_savings,
)


def test_curve_and_point_names():
    assert curve_name("solverify:profile={profile},settle=0.99") == "solverify:profile"
    assert point_name("solverify:profile={profile},settle=0.99") == "settle=0.99"
    assert curve_name("solverify:settle=0.9,profile=/x/y.json,min_gain=0.01") == \
        "solverify:profile"
    assert point_name("solverify:settle=0.9,profile=/x/y.json,min_gain=0.01") == \
        "settle=0.9,min_gain=0.01"
    assert (curve_name("solverify"), point_name("solverify")) == ("solverify", "default")
    assert curve_name("verify-contested:floor=0.1") == "verify-contested"


def cm(pool, sc, genrm):
    return {"pool": pool, "sc": [{"S": s, "C": float(s), "success": a} for s, a in sc],
            "genrm": [{"S": s, "V": v, "C": s * (1 + v), "success": a} for s, v, a in genrm]}


def run(pool, spec, acc, compute, vcomp, best):
    return {"pool": pool, "policy": spec, "accuracy": acc, "compute": compute,
            "verify_compute": vcomp, "best_fixed_at_compute": best, "engine": "runtime"}


def setting(runs, auc=0.9, lam=1.0):
    # two pools, the same grid on both: SC 1 -> 0.5, 4 -> 0.6, 16 -> 0.7; GenRM(4, 1) 0.65
    # at C=8, GenRM(4, 4) 0.8 at C=20, GenRM(16, 4) 0.8 at C=80 (ties the best: costlier)
    grid = [(4, 1, 0.65), (4, 4, 0.8), (16, 4, 0.8)]
    sc = [(1, 0.5), (4, 0.6), (16, 0.7)]
    return {"verifier": "simulated x", "one_reading_auc": auc, "lambda": lam,
            "compute_matched": [cm("a", sc, grid), cm("b", sc, grid)], "runs": runs}


def test_frontier_gaps_compare_the_best_affordable_point_with_the_best_fixed():
    st = setting([])
    pts = [{"compute": 4.0, "accuracy": 0.62}, {"compute": 10.0, "accuracy": 0.7}]
    gaps = frontier_gaps(pts, st, levels=(2.0, 4.0, 8.0, 16.0))
    assert [g["C"] for g in gaps] == [4.0, 8.0, 10.0]  # the curve's range only
    assert [round(g["best_fixed"], 3) for g in gaps] == [0.6, 0.65, 0.65]
    assert [round(g["accuracy"], 3) for g in gaps] == [0.62, 0.62, 0.7]
    assert [round(g["gap_pp"], 1) for g in gaps] == [2.0, -3.0, 5.0]


def test_verification_savings_against_the_cheapest_genrm_that_reaches_the_accuracy():
    st = setting([])
    assert [g["verify_compute"] for g in genrm_grid(st)] == [4.0, 16.0, 64.0]
    pts = [{"spec": "p1", "point": "p1", "accuracy": 0.64, "verify_compute": 0.5},
           {"spec": "p2", "point": "p2", "accuracy": 0.8, "verify_compute": 3.0},
           {"spec": "p3", "point": "p3", "accuracy": 0.85, "verify_compute": 6.0}]
    got = verification_savings(pts, st)
    rows = {r["point"]: r for r in got["points"]}
    assert rows["p1"]["genrm"] == "genrm:s=4,v=1" and rows["p1"]["ratio"] == pytest.approx(8)
    assert rows["p2"]["genrm"] == "genrm:s=4,v=4" and rows["p2"]["ratio"] == pytest.approx(16 / 3)
    assert rows["p3"]["genrm"] is None and rows["p3"]["ratio"] is None  # beyond the grid
    goal = got["goal"]
    # the best GenRM is (4, 4) at 16 verification units (not the costlier tie (16, 4));
    # the cheapest point reaching 0.8 is p2 at 3 units: 5.3x
    assert goal["best_genrm"] == "genrm:s=4,v=4" and goal["point"] == "p2"
    assert goal["ratio"] == pytest.approx(16 / 3) and goal["met"]
    assert goal["pools_reached"] == [0, 0]  # no per-pool runs of p2 in this setting
    # per pool: p2 reaches GenRM(4, 4)'s 0.8 on pool a, not on b (the mean 0.8 hides it)
    st = setting([run("a", "p2", 0.9, 10.0, 3.0, 0.8), run("b", "p2", 0.7, 10.0, 3.0, 0.8)])
    assert verification_savings(pts, st)["goal"]["pools_reached"] == [1, 2]
    pts[1]["verify_compute"] = 4.5  # 3.6x: not met
    assert not verification_savings(pts, st)["goal"]["met"]
    assert verification_savings(pts[:1], st)["goal"]["point"] is None  # never reached


def test_cross_validation_scores_the_choice_on_held_out_cells_only():
    # point "x" wins on pool a, "y" on pool b: leave-one-pool-out picks the other pool's
    # winner, so its held-out Δ is the loser's on each pool
    deltas = {("a", "x"): 3.0, ("a", "y"): 1.0, ("b", "x"): -2.0, ("b", "y"): 0.5}
    runs = []
    for (pool, point), d in deltas.items():
        spec = "solverify:profile={profile}" + ("" if point == "x" else ",settle=0.99")
        runs.append(run(pool, spec, 0.7 + d / 100, 10.0, 1.0, 0.7))
    rep = {"settings": [setting(runs, auc=0.6), setting(runs, auc=0.9)]}
    cv = cross_validate(rep, "solverify:profile")
    assert cv["points"] == ["default", "settle=0.99"]
    assert cv["in_sample"]["default"] == pytest.approx(0.5)
    assert cv["in_sample"]["settle=0.99"] == pytest.approx(0.75)
    folds = {f["held_out"]: f for f in cv["pool"]["folds"]}
    assert folds["a"]["chosen"] == "settle=0.99" and folds["b"]["chosen"] == "default"
    assert folds["a"]["held_out_delta_pp"] == pytest.approx(1.0)
    assert folds["b"]["held_out_delta_pp"] == pytest.approx(-2.0)
    assert cv["pool"]["held_out_delta_pp"] == pytest.approx(-0.5)
    assert cv["pool"]["default_delta_pp"] == pytest.approx(0.5)
    # the two AUC levels hold the same cells: each fold picks the overall winner
    assert {f["chosen"] for f in cv["auc"]["folds"]} == {"settle=0.99"}
    assert cv["lambda"]["folds"] == []  # one λ: nothing to hold out
    assert cross_validate(rep, "adaptive") is None
    # two λ: "x" wins at λ 0.5, "y" at λ 2; leaving one λ out picks the other's winner
    by_lam = {0.5: {"x": 2.0, "y": 1.0}, 2.0: {"x": -1.0, "y": 0.0}}
    settings = []
    for lam, ds in by_lam.items():
        rs = [run(pool, "solverify:profile={profile}" + ("" if pt == "x" else ",settle=0.99"),
                  0.7 + d / 100, 10.0, 1.0, 0.7) for pool in ("a", "b") for pt, d in ds.items()]
        settings.append(setting(rs, lam=lam))
    cv = cross_validate({"settings": settings}, "solverify:profile")
    folds = {f["held_out"]: f for f in cv["lambda"]["folds"]}
    assert folds[0.5]["chosen"] == "settle=0.99" and folds[2.0]["chosen"] == "default"
    assert cv["lambda"]["held_out_delta_pp"] == pytest.approx((1.0 - 1.0) / 2)
    assert cv["lambda"]["default_delta_pp"] == pytest.approx((2.0 - 1.0) / 2)


def test_curves_and_markdown_from_a_setting():
    runs = [run("a", "solverify:profile=/p.json", 0.62, 4.0, 0.5, 0.6),
            run("b", "solverify:profile=/p.json", 0.62, 4.0, 0.5, 0.6),
            run("a", "solverify:profile=/p.json,settle=0.99", 0.8, 10.0, 3.0, 0.65),
            run("b", "solverify:profile=/p.json,settle=0.99", 0.8, 10.0, 3.0, 0.65),
            {**run("a", "optimal:c=4", 0.6, 4.0, 0.0, 0.6), "engine": "exact"}]
    rep = {"settings": [setting(runs)]}
    (c,) = curves(rep)
    assert c["curve"] == "solverify:profile"
    assert [p["point"] for p in c["points"]] == ["default", "settle=0.99"]
    assert c["savings"]["goal"]["met"] and c["worst_gap_pp"] == pytest.approx(
        min(g["gap_pp"] for g in c["frontier"]))
    text = "\n".join(analysis_markdown(rep))
    assert "Operating-point curves" in text and "| 0.90 | 1 | `solverify:profile` |" in text
    assert "leave one pool out" in text
