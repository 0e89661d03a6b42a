"""One posterior over which answer is right, from votes and verifier readings; and what
one more sample or one more verification is expected to add to it.

Model (small, explicit, and what the tests brute-force):

* **Votes.** The answers seen so far are categories 1..K, plus one *rest* category
  (samples without an answer, and answers not seen yet). The per-sample answer shares
  are p ~ Dirichlet(votes + ``prior``). Self-Consistency's premise is that the right
  answer is the most frequent one, so the vote prior of "answer j is right" is
  P(p_j is the largest share | votes) (:func:`mode_probabilities`; for the rest
  category it stands for "none of the seen answers is right"). That premise fails on
  some problems (the most frequent answer of a whole AIME 2024 pool is wrong on 2-8 of
  its 30 problems, and on about half of those a minority answer is right), so with
  ``doubt`` = δ > 0 the vote prior is the mixture (1 - δ)·P(j is the mode) + δ·(the
  Dirichlet predictive share of j, (votes_j + prior) / (total + categories·prior)): with
  probability δ the right answer is not the mode, and then as likely to be j as the next
  sample is to land on j (:func:`vote_prior`). δ = 0 is the pure premise; a larger δ
  lets verifier evidence overturn a larger majority.
* **Readings.** Given which answer c is right, a reading of a solution of c is drawn from
  the profile's P(Yes)|correct density, a reading of any other solution from
  P(Yes)|wrong (:class:`~policies.profile.VerifierProfile`). Relative to "every solution
  is wrong", hypothesis c gains exp(sum of the log-likelihood ratios of c's readings).
  Repeated readings of one solution are not independent: the ``k`` readings of one
  solution count as ``effective_readings(k)`` independent ones (their mean LLR times
  that), so a verifier that repeats itself (``repeat_icc`` near 1) is worth one reading
  per solution however often it is asked.
* **Posterior** ∝ vote prior × verifier factor (:func:`posterior`).

Expected gains (myopic, one step): :func:`verify_gain` averages the posterior's maximum
over the predictive distribution of one more reading of a given solution (a quadrature
over the profile's two Beta densities); :func:`sample_gain` over where one more sample
lands (the Dirichlet predictive). Both return the expected increase in P(the answer
chosen is right).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from orchestrator.snapshot import AnswerStats, ProblemSnapshot
from policies.profile import VerifierProfile

__all__ = [
    "Evidence",
    "evidence",
    "mode_probabilities",
    "posterior",
    "sample_gain",
    "solution_evidence",
    "verify_gain",
    "vote_prior",
]

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(128)
#: quadrature points per Beta density for the predictive of one more reading
GRID = 24


@lru_cache(maxsize=65536)
def mode_probabilities(counts: tuple[int, ...], prior: float = 1.0) -> tuple[float, ...]:
    """P(category j has the largest share) for p ~ Dirichlet(counts + prior), every j.

    With independent G_j ~ Gamma(counts_j + prior), p = G / sum(G), so the probability is
    the integral of G_j's density times every other Gamma's CDF, by 128-point
    Gauss-Legendre quadrature over [0, largest mean + 12 sd + 12]; normalised to sum to 1.
    """
    if not counts:
        return ()
    if len(counts) == 1:
        return (1.0,)
    alpha = np.asarray(counts, dtype=np.float64) + prior
    top = float(alpha.max())
    hi = top + 12.0 * math.sqrt(top) + 12.0
    x = 0.5 * hi * (_NODES + 1.0)
    w = 0.5 * hi * _WEIGHTS
    log_pdf = ((alpha[:, None] - 1.0) * np.log(x[None, :]) - x[None, :]
               - special.gammaln(alpha)[:, None])
    log_cdf = np.log(np.maximum(special.gammainc(alpha[:, None], x[None, :]), 1e-300))
    total = log_cdf.sum(axis=0)
    vals = (np.exp(log_pdf + total[None, :] - log_cdf) * w[None, :]).sum(axis=1)
    vals = np.maximum(vals, 0.0)
    s = vals.sum()
    return tuple(float(v / s) for v in vals) if s > 0 else tuple([1.0 / len(counts)] * len(counts))


def solution_evidence(readings: Sequence[float], profile: VerifierProfile) -> float:
    """The log factor one solution's readings give "its answer is right": the mean
    log-likelihood ratio times the effective number of readings."""
    k = len(readings)
    if k == 0:
        return 0.0
    mean = sum(profile.log_lr(p) for p in readings) / k
    return mean * profile.effective_readings(k)


@dataclass(frozen=True, slots=True)
class Evidence:
    """The posterior's inputs and result for one snapshot.

    ``answers`` as in :meth:`ProblemSnapshot.answers`; ``counts`` the vote counts of the
    answers then the rest category; ``log_factor`` per answer (rest: 0); ``post`` the
    posterior per answer then rest.
    """

    answers: tuple[AnswerStats, ...]
    counts: tuple[int, ...]
    log_factor: tuple[float, ...]
    post: tuple[float, ...]

    @property
    def best(self) -> int | None:
        """Index of the answer with the highest posterior (ties: more votes, earlier)."""
        if not self.answers:
            return None
        return max(range(len(self.answers)), key=lambda i: (self.post[i], -i))

    @property
    def value(self) -> float:
        """P(the best answer is right)."""
        b = self.best
        return 0.0 if b is None else self.post[b]


def vote_prior(counts: Sequence[int], prior: float = 1.0, doubt: float = 0.0
               ) -> tuple[float, ...]:
    """P(category j holds the right answer | votes): (1 - ``doubt``) × P(j is the mode)
    (:func:`mode_probabilities`) + ``doubt`` × j's Dirichlet predictive share."""
    key = tuple(int(c) for c in counts)
    mode = mode_probabilities(key, prior)
    if doubt <= 0.0 or not key:
        return mode
    total = sum(key) + len(key) * prior
    return tuple((1.0 - doubt) * m + doubt * (c + prior) / total
                 for m, c in zip(mode, key, strict=True))


