"""A pool prepared for replay: served orders, verifier readings, the replay task.

:class:`ReplaySource` implements :class:`orchestrator.backends.replay.ReplayData` for one
:class:`~benchmarks.pools.Pool`, and gives the vectorised engine the same numbers as
arrays, so both engines replay exactly the same samples and verifications.

Served orders. For order ``r`` the samples of problem ``i`` are served in the order of
``argsort(U[i, :n_i])`` with ``U = numpy.random.default_rng([seed, r]).random((P, N))``
(``P`` problems, ``N`` the largest pool size). Orders depend on the seed, the order index
and the problem's position in the pool.

Verifiers, in order of preference (``verifier="auto"``):

* ``"pool"``: the sample's recorded ``verifications`` (served in recorded order; a
  sample with fewer than asked is exhausted), else its single ``p_yes`` reading, which
  every verification of that sample returns (a deterministic verifier, e.g. the live
  capitals pool). Lengths: recorded, else ``verify_tokens``.
* a :class:`SimulatedVerifier` (clearly labelled as such in every report): P(Yes) drawn
  from Beta distributions conditioned on the sample's label, length = λ × the sample's.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from benchmarks.pools import Pool
from orchestrator.backends.replay import ReplayGrader, ReplayTask
from orchestrator.errors import ConfigError
from orchestrator.types import Problem

__all__ = ["ReplaySource", "SimulatedVerifier", "VerifierArrays"]


@dataclass(frozen=True, slots=True)
class SimulatedVerifier:
    """P(Yes) ~ Beta(*correct) for correct samples, Beta(*wrong) otherwise; length = λ × the
    sample's length (at least 1 token). ``vmax`` readings are drawn per sample, seeded by
    ``seed``, the pool's name and the problem's position (so pools replicate
    independently). The defaults give one reading an AUC of 0.757 (a middling verifier).

    ``corr`` is the correlation of two readings of one solution (Gaussian copula: each
    reading is ``Beta.ppf(Φ(√corr·z + √(1-corr)·ε))`` with ``z`` shared by the solution's
    readings), so every reading keeps its Beta marginal: 0 (default) = independent
    readings, 1 = every reading of a solution identical, like the real one-token verifier.
    """

    correct: tuple[float, float] = (3.0, 2.0)
    wrong: tuple[float, float] = (2.0, 3.0)
    lam: float = 1.0
    vmax: int = 32
    seed: int = 0
    corr: float = 0.0

    def __post_init__(self) -> None:
        for name in ("correct", "wrong"):
            a, b = getattr(self, name)
            if not (a > 0 and b > 0):
                raise ConfigError(f"simulated verifier: Beta{name} parameters must be > 0")
        if not self.lam > 0:
            raise ConfigError(f"simulated verifier: lambda must be > 0, got {self.lam}")
        if self.vmax < 1:
            raise ConfigError(f"simulated verifier: vmax must be >= 1, got {self.vmax}")
        if not 0.0 <= self.corr <= 1.0:
            raise ConfigError(f"simulated verifier: corr must lie in [0, 1], got {self.corr}")

    @property
    def label(self) -> str:
        corr = f", within-solution corr={self.corr:g}" if self.corr else ""
        return (f"simulated verifier (P(Yes)|correct ~ Beta{self.correct}, P(Yes)|wrong ~ "
                f"Beta{self.wrong}, one-reading AUC {self.auc():.3f}, lambda={self.lam:g}"
                f"{corr})")

    def auc(self) -> float:
        """P(a correct sample's reading > a wrong one's) = ∫ f_correct(x) F_wrong(x) dx
        (numerical quadrature; exact to ~1e-6)."""
        from scipy import integrate, special

        (ca, cb), (wa, wb) = self.correct, self.wrong

        def integrand(x: float) -> float:
            log_f = ((ca - 1) * math.log(x) + (cb - 1) * math.log1p(-x)
                     - special.betaln(ca, cb))
            return math.exp(log_f) * float(special.betainc(wa, wb, x))

        value, _ = integrate.quad(integrand, 0.0, 1.0, limit=200)
        return float(min(max(value, 0.0), 1.0))

    def draw(self, correct: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Readings (len(correct), vmax) for samples with these labels."""
        n = len(correct)
        if self.corr == 0.0:  # independent readings (the original draw, kept bit-for-bit)
            pc = rng.beta(*self.correct, size=(n, self.vmax))
            pw = rng.beta(*self.wrong, size=(n, self.vmax))
            return np.where(correct[:, None], pc, pw)
        from scipy import special

        shared = rng.standard_normal((n, 1))
        own = rng.standard_normal((n, self.vmax))
        u = special.ndtr(math.sqrt(self.corr) * shared + math.sqrt(1 - self.corr) * own)
        u = np.clip(u, 1e-12, 1 - 1e-12)
        pc = special.betaincinv(*self.correct, u)
        pw = special.betaincinv(*self.wrong, u)
        return np.where(correct[:, None], pc, pw)


