"""solverify's runtime: ``await solve(problem, policy, budget, backend)``.

Public names are re-exported here; the async API is the only API.
"""

from orchestrator.decisions import Cancel, Decision, Sample, Stop, Verify
from orchestrator.errors import (
    BackendError,
    ConfigError,
    DataError,
    EndpointUnreachable,
    ModelNotFound,
    PolicyError,
    RequestRejected,
    RetriesExhausted,
    SolverifyError,
    StreamBroken,
)
from orchestrator.events import JsonlTraceSink, StructlogSink
from orchestrator.history import ProblemRecord, RunHistory
from orchestrator.problems import load_problems
from orchestrator.protocols import Policy
from orchestrator.protocols import Task as TaskProtocol
from orchestrator.runtime import Limiter, SolveResult, run_batch, solve
from orchestrator.snapshot import AnswerStats, Blocked, BudgetLeft, ProblemSnapshot
from orchestrator.types import Budget, Problem, Solution, Usage, Verification

__all__ = [
    "AnswerStats",
    "BackendError",
    "Blocked",
    "Budget",
    "BudgetLeft",
    "Cancel",
    "ConfigError",
    "DataError",
    "Decision",
    "EndpointUnreachable",
    "JsonlTraceSink",
    "Limiter",
    "ModelNotFound",
    "Policy",
    "PolicyError",
    "Problem",
    "ProblemRecord",
    "ProblemSnapshot",
    "RequestRejected",
    "RetriesExhausted",
    "RunHistory",
    "Sample",
    "Solution",
    "SolveResult",
    "SolverifyError",
    "Stop",
    "StreamBroken",
    "StructlogSink",
    "TaskProtocol",
    "Usage",
    "Verification",
    "Verify",
    "load_problems",
    "run_batch",
    "solve",
]
