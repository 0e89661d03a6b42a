"""verify-contested and solverify: the posterior against brute force, the online verifier
estimate on a deterministic fake run, budgets, and that a useless verifier changes
nothing about adaptive's answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special
from scipy import stats as sst

from orchestrator.backends.fake import FakeBackend, FakeReply
from orchestrator.decisions import Cancel, Sample, Stop, Verify
from orchestrator.errors import ConfigError, DataError
from orchestrator.history import ProblemRecord, RunHistory
from orchestrator.runtime import run_batch, solve
from orchestrator.snapshot import Blocked, BudgetLeft
from orchestrator.testing import make_snapshot
from orchestrator.types import Budget, Problem
from policies import parse_policy
from policies.adaptive import Adaptive
from policies.evidence import (
    evidence,
    mode_probabilities,
    sample_gain,
    verify_gain,
    vote_prior,
)
from policies.online import estimate_online
from policies.profile import BetaFit, VerifierProfile, pseudo_labelled
from policies.verifying import Solverify, VerifyContested
from tests.helpers import WordTask

#: samples the verifying policies keep in flight while they sample (adaptive's default)
WIDTH = Adaptive().width


GOOD = VerifierProfile(BetaFit(6.0, 2.0), BetaFit(2.0, 6.0), auc=0.93, lam=1.0,
                       repeat_icc=0.0, simulated=True)
REPEATS = VerifierProfile(BetaFit(6.0, 2.0), BetaFit(2.0, 6.0), auc=0.93, lam=1.0,
                          repeat_icc=0.95, simulated=True)
USELESS = VerifierProfile(BetaFit(2.0, 2.0), BetaFit(2.0, 2.0), auc=0.5, lam=1.0)


def saved(tmp_path, profile: VerifierProfile, name: str = "p.json") -> str:
    path = tmp_path / name
    profile.save(path)
    return str(path)


# ---- the maths, against brute force ------------------------------------------------------
def mode_probability_by_quad(counts, j, prior=1.0):
    """P(G_j > every other G_i), G_i ~ Gamma(counts_i + prior), by adaptive quadrature."""
    alphas = [c + prior for c in counts]

    def f(x):
        out = sst.gamma.pdf(x, alphas[j])
        for i, a in enumerate(alphas):
            if i != j:
                out *= special.gammainc(a, x)
        return out

    return integrate.quad(f, 0, np.inf, limit=200)[0]


@pytest.mark.parametrize("counts", [(3, 0), (2, 1, 0), (5, 3, 1, 2), (1, 1, 1), (9, 1, 0)])
def test_mode_probabilities_match_quadrature(counts):
    got = mode_probabilities(counts)
    want = [mode_probability_by_quad(counts, j) for j in range(len(counts))]
    assert got == pytest.approx(want, abs=2e-4)
    assert sum(got) == pytest.approx(1.0)


def brute_posterior(answers, scores, profile, prior=1.0, doubt=0.0):
    """Enumerate the hypotheses "answer c is right" (and "none of them"): vote prior x the
    product over every solution of its readings' densities (correct for c's solutions,
    wrong for the others), each solution's product raised to effective/k. The vote prior:
    c is the mode (probability 1 - doubt), or it is not and is as likely as the next
    sample's answer (doubt)."""
    keys = sorted({a for a in answers if a is not None}, key=answers.index)
    counts = [answers.count(k) for k in keys] + [answers.count(None)]
    hyps = [*keys, None]
    out = []
    for j, c in enumerate(hyps):
        share = (counts[j] + prior) / (len(answers) + len(counts) * prior)
        like = (1 - doubt) * mode_probability_by_quad(counts, j, prior) + doubt * share
        for i, a in enumerate(answers):
            ps = scores.get(i, ())
            if a is None or not ps:
                continue
            dens = profile.correct if a == c else profile.wrong
            log = sum(dens.logpdf(p) for p in ps)
            like *= math.exp(log * profile.effective_readings(len(ps)) / len(ps))
        out.append(like)
    total = sum(out)
    return [x / total for x in out]


