"""What a policy can ask for: more samples, verifications of one solution, or a stop."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.types import Solution


@dataclass(frozen=True, slots=True)
class Sample:
    """Launch ``k`` more solution samples (one request with ``n=k`` where the backend can)."""

    k: int = 1

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"Sample.k must be >= 1, got {self.k}")


@dataclass(frozen=True, slots=True)
class Verify:
    """Launch ``times`` generative verifications of ``solution``."""

    solution: Solution
    times: int = 1

    def __post_init__(self) -> None:
        if self.times < 1:
            raise ValueError(f"Verify.times must be >= 1, got {self.times}")
        if not self.solution.has_answer:
            raise ValueError("Verify: a solution without an extracted answer cannot be verified")


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the problem with ``answer`` (``None`` = no answer) and say why.

    ``key`` is the canonical answer key the answer was chosen by, when there is one.
    Everything still in flight is cancelled.
    """

    answer: str | None
    reason: str
    key: str | None = None


Decision = Sample | Verify | Stop
