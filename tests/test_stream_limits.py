"""Emulated ``n`` as a wrapper of any backend, the per-endpoint stream limit, and the
detection of a server that cuts a running stream when another arrives (on the fake
backend, with gates: no test here waits on the clock)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from orchestrator.backends.base import (
    Backend,
    EventStream,
    GenerationRequest,
    TextDelta,
    UsageReport,
)
from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.backends.streams import _MERGE_QUEUE_SIZE, EmulatedN, StreamSlots
from orchestrator.errors import ConfigError, ModelNotFound, StreamBroken
from orchestrator.runtime import run_batch, solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import ScriptedRequests, WordTask

PROBLEM = Problem(id="p1", problem="q", answer="seven")


async def spin_until(predicate, turns: int = 100_000) -> None:
    """Let the event loop run until ``predicate()`` holds (loop turns, not time)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def request(n: int, seed: int | None = None) -> GenerationRequest:
    return GenerationRequest(kind="solve", prompt="q", n=n, max_tokens=8, seed=seed)


async def test_emulated_n_merges_single_choice_streams():
    fake = FakeBackend(scripted(lambda req, i: FakeReply.text(f"so {i}")))
    backend = EmulatedN(fake)
    async with backend.stream(request(3, seed=10)) as events:
        got = [e async for e in events]
    assert [r.n for r in fake.requests] == [1, 1, 1]
    assert sorted(r.seed for r in fake.requests) == [10, 11, 12]
    finished = {e.choice for e in got if isinstance(e, TextDelta) and e.finish_reason}
    assert finished == {0, 1, 2}
    final = [e for e in got if isinstance(e, UsageReport) and e.final]
    assert len(final) == 1 and final[0].completion_tokens == 6 == fake.generated_tokens
    assert final[0].prompt_tokens == 30


class _FirstAnswer:
    """Send one request per size in ``sizes`` at once (default: one of two samples), stop
    at the first solution (the others still streaming or waiting)."""

    spec = "first-answer"

    def __init__(self, *sizes: int) -> None:
        self.sizes = sizes or (2,)
        self.asked = False

    def decide(self, snapshot):
        from orchestrator.decisions import Sample, Stop
        if snapshot.solutions:
            s = snapshot.solutions[0]
            return [Stop(s.answer, "first", s.key)]
        if not self.asked:
            self.asked = True
            return [Sample(k) for k in self.sizes]
        return []


@pytest.mark.parametrize("usage", ["final", "continuous", "none"])
async def test_emulated_n_charges_a_cut_choice_that_never_reported(usage):
    """Choice 0 streams 30 tokens and holds; choice 1 then finishes and the policy stops.
    With a server that reports usage only in its last chunk, choice 1's report was the
    request's whole count: choice 0's 30 tokens went uncharged (found by review)."""
    held, release = asyncio.Event(), asyncio.Event()

    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text(" ".join(["w"] * 40) + " so seven", hold=held,
                                  hold_after=30)
        return FakeReply.text("so seven", hold=release, hold_after=0)

    fake = FakeBackend(respond, usage=usage)
    backend = EmulatedN(fake, native_n=False)
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(solve(PROBLEM, _FirstAnswer(), backend=backend, task=WordTask()))
        await spin_until(lambda: fake.generated_tokens >= 30)
        release.set()
    r = run.result()
    assert r.answer == "seven"
    assert fake.generated_tokens == 32  # 30 of choice 0, both tokens of choice 1
    assert r.usage.completion_tokens == 32
    assert [(f.reason, f.completion_tokens) for f in r.failed] == [("cancelled", 30)]
    if usage == "none":
        assert r.usage.prompt_tokens == 0 and r.usage.estimated
    else:  # both choices sent the prompt
        assert r.usage.prompt_tokens == 20
        assert r.usage.estimated == (usage == "final")
        assert ("streamed" in r.usage.estimated_from) == (usage == "final")


