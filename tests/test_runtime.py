"""The scheduler on the in-memory fake backend, with deterministic gates."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.decisions import Sample, Stop
from orchestrator.errors import ConfigError, ModelNotFound, PolicyError, StreamBroken
from orchestrator.events import (
    DecisionMade,
    ProblemDone,
    ProblemStarted,
    RequestFinished,
    RequestStarted,
    SampleCancelled,
    SampleFailed,
    SampleFinished,
)
from orchestrator.runtime import run_batch, solve
from orchestrator.types import Budget, Problem
from policies import GenRM, SelfConsistency
from tests.helpers import StopAtFirst, WordTask

PROBLEM = Problem(id="p1", problem="q", answer="seven")
TASK = WordTask()


def collect():
    events = []
    return events, events.append


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}



async def test_self_consistency_majority_and_accounting():
    answers = ["so seven", "so seven", "so eight", "so seven", "no answer ?"]
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(*answers)))
    result = await solve(PROBLEM, SelfConsistency(5), backend=backend, task=TASK)
    assert result.answer == "seven" and result.correct is True
    assert [s.answer for s in result.solutions].count(None) == 1
    # one request with n=5; every generated token charged once
    assert len(backend.requests) == 1 and backend.requests[0].n == 5
    assert result.usage.completion_tokens == backend.generated_tokens == 11
    assert result.usage.prompt_tokens == 10 and not result.usage.estimated
    assert result.requests == 1


async def test_sample_k_is_split_by_max_n():
    backend = FakeBackend(scripted([FakeReply.text("a x")]))
    result = await solve(PROBLEM, SelfConsistency(7), backend=backend, task=TASK, max_n=3)
    assert [r.n for r in backend.requests] == [3, 3, 1]
    assert len(result.solutions) == 7


async def test_stop_cancels_in_flight_and_charges_partial_tokens_once():
    hold = asyncio.Event()  # never set: the other streams stay mid-generation
    replies = [
        FakeReply.text("one two three"),
        FakeReply.text("a b c d e f g h", hold=hold, hold_after=2),
        FakeReply.text("a b c d e f g h", hold=hold, hold_after=3),
    ]
    backend = FakeBackend(scripted(replies))
    events, sink = collect()
    result = await solve(PROBLEM, StopAtFirst(3), backend=backend, task=TASK, max_n=1,
                         sinks=[sink])
    assert result.answer == "three" and result.reason == "first"
    cancelled = [e for e in events if isinstance(e, SampleCancelled)]
    assert sorted(e.sample.completion_tokens for e in cancelled) == [2, 3]
    finished = [e for e in events if isinstance(e, RequestFinished)]
    assert sorted(e.outcome for e in finished) == ["cancelled", "cancelled", "ok"]
    # charged exactly what the "server" generated: 3 + 2 + 3, not more, not less
    assert backend.generated_tokens == 8
    assert result.usage.completion_tokens == 8
    assert sum(e.usage.completion_tokens for e in finished) == 8
    # streams were closed (aborted), nothing left open, no task outlives solve
    assert backend.aborted_streams == 2 and backend.open_streams == 0
    assert other_tasks() == set()


async def test_cancelled_stream_without_server_usage_is_charged_counted_tokens():
    hold = asyncio.Event()
    replies = [FakeReply.text("w x y z"), FakeReply.text("a b c d", hold=hold, hold_after=3)]
    backend = FakeBackend(scripted(replies), usage="none")
    result = await solve(PROBLEM, StopAtFirst(2), backend=backend, task=TASK, max_n=1)
    assert backend.generated_tokens == 7
    assert result.usage.completion_tokens == 7
    assert result.usage.estimated  # no server count: flagged


async def test_mid_stream_failure_is_a_visible_event_and_is_replaced():
    replies = [
        FakeReply.text("a b c d", fail_after=2),  # breaks after 2 tokens
        FakeReply.text("x seven"),
    ]
    backend = FakeBackend(scripted(replies))
    events, sink = collect()
    seen_failures = []

    @dataclass(frozen=True)
    class Spy:
        inner: SelfConsistency
        spec: str = "spy"

        def decide(self, s):
            seen_failures.append(len(s.failed))
            return self.inner.decide(s)

    result = await solve(PROBLEM, Spy(SelfConsistency(1)), backend=backend, task=TASK,
                         sinks=[sink])
    failed = [e for e in events if isinstance(e, SampleFailed)]
    assert len(failed) == 1
    assert failed[0].sample.completion_tokens == 2
    assert isinstance(failed[0].sample.error, StreamBroken)
    assert failed[0].sample.error_text.startswith("StreamBroken: ")
    assert failed[0].sample.partial_text == "a b"
    assert max(seen_failures) == 1  # the policy saw it
    assert result.answer == "seven" and len(result.failed) == 1
    assert result.usage.completion_tokens == 4 == backend.generated_tokens
    assert len(backend.requests) == 2  # replaced once by the policy, not retried silently


async def test_token_cap_is_never_exceeded_even_with_work_in_flight():
    task = WordTask(max_tokens=5)
    backend = FakeBackend(scripted([FakeReply.text("w w w w seven")]))  # 5 tokens each
    result = await solve(PROBLEM, SelfConsistency(50), Budget(tokens=23), backend, task=task,
                         max_n=1)
    # 4 samples of up to 5 tokens fit in 23; a 5th could overrun the cap, so it never starts
    assert len(backend.requests) == 4
    assert result.usage.completion_tokens == 20 <= 23
    assert result.answer == "seven" and "budget exhausted" in result.reason


async def test_token_cap_splits_a_request_to_what_fits():
    task = WordTask(max_tokens=5)
    backend = FakeBackend(scripted([FakeReply.text("w w seven")]))  # 3 tokens each
    result = await solve(PROBLEM, SelfConsistency(8), Budget(tokens=17), backend, task=task)
    # first request n=3 (15 of 17 reserved); then 9 charged leaves room for 1 more, ...
    assert backend.requests[0].n == 3
    assert result.usage.completion_tokens <= 17
    assert all(r.n >= 1 for r in backend.requests)


async def test_one_sample_at_a_time_uses_the_cap_fully():
    backend = FakeBackend(scripted([FakeReply.text("w w w w seven")]))

    @dataclass(frozen=True)
    class OneByOne:
        spec: str = "one-by-one"

        def decide(self, s):
            if s.in_flight.samples:
                return []
            if s.budget_left.exhausted:
                return [Stop(None, "budget")]
            return [Sample(1)]

    result = await solve(PROBLEM, OneByOne(), Budget(tokens=23), backend,
                         task=WordTask(max_tokens=5))
    assert len(backend.requests) == 4
    assert result.usage.completion_tokens == 20 and result.reason == "budget"


async def test_request_cap_is_never_exceeded():
    backend = FakeBackend(scripted([FakeReply.text("seven")]))
    result = await solve(PROBLEM, SelfConsistency(10), Budget(requests=3), backend,
                         task=TASK, max_n=1)
    assert len(backend.requests) == 3 == result.requests
    assert "budget exhausted" in result.reason


async def test_cost_unit_cap_counts_verifications_with_lambda():
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text(
        "yes" if req.kind == "verify" else "a b c seven")))
    result = await solve(PROBLEM, GenRM(4, 4), Budget(cost_units=3.0), backend, task=TASK,
                         max_n=1)
    assert result.cost_units <= 3.0 + 1e-9
    assert result.answer == "seven"


async def test_genrm_end_to_end_scores_and_measures_lambda():
    def respond(req, i):
        if req.kind == "verify":
            return FakeReply.text("yes" if req.prompt.endswith("|eight") else "no")
        return FakeReply.text("so seven", "so seven", "a b c d eight")

    backend = FakeBackend(respond)
    result = await solve(PROBLEM, GenRM(3, 2), backend=backend, task=TASK)
    assert result.answer == "eight"  # verifier prefers it despite fewer votes
    assert len(result.verifications) == 6
    sol_mean = (2 + 2 + 5) / 3
    assert result.lam == pytest.approx(1 / sol_mean)
    assert result.verification_tokens == 6 and result.solution_tokens == 9


async def test_no_task_outlives_solve_when_policy_raises():
    hold = asyncio.Event()
    backend = FakeBackend(scripted([FakeReply.text("a b c", hold=hold, hold_after=1)]))

    @dataclass(frozen=True)
    class Broken:
        spec: str = "broken"

        def decide(self, s):
            if s.samples_launched == 0:
                return [Sample(2)]
            return ["not a decision"]

    async def release():
        await asyncio.sleep(0.01)
        hold.set()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(release())
        with pytest.raises(PolicyError, match="not a Sample, Verify, Cancel or Stop"):
            await solve(PROBLEM, Broken(), backend=backend, task=TASK, max_n=1)
    assert backend.open_streams == 0
    assert other_tasks() == set()


async def test_policy_that_stalls_is_an_error_not_a_hang():
    @dataclass(frozen=True)
    class Idle:
        spec: str = "idle"

        def decide(self, s):
            return []

    backend = FakeBackend(scripted([FakeReply.text("x")]))
    with pytest.raises(PolicyError, match="no work and no Stop"):
        await solve(PROBLEM, Idle(), backend=backend, task=TASK)


async def test_fatal_backend_error_ends_problem_with_error_recorded():
    backend = FakeBackend(scripted([FakeReply.text(
        "x", fail_after=0, error=ModelNotFound("model 'nope' not served"))]))
    result = await solve(PROBLEM, SelfConsistency(4), backend=backend, task=TASK)
    assert isinstance(result.error, ModelNotFound)  # the exception itself, kept
    assert result.error_text == "ModelNotFound: model 'nope' not served"
    assert result.to_dict()["error"] == result.error_text  # text only when serialised
    assert result.answer is None and result.correct is False


async def test_retryable_failures_exhaust_max_failures_visibly():
    backend = FakeBackend(scripted([FakeReply.text("x", fail_after=0,
                                                   error=StreamBroken("boom"))]))
    result = await solve(PROBLEM, SelfConsistency(2, max_failures=3), backend=backend,
                         task=TASK, max_n=1)
    assert result.answer is None
    assert len(result.failed) == 4  # 2 + 2 replacements, then it gave up
    assert "too many failed samples" in result.reason


async def test_run_batch_shares_concurrency_and_keeps_order():
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text("x " + req.prompt,
                                                                 delay=0.001)))
    problems = [Problem(id=f"p{i}", problem=f"a{i}", answer=f"a{i}") for i in range(6)]
    seen = []
    results = await run_batch(problems, SelfConsistency(3), backend=backend, task=TASK,
                              concurrency=2, on_result=seen.append, max_n=1)
    assert [r.problem.id for r in results] == [p.id for p in problems]
    assert all(r.correct for r in results)
    assert backend.max_open_streams <= 2
    assert sorted(r.problem.id for r in seen) == sorted(p.id for p in problems)


async def test_run_batch_rejects_empty_input():
    with pytest.raises(ConfigError, match="no problems"):
        await run_batch([], SelfConsistency(1), backend=FakeBackend(scripted(
            [FakeReply.text("x")])), task=TASK)


async def test_events_cover_every_sample_exactly_once():
    hold = asyncio.Event()
    replies = [FakeReply.text("a seven"), FakeReply.text("b c d", hold=hold, hold_after=1)]
    backend = FakeBackend(scripted(replies))
    events, sink = collect()
    await solve(PROBLEM, StopAtFirst(4), backend=backend, task=TASK, max_n=2, sinks=[sink])
    outcomes = [e for e in events if isinstance(e, SampleFinished | SampleCancelled
                                                 | SampleFailed)]
    started = sum(e.n for e in events if isinstance(e, RequestStarted))
    assert started == 4 and len(outcomes) == 4


async def test_run_level_token_budget_is_shared_and_never_exceeded():
    task = WordTask(max_tokens=5)
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text("w w w w " + req.prompt,
                                                                 delay=0.001)))
    problems = [Problem(id=f"p{i}", problem=f"a{i}", answer=f"a{i}") for i in range(4)]
    results = await run_batch(problems, SelfConsistency(4), backend=backend, task=task,
                              concurrency=2, max_n=1, run_tokens=50)
    total = sum(r.usage.completion_tokens for r in results)
    assert total <= 50 and backend.generated_tokens == total
    assert len(results) == 4
    assert any("budget exhausted" in r.reason for r in results)


async def test_problems_that_settle_early_leave_budget_to_the_others():
    task = WordTask(max_tokens=5)
    hold = asyncio.Event()  # never set: easy's extra samples stall after one token
    easy_done = asyncio.Event()

    def release_hard(event):
        if isinstance(event, ProblemDone) and event.problem_id == "easy":
            easy_done.set()

    def respond(req, i):
        if req.prompt == "e" and i > 0:
            return FakeReply.text("w w w w e", hold=hold, hold_after=1)
        if req.prompt == "h":  # the hard problem's samples wait until easy is done
            return FakeReply.text("w w w w h", hold=easy_done, hold_after=4)
        return FakeReply.text("w w w w e")

    @dataclass(frozen=True)
    class EasyOrHard:
        spec: str = "easy-or-hard"

        def decide(self, s):
            easy = s.problem.id == "easy"
            if s.solutions and (easy or len(s.solutions) >= 8):
                return [Stop(s.solutions[0].answer, "done")]
            if s.budget_left.exhausted:
                return [] if s.in_flight.samples else [Stop(None, "budget")]
            missing = (4 if easy else 8) - len(s.solutions) - s.in_flight.samples
            return [Sample(missing)] if missing > 0 else []

    problems = [Problem(id="easy", problem="e"), Problem(id="hard", problem="h")]
    results = await run_batch(problems, EasyOrHard(), backend=FakeBackend(respond), task=task,
                              max_n=1, run_tokens=48, sinks=[release_hard])
    easy, hard = results
    # easy reserved 4 x 5 tokens, settled on its first sample and cancelled the rest
    assert easy.usage.completion_tokens == 5 + 3 * 1
    # what it did not spend went to the hard problem, which got all 8 samples
    assert hard.reason == "done" and hard.usage.completion_tokens == 40
    assert easy.usage.completion_tokens + hard.usage.completion_tokens <= 48


# ---- settled cut: backends whose server may have tokens in transit (cut_grace > 0) ----


@dataclass(frozen=True)
class StopAtFirstRecording:
    """StopAtFirst that also says, in its reason, what each cut sample had streamed."""

    k: int
    spec: str = "stop-at-first-recording"

    def decide(self, s):
        if s.solutions:
            at_cut = ",".join(map(str, sorted(s.in_flight.sample_tokens)))
            return [Stop(s.solutions[0].answer, at_cut, s.solutions[0].key)]
        if s.samples_launched == 0:
            return [Sample(self.k)]
        return []


async def test_settled_cut_reads_each_stream_to_its_next_chunk_then_closes():
    replies = [FakeReply.text("one two three")] + [
        FakeReply.text(" ".join(["w"] * 50), delay=0.005) for _ in range(3)
    ]
    backend = FakeBackend(scripted(replies))
    backend.cut_grace = 1.0  # as a real HTTP backend does
    events, sink = collect()
    result = await solve(PROBLEM, StopAtFirstRecording(4), backend=backend, task=TASK,
                         max_n=1, sinks=[sink])
    at_cut = [int(x) for x in result.reason.split(",")]
    cut = sorted(e.sample.completion_tokens for e in events if isinstance(e, SampleCancelled))
    assert len(cut) == 3
    assert cut == [t + 1 for t in at_cut]  # exactly one more chunk each, then closed
    assert result.usage.completion_tokens == backend.generated_tokens
    assert backend.aborted_streams == 3 and backend.open_streams == 0
    finished = [e for e in events if isinstance(e, RequestFinished)]
    assert sorted(e.outcome for e in finished) == ["cancelled"] * 3 + ["ok"]
    assert other_tasks() == set()


class _GatedBackend:
    """A backend with explicit gates instead of delays: an ``n = 1`` request streams
    "one two three", its last token only once every long choice's first token has been
    read; an ``n > 1`` request streams one token per choice per step (chunks in index order,
    each followed by its running usage, as vLLM does), step 1 only after ``release`` is
    set, and nothing after that until it is closed."""

    def __init__(self) -> None:
        self.cut_grace = 30.0  # settle cut streams; the gates, not a clock, end the wait
        self.release = asyncio.Event()
        self.long_read = asyncio.Event()
        self.generated = 0
        self.requests: list = []

    def stream(self, request):
        from contextlib import asynccontextmanager

        from orchestrator.backends.base import TextDelta, UsageReport

        @asynccontextmanager
        async def opened():
            self.requests.append(request)

            async def short():
                for i, word in enumerate([" one", " two", " three"]):
                    if i == 2:
                        await self.long_read.wait()
                    self.generated += 1
                    yield TextDelta(0, word, 1, finish_reason="stop" if i == 2 else None)
                    yield UsageReport(1, i + 1, final=False)
                yield UsageReport(1, 3, final=True)

            async def long():
                for step in range(3):
                    if step == 1:
                        self.long_read.set()  # the runtime asked past step 0: it read it
                        await self.release.wait()
                    elif step == 2:
                        await asyncio.Event().wait()  # until closed
                    for c in range(request.n):
                        self.generated += 1
                        yield TextDelta(c, " w", 1)
                        yield UsageReport(1, step * request.n + c + 1, final=False)

            gen = short() if request.n == 1 else long()
            try:
                yield gen
            finally:
                await gen.aclose()

        return opened()

    async def aclose(self) -> None:
        pass


async def test_settled_cut_of_n_gt_1_reads_the_whole_burst():
    backend = _GatedBackend()

    def release_on_stop(event):
        if isinstance(event, DecisionMade) and any(isinstance(d, Stop) for d in event.decisions):
            backend.release.set()

    result = await solve(PROBLEM, StopAtFirstRecording(4), backend=backend, task=TASK,
                         max_n=3, sinks=[release_on_stop])
    assert [r.n for r in backend.requests] == [3, 1]
    at_cut = [int(x) for x in result.reason.split(",")]
    assert at_cut == [1, 1, 1]
    cut = sorted(f.completion_tokens for f in result.failed)
    assert cut == [t + 1 for t in at_cut]  # one whole burst (step) read, no more
    assert result.usage.completion_tokens == backend.generated == 3 + 3 * 2
    assert other_tasks() == set()


def test_a_stream_silent_after_the_stop_is_cut_after_cut_grace():
    """On the simulated clock: the held stream sends no step after the Stop, so after
    exactly cut_grace (simulated) seconds it is cut (the fake server then ends it)."""
    from orchestrator.simclock import simulated_runner

    async def run():
        hold = asyncio.Event()  # never set
        replies = [FakeReply.text("one two three", delay=0.01),
                   FakeReply.text("a b c d e f", hold=hold, hold_after=2)]
        backend = FakeBackend(scripted(replies), cut_grace=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await solve(PROBLEM, StopAtFirst(2), backend=backend, task=TASK, max_n=1)
        return loop.time() - t0, result, backend

    with simulated_runner() as runner:
        took, result, backend = runner.run(run())
    assert took == pytest.approx(0.03 + 0.2)
    assert [f.completion_tokens for f in result.failed] == [2]
    assert result.usage.completion_tokens == backend.generated_tokens == 5
    assert backend.aborted_streams == 1 and backend.cut_streams == 1


async def test_a_choice_finishing_while_settling_is_not_a_solution():
    hold = asyncio.Event()  # released by the Stop: the held stream then finishes at once

    def release_on_stop(event):
        if isinstance(event, DecisionMade) and any(isinstance(d, Stop) for d in event.decisions):
            hold.set()

    replies = [FakeReply.text("one two three"),
               FakeReply.text("four five six seven", hold=hold, hold_after=3)]
    backend = FakeBackend(scripted(replies))
    backend.cut_grace = 1.0
    result = await solve(PROBLEM, StopAtFirst(2), backend=backend, task=TASK, max_n=1,
                         sinks=[release_on_stop])
    assert [s.answer for s in result.solutions] == ["three"]
    assert [(f.reason, f.completion_tokens, f.partial_text) for f in result.failed] == [
        ("cancelled", 4, "four five six seven")]
    assert result.usage.completion_tokens == backend.generated_tokens == 7


async def test_cancelling_solve_while_a_stream_settles_leaves_nothing_running():
    """A stream that was cut but whose server neither sends nor closes keeps the settle
    waiting (up to cut_grace); cancelling ``solve`` then must end it cleanly (no
    ExceptionGroup, no task left)."""
    from contextlib import asynccontextmanager

    from orchestrator.backends.base import Backend, EventStream, TextDelta, UsageReport

    stopped = asyncio.Event()
    waiting = asyncio.Event()

    def on_stop(event):
        if isinstance(event, DecisionMade) and any(isinstance(d, Stop) for d in event.decisions):
            stopped.set()

    class Deaf(Backend):
        cut_grace = 3600.0

        def __init__(self) -> None:
            self.calls = 0
            self.closed_streams = 0
            self.cuts = 0

        def cut(self) -> None:
            self.cuts += 1

        @asynccontextmanager
        async def stream(self, request):
            self.calls += 1
            first = self.calls == 1

            async def events():
                if first:  # the short answer that stops the problem
                    for i, word in enumerate(["so", " seven"]):
                        yield TextDelta(0, word, 1, finish_reason="stop" if i else None)
                        yield UsageReport(3, i + 1, final=False)
                    return
                yield TextDelta(0, " w", 1)
                yield UsageReport(3, 1, final=False)
                await stopped.wait()
                yield TextDelta(0, " w", 1)  # the step after the Stop: then the cut
                yield UsageReport(3, 2, final=False)
                waiting.set()
                await asyncio.sleep(3600)  # the server ignores the cut

            gen = events()
            try:
                yield EventStream(gen, self.cut)
            finally:
                await gen.aclose()
                self.closed_streams += 1

        async def aclose(self) -> None:
            pass

    backend = Deaf()
    task = asyncio.create_task(solve(PROBLEM, StopAtFirst(2), backend=backend, task=TASK,
                                     max_n=1, sinks=[on_stop]))
    await asyncio.wait_for(waiting.wait(), 30)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done() and backend.cuts == 1  # cut after its step, waiting for its end
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.closed_streams == 2
    assert other_tasks() == set()


# ---- one error surface -------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: Budget(tokens=0),
    lambda: Budget(requests=-1),
    lambda: Budget(cost_units=float("nan")),
    lambda: Budget(tokens=True),
    lambda: __import__("orchestrator.ledger", fromlist=["RunBudget"]).RunBudget(0),
    lambda: __import__("orchestrator.backends.base", fromlist=["GenerationRequest"])
    .GenerationRequest(kind="solve", max_tokens=0, prompt="q"),
    lambda: __import__("orchestrator.backends.base", fromlist=["GenerationRequest"])
    .GenerationRequest(kind="solve", max_tokens=8),
])
def test_every_validation_is_a_config_error_and_still_a_value_error(make):
    from orchestrator.errors import SolverifyError

    with pytest.raises(ConfigError) as info:
        make()
    assert isinstance(info.value, SolverifyError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("make", [lambda: Sample(0), lambda: Sample(1.5), lambda: Sample(True)])
def test_a_bad_decision_is_a_policy_error(make):
    with pytest.raises(PolicyError):
        make()


async def test_verify_of_another_problems_solution_is_a_policy_error():
    """Solution ids start at 0 in every problem: a policy that kept problem A's solution 0
    and asks to verify it in problem B used to have A's text read and the verdict recorded
    as B's solution 0 (found by review)."""
    from orchestrator.backends.fake import FakeBackend, FakeReply
    from orchestrator.decisions import Verify
    from tests.helpers import WordTask

    class Stale:
        spec = "stale"
        verifies = True

        def __init__(self) -> None:
            self.kept = None

        def decide(self, s):
            if not s.solutions:
                return [] if s.samples_launched else [Sample(1)]
            if self.kept is None:
                self.kept = s.solutions[0]
                return [Stop(s.solutions[0].answer, "first")]
            return [Verify(self.kept)]

    backend = FakeBackend(lambda req, i: FakeReply.text(
        "yes" if req.kind == "verify" else ("so seven" if i == 0 else "so eight")))
    policy = Stale()
    first = await solve(Problem(id="A", problem="qa"), policy, backend=backend,
                        task=WordTask())
    assert first.answer == "seven"
    with pytest.raises(PolicyError, match="not this problem's"):
        await solve(Problem(id="B", problem="qb"), policy, backend=backend, task=WordTask())
    assert not any(r.kind == "verify" for r in backend.requests)


