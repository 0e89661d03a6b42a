"""Calibration: the choice rule, the split scores, and a small real run."""

import pytest

from benchmarks.calibrate import calibrate, markdown, score_split, spec_for
from benchmarks.replay import ReplayConfig
from orchestrator.errors import ConfigError
from tests.conftest_data import DATA, needs_data


def run(pool, policy, acc, tokens, latency, agree):
    return {"pool": pool, "policy": policy, "accuracy": acc, "tokens_per_problem": tokens,
            "latency_per_problem": latency, "agreement_with_full_sc": agree}


def test_score_split_medians_and_means():
    report = {"runs": [
        run("a", "sc:n=all", 0.8, 1000, 10, 1.0), run("a", "p", 0.7, 100, 5, 0.9),
        run("b", "sc:n=all", 0.6, 1000, 10, 1.0), run("b", "p", 0.6, 500, 20, 0.96),
        run("c", "sc:n=all", 0.5, 1000, 10, 1.0), run("c", "p", 0.5, 250, 10, 1.0),
    ]}
    (s,) = score_split(report, ["p"])
    assert s.median_saving == pytest.approx(4.0)  # 10x, 2x, 4x
    assert s.median_latency_ratio == pytest.approx(1.0)  # 0.5, 2, 1
    assert s.accuracy_delta == pytest.approx(-0.1 / 3)
    assert s.agreement == pytest.approx((0.9 + 0.96 + 1.0) / 3)


def test_template_needs_a_slot():
    assert spec_for("adaptive:confidence={}", 0.9) == "adaptive:confidence=0.9"
    with pytest.raises(ConfigError, match=r"needs a '\{\}'"):
        spec_for("adaptive", 0.9)


@needs_data
def test_calibrate_picks_cheapest_value_meeting_the_target():
    from benchmarks.pools import load_pool
    from benchmarks.source import ReplaySource

    pool = DATA / "pools" / "live_capitals_gemma3-270m.jsonl"
    fit = [ReplaySource(load_pool(pool, limit=12), seed=0)]
    cfg = ReplayConfig(orders=2, workers=1, bootstrap=50)
    result = calibrate(fit, fit, "adaptive:max=all,confidence={}", (0.5, 0.99), 1e-6, cfg)
    assert result["chosen"] == "adaptive:max=all,confidence=0.5"  # the cheapest qualifies
    assert result["target_met"] and "holdout" in result
    strict = calibrate(fit, [], "adaptive:max=all,confidence={}", (0.5, 0.99), 1.0, cfg)
    scores = {s["policy"]: s for s in strict["fit"]["scores"]}
    careful = scores["adaptive:max=all,confidence=0.99"]
    cheap = scores["adaptive:max=all,confidence=0.5"]
    assert careful["median_token_saving_x"] <= cheap["median_token_saving_x"]
    assert "Calibration of" in markdown(strict)


# ---- cross-validation ---------------------------------------------------------------------------
from benchmarks.calibrate import (  # noqa: E402
    PoolScore,
    choose,
    cross_validate,
    cv_markdown,
    pool_group,
)


def test_pool_groups_from_file_stems():
    assert pool_group("boinf_aime2024_Qwen3-4B", "model") == "Qwen3-4B"
    assert pool_group("boinf_math500_Qwen3-4B", "dataset") == "math500"
    assert pool_group("live_capitals_gemma3-270m", "model") == "gemma3-270m"
    assert pool_group("mypool", "model") == "mypool"
    with pytest.raises(ConfigError, match="folds"):
        pool_group("a_b_c", "year")


