"""Cancel(kind): cancel the work of one kind in flight without stopping.

The runtime on the fake backend with gates (a held stream never ends by itself), the
lean replay engine against the runtime, and the verifying policies' use of it: a settled
stop that would cut an exploratory reading cancels the samples and waits for the reading.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest

from benchmarks.engine import run_order
from benchmarks.replay import ReplayConfig, _run_problems
from benchmarks.source import ReplaySource
from orchestrator.backends.fake import FakeBackend, FakeReply
from orchestrator.decisions import Cancel, Sample, Stop, Verify
from orchestrator.errors import PolicyError
from orchestrator.events import DecisionMade, RequestFinished, event_to_dict
from orchestrator.runtime import solve
from orchestrator.simclock import SimulatedClockLoop
from orchestrator.testing import make_snapshot
from orchestrator.types import Problem
from policies.adaptive import Adaptive
from policies.verifying import Solverify, VerifyContested
from tests.helpers import WordTask
from tests.test_replay import make_pool

PROBLEM = Problem(id="p1", problem="q", answer="seven")


def test_cancel_validates_its_kind():
    assert Cancel().kind == "solve" and Cancel("verify").kind == "verify"
    with pytest.raises(PolicyError, match=r"Cancel\.kind"):
        Cancel("everything")  # type: ignore[arg-type]


@dataclass(frozen=True)
class VerifyFirstThenCancel:
    """Three samples; at the first solution: verify it and cancel the other samples; stop
    once the reading is in (a policy that waits for a verification, not for samples)."""

    spec: str = "verify-first-then-cancel"

    def decide(self, s):
        if not s.solutions:
            return [] if s.samples_launched else [Sample(3)]
        if not s.verifications:
            if s.in_flight.verification_total:
                return [Cancel("solve")] if s.in_flight.samples else []
            return [Verify(s.solutions[0]), Cancel("solve")]
        return [Stop(s.solutions[0].answer, "read", s.solutions[0].key)]


def _backend(hold: asyncio.Event) -> FakeBackend:
    def respond(req, i):
        if req.kind == "verify":
            return FakeReply.text("yes")
        if i == 0:
            return FakeReply.text("so seven")
        return FakeReply.text("a b c d e f", hold=hold, hold_after=2)  # held mid-stream

    return FakeBackend(respond)


async def test_cancel_ends_the_samples_and_keeps_the_verification():
    hold = asyncio.Event()  # never set: only a cancellation ends the held samples
    backend = _backend(hold)
    events = []
    result = await solve(PROBLEM, VerifyFirstThenCancel(), backend=backend, task=WordTask(),
                         max_n=1, sinks=[events.append])
    assert result.answer == "seven" and result.reason == "read"
    assert len(result.solutions) == 1 and len(result.verifications) == 1
    cancelled = [f for f in result.failed if f.reason == "cancelled"]
    assert [f.kind for f in cancelled] == ["solve", "solve"]
    assert all(f.completion_tokens == 2 for f in cancelled)
    # every generated token charged once; every stream closed; nothing outlives solve
    assert result.usage.completion_tokens == backend.generated_tokens
    assert backend.open_streams == 0 and backend.aborted_streams == 2
    outcomes = sorted((e.kind, e.outcome) for e in events if isinstance(e, RequestFinished))
    assert outcomes == [("solve", "cancelled"), ("solve", "cancelled"), ("solve", "ok"),
                        ("verify", "ok")]
    made = [event_to_dict(e) for e in events if isinstance(e, DecisionMade)]
    assert any({"type": "Cancel", "kind": "solve"} in d["decisions"] for d in made)


@dataclass(frozen=True)
class CancelWithNothingInFlight:
    spec: str = "cancel-nothing"

    def decide(self, s):
        if not s.solutions:
            # the Cancel applies to what was in flight before this decision: nothing
            return [] if s.samples_launched else [Sample(1), Cancel("solve")]
        if s.samples_launched == 1:
            return [Cancel("verify")]  # nothing of that kind in flight, nothing else either
        return [Stop(None, "unreachable")]


async def test_cancel_applies_only_to_work_in_flight_before_the_decision():
    backend = FakeBackend(lambda req, i: FakeReply.text("so seven"))
    with pytest.raises(PolicyError, match="no work and no Stop"):
        # the sample runs (a Cancel in its own launch's list does not touch it); then a
        # Cancel of nothing, with nothing in flight, is no work at all
        await solve(PROBLEM, CancelWithNothingInFlight(), backend=backend, task=WordTask())
    assert backend.generated_tokens == 2


# ---- a server that counts tokens in transit (cut_grace > 0): the settled cut, as at a stop ---
@dataclass(frozen=True)
class VerifyFirstThenCancelRecording(VerifyFirstThenCancel):
    """VerifyFirstThenCancel that records what each sample in flight had streamed when it
    asked for the Cancel, and what the snapshots after it show in flight."""

    seen: list = dataclasses.field(default_factory=list)
    after: list = dataclasses.field(default_factory=list)

    def decide(self, s):
        out = super().decide(s)
        if any(isinstance(d, Cancel) for d in out) and not self.seen:
            self.seen.extend(sorted(s.in_flight.sample_tokens))
        elif self.seen:
            self.after.append(s.in_flight.samples)
        return out


def _sim(make):
    from orchestrator.simclock import simulated_runner

    async def timed():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await make()
        return loop.time() - t0, out

    with simulated_runner() as runner:
        return runner.run(timed())


def test_a_cancelled_stream_gets_its_next_step_then_is_cut():
    """Streams with steps coming: each cancelled sample is read to its next chunk (the
    tokens the server counted for that step) and then cut, not dropped mid-step."""
    def respond(req, i):
        if req.kind == "verify":
            return FakeReply.text("yes", delay=1.0)
        if i == 0:
            return FakeReply.text("so seven", delay=0.01)
        return FakeReply.text(" ".join(["w"] * 40), delay=0.03)

    async def run():
        backend = FakeBackend(respond, cut_grace=0.5)
        policy = VerifyFirstThenCancelRecording()
        result = await solve(PROBLEM, policy, backend=backend, task=WordTask(), max_n=1)
        return result, backend, policy

    took, (result, backend, policy) = _sim(run)
    assert result.answer == "seven" and len(result.verifications) == 1
    cancelled = sorted(f.completion_tokens for f in result.failed if f.reason == "cancelled")
    assert len(policy.seen) == 2 and cancelled == [t + 1 for t in policy.seen]
    assert set(policy.after) == {0}  # cancelled work is not shown in flight
    assert result.usage.completion_tokens == backend.generated_tokens
    assert backend.cut_streams == 2 and backend.open_streams == 0
    assert took == pytest.approx(0.02 + 1.0)  # the reading's time; the cut waits on nothing


def test_a_cancelled_stream_silent_on_the_server_is_cut_after_cut_grace():
    """A held sample sends no step after the Cancel: its watcher cuts it after exactly
    cut_grace (simulated) while the verification runs on; every token is charged."""
    hold = asyncio.Event()  # never set

    async def run():
        backend = FakeBackend(_respond_held(hold, verify_delay=2.0), cut_grace=0.5)
        events = []
        result = await solve(PROBLEM, VerifyFirstThenCancel(), backend=backend,
                             task=WordTask(), max_n=1, sinks=[events.append])
        return result, backend, events

    took, (result, backend, events) = _sim(run)
    assert result.answer == "seven" and result.reason == "read"
    assert [f.completion_tokens for f in result.failed] == [2, 2]
    assert result.usage.completion_tokens == backend.generated_tokens
    assert backend.cut_streams == 2 and backend.open_streams == 0
    cut_at = sorted(e.t for e in events if isinstance(e, RequestFinished)
                    and e.outcome == "cancelled")
    assert cut_at == [pytest.approx(0.5)] * 2  # the Cancel came at 0: cut at its grace
    assert took == pytest.approx(2.0)


def test_a_stop_while_a_cancelled_stream_settles_takes_the_cut_over():
    """The reading comes back before the cancelled samples' grace ends and the policy
    stops: the stop's own cut ends them (no watcher left behind, nothing lost)."""
    hold = asyncio.Event()  # never set

    async def run():
        backend = FakeBackend(_respond_held(hold, verify_delay=0.1), cut_grace=5.0)
        result = await solve(PROBLEM, VerifyFirstThenCancel(), backend=backend,
                             task=WordTask(), max_n=1)
        return result, backend, {t for t in asyncio.all_tasks()
                                 if t is not asyncio.current_task()}

    took, (result, backend, left) = _sim(run)
    assert result.answer == "seven" and len(result.failed) == 2
    assert result.usage.completion_tokens == backend.generated_tokens
    assert backend.cut_streams == 2 and backend.open_streams == 0 and left == set()
    assert took == pytest.approx(0.1 + 5.0)  # the stop waits its own grace for a step


