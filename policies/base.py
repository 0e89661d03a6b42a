"""The Policy protocol.

A policy is a pure function of a :class:`~orchestrator.snapshot.ProblemSnapshot` plus its
constructor arguments: no I/O and no per-problem state on ``self``, so one instance can be
shared by concurrent problems, tested on hand-built snapshots and replayed offline.

The runtime calls ``decide`` at the start and after every change (a sample or
verification finished, failed or was cancelled). The policy sees what is in flight and
must not ask again for work it already asked for: it returns the *additional* work
wanted now (possibly nothing, to wait), or a ``Stop``. Once nothing is in flight, a
policy must return new work or a ``Stop``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from orchestrator.decisions import Decision
from orchestrator.snapshot import ProblemSnapshot


@runtime_checkable
class Policy(Protocol):
    #: the spec string this policy was built from (e.g. ``"sc:n=16"``), for reports
    spec: str

    def decide(self, snapshot: ProblemSnapshot) -> Sequence[Decision]: ...