@pytest.mark.parametrize(("answers", "scores", "profile"), [
    (["7", "8", "7"], {0: [0.3], 1: [0.8]}, GOOD),
    (["7", "8", "7", None, "9"], {0: [0.6, 0.4], 1: [0.7], 4: [0.35]}, GOOD),
    (["7", "8", "8", "7"], {0: [0.6, 0.62, 0.58], 2: [0.3]}, REPEATS),
    (["5"], {0: [0.2]}, GOOD),
])
def test_posterior_of_votes_and_readings_matches_enumeration(answers, scores, profile):
    ev = evidence(make_snapshot(answers, scores=scores), profile)
    assert ev.post == pytest.approx(brute_posterior(answers, scores, profile), abs=5e-4)
    for doubt in (0.1, 0.5):
        ev = evidence(make_snapshot(answers, scores=scores), profile, doubt=doubt)
        assert ev.post == pytest.approx(
            brute_posterior(answers, scores, profile, doubt=doubt), abs=5e-4)


def test_doubt_lets_the_verifier_overturn_a_large_majority():
    """20 votes against 2, one poor reading of the mode and one good reading of the
    minority: under the pure premise (doubt 0) the mode stays right (0.97); with doubt 0.1
    the minority wins (0.91)."""
    answers = ["7"] * 20 + ["8"] * 2
    snap = make_snapshot(answers, scores={0: [0.3], 20: [0.7]})
    pure, doubted = evidence(snap, GOOD), evidence(snap, GOOD, doubt=0.1)
    assert pure.answers[pure.best].key == "7" and pure.value > 0.95
    assert doubted.answers[doubted.best].key == "8" and doubted.value > 0.9
    # without readings, doubt moves mass from the mode to the others, more to the one
    # with more votes; the mode stays the best
    pure, base = vote_prior((20, 2, 0)), vote_prior((20, 2, 0), doubt=0.1)
    assert sum(base) == pytest.approx(1.0)
    assert 0.85 < base[0] < pure[0] and base[1] > base[2] > pure[2]


def test_verifier_evidence_can_overturn_the_majority_and_repeats_count_once():
    snap = make_snapshot(["7", "7", "8"], scores={0: [0.1], 1: [0.15], 2: [0.9]})
    ev = evidence(snap, GOOD)
    assert ev.answers[ev.best].key == "8"
    # ten identical readings from a verifier that repeats itself are worth about one
    once = evidence(make_snapshot(["7", "8"], scores={1: [0.8]}), REPEATS)
    many = evidence(make_snapshot(["7", "8"], scores={1: [0.8] * 10}), REPEATS)
    assert many.post[1] == pytest.approx(once.post[1], abs=0.02)


def test_expected_gains_are_what_enumeration_over_the_reading_grid_says():
    from policies.evidence import GRID, _reading_grid

    snap = make_snapshot(["7", "8", "7", "8"])
    ev = evidence(snap, GOOD)
    good, bad = _reading_grid(GOOD)
    want = 0.0
    for nodes, w in ((good, ev.post[0] / GRID), (bad, (1 - ev.post[0]) / GRID)):
        for r in nodes:
            post = list(ev.post)
            post[0] *= math.exp(GOOD.log_lr(float(r)))
            want += w * max(post[:-1]) / sum(post)
    assert verify_gain(ev, 0, 0, GOOD) == pytest.approx(want - ev.value, abs=1e-12)
    assert verify_gain(ev, 0, 0, GOOD) > 0.05  # a 2-2 tie: one good reading matters
    settled = evidence(make_snapshot(["7"] * 9), GOOD)
    assert verify_gain(settled, 0, 0, GOOD) < 0.01
    assert sample_gain(ev) >= 0.0


