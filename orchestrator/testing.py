"""Ready-made test doubles for users and for our own tests: hand-built snapshots.

    snap = make_snapshot(answers=["4", "4", "5", None], in_flight=2)
    assert policy.decide(snap) == []

Answers become solutions in completion order; ``None`` is a solution with no extracted
answer. Keys default to the answer string itself (pass ``keys=`` for canonical keys).
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.errors import StreamBroken
from orchestrator.history import ProblemRecord
from orchestrator.snapshot import Blocked, BudgetLeft, InFlight, ProblemSnapshot
from orchestrator.types import (
    UNLIMITED,
    Budget,
    FailedSample,
    Problem,
    Solution,
    Usage,
    Verification,
)


def make_solution(index: int, answer: str | None, *, key: str | None = None, tokens: int = 100,
                  sid: int | None = None, finished_at: float | None = None) -> Solution:
    return Solution(
        id=index if sid is None else sid,
        index=index,
        text="" if answer is None else f"... \\boxed{{{answer}}}",
        answer=answer,
        key=key if key is not None else answer,
        finish_reason="stop",
        completion_tokens=tokens,
        started_at=0.0,
        finished_at=float(index + 1) if finished_at is None else finished_at,
        request_id=index,
    )


def make_verification(vid: int, solution_id: int, p_yes: float | None, tokens: int = 50
                      ) -> Verification:
    return Verification(
        id=vid, solution_id=solution_id, text="Yes" if (p_yes or 0) >= 0.5 else "No",
        verdict=None if p_yes is None else p_yes >= 0.5, p_yes=p_yes,
        source="none" if p_yes is None else "logprobs", completion_tokens=tokens,
        started_at=0.0, finished_at=0.0, request_id=1000 + vid,
    )


def make_snapshot(
    answers: Sequence[str | None] = (),
    *,
    keys: Sequence[str | None] | None = None,
    tokens: Sequence[int] | None = None,
    scores: dict[int, Sequence[float | None]] | None = None,
    in_flight: int = 0,
    in_flight_tokens: Sequence[int] | None = None,
    verifying: dict[int, int] | None = None,
    failed: int = 0,
    failed_verifications: dict[int, int] | None = None,
    budget: Budget = UNLIMITED,
    budget_left: BudgetLeft | None = None,
    problem: Problem | None = None,
    elapsed: float = 0.0,
    lam: float | None = None,
    history: Sequence[ProblemRecord] = (),
    blocked: Blocked | None = None,
) -> ProblemSnapshot:
    """A snapshot with the given finished answers, verification scores and in-flight work.

    ``scores[solution_index]`` lists P(Yes) values of that solution's verifications;
    ``history`` the records of problems finished earlier in the run; ``blocked`` what the
    runtime says the budget refused when it asks again.
    """
    sols = tuple(
        make_solution(i, a, key=None if keys is None else keys[i],
                      tokens=100 if tokens is None else tokens[i])
        for i, a in enumerate(answers)
    )
    vers: list[Verification] = []
    for sid, ps in (scores or {}).items():
        for p in ps:
            vers.append(make_verification(len(vers), sid, p))
    broken = [
        FailedSample(id=10_000 + i, request_id=10_000 + i, kind="solve", reason="failed",
                     error=StreamBroken("test"), partial_text="", completion_tokens=3)
        for i in range(failed)
    ]
    for sid, count in (failed_verifications or {}).items():
        for _ in range(count):
            broken.append(FailedSample(
                id=20_000 + len(broken), request_id=20_000 + len(broken), kind="verify",
                reason="failed", error=StreamBroken("test"), partial_text="",
                completion_tokens=1, solution_id=sid))
    completion = sum(s.completion_tokens for s in sols) + sum(v.completion_tokens for v in vers)
    flight_tokens = tuple(in_flight_tokens) if in_flight_tokens is not None else (0,) * in_flight
    return ProblemSnapshot(
        problem=problem or Problem(id="p", problem="What is 2+2?", answer="4"),
        solutions=sols,
        verifications=tuple(vers),
        failed=tuple(broken),
        in_flight=InFlight(
            samples=in_flight,
            verifications=tuple(sorted((verifying or {}).items())),
            sample_tokens=flight_tokens,
        ),
        samples_launched=len(sols) + in_flight + failed,
        verifications_launched=len(vers) + sum((verifying or {}).values()),
        requests_launched=len(sols) + in_flight + failed + len(vers),
        usage=Usage(prompt_tokens=0, completion_tokens=completion),
        budget=budget,
        budget_left=budget_left or BudgetLeft(None, None, None),
        elapsed=elapsed,
        lam=lam,
        history=tuple(history),
        blocked=blocked,
    )
