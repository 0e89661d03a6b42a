"""How good a verifier is, as policies that decide *when to verify* need to know it.

A :class:`VerifierProfile` is measured on labelled data (``solverify bench verifier``) or
estimated online, saved as a small JSON file, and passed to a policy (``profile=FILE``).
It holds:

* the P(Yes) distributions of correct and of wrong solutions, as Beta fits (method of
  moments on per-reading scores clipped to [``EPS``, 1 - ``EPS``]) — a policy turns a
  reading into evidence with :meth:`VerifierProfile.log_lr`;
* ``auc``: P(score of a random correct solution > score of a random wrong one) over
  per-solution mean scores (ties count half); 0.5 is a useless verifier, below 0.5 a
  misleading one;
* ``repeat_icc``: the share of the P(Yes) variance that lies *between* solutions (an
  intra-class correlation over solutions read at least twice). 1 means a second reading
  of a solution repeats the first and adds no evidence; 0 means readings are independent.
  ``k`` readings are worth :meth:`effective_readings` (``k / (1 + (k - 1) icc)``)
  independent ones;
* ``lam``: measured λ = mean verification tokens / mean solution tokens;
* ``scaling`` (optional): the compute-optimal power law S_opt = s_coef·C^s_exp,
  V_opt = v_coef·C^v_exp fitted by ``solverify bench compute-matched``.

File format (JSON object, ``"format": "solverify.verifier_profile"``, ``"version": 1``);
unknown keys are ignored, a missing required key or a wrong type is a ``DataError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import DataError

FORMAT = "solverify.verifier_profile"
VERSION = 1
#: readings are clipped to [EPS, 1 - EPS] before fitting and scoring (P(Yes) read from
#: logprobs can be exactly 0 or 1)
EPS = 1e-3
#: the largest |log-likelihood ratio| one reading may contribute
MAX_LOG_LR = 6.0


@dataclass(frozen=True, slots=True)
class BetaFit:
    """A Beta(a, b) density over P(Yes)."""

    a: float
    b: float

    def __post_init__(self) -> None:
        if not (self.a > 0 and self.b > 0 and math.isfinite(self.a) and math.isfinite(self.b)):
            raise DataError(f"Beta parameters must be positive and finite, got {self.a}, {self.b}")

    @property
    def mean(self) -> float:
        return self.a / (self.a + self.b)

    def logpdf(self, x: float) -> float:
        x = min(max(x, EPS), 1 - EPS)
        return ((self.a - 1) * math.log(x) + (self.b - 1) * math.log1p(-x)
                - (math.lgamma(self.a) + math.lgamma(self.b) - math.lgamma(self.a + self.b)))

    @classmethod
    def fit(cls, values: Iterable[float]) -> BetaFit:
        """Method of moments; a degenerate sample (n < 2 or no spread) gets a wide fit
        around its mean (concentration 2 + n), so it never claims certainty."""
        xs = [min(max(float(v), EPS), 1 - EPS) for v in values]
        if not xs:
            return cls(1.0, 1.0)
        n = len(xs)
        m = sum(xs) / n
        var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
        limit = m * (1 - m)
        if var <= 1e-12 or var >= limit:
            conc = 2.0 + min(n, 50)
            return cls(max(m * conc, 1e-3), max((1 - m) * conc, 1e-3))
        conc = limit / var - 1
        return cls(m * conc, (1 - m) * conc)


@dataclass(frozen=True, slots=True)
class ScalingLaw:
    """S_opt = s_coef · C^s_exp and V_opt = v_coef · C^v_exp (C in units of C(S,V)).

    Optional, as fitted by ``solverify bench compute-matched``: ``crossover`` (the compute
    from which the best GenRM matches or beats the best SC; below it SC is the better use
    of compute), ``verify_pays`` (False: GenRM never caught up with SC on the fitted grid,
    so SC is better at every compute), ``lam`` (the λ the law was fitted at) and the range
    of compute ``c_min``..``c_max`` it was fitted on.
    """

    s_coef: float
    s_exp: float
    v_coef: float
    v_exp: float
    crossover: float | None = None
    verify_pays: bool = True
    lam: float | None = None
    c_min: float | None = None
    c_max: float | None = None

    def allocation(self, compute: float) -> tuple[int, int]:
        """(S, V) for ``compute`` units: both at least 1, rounded to the nearest integer."""
        s = max(1, round(self.s_coef * compute ** self.s_exp))
        v = max(1, round(self.v_coef * compute ** self.v_exp))
        return s, v

    def prefers_sc(self, compute: float) -> bool:
        """Whether SC (no verification) is the better use of ``compute`` units."""
        if not self.verify_pays:
            return True
        return self.crossover is not None and compute < self.crossover

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScalingLaw:
        def opt(key: str) -> float | None:
            return _opt_float(d.get(key))

        return cls(float(d["s_coef"]), float(d["s_exp"]), float(d["v_coef"]),
                   float(d["v_exp"]), crossover=opt("crossover"),
                   verify_pays=bool(d.get("verify_pays", True)), lam=opt("lam"),
                   c_min=opt("c_min"), c_max=opt("c_max"))


@dataclass(frozen=True, slots=True)
class VerifierProfile:
    correct: BetaFit
    wrong: BetaFit
    auc: float | None
    lam: float | None = None
    repeat_icc: float | None = None
    within_sd: float | None = None
    n_correct: int = 0
    n_wrong: int = 0
    n_readings: int = 0
    parse_rate: float = 1.0
    source: str = ""
    simulated: bool = False
    scaling: ScalingLaw | None = None

    # ---- what a policy asks -----------------------------------------------------------
    def log_lr(self, p_yes: float) -> float:
        """log P(reading | correct) - log P(reading | wrong), clipped to ±MAX_LOG_LR."""
        d = self.correct.logpdf(p_yes) - self.wrong.logpdf(p_yes)
        return max(-MAX_LOG_LR, min(MAX_LOG_LR, d))

    def effective_readings(self, k: int) -> float:
        """What ``k`` readings of one solution are worth in independent readings."""
        if k <= 0:
            return 0.0
        icc = 0.0 if self.repeat_icc is None else min(max(self.repeat_icc, 0.0), 1.0)
        return k / (1 + (k - 1) * icc)

    def useful(self, min_auc: float = 0.55) -> bool:
        """Worth consulting at all: an AUC above ``min_auc`` (unknown AUC: no)."""
        return self.auc is not None and self.auc > min_auc

    # ---- measuring --------------------------------------------------------------------
    @classmethod
    def from_readings(
        cls,
        readings: Iterable[tuple[Any, bool, float | None]],
        *,
        lam: float | None = None,
        source: str = "",
        simulated: bool = False,
        scaling: ScalingLaw | None = None,
    ) -> VerifierProfile:
        """Measure a profile from ``(solution id, correct, p_yes)`` readings; a reading
        whose P(Yes) did not parse has ``p_yes=None`` (it lowers ``parse_rate``)."""
        by_solution: dict[Any, tuple[bool, list[float]]] = {}
        total = parsed = 0
        for sid, label, p in readings:
            total += 1
            entry = by_solution.setdefault(sid, (bool(label), []))
            if p is not None and math.isfinite(p):
                parsed += 1
                entry[1].append(min(max(float(p), 0.0), 1.0))
        if parsed == 0:
            raise DataError(f"no parsed verifier readings in {source or 'the data'}")
        good = [ps for lab, ps in by_solution.values() if lab and ps]
        bad = [ps for lab, ps in by_solution.values() if not lab and ps]
        return cls(
            correct=BetaFit.fit(p for ps in good for p in ps),
            wrong=BetaFit.fit(p for ps in bad for p in ps),
            auc=auc([sum(ps) / len(ps) for ps in good], [sum(ps) / len(ps) for ps in bad]),
            lam=lam,
            repeat_icc=repeat_icc(good, bad),
            within_sd=within_sd([ps for ps in good + bad]),
            n_correct=len(good), n_wrong=len(bad), n_readings=parsed,
            parse_rate=parsed / total, source=source, simulated=simulated, scaling=scaling,
        )

    @classmethod
    def from_history(
        cls,
        records: Iterable[Any],
        *,
        settled: Iterable[str] = ("settled",),
        source: str = "online (pseudo-labels from settled majorities)",
    ) -> VerifierProfile | None:
        """Estimate a profile without ground truth, from a run's finished problems
        (:class:`orchestrator.history.ProblemRecord`), by :func:`pseudo_labelled`: a
        reading is labelled correct when the verified solution's answer is its problem's
        vote majority (records whose ``stop_code`` is in ``settled`` and whose top vote is
        not tied: ``ProblemRecord.majority``), wrong otherwise. ``None`` when no such
        record has a reading. λ is measured from the records' token counts;
        ``repeat_icc``/``within_sd`` are measured when records say which solution each
        reading is of (``reading_solutions``), else unknown. The pseudo-labels are only
        as good as the majorities: see ``solverify bench verifier`` for how far this
        estimate lies from the true-label one. This is the one online
        estimator; :mod:`policies.online` adds the margin a policy needs to trust it.
        """
        codes = frozenset(settled)
        used = [r for r in records
                if r.stop_code in codes and r.readings and r.majority is not None]
        readings = pseudo_labelled(used, codes)
        if not readings:
            return None
        v_tokens = sum(r.verification_tokens for r in used)
        sol_tokens = sum(r.solution_tokens for r in used)
        n_solutions = sum(len(r.keys) for r in used)
        lam = None
        if sol_tokens > 0 and n_solutions > 0:
            lam = (v_tokens / len(readings)) / (sol_tokens / n_solutions)
        return cls.from_readings(readings, lam=lam, source=source)

    # ---- files ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "profile") -> VerifierProfile:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise DataError(f"{where}: not a verifier profile (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise DataError(f"{where}: unsupported profile version {d.get('version')!r}")
        try:
            scaling = d.get("scaling")
            return cls(
                correct=BetaFit(float(d["correct"]["a"]), float(d["correct"]["b"])),
                wrong=BetaFit(float(d["wrong"]["a"]), float(d["wrong"]["b"])),
                auc=_opt_float(d.get("auc")),
                lam=_opt_float(d.get("lam")),
                repeat_icc=_opt_float(d.get("repeat_icc")),
                within_sd=_opt_float(d.get("within_sd")),
                n_correct=int(d.get("n_correct", 0)), n_wrong=int(d.get("n_wrong", 0)),
                n_readings=int(d.get("n_readings", 0)),
                parse_rate=float(d.get("parse_rate", 1.0)),
                source=str(d.get("source", "")), simulated=bool(d.get("simulated", False)),
                scaling=None if scaling is None else ScalingLaw.from_dict(scaling),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed verifier profile ({exc!r})") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> VerifierProfile:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"cannot read verifier profile {p}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(d, str(p))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def pseudo_labelled(records: Iterable[Any], settled: Iterable[str] = ("settled",)
                    ) -> list[tuple[tuple[str, int], bool, float]]:
    """``(solution id, pseudo-label, P(Yes))`` for every reading of a record whose
    ``stop_code`` is in ``settled`` and whose votes have one most frequent answer: the
    label is whether the read solution's answer is that *vote majority*
    (``ProblemRecord.majority``) (a solution
    without an answer is never right). A record whose top vote is tied is left out.

    The label is the votes', never the answer the record stopped with: a policy that
    lets the verifier choose the answer stops with the verifier's pick, and labelling by
    it made the readings that chose an answer count as confirming it, so a useless
    verifier that passed the trust test by chance kept passing it (found by review: AIME
    AM-Thinking, Beta(1,1) readings, one order of ten trusted from 1249 s on, estimated
    AUC 0.72 at the end). The id is (problem id, the solution's completion index) when
    the record says which solution each reading is of, else (problem id, -1 - reading
    position), so repeated readings of one solution are grouped only when the record
    says so."""
    codes = frozenset(settled)
    out = []
    for rec in records:
        if rec.stop_code not in codes:
            continue
        majority = rec.majority
        if majority is None:
            continue
        where = rec.reading_solutions if len(rec.reading_solutions) == len(rec.readings) \
            else None
        for i, (key, p) in enumerate(rec.readings):
            sid = (rec.problem_id, where[i] if where is not None else -1 - i)
            out.append((sid, key is not None and key == majority, float(p)))
    return out


def auc(positives: Iterable[float], negatives: Iterable[float]) -> float | None:
    """Mann-Whitney AUC: P(pos > neg) + P(pos == neg) / 2; None when a side is empty."""
    pos = sorted(positives)
    neg = sorted(negatives)
    if not pos or not neg:
        return None
    # count, for each positive, negatives below it and equal to it (two pointers)
    wins = 0.0
    lo = hi = 0
    for p in pos:
        while lo < len(neg) and neg[lo] < p:
            lo += 1
        hi = max(hi, lo)
        while hi < len(neg) and neg[hi] <= p:
            hi += 1
        wins += lo + (hi - lo) / 2
    return wins / (len(pos) * len(neg))


def repeat_icc(*classes: Iterable[list[float]]) -> float | None:
    """One-way ICC(1) over solutions read at least twice: how alike two readings of one
    solution are, against readings of other solutions *of the same class* (None when
    there are too few or the readings have no spread at all). Clipped to [0, 1].

    Each argument is one class's groups (``repeat_icc(correct, wrong)``): a solution's
    mean is compared with its class's mean, not the grand mean, so the difference between
    the classes (what the verifier is for) is not counted as agreement between readings
    (found by review: pooled, readings drawn independently gave 0.39 at AUC 0.90, and 0.83
    at a stronger verifier, which turned re-reading off). One argument: the plain ICC(1).
    """
    strata = [[g for g in groups if len(g) >= 2] for groups in classes]
    strata = [gs for gs in strata if gs]
    n = sum(len(g) for gs in strata for g in gs)
    k = sum(len(gs) for gs in strata)
    df_between = k - len(strata)
    if df_between < 1:
        return None
    ss_between = ss_within = 0.0
    sizes = 0.0  # sum over classes of (sum of squared group sizes / class size)
    for gs in strata:
        size = sum(len(g) for g in gs)
        mean = sum(sum(g) for g in gs) / size
        sizes += sum(len(g) ** 2 for g in gs) / size
        for g in gs:
            m = sum(g) / len(g)
            ss_between += len(g) * (m - mean) ** 2
            ss_within += sum((x - m) ** 2 for x in g)
    ms_between = ss_between / df_between
    ms_within = ss_within / (n - k) if n > k else 0.0
    k0 = (n - sizes) / df_between  # mean group size, unbalanced and nested in classes
    denom = ms_between + (k0 - 1) * ms_within
    if denom <= 1e-15:
        return 1.0 if ms_within <= 1e-15 else None
    return min(max((ms_between - ms_within) / denom, 0.0), 1.0)


def within_sd(groups: Iterable[list[float]]) -> float | None:
    """Mean standard deviation of P(Yes) across readings of one solution (solutions read
    at least twice)."""
    sds = []
    for g in groups:
        if len(g) >= 2:
            m = sum(g) / len(g)
            sds.append(math.sqrt(sum((x - m) ** 2 for x in g) / (len(g) - 1)))
    return sum(sds) / len(sds) if sds else None