async def test_a_policy_returning_a_bare_decision_is_a_policy_error():
    @dataclass(frozen=True)
    class Bare:
        spec: str = "bare"

        def decide(self, s):
            return Stop(None, "no list")

    with pytest.raises(PolicyError, match="not a sequence of decisions"):
        await solve(PROBLEM, Bare(), backend=FakeBackend(scripted([FakeReply.text("a")])),
                    task=TASK)


class _Bug(Exception):
    pass


@dataclass(frozen=True)
class _BuggyGrader:
    where: str

    def extract(self, text):
        if self.where == "extract":
            raise _Bug("extract")
        return text.split()[-1]

    def key(self, answer):
        return answer

    def is_correct(self, answer, problem):
        if self.where == "is_correct":
            raise _Bug("is_correct")
        return answer == problem.answer


@pytest.mark.parametrize("where", ["policy", "extract", "is_correct", "solve_request"])
@pytest.mark.parametrize("batch", [False, True])
async def test_a_bug_in_user_code_surfaces_as_itself_with_a_note(where, batch):
    """Policy, grader (inside a request task) and task bugs all come out of solve and
    run_batch the same way: the exception itself, not an ExceptionGroup, with a note
    naming the code and the problem; nothing is left running."""
    from dataclasses import replace

    @dataclass(frozen=True)
    class BuggyPolicy:
        spec: str = "buggy"

        def decide(self, s):
            if where == "policy" and s.solutions:
                raise _Bug("policy")
            return [Stop(s.solutions[0].answer, "x", s.solutions[0].key)] if s.solutions \
                else ([] if s.samples_launched else [Sample(2)])

    @dataclass(frozen=True)
    class BuggyTask(WordTask):
        def solve_request(self, problem, n):
            if where == "solve_request" and n == 2:
                raise _Bug("solve_request")
            return super().solve_request(problem, n)

    task = BuggyTask(grader=_BuggyGrader(where)) if where != "policy" else TASK
    backend = FakeBackend(scripted([FakeReply.text("one two three")]))
    problem = replace(PROBLEM, answer="three")
    with pytest.raises(_Bug) as info:
        if batch:
            await run_batch([problem], BuggyPolicy(), backend=backend, task=task)
        else:
            await solve(problem, BuggyPolicy(), backend=backend, task=task)
    assert str(info.value) == where
    assert any(f"on problem {problem.id!r}" in note for note in info.value.__notes__)
    assert other_tasks() == set()


