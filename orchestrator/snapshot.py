"""The immutable view of one problem that a policy decides on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.fastinit import builder
from orchestrator.history import ProblemRecord
from orchestrator.types import (
    Budget,
    FailedSample,
    Problem,
    RequestKind,
    Solution,
    Usage,
    Verification,
)

#: the cap that refused work: the problem's token, request or cost-unit cap, or the
#: run-level token cap shared by a batch
BudgetCap = Literal["tokens", "requests", "cost_units", "run_tokens"]


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

    ``tokens`` is the completion-token room not yet promised to work in flight (the
    run-level room included); ``sample_tokens`` is what one more solution sample reserves
    (its ``max_tokens``), ``verify_tokens`` what one more verification reserves;
    ``verify_units`` the cost units one verification counts (λ as measured, 1 before).
    ``cost_units`` is recomputed with λ as measured now, so it can go below 0 when λ
    rises after launches (:class:`~orchestrator.types.Budget`).
    ``can_sample`` / ``can_verify`` say whether one more of each fits right now, by the
    same rule the runtime applies at launch.
    """

    tokens: int | None
    requests: int | None
    cost_units: float | None
    sample_tokens: int = 1
    verify_tokens: int = 1
    verify_units: float = 1.0

    @property
    def exhausted(self) -> bool:
        """True when not even one more solution sample could be launched now."""
        return (
            (self.tokens is not None and self.tokens < self.sample_tokens)
            or (self.requests is not None and self.requests < 1)
            or (self.cost_units is not None and self.cost_units < 1 - 1e-9)
        )

    @property
    def can_sample(self) -> bool:
        """One more solution sample fits now (``not exhausted``)."""
        return not self.exhausted

    @property
    def can_verify(self) -> bool:
        """One more verification fits now."""
        return not (
            (self.tokens is not None and self.tokens < self.verify_tokens)
            or (self.requests is not None and self.requests < 1)
            or (self.cost_units is not None and self.cost_units < self.verify_units - 1e-9)
        )

    def fits(self, kind: RequestKind) -> bool:
        return self.can_sample if kind == "solve" else self.can_verify


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why the runtime asks again: nothing is in flight and the budget refused work.

    ``kinds`` are the kinds of work the policy asked for that did not fit (empty when it
    asked for nothing while not even one more sample fits); ``cap`` is the cap that
    refused the first of them (for an empty ``kinds``: a sample).
    """

    kinds: tuple[RequestKind, ...]
    cap: BudgetCap

    @property
    def reason(self) -> str:
        what = " and ".join("solution samples" if k == "solve" else "verifications"
                            for k in self.kinds) or "more samples"
        return f"the {self.cap.replace('_', ' ')} budget cannot hold {what}"


@dataclass(frozen=True, slots=True)
class AnswerStats:
    """One canonical answer with its votes and its verifier evidence.

    ``solutions`` in completion order; ``readings`` one entry per solution of this answer:
    (solution id, the parsed P(Yes) of its finished verifications, in finishing order);
    ``verified`` finished verifications (parsed or not), ``verifying`` those in flight,
    ``failed_verifications`` those that broke or were cancelled; ``representative`` the
    solution to verify next: the one with the fewest verifications requested (finished,
    in flight or broken), the earliest on a tie.
    """

    key: str
    answer: str
    votes: int
    first_index: int
    solutions: tuple[Solution, ...]
    readings: tuple[tuple[int, tuple[float, ...]], ...]
    verified: int
    verifying: int
    failed_verifications: int
    representative: Solution

    @property
    def scores(self) -> tuple[float, ...]:
        """Every parsed P(Yes) of this answer's solutions."""
        return tuple(p for _, ps in self.readings for p in ps)

    @property
    def mean_score(self) -> float | None:
        ps = self.scores
        return sum(ps) / len(ps) if ps else None

    def readings_of(self, solution_id: int) -> tuple[float, ...]:
        for sid, ps in self.readings:
            if sid == solution_id:
                return ps
        return ()


