"""The two seams a run is made of besides the backend: the :class:`Policy` (what to do
next) and the :class:`Task` (how to ask for solutions and verifications, and how to read
them). The core owns both definitions; ``policies/`` and ``orchestrator/tasks.py`` hold
implementations.

A policy is a pure function of a :class:`~orchestrator.snapshot.ProblemSnapshot` plus its
constructor arguments: no I/O and no per-problem state on ``self``, so one instance can be
shared by concurrent problems, tested on hand-built snapshots and replayed offline.

The runtime calls ``decide`` at the start and after every change (a sample or
verification finished, failed or was cancelled). The policy sees what is in flight and
must not ask again for work it already asked for: it returns the *additional* work
wanted now (possibly nothing, to wait), or a ``Stop``; ``Cancel(kind)`` ends the work of
one kind in flight without stopping (e.g. the samples, while a verification still runs).
Once nothing is in flight, a policy must return new work or a ``Stop``.

The policy always has the last word. When nothing is in flight and the work it asked for
did not fit the budget (or the budget cannot hold even one more sample), the runtime asks
it once more with ``snapshot.blocked`` saying what was refused and by which cap; a policy
must then stop (``Stop(..., code="budget")``) or ask for work that fits. Asking again for
work that does not fit, or for nothing, is a :class:`~orchestrator.errors.PolicyError`.
Use ``snapshot.budget_left.can_sample`` / ``can_verify`` to ask only for what fits.

A policy that sends solutions to the verifier says so with a true ``verifies`` attribute
(optional; default false): the runtime then refuses, before any request, a budget that
cannot hold one verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from orchestrator.backends.base import GenerationRequest
from orchestrator.decisions import Decision
from orchestrator.grading import Grader
from orchestrator.snapshot import ProblemSnapshot
from orchestrator.types import Problem, Solution, TokenLogprob
from orchestrator.verification import VerdictSource

__all__ = ["Policy", "Task", "policy_verifies"]


@runtime_checkable
class Policy(Protocol):
    #: the spec string this policy was built from (e.g. ``"sc:n=16"``), for reports
    spec: str

    def decide(self, snapshot: ProblemSnapshot) -> Sequence[Decision]: ...


@runtime_checkable
class Task(Protocol):
    """What the runtime needs for one kind of problem (``orchestrator.tasks.Task`` and the
    replay task implement it).

    ``verify_max_tokens`` is the ``max_tokens`` of every verification request: the
    runtime reserves it before launching one and shows it to policies as
    ``snapshot.budget_left.verify_tokens``. A task without the attribute is treated as
    reserving 1 token (a verification that then does not fit is refused at launch and
    reported to the policy through ``snapshot.blocked``).
    """

    grader: Grader

    def solve_request(self, problem: Problem, n: int) -> GenerationRequest: ...

    def verify_request(self, problem: Problem, solution: Solution, n: int
                       ) -> GenerationRequest: ...

    def parse_verdict(self, text: str, logprobs: Sequence[TokenLogprob]
                      ) -> tuple[bool | None, float | None, VerdictSource]: ...


def policy_verifies(policy: object) -> bool:
    """Does ``policy`` declare that it sends solutions to the verifier?"""
    return bool(getattr(policy, "verifies", False))
