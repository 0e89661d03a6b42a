"""The outcome of one problem: :class:`SolveResult`."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.decisions import StopCode
from orchestrator.errors import error_text
from orchestrator.ledger import lambda_of_sums
from orchestrator.types import FailedSample, Problem, Solution, Usage, Verification

__all__ = ["RunSummary", "SolveResult", "ended_on_error", "error_text", "policy_name"]


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
    #: generation HTTP requests sent for ``requests`` logical ones (retries and emulated
    #: ``n`` included; 0 for backends without HTTP)
    http_requests: int = 0
    #: of those, the ones given up before their first token (a timeout, a dropped
    #: connection, a cancellation): the server may have generated tokens for them that no
    #: stream reported, so ``usage`` is a lower bound when this is > 0
    abandoned_http_requests: int = 0

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
            "http_requests": self.http_requests,
            "abandoned_http_requests": self.abandoned_http_requests,
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
                {"kind": f.kind, "reason": f.reason, "error": f.error_text,
                 "completion_tokens": f.completion_tokens}
                for f in self.failed
            ],
        }


#: the exit status of a command some of whose problems ended on an error
#: (:func:`ended_on_error`): ``solverify run``, ``bench record``, ``solverify demo``
EXIT_PROBLEM_ERRORS = 1


def ended_on_error(row: dict) -> bool:
    """Did this result (:meth:`SolveResult.to_dict`, a results-file row) end on an error
    rather than a normal stop? A fatal backend error (``error``); a policy that gave up
    because its samples kept failing (``stop_code`` ``failures``); samples that failed
    with none finished, whatever the stop (failed streams can spend the budget before
    ``max_failures`` is reached: stop code ``budget``, no answer); or a verifier that
    never answered: verification requests failed and none finished (a verifying policy
    then answers without the verifier it was asked to use)."""
    if row.get("error") or row.get("stop_code") in ("error", "failures"):
        return True
    failed = row.get("failed") or ()
    return any(not row.get(done) and any(
        f.get("kind") == kind and f.get("reason") == "failed" for f in failed)
        for kind, done in (("solve", "solutions"), ("verify", "verifications")))


def first_error(row: dict) -> str:
    """What a row that :func:`ended_on_error` ended on, in words: its error, else its
    first failed request's, else its stop reason."""
    if row.get("error"):
        return str(row["error"])
    for failed in row.get("failed") or ():
        if failed.get("reason") == "failed" and failed.get("error"):
            return str(failed["error"])
    return str(row.get("reason") or "error")


class RunSummary:
    """Run-level totals over results, added one at a time as they finish, so a run that
    writes its results as they come need not hold them all (:meth:`as_dict` is the CLI's
    closing summary)."""

    __slots__ = (
        "_cached",
        "_cached_any",
        "_estimated",
        "_sources",
        "abandoned",
        "cancelled",
        "completion_tokens",
        "correct",
        "errors",
        "failed",
        "graded",
        "http_requests",
        "no_answer",
        "problems",
        "prompt_tokens",
        "requests",
        "sol_n",
        "sol_sum",
        "solution_tokens",
        "ver_n",
        "ver_sum",
        "verification_tokens",
    )

    def __init__(self) -> None:
        self.problems = self.graded = self.correct = self.errors = self.no_answer = 0
        self.prompt_tokens = self.completion_tokens = self.requests = self.http_requests = 0
        self.solution_tokens = self.verification_tokens = 0
        self.sol_n = self.sol_sum = self.ver_n = self.ver_sum = 0
        self.cancelled = self.failed = self.abandoned = 0
        self._cached = 0
        self._cached_any = self._estimated = False
        self._sources: set[str] = set()

    def add(self, r: SolveResult) -> None:
        self.problems += 1
        if r.correct is not None:
            self.graded += 1
            self.correct += bool(r.correct)
        # as the exit status counts them (a stop on failures too, not only a fatal
        # error: the summary said "problems 2" beside "ended on an error 2 of 2")
        self.errors += ended_on_error({
            "error": r.error, "stop_code": r.stop_code,
            "solutions": r.solutions, "verifications": r.verifications,
            "failed": [{"kind": f.kind, "reason": f.reason} for f in r.failed]})
        self.no_answer += r.answer is None
        usage = r.usage
        self._sources.update(usage.estimated_from)
        self.prompt_tokens += usage.prompt_tokens
        if usage.cached_prompt_tokens is not None:
            self._cached += usage.cached_prompt_tokens
            self._cached_any = True
        self.completion_tokens += usage.completion_tokens
        self._estimated = self._estimated or usage.estimated
        self.solution_tokens += r.solution_tokens
        self.verification_tokens += r.verification_tokens
        self.requests += r.requests
        self.http_requests += r.http_requests
        self.abandoned += r.abandoned_http_requests
        self.sol_n += len(r.solutions)
        self.sol_sum += sum(s.completion_tokens for s in r.solutions)
        self.ver_n += len(r.verifications)
        self.ver_sum += sum(v.completion_tokens for v in r.verifications)
        for f in r.failed:
            self.cancelled += f.reason == "cancelled"
            self.failed += f.reason == "failed"

    @property
    def lam(self) -> float | None:
        """λ over every solution and verification of the run (``measure_lambda``)."""
        return lambda_of_sums(self.sol_n, self.sol_sum, self.ver_n, self.ver_sum)

    def as_dict(self, wall: float) -> dict:
        return {
            "problems": self.problems,
            "graded": self.graded,
            "accuracy": (self.correct / self.graded) if self.graded else None,
            "errors": self.errors,
            "tokens_estimated_from": sorted(self._sources),
            "no_answer": self.no_answer,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self._cached if self._cached_any else None,
            "completion_tokens": self.completion_tokens,
            "tokens_estimated": self._estimated,
            "solution_tokens": self.solution_tokens,
            "verification_tokens": self.verification_tokens,
            "requests": self.requests,
            "http_requests": self.http_requests,
            "abandoned_http_requests": self.abandoned,
            "solutions": self.sol_n,
            "verifications": self.ver_n,
            "cancelled_samples": self.cancelled,
            "failed_samples": self.failed,
            "lambda": self.lam,
            "wall_s": round(wall, 2),
        }
