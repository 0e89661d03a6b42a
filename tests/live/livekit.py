"""Helpers of the live suite (``pytest -m live``): metrics, the capitals data, test tasks and
policies, and the numbers printed at the end of the session.

Importable without a server; nothing here starts one (``tests/live/conftest.py`` does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from orchestrator.backends.base import GenerationRequest
from orchestrator.decisions import Stop
from orchestrator.events import DecisionMade, Event
from orchestrator.grading import TextGrader
from orchestrator.problems import load_problems
from orchestrator.serve import VLLMServer
from orchestrator.types import Problem, Solution, TokenLogprob
from tests.conftest_data import DATA
from tests.helpers import StopAtFirst

GEN = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
CAPITALS = DATA / "live" / "capitals.jsonl"
needs_capitals = pytest.mark.skipif(
    not CAPITALS.is_file(),
    reason=f"live capitals data not found at {CAPITALS} (set SOLVERIFY_DATA to the shared "
    "data folder)",
)
RAMBLE = "Write a very long story about a dragon who travels the world. Once upon a time,"
#: a hang guard, not a speed limit: how long the server may still report requests running
#: after a run returned or a stream was cut before a test calls them leaked. How soon they
#: stop, and how many tokens a cut stream got after the cut, depend on how fast this machine
#: is at that moment; they are reported (``note``), not asserted.
HANG_GUARD_S = 60.0

#: lines printed under "live numbers" at the end of the session (see conftest.py)
NOTES: list[str] = []


def note(line: str) -> None:
    NOTES.append(line)


def capitals(limit: int) -> list[Problem]:
    return load_problems(CAPITALS, limit=limit)


async def settled_tokens(server: VLLMServer, within: float = 10.0) -> float:
    """``generation_tokens_total`` once nothing is running or waiting on the server."""
    deadline = time.monotonic() + within
    while True:
        m = server.metrics()
        if m.get(RUNNING, 0) == 0 and m.get(WAITING, 0) == 0:
            return m[GEN]
        assert time.monotonic() < deadline, f"server still busy after {within}s: {m.get(RUNNING)}"
        await asyncio.sleep(0.02)


async def seconds_until_idle(server: VLLMServer, limit: float) -> float:
    """Seconds until ``num_requests_running`` reads 0 (fails past ``limit``: a hang guard)."""
    t0 = time.monotonic()
    while server.metrics()[RUNNING] > 0:
        took = time.monotonic() - t0
        assert took < limit, f"requests still running {took:.2f}s after the cut"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


@dataclass
class StopWatch:
    """A sink that reads ``/metrics`` when a problem stops: the server's count at the cut.

    (A blocking read of a few ms inside the event loop; it delays the cut, never the count.)
    """

    server: VLLMServer
    cuts: list[tuple[float, float]] = field(default_factory=list)  # (monotonic s, tokens)

    def __call__(self, event: Event) -> None:
        if isinstance(event, DecisionMade) and any(isinstance(d, Stop) for d in event.decisions):
            self.cuts.append((time.monotonic(), self.server.metrics()[GEN]))


FirstFinished = StopAtFirst  # asks for k samples at once, stops at the first one


@dataclass(frozen=True)
class RambleTask:
    """Long free-running completions of ``problem.problem`` that end at the first
    sentence end: which sample ends first is up to chance."""

    max_tokens: int = 200
    stop: tuple[str, ...] = (".",)
    grader: TextGrader = field(default_factory=TextGrader)

    def solve_request(self, problem: Problem, n: int) -> GenerationRequest:
        return GenerationRequest(kind="solve", prompt=problem.problem, n=n,
                                 max_tokens=self.max_tokens, temperature=1.0, stop=self.stop)

    def verify_request(self, problem: Problem, solution: Solution, n: int) -> GenerationRequest:
        raise AssertionError("RambleTask is for solving only")

    def parse_verdict(self, text: str, logprobs: Sequence[TokenLogprob]):
        raise AssertionError("RambleTask is for solving only")
