"""Events reach sinks; the JSONL trace and the structlog bridge record them faithfully."""

import io
import json

import structlog
from structlog.testing import capture_logs

from orchestrator.backends.fake import FakeBackend, FakeReply, scripted
from orchestrator.events import JsonlTraceSink, ProblemStarted, StructlogSink
from orchestrator.runtime import solve
from orchestrator.types import Problem
from policies import SelfConsistency
from tests.helpers import WordTask

PROBLEM = Problem(id="p", problem="q", answer="b")


async def test_jsonl_trace_has_every_step(tmp_path):
    path = tmp_path / "new" / "trace.jsonl"  # a missing folder is created, as for --out
    backend = FakeBackend(scripted([FakeReply.text("a b", "x b", "a c")]))
    with JsonlTraceSink(path) as sink:
        result = await solve(PROBLEM, SelfConsistency(3), backend=backend, task=WordTask(),
                             sinks=[sink])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    names = [r["event"] for r in rows]
    assert names[0] == "ProblemStarted" and names[-1] == "ProblemDone"
    assert names.count("SampleFinished") == 3
    assert names.count("RequestStarted") == names.count("RequestFinished") == 1
    done = rows[-1]
    assert done["answer"] == "b" and done["correct"] is True
    assert done["usage"]["completion_tokens"] == result.usage.completion_tokens
    decision = next(r for r in rows if r["event"] == "DecisionMade")
    assert decision["decisions"] == [{"type": "Sample", "k": 3}]


async def test_trace_sink_accepts_an_open_stream():
    buf = io.StringIO()
    sink = JsonlTraceSink(buf)
    backend = FakeBackend(scripted([FakeReply.text("b")]))
    await solve(PROBLEM, SelfConsistency(1), backend=backend, task=WordTask(), sinks=[sink])
    sink.close()  # not ours to close
    assert not buf.closed and buf.getvalue().count("\n") >= 5


async def test_structlog_bridge_never_configures_and_logs_outcomes():
    before = structlog.get_config()
    backend = FakeBackend(scripted([FakeReply.text("b")]))
    with capture_logs() as logs:
        await solve(PROBLEM, SelfConsistency(1), backend=backend, task=WordTask(),
                    sinks=[StructlogSink()])
    events = [e["event"] for e in logs]
    assert "ProblemDone" in events and "SampleFinished" in events
    done = next(e for e in logs if e["event"] == "ProblemDone")
    assert done["log_level"] == "info" and done["answer"] == "b"
    assert structlog.get_config() == before


async def test_a_failed_sample_keeps_its_exception_and_the_trace_writes_it_as_text(tmp_path):
    """The stream's exception object stays on the FailedSample (isinstance works, no
    matching of class names in strings); results and traces write it as text."""
    from orchestrator.errors import StreamBroken

    path = tmp_path / "trace.jsonl"
    backend = FakeBackend(scripted([FakeReply.text("a b c d", fail_after=2),
                                    FakeReply.text("a b", "x b")]))
    with JsonlTraceSink(path) as sink:
        result = await solve(PROBLEM, SelfConsistency(2), backend=backend, task=WordTask(),
                             sinks=[sink])
    failed = [f for f in result.failed if f.reason == "failed"]
    assert failed and all(isinstance(f.error, StreamBroken) for f in failed)
    broken = failed[0]
    assert broken.error_text == f"StreamBroken: {broken.error}"
    assert result.to_dict()["failed"][0]["error"] == broken.error_text
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    failed_rows = [r for r in rows if r["event"] == "SampleFailed"]
    assert [r["sample"]["error"] for r in failed_rows] == [f.error_text for f in failed]
    assert all("error_text" not in r["sample"] for r in failed_rows)


def test_a_trace_file_and_its_folders_appear_with_the_first_event(tmp_path):
    """Like --out: a run that fails before any event (an unreachable endpoint) leaves no
    trace file and no folder behind (found by review: the sink made both at once)."""
    path = tmp_path / "new" / "trace.jsonl"
    with JsonlTraceSink(path):
        pass
    assert not path.parent.exists()
    with JsonlTraceSink(path) as sink:
        sink(ProblemStarted(problem_id="p", t=0.0, policy="sc:n=1"))
    assert len(path.read_text().splitlines()) == 1
