"""benchmarks.online_diag: the online estimate of a verifying policy, order by order."""

from __future__ import annotations

import pytest

from benchmarks.engine import run_order
from benchmarks.online_diag import diagnose, main
from benchmarks.replay import policy_for
from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.errors import ConfigError
from tests.test_replay import make_pool


def _src() -> ReplaySource:
    # 12 problems: the right answer "a" mostly, a wrong "b" now and then; long traces, so
    # a stop would cut a reading still in flight
    probs = [[("a" if (i + j) % 4 else "b", (i + j) % 4 != 0, 300 + 37 * j + 11 * i)
              for j in range(8)] for i in range(12)]
    return ReplaySource(make_pool(probs), verifier=SimulatedVerifier(
        correct=(4.0, 2.0), wrong=(2.0, 4.0), lam=2.0, vmax=4))


def test_rows_count_readings_and_pseudo_labels():
    src = _src()
    rows = diagnose(src, "solverify", orders=2)
    assert [r["order"] for r in rows] == [0, 1]
    for r in rows:
        assert r["readings"] > 0
        assert r["pseudo_positives"] + r["pseudo_negatives"] <= r["readings"]
        assert 0 <= r["pseudo_negatives_right"] <= r["pseudo_negatives"]
        assert 0.0 <= r["accuracy"] <= 1.0
    # While it explores (its stops are adaptive's), the policy holds a settled stop for
    # the readings in flight: none is cut. A stop on the verifier's posterior (the online
    # estimate usable by then) may cut one launched while exploring: the posterior no
    # longer needs it (seen once adaptive's width became 4). The rows count both.
    policy = policy_for("solverify", 8)
    cuts = {"exploring": 0, "verifying": 0}
    for order in range(2):
        for res in run_order(src, policy, order):
            mode = "exploring" if res.reason.startswith("adaptive:") else "verifying"
            cuts[mode] += sum(1 for f in res.failed if f.kind == "verify")
    assert cuts["exploring"] == 0
    assert cuts["verifying"] == sum(r["readings_cut"] for r in rows)


def test_needs_a_verifying_policy_without_a_profile():
    with pytest.raises(ConfigError, match="verifying policy"):
        diagnose(_src(), "adaptive", orders=1)


def test_cli_prints_one_line_per_order(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "q", "problem": "?", "answer": "1", "samples": ['
                    '{"pred": "1", "correct": true, "tokens": 50}, '
                    '{"pred": "1", "correct": true, "tokens": 60}, '
                    '{"pred": "2", "correct": false, "tokens": 70}, '
                    '{"pred": "1", "correct": true, "tokens": 80}]}\n')
    assert main(["--pool", str(path), "--orders", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("order ") == 2 and "simulated verifier" in out