@pytest.mark.parametrize("cut_grace", [0.0, 1.0])
async def test_a_failed_emulated_choice_is_recorded_failed_when_the_problem_stops(cut_grace):
    """Choice 0 breaks while choice 1 runs on; choice 1's answer stops the problem. The
    request ends cancelled, and choice 0 was recorded "cancelled" with no error: the
    server's failure was hidden from the results (found by review)."""
    broke = asyncio.Event()

    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("w w w so seven", fail_after=2)
        return FakeReply.text("so seven", hold=broke, hold_after=0)

    fake = FakeBackend(scripted(respond), cut_grace=cut_grace)
    backend = EmulatedN(fake, native_n=False)
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(solve(PROBLEM, _FirstAnswer(), backend=backend, task=WordTask()))
        await spin_until(lambda: fake.aborted_streams >= 1)  # choice 0 has failed
        for _ in range(50):  # and its failure reached the merged stream
            await asyncio.sleep(0)
        broke.set()
    r = run.result()
    assert r.answer == "seven"
    assert [(f.reason, f.completion_tokens) for f in r.failed] == [("failed", 2)]
    assert isinstance(r.failed[0].error, StreamBroken) and "broke" in str(r.failed[0].error)
    assert r.usage.completion_tokens == fake.generated_tokens == 4


class _CutEndsBroken:
    """A fake backend whose cut streams end with a broken connection, as a half-closed
    HTTP stream may (the reader takes that as the normal end of a cut)."""

    cut_grace = 1.0

    def __init__(self, responder) -> None:
        self.inner = FakeBackend(responder, cut_grace=1.0)

    @contextlib.asynccontextmanager
    async def stream(self, request: GenerationRequest):
        async with self.inner.stream(request) as events:
            async def read():
                async for event in events:
                    yield event
                if events.cut_requested:
                    raise StreamBroken("peer closed the connection mid-body")
            gen = read()
            try:
                yield EventStream(gen, events.cut)
            finally:
                await gen.aclose()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_emulated_choice_whose_cut_ends_broken_is_cancelled_not_failed():
    # with dfc0c2f every error of a choice went into EventStream.failed, the end of a
    # cut too: choice 0, cut when choice 1 answered, was recorded failed (found by review)
    never = asyncio.Event()

    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("w w w w so seven", hold=never, hold_after=2)
        return FakeReply.text("so seven")

    backend = _CutEndsBroken(scripted(respond))
    r = await solve(PROBLEM, _FirstAnswer(), backend=EmulatedN(backend, native_n=False),
                    task=WordTask())
    assert r.answer == "seven"
    assert [(f.reason, f.completion_tokens) for f in r.failed] == [("cancelled", 2)]
    assert backend.inner.cut_streams >= 1  # choice 0 was cut (choice 1 may be, at its end)


async def test_one_stream_at_a_time_the_cut_does_not_wait_for_a_waiting_choice():
    """One stream at a time, n=4: choice 0 answers and the problem stops with no running
    choice mid-step. The settle waited for the step of the last choice, which was still
    waiting for the slot: the three were sent one after another and run to their ends,
    68 tokens generated for an answer of 2 (found by review). Now it cuts at once; choice
    1 has taken the slot as choice 0's stream ended, before the stop was decided."""
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("so seven")
        return FakeReply.text(" ".join(["w"] * 30) + " so seven")

    fake = FakeBackend(scripted(respond), cut_grace=1.0)
    r = await solve(PROBLEM, _FirstAnswer(4),
                    backend=EmulatedN(fake, native_n=False, max_streams=1), task=WordTask())
    assert r.answer == "seven"
    assert len(fake.requests) == 2 and fake.generated_tokens == 4
    assert [f.reason for f in r.failed] == ["cancelled"] * 3
    assert r.usage.completion_tokens == 4


