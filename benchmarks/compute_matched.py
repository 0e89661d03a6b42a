"""The paper's compute-matched analysis: ``solverify bench compute-matched``.

Singhi et al. (2025) compare Self-Consistency and GenRM at equal compute
C(S, V) = S·(1 + λV), with λ = mean verification length / mean solution length.

Estimators (per problem, then averaged over problems):

* **SC with S samples** — exact expectation over every size-S subset of the problem's N
  samples, with ties between equally voted answers broken uniformly at random; computed by
  a polynomial (generating-function) recursion over answer groups, not by enumeration.
* **GenRM Best-of-S with V verifications** — a solution's score is the mean of V readings
  of P(Yes); the expected Best-of-S over every size-S subset is a closed form over the
  sorted scores: P(best score = s_l) = [C(a_l, S) − C(b_l, S)] / C(N, S), with a_l (b_l)
  the samples scoring ≤ s_l (< s_l); within a score level the pick is uniform, so it
  contributes the level's mean correctness. When V is smaller than the readings recorded
  per sample, the V readings are a random subset (``v_draws`` Monte Carlo draws, seeded);
  with V = all recorded readings it is exact. Solutions without an answer are never
  verified (score −∞).

Outputs: success rates on the (S, V) grid in C units; the crossover budget (the smallest
budget from which the best GenRM configuration within the budget matches or beats the
best SC within it at every larger budget; SC beyond the pool size stays at SC(N)); for
each budget the compute-optimal (S, V) and a log-log fit of S_opt and V_opt against C,
with percentile-bootstrap CIs over problems on the exponents.

The shipped pools hold no generative verifications; :class:`~benchmarks.source.
SimulatedVerifier` draws P(Yes) from Beta distributions conditioned on each sample's label
(length = λ × the solution's). Reports say which verifier was used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.errors import ConfigError
from policies.profile import ScalingLaw

__all__ = [
    "CompareConfig",
    "bon_expected",
    "compute_matched",
    "grid_success",
    "joint_scaling",
    "powers_of_two",
    "sc_expected",
]


def _comb(n: np.ndarray | int, k: np.ndarray | int) -> np.ndarray:
    return special.comb(n, k, exact=False)


# ---- SC: exact expectation over subsets ---------------------------------------------------
def sc_expected(keys: Sequence[int], key_correct: Sequence[bool], sizes: Sequence[int]
                ) -> np.ndarray:
    """Expected majority-vote correctness over every size-S subset, for each S in ``sizes``.

    ``keys[j]`` is sample j's answer group (>= 0) or -1 for no answer; ``key_correct[g]``
    the label of group g. Ties among the top groups are broken uniformly at random; a
    subset without any answer scores 0.
    """
    keys_arr = np.asarray(keys, dtype=np.int64)
    N = len(keys_arr)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if np.any(sizes_arr < 1) or np.any(sizes_arr > N):
        raise ValueError(f"subset sizes must lie in [1, {N}], got {list(sizes)}")
    none = int((keys_arr < 0).sum())
    groups = np.bincount(keys_arr[keys_arr >= 0], minlength=len(key_correct))
    out = np.zeros(len(sizes_arr))
    total = _comb(N, sizes_arr)
    for g, n_g in enumerate(groups):
        if n_g == 0 or not key_correct[g]:
            continue
        others = [int(n) for h, n in enumerate(groups) if h != g and n > 0]
        rest = N - int(n_g)
        for k in range(1, int(n_g) + 1):
            ways = _others_ways(others, none, k, rest)  # (rest+1, T+1)
            T = ways.shape[1]
            tie_weight = ways @ (1.0 / np.arange(1, T + 1))  # by draws d from the others
            d = sizes_arr - k
            ok = (d >= 0) & (d <= rest)
            contrib = np.zeros(len(sizes_arr))
            contrib[ok] = _comb(int(n_g), k) * tie_weight[d[ok]]
            out += contrib / total
    return out


def _others_ways(others: Sequence[int], none: int, k: int, rest: int) -> np.ndarray:
    """ways[d, t]: ways to draw d items from the other groups and the no-answer samples
    with every other group drawn at most k times, t of them exactly k times."""
    T = 1 + sum(1 for n in others if n >= k)
    ways = np.zeros((rest + 1, T))
    # no-answer samples: unconstrained, never tie
    ways[: none + 1, 0] = _comb(none, np.arange(none + 1))
    top = none
    ties = 0
    for n in others:
        new = np.zeros_like(ways)
        for x in range(min(n, k) + 1):
            c = float(_comb(n, x))
            if x == k:
                new[x: top + x + 1, 1: ties + 2] += c * ways[: top + 1, : ties + 1]
            else:
                new[x: top + x + 1, : ties + 1] += c * ways[: top + 1, : ties + 1]
        top += min(n, k)
        ties += 1 if n >= k else 0
        ways = new
    return ways


# ---- GenRM: exact Best-of-N over subsets -------------------------------------------------------
def bon_expected(scores: Sequence[float], correct: Sequence[bool], sizes: Sequence[int]
                 ) -> np.ndarray:
    """Expected correctness of the best-scored sample of a uniformly random size-S subset,
    ties within a score level broken uniformly; for each S in ``sizes``."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=np.float64)
    N = len(s)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if np.any(sizes_arr < 1) or np.any(sizes_arr > N):
        raise ValueError(f"subset sizes must lie in [1, {N}], got {list(sizes)}")
    levels, inverse = np.unique(s, return_inverse=True)  # ascending
    count = np.bincount(inverse, minlength=len(levels)).astype(np.float64)
    mean_c = np.bincount(inverse, weights=c, minlength=len(levels)) / count
    at_most = np.cumsum(count)  # a_l: samples scoring <= level l
    below = at_most - count  # b_l
    p_level = (_comb(at_most[None, :], sizes_arr[:, None])
               - _comb(below[None, :], sizes_arr[:, None])) / _comb(N, sizes_arr)[:, None]
    return p_level @ mean_c


