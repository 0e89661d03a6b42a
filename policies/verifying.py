"""Policies that decide, step by step, whether the next tokens go to a new sample or to
verifying a candidate: ``verify-contested`` and ``solverify``.

Both sample like :class:`~policies.adaptive.Adaptive` (an ``Adaptive`` inside decides
the samples and the vote-based stop; every parameter of ``Adaptive`` is one of theirs, with
``Adaptive``'s default, read from its dataclass) and add a verifier on top of it:

* **Where the verifier's quality comes from.** ``profile=FILE`` (a
  :class:`~policies.profile.VerifierProfile` measured on labelled data), else an online
  estimate from the run's finished problems (:mod:`policies.online`). A verifier is
  used only when the profile says it is useful (AUC above ``min_auc``; online: its 95%
  lower bound). Otherwise the policy *is* ``adaptive``: the same decisions on every
  snapshot — except, while the online estimate still lacks readings, a few exploratory
  verifications (the first solution of the leading answer while pseudo-positives are
  short, of the ``explore_others`` answers after it (default 1: the runner-up) while
  pseudo-negatives are) that run beside the samples and never change an answer, so
  their pseudo-labels are the vote's and not the verifier's own. When ``adaptive``
  settles while such a reading is in flight, the policy cancels the samples
  (``Cancel("solve")``) and stops once the reading is in: a reading cut by the stop
  would cost tokens and teach nothing (on the AIME pools, with solutions thousands of
  tokens long, the stop used to cut 70-93% of them).
* **Evidence.** Votes and readings combine into one posterior over which answer is
  right (:mod:`policies.evidence`). A solution is read again only when the profile says
  readings of one solution differ (``repeat_icc`` known and below ``max_icc``); the
  repeats are discounted by ``effective_readings``.
* **Stopping.** Settled when the best answer's posterior reaches ``settle`` *and* the
  verifier has read at least one of its solutions (without a reading, the vote-based rule
  of ``adaptive`` decides, as it would alone); when ``adaptive`` stops sampling, the
  policy finishes the verifications it still wants and stops with the posterior's best
  answer — or, with ``extend``, samples on (``width`` in flight, up to ``max``) while the
  posterior is not settled: the votes settled, the verifier doubts them, and the right
  answer may not have been drawn yet. ``doubt`` (the vote prior's probability that the
  most frequent answer is wrong, :func:`policies.evidence.vote_prior`) is what lets the
  verifier's readings overturn a large majority; at 0 they rarely can. Only work that
  fits the budget is asked for (``budget_left.can_sample`` /
  ``can_verify``); told that the budget blocks (``snapshot.blocked``), it stops with
  code ``budget``.

``verify-contested`` verifies every answer that can still win (posterior ≥ ``floor``),
one representative solution per answer at a time, until settled or ``max_reads`` readings
per answer. ``solverify`` chooses by expected gain in P(the chosen answer is right) per
expected token: a verification of answer j costs λ × the mean solution length (λ measured
in the problem, else the profile's, else 1), a sample the mean solution length; it
verifies the answers whose gain per token beats one more sample's (and is at least
``min_gain``), otherwise samples as ``adaptive`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.decisions import Cancel, Decision, Sample, Stop, StopCode, Verify
from orchestrator.errors import ConfigError
from orchestrator.snapshot import AnswerStats, ProblemSnapshot
from orchestrator.types import Solution
from policies.adaptive import Adaptive
from policies.base import failures_allowed, is_count, non_default, num
from policies.evidence import Evidence, evidence, sample_gain, verify_gain
from policies.online import OnlineEstimate, estimate_online
from policies.profile import VerifierProfile

__all__ = ["Solverify", "VerifyContested"]


def _check(policy: str, name: str, ok: bool, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"{policy}: {name} must be {what}, got {value!r}")


#: ``Adaptive``'s constructor parameters and their defaults: the inner ``adaptive``'s
#: parameters of the verifying policies take their defaults from here, so they are written
#: once, in ``Adaptive``
_ADAPTIVE = {f.name: f.default for f in dataclasses.fields(Adaptive) if f.init}


def _stop_of(decisions: Sequence[Decision]) -> Stop | None:
    return next((d for d in decisions if isinstance(d, Stop)), None)


def _mean_solution_tokens(s: ProblemSnapshot) -> float:
    if s.solutions:
        return max(sum(x.completion_tokens for x in s.solutions) / len(s.solutions), 1.0)
    lengths = [n for rec in s.history for n in rec.lengths]
    if lengths:
        return max(sum(lengths) / len(lengths), 1.0)
    return float(max(s.budget_left.sample_tokens, 1))


@dataclass(frozen=True, slots=True)
class _Verifying:
    """What both policies share: the inner ``adaptive``, the verifier profile and the
    evidence."""

    # the inner adaptive's parameters (all of Adaptive's, defaults read from it)
    width: int = _ADAPTIVE["width"]
    confidence: float = _ADAPTIVE["confidence"]
    max: int = _ADAPTIVE["max"]
    min_votes: int = _ADAPTIVE["min_votes"]
    prior: float = _ADAPTIVE["prior"]
    max_failures: int | None = _ADAPTIVE["max_failures"]
    wide: int | None = _ADAPTIVE["wide"]
    shrink: float = _ADAPTIVE["shrink"]
    learn: bool = _ADAPTIVE["learn"]
    loss: float = _ADAPTIVE["loss"]
    rivals: str = _ADAPTIVE["rivals"]
    profile: str | None = None
    settle: float = 0.95
    max_reads: int = 4
    # online: pseudo-labelled solutions per class before the estimate may be trusted, and
    # how many answers besides the leader are read while pseudo-negatives are short;
    # chosen by cross-validation over the quality sweep (README, "Verifiers": 5 and 3
    # within noise of each other and above 10; at 3 a useless verifier passes the trust
    # test more often)
    explore: int = 5
    explore_others: int = 1
    min_auc: float = 0.55
    max_icc: float = 0.5
    doubt: float = 0.0
    extend: bool = False
    _adaptive: Adaptive = field(init=False, repr=False, compare=False)
    _profile: VerifierProfile | None = field(init=False, repr=False, compare=False)

    #: the name in specs (set by each policy)
    NAME = "verifying"
    #: sends solutions to the verifier (the runtime checks a budget can hold one)
    verifies = True

    def __post_init__(self) -> None:
        name = self.NAME
        _check(name, "settle", 0.5 < self.settle < 1.0, self.settle, "in (0.5, 1)")
        _check(name, "max_reads", is_count(self.max_reads, 1), self.max_reads,
               "an integer >= 1")
        _check(name, "explore", is_count(self.explore, 0), self.explore, "an integer >= 0")
        _check(name, "explore_others", is_count(self.explore_others, 1), self.explore_others,
               "an integer >= 1")
        _check(name, "min_auc", 0.0 <= self.min_auc < 1.0, self.min_auc, "in [0, 1)")
        _check(name, "max_icc", 0.0 <= self.max_icc <= 1.0, self.max_icc, "in [0, 1]")
        _check(name, "doubt", 0.0 <= self.doubt < 1.0, self.doubt, "in [0, 1)")
        _check(name, "extend", isinstance(self.extend, bool), self.extend, "true or false")
        inner = Adaptive(**{key: getattr(self, key) for key in _ADAPTIVE})
        object.__setattr__(self, "_adaptive", inner)
        object.__setattr__(self, "wide", inner.wide)  # as adaptive stores it
        loaded = None
        if self.profile:
            loaded = VerifierProfile.load(self.profile)  # DataError on a bad file
        object.__setattr__(self, "_profile", loaded)

    # ---- the spec -----------------------------------------------------------------
    def _spec_parts(self) -> list[str]:
        parts = [f"width={self.width}", f"confidence={num(self.confidence)}", f"max={self.max}",
                 f"min_votes={self.min_votes}", f"prior={num(self.prior)}",
                 f"wide={self._adaptive.widest}", f"shrink={num(self.shrink)}",
                 f"learn={'true' if self.learn else 'false'}", f"loss={num(self.loss)}",
                 f"settle={num(self.settle)}", f"max_reads={self.max_reads}",
                 f"doubt={num(self.doubt)}", f"extend={'true' if self.extend else 'false'}"]
        if self.profile:
            parts.append(f"profile={self.profile}")
        # with a profile the online estimate is not used, but the spec still says them,
        # so it parses back to an equal policy
        parts += [f"explore={self.explore}", f"explore_others={self.explore_others}"]
        return [*parts, *non_default(self, "rivals", "min_auc", "max_icc", "max_failures")]

    @property
    def spec(self) -> str:
        return f"{self.NAME}:" + ",".join([*self._spec_parts(), *self._own_parts()])

    def _own_parts(self) -> list[str]:
        return []

    # ---- the verifier -------------------------------------------------------------
    def verifier(self, s: ProblemSnapshot) -> tuple[VerifierProfile | None,
                                                    OnlineEstimate | None]:
        """(the profile to use, or None: do not use the verifier; the online estimate
        while the policy explores, else None)."""
        if self._profile is not None:
            return (self._profile if self._profile.useful(self.min_auc) else None), None
        if self.explore == 0:
            return None, None
        est = estimate_online(s.history, min_per_class=self.explore, min_auc=self.min_auc)
        usable = est.usable
        if usable is not None:
            return usable, None
        # still collecting until both classes have enough (no cap on the total: on an
        # easy pool the pseudo-positives fill first, and a cap on both together stopped the
        # exploration before any contested problem was read for a pseudo-negative)
        exploring = not est.enough
        return None, est if exploring else None

    def rereads(self, profile: VerifierProfile) -> bool:
        """Is a second reading of one solution worth asking for?"""
        return profile.repeat_icc is not None and profile.repeat_icc < self.max_icc

    def _explore(self, s: ProblemSnapshot, base: Sequence[Decision], est: OnlineEstimate
                 ) -> list[Decision]:
        """``adaptive``'s decisions plus exploratory verifications, which change no answer:
        the first solution of the leader while the estimate lacks pseudo-positives, of each
        of the next ``explore_others`` answers while it lacks pseudo-negatives (the scarce
        class: only contested problems have them). A settled stop waits for the readings
        in flight, its samples cancelled (only a problem that settled gives pseudo-labels,
        and only a reading that returned is one)."""
        stop = _stop_of(base)
        if stop is not None:
            if stop.code != "settled" or s.blocked or not s.in_flight.verification_total:
                return list(base)
            return [Cancel("solve")] if s.in_flight.samples else []
        if not s.budget_left.can_verify or s.blocked:
            return list(base)
        answers = s.answers()
        wanted = [*answers[:1]] if est.positives < self.explore else []
        if est.negatives < self.explore:
            wanted += answers[1:1 + self.explore_others]
        extra = [Verify(a.solutions[0]) for a in wanted
                 if a.verified + a.verifying + a.failed_verifications == 0]
        return [*base, *extra]

    def _target(self, a: AnswerStats, profile: VerifierProfile) -> Solution | None:
        """The solution of ``a`` to read next: one at a time per answer, at most
        ``max_reads`` asked per answer, a solution already read only when readings of one
        solution differ (None: none worth reading)."""
        if a.verifying or a.verified + a.failed_verifications >= self.max_reads:
            return None
        rep = a.representative
        if a.readings_of(rep.id) and not self.rereads(profile):
            return None
        return rep

    def _finish(self, s: ProblemSnapshot, ev: Evidence, why: str, code: StopCode) -> Stop:
        best = ev.best
        if best is None:
            return Stop(None, f"{self.NAME}: {why}; no solution had an answer", code=code)
        a = ev.answers[best]
        return Stop(a.answer, f"{self.NAME}: {why}; P(right) = {ev.post[best]:.3f} with "
                              f"{a.votes} vote(s), {len(a.scores)} reading(s)", a.key, code)

    # ---- the decision -----------------------------------------------------------------
    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        base = self._adaptive.decide(s)
        profile, exploring = self.verifier(s)
        if profile is None:
            return base if exploring is None else self._explore(s, base, exploring)
        ev = evidence(s, profile, self.prior, self.doubt)
        if s.blocked is not None:
            return [self._finish(s, ev, s.blocked.reason, "budget")]
        best = ev.best
        if best is not None and ev.post[best] >= self.settle and ev.answers[best].scores:
            return [self._finish(s, ev, f"settled (>= {self.settle:g})", "settled")]
        base_stop = _stop_of(base)
        verifies = self._verifications(s, ev, profile, base if base_stop is None else None)
        if base_stop is None:
            return base if verifies is None else verifies
        if verifies or s.in_flight.verification_total:
            return verifies or []  # adaptive's stop waits for the evidence still wanted
        more = self._extension(s, base_stop)
        if more is not None:
            return more
        code = base_stop.code
        return [self._finish(s, ev, f"sampling over ({base_stop.reason})", code)]

    def _extension(self, s: ProblemSnapshot, base_stop: Stop) -> list[Decision] | None:
        """With ``extend``: when the votes settled ``adaptive`` but the posterior is not
        settled and no verification is wanted, sample on, ``width`` in flight, up to
        ``max`` (None: stop now)."""
        if not self.extend or base_stop.code != "settled":
            return None
        finished = len(s.solutions)
        max_failures = failures_allowed(self.max_failures, self.max)
        if finished >= self.max or s.failed_samples > max_failures:
            return None  # as adaptive: no sampling past the horizon or the failure cap
        want = min(self.width, self.max - finished) - s.in_flight.samples
        if want > 0 and s.budget_left.can_sample:
            return [Sample(want)]
        return [] if s.in_flight.samples else None

    def _verifications(self, s: ProblemSnapshot, ev: Evidence, profile: VerifierProfile,
                       base: Sequence[Decision] | None) -> list[Decision] | None:
        """What to launch now. ``base``: adaptive's sampling decisions (None when adaptive
        stops sampling). Returns None to do just what adaptive does."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class VerifyContested(_Verifying):
    """Sample like ``adaptive``; verify every answer that can still win (posterior ≥
    ``floor``), one representative solution per answer at a time, until settled."""

    floor: float = 0.05
    # the operating point chosen by cross-validation over the quality sweep (README,
    # "Verifiers"): read to settle 0.99, up to 16 readings per answer, the votes doubted,
    # sampling on while the verifier doubts what the votes settled
    settle: float = 0.99
    max_reads: int = 16
    doubt: float = 0.2
    extend: bool = True

    NAME = "verify-contested"

    def _own_parts(self) -> list[str]:
        return [f"floor={num(self.floor)}"]

    def __post_init__(self) -> None:
        _Verifying.__post_init__(self)
        _check(self.NAME, "floor", 0.0 <= self.floor < 1.0, self.floor, "in [0, 1)")

    def _verifications(self, s: ProblemSnapshot, ev: Evidence, profile: VerifierProfile,
                       base: Sequence[Decision] | None) -> list[Decision] | None:
        if not s.budget_left.can_verify:
            return None if base is not None else []
        out: list[Decision] = []
        for i, a in enumerate(ev.answers):
            if ev.post[i] < self.floor:
                continue
            target = self._target(a, profile)
            if target is not None:
                out.append(Verify(target))
        return [*base, *out] if base is not None else out


