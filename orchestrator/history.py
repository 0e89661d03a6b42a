"""What a run has learned so far: one record per problem already finished in it.

The problems of one batch share a model and a task, so what the finished ones looked like
(how concentrated their votes were, how often the first leader lost, how the verifier
scored answers that won or lost) is evidence about the problems still running. The
runtime appends a :class:`ProblemRecord` to the run's :class:`RunHistory` when a problem
finishes, and every snapshot carries the records finished so far (``snapshot.history``),
so policies stay pure functions of their snapshot. Ground truth is never in a record:
a policy must not learn from labels it would not have in production.

``run_batch`` makes one history per run; ``solve(..., history=h)`` lets an agent loop
share one across its calls (or across runs of one model and task).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.decisions import StopCode


@dataclass(frozen=True, slots=True)
class ProblemRecord:
    """One finished problem, as later problems of the run may use it (no ground truth)."""

    problem_id: str
    stop_code: StopCode
    #: the canonical key the problem stopped with (None: no answer)
    answer_key: str | None
    #: canonical key of each finished solution, in completion order (None: no answer)
    keys: tuple[str | None, ...]
    #: completion tokens of each finished solution, in the same order
    lengths: tuple[int, ...]
    #: every parsed verification: (canonical key of the verified solution, P(Yes))
    readings: tuple[tuple[str | None, float], ...]
    solution_tokens: int
    verification_tokens: int
    #: for each entry of ``readings``: the completion index of the verified solution
    #: (its position in ``keys``), so repeated readings of one solution can be grouped
    reading_solutions: tuple[int, ...] = ()

    @property
    def votes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in self.keys:
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
        return counts

    @property
    def majority(self) -> str | None:
        """The one most frequent answer key (None: no answer, or the top vote is tied)."""
        counts = self.votes
        top = max(counts.values(), default=0)
        leaders = [k for k, c in counts.items() if c == top]
        return leaders[0] if len(leaders) == 1 else None


class RunHistory:
    """Records of finished problems, shared by the problems of one run (asyncio only: one
    event loop, no locking). ``records`` is an immutable tuple, replaced on each add, so a
    snapshot can hold it at no cost."""

    __slots__ = ("_records",)

    def __init__(self, records: tuple[ProblemRecord, ...] = ()) -> None:
        self._records = tuple(records)

    @property
    def records(self) -> tuple[ProblemRecord, ...]:
        return self._records

    def add(self, record: ProblemRecord) -> None:
        self._records = (*self._records, record)

    def __len__(self) -> int:
        return len(self._records)