# ---- the grid ---------------------------------------------------------------------------------
def powers_of_two(limit: int, *, include_limit: bool = True) -> list[int]:
    out = [1]
    while out[-1] * 2 <= limit:
        out.append(out[-1] * 2)
    if include_limit and out[-1] != limit:
        out.append(limit)
    return out


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """``sizes``/``verifications``: grids (``None``: powers of two up to the pool);
    ``lam``: λ (``None``: measured from the pool's lengths); ``v_draws``: Monte Carlo draws
    of V-subsets of the readings; ``bootstrap``: resamples over problems."""

    sizes: tuple[int, ...] | None = None
    verifications: tuple[int, ...] | None = None
    lam: float | None = None
    v_draws: int = 8
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lam is not None and not self.lam > 0:
            raise ConfigError(f"lambda must be > 0, got {self.lam}")
        if self.v_draws < 1 or self.bootstrap < 1:
            raise ConfigError("v_draws and bootstrap must be >= 1")


def _readings(src: ReplaySource, vmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    va = src.verifier_arrays(vmax)
    return va.p, va.ok, va.tokens


def measured_lambda(src: ReplaySource, vmax: int) -> float | None:
    a = src.pool.arrays
    _, ok, vt = _readings(src, vmax)
    if not ok.any():
        return None
    sol = a.tokens[a.valid].mean()
    return float(vt[ok].mean() / sol) if sol > 0 else None


def grid_success(src: ReplaySource, sizes: Sequence[int], verifications: Sequence[int],
                 v_draws: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-problem expected success: SC (P, |sizes|) and GenRM (P, |sizes|, |V|).

    A problem with fewer samples than some S uses all its samples for that S.
    """
    a = src.pool.arrays
    P = len(src.pool.problems)
    vmax = max(verifications) if verifications else 0
    sc = np.zeros((P, len(sizes)))
    genrm = np.zeros((P, len(sizes), len(verifications)))
    p, ok, _ = _readings(src, max(vmax, 1))
    rng = np.random.default_rng([seed, 0xC0FE])
    for i in range(P):
        n = int(a.n[i])
        keys = a.key[i, :n]
        kc = a.key_correct[i]
        correct = a.correct[i, :n]
        sz = np.minimum(np.asarray(sizes), n)
        sc[i] = sc_expected(keys, kc, sz)
        if not verifications:
            continue
        answered = keys >= 0
        usable = ok[i, :n] & ~np.isnan(p[i, :n]) & answered[:, None]  # (n, vmax)
        vals = np.where(usable, p[i, :n], 0.0)
        counts = usable.sum(1)
        constant = _constant_rows(p[i, :n], usable)
        for vi, v in enumerate(verifications):
            exact = constant or bool(np.all(counts <= v))
            draws = 1 if exact else v_draws
            acc = np.zeros(len(sz))
            for _ in range(draws):
                if exact:
                    chosen = usable & (np.cumsum(usable, axis=1) <= v)
                else:  # a uniformly random V-subset of each sample's readings
                    u = np.where(usable, rng.random(usable.shape), np.inf)
                    rank = np.argsort(np.argsort(u, axis=1), axis=1)
                    chosen = usable & (rank < v)
                k = chosen.sum(1)
                score = np.where(k > 0, (vals * chosen).sum(1) / np.maximum(k, 1), -np.inf)
                acc += bon_expected(score, correct, sz)
            genrm[i, :, vi] = acc / draws
    return sc, genrm


def _constant_rows(vals: np.ndarray, avail: np.ndarray) -> bool:
    """Every sample's readings are one repeated value (a deterministic verifier)."""
    with np.errstate(invalid="ignore"):
        spread = np.where(avail, vals, np.nan)
        lo = np.nanmin(np.where(avail.any(1, keepdims=True), spread, 0.0), axis=1)
        hi = np.nanmax(np.where(avail.any(1, keepdims=True), spread, 0.0), axis=1)
    return bool(np.all(np.nan_to_num(hi - lo) == 0))


def _frontier(costs: np.ndarray, success: np.ndarray, budget: float) -> float:
    ok = costs <= budget + 1e-9
    return float(success[ok].max()) if ok.any() else math.nan


def _optimal(sizes: Sequence[int], verifications: Sequence[int], genrm: np.ndarray,
             lam: float, budgets: Sequence[float]) -> tuple[list[int | None], list[int | None]]:
    """Best (S, V) within each budget: highest success; ties: lower cost, then larger S."""
    s_opt: list[int | None] = []
    v_opt: list[int | None] = []
    cands = [(s * (1 + lam * v), -s, si, vi) for si, s in enumerate(sizes)
             for vi, v in enumerate(verifications)]
    for b in budgets:
        best = None
        for cost, neg_s, si, vi in cands:
            if cost > b + 1e-9:
                continue
            rank = (-genrm[si, vi], cost, neg_s)
            if best is None or rank < best[0]:
                best = (rank, si, vi)
        if best is None:
            s_opt.append(None)
            v_opt.append(None)
        else:
            s_opt.append(int(sizes[best[1]]))
            v_opt.append(int(verifications[best[2]]))
    return s_opt, v_opt


def _fit(budgets: Sequence[float], values: Sequence[int | None]) -> float | None:
    line = _fit_line(budgets, values)
    return None if line is None else line[0]


def _fit_line(budgets: Sequence[float], values: Sequence[int | None]
              ) -> tuple[float, float] | None:
    """(exponent, coefficient) of values = coefficient · budget^exponent (log-log fit)."""
    pts = [(math.log(b), math.log(v)) for b, v in zip(budgets, values, strict=True)
           if v is not None]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    if np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(math.exp(intercept))


def crossover(sc_sizes: Sequence[int], sc_success: np.ndarray, costs: np.ndarray,
              genrm_success: np.ndarray) -> float | None:
    """Smallest budget (among the grid's costs) from which the best GenRM configuration
    within the budget matches or beats the best SC within it at every larger budget
    (``None``: GenRM is behind at the largest budget)."""
    budgets = sorted({float(c) for c in costs} | {float(s) for s in sc_sizes})
    sc_costs = np.asarray(sc_sizes, dtype=float)
    found: float | None = None
    for b in budgets:
        g = _frontier(costs, genrm_success, b)
        s = _frontier(sc_costs, sc_success, b)
        if math.isnan(g) or math.isnan(s):
            continue
        if g + 1e-9 >= s:
            found = b if found is None else found
        else:
            found = None
    return found


def compute_matched(src: ReplaySource, cfg: CompareConfig) -> dict[str, Any]:
    """The full analysis of one pool as a JSON-ready dict."""
    if not src.can_verify:
        raise ConfigError(f"pool {src.name} has no verifications; use the simulated verifier "
                          "(--simulated-verifier) or a pool recorded with verifications")
    a = src.pool.arrays
    N = int(a.n.max())
    sizes = list(cfg.sizes) if cfg.sizes else powers_of_two(N)
    if isinstance(src.verifier, SimulatedVerifier):
        vcap = src.verifier.vmax
    else:
        vcap = max((len(s.verifications) for p in src.pool.problems for s in p.samples),
                   default=0) or 1
    verifications = list(cfg.verifications) if cfg.verifications else powers_of_two(vcap)
    if max(sizes) > N or min(sizes) < 1 or min(verifications) < 1:
        raise ConfigError(f"grid out of range: S must lie in [1, {N}], V >= 1")
    lam = cfg.lam
    lam_source = "given"
    if lam is None:
        if isinstance(src.verifier, SimulatedVerifier):
            lam, lam_source = src.verifier.lam, "simulated verifier"
        else:
            lam = measured_lambda(src, max(verifications))
            lam_source = "measured"
            if any((s.p_yes is not None and not s.verifications)
                   or any(v.tokens is None for v in s.verifications)
                   for p in src.pool.problems for s in p.samples):
                lam_source = (f"measured, with unrecorded verification lengths taken as "
                              f"{src.verify_tokens} token(s)")
        if lam is None:
            raise ConfigError("cannot measure lambda from this pool; give --lam")
    sc_p, genrm_p = grid_success(src, sizes, verifications, cfg.v_draws, cfg.seed)
    sc = sc_p.mean(0)
    genrm = genrm_p.mean(0)
    costs = np.array([[s * (1 + lam * v) for v in verifications] for s in sizes])
    cross = crossover(sizes, sc, costs.ravel(), genrm.ravel())
    top = float(costs.max())
    budgets = [2.0 ** k for k in range(0, math.floor(math.log2(top)) + 1)
               if 2.0 ** k >= costs.min() - 1e-9]
    s_opt, v_opt = _optimal(sizes, verifications, genrm, lam, budgets)
    s_line = _fit_line(budgets, s_opt)
    v_line = _fit_line(budgets, v_opt)
    s_exp = None if s_line is None else s_line[0]
    v_exp = None if v_line is None else v_line[0]
    rng = np.random.default_rng([cfg.seed, 0xB007])
    P = sc_p.shape[0]
    boot_s: list[float] = []
    boot_v: list[float] = []
    for _ in range(cfg.bootstrap):
        idx = rng.integers(0, P, P)
        g = genrm_p[idx].mean(0)
        so, vo = _optimal(sizes, verifications, g, lam, budgets)
        es, ev = _fit(budgets, so), _fit(budgets, vo)
        if es is not None:
            boot_s.append(es)
        if ev is not None:
            boot_v.append(ev)

    def ci(values: list[float]) -> list[float] | None:
        if not values:
            return None
        lo, hi = np.percentile(values, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {
        "pool": src.name,
        "problems": P,
        "verifier": src.verifier_label,
        "simulated_verifier": isinstance(src.verifier, SimulatedVerifier),
        "lambda": lam,
        "lambda_source": lam_source,
        "grid": {"S": sizes, "V": verifications},
        "sc": [{"S": s, "C": float(s), "success": float(sc[i])} for i, s in enumerate(sizes)],
        "genrm": [{"S": s, "V": v, "C": float(costs[i, j]), "success": float(genrm[i, j])}
                  for i, s in enumerate(sizes) for j, v in enumerate(verifications)],
        "crossover_budget": cross,
        "crossover_over_sc_cap": cross is not None and cross > N,
        "scaling": {
            "budgets": budgets,
            "S_opt": s_opt,
            "V_opt": v_opt,
            "S_exponent": s_exp,
            "S_coefficient": None if s_line is None else s_line[1],
            "V_coefficient": None if v_line is None else v_line[1],
            "S_exponent_ci95": ci(boot_s),
            "V_exponent": v_exp,
            "V_exponent_ci95": ci(boot_v),
            "tie_rule": "highest success; ties: lower cost, then larger S",
        },
        "estimators": {
            "sc": "exact over all size-S subsets, random tie-break",
            "genrm": "exact Best-of-S over all size-S subsets (random tie-break within a "
                     f"score level); V-subsets of readings: {cfg.v_draws} Monte Carlo draws "
                     "unless V covers every reading",
        },
    }


# ---- the scaling law as a profile (for optimal:c=C,profile=FILE) ---------------------------
def joint_scaling(results: Sequence[dict[str, Any]]) -> ScalingLaw:
    """One compute-optimal law over several :func:`compute_matched` results: success
    averaged over the pools (equal weight) on the (S, V) grid points they share, λ their
    mean; the same optimum, fit and crossover rules as for one pool."""
    if not results:
        raise ConfigError("no compute-matched results to fit a scaling law on")
    genrm: dict[tuple[int, int], list[float]] = {}
    sc: dict[int, list[float]] = {}
    for res in results:
        for g in res["genrm"]:
            genrm.setdefault((g["S"], g["V"]), []).append(g["success"])
        for c in res["sc"]:
            sc.setdefault(c["S"], []).append(c["success"])
    n = len(results)
    common = {k: float(np.mean(v)) for k, v in genrm.items() if len(v) == n}
    sc_common = {k: float(np.mean(v)) for k, v in sc.items() if len(v) == n}
    sizes = sorted({s for s, _ in common})
    verifications = sorted({v for _, v in common})
    if not sizes or any((s, v) not in common for s in sizes for v in verifications):
        raise ConfigError("the pools share no complete (S, V) grid; give --sizes and "
                          "--verifications")
    lam = float(np.mean([res["lambda"] for res in results]))
    g = np.array([[common[(s, v)] for v in verifications] for s in sizes])
    costs = np.array([[s * (1 + lam * v) for v in verifications] for s in sizes])
    sc_sizes = sorted(sc_common)
    cross = crossover(sc_sizes, np.array([sc_common[s] for s in sc_sizes]), costs.ravel(),
                      g.ravel())
    top = float(costs.max())
    budgets = [2.0 ** k for k in range(0, math.floor(math.log2(top)) + 1)
               if 2.0 ** k >= costs.min() - 1e-9]
    s_opt, v_opt = _optimal(sizes, verifications, g, lam, budgets)
    s_line = _fit_line(budgets, s_opt)
    v_line = _fit_line(budgets, v_opt)
    if s_line is None or v_line is None:
        raise ConfigError("too few compute levels to fit a scaling law (need two budgets "
                          "with an optimum)")
    return ScalingLaw(s_coef=s_line[1], s_exp=s_line[0], v_coef=v_line[1], v_exp=v_line[0],
                      crossover=cross, verify_pays=cross is not None, lam=lam,
                      c_min=float(budgets[0]), c_max=float(budgets[-1]))