# ---- the policies on hand-built snapshots ---------------------------------------------------
def snapshots():
    """Snapshots adaptive meets: starts, leads, ties, with verifications and in flight."""
    out = [make_snapshot([], in_flight=0), make_snapshot(["4"], in_flight=7),
           make_snapshot(["4", "4", "4"], in_flight=5),
           make_snapshot(["4", "5", "4", "5"], in_flight=4, scores={0: [0.2], 1: [0.9]}),
           make_snapshot(["4"] * 12, in_flight=0),
           make_snapshot(["4", "5", None] * 8, in_flight=8, verifying={0: 1}),
           make_snapshot(["4", "5"], budget_left=BudgetLeft(3, None, None, 5, 1)),
           make_snapshot(["4", "5"] * 32),
           # the votes settled, every reading damns the winner: extend's case
           make_snapshot(["4"] * 12, scores={i: [0.05] for i in range(4)})]
    return out


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
@pytest.mark.parametrize("kw", [{}, {"doubt": 0.2, "extend": True, "max_reads": 16}])
def test_a_useless_verifier_profile_makes_it_exactly_adaptive(tmp_path, cls, kw):
    policy = cls(profile=saved(tmp_path, USELESS), **kw)
    adaptive = Adaptive()
    for snap in snapshots():
        assert list(policy.decide(snap)) == list(adaptive.decide(snap))


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_the_inner_adaptive_takes_every_adaptive_parameter_with_its_default(cls):
    """Each of Adaptive's parameters is one of the policy's, with Adaptive's default, in the
    registry too (so ``solverify`` with no keys samples exactly as ``adaptive`` does)."""
    import dataclasses

    from policies.spec import parse_policy, registered

    mine = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    theirs = {f.name: f.default for f in dataclasses.fields(Adaptive) if f.init}
    assert {k: mine.get(k, "missing") for k in theirs} == theirs
    assert cls()._adaptive == Adaptive()
    parse_policy(cls.NAME)  # loads the built-in
    entry = next(e for e in registered() if e.name == cls.NAME)
    defaults = {p.arg: p.default for p in entry.params}
    assert {k: defaults.get(k, "missing") for k in theirs} == theirs


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_a_useless_verifier_follows_adaptive_given_any_stopping_parameters(tmp_path, cls):
    from policies.spec import parse_policy

    keys = "width=4,wide=16,confidence=0.99,min_votes=2,loss=0.2,shrink=2,prior=0.5"
    adaptive = parse_policy(f"adaptive:{keys}")
    policy = parse_policy(f"{cls.NAME}:profile={saved(tmp_path, USELESS)},{keys}")
    assert policy._adaptive == adaptive
    assert "loss=0.2" in policy.spec and "wide=16" in policy.spec
    for snap in snapshots():
        assert list(policy.decide(snap)) == list(adaptive.decide(snap))
    # loss reaches the inner adaptive: at 8-8 of 24 it stops only with a loss that large
    assert isinstance(policy.decide(snapshots()[5])[0], Stop)
    assert not any(isinstance(d, Stop) for d in cls(profile=saved(tmp_path, USELESS),
                                                     loss=0.0).decide(snapshots()[5]))


def test_without_profile_or_history_it_only_adds_exploratory_verifications():
    policy, adaptive = Solverify(), Adaptive()
    for snap in snapshots():
        got, base = list(policy.decide(snap)), list(adaptive.decide(snap))
        assert [d for d in got if not isinstance(d, Verify)] == base
        if any(isinstance(d, Stop) for d in base):
            assert got == base  # exploration never holds a stop
    assert Solverify(explore=0).decide(snapshots()[3]) == Adaptive().decide(snapshots()[3])


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_exploration_reads_the_leader_and_explore_others_minority_answers(cls):
    """Without a profile or history: the first solution of the leader (a pseudo-positive
    once the problem settles) and of each of the next ``explore_others`` answers (the
    scarce pseudo-negatives); an answer already read, or being read, is not read again."""
    snap = make_snapshot(["4", "5", "4", "6", "7", "4", "8"], in_flight=2)

    def read(policy, s=snap):
        return [d.solution.id for d in policy.decide(s) if isinstance(d, Verify)]

    # answers by votes, then first vote: 4 (ids 0, 2, 5), 5 (1), 6 (3), 7 (4), 8 (6)
    assert read(cls()) == [0, 1]
    assert read(cls(explore_others=3)) == [0, 1, 3, 4]
    assert read(cls(explore_others=9)) == [0, 1, 3, 4, 6]
    being_read = make_snapshot(["4", "5", "4", "6", "7", "4", "8"], in_flight=2,
                               verifying={1: 1}, scores={3: [0.4]})
    assert read(cls(explore_others=3), being_read) == [0, 4]
    assert read(cls(explore=0, explore_others=3)) == []
    for bad in (0, True, 1.5):
        with pytest.raises(ConfigError, match="explore_others"):
            cls(explore_others=bad)
    with pytest.raises(ConfigError, match="explore must"):
        cls(explore=True)


def test_solverify_verifies_a_contested_tie_and_samples_when_nothing_is_known(tmp_path):
    policy = Solverify(profile=saved(tmp_path, GOOD))
    tie = make_snapshot(["4", "5", "4", "5"])
    got = policy.decide(tie)
    assert got and all(isinstance(d, Verify) for d in got)
    assert {d.solution.key for d in got} == {"4", "5"}
    assert policy.decide(make_snapshot([])) == [Sample(WIDTH)]