async def test_an_object_that_is_not_a_backend_is_a_config_error():
    class NoGrace:
        def stream(self, request): ...

        async def aclose(self): ...

    with pytest.raises(ConfigError, match="cut_grace"):
        await solve(PROBLEM, StopAtFirst(1), backend=NoGrace(), task=TASK)


# ---- run_batch: lazy problem tasks, results not held -------------------------------------
async def test_run_batch_makes_a_problem_task_only_when_it_may_start():
    problems = [Problem(id=f"q{i}", problem="q", answer="three") for i in range(12)]
    alive: list[int] = []

    def count(event):
        if isinstance(event, ProblemStarted):
            alive.append(sum(1 for t in asyncio.all_tasks()
                             if t.get_name().startswith("problem:")))

    backend = FakeBackend(scripted([FakeReply.text("one two three")]))
    got: list[str] = []
    results = await run_batch(problems, StopAtFirst(1), backend=backend, task=TASK,
                              problems_in_flight=3, sinks=[count],
                              on_result=lambda r: got.append(r.problem.id))
    assert len(alive) == 12 and max(alive) == 3
    assert [r.problem.id for r in results] == [p.id for p in problems]
    assert sorted(got) == sorted(p.id for p in problems)


async def test_run_batch_without_keeping_results_hands_each_to_on_result_only():
    problems = [Problem(id=f"q{i}", problem="q", answer="three") for i in range(5)]
    backend = FakeBackend(scripted([FakeReply.text("one two three")]))
    got = []
    results = await run_batch(problems, StopAtFirst(1), backend=backend, task=TASK,
                              on_result=got.append, keep_results=False)
    assert results == [] and sorted(r.problem.id for r in got) == [p.id for p in problems]