def test_choose_by_accuracy_respects_the_floor_and_the_latency_cap():
    table = {
        "cheap": [PoolScore("a", 0.9, -0.010, 12.0, 0.5), PoolScore("b", 0.9, 0.0, 10.0, 0.5)],
        "slow": [PoolScore("a", 0.99, 0.0, 11.0, 1.5), PoolScore("b", 0.99, 0.0, 9.0, 1.5)],
        "safe": [PoolScore("a", 0.99, 0.0, 6.0, 0.7), PoolScore("b", 0.99, 0.001, 5.0, 0.7)],
    }
    specs = ["cheap", "slow", "safe"]
    assert choose(table, specs, "accuracy", min_delta=-0.003) == ("safe", True)
    assert choose(table, specs, "accuracy", min_delta=-0.01) == ("cheap", True)
    assert choose(table, specs, "accuracy", min_delta=-0.003, max_latency=2.0) == ("slow", True)
    assert choose(table, specs, "accuracy", min_delta=0.01) == ("safe", False)
    assert choose(table, specs, "agreement", target_agreement=0.95) == ("slow", True)


@needs_data
def test_cross_validation_holds_each_model_out():
    from benchmarks.pools import load_pool
    from benchmarks.source import ReplaySource

    srcs = [ReplaySource(load_pool(DATA / "pools" / name, limit=6), seed=0)
            for name in ("boinf_aime2024_Qwen3-4B.jsonl", "boinf_math500_Qwen3-4B.jsonl",
                         "boinf_aime2024_LIMO-v2.jsonl")
            if (DATA / "pools" / name).exists()]
    cfg = ReplayConfig(orders=2, workers=1, bootstrap=50)
    specs = ["adaptive:confidence=0.6", "adaptive:confidence=0.95"]
    res = cross_validate(srcs, specs, cfg, folds="model", select="accuracy")
    folds = {f["fold"]: f for f in res["folds"]}
    assert set(folds) == {"Qwen3-4B", "LIMO-v2"}
    for f in res["folds"]:
        assert f["chosen"] in specs
        assert {p["pool"] for p in f["holdout_pools"]} == set(f["pools"])
        assert not set(f["pools"]) & {p for other in res["folds"] if other is not f
                                      for p in other["pools"]}
    assert res["pooled_holdout"]["pools"] == len(srcs)
    assert "pooled held-out" in cv_markdown(res)


def _write_pool(path, problems):
    import json
    with open(path, "w") as f:
        for i, samples in enumerate(problems):
            f.write(json.dumps({"id": f"p{i}", "problem": "q", "answer": "1", "samples": [
                {"pred": pred, "correct": pred == "1", "tokens": tok}
                for pred, tok in samples]}) + "\n")


def test_folds_by_model_read_the_pools_model_field(tmp_path):
    """A second recording of one model named ``..._Qwen3-4B_seed1`` made a fold of its own
    from the file stem, so the model sat on both sides of a fold; the pool's ``model``
    field groups them (found by review). A stem is still the fallback."""
    import json

    from benchmarks.pools import load_pool
    from benchmarks.source import ReplaySource

    def write(name: str, model: str | None) -> ReplaySource:
        path = tmp_path / f"{name}.jsonl"
        with open(path, "w") as f:
            for i in range(4):
                row = {"id": f"p{i}", "problem": "q", "answer": "1", "samples": [
                    {"pred": "1" if (i + j) % 3 else "2", "correct": (i + j) % 3 != 0,
                     "tokens": 10 + j} for j in range(6)]}
                if model is not None:
                    row["model"] = model
                f.write(json.dumps(row) + "\n")
        return ReplaySource(load_pool(path), seed=0)

    srcs = [write("boinf_aime2025_Qwen3-4B", "Qwen3-4B"),
            write("boinf_aime2025_Qwen3-4B_seed1", "Qwen3-4B"),
            write("boinf_aime2025_LIMO-v2", None)]
    assert pool_group("boinf_aime2025_Qwen3-4B_seed1", "model", "Qwen3-4B") == "Qwen3-4B"
    assert pool_group("x_y_Qwen3-4B+contested1", "model", "Qwen3-4B") == "Qwen3-4B+contested1"
    assert pool_group("boinf_aime2025_Qwen3-4B_seed1", "dataset", "Qwen3-4B") == "aime2025"
    res = cross_validate(srcs, ["sc:n=2", "sc:n=4"], ReplayConfig(orders=2, workers=1,
                                                                   bootstrap=20),
                         folds="model", select="accuracy")
    assert {f["fold"]: sorted(f["pools"]) for f in res["folds"]} == {
        "Qwen3-4B": ["boinf_aime2025_Qwen3-4B", "boinf_aime2025_Qwen3-4B_seed1"],
        "LIMO-v2": ["boinf_aime2025_LIMO-v2"]}