def test_verified_and_confident_is_settled_and_the_verifier_can_overturn(tmp_path):
    path = saved(tmp_path, GOOD)
    for cls in (Solverify, VerifyContested):
        snap = make_snapshot(["4", "5", "4", "5", "5"], scores={0: [0.95], 1: [0.05]},
                             in_flight=3)
        (stop,) = cls(profile=path).decide(snap)
        assert isinstance(stop, Stop) and stop.key == "4" and stop.code == "settled"


def test_a_verifier_that_repeats_itself_is_never_asked_twice_about_one_solution(tmp_path):
    for profile, rereads in ((REPEATS, False), (GOOD, True)):
        policy = VerifyContested(profile=saved(tmp_path, profile, f"{rereads}.json"))
        snap = make_snapshot(["4", "5"], scores={0: [0.5], 1: [0.5]}, in_flight=6)
        asked = [d for d in policy.decide(snap) if isinstance(d, Verify)]
        assert bool(asked) == rereads


def test_verify_contested_verifies_each_live_answer_one_at_a_time(tmp_path):
    policy = VerifyContested(profile=saved(tmp_path, GOOD))
    snap = make_snapshot(["4", "5", "4", "6"], in_flight=4, verifying={0: 1})
    asked = [d for d in policy.decide(snap) if isinstance(d, Verify)]
    # "4" has a verification in flight; "5" and "6" get one each, on their only solution
    assert sorted(d.solution.key for d in asked) == ["5", "6"]
    # a long-shot answer is not verified
    snap = make_snapshot(["4"] * 6 + ["5"], in_flight=2, scores={0: [0.7]})
    asked = [d for d in VerifyContested(profile=saved(tmp_path, GOOD), floor=0.2)
             .decide(snap) if isinstance(d, Verify)]
    assert all(d.solution.key == "4" for d in asked)


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_extend_samples_on_while_the_verifier_doubts_what_the_votes_settled(tmp_path, cls):
    """Twelve votes for "4" settle adaptive; four damning readings of "4" (max_reads
    spent) leave the posterior unsettled under doubt: with extend it samples on, width at a
    time, up to max; without, it stops where adaptive does; a settled posterior stops."""
    path = saved(tmp_path, GOOD)
    damned = make_snapshot(["4"] * 12, scores={i: [0.05] for i in range(4)})
    (base,) = Adaptive().decide(damned)
    assert isinstance(base, Stop) and base.code == "settled"
    kw = {"profile": path, "doubt": 0.2, "max_reads": 4}
    if cls is Solverify:
        kw["min_gain"] = 0.5  # no reading is worth that much: only sampling is left
    assert cls(**kw, extend=True).decide(damned) == [Sample(WIDTH)]
    (stop,) = cls(**kw, extend=False).decide(damned)
    assert isinstance(stop, Stop) and stop.key == "4"
    (stop,) = cls(**kw, extend=True, max=12).decide(damned)
    assert isinstance(stop, Stop) and stop.code == "max" and stop.key == "4"
    sampling = make_snapshot(["4"] * 12, scores={i: [0.05] for i in range(4)}, in_flight=8)
    assert cls(**kw, extend=True).decide(sampling) == []  # waits for its own samples
    blessed = make_snapshot(["4"] * 12, scores={0: [0.9]})
    (stop,) = cls(**kw, extend=True).decide(blessed)
    assert isinstance(stop, Stop) and stop.code == "settled" and stop.key == "4"


def test_the_defaults_are_the_cross_validated_operating_points():
    """verify-contested reads to 0.99 with up to 16 readings per answer, doubts the votes
    (0.2) and samples on while the verifier doubts them; solverify the same reading and
    stopping rule with doubt 0.05 and no extension (README, "Verifiers")."""
    vc, sv = VerifyContested(), Solverify()
    assert (vc.settle, vc.max_reads, vc.doubt, vc.extend) == (0.99, 16, 0.2, True)
    assert (sv.settle, sv.max_reads, sv.doubt, sv.extend) == (0.99, 16, 0.05, False)
    # online: trusted from 5 pseudo-labelled solutions per class, the runner-up read for
    # pseudo-negatives
    assert (vc.explore, vc.explore_others) == (sv.explore, sv.explore_others) == (5, 1)
    assert "doubt=0.2,extend=true" in vc.spec and "doubt=0.05,extend=false" in sv.spec
    assert parse_policy("verify-contested") == vc and parse_policy("solverify") == sv


