"""The immutable view of one problem that a policy decides on."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.history import ProblemRecord
from orchestrator.types import (
    Budget,
    FailedSample,
    Problem,
    Solution,
    Usage,
    Verification,
)


@dataclass(frozen=True, slots=True)
class VoteCount:
    """One canonical answer with its votes; ``first_index`` is when its first vote arrived."""

    key: str
    answer: str
    votes: int
    first_index: int


@dataclass(frozen=True, slots=True)
class InFlight:
    """Work launched and not yet finished."""

    samples: int = 0
    #: (solution id, number of verifications of it in flight)
    verifications: tuple[tuple[int, int], ...] = ()
    #: completion tokens streamed so far by in-flight solution samples, one entry each
    sample_tokens: tuple[int, ...] = ()

    @property
    def verification_total(self) -> int:
        return sum(count for _, count in self.verifications)

    def verifying(self, solution_id: int) -> int:
        for sid, count in self.verifications:
            if sid == solution_id:
                return count
        return 0


@dataclass(frozen=True, slots=True)
class BudgetLeft:
    """Room left under each cap (``None`` = uncapped).

    ``tokens`` is the completion-token room not yet promised to work in flight;
    ``sample_tokens`` is what one more solution sample needs (its ``max_tokens``).
    """

    tokens: int | None
    requests: int | None
    cost_units: float | None
    sample_tokens: int = 1

    @property
    def exhausted(self) -> bool:
        """True when not even one more solution sample could be launched now."""
        return (
            (self.tokens is not None and self.tokens < self.sample_tokens)
            or (self.requests is not None and self.requests < 1)
            or (self.cost_units is not None and self.cost_units < 1 - 1e-9)
        )


@dataclass(frozen=True, slots=True)
class ProblemSnapshot:
    """Everything a policy may look at, frozen at one instant.

    ``solutions`` are finished samples in completion order (``solutions[i].index == i``);
    ``failed`` holds samples and verifications that broke or were cancelled; ``usage`` is
    everything charged so far, including tokens streamed by work still in flight.
    """

    problem: Problem
    solutions: tuple[Solution, ...]
    verifications: tuple[Verification, ...]
    failed: tuple[FailedSample, ...]
    in_flight: InFlight
    samples_launched: int
    verifications_launched: int
    requests_launched: int
    usage: Usage
    budget: Budget
    budget_left: BudgetLeft
    elapsed: float
    #: measured λ = mean verification length / mean solution length (None until both seen)
    lam: float | None = None
    #: problems of this run already finished, in finishing order (orchestrator.history)
    history: tuple[ProblemRecord, ...] = ()

    # ---- derived views (cheap; computed on demand) ----------------------------------
    @property
    def answered(self) -> tuple[Solution, ...]:
        return tuple(s for s in self.solutions if s.has_answer)

    @property
    def failed_samples(self) -> int:
        return sum(1 for f in self.failed if f.kind == "solve" and f.reason == "failed")

    def votes(self) -> tuple[VoteCount, ...]:
        """Vote counts per canonical key, most votes first; ties: earliest first vote first."""
        counts: dict[str, int] = {}
        first: dict[str, Solution] = {}
        for s in self.solutions:
            key = s.key
            if key is None:
                continue
            if key in counts:
                counts[key] += 1
            else:
                counts[key] = 1
                first[key] = s
        ranked = sorted(counts, key=lambda k: (-counts[k], first[k].index))
        return tuple(VoteCount(k, first[k].answer, counts[k], first[k].index)
                     for k in ranked)

    def verifications_of(self, solution_id: int) -> tuple[Verification, ...]:
        return tuple(v for v in self.verifications if v.solution_id == solution_id)

    def score(self, solution_id: int) -> float | None:
        """Mean P(Yes) over the solution's parsed verifications (None if there are none)."""
        ps = [v.p_yes for v in self.verifications if v.solution_id == solution_id]
        ps = [p for p in ps if p is not None]
        return sum(ps) / len(ps) if ps else None

    def verifications_requested(self, solution_id: int) -> int:
        """Finished + failed + in-flight verifications of one solution."""
        done = sum(1 for v in self.verifications if v.solution_id == solution_id)
        broken = sum(
            1 for f in self.failed if f.kind == "verify" and f.solution_id == solution_id
        )
        return done + broken + self.in_flight.verifying(solution_id)
