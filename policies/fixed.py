"""Fixed-budget baselines: Self-Consistency and GenRM Best-of-N."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.decisions import Decision, Stop, StopCode, Verify
from orchestrator.errors import ConfigError
from orchestrator.snapshot import ProblemSnapshot
from policies.base import failures_allowed, in_flight, is_count, non_default, top_up
from policies.votes import majority_stop


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if not is_count(value, minimum):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, slots=True)
class SelfConsistency:
    """Majority vote over ``n`` sampled solutions (Wang et al. 2023).

    All ``n`` samples are requested at once. Samples whose stream broke are replaced, up to
    ``max_failures`` (default ``n``) breaks; after that the vote is taken over what came
    back. Ties: see :mod:`policies.votes`.
    """

    n: int
    max_failures: int | None = None

    def __post_init__(self) -> None:
        _check_count("sc: n", self.n)
        if self.max_failures is not None:
            _check_count("sc: max_failures", self.max_failures, 0)

    @property
    def spec(self) -> str:
        return ",".join([f"sc:n={self.n}", *non_default(self, "max_failures")])

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        if len(s.solutions) >= self.n:
            return [majority_stop(s, f"self-consistency over {len(s.solutions)} samples", "max")]
        max_failures = failures_allowed(self.max_failures, self.n)
        more = [] if s.budget_left.exhausted else top_up(s, self.n, max_failures)
        if more or in_flight(s):
            return more
        exhausted = s.budget_left.exhausted
        why = "budget exhausted" if exhausted else "too many failed samples"
        return [majority_stop(s, f"{why} after {len(s.solutions)} of {self.n} samples",
                              "budget" if exhausted else "failures")]


@dataclass(frozen=True, slots=True)
class GenRM:
    """Best-of-N with a generative verifier (Singhi et al. 2025): ``solutions`` samples,
    each answered one verified ``verifications`` times; a solution's score is the mean
    P(Yes) of its verifications; the best-scored solution's answer wins.

    Solutions are verified as soon as they finish (the verifications of early solutions
    overlap with later samples). Solutions without an extracted answer are never sent to
    the verifier. Broken verifications are not replaced; the score is the mean over those
    that returned a verdict. Ties on score go to the answer with more votes, then to the
    earliest solution. If no solution got a score (every verdict unparsable), the answer
    falls back to the majority vote and the reason says so.
    """

    solutions: int
    verifications: int
    max_failures: int | None = None

    def __post_init__(self) -> None:
        _check_count("genrm: s", self.solutions)
        _check_count("genrm: v", self.verifications)
        if self.max_failures is not None:
            _check_count("genrm: max_failures", self.max_failures, 0)

    @property
    def spec(self) -> str:
        return ",".join([f"genrm:s={self.solutions},v={self.verifications}",
                         *non_default(self, "max_failures")])

    #: sends solutions to the verifier (the runtime checks a budget can hold one)
    verifies = True

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        exhausted = s.budget_left.exhausted
        max_failures = failures_allowed(self.max_failures, self.solutions)
        wanted: list[Decision] = []
        unverified = False  # verifications wanted that the budget cannot hold now
        if not exhausted:
            wanted.extend(top_up(s, self.solutions, max_failures))
        for sol in s.answered:
            missing = self.verifications - s.verifications_requested(sol.id)
            if missing > 0:
                if s.budget_left.can_verify and s.blocked is None:
                    wanted.append(Verify(sol, missing))
                else:
                    unverified = True
        if wanted or in_flight(s):
            return wanted
        code: StopCode
        if exhausted or unverified:
            why, code = "budget exhausted", "budget"
        elif len(s.solutions) < self.solutions:
            why, code = "too many failed samples", "failures"
        else:
            why, code = "best-of-n", "max"
        return [self._best(s, why, code)]

    @staticmethod
    def _best(s: ProblemSnapshot, why: str, code: StopCode) -> Stop:
        votes = {v.key: v.votes for v in s.votes()}
        best = None
        best_rank = None
        for sol in s.answered:
            score = s.score(sol.id)
            if score is None:
                continue
            rank = (-score, -votes.get(sol.key, 0), sol.index)
            if best_rank is None or rank < best_rank:
                best, best_rank = sol, rank
        if best is None or best_rank is None:
            return majority_stop(s, f"genrm {why}, no verification scores; fell back to vote",
                                 code)
        return Stop(best.answer, f"genrm {why}: score {-best_rank[0]:.3f}", best.key, code)