def test_at_the_defaults_extend_samples_on_only_when_a_useful_verifier_doubts_the_votes(
        tmp_path):
    """verify-contested's defaults on twelve votes for "4", which settle adaptive: one
    low reading of "4" leaves the posterior unsettled, and it reads "4" again before
    anything else; readings that damn "4" (P(right) near 0, nothing left worth reading)
    make it sample on, width at a time; a reading that blesses "4" settles it. A useless
    profile stops where adaptive does on the same snapshots, without one more sample or
    reading; so does an exhausted budget."""
    good, useless = saved(tmp_path, GOOD, "g.json"), saved(tmp_path, USELESS, "u.json")
    policy = VerifyContested(profile=good)
    doubted = make_snapshot(["4"] * 12, scores={0: [0.3]})
    damned = make_snapshot(["4"] * 12, scores={i: [0.05] for i in range(4)})
    blessed = make_snapshot(["4"] * 12, scores={0: [0.9]})
    (base,) = Adaptive().decide(damned)
    assert isinstance(base, Stop) and base.code == "settled"
    (asked,) = policy.decide(doubted)
    assert isinstance(asked, Verify) and asked.solution.key == "4"
    assert policy.decide(damned) == [Sample(WIDTH)]
    (stop,) = policy.decide(blessed)
    assert stop.code == "settled" and stop.key == "4"
    for snap in (doubted, damned, blessed):
        for cls in (VerifyContested, Solverify):
            assert list(cls(profile=useless).decide(snap)) == list(Adaptive().decide(snap))
    broke = make_snapshot(["4"] * 12, scores={i: [0.05] for i in range(4)},
                          budget_left=BudgetLeft(tokens=0, requests=None, cost_units=None))
    (stop,) = policy.decide(broke)
    assert isinstance(stop, Stop) and stop.key == "4"
    # solverify's defaults do not extend: with no reading worth its tokens, a damned
    # winner stops where adaptive's votes did
    (stop,) = Solverify(profile=good, min_gain=0.5).decide(damned)
    assert isinstance(stop, Stop) and stop.key == "4"


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_no_verification_is_asked_for_that_the_budget_cannot_hold(tmp_path, cls):
    policy = cls(profile=saved(tmp_path, GOOD))
    tight = BudgetLeft(tokens=20, requests=None, cost_units=None, sample_tokens=10,
                       verify_tokens=30)
    snap = make_snapshot(["4", "5", "4", "5"], budget_left=tight)
    assert not any(isinstance(d, Verify) for d in policy.decide(snap))
    blocked = make_snapshot(["4", "5", "4"], budget_left=tight,
                            blocked=Blocked(("verify",), "tokens"))
    (stop,) = policy.decide(blocked)
    assert stop.code == "budget" and stop.key == "4"


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
async def test_through_the_runtime_the_budget_is_respected_and_the_policy_stops(tmp_path, cls):
    """Two answers, every reading "yes": at the former defaults (settle 0.95, 4 readings per
    answer, the votes' mode taken as right) the budget ends the problem; at the current
    ones it may settle first; the budget holds either way."""
    task = WordTask(max_tokens=5, verify_max_tokens=8)
    old = {"settle": 0.95, "max_reads": 4, "doubt": 0.0, "extend": False}
    for kw, codes in ((old, ("budget",)),
                      ({}, ("budget", "settled"))):
        backend = FakeBackend(lambda req, i: FakeReply.text(
            "yes" if req.kind == "verify" else ("w seven" if i % 2 else "w eight")))
        result = await solve(Problem("p", "q", answer="seven"),
                             cls(profile=saved(tmp_path, GOOD), width=2, **kw),
                             Budget(tokens=30), backend, task=task, max_n=1)
        assert result.usage.completion_tokens <= 30
        assert result.stop_code in codes
        for req in backend.requests:
            assert req.max_tokens in (5, 8)


def test_bad_profile_file_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError):
        parse_policy(f"solverify:profile={bad}")
    with pytest.raises(DataError):
        parse_policy(f"verify-contested:profile={tmp_path / 'missing.json'}")


def test_specs_round_trip(tmp_path):
    path = saved(tmp_path, GOOD)
    for spec in (f"solverify:profile={path},min_gain=0.01", "verify-contested:floor=0.1",
                 "solverify:explore=3,explore_others=2",
                 f"verify-contested:profile={path},doubt=0.1,extend=true,max_reads=16"):
        policy = parse_policy(spec)
        assert parse_policy(policy.spec) == policy