def broken_samples(failed: Sequence[FailedSample]) -> int:
    """Solution samples that broke (not those cancelled): what policies replace, up to
    their ``max_failures`` (``ProblemSnapshot.failed_samples``)."""
    if not failed:
        return 0
    return sum(1 for f in failed if f.kind == "solve" and f.reason == "failed")


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
    #: set when the runtime asks again because the budget refused work and nothing is in
    #: flight (see :mod:`orchestrator.protocols`): the policy must stop or ask for work
    #: that fits
    blocked: Blocked | None = None
    #: :meth:`votes` as the runtime's :class:`VoteTally` had it when the snapshot was
    #: taken (``None``: computed from ``solutions`` on demand)
    tally: tuple[VoteCount, ...] | None = field(default=None, repr=False, compare=False)

    # ---- derived views (cheap; computed on demand) ----------------------------------
    @property
    def answered(self) -> tuple[Solution, ...]:
        return tuple(s for s in self.solutions if s.has_answer)

    @property
    def failed_samples(self) -> int:
        return broken_samples(self.failed)

    def votes(self) -> tuple[VoteCount, ...]:
        """Vote counts per canonical key, most votes first; ties: earliest first vote first."""
        if self.tally is not None:
            return self.tally
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

    def answers(self) -> tuple[AnswerStats, ...]:
        """Per canonical answer: votes, verifier readings, verifications done and in
        flight, and the representative solution to verify next; ordered like
        :meth:`votes` (most votes first, ties: earliest first vote)."""
        by_key: dict[str, list[Solution]] = {}
        for s in self.solutions:
            if s.key is not None:
                by_key.setdefault(s.key, []).append(s)
        if not by_key:
            return ()
        parsed: dict[int, list[float]] = {}
        done: dict[int, int] = {}
        for v in self.verifications:
            done[v.solution_id] = done.get(v.solution_id, 0) + 1
            if v.p_yes is not None:
                parsed.setdefault(v.solution_id, []).append(v.p_yes)
        broken: dict[int, int] = {}
        for f in self.failed:
            if f.kind == "verify" and f.solution_id is not None:
                broken[f.solution_id] = broken.get(f.solution_id, 0) + 1
        flying = dict(self.in_flight.verifications)
        out = []
        for key, sols in by_key.items():
            requested = [done.get(s.id, 0) + broken.get(s.id, 0) + flying.get(s.id, 0)
                         for s in sols]
            rep = sols[min(range(len(sols)), key=lambda i: (requested[i], i))]
            out.append(AnswerStats(
                key=key, answer=sols[0].answer or key, votes=len(sols),
                first_index=sols[0].index, solutions=tuple(sols),
                readings=tuple((s.id, tuple(parsed.get(s.id, ()))) for s in sols),
                verified=sum(done.get(s.id, 0) for s in sols),
                verifying=sum(flying.get(s.id, 0) for s in sols),
                failed_verifications=sum(broken.get(s.id, 0) for s in sols),
                representative=rep,
            ))
        out.sort(key=lambda a: (-a.votes, a.first_index))
        return tuple(out)


_vote_count = builder(VoteCount)  # VoteCount(key, answer, votes, first_index), faster


class VoteTally:
    """The votes of a problem's solutions, kept up to date as solutions finish.

    ``add`` each solution in completion order; :meth:`ranked` is then exactly what
    :meth:`ProblemSnapshot.votes` computes from the same solutions. The ranking is kept
    incrementally: a new vote changes one answer's count, which can only move that answer
    up past answers with fewer votes, or as many but a later first vote (a new answer
    enters last: one vote, the latest first vote), so ``add`` is O(answers it passes) and
    one new :class:`VoteCount`, instead of a re-sort of every answer.
    """

    __slots__ = ("_at", "_order", "_ranked")

    def __init__(self) -> None:
        self._order: list[VoteCount] = []  # most votes first; ties: earliest first vote
        self._at: dict[str, int] = {}  # key -> its position in _order
        self._ranked: tuple[VoteCount, ...] | None = ()

    def add(self, solution: Solution) -> None:
        key = solution.key
        if key is None:
            return
        order, at = self._order, self._at
        i = at.get(key)
        if i is None:
            at[key] = len(order)
            order.append(_vote_count(key, solution.answer, 1, solution.index))
        else:
            old = order[i]
            votes, first = old.votes + 1, old.first_index
            vc = _vote_count(key, old.answer, votes, first)
            while i > 0:
                prev = order[i - 1]
                if prev.votes > votes or (prev.votes == votes and prev.first_index < first):
                    break
                order[i] = prev
                at[prev.key] = i
                i -= 1
            order[i] = vc
            at[key] = i
        self._ranked = None

    def ranked(self) -> tuple[VoteCount, ...]:
        if self._ranked is None:
            self._ranked = tuple(self._order)
        return self._ranked