@dataclass(frozen=True)
class VerifierArrays:
    """Readings per (problem, sample, j): ``p`` (NaN = unparsable), ``tokens``, ``ok``
    (the j-th reading exists)."""

    p: np.ndarray  # (P, N, V) float64
    tokens: np.ndarray  # (P, N, V) float64
    ok: np.ndarray  # (P, N, V) bool


def _argsort_rows(u: np.ndarray) -> np.ndarray:
    """``np.argsort(u, axis=1, kind="stable")`` of a float array without NaNs, except in
    the order of equal infinite values (unspecified here), faster.

    The default (introsort, SIMD) argsort is several times faster than the stable one,
    and the two differ only in the order of equal values. So rows where the default sort
    leaves two equal finite values side by side are sorted again stably. Equal
    infinities are :meth:`ReplaySource.orders`'s padding, which it overwrites."""
    got = np.argsort(u, axis=1)
    s = np.take_along_axis(u, got, axis=1)
    tied = ((s[:, 1:] == s[:, :-1]) & np.isfinite(s[:, 1:])).any(axis=1)
    if tied.any():
        got[tied] = np.argsort(u[tied], axis=1, kind="stable")
    return got


class ReplaySource:
    """One pool, ready to replay (see the module docstring)."""

    def __init__(self, pool: Pool, *, seed: int = 0,
                 verifier: str | SimulatedVerifier = "auto",
                 verify_tokens: int = 1) -> None:
        if verifier not in ("auto", "pool", "none") and not isinstance(verifier,
                                                                        SimulatedVerifier):
            raise ConfigError(f"verifier must be 'auto', 'pool', 'none' or a "
                              f"SimulatedVerifier, got {verifier!r}")
        self.pool = pool
        self.seed = seed
        self.verify_tokens = verify_tokens
        if verifier == "auto":
            verifier = "pool" if pool.has_verifications else "none"
        self.verifier = verifier
        self._orders: dict[int, np.ndarray] = {}
        self._sim: dict[int, np.ndarray] = {}

    # ---- identity --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def verifier_label(self) -> str:
        if isinstance(self.verifier, SimulatedVerifier):
            return self.verifier.label
        return {"pool": "recorded verifier", "none": "no verifier"}[self.verifier]

    @property
    def can_verify(self) -> bool:
        return self.verifier != "none"

    @cached_property
    def problems(self) -> tuple[Problem, ...]:
        out = []
        for pp in self.pool.problems:
            prob = pp.problem
            if prob.answer is None and not prob.aliases and pp.labels:
                prob = Problem(prob.id, prob.problem, "<pool labels>", (), prob.meta)
            out.append(prob)
        return tuple(out)

    @cached_property
    def task(self) -> ReplayTask:
        labels = {pp.id: pp.labels for pp in self.pool.problems}
        a = self.pool.arrays
        max_tokens = max(1, int(a.tokens.max()))
        return ReplayTask(ReplayGrader(labels), max_tokens=max_tokens,
                          verify_max_tokens=max(max_tokens, self.verify_tokens))

    # ---- orders ----------------------------------------------------------------------
    def orders(self, order: int) -> np.ndarray:
        """(P, N) pool indices in served order for order ``order`` (padding: -1 at the end)."""
        got = self._orders.get(order)
        if got is None:
            a = self.pool.arrays
            P, N = a.shape
            u = np.random.default_rng([self.seed, order]).random((P, N))
            valid = a.valid
            u[~valid] = np.inf
            got = _argsort_rows(u).astype(np.int32)
            got[~np.take_along_axis(valid, got, axis=1)] = -1
            self._orders[order] = got
        return got

    def forget_orders(self) -> None:
        self._orders.clear()

    # ---- ReplayData ------------------------------------------------------------------
    def served_order(self, problem_id: str, order: int) -> list[int]:
        i = self.pool.index[problem_id]
        n = int(self.pool.arrays.n[i])
        return self.orders(order)[i, :n].tolist()

    def sample(self, problem_id: str, index: int) -> tuple[str | None, int]:
        """(vote key, tokens): a replayed solution's answer is its vote key."""
        i = self.pool.index[problem_id]
        s = self.pool.problems[i].samples[index]
        return s.key, int(self.pool.arrays.tokens[i, index])

    def verification(self, problem_id: str, index: int, j: int) -> tuple[float | None, int] | None:
        if self.verifier == "none":
            return None
        i = self.pool.index[problem_id]
        if isinstance(self.verifier, SimulatedVerifier):
            if j >= self.verifier.vmax:
                return None
            p = float(self._simulated(i)[index, j])
            return p, self._sim_tokens(i, index)
        s = self.pool.problems[i].samples[index]
        if s.verifications:
            if j >= len(s.verifications):
                return None
            v = s.verifications[j]
            return v.p_yes, self.verify_tokens if v.tokens is None else v.tokens
        if s.p_yes is not None:
            return s.p_yes, self.verify_tokens
        return None

    # ---- simulated verifier ------------------------------------------------------------
    def _simulated(self, i: int) -> np.ndarray:
        got = self._sim.get(i)
        if got is None:
            assert isinstance(self.verifier, SimulatedVerifier)
            sv = self.verifier
            a = self.pool.arrays
            n = int(a.n[i])
            # the pool's name is mixed in: pools replicate independently
            rng = np.random.default_rng([sv.seed, 0x5EED, self._pool_salt, i])
            got = sv.draw(a.correct[i, :n], rng)
            self._sim[i] = got
        return got

    @cached_property
    def _pool_salt(self) -> int:
        return zlib.crc32(self.pool.name.encode("utf-8"))

    def _sim_tokens(self, i: int, index: int) -> int:
        assert isinstance(self.verifier, SimulatedVerifier)
        return max(1, round(self.verifier.lam * float(self.pool.arrays.tokens[i, index])))

    def verifier_arrays(self, v: int) -> VerifierArrays:
        """The first ``v`` readings of every sample, as arrays (for vectorised engines)."""
        a = self.pool.arrays
        P, N = a.shape
        p = np.full((P, N, v), np.nan)
        tokens = np.zeros((P, N, v))
        ok = np.zeros((P, N, v), dtype=bool)
        if self.verifier == "none":
            return VerifierArrays(p, tokens, ok)
        if isinstance(self.verifier, SimulatedVerifier):
            vv = min(v, self.verifier.vmax)
            for i in range(P):
                n = int(a.n[i])
                p[i, :n, :vv] = self._simulated(i)[:, :vv]
                ok[i, :n, :vv] = True
                tokens[i, :n, :vv] = np.maximum(
                    1, np.round(self.verifier.lam * a.tokens[i, :n]))[:, None]
            return VerifierArrays(p, tokens, ok)
        for i, pp in enumerate(self.pool.problems):
            for j, s in enumerate(pp.samples):
                if s.verifications:
                    for k, rec in enumerate(s.verifications[:v]):
                        p[i, j, k] = math.nan if rec.p_yes is None else rec.p_yes
                        tokens[i, j, k] = self.verify_tokens if rec.tokens is None else rec.tokens
                        ok[i, j, k] = True
                elif s.p_yes is not None:
                    p[i, j, :] = s.p_yes
                    tokens[i, j, :] = self.verify_tokens
                    ok[i, j, :] = True
        return VerifierArrays(p, tokens, ok)
