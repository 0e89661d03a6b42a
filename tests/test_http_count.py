"""The ledger's HTTP-request count and backend-side estimates (``UsageReport.estimated_from``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orchestrator.backends.base import (
    Backend,
    Capabilities,
    GenerationRequest,
    StreamEvent,
    TextDelta,
    UsageReport,
    count_http_request,
)
from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.runtime import solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import WordTask
from tests.openai_server import OpenAIServer

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


async def test_requests_answered_or_refused_are_not_abandoned():
    """A status error is the server's answer (it generated nothing for it), and a
    stream that got its first token is not abandoned: neither counts."""
    async with OpenAIServer() as server:
        server.fail_next(1, 503)
        backend = OpenAIBackend(server.url, "test-model", max_attempts=2,
                                capabilities=Capabilities())
        try:
            result = await solve(Problem(id="p", problem="q"), SelfConsistency(2),
                                 backend=backend, task=WordTask(), max_n=1)
        finally:
            await backend.aclose()
    assert result.ok and result.http_requests == 3
    assert result.abandoned_http_requests == 0


def test_the_run_summary_says_when_token_counts_are_a_lower_bound(tmp_path):
    import io

    from orchestrator.cli import print_summary
    from orchestrator.result import RunSummary

    def printed(abandoned: int) -> str:
        summary = RunSummary().as_dict(1.0) | {"abandoned_http_requests": abandoned}
        buf = io.StringIO()
        print_summary(summary, "sc:n=2", tmp_path / "o.jsonl", file=buf)
        return buf.getvalue()

    assert "lower bound" not in printed(0)
    assert "3 HTTP requests given up before a first token" in printed(3)
    assert "lower bound" in printed(3)
