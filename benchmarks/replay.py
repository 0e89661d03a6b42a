"""Replay policies on recorded pools: ``solverify bench replay``.

Four engines give the same numbers for the same seed:

* **lean** (the default for every policy that is not a plain fixed plan;
  :mod:`benchmarks.engine`): the problems of an order replayed by a small event loop that
  keeps asyncio's order of events, calling the same policy's ``decide`` on the same
  :class:`~orchestrator.snapshot.ProblemSnapshot` as the runtime would, with the same run
  history. Per-problem results are identical to the runtime engine's (tested on many
  orders and pools for every registered policy, ``tests/test_replay.py``). Without a
  concurrency cap only; with one, the runtime engine runs.
* **runtime** (``engine="runtime"``, for cross-checks, and under a concurrency cap): each
  problem runs through :func:`orchestrator.runtime.solve` on a
  :class:`~orchestrator.backends.replay.ReplayBackend`, on a simulated clock
  (:mod:`orchestrator.simclock`). ``concurrency`` caps samples in flight *per problem*:
  one request per sample (``max_n=1``) behind one limiter per problem with the runtime
  ``Limiter``'s FIFO ``slot()`` contract (:class:`ProblemLimiter`). The policy is not told
  the cap; queued samples count as in flight and cost nothing if cancelled before they
  start. Without a cap, requests carry up to 16 samples (the runtime's default ``max_n``);
  each sample still has its own timing.
* **vectorised** (``sc:n=K``, ``sc:n=all``, and ``genrm:s=S,v=V`` without a concurrency
  cap, chosen by the policy's type: :func:`fixed_plan`): numpy over (orders × problems ×
  samples). It reproduces the runtime's tokens, samples and simulated latency exactly (a
  fixed policy launches everything at once; with a cap, samples start in served order as
  slots free up), and the policies' vote rule (:mod:`policies.votes`: a tie goes to the
  answer whose first vote finished first), with completion order taken as finish time,
  then served position; see :func:`_majority` for the one case (different requests
  finishing at the very same instant) where that approximates the runtime's order.

* **direct** (``ac``, ``esc`` and ``boinf`` without a concurrency cap and with one chunk per
  sample, chosen by the policy's type; :mod:`benchmarks.direct`): their counting rules
  (``sampling_step``, which their ``decide`` also calls) on the vote counts, one problem at
  a time in a plain loop; the lean engine's per-problem numbers (latency to rounding), and
  an order it cannot replay exactly (samples of different requests finishing at one
  instant where their order matters, the pool running out) goes to the lean engine, which
  the outcome's ``notes`` count.

Orders of the direct, lean and runtime engines are spread over worker processes (``fork``; one
process otherwise).

Statistics: a problem's accuracy is its mean over orders; ``accuracy_ci95`` is a
percentile bootstrap over problems, with the same resampled problems for every policy of
a pool (paired), which also gives the paired difference to the first policy (``vs``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import math
import multiprocessing
import os
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.source import ReplaySource
from orchestrator import defaults
from orchestrator.backends.replay import PoolExhausted, ReplayBackend
from orchestrator.errors import ConfigError
from orchestrator.history import RunHistory
from orchestrator.runtime import SolveResult, policy_name, solve
from orchestrator.simclock import SimulatedClockLoop
from policies import GenRM, SelfConsistency, parse_policy
from policies.spec import uses_all

__all__ = [
    "FixedPlan",
    "PolicyOutcome",
    "ProblemLimiter",
    "ReplayConfig",
    "fixed_plan",
    "horizon",
    "replay_policy",
    "replay_pool",
    "run_direct_order",
    "run_lean_order",
    "run_runtime_order",
    "summarise",
    "sweep",
]

#: ``ReplayConfig.engine`` values
ENGINES = ("auto", "lean", "runtime")

METRICS = ("correct", "tokens", "samples", "latency", "cancelled", "agree", "verify_tokens",
           "verifications")


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """How to replay. ``decode_rate`` (tokens/s per sample) and ``ttft`` (s) set the
    simulated clock; ``workers`` processes run the lean and runtime engines (``None``: one
    per CPU); ``engine``: ``"auto"`` (vectorised for fixed plans, direct for ``ac``, ``esc`` and
    ``boinf``, lean for the rest),
    ``"lean"`` (lean for every policy) or ``"runtime"`` (every policy through the runtime,
    for cross-checks). Under a ``concurrency`` cap the lean engine hands over to the
    runtime."""

    orders: int = 10
    seed: int = 0
    concurrency: int | None = None
    decode_rate: float = 50.0
    ttft: float = 0.0
    chunks: int = 1
    workers: int | None = None
    engine: str = "auto"
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        if self.orders < 1:
            raise ConfigError(f"orders must be >= 1, got {self.orders}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 or None, got {self.concurrency}")
        if not (self.decode_rate > 0 and math.isfinite(self.decode_rate)):
            raise ConfigError(f"decode_rate must be > 0, got {self.decode_rate}")
        if not (self.ttft >= 0 and math.isfinite(self.ttft)):
            raise ConfigError(f"ttft must be >= 0, got {self.ttft}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got "
                              f"{self.engine!r}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.bootstrap < 1:
            raise ConfigError(f"bootstrap must be >= 1, got {self.bootstrap}")


@dataclass(frozen=True, slots=True)
class FixedPlan:
    """A fixed policy the vectorised engine can replay (``solutions`` at least the pool
    size: every pool sample)."""

    kind: str  # "sc" | "genrm"
    solutions: int
    verifications: int = 0


#: what the benchmarks replay: a spec string (``all`` = the pool size) or a policy object
PolicyLike = str | Any


def label(policy: PolicyLike) -> str:
    """How tables name a policy: the spec as written, else the object's ``spec``."""
    return policy.strip() if isinstance(policy, str) else policy_name(policy)


