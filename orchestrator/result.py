"""The outcome of one problem: :class:`SolveResult`."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.decisions import StopCode
from orchestrator.types import FailedSample, Problem, Solution, Usage, Verification

__all__ = ["SolveResult", "error_text", "policy_name"]


def error_text(error: BaseException) -> str:
    """How an error is written down: ``"ErrorType: message"``."""
    return f"{type(error).__name__}: {error}"


def policy_name(policy: object) -> str:
    """The spec a policy was built from (``policy.spec``), else its class name."""
    spec = getattr(policy, "spec", None)
    return spec if isinstance(spec, str) else type(policy).__name__


@dataclass(frozen=True, slots=True)
class SolveResult:
    """The outcome of one problem. ``error`` is the fatal backend error it ended on (the
    exception itself; :attr:`error_text` and :meth:`to_dict` give it as text)."""

    problem: Problem
    answer: str | None
    key: str | None
    reason: str
    correct: bool | None
    usage: Usage
    requests: int
    solutions: tuple[Solution, ...]
    verifications: tuple[Verification, ...]
    failed: tuple[FailedSample, ...]
    elapsed: float
    lam: float | None
    cost_units: float
    solution_tokens: int
    verification_tokens: int
    policy: str = ""
    error: BaseException | None = None
    #: the structured stop reason (``Stop.code``): settled, max, budget, failures, error
    stop_code: StopCode = "settled"

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_text(self) -> str | None:
        """``"ErrorType: message"`` of :attr:`error` (``None`` without one): what results
        files and events record."""
        return None if self.error is None else error_text(self.error)

    def to_dict(self, *, texts: bool = False) -> dict:
        """A JSON-ready summary (solution texts only when ``texts``)."""
        return {
            "id": self.problem.id,
            "policy": self.policy,
            "answer": self.answer,
            "key": self.key,
            "ground_truth": self.problem.answer,
            "correct": self.correct,
            "reason": self.reason,
            "stop_code": self.stop_code,
            "error": self.error_text,
            "prompt_tokens": self.usage.prompt_tokens,
            "cached_prompt_tokens": self.usage.cached_prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "tokens_estimated": self.usage.estimated,
            "tokens_estimated_from": list(self.usage.estimated_from),
            "solution_tokens": self.solution_tokens,
            "verification_tokens": self.verification_tokens,
            "requests": self.requests,
            "cost_units": round(self.cost_units, 4),
            "lambda": self.lam,
            "elapsed_s": round(self.elapsed, 4),
            "solutions": [
                {
                    "id": s.id,
                    "answer": s.answer,
                    "key": s.key,
                    "finish_reason": s.finish_reason,
                    "completion_tokens": s.completion_tokens,
                    **({"text": s.text} if texts else {}),
                }
                for s in self.solutions
            ],
            "verifications": [
                {"solution_id": v.solution_id, "p_yes": v.p_yes, "verdict": v.verdict,
                 "source": v.source, "completion_tokens": v.completion_tokens}
                for v in self.verifications
            ],
            "failed": [
                {"kind": f.kind, "reason": f.reason, "error": f.error,
                 "completion_tokens": f.completion_tokens}
                for f in self.failed
            ],
        }
