"""``adaptive``: stop sampling when the remaining samples can no longer (or are unlikely
to) change what Self-Consistency over ``max`` samples would answer.

The published rules ask "is the leading answer the most likely one?" (Adaptive-Consistency's
Beta criterion I_{1/2}(b+1, a+1) ≥ C) — a question about infinitely many samples. A user
who would otherwise run ``sc:n=max`` wants a different, cheaper-to-satisfy guarantee: *the
answer I stop with is the one ``sc:n=max`` would have given*. With k votes in hand only
``max - k`` samples remain to be drawn, and a lead that those few samples cannot plausibly
overturn is settled long before the Beta criterion fires. So the policy computes, under a
Dirichlet posterior over (leader, runner-up, everything else) with a symmetric
pseudo-count ``prior``, the posterior-predictive probability that the ``max - k`` samples
still to come give the runner-up at least as many votes as the leader, and stops once that
probability is at most ``1 - confidence``. When the lead exceeds the number of samples
still to come, the stop is exact (no sample can change the winner).

Sampling is concurrency-aware: ``width`` samples are kept in flight (topped up as each one
finishes), so latency stays at about SC's (all samples run at once) while the tokens spent
track the number of samples actually needed; on ``Stop`` the runtime cancels the
stragglers, which in reasoning models are the long — and more often wrong — traces.

``confidence`` is the knob: it is the target probability of agreeing with ``sc:n=max`` per
decision, and ``solverify bench calibrate`` picks it on one set of pools for a target
agreement rate and reports how it holds on another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import gammaln

from orchestrator.decisions import Decision, Sample
from orchestrator.errors import ConfigError
from orchestrator.snapshot import ProblemSnapshot
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


def _check(name: str, ok: bool, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"adaptive: {name} must be {what}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Finite-horizon posterior stopping with ``width`` samples in flight.

    Parameters (spec keys in brackets):
      * ``width`` [width]: samples kept in flight (default 8).
      * ``confidence`` [confidence]: stop when P(the leader is still ``sc:n=max``'s answer)
        ≥ confidence (default 0.9: the cheapest value reaching 97.5% agreement with
        ``sc:n=all`` on half of the AIME 2024 pools with ``solverify bench calibrate``;
        README "Benchmarks" shows how it holds on the other pools).
      * ``max`` [max]: the horizon — the ``sc:n=max`` this policy approximates, and the most
        samples it will take (default 64).
      * ``min_votes`` [min_votes]: never stop (except exactly) before the leader has this
        many votes (default 3: two agreeing samples out of a long horizon are too often a
        coincidence of two quick, wrong traces).
      * ``prior`` [prior]: Dirichlet pseudo-count (default 1.0).
      * ``max_failures`` [max_failures]: broken samples replaced (default ``max``).
    """

    width: int = 8
    confidence: float = 0.9
    max: int = 64
    min_votes: int = 3
    prior: float = 1.0
    max_failures: int | None = None

    def __post_init__(self) -> None:
        _check("width", isinstance(self.width, int) and self.width >= 1, self.width,
               "an integer >= 1")
        _check("confidence", 0.0 < self.confidence < 1.0, self.confidence, "in (0, 1)")
        _check("max", isinstance(self.max, int) and self.max >= 1, self.max, "an integer >= 1")
        _check("min_votes", isinstance(self.min_votes, int) and self.min_votes >= 1,
               self.min_votes, "an integer >= 1")
        _check("prior", self.prior > 0, self.prior, "> 0")
        if self.max_failures is not None:
            _check("max_failures", self.max_failures >= 0, self.max_failures, ">= 0")

    @property
    def spec(self) -> str:
        return (f"adaptive:width={self.width},confidence={self.confidence:g},max={self.max},"
                f"min_votes={self.min_votes},prior={self.prior:g}")

    def settled(self, s: ProblemSnapshot) -> str | None:
        """Why the leading answer is settled, or None if it is not yet."""
        votes = s.votes()
        if not votes:
            return None
        a = votes[0].votes
        b = votes[1].votes if len(votes) > 1 else 0
        finished = len(s.solutions)
        remaining = max(self.max - finished, 0)
        if remaining == 0:
            return None  # not settled by the votes: decide() stops on reaching max
        if a - b > remaining:
            return f"lead {a}-{b} exceeds the {remaining} samples left of {self.max}"
        if a < self.min_votes:
            return None
        p = overturn_probability(a, b, finished - a - b, remaining, self.prior)
        if p <= 1.0 - self.confidence:
            return f"P(overturn by {remaining} more) = {p:.3f} at {a}-{b}"
        return None

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        why = self.settled(s)
        if why is not None:
            return [majority_stop(s, f"adaptive: {why}")]
        finished = len(s.solutions)
        if finished >= self.max:
            return [majority_stop(s, f"adaptive: reached max={self.max}", "max")]
        max_failures = self.max if self.max_failures is None else self.max_failures
        can_launch = not s.budget_left.exhausted and s.failed_samples <= max_failures
        want = min(self.width, self.max - finished) - s.in_flight.samples
        if can_launch and want > 0:
            return [Sample(want)]
        if s.in_flight.samples:
            return []
        if s.budget_left.exhausted:
            return [majority_stop(s, f"adaptive: budget exhausted after {finished} samples",
                                  "budget")]
        return [majority_stop(s, f"adaptive: too many failed samples after {finished} samples",
                              "failures")]