def _respond_held(hold: asyncio.Event, verify_delay: float):
    def respond(req, i):
        if req.kind == "verify":
            return FakeReply.text("yes", delay=verify_delay)
        if i == 0:
            return FakeReply.text("so seven")
        return FakeReply.text("a b c d e f", hold=hold, hold_after=2)  # held mid-stream

    return respond


# ---- the lean engine keeps the runtime's results with Cancel ----------------------------------
@dataclass(frozen=True)
class CancelAfterTwo:
    """Four samples; once two are in, verify the first and cancel the rest; stop on the
    reading. The pool's lengths differ, so the cancelled samples are mid-stream."""

    spec: str = "cancel-after-two"
    verifies = True

    def decide(self, s):
        if len(s.solutions) < 2 and not s.verifications_launched:
            return [] if s.samples_launched else [Sample(4)]
        if not s.verifications:
            if s.in_flight.verification_total:
                return [Cancel("solve")] if s.in_flight.samples else []
            return [Cancel("solve"), Verify(s.solutions[0])]
        return [Stop(s.solutions[0].answer, "read", s.solutions[0].key)]


def test_lean_engine_matches_the_runtime_with_cancel():
    probs = [[("a", True, 10 + 7 * j + i) for j in range(6)] for i in range(5)]
    src = ReplaySource(make_pool(probs, p_yes=0.8), verify_tokens=5)
    for order in range(4):
        with asyncio.Runner(loop_factory=SimulatedClockLoop) as runner:
            slow = runner.run(_run_problems(src, CancelAfterTwo(), order, ReplayConfig()))
        fast = run_order(src, CancelAfterTwo(), order)
        assert fast == slow
        assert all(len(r.verifications) == 1 and len(r.solutions) == 2 for r in fast)
        assert all(sum(f.reason == "cancelled" for f in r.failed) == 2 for r in fast)