def posterior(counts: Sequence[int], log_factor: Sequence[float], prior: float = 1.0,
              doubt: float = 0.0) -> tuple[float, ...]:
    """Vote prior (:func:`vote_prior`) × exp(log factor), normalised. ``counts`` and
    ``log_factor`` have one entry per category (answers, then rest)."""
    return _normalise(vote_prior(counts, prior, doubt), log_factor)


def _normalise(base: Sequence[float], log_factor: Sequence[float]) -> tuple[float, ...]:
    lf = np.asarray(log_factor, dtype=np.float64)
    logp = np.log(np.maximum(np.asarray(base, dtype=np.float64), 1e-300)) + lf
    logp -= logp.max()
    p = np.exp(logp)
    return tuple(float(v) for v in p / p.sum())


def evidence(s: ProblemSnapshot, profile: VerifierProfile | None, prior: float = 1.0,
             doubt: float = 0.0) -> Evidence:
    """The posterior for snapshot ``s`` (``profile=None``: votes only; ``doubt``: see
    :func:`vote_prior`)."""
    answers = s.answers()
    voted = sum(a.votes for a in answers)
    rest = len(s.solutions) - voted
    counts = (*(a.votes for a in answers), rest)
    if profile is None:
        factor = (0.0,) * len(counts)
    else:
        factor = (*(sum(solution_evidence(ps, profile) for _, ps in a.readings)
                    for a in answers), 0.0)
    return Evidence(answers, counts, factor, posterior(counts, factor, prior, doubt))


@lru_cache(maxsize=256)
def _reading_grid(profile: VerifierProfile) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes of P(Yes) under the correct and the wrong density (``GRID``
    quantiles each, equal weights)."""
    from scipy import stats  # here, not at the top: about a second of CPU to import

    q = (np.arange(GRID) + 0.5) / GRID
    good = stats.beta.ppf(q, profile.correct.a, profile.correct.b)
    bad = stats.beta.ppf(q, profile.wrong.a, profile.wrong.b)
    return good, bad


@lru_cache(maxsize=256)
def _grid_llr(profile: VerifierProfile) -> tuple[np.ndarray, np.ndarray]:
    """``profile.log_lr`` at the nodes of :func:`_reading_grid`."""
    good, bad = _reading_grid(profile)
    return (np.array([profile.log_lr(float(r)) for r in good]),
            np.array([profile.log_lr(float(r)) for r in bad]))


def verify_gain(ev: Evidence, index: int, solution_id: int, profile: VerifierProfile
                ) -> float:
    """Expected increase of P(the chosen answer is right) from one more reading of
    solution ``solution_id`` of answer ``index`` (the vote prior does not change).

    The reading is drawn from the predictive mixture post_j·f_correct + (1 - post_j)·
    f_wrong; after it, only answer j's factor changes, so the new posterior's maximum is
    max(post_j·e, best other) / (1 - post_j + post_j·e) with e the factor's change."""
    if not ev.answers:
        return 0.0
    old = ev.answers[index].readings_of(solution_id)
    k = len(old)
    before = solution_evidence(old, profile)
    old_sum = sum(profile.log_lr(p) for p in old)
    per = profile.effective_readings(k + 1) / (k + 1)
    p_j = ev.post[index]
    others = max((p for i, p in enumerate(ev.post[:-1]) if i != index), default=0.0)
    total = 0.0
    for llr, weight in zip(_grid_llr(profile), (p_j, 1.0 - p_j), strict=True):
        if weight <= 0:
            continue
        e = np.exp(np.minimum(per * (old_sum + llr) - before, 700.0))
        new_max = np.maximum(p_j * e, others) / (1.0 - p_j + p_j * e)
        total += weight * float(new_max.mean())
    return max(total - ev.value, 0.0)


def sample_gain(ev: Evidence, prior: float = 1.0, doubt: float = 0.0) -> float:
    """Expected increase of P(the chosen answer is right) from one more sample, which
    lands on category j with the Dirichlet predictive probability (counts_j + prior) /
    (total + categories · prior); a new answer is counted in the rest category. ``prior``
    and ``doubt`` as the evidence was computed with."""
    counts = ev.counts
    total = sum(counts) + len(counts) * prior
    out = 0.0
    for j in range(len(counts)):
        q = (counts[j] + prior) / total
        bumped = tuple(c + (1 if i == j else 0) for i, c in enumerate(counts))
        post = _normalise(vote_prior(bumped, prior, doubt), ev.log_factor)
        out += q * max(post[:-1], default=0.0)
    return max(out - ev.value, 0.0)