@dataclass(frozen=True, slots=True)
class Solverify(_Verifying):
    """At each step: Sample, Verify(candidate) or Stop by the expected gain in P(the
    chosen answer is right) per expected token."""

    min_gain: float = 0.002
    # chosen by cross-validation over the quality sweep (README, "Verifiers"); extend
    # stays off: solverify rarely settles a posterior at 0.99, so it would sample to max
    settle: float = 0.99
    max_reads: int = 16
    doubt: float = 0.05

    NAME = "solverify"

    def _own_parts(self) -> list[str]:
        return [f"min_gain={num(self.min_gain)}"]

    def __post_init__(self) -> None:
        _Verifying.__post_init__(self)
        _check(self.NAME, "min_gain", 0.0 <= self.min_gain < 1.0, self.min_gain, "in [0, 1)")

    def _verifications(self, s: ProblemSnapshot, ev: Evidence, profile: VerifierProfile,
                       base: Sequence[Decision] | None) -> list[Decision] | None:
        sampling = base is not None
        if not s.budget_left.can_verify:
            return None if sampling else []
        tokens = _mean_solution_tokens(s)
        lam = s.lam if s.lam is not None else (profile.lam if profile.lam else 1.0)
        verify_cost = max(lam * tokens, 1e-9)
        bar = sample_gain(ev, self.prior, self.doubt) / tokens if sampling else 0.0
        out: list[Decision] = []
        for i, a in enumerate(ev.answers):
            target = self._target(a, profile)
            if target is None:
                continue
            gain = verify_gain(ev, i, target.id, profile)
            if gain >= self.min_gain and gain / verify_cost > bar:
                out.append(Verify(target))
        if sampling and not out:
            return None
        return out