def policy_for(policy: PolicyLike, pool_size: int | None = None) -> Any:
    """The policy object to replay. A spec string is parsed with ``all`` meaning the pool
    size (``sc:n=all``, ``genrm:s=all``, ``ac:max=all``, ``adaptive:max=all``); an object
    is used as it is."""
    if not isinstance(policy, str):
        if not callable(getattr(policy, "decide", None)):
            raise ConfigError(f"policy {policy!r} has no decide(snapshot) method")
        return policy
    return parse_policy(policy, size=pool_size)


def fixed_plan(policy: PolicyLike, pool_size: int | None = None) -> FixedPlan | None:
    """The plan of a policy the vectorised engine replays, chosen by its type: a
    :class:`~policies.fixed.SelfConsistency` or :class:`~policies.fixed.GenRM` without
    ``max_failures`` (an :class:`~policies.optimal.Optimal` by the one it resolves to);
    else None. A spec string is parsed first (``all``: ``pool_size``)."""
    from policies.optimal import Optimal

    obj = policy_for(policy, pool_size)
    if isinstance(obj, Optimal):
        obj = obj.resolved
    if type(obj) is SelfConsistency and obj.max_failures is None:
        return FixedPlan("sc", obj.n)
    if type(obj) is GenRM and obj.max_failures is None:
        return FixedPlan("genrm", obj.solutions, obj.verifications)
    return None


def horizon(policy: PolicyLike, pool_size: int) -> str:
    """The most samples a policy may draw per problem, as tables state it: ``"64"``, or
    ``"all (80)"`` where the spec says ``all`` (the pool size), or ``"none"`` for a policy
    without a cap (it ends on its rule, the budget or the pool running out)."""
    obj = policy_for(policy, pool_size)
    if isinstance(policy, str) and uses_all(policy):
        return f"all ({pool_size})"
    plan = fixed_plan(obj)
    if plan is not None:
        return str(plan.solutions)
    for attr in ("max", "n", "solutions"):
        if hasattr(obj, attr):
            cap = getattr(obj, attr)
            return f"all ({pool_size})" if cap is None else str(cap)
    return "none"


@dataclass
class PolicyOutcome:
    """Per (order, problem) results of one policy on one pool; arrays of shape (R, P).

    ``correct`` is 1.0/0.0 (NaN when ungraded); ``tokens`` are completion tokens charged;
    ``samples`` finished solutions; ``latency`` simulated seconds; ``cancelled`` samples cut
    by a stop; ``agree`` 1.0 when the answer is the whole pool's majority (maj@N, see
    :func:`full_majority`); ``verify_tokens`` the part of ``tokens`` charged to
    verification requests; ``verifications`` verifications that returned (parsed or not).
    """

    pool: str
    policy: str
    engine: str
    correct: np.ndarray
    tokens: np.ndarray
    samples: np.ndarray
    latency: np.ndarray
    cancelled: np.ndarray
    agree: np.ndarray
    verify_tokens: np.ndarray
    verifications: np.ndarray
    errors: int = 0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---- the vectorised engine ---------------------------------------------------------------
def _served(src: ReplaySource, orders: int, width: int | None = None) -> np.ndarray:
    """(R, P, N) served pool indices; only the first ``width`` positions if given."""
    if width is None:
        return np.stack([src.orders(r) for r in range(orders)])
    return np.stack([src.orders(r)[:, :width] for r in range(orders)])


