"""orchestrator.fastinit builds exactly what the frozen dataclasses' __init__ builds, and
the hot loops that use it pass every field in the classes' field order."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.decisions import Stop
from orchestrator.fastinit import builder
from orchestrator.history import ProblemRecord
from orchestrator.result import SolveResult
from orchestrator.snapshot import BudgetLeft, InFlight, ProblemSnapshot, VoteCount
from orchestrator.types import UNLIMITED, FailedSample, Problem, Solution, Usage, Verification

SOL = Solution(7, 0, "t", "a", "a", "stop", 12, 0.5, 1.5, 3, None)
VER = Verification(9, 7, "Yes", True, 0.8, "logprobs", 1, 1.5, 1.6, 4)
#: one instance of every class the lean engine and VoteTally build this way, all fields set
#: to something other than their defaults where they have one
INSTANCES = [
    SOL,
    Solution(8, 1, "u", None, None, "length", 3, 0.0, 2.0, 5, -0.25),
    VER,
    Usage(3, 5, True, 2, ("nothing", "prompt")),
    InFlight(2, ((7, 1),), (4, 5)),
    VoteCount("a", " a ", 3, 1),
    ProblemRecord("p", "max", "a", ("a", None), (12, 3), (("a", 0.8),), 15, 1, (0,)),
    SolveResult(Problem("p", "q"), "a", "a", "why", True, Usage(0, 15), 2, (SOL,), (VER,), (),
                2.0, 0.5, 1.5, 15, 1, "sc:n=2", None, "max", 3, 1),
    ProblemSnapshot(Problem("p", "q"), (SOL,), (VER,), (), InFlight(1, (), (4,)), 2, 1, 2,
                    Usage(0, 19), UNLIMITED, BudgetLeft(None, 10, None, 5, 2, 0.5), 2.5, 0.5,
                    (), None, (VoteCount("a", "a", 1, 0),)),
]


@pytest.mark.parametrize("obj", INSTANCES, ids=lambda o: type(o).__name__)
def test_a_built_instance_equals_the_constructed_one_field_by_field(obj):
    cls = type(obj)
    values = [getattr(obj, f.name) for f in dataclasses.fields(cls)]
    built = builder(cls)(*values)
    assert type(built) is cls
    assert built == obj
    assert repr(built) == repr(obj)
    for f in dataclasses.fields(cls):  # every slot set, to the very object given
        assert getattr(built, f.name) is getattr(obj, f.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.__setattr__(dataclasses.fields(cls)[0].name, None)
    if cls.__hash__ is not None:
        try:
            want = hash(obj)
        except TypeError:  # unhashable fields (a dict, a list) hash neither way
            return
        assert hash(built) == want


def test_builder_refuses_classes_whose_init_does_more():
    with pytest.raises(TypeError, match="__post_init__"):
        builder(FailedSample)  # computes error_text
    with pytest.raises(TypeError, match="__post_init__"):
        builder(Stop)  # checks its code

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    with pytest.raises(TypeError, match="slotted"):
        builder(NoSlots)


@pytest.mark.parametrize("error", [None, RuntimeError("boom"), ValueError()])
def test_a_failed_sample_built_with_its_computed_field_equals_the_constructed_one(error):
    # benchmarks.engine builds FailedSample with the error_text its __post_init__ computes
    # passed in, as error_text(error)
    from orchestrator.errors import error_text

    for kind, reason, sid in (("solve", "cancelled", None), ("verify", "failed", 7)):
        want = FailedSample(3, 1, kind, reason, error, "", 12, sid)
        got = builder(FailedSample, computed=True)(
            3, 1, kind, reason, error, "", 12, sid, None if error is None else error_text(error))
        assert type(got) is FailedSample and got == want and repr(got) == repr(want)
        for f in dataclasses.fields(FailedSample):
            assert getattr(got, f.name) == getattr(want, f.name)
        assert got.error is error
    assert [f.name for f in dataclasses.fields(FailedSample)] == [
        "id", "request_id", "kind", "reason", "error", "partial_text", "completion_tokens",
        "solution_id", "error_text"]


def test_builder_takes_every_field_positionally_and_nothing_else():
    build = builder(VoteCount)
    with pytest.raises(TypeError):
        build("a", "a", 1)  # no defaults
    with pytest.raises(TypeError):
        build("a", "a", 1, 0, 5)


def test_the_positional_builds_follow_the_field_orders():
    # benchmarks.engine passes these positionally, in this order (Solution's and
    # ProblemSnapshot's are checked in tests/test_snapshot_tally.py)
    names = {cls.__name__: [f.name for f in dataclasses.fields(cls)]
             for cls in (SolveResult, ProblemRecord, Verification, InFlight, Usage, VoteCount)}
    assert names == {
        "SolveResult": ["problem", "answer", "key", "reason", "correct", "usage", "requests",
                        "solutions", "verifications", "failed", "elapsed", "lam",
                        "cost_units", "solution_tokens", "verification_tokens", "policy",
                        "error", "stop_code", "http_requests", "abandoned_http_requests"],
        "ProblemRecord": ["problem_id", "stop_code", "answer_key", "keys", "lengths",
                          "readings", "solution_tokens", "verification_tokens",
                          "reading_solutions"],
        "Verification": ["id", "solution_id", "text", "verdict", "p_yes", "source",
                         "completion_tokens", "started_at", "finished_at", "request_id"],
        "InFlight": ["samples", "verifications", "sample_tokens"],
        "Usage": ["prompt_tokens", "completion_tokens", "estimated", "cached_prompt_tokens",
                  "estimated_from"],
        "VoteCount": ["key", "answer", "votes", "first_index"],
    }


def test_a_subclass_with_inherited_slots_is_built_like_its_constructor():
    # not a direct subclass of object: no plain twin class, the slots' descriptors instead
    @dataclasses.dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Child(Base):
        b: str

    built = builder(Child)(1, "x")
    assert type(built) is Child and built == Child(1, "x") and hash(built) == hash(Child(1, "x"))