def test_the_run_summary_adds_up_what_the_results_hold():
    from orchestrator.result import RunSummary

    async def run():
        backend = FakeBackend(scripted([FakeReply.text("one two three"),
                                        FakeReply.text("x", fail_after=0,
                                                       error=StreamBroken("boom")),
                                        FakeReply.text("yes")]))
        return await run_batch([Problem(id=f"q{i}", problem="q", answer="three")
                                for i in range(3)], GenRM(2, 1), backend=backend,
                               task=TASK, max_n=1)

    results = asyncio.run(run())
    tally = RunSummary()
    for r in results:
        tally.add(r)
    d = tally.as_dict(1.234)
    assert d["problems"] == 3 and d["wall_s"] == 1.23
    assert d["completion_tokens"] == sum(r.usage.completion_tokens for r in results)
    assert d["solutions"] == sum(len(r.solutions) for r in results)
    assert d["verifications"] == sum(len(r.verifications) for r in results)
    sol = [s.completion_tokens for r in results for s in r.solutions]
    ver = [v.completion_tokens for r in results for v in r.verifications]
    assert d["lambda"] == (sum(ver) / len(ver)) / (sum(sol) / len(sol))
    assert d["failed_samples"] == sum(1 for r in results for f in r.failed
                                      if f.reason == "failed")
    assert d["accuracy"] == sum(bool(r.correct) for r in results) / 3
    from orchestrator.result import ended_on_error

    assert d["errors"] == sum(ended_on_error(r.to_dict()) for r in results)


