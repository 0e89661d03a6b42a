"""The direct replay engine: counting rules, one problem at a time, no snapshots.

``ac``, ``esc`` and ``boinf`` (:mod:`policies.literature`) decide on what they count: the
vote counts, the finished samples' keys in completion order, the samples in flight and
the broken ones. Each has a ``sampling_step`` method holding its whole rule, which its
``decide`` calls on a snapshot; this engine calls it on those counts directly. They read
no run history, so the problems of an order do not interact, and each problem is replayed
alone by a plain loop over its samples' finish times: per order of the 500-problem
MATH-500 pool a few milliseconds instead of the lean engine's tens (the benchmark:
:mod:`benchmarks.replay_speed`).

It gives the same per-problem metrics as :func:`benchmarks.replay.run_lean_order` (and so
as the runtime): answer (correct, agree), tokens, samples, cancelled samples (none) and
latency (to floating-point rounding: the event loops' clock reaches a deadline by adding
the time to it, this one takes the deadline). ``tests/test_direct.py`` checks it against
the lean engine on many orders and pools.

Where its plain loop could differ from the event loops', it does not guess: it returns
``None`` and the order is replayed by the lean engine. That is when samples of different
requests of one problem finish within :data:`TIE` seconds of each other and their order
could matter (the event loops' order among equal deadlines is their timer heap's, which
depends on every other problem's timers: for ``esc``, whose windows follow completion
order, always; for ``ac`` and ``boinf``, which read counts only, when the samples differ
in answer and a tie for the most votes at the stop would go by their order), when a
sample would finish at the instant it is launched, when a problem's pool runs out (the
short request's failure is its own sequence of events), and when a stop would cut samples
in flight (the three rules do not; the cut's tokens depend on when the loops last woke
each stream).
Only without a concurrency cap and with one chunk per sample (``ReplayConfig.chunks``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.engine import _served_samples, served_sample
from benchmarks.source import ReplaySource
from orchestrator import defaults
from policies.literature import (
    SETTLED,
    AdaptiveConsistency,
    BestOfInfinity,
    EarlyStoppingSC,
)

__all__ = ["TIE", "run_direct_order", "supports"]

#: the policy types whose ``sampling_step`` this engine runs (exactly these types: a
#: subclass may decide differently)
_RULES = (AdaptiveConsistency, EarlyStoppingSC, BestOfInfinity)
#: the rules that read the finished samples' keys only as counts and their number (not
#: their order): samples of different requests finishing at one instant with different
#: keys change nothing they decide, only which answer a tie for the most votes goes to
_ORDER_FREE = (AdaptiveConsistency, BestOfInfinity)
#: finish times of samples of different requests closer than this (seconds) send the
#: order to the lean engine
TIE = 1e-6
_EPS = 1e-9  # as orchestrator.backends.replay and benchmarks.engine


def supports(policy: Any, *, concurrency: int | None = None, chunks: int = 1) -> bool:
    """Whether this engine replays ``policy`` under these settings."""
    return type(policy) in _RULES and concurrency is None and chunks == 1


def run_direct_order(src: ReplaySource, policy: Any, order: int, *, decode_rate: float,
                     ttft: float, majority: Sequence[str | None], metrics: int,
                     max_n: int = defaults.MAX_N) -> np.ndarray | None:
    """The (metrics × problems) array of one order (the rows of
    :data:`benchmarks.replay.METRICS`, ``metrics`` of them), or ``None`` when the order
    needs the lean engine (see the module docstring). ``majority``: each problem's
    whole-pool majority key."""
    step = policy.sampling_step
    order_free = type(policy) in _ORDER_FREE
    rows = src.orders(order).tolist()
    ns = src.pool.arrays.n.tolist()
    served_cache = _served_samples(src)
    task = src.task
    grader = task.grader
    graded = _graded(src)
    # the first six metrics, per problem (verification tokens and verifications are 0)
    correct: list[float] = []
    spent: list[int] = []
    samples: list[int] = []
    latency: list[float] = []
    cancelled: list[int] = []
    agree: list[float] = []
    memo: dict[tuple, int] = _memo(policy)
    heappush, heappop = heapq.heappush, heapq.heappop
    for i, prob in enumerate(src.problems):
        pid = prob.id
        served = rows[i]
        n_pool = ns[i]
        known = served_cache.get(pid)
        if known is None:
            known = served_cache[pid] = {}
        # (end, request, choice, tokens, key, answer) of each sample in flight
        heap: list[tuple[float, int, int, int, str | None, str | None]] = []
        requests = 0
        keys: list[str | None] = []  # finished samples' keys, completion order
        counts: dict[str, int] = {}
        first: dict[str, int] = {}  # key -> completion index of its first vote
        answers: dict[str, str | None] = {}  # key -> the answer of its first vote
        unsure: dict[str, int] = {}  # key -> the mixed batch its first vote came in
        batches = 0
        cursor = 0
        flying = 0
        tokens = 0
        t = 0.0
        k = step((), keys, 0, 0)
        while True:
            if k > 0:  # launch k samples now, in requests of up to max_n
                if cursor + k > n_pool:
                    return None  # the pool runs out: a short request fails
                base = t + ttft
                while k > 0:
                    n = k if k < max_n else max_n
                    rid = requests
                    requests += 1
                    for j in range(n):
                        idx = served[cursor]
                        cursor += 1
                        if idx < 0:
                            return None
                        got = known.get(idx)
                        if got is None:
                            got = known[idx] = served_sample(src, grader, pid, idx)
                        tok = got[1]
                        end = base + tok / decode_rate
                        if end <= t + TIE:
                            return None  # finishes at its launch instant
                        heappush(heap, (end, rid, j, tok, got[3], got[2]))
                    flying += n
                    k -= n
            elif k == SETTLED or not flying:
                break
            # the next finish and every one within _EPS of it: the event loops finish them
            # all before the next decision (the first request's in choice order, then the
            # others' in an order their timer heap sets); with more than one request they
            # must share one key and answer, so that their order changes nothing
            end, rid, j, tok, key, answer = heappop(heap)
            t = end
            batch = [(j, tok, key, answer)]
            lim = end + _EPS
            mixed = False
            while heap and heap[0][0] <= lim:
                _e2, r2, j2, tok2, key2, ans2 = heappop(heap)
                if r2 != rid:
                    mixed = True
                batch.append((j2, tok2, key2, ans2))
            if mixed and any(b[2] != key or b[3] != answer for b in batch):
                if not order_free:
                    return None
                batches += 1  # first votes in it: their order is the loops' (see below)
            else:
                mixed = False
            if heap and heap[0][0] <= end + TIE:
                return None  # the next finish is too close to tell the loops' order
            for _, tok, key, answer in batch:
                tokens += tok
                flying -= 1
                if key is not None:
                    c = counts.get(key)
                    if c is None:
                        counts[key] = 1
                        first[key] = len(keys)
                        answers[key] = answer
                        if mixed:
                            unsure[key] = batches
                    else:
                        counts[key] = c + 1
                keys.append(key)
            ranked = tuple(sorted(counts.values(), reverse=True))
            if order_free:  # a pure function of what it reads: memoised
                memo_key = (ranked, len(keys), flying)
                k = memo.get(memo_key)
                if k is None:
                    if len(memo) >= _MEMO_SIZE:
                        memo.clear()
                    k = memo[memo_key] = step(ranked, keys, flying, 0)
            else:
                k = step(ranked, keys, flying, 0)
        if heap:
            # a stop with samples in flight: their cut (the tokens each streamed by now,
            # which depends on when the loops last woke each stream) is the lean engine's
            # to replay. The three rules keep in flight only samples every path to their
            # stop needs, so they do not stop with any in flight.
            return None
        winner = None
        unanimous = policy.unanimous_key(keys) if k == SETTLED and type(
            policy) is EarlyStoppingSC else None
        if unanimous is not None:  # ESC answers with its unanimous window
            winner = unanimous
        elif counts:
            winner = max(counts, key=lambda x: (counts[x], -first[x]))
            b = unsure.get(winner)
            if b is not None:  # a tie for the most votes decided by an order we do not know
                top = counts[winner]
                if any(unsure.get(x) == b and counts[x] == top for x in counts if x != winner):
                    return None
        correct.append(graded(prob, None if winner is None else answers[winner]))
        spent.append(tokens)
        samples.append(len(keys))
        latency.append(t)
        cancelled.append(0)
        agree.append(1.0 if winner == majority[i] else 0.0)
    out = np.zeros((metrics, len(correct)))
    out[:6] = (correct, spent, samples, latency, cancelled, agree)
    return out


#: per policy object: ``sampling_step`` of an order-free rule by (ranked counts, finished
#: samples, in flight); the policies are frozen dataclasses, equal ones decide alike
_MEMOS: dict[Any, dict[tuple, int]] = {}
_MEMO_SIZE = 1 << 16


def _memo(policy: Any) -> dict[tuple, int]:
    got = _MEMOS.get(policy)
    if got is None:
        if len(_MEMOS) >= 64:
            _MEMOS.clear()
        got = _MEMOS[policy] = {}
    return got


def _graded(src: ReplaySource):
    """``correct`` as the runtime records it: NaN for a problem without a reference,
    else whether the stop's answer is right (an answer of None is wrong; NaN where the
    grader cannot say, e.g. an answer the pool does not label); memoised."""
    grader = src.task.grader
    memo: dict[tuple[str, str | None], float] = {}

    def graded(prob: Any, answer: str | None) -> float:
        if prob.answer is None and not prob.aliases:
            return math.nan
        if answer is None:
            return 0.0
        got = memo.get((prob.id, answer))
        if got is None:
            verdict = grader.is_correct(answer, prob)
            got = memo[prob.id, answer] = math.nan if verdict is None else float(verdict)
        return got

    return graded
