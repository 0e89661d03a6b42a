"""Malformed stream data, clear errors for wrong endpoints, secrets, and results files."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from orchestrator import cli
from orchestrator.backends.base import Capabilities, GenerationRequest, TextDelta
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.errors import ConfigError, DataError, RequestRejected, StreamBroken
from orchestrator.redact import redact_secrets, redact_text, redact_url
from orchestrator.results_io import open_results, read_results, sidecar_path
from tests.helpers import sse_chunk, sse_server
from tests.openai_server import OpenAIServer, serve_handler


@pytest.fixture(autouse=True)
def _structlog_reset():
    """``cli.main`` configures structlog to print to the ``sys.stderr`` of its moment,
    capsys's capture here, which is closed after the test: later tests would log to a
    closed file."""
    yield
    structlog.reset_defaults()


def chat(**kw: Any) -> GenerationRequest:
    kw.setdefault("max_tokens", 64)
    return GenerationRequest(kind="solve", messages=({"role": "user", "content": "q"},), **kw)


def backend_for(server: OpenAIServer, **kw: Any) -> OpenAIBackend:
    kw.setdefault("capabilities", Capabilities())
    return OpenAIBackend(server.url, "test-model", backoff_base=0.001, backoff_cap=0.01, **kw)


async def read_all(backend: OpenAIBackend, request: GenerationRequest):
    events: list = []
    error = None
    try:
        async with backend.stream(request) as stream:
            async for event in stream:
                events.append(event)
    except StreamBroken as exc:
        error = exc
    return events, error


# ---- malformed stream data ---------------------------------------------------------------
@pytest.mark.parametrize("at", [0, 1, 4, 8])
async def test_malformed_data_is_a_broken_stream_charged_to_the_end(at: int) -> None:
    """A bad line anywhere (here: before event ``at``; chat's event 0 is the role chunk,
    1-7 the tokens, 8 the usage): the stream is read on, every token the server streamed
    is charged, the text is not trusted (no finish), and it is not retried once a token
    had come."""
    async with OpenAIServer() as server:
        server.garble_next(at)
        async with backend_for(server) as backend:
            events, error = await read_all(backend, chat())
        assert error is not None and "malformed data" in str(error)
        assert len(server.generation_requests()) == 1  # tokens came: no retry
        usage = [e for e in events if not isinstance(e, TextDelta)]
        assert usage[-1].completion_tokens == 7 == server.generation_tokens_total
        finished = any(e.finish_reason for e in events if isinstance(e, TextDelta))
        assert finished == (at == 8)  # text after the bad line is not trusted


async def test_an_undecodable_chunk_mid_stream_is_a_broken_stream_charged_to_the_end() -> None:
    # valid JSON the decoder cannot read ("choices": 5) after the first tokens: it was a
    # TypeError out of the backend (not a BackendError); now it is malformed data
    async with OpenAIServer() as server:
        server.garble_next(3, line='data: {"choices": 5}')
        async with backend_for(server) as backend:
            events, error = await read_all(backend, chat())
        assert error is not None and "undecodable chunk" in str(error)
        usage = [e for e in events if not isinstance(e, TextDelta)]
        assert usage[-1].completion_tokens == 7 == server.generation_tokens_total


async def test_malformed_data_before_any_token_is_retried() -> None:
    async with OpenAIServer() as server:
        server.garble_next(0)
        server.drop_after(0)  # the same stream then ends before its first token
        async with backend_for(server, capabilities=Capabilities(stream_usage=False,
                                                                 continuous_usage=False)
                               ) as backend:
            events, error = await read_all(backend, chat())
        assert error is None
        assert "".join(e.text for e in events if isinstance(e, TextDelta)).endswith("{42}.")
        assert len(server.generation_requests()) == 2


@pytest.mark.parametrize("error", [
    {"message": "the engine is overloaded", "type": "ServiceUnavailableError", "code": 503},
    {"message": "slow down", "code": "429"},
    {"message": "Rate limit reached", "type": "rate_limit_exceeded"},
])
async def test_an_error_in_the_stream_that_a_retry_can_fix_is_retried(error) -> None:
    # vLLM sends {"error": {..., "code": <status>}} inside a stream that had started;
    # before any token, a busy or rate-limited server is worth asking again (found by review)
    async with OpenAIServer() as server:
        server.garble_next(0, line="data: " + json.dumps({"error": error}))
        async with backend_for(server) as backend:
            events, stream_error = await read_all(backend, chat())
        assert stream_error is None
        assert "".join(e.text for e in events if isinstance(e, TextDelta)).endswith("{42}.")
        assert len(server.generation_requests()) == 2


async def test_an_error_in_the_stream_that_stays_is_retried_until_giving_up() -> None:
    from orchestrator.errors import RetriesExhausted

    async with OpenAIServer() as server:
        server.garble_next(0, requests=10, line="data: " + json.dumps(
            {"error": {"message": "the engine is overloaded", "code": 503}}))
        async with backend_for(server, max_attempts=3) as backend:
            with pytest.raises(RetriesExhausted, match=r"3 attempt.*503.*overloaded"):
                await read_all(backend, chat())
        assert len(server.generation_requests()) == 3


async def test_a_retryable_error_after_the_first_token_breaks_the_stream() -> None:
    # text has been handed on: asking again would start a different sample
    async with OpenAIServer() as server:
        server.garble_next(2, line="data: " + json.dumps(
            {"error": {"message": "the engine is overloaded", "code": 503}}))
        async with backend_for(server) as backend:
            events, stream_error = await read_all(backend, chat())
        assert isinstance(stream_error, StreamBroken)
        assert "overloaded" in str(stream_error)
        assert any(isinstance(e, TextDelta) and e.text for e in events)
        assert len(server.generation_requests()) == 1


async def test_an_error_in_the_stream_that_a_retry_cannot_fix_is_not_retried() -> None:
    async with OpenAIServer() as server:
        server.garble_next(0, line="data: " + json.dumps(
            {"error": {"message": "prompt too long", "type": "BadRequestError", "code": 400}}))
        async with backend_for(server) as backend:
            with pytest.raises(RequestRejected, match="sent an error in its stream: prompt"):
                await read_all(backend, chat())
        assert len(server.generation_requests()) == 1


@pytest.mark.parametrize("code", ["\u00b2", "\u0663", " 5\u00b903", True, 503.0, "5e2", None,
                                  "9" * 5000, "0503"])
async def test_an_in_stream_error_with_an_odd_code_is_a_plain_rejection(code) -> None:
    # "\u00b2".isdigit() is True but int() refuses it: the ValueError escaped the chunk
    # parser and the sample failed as "ValueError" (found by review). A code that is
    # not a plain number or a known type is a rejection, not retried.
    async with OpenAIServer() as server:
        server.garble_next(0, line="data: " + json.dumps(
            {"error": {"message": "odd code", "code": code}}))
        async with backend_for(server) as backend:
            with pytest.raises(RequestRejected, match="sent an error in its stream: odd code"):
                await read_all(backend, chat())
        assert len(server.generation_requests()) == 1


async def test_a_malformed_first_chunk_is_a_replaceable_sample() -> None:
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from policies import SelfConsistency
    from tests.helpers import WordTask

    async with OpenAIServer() as server:
        server.garble_next(0)
        async with backend_for(server) as backend:
            result = await solve(Problem(id="p", problem="q"), SelfConsistency(2),
                                 backend=backend, task=WordTask(), max_n=1)
    assert result.error is None and len(result.solutions) == 2
    assert [f.reason for f in result.failed] == ["failed"]
    assert "malformed" in (result.failed[0].error_text or "")
    assert result.usage.completion_tokens == server.generation_tokens_total == 3 * 7


async def test_without_server_usage_the_count_says_it_is_estimated_and_from_what() -> None:
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from policies import SelfConsistency
    from tests.helpers import WordTask

    async with OpenAIServer(reject_stream_options=True) as server:
        async with backend_for(server, capabilities=Capabilities(stream_usage=False,
                                                                 continuous_usage=False)
                               ) as backend:
            result = await solve(Problem(id="p", problem="q"), SelfConsistency(1),
                                 backend=backend, task=WordTask(), max_n=1)
    assert result.usage.estimated and result.usage.completion_tokens == 7
    # and the prompt's size is unknown (charged as 0): said too, never silently 0
    assert result.to_dict()["tokens_estimated_from"] == ["chunks", "prompt"]


# ---- endpoints that are not what they seem -----------------------------------------------
@pytest.mark.parametrize(("body", "kind"), [
    ("<html><body>Welcome to nginx</body></html>", "text/html"),
    ('data: {"id": 1}\n\n', "text/event-stream"),
])
async def test_a_models_reply_that_is_not_json_is_a_clear_error(body: str, kind: str) -> None:
    async def handler(request):
        return web.Response(text=body, content_type=kind)

    runner, root = await serve_handler(handler)
    try:
        async with OpenAIBackend(root + "/v1", "m") as backend:
            with pytest.raises(RequestRejected, match=rf"answered 200 with {kind}.*not JSON.*"
                                                      "does not look like an OpenAI"):
                await backend.list_models()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("body", "kind"), [
    ("<html><body>Welcome to nginx</body></html>", "text/html"),
    ('{"choices": [{"index": 0, "message": {"content": "4"}}], "usage": '
     '{"prompt_tokens": 3, "completion_tokens": 5}}', "application/json"),
])
async def test_a_stream_reply_that_is_not_an_event_stream_is_a_clear_error(
        body: str, kind: str) -> None:
    """A page, or a server that ignores stream=true: it read as an empty stream ("ended
    without a finish_reason", nothing charged; found by review)."""
    async def handler(request):
        return web.Response(text=body, content_type=kind)

    runner, root = await serve_handler(handler)
    try:
        async with OpenAIBackend(root + "/v1", "m", capabilities=Capabilities()) as backend:
            with pytest.raises(RequestRejected, match=rf"with {kind}.*, not an event stream"):
                async with backend.stream(chat()) as events:
                    _ = [e async for e in events]
    finally:
        await runner.cleanup()


async def test_a_base_url_without_v1_gets_a_hint() -> None:
    async with OpenAIServer() as server:
        root = f"http://127.0.0.1:{server.port}"
        async with OpenAIBackend(root, "test-model") as backend:
            with pytest.raises(RequestRejected, match=r"404.*does not end in /v1.*"
                                                      rf"try --base-url {root}/v1"):
                await backend.list_models()


# ---- secrets -----------------------------------------------------------------------------
CANARY_USER = "canaryuser7"
CANARY_PASS = "canary-pass-d41d8cd9"
CANARY_KEY = "sk-canary-key-0f1e2d3c"


def test_redaction_of_urls_headers_and_registered_values() -> None:
    url = f"http://{CANARY_USER}:{CANARY_PASS}@127.0.0.1:8000/v1"
    assert redact_url(url) == "http://***@127.0.0.1:8000/v1"
    text = (f"GET {url} failed; headers {{'Authorization': 'Bearer {CANARY_KEY}'}} "
            f"authorization: Basic dXNlcjpwYXNz and key={CANARY_KEY}")
    clean = redact_text(text, [CANARY_KEY])
    for secret in (CANARY_USER, CANARY_PASS, CANARY_KEY, "dXNlcjpwYXNz"):
        assert secret not in clean
    assert "127.0.0.1:8000/v1" in clean


def test_no_secret_reaches_output_logs_trace_or_results(tmp_path, monkeypatch, capsys) -> None:
    """Userinfo in the base URL and a key from --api-key-env, with debug logs, a trace,
    retries (injected 503s) and a failing endpoint: the canaries appear nowhere."""
    import asyncio
    import threading

    from tests.fault_proxy import FaultProxy

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    server = OpenAIServer(models=None)
    call(server.start())
    proxy = FaultProxy(f"http://127.0.0.1:{server.port}", rate=0.5, seed=1,
                       kinds=("503", "429", "cut"))
    call(proxy.start())
    try:
        monkeypatch.setenv("SOLVERIFY_LOG", "debug")
        monkeypatch.setenv("CANARY_KEY_ENV", CANARY_KEY)
        problems = tmp_path / "p.jsonl"
        problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"{i}?"}) + "\n"
                                    for i in range(4)))
        url = f"http://{CANARY_USER}:{CANARY_PASS}@127.0.0.1:{proxy.port}/v1"
        out, trace = tmp_path / "o.jsonl", tmp_path / "t.jsonl"
        rc = cli.main(["run", "--base-url", url, "--model", "test-model", "--problems",
                       str(problems), "--policy", "sc:n=3", "--out", str(out), "--trace",
                       str(trace), "--api-key-env", "CANARY_KEY_ENV", "--no-progress",
                       "--max-tokens", "16"])
        first = capsys.readouterr()
        dead = f"http://{CANARY_USER}:{CANARY_PASS}@127.0.0.1:9/v1"
        rc_dead = cli.main(["run", "--base-url", dead, "--model", "m", "--problems",
                            str(problems), "--policy", "sc:n=1", "--out",
                            str(tmp_path / "o2.jsonl"), "--no-progress", "--timeout", "2"])
        second = capsys.readouterr()
    finally:
        structlog.reset_defaults()
        call(proxy.stop())
        call(server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert rc in (0, 1) and rc_dead == 2
    assert "backend.retry" in first.err  # the retry logs were printed, redacted
    assert "cannot reach http://***@127.0.0.1:9/v1" in second.err
    everything = "\n".join([first.out, first.err, second.out, second.err,
                            out.read_text(), trace.read_text()])
    for secret in (CANARY_USER, CANARY_PASS, CANARY_KEY):
        assert secret not in everything


@contextlib.contextmanager
def served(responder):
    """The test server on an event loop of its own thread, for ``cli.main`` (which runs
    its own loop) in this process; yields its base URL."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    server = OpenAIServer(responder, models=("test-model",))
    call(server.start())
    try:
        yield f"http://127.0.0.1:{server.port}/v1"
    finally:
        structlog.reset_defaults()
        call(server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_results_keep_model_text_that_looks_like_a_credential(tmp_path, monkeypatch,
                                                             capsys) -> None:
    """Result lines hold model output: only registered secret values are masked there.
    The credential patterns used for logs and errors ("Basic <word>", "Bearer <word>")
    rewrote the recorded texts and even the answer (found by review: ``Basic 1200`` in
    memory, ``Basic ***`` in the file)."""
    reply = [" By", " basic", " counting", " the", " bearer", " bonds", " give",
             " \\boxed{", "Basic 1200", "}."]
    with served(lambda body: [reply] * int(body.get("n") or 1)) as url:
        monkeypatch.setenv("CANARY_KEY_ENV", CANARY_KEY)
        problems = tmp_path / "p.jsonl"
        problems.write_text(json.dumps({"id": "q", "problem": "600 * 2?",
                                        "answer": "Basic 1200"}) + "\n")
        out = tmp_path / "o.jsonl"
        rc = cli.main(["run", "--base-url", url, "--model", "test-model", "--problems",
                       str(problems), "--policy", "sc:n=2", "--out", str(out), "--texts",
                       "--api-key-env", "CANARY_KEY_ENV", "--no-progress",
                       "--max-tokens", "16"])
        capsys.readouterr()
    assert rc == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["answer"] == "Basic 1200" and row["correct"] is True
    assert [s["text"] for s in row["solutions"]] == ["".join(reply)] * 2
    assert redact_secrets(f"key {CANARY_KEY}.") == "key ***."  # registered by the run


# ---- results files -----------------------------------------------------------------------
FP = {"model": "m", "policy": "sc:n=2", "problems_sha256": "abc"}


def test_a_non_empty_out_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError, match=r"pass --resume to continue .* or --overwrite"):
        open_results(out, FP, resume=False, overwrite=False)
    done, writer = open_results(out, FP, resume=False, overwrite=True)
    writer.close()  # nothing written: the old results stay (a run that could not start)
    assert done.ids == set() and out.read_text() == '{"id": "a"}\n'
    assert not sidecar_path(out).exists()
    done, writer = open_results(out, FP, resume=False, overwrite=True)
    assert out.read_text() == '{"id": "a"}\n'
    writer.write({"id": "b"})  # the first result replaces them
    writer.close()
    assert out.read_text() == '{"id": "b"}\n' and sidecar_path(out).exists()


def test_the_resume_fingerprint_of_a_verifying_run_names_its_verifier(tmp_path: Path) -> None:
    """A resumed GenRM file must not mix two verifiers or two prompts: the verifier's
    model, the verification requests' max tokens and temperature and the prompt are in
    the fingerprint (they were not; found by review); a policy that does not verify keeps
    the fingerprint it had, so its files written before still resume."""
    from orchestrator.cli import build_parser, run_fingerprint
    from orchestrator.cliargs import make_task
    from orchestrator.problems import load_problems
    from orchestrator.types import Budget
    from policies import parse_policy

    (tmp_path / "p.jsonl").write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n')
    (tmp_path / "v.txt").write_text("{problem} {solution} Is the answer correct (Yes/No)?")

    def fingerprint(policy: str, *extra: str) -> dict:
        args = build_parser().parse_args(
            ["run", "--base-url", "http://x/v1", "--model", "m", "--problems",
             str(tmp_path / "p.jsonl"), "--policy", policy, "--out", str(tmp_path / "o.jsonl"),
             *extra])
        task = make_task(load_problems(args.problems), args)
        return run_fingerprint(args, parse_policy(args.policy), task,
                               Budget(args.budget_tokens, args.budget_requests))

    ref = fingerprint("genrm:s=4,v=2")
    assert ref["verifier_model"] == "m" and ref["verify_prompt_sha256"] is None
    for extra, key in ((["--verifier-model", "judge"], "verifier_model"),
                       (["--verify-max-tokens", "8"], "verify_max_tokens"),
                       (["--verify-temperature", "0"], "verify_temperature"),
                       (["--verify-prompt", str(tmp_path / "v.txt")], "verify_prompt_sha256")):
        other = fingerprint("genrm:s=4,v=2", *extra)
        assert [k for k in ref if ref[k] != other[k]] == [key], extra
    plain = fingerprint("sc:n=4")
    assert not any(k.startswith("verif") for k in plain)
    assert plain == fingerprint("sc:n=4", "--verifier-model", "judge")


def test_a_secret_that_looks_like_a_number_or_a_key_leaves_the_row_whole(
        tmp_path: Path) -> None:
    """Secrets are scrubbed from a row's string values, not from its JSON line: a password
    "2048" used to turn ``"completion_tokens": 2048`` into ``***``, so the file no longer
    parsed and resume failed on it, or dropped it as a torn last line (found by review).
    The id is kept as it is, so resume still knows the problem."""
    from orchestrator.redact import redact_secrets
    from orchestrator.results_io import read_results

    out = tmp_path / "o.jsonl"
    redact = lambda text: redact_secrets(text, ["2048", "true", "correct", "p-77"])  # noqa: E731
    _, writer = open_results(out, FP, resume=False, overwrite=False)
    writer.write({"id": "p-77", "completion_tokens": 2048, "correct": True,
                  "solutions": [{"text": "it is 2048, true", "answer": "2048"}]},
                 redact=redact)
    writer.close()
    rows = read_results(out).rows
    assert rows == [{"id": "p-77", "completion_tokens": 2048, "correct": True,
                     "solutions": [{"text": "it is ***, ***", "answer": "***"}]}]


def test_out_that_is_a_directory_is_named_as_such(tmp_path: Path) -> None:
    for flags in ({"resume": False, "overwrite": False}, {"resume": False, "overwrite": True},
                  {"resume": True, "overwrite": False}):
        with pytest.raises(ConfigError, match=r"is a directory: give the path of a results"):
            open_results(tmp_path, FP, **flags)


def test_a_fresh_results_file_appears_with_its_first_result(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "o.jsonl"
    _, writer = open_results(out, FP, resume=False, overwrite=False)
    writer.close()
    # nor its folder: a run that fails before its first result leaves nothing behind
    assert not out.parent.exists() and not sidecar_path(out).exists()
    _, writer = open_results(out, FP, resume=False, overwrite=False)
    writer.write({"id": "a"})
    writer.close()
    assert out.read_text() == '{"id": "a"}\n' and sidecar_path(out).exists()
    with pytest.raises(ValueError, match="closed"):
        writer.write({"id": "b"})


def test_resume_takes_out_the_rows_to_run_again_at_the_first_write(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    _, writer = open_results(out, FP, resume=False, overwrite=False)
    for pid, code in (("a", "max"), ("b", "failures"), ("c", "settled"), ("d", "error")):
        writer.write({"id": pid, "stop_code": code, "text": "é"})
    writer.close()
    before = out.read_bytes()

    def bad(row):
        return row["stop_code"] in ("failures", "error")

    done, writer = open_results(out, FP, resume=True, overwrite=False, redo=bad)
    assert done.ids == {"a", "c"} and done.redo == ["b", "d"]
    assert [r["id"] for r in done.rows] == ["a", "c"]
    writer.close()  # nothing run (say the endpoint was down): the file is as it was
    assert out.read_bytes() == before
    done, writer = open_results(out, FP, resume=True, overwrite=False, redo=bad)
    writer.write({"id": "b", "stop_code": "max"})
    writer.close()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "c", "b"]
    assert lines[:2] == before.decode().splitlines()[::2]  # kept rows byte for byte
    assert read_results(out).ids == {"a", "b", "c"}  # d runs again next time


def test_resume_drops_a_torn_last_line_and_refuses_another_run(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    _, writer = open_results(out, FP, resume=False, overwrite=False)
    writer.write({"id": "a", "x": 1})
    writer.write({"id": "b", "x": 2})
    with pytest.raises(RuntimeError, match="twice"):
        writer.write({"id": "a"})
    writer.close()
    with out.open("ab") as fh:
        fh.write(b'{"id": "c", "x"')
    warnings: list[str] = []
    done, writer = open_results(out, FP, resume=True, overwrite=False, warn=warnings.append)
    writer.write({"id": "c", "x": 3})
    writer.close()
    assert done.ids == {"a", "b"} and "torn last line" in warnings[0]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]
    other = {**FP, "model": "other"}
    with pytest.raises(ConfigError, match="model was 'm', now 'other'"):
        open_results(out, other, resume=True, overwrite=False)
    sidecar_path(out).unlink()
    with pytest.raises(ConfigError, match="fingerprint"):
        open_results(out, FP, resume=True, overwrite=False)


def test_resume_runs_again_the_problems_that_ended_on_an_error(tmp_path, capsys) -> None:
    """An outage for one problem: the run exits 1 with its row in --out; ``--resume`` on a
    healthy server reruns it and replaces its row (it used to skip it: exit 1 for ever,
    found by review); a third ``--resume`` has nothing to run."""
    healthy = False

    def responder(body):
        if not healthy and "PROBLEM-B" in json.dumps(body):
            raise RuntimeError("outage")  # HTTP 500 for problem b only
        return [[" so", " \\boxed{4}"]] * int(body.get("n") or 1)

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"id": pid, "problem": f"PROBLEM-{pid.upper()}",
                                            "answer": "4"}) + "\n" for pid in "abc"))
    out = tmp_path / "o.jsonl"
    argv = ["run", "--model", "test-model", "--problems", str(problems), "--policy", "sc:n=2",
            "--out", str(out), "--no-progress", "--concurrency", "1", "--max-tokens", "8"]

    def rows():
        return [(r["id"], r["stop_code"]) for r in map(json.loads, out.read_text().splitlines())]

    with served(responder) as url:
        argv += ["--base-url", url]
        assert cli.main(argv) == 1
        first = capsys.readouterr()
        assert rows() == [("a", "max"), ("b", "failures"), ("c", "max")], first.err
        healthy = True
        assert cli.main([*argv, "--resume"]) == 0
        second = capsys.readouterr()
        assert "1 problem(s) ended on an error" in second.err and "'b'" in second.err
        assert rows() == [("a", "max"), ("c", "max"), ("b", "max")]
        assert cli.main([*argv, "--resume"]) == 0
        assert "nothing to run" in capsys.readouterr().err


def test_overwrite_against_an_unreachable_endpoint_keeps_the_old_results(tmp_path,
                                                                          capsys) -> None:
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "a", "problem": "2+2?", "answer": "4"}) + "\n")
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a", "correct": true}\n')
    rc = cli.main(["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                   "--problems", str(problems), "--policy", "sc:n=1", "--out", str(out),
                   "--overwrite", "--no-progress", "--timeout", "2"])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err
    assert out.read_text() == '{"id": "a", "correct": true}\n'
    fresh = tmp_path / "fresh.jsonl"
    rc = cli.main(["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                   "--problems", str(problems), "--policy", "sc:n=1", "--out", str(fresh),
                   "--no-progress", "--timeout", "2"])
    assert rc == 2 and not fresh.exists() and not sidecar_path(fresh).exists()


@pytest.mark.parametrize("spec", ["adaptive", "sc:n=16"])
async def test_samples_that_all_failed_are_an_error_even_when_the_budget_stops_it(
        spec: str) -> None:
    """Every stream breaks after 3 tokens and the token budget runs out before
    ``max_failures``: the stop code is ``budget`` and there is no answer; that used to
    count as a normal stop (exit 0, not run again on resume; found by review)."""
    from orchestrator.backends.fake import FakeBackend, FakeReply
    from orchestrator.result import ended_on_error
    from orchestrator.runtime import solve
    from orchestrator.types import Budget, Problem
    from policies import parse_policy
    from tests.helpers import WordTask

    backend = FakeBackend(lambda req, i: FakeReply.text("a b c d e seven", fail_after=3))
    res = await solve(Problem(id="p", problem="q", answer="seven"), parse_policy(spec),
                      Budget(tokens=40), backend, task=WordTask(max_tokens=8), max_n=1)
    assert res.stop_code == "budget" and res.answer is None and not res.solutions
    assert any(f.reason == "failed" for f in res.failed)
    assert ended_on_error(res.to_dict())
    # one finished sample is enough for the problem not to count as an error
    fine = FakeBackend(lambda req, i: FakeReply.text("a b c d e seven",
                                                     fail_after=3 if i else None))
    res = await solve(Problem(id="p", problem="q", answer="seven"), parse_policy(spec),
                      Budget(tokens=40), fine, task=WordTask(max_tokens=8), max_n=1)
    assert res.solutions and any(f.reason == "failed" for f in res.failed)
    assert not ended_on_error(res.to_dict())


async def test_a_verifier_that_never_answers_is_an_error_not_a_normal_stop() -> None:
    """Every verification request fails: GenRM falls back to the vote and stops normally
    (``max``), so the run used to exit 0 with no verifier at all (found by review). One
    verification that finishes is enough for the problem not to count as an error."""
    from orchestrator.backends.fake import FakeBackend, FakeReply
    from orchestrator.errors import RetriesExhausted
    from orchestrator.result import ended_on_error
    from orchestrator.runtime import solve
    from orchestrator.types import Problem
    from policies import parse_policy

    def backend(verify_ok: int) -> FakeBackend:
        seen = [0]

        def respond(req, i):
            if req.kind == "verify":
                seen[0] += 1
                if seen[0] > verify_ok:
                    return FakeReply(choices=(("x",),), fail_after=0,
                                     error=RetriesExhausted("503, 4 attempts"))
                return FakeReply.text("Yes")
            return FakeReply.text("\\boxed{4}")
        return FakeBackend(respond)

    problem = Problem(id="p", problem="2+2?", answer="4")
    down = await solve(problem, parse_policy("genrm:s=2,v=1"), backend=backend(0))
    assert down.stop_code == "max" and "fell back to vote" in down.reason
    assert ended_on_error(down.to_dict())
    some = await solve(problem, parse_policy("genrm:s=2,v=1"), backend=backend(1))
    assert len(some.verifications) == 1 and not ended_on_error(some.to_dict())
    plain = await solve(problem, parse_policy("sc:n=2"), backend=backend(0))
    assert not ended_on_error(plain.to_dict())


def test_a_bad_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"o.jsonl:2: not a results line"):
        read_results(out)
    out.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match="appears twice"):
        read_results(out)


async def test_the_probe_reports_the_tokens_it_cost() -> None:
    async with OpenAIServer() as server, OpenAIBackend(server.url, "test-model") as backend:
        await backend.probe("chat")
        assert backend.probe_completion_tokens == server.generation_tokens_total > 0


async def test_a_probe_attempt_that_cannot_be_counted_is_still_asked_again() -> None:
    # a chunk the decoder cannot read ("choices": 5), then a 503: counting the abandoned
    # attempt raised TypeError in its ``finally``, which replaced the 503, so the probe
    # failed instead of asking again (found by review)
    async with OpenAIServer() as server, OpenAIBackend(
            server.url, "test-model", backoff_base=0.001, backoff_cap=0.01) as backend:
        server.garble_next(3, line='data: {"choices": 5}\n\ndata: ' + json.dumps(
            {"error": {"message": "the engine is overloaded", "code": 503}}))
        caps = await backend.probe("chat")
        assert caps.n and len(server.generation_requests()) == 3
        # all the server made, less choice 1's token in the first attempt (made, not sent)
        assert backend.probe_completion_tokens == server.generation_tokens_total - 1


@pytest.mark.parametrize(("at", "unsent"), [(3, 1), (4, 0)])
async def test_a_probe_asked_again_after_a_busy_error_reports_both_attempts(at, unsent) -> None:
    # the first probe stream (n=2, one token each) is events 0-1 the role chunks, 2-3 the
    # tokens, 4 the closing usage. A 503 in it after a token is retried; the abandoned
    # attempt's tokens were left out of the probe's cost (found by review). Before event
    # 3 the server has made choice 1's token but not sent it: that one is not seen.
    async with OpenAIServer() as server, OpenAIBackend(
            server.url, "test-model", backoff_base=0.001, backoff_cap=0.01) as backend:
        server.garble_next(at, line="data: " + json.dumps(
            {"error": {"message": "the engine is overloaded", "code": 503}}))
        await backend.probe("chat")
        assert len(server.generation_requests()) == 3 == backend.probe_requests  # a retry
        assert backend.probe_completion_tokens == server.generation_tokens_total - unsent


_NO_CAPS = Capabilities(n=False, continuous_usage=False, logprobs=False)


async def _solve_written(write: Any, problem: Any, policy: Any) -> Any:
    """``solve`` one problem against a server whose streams ``write`` sends."""
    from orchestrator.runtime import solve

    async with sse_server(write) as url, OpenAIBackend(
            url, "m", capabilities=_NO_CAPS, count_with_tokenizer=False) as backend:
        return await solve(problem, policy, backend=backend, max_n=1)


@pytest.mark.parametrize("reason", ["abort", "error"])
async def test_a_choice_the_server_gives_up_is_a_failed_sample_not_a_solution(reason) -> None:
    """``finish_reason`` ``abort`` (vLLM) or ``error`` (OpenRouter) ends a choice the
    server gave up: its text is cut short. It was taken as a finished solution, so an
    interim ``\\boxed{7}`` in it voted (3 of 3, nothing failed; found by review). Now it is
    a failed sample, its tokens charged, and the policy samples a replacement."""
    from orchestrator.types import Problem
    from policies import SelfConsistency

    served = 0

    async def write(resp: Any) -> None:
        nonlocal served
        served += 1
        given_up = served <= 2
        await resp.write(sse_chunk({"content": " so \\boxed{7}" if given_up
                                    else " \\boxed{9}"}))
        await resp.write(sse_chunk({}, reason if given_up else "stop",
                                   {"prompt_tokens": 4, "completion_tokens": 5}))
        await resp.write(b"data: [DONE]\n\n")

    result = await _solve_written(write, Problem(id="p", problem="q", answer="9"),
                                  SelfConsistency(2))
    assert [s.answer for s in result.solutions] == ["9", "9"]
    assert [f.reason for f in result.failed] == ["failed", "failed"]
    assert all(f"finish_reason {reason!r}" in (f.error_text or "") for f in result.failed)
    assert [f.partial_text for f in result.failed] == [" so \\boxed{7}"] * 2
    assert result.usage.completion_tokens == 4 * 5 and result.error is None


async def test_a_chunk_for_a_choice_the_request_lacks_fails_it_with_every_token_charged():
    """A chunk for choice 1 of an n=1 request raised at once, before the usage after it
    was read: the server's 7 completion and 5 prompt tokens were charged 0 and 0 (found
    by review). The stream is now read to its end, like malformed data, then the request
    fails with the same error."""
    from orchestrator.types import Problem
    from policies import SelfConsistency

    async def write(resp: Any) -> None:
        await resp.write(sse_chunk({"content": " \\boxed{9}"}, "stop", index=1))
        await resp.write(sse_chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 7}))
        await resp.write(b"data: [DONE]\n\n")

    result = await _solve_written(write, Problem(id="p", problem="q"), SelfConsistency(1))
    assert not result.solutions and result.answer is None
    assert "backend sent choice 1 for a request of n=1" in (result.failed[0].error_text or "")
    # each request (the failed sample is replaced until max_failures) charged in full
    assert result.requests == len(result.failed) >= 1
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
        5 * result.requests, 7 * result.requests)


async def test_an_empty_200_stream_before_any_token_is_retried() -> None:
    """A 200 whose stream is only ``[DONE]`` (nothing generated) was a failed sample, and
    with other streams open made the endpoint one stream at a time for good, as if it cut
    running streams (found by review). It is retried, as a cut before the first token is."""
    served = 0

    async def write(resp: Any) -> None:
        nonlocal served
        served += 1
        if served > 1:
            await resp.write(sse_chunk({"content": " 42"}, "stop"))
        await resp.write(b"data: [DONE]\n\n")

    async with sse_server(write) as url, OpenAIBackend(
            url, "m", capabilities=_NO_CAPS, backoff_base=0.001, backoff_cap=0.01,
            count_with_tokenizer=False) as backend:
        events, error = await read_all(backend, chat())
        stats = backend.stats()
    assert error is None and served == 2
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == " 42"
    assert stats.get("one_stream_at_a_time") is None
