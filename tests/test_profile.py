"""The verifier profile: AUC, Beta fits, repeat ICC, JSON round trip, bad files."""

import json
import math
import random

import pytest

from orchestrator.errors import DataError
from policies.profile import BetaFit, ScalingLaw, VerifierProfile, auc, repeat_icc


def brute_auc(pos, neg):
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_brute_force_with_ties():
    rng = random.Random(3)
    for _ in range(50):
        pos = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(rng.randint(1, 9))]
        neg = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(rng.randint(1, 9))]
        assert auc(pos, neg) == pytest.approx(brute_auc(pos, neg))
    assert auc([], [0.3]) is None


def test_icc_is_one_for_identical_readings_and_low_for_independent_ones():
    same = [[0.2, 0.2, 0.2], [0.8, 0.8], [0.5, 0.5, 0.5, 0.5]]
    assert repeat_icc(same) == 1.0
    rng = random.Random(0)
    noise = [[rng.random() for _ in range(4)] for _ in range(200)]
    assert repeat_icc(noise) < 0.1


def test_beta_fit_recovers_parameters():
    rng = random.Random(1)
    xs = [rng.betavariate(3, 2) for _ in range(20000)]
    fit = BetaFit.fit(xs)
    assert fit.a == pytest.approx(3, rel=0.08) and fit.b == pytest.approx(2, rel=0.08)
    # degenerate samples never claim certainty
    flat = BetaFit.fit([0.7, 0.7, 0.7])
    assert 0.6 < flat.mean < 0.8 and flat.a + flat.b < 10


def test_profile_from_readings_and_round_trip(tmp_path):
    rng = random.Random(2)
    readings = []
    for sid in range(400):
        good = sid % 2 == 0
        for _ in range(2):
            p = rng.betavariate(4, 1.5) if good else rng.betavariate(1.5, 4)
            readings.append((sid, good, p))
    readings.append((999, False, None))
    prof = VerifierProfile.from_readings(readings, lam=0.5, source="sim", simulated=True,
                                         scaling=ScalingLaw(1.0, 0.5, 0.5, 0.3))
    assert prof.auc > 0.85 and prof.useful()
    assert prof.log_lr(0.95) > 0 > prof.log_lr(0.05)
    assert prof.repeat_icc < 0.8  # independent draws per reading
    assert prof.parse_rate == pytest.approx(800 / 801)
    path = tmp_path / "p.json"
    prof.save(path)
    back = VerifierProfile.load(path)
    assert back == prof
    assert back.effective_readings(1) == 1.0
    assert back.scaling.allocation(16) == (4, 1)


def test_a_useless_verifier_is_not_useful():
    readings = [(i, i % 2 == 0, 0.6) for i in range(100)]
    prof = VerifierProfile.from_readings(readings)
    assert prof.auc == 0.5 and not prof.useful()
    assert math.isclose(prof.log_lr(0.6), 0.0, abs_tol=1e-9)


def test_bad_profile_files_are_data_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        VerifierProfile.load(p)
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a verifier profile"):
        VerifierProfile.load(p)
    p.write_text(json.dumps({"format": "solverify.verifier_profile", "version": 1}))
    with pytest.raises(DataError, match="malformed"):
        VerifierProfile.load(p)
    with pytest.raises(DataError, match="cannot read"):
        VerifierProfile.load(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no parsed"):
        VerifierProfile.from_readings([(1, True, None)])


def test_icc_does_not_count_the_gap_between_the_classes_as_agreement():
    """Independent readings of correct (Beta(4,2)) and wrong (Beta(2,4)) solutions: their
    ICC is 0, but pooled over both classes the class means' gap counted as agreement
    between two readings of one solution (0.46 here; 0.85 for Beta(8,2)/Beta(2,8), which
    turned re-reading off; found by review). Within the classes it is ~0, and readings
    that share a per-solution level are still seen."""
    rng = random.Random(5)
    for (a, b) in ((4, 2), (8, 2)):
        good = [[rng.betavariate(a, b) for _ in range(4)] for _ in range(300)]
        bad = [[rng.betavariate(b, a) for _ in range(4)] for _ in range(300)]
        assert repeat_icc(good + bad) > 0.3  # the pooled estimate: what it was
        assert repeat_icc(good, bad) < 0.05
    shared = []
    for _ in range(300):
        level = rng.random()
        shared.append([min(max(level + rng.gauss(0, 0.05), 0.0), 1.0) for _ in range(3)])
    assert repeat_icc(shared[:150], shared[150:]) > 0.9
    assert repeat_icc([[0.2, 0.2]], [[0.9, 0.9]]) is None  # one solution a class: no spread
