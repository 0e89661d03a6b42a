"""Record a pool from a live endpoint: ``solverify bench record``.

Each problem is run through the real runtime with GenRM(s=N, v=V) (or SC(n=N) when
V = 0): N sampled solutions, each answered one verified V times. Every finished solution
becomes a pool sample (see :mod:`benchmarks.pools`) with its extracted answer, canonical
key, label from the task's grader, completion tokens, text, finish reason, mean logprob,
and its verifications (P(Yes), verdict, tokens). Lines are appended as problems finish, and
problems already in the output file are skipped, so an interrupted recording resumes
where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.pools import read_pool_ids
from orchestrator import defaults
from orchestrator.backends.base import Backend
from orchestrator.errors import ConfigError
from orchestrator.result import ended_on_error
from orchestrator.runtime import SolveResult, run_batch
from orchestrator.types import Problem
from policies.fixed import GenRM, SelfConsistency

__all__ = ["RecordSummary", "record", "result_to_pool_line"]


@dataclass(frozen=True, slots=True)
class RecordSummary:
    recorded: int
    skipped: int
    samples: int
    verifications: int
    failed_samples: int
    errors: int
    path: Path
    #: the first error of a problem that ended on one (not written), for the summary
    first_error: str | None = None


def result_to_pool_line(result: SolveResult, task: Any, *, model: str | None = None,
                        texts: bool = True) -> dict[str, Any]:
    """The pool line (as a dict) of one recorded problem."""
    problem = result.problem
    graded = problem.answer is not None or bool(problem.aliases)
    by_solution: dict[int, list[dict[str, Any]]] = {}
    for v in result.verifications:
        entry: dict[str, Any] = {"p_yes": v.p_yes, "verdict": v.verdict,
                                 "tokens": v.completion_tokens}
        if texts:
            entry["text"] = v.text
        by_solution.setdefault(v.solution_id, []).append(entry)
    samples = []
    for s in result.solutions:
        correct = None
        if graded:
            correct = bool(task.grader.is_correct(s.answer, problem)) if s.answer else False
        sample: dict[str, Any] = {
            "pred": s.answer, "key": s.key, "correct": correct,
            "tokens": s.completion_tokens, "finish_reason": s.finish_reason,
        }
        if s.mean_logprob is not None:
            sample["mean_logprob"] = s.mean_logprob
        if texts:
            sample["text"] = s.text
        if s.id in by_solution:
            sample["verifications"] = by_solution[s.id]
        samples.append(sample)
    line: dict[str, Any] = {"id": problem.id, "problem": problem.problem,
                            "answer": problem.answer}
    if problem.aliases:
        line["aliases"] = list(problem.aliases)
    line["samples"] = samples
    line["source"] = "solverify record"
    if model is not None:
        line["model"] = model
    line["prompt_tokens"] = result.usage.prompt_tokens
    line["failed_samples"] = sum(1 for f in result.failed if f.kind == "solve")
    if result.error:
        line["error"] = result.error_text
    return line


async def record(
    problems: Sequence[Problem],
    backend: Backend,
    task: Any,
    out: str | Path,
    *,
    samples: int,
    verifications: int = 0,
    concurrency: int | None = defaults.CONCURRENCY,
    rate: float | None = None,
    model: str | None = None,
    texts: bool = True,
    max_n: int = defaults.MAX_N,
    on_problem: Callable[[SolveResult], None] | None = None,
) -> RecordSummary:
    """Record ``samples`` solutions (and ``verifications`` per answered solution) for every
    problem not yet in ``out``; lines are appended as problems finish.

    A problem that ends on an error (:func:`orchestrator.result.ended_on_error`) is not
    written, so a later run retries it: a fatal backend error (unreachable endpoint,
    unknown model), a policy that gave up because its samples kept failing (the pool line
    would hold fewer samples than asked for), or verifications that all failed.
    """
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    if verifications < 0:
        raise ConfigError(f"verifications must be >= 0, got {verifications}")
    path = Path(out)
    done = read_pool_ids(path)
    todo = [p for p in problems if p.id not in done]
    policy: Any = (GenRM(samples, verifications) if verifications
                   else SelfConsistency(samples))
    counts = {"recorded": 0, "samples": 0, "verifications": 0, "failed": 0, "errors": 0}
    first_error: list[str] = []
    if not todo:
        return RecordSummary(0, len(problems), 0, 0, 0, 0, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:  # noqa: ASYNC230 - a local append, instant

        def write(result: SolveResult) -> None:
            if ended_on_error(result.to_dict()):
                counts["errors"] += 1
                if not first_error:
                    first_error.append(_error_of(result))
            else:
                line = result_to_pool_line(result, task, model=model, texts=texts)
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                fh.flush()
                counts["recorded"] += 1
                counts["samples"] += len(result.solutions)
                counts["verifications"] += len(result.verifications)
                counts["failed"] += line["failed_samples"]
            if on_problem is not None:
                on_problem(result)

        await run_batch(todo, policy, backend=backend, task=task, concurrency=concurrency,
                        rate=rate, on_result=write, max_n=max_n)
    return RecordSummary(counts["recorded"], len(problems) - len(todo), counts["samples"],
                         counts["verifications"], counts["failed"], counts["errors"], path,
                         first_error[0] if first_error else None)


def _error_of(result: SolveResult) -> str:
    """What ended ``result`` on an error, in a line: its fatal error, else the first
    failed sample's."""
    if result.error is not None:
        return f"{result.problem.id}: {result.error_text}"
    for f in result.failed:
        if f.reason == "failed" and f.error_text:
            return f"{result.problem.id}: {f.error_text}"
    return f"{result.problem.id}: {result.reason}"