def test_length_and_order_analysis_on_a_hand_built_pool(tmp_path):
    """Short traces right, long ones wrong and in the majority: the length quintiles, the
    first finishers and the length-weighted vote all see it; plain majority does not."""
    from benchmarks.length_order import analyse
    from benchmarks.length_order import markdown as lo_markdown

    short_right = [("1", 100 + j) for j in range(5)]
    long_wrong = [("2", 1000 + j) for j in range(6)]
    mixed = [short_right + long_wrong] * 4
    plain = [[("1", 100 + j) for j in range(11)]] * 4  # unanimous: nothing to learn
    _write_pool(tmp_path / "boinf_t_A.jsonl", mixed)
    _write_pool(tmp_path / "boinf_t_B.jsonl", plain)
    res = analyse([tmp_path / "boinf_t_A.jsonl", tmp_path / "boinf_t_B.jsonl"], k=3, wave=8,
                  draws=20, seed=1)
    a, b = res["pools"]
    q = a["length_quintile_accuracy"]
    assert q[0] == 1.0 and q[4] == 0.0 and a["no_answer_share"] == 0.0
    assert a["weighted_vote"]["0.0"] == 0.0  # majority: the long wrong answer
    assert a["weighted_vote"]["1.0"] == 1.0  # 1 - rank weights: the short right one
    # every wave of 8 from 11 holds >= 2 short samples; the first finishers are them
    assert a["order"]["accuracy_first"] > a["order"]["accuracy_random"]
    # B's choice of beta is made on A (and vice versa); unanimous B loses nothing
    assert b["cv_beta"] == 0.5 and b["cv_delta_vs_majority"] == 0.0  # first beta >= 0.5
    assert "more accurate than 3 random samples in 1 of 2" in lo_markdown(res)


def test_held_out_figures_split_by_the_other_grouping():
    from benchmarks.calibrate import held_out_by, other_grouping

    def pool(name, delta, saving):
        return {"pool": name, "agreement_with_full_sc": 1.0, "accuracy_delta": delta,
                "token_saving_x": saving, "latency_ratio": 0.5}

    folds = [{"holdout_pools": [pool("boinf_aime2024_A", -0.02, 4.0),
                                pool("boinf_math500_A", 0.0, 9.0)]},
             {"holdout_pools": [pool("boinf_aime2024_B", 0.01, 6.0)]}]
    assert other_grouping("model") == "dataset" and other_grouping("dataset") == "model"
    by = held_out_by(folds, "dataset")
    assert set(by) == {"aime2024", "math500"}
    assert by["aime2024"]["pools"] == 2
    assert by["aime2024"]["median_token_saving_x"] == pytest.approx(5.0)
    assert by["aime2024"]["accuracy_delta"] == pytest.approx(-0.005)
    assert by["aime2024"]["worst_pool"] == "boinf_aime2024_A"
    assert by["math500"]["median_token_saving_x"] == pytest.approx(9.0)


def _margin_problems():
    return [[("1", 10)] * 6 + [("2", 10)] * 4,  # 0.6 vs 0.4, top right
            [("2", 10)] * 5 + [("1", 10)] * 5,  # tie: "2" seen first wins, wrong
            [("1", 10)] * 10]  # one answer: skipped


def test_share_margins_on_a_hand_built_pool(tmp_path):
    from benchmarks.length_order import margin_table, share_margins
    from benchmarks.pools import load_pool

    _write_pool(tmp_path / "boinf_t_A.jsonl", _margin_problems())
    rows = share_margins(load_pool(tmp_path / "boinf_t_A.jsonl").arrays)
    assert rows == [(pytest.approx(0.2), True, False), (0.0, False, True)]
    table = margin_table(rows)
    assert [(r["from"], r["problems"]) for r in table] == [(0.0, 1), (0.2, 1)]
