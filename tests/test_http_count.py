"""The ledger's HTTP-request count and backend-side estimates (``UsageReport.estimated_from``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orchestrator.backends.base import (
    Backend,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
    count_http_request,
)
from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.runtime import solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import WordTask

PROBLEM = Problem(id="p1", problem="q", answer="seven")


class Posting(Backend):
    """A backend that says it sent ``posts`` HTTP requests per stream, and reports its
    usage as an estimate made from the message text."""

    def __init__(self, posts: int) -> None:
        self.posts = posts

    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        count_http_request(self.posts)

        async def events() -> AsyncIterator[StreamEvent]:
            for i in range(request.n):
                yield TextDelta(choice=i, text="so seven", tokens=2, finish_reason="stop")
            yield UsageReport(5, 2 * request.n, final=True, estimated_from=("tokenize-text",))

        yield events()

    async def aclose(self) -> None:
        pass


async def test_http_requests_are_counted_per_logical_request():
    result = await solve(PROBLEM, SelfConsistency(6), backend=Posting(3), task=WordTask(),
                         max_n=2)
    assert result.requests == 3
    assert result.http_requests == 9
    assert result.to_dict()["http_requests"] == 9
    # the backend's own estimate is visible, with its reason
    assert result.usage.estimated and result.usage.estimated_from == ("tokenize-text",)
    assert result.usage.prompt_tokens == 15 and result.usage.completion_tokens == 12


async def test_backends_without_http_count_none():
    backend = FakeBackend(scripted(lambda req, i: FakeReply.text("so seven")))
    result = await solve(PROBLEM, SelfConsistency(2), backend=backend, task=WordTask())
    assert result.requests == 1 and result.http_requests == 0
    assert not result.usage.estimated