# ---- the online estimate ---------------------------------------------------------------------
def fake_history(n: int, good: bool, seed: int = 0) -> tuple[ProblemRecord, ...]:
    """Settled problems whose majority is right; each with one reading of the winner and
    one of a loser: informative (good) or the same distribution for both (useless)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        right = rng.beta(6, 2) if good else rng.beta(2, 2)
        wrong = rng.beta(2, 6) if good else rng.beta(2, 2)
        out.append(ProblemRecord(
            problem_id=f"p{i}", stop_code="settled", answer_key="a", keys=("a", "b", "a"),
            lengths=(10, 10, 10), readings=(("a", float(right)), ("b", float(wrong))),
            solution_tokens=30, verification_tokens=2, reading_solutions=(0, 1)))
    # a problem that hit its cap: not settled, so not a pseudo-label
    out.append(ProblemRecord("cap", "max", "b", ("a", "b"), (1, 1), (("b", 0.99),), 2, 1,
                             (1,)))
    return tuple(out)


def test_online_estimate_from_settled_majorities():
    hist = fake_history(40, good=True)
    labelled = pseudo_labelled(hist)
    assert len(labelled) == 80 and sum(label for _, label, _ in labelled) == 40
    est = estimate_online(hist, min_per_class=10)
    assert (est.positives, est.negatives) == (40, 40)
    assert est.profile is not None and est.profile.auc > 0.85
    assert est.usable is est.profile
    assert estimate_online(hist, min_per_class=10) is est  # memoised on the tuple
    few = estimate_online(hist[:5], min_per_class=10)
    assert not few.enough and few.usable is None
    useless = estimate_online(fake_history(60, good=False), min_per_class=10)
    assert useless.enough and useless.usable is None


def test_the_policies_online_estimate_is_the_profiles_own_estimator():
    """One estimator: the online estimate's profile is ``VerifierProfile.from_history`` of
    the same records (counts, Beta fits, AUC, λ), and repeated readings of one solution
    (``reading_solutions``) are grouped into a measured repeat ICC."""
    hist = fake_history(40, good=True, seed=4)
    rng = np.random.default_rng(9)
    # records reading their winner (solution 0) three times: nearly the same within a
    # solution, different between solutions
    hist = (*hist, *(ProblemRecord(f"r{i}", "settled", "a", ("a", "b", "a"), (10, 10, 10),
                                   (*(("a", 0.5 + 0.08 * i + 0.005 * j) for j in range(3)),
                                    ("b", float(rng.beta(2, 6)))),
                                   30, 8, (0, 0, 0, 1)) for i in range(6)))
    est = estimate_online(hist, min_per_class=10)
    ref = VerifierProfile.from_history(hist)
    assert est.profile is not None and ref is not None
    assert (est.positives, est.negatives) == (ref.n_correct, ref.n_wrong) == (46, 46)
    assert (est.profile.correct, est.profile.wrong, est.profile.auc) == \
        (ref.correct, ref.wrong, ref.auc)
    settled = [r for r in hist if r.stop_code == "settled"]
    assert est.profile.lam == ref.lam == pytest.approx(
        (sum(r.verification_tokens for r in settled) / sum(len(r.readings) for r in settled))
        / (sum(r.solution_tokens for r in settled) / sum(len(r.keys) for r in settled)))
    assert ref.repeat_icc is not None and ref.repeat_icc > 0.9  # grouped: 0.80/0.81/0.82
    # without reading_solutions, readings are not grouped: the ICC stays unknown
    ungrouped = tuple(ProblemRecord(r.problem_id, r.stop_code, r.answer_key, r.keys,
                                    r.lengths, r.readings, r.solution_tokens,
                                    r.verification_tokens) for r in hist)
    assert VerifierProfile.from_history(ungrouped).repeat_icc is None


def test_answers_the_verifier_chose_do_not_vouch_for_it():
    """The lock-in a review found: a useless verifier whose readings choose the answers.
    Each problem's votes are a, a, b (the majority right, readings of both answers drawn
    from one distribution), and the policy stopped with whichever answer read higher. By
    those stopped-with answers the readings would separate perfectly (AUC 1: trusted for
    good); by the votes they do not, and the estimate is never usable."""
    rng = np.random.default_rng(11)
    hist = []
    for i in range(60):
        pa, pb = (float(x) for x in rng.beta(2, 2, size=2))
        chosen = "a" if pa >= pb else "b"
        hist.append(ProblemRecord(f"p{i}", "settled", chosen, ("a", "a", "b"), (10,) * 3,
                                  (("a", pa), ("b", pb)), 30, 2, (0, 2)))
    est = estimate_online(tuple(hist), min_per_class=10)
    assert est.enough and est.profile is not None
    assert abs(est.profile.auc - 0.5) < 0.12 and est.usable is None


def test_a_reading_of_a_solution_without_an_answer_is_a_pseudo_negative():
    rec = ProblemRecord("p", "settled", "a", ("a", None), (5, 5), (("a", 0.9), (None, 0.7)),
                        10, 4, (0, 1))
    assert [(lab, p) for _, lab, p in pseudo_labelled([rec])] == [(True, 0.9), (False, 0.7)]
    assert pseudo_labelled([rec], settled=("max",)) == []


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_exploration_goes_on_for_the_scarce_class_however_many_of_the_other(cls):
    """An easy run: 60 settled, unanimous problems, each with a reading of its answer, and
    no pseudo-negative yet. A contested problem still reads its runner-up (not its leader:
    pseudo-positives are plentiful); once both classes have ``explore`` it explores no
    more."""
    rng = np.random.default_rng(1)
    unanimous = tuple(ProblemRecord(
        problem_id=f"u{i}", stop_code="settled", answer_key="a", keys=("a", "a", "a"),
        lengths=(10, 10, 10), readings=(("a", float(rng.beta(2, 2))),), solution_tokens=30,
        verification_tokens=2, reading_solutions=(0,)) for i in range(60))
    contested = ["4", "5", "4", "4"]
    got = cls().decide(make_snapshot(contested, in_flight=4, history=unanimous))
    assert [d.solution.id for d in got if isinstance(d, Verify)] == [1]
    both = unanimous + fake_history(6, good=False)[:6]  # 6 pseudo-negatives, useless
    assert cls().decide(make_snapshot(contested, in_flight=4, history=both)) == \
        Adaptive().decide(make_snapshot(contested, in_flight=4, history=both))
    # and a settled stop no longer waits for a reading in flight (it would teach nothing)
    settled = make_snapshot(["4", "4", "4"], in_flight=2, verifying={0: 1}, history=both)
    base = Adaptive().decide(settled)
    assert isinstance(base[0], Stop) and base[0].code == "settled"
    assert cls().decide(settled) == base
    short = make_snapshot(["4", "4", "4"], in_flight=2, verifying={0: 1}, history=unanimous)
    assert cls().decide(short) == [Cancel("solve")]  # still collecting: it waits


def test_online_estimate_turns_the_verifier_on_only_when_it_is_useful():
    tie = make_snapshot(["4", "5", "4", "5"], in_flight=0)
    for good in (True, False):
        snap = make_snapshot(["4", "5", "4", "5"], history=fake_history(60, good=good))
        got = Solverify().decide(snap)
        verified = any(isinstance(d, Verify) for d in got)
        assert verified == good
        if not good:
            assert got == Adaptive().decide(snap) == Adaptive().decide(tie)


# ---- a fake run: a useless verifier does not change any answer ----------------------------------
async def test_a_useless_verifier_changes_no_answer_of_a_run():
    """Solverify with the online estimate (exploring, then a verifier found useless: its
    verdicts are coin flips) against adaptive on the same fake run: the same answers, the
    verifier never used, and every decision adaptive's own on the snapshot it was made on
    (plus exploratory readings; or, when adaptive settles while a reading is in flight,
    waiting for it with the samples cancelled)."""
    problems = [Problem(id=f"p{i}", problem=f"q{i}", answer="seven") for i in range(24)]
    words = ["seven", "eight", "seven", "nine", "seven", "eight", "seven", "seven", "nine"]

    def responder():
        served: dict[str, int] = {}  # per problem: its j-th sample is always the same

        def respond(req, i):
            if req.kind == "verify":  # coin flips
                return FakeReply.text("yes" if (len(req.prompt) + i) % 2 else "no")
            j = served.get(req.prompt, 0)
            served[req.prompt] = j + 1
            qi = int(req.prompt[1:])
            # lengths differ, so samples finish one by one; longer than the verdicts
            return FakeReply.text("w " * (3 + (j * 5 + qi) % 7) + words[(qi + j) % 9])

        return respond

    class Checked:
        """Solverify, checking each of its decisions against adaptive's on that snapshot."""

        def __init__(self, policy: Solverify) -> None:
            self.policy, self.spec, self.verifies = policy, policy.spec, True
            self.inner = Adaptive(max=16, width=4, wide=4, learn=False)
            self.decisions = 0

        def decide(self, snap):
            got = list(self.policy.decide(snap))
            assert self.policy.verifier(snap)[0] is None  # the verifier is never used
            base = list(self.inner.decide(snap))
            plain = [d for d in got if not isinstance(d, Verify)]
            waiting = (any(isinstance(d, Stop) and d.code == "settled" for d in base)
                       and snap.in_flight.verification_total > 0
                       and plain in ([], [Cancel("solve")]))
            assert plain == base or waiting
            self.decisions += 1
            return got

    # exploratory verifications add decision points (each reading that finishes), which
    # may see two samples finished where adaptive alone saw them one at a time, and may
    # change the order in which problems finish; adaptive's learned prior (learn) and its
    # evidence-following width (wide > width) read that order, so they are held fixed
    # here to test that the verifier's verdicts themselves change nothing (with a profile
    # that says "useless" there is no exploration, and defaults give adaptive's decisions
    # exactly: the replay test above)
    out = {}
    checked = Checked(Solverify(max=16, width=4, wide=4, learn=False))
    for policy in (checked, Adaptive(max=16, width=4, wide=4, learn=False)):
        out[type(policy).__name__] = await run_batch(
            problems, policy, backend=FakeBackend(responder()), task=WordTask(),
            concurrency=None, problems_in_flight=4, max_n=1)
    a, b = out["Checked"], out["Adaptive"]
    assert [r.key for r in a] == [r.key for r in b]
    assert checked.decisions > len(problems)
    assert sum(len(r.verifications) for r in a) > 0  # it did explore
    assert all(not r.verifications for r in b)