def _take(values: np.ndarray, served: np.ndarray, fill: float) -> np.ndarray:
    """values[i, served[r, i, j]] with padding (-1) filled."""
    R = served.shape[0]
    idx = np.where(served < 0, 0, served)
    out = np.take_along_axis(np.broadcast_to(values, (R, *values.shape)), idx, axis=2)
    return np.where(served < 0, fill, out)


def _schedule(durations: np.ndarray, active: np.ndarray, cap: int | None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Jobs run in order j = 0, 1, ... on ``cap`` slots (all start at 0 when ``cap`` is
    None); inactive jobs take no slot. Returns the makespan (R, P) and each job's end
    (R, P, N; inf for inactive jobs)."""
    if cap is None:
        ends = np.where(active, durations, np.inf)
        return np.where(active, durations, 0.0).max(axis=-1), ends
    R, P, N = durations.shape
    slots = np.zeros((R, P, cap))
    makespan = np.zeros((R, P))
    ends = np.full((R, P, N), np.inf)
    for j in range(N):
        act = active[..., j]
        if not act.any():
            break
        k = slots.argmin(axis=-1)
        start = np.take_along_axis(slots, k[..., None], axis=-1)[..., 0]
        end = start + durations[..., j]
        np.put_along_axis(slots, k[..., None], np.where(act, end, start)[..., None], axis=-1)
        makespan = np.where(act, np.maximum(makespan, end), makespan)
        ends[..., j] = np.where(act, end, np.inf)
    return makespan, ends


def _votes(keys: np.ndarray, active: np.ndarray, n_keys: int) -> np.ndarray:
    """Vote counts (R, P, K) of the active samples' keys (key >= 0)."""
    R, P, _ = keys.shape
    K = max(n_keys, 1)
    ok = active & (keys >= 0)
    base = (np.arange(R)[:, None, None] * P + np.arange(P)[None, :, None]) * K
    flat = (base + np.where(ok, keys, 0))[ok]
    return np.bincount(flat, minlength=R * P * K).reshape(R, P, K)


def _majority(keys: np.ndarray, active: np.ndarray, finish: np.ndarray, n_keys: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(winner key id, has-answer, vote counts) by the policies' rule
    (:mod:`policies.votes`): most votes; a tie goes to the answer whose first vote finished
    first. Completion order is by finish time, then served position: exact for distinct
    times and within one request; for samples of different requests that finish at the
    very same simulated instant the runtime's order is its timer heap's (the lean
    engine reproduces it), which this approximates by served position.

    Only the (order, problem) rows where two answers share the most votes need the
    completion order (elsewhere the answer with the most votes wins, and a row without
    votes gets key 0 and no answer either way), so only those rows are sorted."""
    counts = _votes(keys, active, n_keys)
    top = counts.max(axis=-1)
    winner = counts.argmax(axis=-1)
    tied = (top > 0) & ((counts == top[..., None]).sum(axis=-1) > 1)
    if tied.any():
        winner[tied] = _first_vote_winner(keys[tied][None], active[tied][None],
                                          finish[tied][None], counts[tied][None])[0]
    return winner, top > 0, counts


def _first_vote_winner(keys: np.ndarray, active: np.ndarray, finish: np.ndarray,
                       counts: np.ndarray) -> np.ndarray:
    """Per (order, problem) row: the most votes, a tie to the answer whose first vote
    finished first (by finish time, then served position)."""
    R, P, N = keys.shape
    K = counts.shape[-1]
    pos = np.broadcast_to(np.arange(N), (R, P, N))
    # by finish, then position: a stable sort by finish is np.lexsort((pos, finish))
    order = np.argsort(np.where(active, finish, np.inf), axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, pos, axis=-1)
    ok = active & (keys >= 0)
    first = np.full(R * P * K, N, dtype=np.int64)
    base = (np.arange(R)[:, None, None] * P + np.arange(P)[None, :, None]) * K
    np.minimum.at(first, (base + np.where(ok, keys, 0))[ok], rank[ok])
    score = counts * (N + 1) - first.reshape(R, P, K)
    return score.argmax(axis=-1)


def full_majority(src: ReplaySource) -> np.ndarray:
    """Per problem, the whole pool's majority key id, maj@N as the data README computes it
    (-1: no answer): ties go to the key that occurs first in the pool, so the reference
    does not depend on the served order. ``sc:n=all`` itself breaks a tie by completion
    order (the policies' rule), so on an exact tie it may disagree with this."""
    a = src.pool.arrays
    counts = _votes(a.key[None], a.valid[None], a.key_correct.shape[1])[0]
    return np.where(counts.max(-1) > 0, counts.argmax(-1), -1)


def _agree(src: ReplaySource, winner: np.ndarray, has: np.ndarray) -> np.ndarray:
    return (np.where(has, winner, -1) == full_majority(src)[None, :]).astype(float)


def _key_correct(src: ReplaySource, winner: np.ndarray, has: np.ndarray) -> np.ndarray:
    """1 / 0 per (order, problem) for a right / wrong (or no) answer; NaN for an answer
    whose key has no label (ungraded, as the lean and direct engines and the runtime
    leave it)."""
    a = src.pool.arrays
    R = winner.shape[0]

    def at(table: np.ndarray) -> np.ndarray:
        return np.take_along_axis(np.broadcast_to(table, (R, *table.shape)),
                                  winner[..., None], axis=2)[..., 0]

    right = (at(a.key_correct) & has).astype(float)
    return np.where(has & ~at(a.key_labelled), np.nan, right)


def _drawn(src: ReplaySource, plan: FixedPlan, cfg: ReplayConfig, trim: bool = False
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The samples a fixed plan draws, per (order, problem, position): served pool index,
    whether it is among the plan's first ``solutions``, its key id and its tokens.
    ``trim``: only the positions up to the last one any problem draws (the others are
    inactive everywhere)."""
    a = src.pool.arrays
    k = np.minimum(a.n, plan.solutions)
    served = _served(src, cfg.orders, max(int(k.max(initial=0)), 1) if trim else None)
    N = served.shape[2]
    active = (np.arange(N)[None, None, :] < k[None, :, None]) & (served >= 0)
    return served, active, _take(a.key, served, -2), _take(a.tokens, served, 0.0)


def _vector_sc(src: ReplaySource, plan: FixedPlan, cfg: ReplayConfig, trim: bool = True
               ) -> dict[str, np.ndarray]:
    """The metrics of a fixed SC plan. ``trim`` (the same numbers; False for the tests):
    only the positions some problem draws, since the others change nothing: inactive
    samples take no slot, cast no vote and sort after every active one (finish inf); and
    a plan that draws every sample without a cap by :func:`_vector_sc_all`."""
    a = src.pool.arrays
    if trim and cfg.concurrency is None and plan.solutions >= int(a.n.max(initial=0)):
        return _vector_sc_all(src, cfg)
    served, active, keys, toks = _drawn(src, plan, cfg, trim=trim)
    R, P, _ = served.shape
    durations = cfg.ttft + toks / cfg.decode_rate
    latency, ends = _schedule(durations, active, cfg.concurrency)
    winner, has, _ = _majority(keys, active, ends, a.key_correct.shape[1])
    return {
        "correct": _key_correct(src, winner, has),
        "tokens": np.where(active, toks, 0.0).sum(-1),
        "samples": active.sum(-1).astype(float),
        "latency": latency,
        "cancelled": np.zeros((R, P)),
        "agree": _agree(src, winner, has),
        "verify_tokens": np.zeros((R, P)),
        "verifications": np.zeros((R, P)),
    }


def _vector_sc_all(src: ReplaySource, cfg: ReplayConfig) -> dict[str, np.ndarray]:
    """:func:`_vector_sc` of a plan that draws every sample, without a cap. Every sample
    then starts at once in every order, so tokens, samples, latency and vote counts do
    not depend on the order (the sums are of integers, exact in any order); the order
    matters only where two answers share the most votes, and only those problems are
    taken in served order."""
    a = src.pool.arrays
    R = cfg.orders
    valid = a.valid
    K = a.key_correct.shape[1]
    dur = cfg.ttft + a.tokens / cfg.decode_rate
    counts = _votes(a.key[None], valid[None], K)[0]  # (P, K)
    top = counts.max(axis=-1)
    has = top > 0
    winner = np.broadcast_to(counts.argmax(axis=-1), (R, len(top))).copy()
    tied = np.nonzero(has & ((counts == top[:, None]).sum(axis=-1) > 1))[0]
    if tied.size:
        served = np.stack([src.orders(r)[tied] for r in range(R)])  # (R, T, N)
        active = served >= 0
        keys = _take(a.key[tied], served, -2)
        finish = np.where(active, _take(dur[tied], served, 0.0), np.inf)
        tied_counts = counts[tied]
        winner[:, tied] = _first_vote_winner(keys, active, finish,
                                             np.broadcast_to(tied_counts, (R, *tied_counts.shape)))
    has_r = np.broadcast_to(has, winner.shape)

    def per_order(values: np.ndarray) -> np.ndarray:
        return np.broadcast_to(values, winner.shape).copy()

    return {
        "correct": _key_correct(src, winner, has_r),
        "tokens": per_order(np.where(valid, a.tokens, 0.0).sum(-1)),
        "samples": per_order(valid.sum(-1).astype(float)),
        "latency": per_order(np.where(valid, dur, 0.0).max(-1, initial=0.0)),
        "cancelled": np.zeros(winner.shape),
        "agree": _agree(src, winner, has_r),
        "verify_tokens": np.zeros(winner.shape),
        "verifications": np.zeros(winner.shape),
    }


def _vector_genrm(src: ReplaySource, plan: FixedPlan, cfg: ReplayConfig
                  ) -> dict[str, np.ndarray]:
    a = src.pool.arrays
    served, active, keys, toks = _drawn(src, plan, cfg)
    R, P, N = served.shape
    answered = active & (keys >= 0)
    va = src.verifier_arrays(plan.verifications)
    idx = np.where(served < 0, 0, served)
    sel = (np.arange(P)[None, :, None], idx)
    p = va.p[sel]  # (R, P, N, V)
    ok = va.ok[sel] & answered[..., None]
    vt = va.tokens[sel]
    parsed = ok & ~np.isnan(p)
    n_parsed = parsed.sum(-1)
    score = np.where(n_parsed > 0, np.where(parsed, p, 0.0).sum(-1) / np.maximum(n_parsed, 1),
                     -np.inf)
    finish = cfg.ttft + toks / cfg.decode_rate
    vdur = np.where(ok, cfg.ttft + vt / cfg.decode_rate, 0.0).max(-1)
    latency = np.where(active, finish + np.where(ok.any(-1), vdur, 0.0), 0.0).max(-1)
    maj, has, counts = _majority(keys, active, finish, a.key_correct.shape[1])
    votes = np.take_along_axis(counts, np.where(keys >= 0, keys, 0), axis=2)
    candidate = answered & (n_parsed > 0)
    pos = np.broadcast_to(np.arange(N), (R, P, N))
    order = np.lexsort((pos, np.where(candidate, finish, np.inf),
                        -np.where(candidate, votes, -1), -np.where(candidate, score, -np.inf)),
                       axis=-1)
    best = order[..., 0]
    best_key = np.take_along_axis(keys, best[..., None], axis=2)[..., 0]
    any_scored = candidate.any(-1)
    winner = np.where(any_scored, np.maximum(best_key, 0), maj)
    has = np.where(any_scored, True, has)
    vtokens = np.where(ok, vt, 0.0).sum((-1, -2))
    tokens = np.where(active, toks, 0.0).sum(-1) + vtokens
    return {
        "correct": _key_correct(src, winner, has),
        "tokens": tokens,
        "samples": active.sum(-1).astype(float),
        "latency": latency,
        "cancelled": np.zeros((R, P)),
        "agree": _agree(src, winner, has),
        "verify_tokens": vtokens,
        "verifications": ok.sum((-1, -2)).astype(float),
    }


# ---- the runtime engine ------------------------------------------------------------------
class _NoSlot:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _SemSlot:
    __slots__ = ("_sem",)

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self._sem = sem

    async def __aenter__(self) -> None:
        await self._sem.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._sem.release()


_NO_SLOT = _NoSlot()


class ProblemLimiter:
    """Per-problem cap on samples in flight; the runtime's :class:`Limiter` contract
    (``slot()``, FIFO), without its request-rate machinery, which a replay never uses."""

    def __init__(self, concurrency: int | None) -> None:
        self._sem = asyncio.Semaphore(concurrency) if concurrency else None

    def slot(self) -> _NoSlot | _SemSlot:
        return _NO_SLOT if self._sem is None else _SemSlot(self._sem)


async def _run_problems(src: ReplaySource, policy: Any, order: int, cfg: ReplayConfig,
                        history: RunHistory | None = None) -> list[SolveResult]:
    backend = ReplayBackend(src, order=order, decode_rate=cfg.decode_rate, ttft=cfg.ttft,
                            chunks=cfg.chunks, verify_tokens=src.verify_tokens)
    if history is None:
        history = RunHistory()  # one run per order: its problems share what they learn
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(solve(p, policy, backend=backend, task=src.task,
                                      limiter=ProblemLimiter(cfg.concurrency),
                                      max_n=1 if cfg.concurrency else defaults.MAX_N,
                                      history=history))
                 for p in src.problems]
    return [t.result() for t in tasks]


#: per source: each problem's whole-pool majority key (None: no answer), for :func:`_row`
_MAJORITY_KEYS: weakref.WeakKeyDictionary[ReplaySource, list[str | None]] = \
    weakref.WeakKeyDictionary()


def _majority_keys(src: ReplaySource) -> list[str | None]:
    got = _MAJORITY_KEYS.get(src)
    if got is None:
        keys = src.pool.arrays.keys
        got = _MAJORITY_KEYS[src] = [keys[i][m] if m >= 0 else None
                                     for i, m in enumerate(full_majority(src).tolist())]
    return got


def _row(src: ReplaySource, results: Sequence[SolveResult]) -> tuple[np.ndarray, int]:
    full = _majority_keys(src)
    # one list per metric, in METRICS order, made an array at once
    cols: tuple[list, ...] = tuple([] for _ in METRICS)
    correct, tokens, samples, latency, cancelled, agree, verify_tokens, verifications = cols
    errors = 0
    for i, r in enumerate(results):
        correct.append(math.nan if r.correct is None else float(r.correct))
        tokens.append(r.usage.completion_tokens)
        samples.append(len(r.solutions))
        latency.append(r.elapsed)
        cancelled.append(sum(1 for f in r.failed if f.reason == "cancelled" and f.kind == "solve")
                         if r.failed else 0)
        agree.append(float(r.key == full[i]))  # a None majority: the answer is None too
        verify_tokens.append(r.verification_tokens)
        verifications.append(len(r.verifications))
        if r.error is not None and not isinstance(r.error, PoolExhausted):
            errors += 1
    return np.array(cols, dtype=float).reshape(len(METRICS), len(results)), errors


def run_runtime_order(src: ReplaySource, policy: PolicyLike, order: int, cfg: ReplayConfig
                      ) -> tuple[np.ndarray, int]:
    """One order of one policy through the runtime: (metrics × problems array, errors).

    Each call gets a fresh simulated clock starting at 0, so results do not depend on
    what ran before (floating-point time stays small and identical).
    """
    policy = policy_for(policy, int(src.pool.arrays.n.max()))
    with asyncio.Runner(loop_factory=SimulatedClockLoop) as runner:
        results = runner.run(_run_problems(src, policy, order, cfg))
    return _row(src, results)


def run_direct_order(src: ReplaySource, policy: PolicyLike, order: int, cfg: ReplayConfig
                     ) -> tuple[np.ndarray, int] | None:
    """One order of a counting rule through the direct engine (:mod:`benchmarks.direct`):
    the same (metrics × problems array, errors) as :func:`run_lean_order`, or ``None``
    where the order needs the lean engine."""
    from benchmarks.direct import run_direct_order as run

    policy = policy_for(policy, int(src.pool.arrays.n.max()))
    row = run(src, policy, order, decode_rate=cfg.decode_rate, ttft=cfg.ttft,
              majority=_majority_keys(src), metrics=len(METRICS))
    return None if row is None else (row, 0)


def run_lean_order(src: ReplaySource, policy: PolicyLike, order: int, cfg: ReplayConfig
                   ) -> tuple[np.ndarray, int]:
    """One order of one policy through the lean engine (:mod:`benchmarks.engine`): the
    same (metrics × problems array, errors) as :func:`run_runtime_order`."""
    from benchmarks.engine import run_order

    policy = policy_for(policy, int(src.pool.arrays.n.max()))
    results = run_order(src, policy, order, decode_rate=cfg.decode_rate, ttft=cfg.ttft,
                        chunks=cfg.chunks)
    return _row(src, results)


_SOURCES: dict[int, ReplaySource] = {}


def _worker(job: tuple[int, Any, int, ReplayConfig, str]) -> tuple[np.ndarray, int, bool]:
    """(row, errors, whether a direct order went to the lean engine)."""
    key, policy, order, cfg, engine = job
    src = _SOURCES[key]
    if engine == "direct":
        got = run_direct_order(src, policy, order, cfg)
        if got is not None:
            return (*got, False)
        return (*run_lean_order(src, policy, order, cfg), True)
    run = run_lean_order if engine == "lean" else run_runtime_order
    return (*run(src, policy, order, cfg), False)


def _workers(cfg: ReplayConfig, jobs: int) -> int:
    n = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)
    return max(1, min(n, jobs))


def _order_outcomes(src: ReplaySource, policies: Mapping[str, Any], cfg: ReplayConfig,
                    engine: str, progress: Callable[[int], None] | None = None
                    ) -> dict[str, tuple[np.ndarray, int, int]]:
    """Every (policy, order) through the direct, lean or runtime engine; ``policies``:
    label -> policy object; returns label -> ((metrics, R, P), errors, orders the direct
    engine handed to the lean one)."""
    P = len(src.problems)
    specs = list(policies)
    out = {s: (np.zeros((len(METRICS), cfg.orders, P)), 0) for s in specs}
    jobs = [(id(src), policies[s], r, cfg, engine) for s in specs for r in range(cfg.orders)]
    if not jobs:
        return {s: (out[s][0], 0, 0) for s in specs}
    _SOURCES[id(src)] = src
    errors = dict.fromkeys(specs, 0)
    handed = dict.fromkeys(specs, 0)
    try:
        n = _workers(cfg, len(jobs))
        labels = ((s, r) for s in specs for r in range(cfg.orders))
        with contextlib.ExitStack() as stack:
            if n > 1 and "fork" in multiprocessing.get_all_start_methods():
                ex = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                    n, mp_context=multiprocessing.get_context("fork")))
                results = ex.map(_worker, jobs, chunksize=max(1, len(jobs) // (4 * n)))
            else:
                # The direct and lean engines make no reference cycles an order needs
                # collected (the lean engine breaks its own as requests close): the cyclic
                # collector is paused for the whole loop, not only inside each order
                # (benchmarks.engine), since between orders it would traverse the pool and
                # the caches again and again (measured: 10-20% of adaptive's replay CPU);
                # it runs again at the end.
                if engine != "runtime" and gc.isenabled():
                    gc.disable()
                    stack.callback(gc.enable)
                results = map(_worker, jobs)
            for (s, r), (row, err, lean) in zip(labels, results, strict=True):
                out[s][0][:, r, :] = row
                errors[s] += err
                handed[s] += lean
                if progress:
                    progress(1)
    finally:
        _SOURCES.pop(id(src), None)
    return {s: (out[s][0], errors[s], handed[s]) for s in specs}


# ---- one pool, many policies ---------------------------------------------------------------
def _engine_for(policy: Any, cfg: ReplayConfig) -> str:
    if cfg.engine == "runtime":
        return "runtime"
    plan = fixed_plan(policy) if cfg.engine == "auto" else None
    if plan is not None and not (plan.kind == "genrm" and cfg.concurrency is not None):
        return "vectorised"
    if cfg.engine == "auto":
        from benchmarks.direct import supports

        if supports(policy, concurrency=cfg.concurrency, chunks=cfg.chunks):
            return "direct"
    return "runtime" if cfg.concurrency is not None else "lean"


def _resolve(policies: Sequence[PolicyLike], src: ReplaySource) -> dict[str, Any]:
    """Label -> policy object for this pool (``all``: its size), checked."""
    size = int(src.pool.arrays.n.max())
    out: dict[str, Any] = {}
    for p in policies:
        name = label(p)
        if name in out:
            raise ConfigError(f"policy {name!r} given twice")
        obj = policy_for(p, size)  # ConfigError says what is valid
        plan = fixed_plan(obj)
        if plan is not None and plan.kind == "genrm" and not src.can_verify:
            raise ConfigError(f"{name!r} needs verifications, and pool {src.name} has none; "
                              "use a pool with verifications or the simulated verifier")
        out[name] = obj
    return out


def replay_pool(src: ReplaySource, policies: Sequence[PolicyLike], cfg: ReplayConfig,
                progress: Callable[[int], None] | None = None) -> list[PolicyOutcome]:
    """Replay every policy (spec string or object) on one pool; outcomes in the given
    order. The engine is chosen by the policy's type (:func:`fixed_plan`)."""
    objs = _resolve(policies, src)
    outcomes: dict[str, PolicyOutcome] = {}
    engines = {s: _engine_for(obj, cfg) for s, obj in objs.items()}
    for spec, obj in objs.items():
        if engines[spec] != "vectorised":
            continue
        t0 = time.perf_counter()
        plan = fixed_plan(obj)
        assert plan is not None
        m = _vector_sc(src, plan, cfg) if plan.kind == "sc" else _vector_genrm(src, plan, cfg)
        outcomes[spec] = PolicyOutcome(src.name, spec, "vectorised", m["correct"], m["tokens"],
                                       m["samples"], m["latency"], m["cancelled"],
                                       m["agree"], m["verify_tokens"], m["verifications"],
                                       wall_s=time.perf_counter() - t0)
        if progress:
            progress(cfg.orders)
    for engine in ("direct", "lean", "runtime"):
        mine = {s: obj for s, obj in objs.items() if engines[s] == engine}
        if not mine:
            continue
        t0 = time.perf_counter()
        got = _order_outcomes(src, mine, cfg, engine, progress)
        wall = (time.perf_counter() - t0) / len(mine)
        for spec, (arr, errors, handed) in got.items():
            notes = [f"direct engine: {handed} of {cfg.orders} orders replayed by the lean "
                     "engine (samples of different requests finishing at one instant, or "
                     "the pool running out)"] if handed else []
            outcomes[spec] = PolicyOutcome(src.name, spec, engine, *arr, errors=errors,
                                           wall_s=wall, notes=notes)
    return [outcomes[label(p)] for p in policies]


def replay_policy(src: ReplaySource, policy: PolicyLike, cfg: ReplayConfig) -> PolicyOutcome:
    """Replay one policy on one pool."""
    return replay_pool(src, [policy], cfg)[0]


# ---- statistics ----------------------------------------------------------------------------
def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _median_saving(tokens: np.ndarray, base: np.ndarray) -> float | None:
    """Median over problems of 1 - tokens / base tokens (problems with base > 0)."""
    ok = base > 0
    return float(np.median(1 - tokens[ok] / base[ok])) if ok.any() else None


def summarise(outcomes: Sequence[PolicyOutcome], cfg: ReplayConfig, *, extra: dict | None = None
              ) -> list[dict[str, Any]]:
    """The JSON ``runs`` entries for the outcomes of one pool (paired bootstrap)."""
    if not outcomes:
        return []
    P = outcomes[0].correct.shape[1]
    rng = np.random.default_rng([cfg.seed, 0xB007])
    idx = rng.integers(0, P, size=(cfg.bootstrap, P))
    base = outcomes[0]
    base_acc = np.nanmean(base.correct, axis=0)
    base_tok = base.tokens.mean(axis=0)
    runs = []
    for o in outcomes:
        acc_p = np.nanmean(o.correct, axis=0)  # per problem, over orders
        graded = ~np.isnan(acc_p)
        acc_p0 = np.where(graded, acc_p, 0.0)
        boot_n = graded[idx].sum(1)
        boot = acc_p0[idx].sum(1) / np.maximum(boot_n, 1)
        tok_p = o.tokens.mean(axis=0)
        lat_p = o.latency.mean(axis=0)
        run: dict[str, Any] = {
            "pool": o.pool,
            "policy": o.policy,
            "problems": int(P),
            "orders": int(o.correct.shape[0]),
            "accuracy": float(acc_p0.sum() / max(graded.sum(), 1)),
            "accuracy_ci95": _ci(boot),
            "tokens_per_problem": float(tok_p.mean()),
            "solution_tokens_per_problem": float((o.tokens - o.verify_tokens).mean()),
            "verification_tokens_per_problem": float(o.verify_tokens.mean()),
            "verifications_per_problem": float(o.verifications.mean()),
            "samples_per_problem": float(o.samples.mean()),
            "latency_per_problem": float(lat_p.mean()),
            "tokens_ci95": _ci(tok_p[idx].mean(1)),
            "latency_ci95": _ci(lat_p[idx].mean(1)),
            "cancelled_per_problem": float(o.cancelled.mean()),
            "agreement_with_full_sc": float(o.agree.mean()),
            "engine": o.engine,
            "concurrency": cfg.concurrency,
        }
        if o.errors:
            run["errors"] = int(o.errors)
        if o.notes:
            run["notes"] = list(o.notes)
        if o is not base:
            diff = np.where(graded, acc_p0 - np.nan_to_num(base_acc), 0.0)
            boot_d = diff[idx].sum(1) / np.maximum(boot_n, 1)
            run["vs"] = {
                "policy": base.policy,
                "accuracy_delta": float(diff.sum() / max(graded.sum(), 1)),
                "accuracy_delta_ci95": _ci(boot_d),
                "tokens_ratio": float(tok_p.mean() / base_tok.mean()) if base_tok.mean() else None,
                "median_token_saving": _median_saving(tok_p, base_tok),
            }
        if extra:
            run.update(extra)
        runs.append(run)
    return runs


def sweep(sources: Sequence[ReplaySource], specs: Sequence[PolicyLike], cfg: ReplayConfig,
          progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Replay every spec on every pool; the JSON report (``{"runs": [...], ...}``)."""
    if not specs:
        raise ConfigError("no policies to replay")
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for src in sources:
        outcomes = replay_pool(src, specs, cfg, progress)
        size = int(src.pool.arrays.n.max())
        for policy, run in zip(specs, summarise(outcomes, cfg, extra={
                "verifier": src.verifier_label,
                "simulated_verifier": src.verifier_label.startswith("simulated")}),
                               strict=True):
            run["horizon"] = horizon(policy, size)
            runs.append(run)
        src.forget_orders()
    return {
        "runs": runs,
        "config": {
            "orders": cfg.orders, "seed": cfg.seed, "concurrency": cfg.concurrency,
            "decode_rate": cfg.decode_rate, "ttft": cfg.ttft, "engine": cfg.engine,
            "bootstrap": cfg.bootstrap,
            "tie_rule": "the answer whose first vote finished first wins a tie (vectorised: "
                        "by finish time, then served position)",
        },
        "wall_s": round(time.perf_counter() - t0, 3),
    }
