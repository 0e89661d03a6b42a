"""What a policy can ask for: more samples, verifications of one solution, cancelling the
work in flight of one kind, or a stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from orchestrator.errors import PolicyError
from orchestrator.types import RequestKind, Solution, is_count

#: why a problem stopped, as a code reports and tests read (``Stop.reason`` is the text):
#: ``settled`` the policy's own criterion says the answer is decided; ``max`` it reached
#: its planned size or cap (``sc:n=16`` after 16 samples, ``adaptive`` at ``max``);
#: ``budget`` the budget cannot hold the work the policy wanted; ``failures`` too many
#: samples broke; ``error`` a fatal backend error ended the problem.
StopCode = Literal["settled", "max", "budget", "failures", "error"]
STOP_CODES: tuple[str, ...] = get_args(StopCode)


@dataclass(frozen=True, slots=True)
class Sample:
    """Launch ``k`` more solution samples (one request with ``n=k`` where the backend can)."""

    k: int = 1

    def __post_init__(self) -> None:
        if not is_count(self.k):
            raise PolicyError(f"Sample.k must be an integer >= 1, got {self.k!r}")


@dataclass(frozen=True, slots=True)
class Verify:
    """Launch ``times`` generative verifications of ``solution``."""

    solution: Solution
    times: int = 1

    def __post_init__(self) -> None:
        if not is_count(self.times):
            raise PolicyError(f"Verify.times must be an integer >= 1, got {self.times!r}")
        if not isinstance(self.solution, Solution):
            raise PolicyError(f"Verify.solution must be a Solution, got {self.solution!r}")
        if not self.solution.has_answer:
            raise PolicyError("Verify: a solution without an extracted answer cannot be verified")


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the problem with ``answer`` (``None`` = no answer) and say why.

    ``key`` is the canonical answer key the answer was chosen by, when there is one;
    ``code`` is the structured reason (:data:`StopCode`), ``reason`` the text for people.
    Everything still in flight is cancelled.
    """

    answer: str | None
    reason: str
    key: str | None = None
    code: StopCode = "settled"

    def __post_init__(self) -> None:
        if self.code not in STOP_CODES:
            raise PolicyError(f"Stop.code must be one of {', '.join(STOP_CODES)}; "
                              f"got {self.code!r}")


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel every request of ``kind`` (``"solve"``: the samples, ``"verify"``: the
    verifications) in flight when the decision is made, without stopping: what they
    streamed stays charged, their unfinished choices are recorded as cancelled, and the
    policy is asked again when something changes (e.g. to wait for the other kind's work,
    then stop). A ``Cancel`` with nothing of its kind in flight does nothing."""

    kind: RequestKind = "solve"

    def __post_init__(self) -> None:
        if self.kind not in ("solve", "verify"):
            raise PolicyError(f"Cancel.kind must be 'solve' or 'verify', got {self.kind!r}")


Decision = Sample | Verify | Cancel | Stop