async def test_emulated_choices_waiting_for_a_slot_are_not_sent_after_the_cut():
    """Two streams at a time, n=4: choice 1 answers and the problem stops; choice 0 is
    cut after its next step. Choices 2 and 3, waiting for a slot, were then sent anyway
    and cut as they opened: two requests (and their prompts) for nothing (found by
    review). Now a stream whose request was cut while it waited is not sent."""
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 1:
            return FakeReply.text("so seven")
        return FakeReply.text(" ".join(["w"] * 30) + " so seven")

    fake = FakeBackend(scripted(respond), cut_grace=1.0)
    backend = EmulatedN(fake, native_n=False, max_streams=2)
    r = await solve(PROBLEM, _FirstAnswer(4), backend=backend, task=WordTask())
    assert r.answer == "seven"
    assert len(fake.requests) == 2 == backend.slots.stats()["streams_opened"]
    assert [f.reason for f in r.failed] == ["cancelled"] * 3
    assert r.usage.completion_tokens == fake.generated_tokens


async def test_emulated_events_read_ahead_are_charged_when_the_reader_is_cancelled():
    """cut_grace 0: the stop cancels the reader. The events the single streams had
    already handed over sat in the merge queue and were dropped: the server counted
    5 tokens, the ledger 4 (found by review)."""
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text(" ".join(["w"] * 200) + " so seven")
        return FakeReply.text("so seven")

    fake = FakeBackend(scripted(respond), cut_grace=0.0)
    r = await solve(PROBLEM, _FirstAnswer(), backend=EmulatedN(fake, native_n=False),
                    task=WordTask())
    assert r.answer == "seven"
    assert r.usage.completion_tokens == fake.generated_tokens
    assert [f.reason for f in r.failed] == ["cancelled"]
    assert r.failed[0].completion_tokens == fake.generated_tokens - 2


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("length", [1, 2])
async def test_emulated_events_read_ahead_before_the_handover_are_charged(n, length):
    """The one-sample request answers at once; the emulated n=``n`` request is cancelled
    (cut_grace 0) while it waits for its first event, which its streams had already
    queued: those tokens were lost with the queue, 2-3 of 3-5 (found by review)."""
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text(" ".join(["w"] * (length - 1) + ["seven"]))
        return FakeReply.text(" ".join(["w"] * 50) + " so seven")

    fake = FakeBackend(scripted(respond), cut_grace=0.0)
    r = await solve(PROBLEM, _FirstAnswer(1, n), backend=EmulatedN(fake, native_n=False),
                    task=WordTask())
    assert r.answer == "seven"
    assert r.usage.completion_tokens == fake.generated_tokens > length
    assert sum(f.completion_tokens for f in r.failed) == fake.generated_tokens - length


class _Burst(ScriptedRequests):
    """Request 0 hands over ``words`` tokens and an answer in one burst (no await between
    them: an HTTP read that brings many SSE lines at once), faster than the merged
    stream's reader takes them; request 1 answers after one loop turn."""

    def __init__(self, words: int) -> None:
        super().__init__()
        self.words = words

    async def events(self, index: int):
        words = ["w"] * self.words + ["so", "seven"] if index == 0 else ["so", "seven"]
        if index:
            await asyncio.sleep(0)
        for j, word in enumerate(words):
            self.generated += 1
            yield TextDelta(choice=0, text=f" {word}" if j else word, tokens=1,
                            finish_reason="stop" if j == len(words) - 1 else None)
        yield UsageReport(5, len(words), final=True)


