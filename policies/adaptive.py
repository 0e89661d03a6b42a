"""``adaptive``: stop sampling when the remaining samples can no longer (or are unlikely
to) change what Self-Consistency over ``max`` samples would answer.

The published rules ask "is the leading answer the most likely one?" (Adaptive-Consistency's
Beta criterion I_{1/2}(b+1, a+1) ≥ C) — a question about infinitely many samples. A user
who would otherwise run ``sc:n=max`` wants a different, cheaper-to-satisfy guarantee: *the
answer I stop with is the one ``sc:n=max`` would have given*. With k votes in hand only
``max - k`` samples remain to be drawn, and a lead that those few samples cannot plausibly
overturn is settled long before the Beta criterion fires. So the policy computes the
posterior-predictive probability that the ``max - k`` samples still to come give the
runner-up at least as many votes as the leader, and stops once that probability is at most
``1 - confidence``. When the lead exceeds the number of samples still to come, the stop is
exact (no sample can change the winner). The model has three outcomes — the leader, the
runner-up, everything else lumped — so the probability is that of the *runner-up*
catching up: with several answers close behind it, the chance that some answer other than
the leader wins ``sc:n=max`` is higher than the one computed (a review's Monte Carlo at
votes 5-1-1-1-1-1-1: 0.19 against the 0.05 computed). ``confidence`` is therefore a
setting calibrated by cross-validation (its measured agreement with ``sc:n=all`` is in the
README's tables), not a guarantee. ``rivals=all`` sums the risk over every answer the
remaining samples can still bring level with the leader (a union bound; 0.29 there); it
is not the default: cross-validated, it saves 9-16% fewer tokens for at most +0.10 pp, a
trade ``wide=24`` makes better (README "Harder batches", ``rivals=all``).

The prior is learned from the run (empirical Bayes). A problem is summarised by the
shares (u, v, 1-u-v) of its leading answer, its runner-up and everything else. The
problems of one batch share a model and a task, so how concentrated their answers are is
shared evidence: a batch where most answers are unanimous makes an early 3-0 lead strong
evidence; a batch full of split votes makes it weak. The prior over (u, v) is a histogram
on a grid of the simplex, fitted by EM (maximum marginal likelihood, the multinomial
likelihood of each finished problem's votes — valid under optional stopping, since a
stopping rule that depends only on the votes seen leaves the likelihood unchanged) to the
problems already finished in the run (``snapshot.history``), shrunk towards the flat
Dirichlet(``prior``) base measure with the weight of ``shrink`` problems. With no history
the rule is the flat-prior one. The prior is symmetric in (u, v): the current leader may be
the answer with the smaller share.

Sampling follows the evidence: ``width`` samples are kept in flight (topped up as each one
finishes); when the votes are contested — a proportional extrapolation of the current
split needs more samples than that to settle — up to ``wide`` are kept in flight, so a
hard problem does not take many waves; on ``Stop`` the runtime cancels the stragglers,
which in reasoning models are the long — and more often wrong — traces.

An overturn between two answers of nearly equal share changes little, so the policy also
stops when the *expected accuracy lost* by stopping is at most ``loss``: under
Self-Consistency's own assumption (an answer is right with the probability of its share),
stopping at shares (u, v) instead of going on to the horizon loses P(overturn | u, v)·(v - u),
averaged over the posterior (:func:`posterior_risk`).

``confidence`` and ``loss`` are the knobs: the target probability of agreeing with
``sc:n=max`` per decision, and the accuracy a stop may cost; ``solverify bench calibrate
--folds model`` chooses them by leave-one-model-out cross-validation over recorded pools.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import gammaln

from orchestrator.decisions import Decision, Sample
from orchestrator.errors import ConfigError
from orchestrator.history import ProblemRecord
from orchestrator.snapshot import ProblemSnapshot
from policies.base import failures_allowed, is_count, non_default, num
from policies.votes import majority_stop


@lru_cache(maxsize=65536)
def overturn_probability(a: int, b: int, rest: int, remaining: int, prior: float = 1.0
                        ) -> float:
    """P(the runner-up ends with at least the leader's votes after ``remaining`` samples).

    Counts so far: leader ``a``, runner-up ``b``, all other outcomes (other answers and
    samples without an answer) ``rest``. The next ``remaining`` samples are drawn from the
    Dirichlet-multinomial posterior predictive with parameters (a, b, rest) + ``prior``.
    Exact: sums the predictive over every split (x_a, x_b, x_rest) of ``remaining``.
    """
    if remaining <= 0:
        return 0.0 if a > b else 1.0
    lead = a - b
    if lead > remaining:
        return 0.0
    alpha = np.array([a + prior, b + prior, rest + prior], dtype=float)
    total = alpha.sum()
    xa = np.arange(remaining + 1)[:, None]
    xb = np.arange(remaining + 1)[None, :]
    xr = remaining - xa - xb
    valid = (xr >= 0) & (xb - xa >= lead)
    xr = np.where(xr >= 0, xr, 0)
    log_p = (
        gammaln(remaining + 1) - gammaln(xa + 1) - gammaln(xb + 1) - gammaln(xr + 1)
        + gammaln(total) - gammaln(total + remaining)
        + gammaln(alpha[0] + xa) - gammaln(alpha[0])
        + gammaln(alpha[1] + xb) - gammaln(alpha[1])
        + gammaln(alpha[2] + xr) - gammaln(alpha[2])
    )
    return float(np.exp(log_p[valid]).sum()) if valid.any() else 0.0


#: what ``rivals`` may be: the answers whose overturn risk the stop counts
RIVALS = ("runner-up", "all")

#: the largest ``max`` (horizon) accepted: :func:`_overturn_tables` holds
#: ~horizon^2 / 2 x 561 floats (564 MiB at 512, 2.1 GiB at 1000)
MAX_HORIZON = 512

# ---- the grid prior ------------------------------------------------------------------------
#: grid resolution: shares u, v in steps of 1/GRID with u + v <= 1
GRID = 32


@dataclass(frozen=True)
class _Grid:
    u: np.ndarray  # leader's share at each grid point
    v: np.ndarray  # runner-up's share
    log_u: np.ndarray  # logs, -inf at 0
    log_v: np.ndarray
    log_s: np.ndarray  # log of the rest's share
    mirror: np.ndarray  # index of the point with u and v swapped


@lru_cache(maxsize=1)
def _grid() -> _Grid:
    pts = [(i, j) for i in range(GRID + 1) for j in range(GRID + 1 - i)]
    idx = {p: k for k, p in enumerate(pts)}
    u = np.array([i / GRID for i, _ in pts])
    v = np.array([j / GRID for _, j in pts])
    s = np.clip(1.0 - u - v, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        logs = [np.log(x) for x in (u, v, s)]
    mirror = np.array([idx[(j, i)] for i, j in pts])
    return _Grid(u, v, *logs, mirror)


def _log_lik(g: _Grid, a: int, b: int, r: int) -> np.ndarray:
    """log u^a v^b s^r at every grid point (0^0 = 1); read-only, memoised by the counts
    (:func:`_log_lik_cached`) for the grid of :func:`_grid`."""
    if g is _grid():
        return _log_lik_cached(a, b, r)
    return _log_lik_raw(g, a, b, r)


@lru_cache(maxsize=4096)
def _log_lik_cached(a: int, b: int, r: int) -> np.ndarray:
    out = _log_lik_raw(_grid(), a, b, r)
    out.flags.writeable = False
    return out


def _log_lik_raw(g: _Grid, a: int, b: int, r: int) -> np.ndarray:
    out = np.zeros_like(g.u)
    with np.errstate(invalid="ignore"):
        for n, lg in ((a, g.log_u), (b, g.log_v), (r, g.log_s)):
            if n:
                out = out + n * lg
    return np.where(np.isnan(out), -np.inf, out)


@lru_cache(maxsize=64)
def _base_log_weights(prior: float) -> np.ndarray:
    """The flat base measure: Dirichlet(prior, prior, prior) density on the grid,
    normalised (``prior`` = 1: uniform)."""
    g = _grid()
    # The density at a grid point, with a share of 0 (the simplex's edge) read as half a
    # cell: for prior < 1 the density is infinite there, and an edge value of e^-50 put all
    # the mass on the edge (a 3-0 lead then looked certain; found by review). prior = 1:
    # uniform whatever the edge value.
    edge = math.log(0.5 / GRID)
    s = 1.0 - g.u - g.v
    with np.errstate(divide="ignore", invalid="ignore"):
        lw = (prior - 1.0) * (np.where(g.u > 0, g.log_u, edge)
                              + np.where(g.v > 0, g.log_v, edge)
                              + np.where(s > 1e-12, g.log_s, edge))
    lw = lw - lw.max()
    w = np.exp(lw)
    out = np.log(w / w.sum())
    out.flags.writeable = False  # shared by every caller (and a key of _RiskMemo)
    return out


@lru_cache(maxsize=16)
def _overturn_tables(horizon: int) -> tuple[np.ndarray, ...]:
    """``tables[m][d]``: P(X_b - X_a >= d) at every grid point, (X_a, X_b, X_rest) ~
    Multinomial(m; u, v, 1-u-v), for m <= horizon and 0 <= d <= m (a random walk that
    steps +1 with prob. v, -1 with prob. u)."""
    g = _grid()
    G = len(g.u)
    s = np.clip(1.0 - g.u - g.v, 0.0, 1.0)
    dist = np.zeros((G, 2 * horizon + 1))  # offset horizon = difference 0
    dist[:, horizon] = 1.0
    tables: list[np.ndarray] = [np.ones((1, G))]  # m = 0: P(0 >= 0) = 1
    for m in range(1, horizon + 1):
        new = dist * s[:, None]
        new[:, 1:] += dist[:, :-1] * g.v[:, None]
        new[:, :-1] += dist[:, 1:] * g.u[:, None]
        dist = new
        tail = np.cumsum(dist[:, ::-1], axis=1)[:, ::-1]  # P(D >= k - horizon)
        tables.append(np.ascontiguousarray(tail[:, horizon: horizon + m + 1].T))
    return tuple(tables)


def record_counts(record: ProblemRecord) -> tuple[int, int, int]:
    """(leader votes, runner-up votes, everything else) of a finished problem."""
    votes = sorted(record.votes.values(), reverse=True)
    a = votes[0] if votes else 0
    b = votes[1] if len(votes) > 1 else 0
    return a, b, len(record.keys) - a - b


def fit_prior(counts: Sequence[tuple[int, int, int]], prior: float = 1.0,
              shrink: float = 4.0, iterations: int = 50) -> np.ndarray:
    """Log weights of the grid prior fitted to finished problems' vote counts by EM.

    MAP-EM for a histogram prior: each iteration replaces the weights by the mean
    posterior over the problems, plus ``shrink`` pseudo-problems drawn from the base
    measure, then symmetrises them in (u, v). With no counts it is the base measure.
    """
    if not counts:
        return np.log(np.exp(_base_log_weights(prior)))
    return _fit(_distinct(counts), prior, shrink, iterations)


def _distinct(counts: Sequence[tuple[int, int, int]]
              ) -> tuple[tuple[tuple[int, int, int], int], ...]:
    """Each distinct count triple with its multiplicity, in order of first occurrence:
    all that :func:`fit_prior` depends on (in that order)."""
    distinct: dict[tuple[int, int, int], int] = {}
    for c in counts:
        distinct[c] = distinct.get(c, 0) + 1
    return tuple(distinct.items())


def _fit(items: tuple[tuple[tuple[int, int, int], int], ...], prior: float, shrink: float,
         iterations: int) -> np.ndarray:
    """:func:`fit_prior` of the counts summarised by :func:`_distinct` (not empty)."""
    base = np.exp(_base_log_weights(prior))
    g = _grid()
    mult = np.array([m for _, m in items], dtype=float)
    loglik = np.stack([_log_lik(g, *k) for k, _ in items])  # (T, G)
    loglik -= loglik.max(axis=1, keepdims=True)
    lik = np.exp(loglik)
    w = base.copy()
    n = mult.sum()
    for _ in range(iterations):
        joint = lik * w[None, :]
        post = joint / joint.sum(axis=1, keepdims=True)
        w = (shrink * base + mult @ post) / (shrink + n)
        w = 0.5 * (w + w[g.mirror])
    with np.errstate(divide="ignore"):
        return np.log(w)


@lru_cache(maxsize=1024)
def _fit_shared(items: tuple[tuple[tuple[int, int, int], int], ...], prior: float,
                shrink: float) -> np.ndarray:
    """:func:`_fit` memoised by what it depends on, read-only: runs whose finished problems
    so far have the same counts (often: the first problems of every order of a pool settle
    alike) get the very same prior array, so :class:`_RiskMemo` entries serve them all."""
    lw = _fit(items, prior, shrink, 50)
    lw.flags.writeable = False
    return lw


class _PriorCache:
    """Fitted priors by the history's prefix the prior is fitted on. Looked up by (last
    record, number of records) and checked against the whole prefix, held by the entry,
    so two hand-built histories that share a last record but not what comes before it get
    each its own prior (keyed by the last record alone, the second got the first's). A
    tuple history (the runtime's: one tuple between two finished problems) is first looked
    up by itself, held by its entry, so the O(n) check runs once per tuple, not per
    decision (2.3 µs at 500 records, 27 µs at 7,000)."""

    def __init__(self, size: int = 4096) -> None:
        self._entries: OrderedDict[tuple[int, int, float, float],
                                   tuple[tuple[ProblemRecord, ...], np.ndarray]]
        self._entries = OrderedDict()
        self._by_tuple: OrderedDict[tuple[int, int, float, float],
                                    tuple[tuple[ProblemRecord, ...], np.ndarray]]
        self._by_tuple = OrderedDict()
        self._size = size

    def get(self, history: Sequence[ProblemRecord], n: int, prior: float, shrink: float
            ) -> np.ndarray:
        if n == 0:
            return _base_log_weights(prior)
        whole = history if type(history) is tuple else None
        if whole is not None:
            fast = (id(whole), n, prior, shrink)
            seen = self._by_tuple.get(fast)
            if seen is not None and seen[0] is whole:
                return seen[1]
        lw = self._get(history, n, prior, shrink)
        if whole is not None:
            self._by_tuple[fast] = (whole, lw)
            if len(self._by_tuple) > self._size:
                self._by_tuple.popitem(last=False)
        return lw

    def _get(self, history: Sequence[ProblemRecord], n: int, prior: float, shrink: float
             ) -> np.ndarray:
        prefix = tuple(history[:n])
        key = (id(prefix[-1]), n, prior, shrink)
        hit = self._entries.get(key)
        if hit is not None and (hit[0] is prefix or hit[0] == prefix):
            self._entries.move_to_end(key)
            return hit[1]
        lw = _fit_shared(_distinct([record_counts(r) for r in prefix]), prior, shrink)
        self._entries[key] = (prefix, lw)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return lw


_PRIORS = _PriorCache()


def checkpoint(n: int) -> int:
    """The prefix of the history the prior is fitted on: ``n`` rounded down to 1, 2, 3, 4,
    6, 8, 12, 16, 24, ... (refitting on every finished problem buys little)."""
    if n <= 4:
        return n
    p = 1 << (n.bit_length() - 1)
    return p + p // 2 if n >= p + p // 2 else p


def posterior_overturn(a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
                       horizon: int) -> float:
    """P(overturn within ``remaining`` samples) under the grid prior ``log_prior``: the
    posterior over (u, v) given counts (a, b, rest), times each point's probability that
    the runner-up ends level with or ahead of the leader."""
    if remaining <= 0:
        return 0.0 if a > b else 1.0
    lead = a - b
    if lead > remaining:
        return 0.0
    g = _grid()
    lp = log_prior + _log_lik(g, a, b, rest)
    top = lp.max()
    if not math.isfinite(top):
        return 1.0
    post = np.exp(lp - top)
    table = _overturn_tables(max(horizon, remaining))[remaining]
    return float(post @ table[lead] / post.sum())


def posterior_risk(a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
                   horizon: int) -> tuple[float, float]:
    """(P(overturn), expected accuracy lost by stopping now) within ``remaining`` samples.

    The loss takes Self-Consistency's own assumption that an answer is correct with the
    probability of its share of the model's answers: at shares (u, v) stopping with the
    leader rather than going on to the horizon's winner loses ``P(overturn | u, v) (v - u)``
    (positive where the runner-up is really the more likely answer, negative where an
    overturn would replace the better answer by the worse), averaged over the posterior.

    A read-only ``log_prior`` (the priors :class:`Adaptive` uses are) is memoised with the
    counts (:class:`_RiskMemo`): the value is a pure function of them."""
    if remaining <= 0:
        return (0.0, 0.0) if a > b else (1.0, 0.0)
    lead = a - b
    if lead > remaining:
        return 0.0, 0.0
    if log_prior.flags.writeable:
        return _posterior_risk(a, b, rest, remaining, log_prior, horizon)
    return _RISKS.get(a, b, rest, remaining, log_prior, horizon)


def _posterior_risk(a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
                    horizon: int) -> tuple[float, float]:
    post = log_prior + _log_lik(_grid(), a, b, rest)
    # the ufuncs' reductions themselves (what ndarray.max and .sum call): the same values
    top = float(_MAX(post))
    if not math.isfinite(top):
        return 1.0, 1.0
    post -= top  # in place: the same arithmetic as exp(lp - top), one array fewer
    np.exp(post, out=post)
    post /= _SUM(post)
    ot, weighted = _overturn_rows(max(horizon, remaining), remaining, a - b)
    return float(post @ ot), float(post @ weighted)


_MAX, _SUM = np.maximum.reduce, np.add.reduce


@lru_cache(maxsize=4096)
def _overturn_rows(horizon: int, remaining: int, lead: int) -> tuple[np.ndarray, np.ndarray]:
    """``_overturn_tables(horizon)[remaining][lead]`` and that row times
    :func:`_lead_gap` (the same product each time: memoised; read-only)."""
    ot = _overturn_tables(horizon)[remaining][lead]
    weighted = ot * _lead_gap()
    weighted.flags.writeable = False
    return ot, weighted


@lru_cache(maxsize=1)
def _lead_gap() -> np.ndarray:
    """v - u at every grid point (the accuracy an overturn costs there)."""
    g = _grid()
    gap = g.v - g.u
    gap.flags.writeable = False
    return gap


class _RiskMemo:
    """:func:`posterior_risk` by (prior, counts, horizon), for read-only priors only.

    The prior is keyed by identity; each entry holds the array, so its id cannot be reused
    by another array while the entry lives. Bounded: the oldest entries go first."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._entries: dict[tuple[int, int, int, int, int, int],
                            tuple[np.ndarray, tuple[float, float]]] = {}
        self._size = size

    def get(self, a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
            horizon: int) -> tuple[float, float]:
        key = (id(log_prior), a, b, rest, remaining, horizon)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is log_prior:
            return hit[1]
        value = _posterior_risk(a, b, rest, remaining, log_prior, horizon)
        entries = self._entries
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (log_prior, value)
        return value


_RISKS = _RiskMemo()


def _check(name: str, ok: bool, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"adaptive: {name} must be {what}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Finite-horizon posterior stopping with an empirical-Bayes prior learned from the run.

    Parameters (spec keys in brackets):
      * ``width`` [width]: samples kept in flight before the votes widen it (default 4,
        chosen by leave-one-model-out cross-validation among 4-8, README "Calibration";
        8 until Dec 7).
      * ``wide`` [wide]: most samples kept in flight when the votes are contested
        (default 16, chosen by leave-one-model-out cross-validation among 8-32, README
        "Calibration"; rechecked with ``width`` 4, where the shared-pool rule prefers 8
        but 16 holds accuracy and latency on the harder batches; = ``width`` turns
        widening off, and one below ``width`` counts as
        ``width``, so ``adaptive:width=32`` needs no ``wide``).
      * ``confidence`` [confidence]: stop when P(the runner-up does not catch the leader
        by ``max``) — the model's stand-in for P(the leader is still ``sc:n=max``'s answer)
        ≥ confidence (default 0.9: the largest median token saving with no mean accuracy
        loss against ``sc:n=all`` over the shared pools, among 0.8/0.85/0.9/0.95; its
        leave-one-model-out figures are in README "Benchmarks").
      * ``max`` [max]: the horizon — the ``sc:n=max`` this policy approximates, and the most
        samples it will take (default 64; at most :data:`MAX_HORIZON`).
      * ``min_votes`` [min_votes]: never stop (except exactly) before the leader has this
        many votes (default 3; 2 lost 0.3-0.6 pp more at every confidence in the
        cross-validation sweep).
      * ``prior`` [prior]: Dirichlet pseudo-count of the base measure (default 1.0: flat).
      * ``shrink`` [shrink]: weight of the base measure against the run's finished
        problems, in problems (default 4).
      * ``learn`` [learn]: learn the prior from the run (default true; false = the flat
        Dirichlet(``prior``) prior throughout).
      * ``loss`` [loss]: also stop when the expected accuracy lost against going on to
        ``max`` (Self-Consistency's assumption: an answer is right with the probability of
        its share) is at most ``loss`` per problem (default 0.01, chosen by
        leave-one-model-out cross-validation, README "Calibration"; 0 turns it off).
      * ``rivals`` [rivals]: whose overturn the stop counts: ``runner-up`` (default) or
        ``all`` — every answer below it too that the remaining samples can bring level,
        each scored in the three-outcome model against everything else, the probabilities
        (capped at 1) and the losses summed (a union bound; cross-validated in README
        "Harder batches": not better than ``wide=24`` at the same cost).
      * ``max_failures`` [max_failures]: broken samples replaced (default ``max``).
    """

    width: int = 4
    confidence: float = 0.9
    max: int = 64
    min_votes: int = 3
    prior: float = 1.0
    max_failures: int | None = None
    wide: int | None = 16
    shrink: float = 4.0
    learn: bool = True
    loss: float = 0.01
    rivals: str = "runner-up"

    def __post_init__(self) -> None:
        _check("width", is_count(self.width, 1), self.width, "an integer >= 1")
        _check("confidence", 0.0 < self.confidence < 1.0, self.confidence, "in (0, 1)")
        _check("max", is_count(self.max, 1) and self.max <= MAX_HORIZON, self.max,
               f"an integer in [1, {MAX_HORIZON}] (the overturn tables take memory in "
               f"max^2: ~0.6 GB at {MAX_HORIZON})")
        _check("min_votes", is_count(self.min_votes, 1), self.min_votes, "an integer >= 1")
        _check("prior", 0 < self.prior < math.inf, self.prior, "> 0 and finite")
        if self.wide is not None:
            _check("wide", is_count(self.wide, 1), self.wide, "an integer >= 1")
        # None, or below width: width (no widening); stored so, so a spec parses back
        # to an equal policy
        object.__setattr__(self, "wide", max(self.width, self.wide or 0))
        _check("shrink", 0 < self.shrink < math.inf, self.shrink, "> 0 and finite")
        _check("loss", 0.0 <= self.loss < 1.0, self.loss, "in [0, 1) (0: off)")
        _check("learn", isinstance(self.learn, bool), self.learn, "true or false")
        _check("rivals", self.rivals in RIVALS, self.rivals, " or ".join(RIVALS))
        if self.max_failures is not None:
            _check("max_failures", is_count(self.max_failures, 0), self.max_failures,
                   "an integer >= 0")

    @property
    def spec(self) -> str:
        return ",".join([
            f"adaptive:width={self.width},wide={self.widest},"
            f"confidence={num(self.confidence)},max={self.max},min_votes={self.min_votes},"
            f"prior={num(self.prior)},shrink={num(self.shrink)},"
            f"learn={'true' if self.learn else 'false'},loss={num(self.loss)}",
            *non_default(self, "rivals", "max_failures")])

    @property
    def widest(self) -> int:
        return self.width if self.wide is None else max(self.wide, self.width)

    def log_prior(self, s: ProblemSnapshot) -> np.ndarray:
        """The prior in force for this snapshot (grid log weights)."""
        return self.prior_for(s.history)

    def prior_for(self, history: Sequence[ProblemRecord]) -> np.ndarray:
        """The prior in force with these records of the run's finished problems."""
        n = checkpoint(len(history)) if self.learn else 0
        return _PRIORS.get(history, n, self.prior, self.shrink)

    def overturn(self, a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray
                 ) -> float:
        return posterior_overturn(a, b, rest, remaining, log_prior, self.max)

    def risk(self, a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
             others: tuple[int, ...] = ()) -> tuple[float, float]:
        """(P(overturn), expected accuracy lost) of stopping now with ``remaining`` samples
        to come: the runner-up's (:func:`posterior_risk`), plus with ``rivals=all`` each
        answer's below it (``others``: their votes, decreasing — the walk stops at the
        first out of reach; counted in ``rest``) that can still reach the leader — a union
        bound (the probabilities summed and capped at 1, the losses summed), each rival
        scored in the same three-outcome model against everything else."""
        p, lost = posterior_risk(a, b, rest, remaining, log_prior, self.max)
        if not others or self.rivals != "all":
            return p, lost
        n = a + b + rest
        i = 0
        while i < len(others):
            c = others[i]
            if a - c > remaining:
                break  # this one and every smaller one cannot reach the leader
            j = i + 1
            while j < len(others) and others[j] == c:
                j += 1
            pc, lc = posterior_risk(a, c, n - a - c, remaining, log_prior, self.max)
            p += (j - i) * pc
            lost += (j - i) * lc
            i = j
        return min(p, 1.0), lost

    def stop_reason(self, a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
                    others: tuple[int, ...] = ()) -> str | None:
        """Why the probabilistic rule stops at these counts (``a >= min_votes`` checked by
        the caller), or None."""
        p, lost = self.risk(a, b, rest, remaining, log_prior, others)
        at = "-".join(str(v) for v in (a, b, *others))
        if self._confident(p):
            return f"P(overturn by {remaining} more) = {p:.3f} at {at}"
        if self._cheap(lost):
            return (f"expected accuracy lost = {lost:.4f} (P(overturn by {remaining} more) "
                    f"= {p:.3f}) at {at}")
        return None

    def _confident(self, p_overturn: float) -> bool:
        return p_overturn <= 1.0 - self.confidence

    def _cheap(self, lost: float) -> bool:
        return self.loss > 0 and lost <= self.loss

    def _stops(self, a: int, b: int, rest: int, remaining: int, log_prior: np.ndarray,
               others: tuple[int, ...] = ()) -> bool:
        """``stop_reason(...) is not None``, without writing the reason."""
        p, lost = self.risk(a, b, rest, remaining, log_prior, others)
        return self._confident(p) or self._cheap(lost)

    def _counts(self, s: ProblemSnapshot) -> tuple[int, int, int, tuple[int, ...]]:
        votes = s.votes()
        a = votes[0].votes if votes else 0
        b = votes[1].votes if len(votes) > 1 else 0
        others = tuple(v.votes for v in votes[2:]) if self.rivals == "all" else ()
        return a, b, len(s.solutions) - a - b, others

    def settled(self, s: ProblemSnapshot, log_prior: np.ndarray | None = None) -> str | None:
        """Why the leading answer is settled, or None if it is not yet."""
        lp = self.log_prior(s) if log_prior is None else log_prior
        a, b, rest, others = self._counts(s)
        return self._settled(a, b, rest, lp, others)

    def _settled(self, a: int, b: int, rest: int, log_prior: np.ndarray,
                 others: tuple[int, ...] = ()) -> str | None:
        """:meth:`settled` at vote counts (leader, runner-up, the rest; ``others``: the
        votes of the answers below the runner-up, read with ``rivals=all``)."""
        if a == 0:
            return None
        finished = a + b + rest
        remaining = max(self.max - finished, 0)
        if remaining == 0:
            return None  # not settled by the votes: decide() stops on reaching max
        if a - b > remaining:
            return f"lead {a}-{b} exceeds the {remaining} samples left of {self.max}"
        if a < self.min_votes:
            return None
        return self.stop_reason(a, b, rest, remaining, log_prior, others)

    def need(self, a: int, b: int, rest: int, log_prior: np.ndarray,
             others: tuple[int, ...] = ()) -> int:
        """Further samples after which the rule would stop if they split like the votes so
        far (the evidence-following width; ``max - finished`` when no split settles)."""
        n = a + b + rest
        left = self.max - n
        if n == 0 or left <= 0:
            return max(left, 0)

        def stops(k: int) -> bool:
            ka, kb = round(a + k * a / n), round(b + k * b / n)
            kr = n + k - ka - kb
            rem = self.max - n - k
            if rem <= 0 or ka - kb > rem:
                return True
            return ka >= self.min_votes and self._stops(ka, kb, kr, rem, log_prior,
                                                         _scaled(others, n, k, kr))

        lo, hi = 0, 1
        while hi < left and not stops(hi):
            lo, hi = hi, min(2 * hi, left)
        if hi >= left and not stops(hi):
            return left
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if stops(mid):
                hi = mid
            else:
                lo = mid
        return hi

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        lp = self.log_prior(s)
        a, b, rest, others = self._counts(s)
        plan = _PLANS.get(self, lp, a, b, rest, s.in_flight.samples, s.failed_samples,
                          s.budget_left.exhausted, others)
        if plan[0] == "sample":
            return [Sample(plan[1])]
        if plan[0] == "wait":
            return []
        return [majority_stop(s, plan[1], plan[2])]

    def plan(self, log_prior: np.ndarray, a: int, b: int, rest: int, flying: int,
             failed: int, exhausted: bool, others: tuple[int, ...] = ()) -> tuple:
        """The decision at these counts (leader, runner-up and other votes of the finished
        samples; ``others``: the votes of the answers below the runner-up, decreasing, read
        with ``rivals=all``), samples in flight, broken samples and budget state, under
        ``log_prior``: ``("sample", k)``, ``("wait",)`` or ``("stop", reason, code)``; what
        :meth:`decide` does, on the numbers it reads (memoised there, :class:`_PlanMemo`)."""
        why = self._settled(a, b, rest, log_prior, others)
        if why is not None:
            return ("stop", f"adaptive: {why}", "settled")
        finished = a + b + rest
        if finished >= self.max:
            return ("stop", f"adaptive: reached max={self.max}", "max")
        max_failures = failures_allowed(self.max_failures, self.max)
        can_launch = not exhausted and failed <= max_failures
        target = self.width
        if self.widest > self.width and finished >= 2:
            target = min(max(self.width, self.need(a, b, rest, log_prior, others)),
                         self.widest)
        want = min(target, self.max - finished) - flying
        if can_launch and want > 0:
            return ("sample", want)
        if flying:
            return ("wait",)
        if exhausted:
            return ("stop", f"adaptive: budget exhausted after {finished} samples", "budget")
        return ("stop", f"adaptive: too many failed samples after {finished} samples",
                "failures")


def _scaled(others: tuple[int, ...], n: int, k: int, room: int) -> tuple[int, ...]:
    """``others`` (decreasing) after ``k`` more samples split like the ``n`` so far, each
    rounded, then the smallest trimmed until they fit in ``room`` (the scaled rest, which
    holds them: rounded one by one, four 1s of 8 votes made four 2s of a rest of 6);
    those trimmed to 0 are dropped."""
    if not others:
        return others
    out = [round(c + k * c / n) for c in others]
    excess = sum(out) - room
    i = len(out) - 1
    while excess > 0 and i >= 0:
        cut = min(out[i], excess)
        out[i] -= cut
        excess -= cut
        i -= 1
    return tuple(c for c in out if c)


class _PlanMemo:
    """:meth:`Adaptive.plan` by (policy, prior, counts, in flight, failed, exhausted): a
    pure function of them, asked again and again (every problem of a run starts from the
    same counts, and the prior changes only at the history's checkpoints). The policy and
    the prior array are keyed by identity and held by their entry, so neither id can be
    reused while it lives; the prior must be read-only (the priors :class:`Adaptive` uses
    are), else the plan is computed afresh. Bounded: the oldest entries go first."""

    def __init__(self, size: int = 1 << 16) -> None:
        self._entries: dict[tuple, tuple[Adaptive, np.ndarray, tuple]] = {}
        self._size = size

    def get(self, policy: Adaptive, log_prior: np.ndarray, a: int, b: int, rest: int,
            flying: int, failed: int, exhausted: bool, others: tuple[int, ...] = ()
            ) -> tuple:
        if log_prior.flags.writeable:
            return policy.plan(log_prior, a, b, rest, flying, failed, exhausted, others)
        key = (id(policy), id(log_prior), a, b, rest, flying, failed, exhausted, others)
        hit = self._entries.get(key)
        if hit is not None and hit[0] is policy and hit[1] is log_prior:
            return hit[2]
        value = policy.plan(log_prior, a, b, rest, flying, failed, exhausted, others)
        entries = self._entries
        if len(entries) >= self._size:
            del entries[next(iter(entries))]
        entries[key] = (policy, log_prior, value)
        return value


_PLANS = _PlanMemo()