# ---- the verifying policies: exploration waits for its readings --------------------------------
SETTLED = ["4", "4", "4"]  # adaptive stops here with no history


@pytest.mark.parametrize("cls", [Solverify, VerifyContested])
def test_a_settled_stop_waits_for_an_exploratory_reading(cls):
    policy = cls()
    assert isinstance(Adaptive().decide(make_snapshot(SETTLED, in_flight=5))[0], Stop)
    # a reading in flight and samples: cancel the samples, keep the reading
    assert policy.decide(make_snapshot(SETTLED, in_flight=5, verifying={0: 1})) == \
        [Cancel("solve")]
    # only the reading left: wait for it
    assert policy.decide(make_snapshot(SETTLED, verifying={0: 1})) == []
    # the reading is in: adaptive's stop
    done = make_snapshot(SETTLED, scores={0: [0.7]})
    assert policy.decide(done) == Adaptive().decide(done)
    # with a profile (no exploration), with exploration off, or on a stop that is not
    # "settled" (no pseudo-labels come of it), nothing waits
    assert cls(explore=0).decide(make_snapshot(SETTLED, in_flight=5, verifying={0: 1})) == \
        Adaptive().decide(make_snapshot(SETTLED, in_flight=5, verifying={0: 1}))
    at_max = make_snapshot(["4", "5"] * 2, verifying={0: 1})
    capped = cls(max=4)
    base = Adaptive(max=4).decide(at_max)
    assert base[0].code == "max" and capped.decide(at_max) == base
