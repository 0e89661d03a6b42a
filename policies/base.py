"""The Policy protocol, defined by the core (:mod:`orchestrator.protocols`, where its
contract is documented) and re-exported here for policy authors, with the pieces every
policy repeats: how many broken samples it replaces, topping samples up to a target,
waiting for what is in flight before it stops, and (re-exported from the core) what a
count parameter may be."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from orchestrator.decisions import Decision, Sample, Stop
from orchestrator.protocols import Policy, policy_verifies
from orchestrator.snapshot import ProblemSnapshot
from orchestrator.types import is_count

__all__ = ["Policy", "failures_allowed", "in_flight", "is_count", "non_default", "num",
           "policy_verifies", "top_up", "wait_or_stop"]


def num(x: float) -> str:
    """A number as a spec writes it: short (``%g``) where that reads back as the same
    number, else exactly (``0.9999999`` is not ``1``)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def non_default(policy: object, *names: str) -> list[str]:
    """``name=value`` spec parts for the dataclass fields ``names`` of ``policy`` whose
    value is not the field's default (the spec key is the field's name)."""
    defaults = {f.name: f.default for f in dataclasses.fields(policy)}  # type: ignore[arg-type]
    parts = []
    for name in names:
        value = getattr(policy, name)
        if value == defaults[name]:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float):
            text = num(value)
        else:
            text = str(value)
        parts.append(f"{name}={text}")
    return parts


def failures_allowed(max_failures: int | None, *defaults: int | None) -> int:
    """``max_failures`` when given, else the first default that is not None (a policy's
    size or cap, then a fixed fallback)."""
    if max_failures is not None:
        return max_failures
    for value in defaults:
        if value is not None:
            return value
    raise ValueError("failures_allowed needs a default that is not None")


def top_up(s: ProblemSnapshot, target: int, max_failures: int) -> list[Decision]:
    """Enough samples to reach ``target`` finished ones counting those in flight,
    replacing broken ones while no more than ``max_failures`` have broken."""
    if s.failed_samples > max_failures:
        return []
    missing = target - len(s.solutions) - s.in_flight.samples
    return [Sample(missing)] if missing > 0 else []


def in_flight(s: ProblemSnapshot) -> bool:
    """Anything launched and not finished: samples or verifications."""
    return bool(s.in_flight.samples or s.in_flight.verification_total)


def wait_or_stop(s: ProblemSnapshot, stop: Callable[[], Stop]) -> list[Decision]:
    """Nothing more to launch: wait while work is in flight, else ``stop()``."""
    return [] if in_flight(s) else [stop()]