async def test_history_records_which_solution_each_reading_is_of():
    from policies import GenRM

    h = RunHistory()
    backend = FakeBackend(lambda req, i: FakeReply.text(
        "yes" if req.kind == "verify" else ("w seven" if i == 0 else "w w eight")))
    await solve(Problem("p", "q"), GenRM(2, 2), backend=backend, task=WordTask(), history=h,
                max_n=1)
    (rec,) = h.records
    assert sorted(rec.reading_solutions) == [0, 0, 1, 1]
    keys = [rec.keys[i] for i in rec.reading_solutions]
    assert keys == [k for k, _ in rec.readings]


# ---- the replay path (simulated clock, real runtime) ------------------------------------------
def test_replayed_with_a_simulated_verifier_it_verifies_and_a_useless_profile_is_adaptive(
        tmp_path):
    from benchmarks.replay import ReplayConfig, replay_pool
    from benchmarks.source import ReplaySource, SimulatedVerifier
    from tests.test_replay import random_pool

    strong = VerifierProfile(BetaFit(8.0, 1.0), BetaFit(1.0, 8.0), auc=0.99, lam=0.5,
                             repeat_icc=0.0, simulated=True)
    good, useless = saved(tmp_path, strong, "g.json"), saved(tmp_path, USELESS, "u.json")
    src = ReplaySource(random_pool(4, problems=16, keys="abc"), seed=2,
                       verifier=SimulatedVerifier(correct=(8.0, 1.0), wrong=(1.0, 8.0),
                                                  lam=0.5, vmax=4))
    specs = [f"solverify:profile={good},width=3,max=9", "adaptive:width=3,max=9",
             f"solverify:profile={useless},width=3,max=9",
             f"verify-contested:profile={good},width=3,max=9"]
    out = replay_pool(src, specs, ReplayConfig(orders=2, workers=1))
    smart, adaptive, same, contested = out
    for metric in ("correct", "tokens", "samples", "latency"):
        np.testing.assert_array_equal(getattr(same, metric), getattr(adaptive, metric))
    assert smart.correct.mean() > adaptive.correct.mean()
    assert contested.correct.mean() > adaptive.correct.mean()
    assert smart.errors == contested.errors == 0


def test_extend_stops_sampling_past_the_failure_cap(tmp_path):
    """extend samples on like adaptive does, so it stops like adaptive on broken samples: a
    pool that ran out (every further sample fails) must not be sampled forever."""
    good = saved(tmp_path, GOOD, "g.json")
    damned = dict(scores={i: [0.05] for i in range(4)})
    policy = VerifyContested(profile=good, max_failures=2)
    assert policy.decide(make_snapshot(["4"] * 12, failed=2, **damned)) == [Sample(WIDTH)]
    (stop,) = policy.decide(make_snapshot(["4"] * 12, failed=3, **damned))
    assert isinstance(stop, Stop) and stop.key == "4"