def test_the_run_summary_counts_a_problem_stopped_by_failures_as_ended_on_an_error():
    """The exit status counts a stop on failures as an error; the summary's "problems"
    line counted only fatal errors, so it printed "problems 2" with no note beside
    "ended on an error 2 of 2" (found by review)."""
    from orchestrator.result import RunSummary

    async def run():
        backend = FakeBackend(scripted([FakeReply.text("x", fail_after=0,
                                                       error=StreamBroken("boom"))] * 8))
        return await run_batch([Problem(id=f"q{i}", problem="q", answer="three")
                                for i in range(2)], SelfConsistency(2, max_failures=1),
                               backend=backend, task=TASK, max_n=1)

    results = asyncio.run(run())
    assert {r.stop_code for r in results} == {"failures"}
    assert all(r.error is None for r in results)
    tally = RunSummary()
    for r in results:
        tally.add(r)
    assert tally.as_dict(1.0)["errors"] == 2


class _SampleThenStop:
    """One sample; once it is in, two more launched together with the Stop."""

    spec = "sample-then-stop"

    def decide(self, snapshot):
        if not snapshot.solutions:
            return [] if snapshot.in_flight.samples else [Sample(1)]
        s = snapshot.solutions[0]
        return [Sample(2), Stop(s.answer, "first", s.key)]


@pytest.mark.parametrize("grace", [0.0, 0.5])
async def test_work_launched_with_the_stop_is_closed_as_cancelled(grace):
    """``[Sample(2), Stop(...)]``: the request's task is cancelled before it runs, so it
    cannot close its own request; it used to stay open in the ledger, without a
    RequestFinished and with its samples in neither ``solutions`` nor ``failed`` (found by
    review)."""
    events, sink = collect()
    fake = FakeBackend(scripted(lambda req, i: FakeReply.text("so seven")), cut_grace=grace)
    r = await solve(PROBLEM, _SampleThenStop(), backend=fake, task=TASK, sinks=[sink])
    assert r.answer == "seven" and r.requests == 2
    assert [(f.reason, f.request_id, f.completion_tokens) for f in r.failed] == [
        ("cancelled", 1, 0), ("cancelled", 1, 0)]
    finished = [e for e in events if isinstance(e, RequestFinished)]
    assert [(e.request_id, e.outcome) for e in finished] == [(0, "ok"), (1, "cancelled")]
    assert sum(isinstance(e, SampleCancelled) for e in events) == 2
    assert len(fake.requests) == 1  # the second request never reached the server
    assert r.usage.completion_tokens == fake.generated_tokens
    assert not other_tasks()
