"""Typed events for every step of a run, and sinks (plain callables taking one event).

The runtime emits, per problem: ``ProblemStarted``; for every request a
``RequestStarted`` and one ``RequestFinished`` (with the tokens charged for it); for every
sample exactly one of ``SampleFinished`` / ``SampleCancelled`` / ``SampleFailed``; for every
verification ``VerificationFinished`` (or a cancelled/failed sample event with
``kind="verify"``); a ``DecisionMade`` whenever the policy asked for work or stopped; and
finally ``ProblemDone``. ``t`` is seconds since the problem started (runtime clock).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from orchestrator import logs
from orchestrator.decisions import Cancel, Decision, Sample, Stop, Verify
from orchestrator.types import FailedSample, Solution, Usage, Verification


@dataclass(frozen=True, slots=True)
class ProblemStarted:
    problem_id: str
    t: float
    policy: str


@dataclass(frozen=True, slots=True)
class RequestStarted:
    problem_id: str
    t: float
    request_id: int
    kind: str
    n: int
    solution_id: int | None = None


@dataclass(frozen=True, slots=True)
class RequestFinished:
    problem_id: str
    t: float
    request_id: int
    kind: str
    outcome: str  # "ok" | "cancelled" | "failed"
    usage: Usage
    attempts: int = 1
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SampleFinished:
    problem_id: str
    t: float
    solution: Solution


@dataclass(frozen=True, slots=True)
class SampleCancelled:
    problem_id: str
    t: float
    sample: FailedSample


@dataclass(frozen=True, slots=True)
class SampleFailed:
    problem_id: str
    t: float
    sample: FailedSample


@dataclass(frozen=True, slots=True)
class VerificationFinished:
    problem_id: str
    t: float
    verification: Verification


@dataclass(frozen=True, slots=True)
class DecisionMade:
    problem_id: str
    t: float
    decisions: tuple[Decision, ...]
    solutions: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class ProblemDone:
    problem_id: str
    t: float
    answer: str | None
    reason: str
    correct: bool | None
    usage: Usage
    requests: int
    solutions: int
    verifications: int
    error: str | None = None


Event = (
    ProblemStarted
    | RequestStarted
    | RequestFinished
    | SampleFinished
    | SampleCancelled
    | SampleFailed
    | VerificationFinished
    | DecisionMade
    | ProblemDone
)
Sink = Callable[[Event], None]


def _decision_dict(d: Decision) -> dict[str, Any]:
    if isinstance(d, Sample):
        return {"type": "Sample", "k": d.k}
    if isinstance(d, Verify):
        return {"type": "Verify", "solution_id": d.solution.id, "times": d.times}
    if isinstance(d, Cancel):
        return {"type": "Cancel", "kind": d.kind}
    if isinstance(d, Stop):
        return {"type": "Stop", "answer": d.answer, "reason": d.reason, "key": d.key}
    raise TypeError(f"not a decision: {d!r}")


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict of one event: ``{"event": <class name>, ...fields}``."""
    out: dict[str, Any] = {"event": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "decisions":
            out[f.name] = [_decision_dict(d) for d in value]
        elif isinstance(value, FailedSample):  # the error as text, not the exception
            out[f.name] = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)
                           if g.name != "error_text"} | {"error": value.error_text}
        elif dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)
        else:
            out[f.name] = value
    if isinstance(event, RequestFinished | ProblemDone):
        out["usage"]["total_tokens"] = event.usage.total_tokens
    return out


class JsonlTraceSink:
    """Writes one JSON object per event to a file (a trace that can be replayed/audited).

    Use as a context manager, or call :meth:`close`. Each line is flushed, so a run that
    dies midway leaves every event up to that point on disk. A path is opened (and its
    folders made) at the first event, as ``--out`` is at the first result: a run that
    fails before any event leaves nothing behind.
    """

    def __init__(self, path: str | Path | IO[str]) -> None:
        self._path: Path | None = None
        self._fh: IO[str] | None = None
        if isinstance(path, str | Path):
            self._path = Path(path)
            self._owned = True
        else:
            self._fh = path
            self._owned = False

    def __call__(self, event: Event) -> None:
        if self._fh is None:
            assert self._path is not None
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._path, "a", encoding="utf-8")
        self._fh.write(json.dumps(event_to_dict(event), ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._owned and self._fh is not None and not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> JsonlTraceSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StructlogSink:
    """Forwards events to ``structlog.get_logger()``; never configures structlog.

    Per-token-ish events (request starts) go at debug level, outcomes at info, failures
    at warning.
    """

    def __init__(self, logger: Any | None = None) -> None:
        self._log = logger if logger is not None else logs.get_logger("solverify")

    def __call__(self, event: Event) -> None:
        data = event_to_dict(event)
        name = data.pop("event")
        if isinstance(event, SampleFailed) or (
            isinstance(event, RequestFinished) and event.outcome == "failed"
        ):
            self._log.warning(name, **data)
        elif isinstance(event, RequestStarted | DecisionMade):
            self._log.debug(name, **data)
        else:
            self._log.info(name, **data)