@pytest.mark.parametrize("words", [_MERGE_QUEUE_SIZE // 2, 3 * _MERGE_QUEUE_SIZE])
async def test_an_event_waiting_for_room_in_the_merge_queue_is_charged(words):
    """Choice 0 floods the merge queue (256 events) and waits for room with one more
    event in hand when choice 1's answer stops the problem (cut_grace 0: the stream is
    cancelled at once). That event was never queued, so it was lost: 768 tokens handed
    over, 767 charged."""
    backend = _Burst(words)
    r = await solve(PROBLEM, _FirstAnswer(), backend=EmulatedN(backend, native_n=False),
                    task=WordTask())
    assert r.answer == "seven"
    assert r.usage.completion_tokens == backend.generated


async def test_an_emulated_failure_read_ahead_is_recorded_when_the_reader_is_cancelled():
    # choice 0's failure reached the merge queue, not the reader, before the stop: it
    # was recorded cancelled with no error (found by review)
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("w " * 20 + "so seven", fail_after=1)
        return FakeReply.text("so seven")

    fake = FakeBackend(scripted(respond), cut_grace=0.0)
    r = await solve(PROBLEM, _FirstAnswer(), backend=EmulatedN(fake, native_n=False),
                    task=WordTask())
    assert r.answer == "seven"
    assert [(f.reason, f.completion_tokens) for f in r.failed] == [("failed", 1)]
    assert isinstance(r.failed[0].error, StreamBroken)
    assert r.usage.completion_tokens == fake.generated_tokens == 3


async def test_a_fatal_error_of_one_emulated_choice_ends_the_problem():
    """One stream at a time: choice 1's stream opens after choice 0 has begun and is
    refused (the model is gone). The request's error is then a StreamBroken, and the
    choice's ModelNotFound was treated as a broken sample and replaced, where the same
    error of a request of its own ends the problem; and choice 2, waiting for the slot,
    was still sent."""
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 1:
            return FakeReply.text("x", fail_after=0, error=ModelNotFound("model gone"))
        return FakeReply.text("so seven")

    fake = FakeBackend(scripted(respond))
    r = await solve(PROBLEM, SelfConsistency(n=3),
                    backend=EmulatedN(fake, native_n=False, max_streams=1), task=WordTask())
    assert isinstance(r.error, ModelNotFound)
    assert r.stop_code == "error"
    assert r.answer == "seven"  # the votes in hand
    assert len(fake.requests) == 2  # choice 2, still waiting for its slot, not sent
    # choice 1 failed on its error; choice 2 ends with the request's, having sent nothing
    assert [(f.reason, type(f.error), f.completion_tokens) for f in r.failed] == [
        ("failed", ModelNotFound, 0), ("failed", StreamBroken, 0)]


async def test_a_failed_emulated_choice_leaves_its_siblings_running():
    """Choice 0 breaks after two tokens while choices 1 and 2 are mid-stream: they are
    streams of their own, so they finish (their tokens charged, their samples kept) and
    the failure is raised once they have ended. It was raised at once, cancelling them:
    their tokens were wasted and those in transit went uncharged (found by review)."""
    gate = asyncio.Event()

    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("w w w so seven", fail_after=2)
        return FakeReply.text(f"so {i}", hold=gate, hold_after=1)

    fake = FakeBackend(scripted(respond))
    backend = EmulatedN(fake)
    got: list = []

    async def read() -> None:
        async with backend.stream(request(3)) as events:
            async for event in events:
                got.append(event)

    task = asyncio.create_task(read())
    await spin_until(lambda: fake.generated_tokens >= 4)  # 2 of choice 0, 1 of each other
    for _ in range(50):  # choice 0's failure reaches the merged stream
        await asyncio.sleep(0)
    assert not task.done()
    gate.set()
    with pytest.raises(StreamBroken, match=r"choice 0 of an n=3 request|broke"):
        await task
    finished = {e.choice for e in got if isinstance(e, TextDelta) and e.finish_reason}
    assert finished == {1, 2}
    assert sum(e.tokens for e in got if isinstance(e, TextDelta)) == 6 == fake.generated_tokens
    assert fake.aborted_streams == 1 and fake.open_streams == 0  # the broken one only


async def test_a_failed_emulated_choice_is_charged_when_its_siblings_report_more():
    """Choices 1 and 2 stream 40 tokens each and report 41 (the server counted an end
    token it did not send); choice 0 streams 2 tokens, never reports, and fails. Summed
    over the request, 82 received against 82 reported hid choice 0's two tokens: the
    ledger charged 82 of 84 as exact (found by review)."""
    from orchestrator.backends.streams import merge_streams
    from orchestrator.ledger import RequestRecord

    queue: asyncio.Queue = asyncio.Queue()
    for choice in (1, 2):
        await queue.put((choice, TextDelta(choice=0, text="w " * 40, tokens=40,
                                           finish_reason="stop")))
        await queue.put((choice, UsageReport(10, 41, final=True)))
        await queue.put((choice, None))
    await queue.put((0, TextDelta(choice=0, text="w w", tokens=2)))
    await queue.put((0, StreamBroken("choice 0 broke")))
    record = RequestRecord(request_id=1, kind="solve", n=3, max_tokens=64,
                           choice_tokens=[0, 0, 0], choice_done=[False] * 3)
    with pytest.raises(StreamBroken, match="choice 0 broke"):
        async for event in merge_streams(queue, 3, "fake"):
            if isinstance(event, TextDelta):
                record.add_delta(event.tokens, event.estimated)
            else:
                record.add_usage(event.prompt_tokens, event.completion_tokens, event.final,
                                 event.cached_prompt_tokens, event.estimated_from)
    usage = record.usage
    assert usage.completion_tokens == 41 + 41 + 2
    assert usage.prompt_tokens == 30  # choice 0 sent the same prompt
    assert usage.estimated and "streamed" in usage.estimated_from


async def test_a_choice_cut_before_its_report_is_charged_when_its_siblings_report_more():
    """As above, but the reader stops at choice 0's delta (a Cancel, a stream that cannot
    be cut): a count sent only at the end never went out, and 82 of 84 were charged as
    exact (found by review)."""
    from orchestrator.backends.streams import merge_streams
    from orchestrator.ledger import RequestRecord

    queue: asyncio.Queue = asyncio.Queue()
    for choice in (1, 2):
        await queue.put((choice, TextDelta(choice=0, text="w " * 40, tokens=40,
                                           finish_reason="stop")))
        await queue.put((choice, UsageReport(10, 41, final=True)))
        await queue.put((choice, None))
    await queue.put((0, TextDelta(choice=0, text="w w", tokens=2)))
    record = RequestRecord(request_id=1, kind="solve", n=3, max_tokens=64,
                           choice_tokens=[0, 0, 0], choice_done=[False] * 3)
    merged = merge_streams(queue, 3, "fake")
    deltas = 0
    async for event in merged:
        if isinstance(event, TextDelta):
            record.add_delta(event.tokens, event.estimated)
            deltas += 1
            if deltas == 3:
                break  # choice 0's delta: the reader stops here
        else:
            record.add_usage(event.prompt_tokens, event.completion_tokens, event.final,
                             event.cached_prompt_tokens, event.estimated_from)
    await merged.aclose()
    assert (record.usage.completion_tokens, record.usage.prompt_tokens) == (84, 30)
    assert "streamed" in record.usage.estimated_from


async def test_a_failed_emulated_choice_that_reported_less_than_it_sent_is_charged_all():
    from orchestrator.backends.streams import merge_streams

    queue: asyncio.Queue = asyncio.Queue()
    await queue.put((1, TextDelta(choice=0, text="w w w", tokens=3, finish_reason="stop")))
    await queue.put((1, UsageReport(10, 4, final=True)))
    await queue.put((1, None))
    await queue.put((0, TextDelta(choice=0, text="w " * 5, tokens=5)))
    await queue.put((0, UsageReport(10, 3, final=False)))  # a running count, behind
    await queue.put((0, StreamBroken("choice 0 broke")))
    reports = []
    with pytest.raises(StreamBroken):
        async for event in merge_streams(queue, 2, "fake"):
            if isinstance(event, UsageReport):
                reports.append(event)
    assert (reports[-1].completion_tokens, reports[-1].final) == (4 + 5, False)
    assert reports[-1].prompt_tokens == 20 and reports[-1].estimated_from == ("streamed",)


async def test_emulated_choices_that_all_reported_end_on_their_final_sum():
    from orchestrator.backends.streams import merge_streams

    queue: asyncio.Queue = asyncio.Queue()
    for choice in (0, 1):
        await queue.put((choice, TextDelta(choice=0, text="w", tokens=1, finish_reason="stop")))
        await queue.put((choice, UsageReport(10, 2, final=True)))
        await queue.put((choice, None))
    reports = [e async for e in merge_streams(queue, 2, "fake") if isinstance(e, UsageReport)]
    assert reports[-1] == UsageReport(20, 4, final=True)  # the servers' own, not flagged


async def test_a_failed_emulated_choice_is_replaced_and_its_siblings_kept():
    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:
            return FakeReply.text("w w w so seven", fail_after=2)
        return FakeReply.text("w w w w w w so seven")

    fake = FakeBackend(scripted(respond))
    r = await solve(PROBLEM, SelfConsistency(3), backend=EmulatedN(fake), task=WordTask())
    assert r.answer == "seven" and len(r.solutions) == 3
    assert len(fake.requests) == 4  # the failed choice's replacement, not three
    assert [f.reason for f in r.failed] == ["failed"]
    assert r.usage.completion_tokens == fake.generated_tokens == 2 + 3 * 8


async def test_native_n_is_one_stream():
    fake = FakeBackend(scripted([FakeReply.text("so a")]))
    backend = EmulatedN(fake, native_n=True, max_streams=1)
    async with backend.stream(request(4)) as events:
        _ = [e async for e in events]
    assert [r.n for r in fake.requests] == [4]


async def test_every_emulated_stream_takes_a_slot():
    gate = asyncio.Event()
    fake = FakeBackend(scripted(lambda req, i: FakeReply.text("so seven", hold=gate,
                                                              hold_after=1)))
    backend = EmulatedN(fake, max_streams=2)

    async def read() -> list:
        async with backend.stream(request(8)) as events:
            return [e async for e in events]

    task = asyncio.create_task(read())
    await spin_until(lambda: fake.open_streams >= 2)  # the first two hold after one token
    for _ in range(20):  # and nothing else gets a slot while they hold theirs
        await asyncio.sleep(0)
    assert fake.open_streams == 2 and len(fake.requests) == 2
    assert backend.slots.waiting == 6
    gate.set()
    got = await task
    assert len(fake.requests) == 8 and fake.max_open_streams == 2
    assert len({e.choice for e in got if isinstance(e, TextDelta) and e.finish_reason}) == 8
    assert backend.stats()["peak_streams"] == 2 and backend.stats()["streams_opened"] == 8


async def test_concurrency_16_with_n_8_holds_at_most_max_streams():
    """``run_batch(concurrency=16)`` with ``sc:n=8`` on a server without ``n``: 128
    streams would be open without the stream limit; with it, 16."""
    fake = FakeBackend(scripted(lambda req, i: FakeReply.text("so seven")))
    backend = EmulatedN(fake, max_streams=16)
    problems = [Problem(id=f"p{i}", problem="q", answer="seven") for i in range(20)]
    results = await run_batch(problems, SelfConsistency(8), backend=backend, task=WordTask(),
                              concurrency=16)
    assert all(r.correct for r in results)
    assert len(fake.requests) == 160 and fake.max_open_streams <= 16
    assert backend.slots.peak <= 16


def test_max_streams_is_validated():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            StreamSlots(bad)  # type: ignore[arg-type]


async def test_a_server_that_cuts_streams_is_detected_and_degraded_once():
    """The first stream ends without a finish reason while the second is open: from then
    on one stream at a time; the cut sample is replaced and the problem answered."""
    gate = asyncio.Event()

    def respond(req: GenerationRequest, i: int) -> FakeReply:
        if i == 0:  # cut: ends after one token, no finish reason
            return FakeReply(choices=(("so",),), finish_reason=None, hold=gate, hold_after=1)
        return FakeReply.text("so seven")

    fake = FakeBackend(scripted(respond))
    backend = EmulatedN(fake, max_streams=4)

    async def release() -> None:
        await spin_until(lambda: fake.open_streams >= 2)
        gate.set()

    releaser = asyncio.create_task(release())
    result = await solve(PROBLEM, SelfConsistency(4), backend=backend, task=WordTask())
    await releaser
    assert result.correct is True
    assert len(result.failed) == 1 and "finish_reason" in (result.failed[0].error_text or "")
    stats = backend.stats()
    assert stats["max_streams"] == 1 and stats["cut_streams"] == 1
    assert "ended without a finish reason" in stats["one_stream_at_a_time"]
    # the replacement came after the degrade: never more than one stream open after it
    assert len(fake.requests) == 5


async def test_an_unfinished_stream_alone_is_not_a_cutting_server():
    fake = FakeBackend(scripted([FakeReply(choices=(("so",),), finish_reason=None),
                                 FakeReply.text("so seven")]))
    backend = EmulatedN(fake, max_streams=4)
    result = await solve(PROBLEM, SelfConsistency(1), backend=backend, task=WordTask())
    assert result.correct is True and len(result.failed) == 1
    assert backend.stats()["max_streams"] == 4
    assert backend.stats()["one_stream_at_a_time"] is None


async def test_a_stream_cut_by_its_reader_is_not_a_cutting_server():
    """The runtime's settled cut asks the server to stop (``EventStream.cut``); the stream
    then ends without a finish reason, which must not count as the server cutting it."""
    from contextlib import asynccontextmanager

    from orchestrator.backends.base import EventStream
    from orchestrator.backends.streams import limited_stream

    class Cuttable(Backend):
        @asynccontextmanager
        async def stream(self, request):
            stopped = asyncio.Event()

            async def events() -> AsyncIterator:
                yield TextDelta(choice=0, text="so", tokens=1)
                await stopped.wait()  # the server stops once asked to

            yield EventStream(events(), stopped.set)

        async def aclose(self) -> None:
            pass

    slots = StreamSlots(4)
    backend = Cuttable()
    async with limited_stream(backend, request(1), slots) as first, \
            limited_stream(backend, request(1), slots) as second:
        assert isinstance(first, EventStream) and first.cuttable
        assert (await anext(first)).text == "so"
        first.cut()
        assert [e async for e in first] == []
        second.cut()
        _ = [e async for e in second]
    assert slots.degraded is None and slots.cut_streams == 0 and slots.limit == 4


class _FirstRefused(ScriptedRequests):
    """Request 0 fails before any event, once request 1 has generated 5 tokens; request 1
    hands them over as soon as that failure is being queued (``failing``, set by the test
    just before the failure goes into the merge queue), so its event is queued behind
    the failure before the merger reads the queue: loop order only, no clock."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = asyncio.Event()
        self.started = asyncio.Event()

    async def opening(self, index: int) -> None:
        if index == 0:
            await self.started.wait()
            raise ModelNotFound("replica 0 refuses")

    async def events(self, index: int):
        self.generated += 5
        self.started.set()
        await self.failing.wait()
        yield TextDelta(choice=0, text="a b c d e", tokens=5)
        yield UsageReport(3, 5, final=False)
        await asyncio.Event().wait()  # never ends by itself


async def test_a_choice_failing_on_opening_leaves_what_its_siblings_sent_charged(
        monkeypatch):
    """Choice 0 fails on opening while choice 1 has already handed over tokens: the
    request fails on opening (a failover may send it elsewhere), and choice 1's events,
    queued behind the failure, go to the reader's sink, since the server counts them;
    they used to be dropped (found by review)."""
    from orchestrator.backends import streams
    from orchestrator.backends.base import UNREAD_EVENTS

    backend = _FirstRefused()
    hand = streams._MergeQueue.hand

    async def handing(self, index, item):
        if isinstance(item, BaseException):
            backend.failing.set()  # request 1 wakes before the merger does
        await hand(self, index, item)

    monkeypatch.setattr(streams._MergeQueue, "hand", handing)
    sink: list = []
    token = UNREAD_EVENTS.set(sink)
    try:
        with pytest.raises(ModelNotFound):
            async with EmulatedN(backend).stream(GenerationRequest(
                    kind="solve", max_tokens=8, prompt="p", n=2)):
                pass
    finally:
        UNREAD_EVENTS.reset(token)
    assert backend.generated == 5
    assert [e.tokens for e in sink if isinstance(e, TextDelta)] == [5]
    assert [e.completion_tokens for e in sink if isinstance(e, UsageReport)][-1] == 5
