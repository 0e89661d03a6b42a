"""The fault-injection suite: the CLI through a seeded fault proxy, and crash-resume.

``tests/fault_proxy.py`` sits in front of the local test server and injects, into 20% of
the generation requests, every fault kind it knows (5xx, 429 with Retry-After, a reset
before the headers, a hang, a cut midway, a garbage ``data:`` line, truncated JSON, no
usage chunk). ``solverify run`` (in this process, so tasks and sockets can be inspected)
runs SC, GenRM and ``adaptive`` over 100 problems through it, and each run must show:
every problem in ``--out`` exactly once; the ledger equal to the completion tokens the
proxy forwarded from the upstream; no request retried after a token reached the client;
no task and no client socket left open; the token cap held; the documented exit status.
SC and ``adaptive`` run once more against a server that ignores ``n``, so every ``n > 1``
is emulated with single streams, at most 6 open at once.

Set ``SOLVERIFY_FAULT_REPORT=FILE`` to get the per-run numbers as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator import cli
from orchestrator.cli import ended_on_error
from tests.fault_proxy import FAULT_KINDS, FaultProxy
from tests.helpers import Background
from tests.openai_server import MathResponder, OpenAIServer

PROBLEMS = 100


@pytest.fixture(scope="module")
def bg() -> Iterator[Background]:
    b = Background()
    yield b
    b.close()


@pytest.fixture(scope="module")
def upstream(bg: Background) -> Iterator[OpenAIServer]:
    server = OpenAIServer(MathResponder(), models=None, prefix_cache_block=4)
    bg.call(server.start())
    yield server
    bg.call(server.stop())


def root(server: OpenAIServer) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture(scope="module")
def upstream_without_n(bg: Background) -> Iterator[OpenAIServer]:
    """A server that ignores ``n`` (one choice whatever is asked), as llama.cpp's does:
    the probe finds it out and every n > 1 request is emulated with single streams."""
    server = OpenAIServer(MathResponder(), models=None, prefix_cache_block=4, ignore_n=True)
    bg.call(server.start())
    yield server
    bg.call(server.stop())


@pytest.fixture
def proxy_factory(bg: Background, upstream: OpenAIServer):
    made: list[FaultProxy] = []

    def make(**kw) -> FaultProxy:
        proxy = FaultProxy(kw.pop("upstream", root(upstream)), **kw)
        bg.call(proxy.start())
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        bg.call(proxy.stop())


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # cli.main configures structlog; leave other tests theirs


def problems_file(path: Path, n: int = PROBLEMS, *, text: bool = False) -> Path:
    """``n`` maths problems, or (``text``) text-answer ones, which get the cheap grader."""
    def one(i: int) -> dict:
        if text:
            return {"id": f"q{i}", "problem": f"Capital number {i}?", "answer": "Paris",
                    "aliases": ["Paris"]}
        return {"id": f"q{i}", "problem": f"What is {i} plus {i} {'and more ' * (i % 5)}?",
                "answer": str(2 * i)}

    path.write_text("".join(json.dumps(one(i)) + "\n" for i in range(n)))
    return path


def client_sockets_to(port: int) -> int:
    """Open TCP sockets of this process whose remote end is ``port``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[2].rsplit(":", 1)[1], 16) == port and parts[9] in inodes:
                count += 1
    return count


def run_cli(argv: list[str], monkeypatch) -> tuple[int, list[asyncio.Task]]:
    """``solverify ARGV`` in this process; also returns the tasks still alive when the
    command's coroutine returned."""
    real_run = asyncio.run
    leftover: list[asyncio.Task] = []

    def checked_run(coro, **kw):
        async def wrapper():
            try:
                return await coro
            finally:
                # the interpreter closes garbage-collected async generators in tasks of
                # its own: give those a few loop turns; a task of ours would stay
                for _ in range(50):
                    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                    if not others:
                        break
                    await asyncio.sleep(0)
                leftover.extend(others)

        return real_run(wrapper(), **kw)

    monkeypatch.setattr(asyncio, "run", checked_run)
    try:
        rc = cli.main(argv)
    finally:
        monkeypatch.setattr(asyncio, "run", real_run)
    return rc, leftover


def wait_for(predicate, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


POLICIES = [
    # (spec, per-problem token cap, --max-tokens)
    ("sc:n=8", 8 * 64 + 2 * 64, 64),
    ("genrm:s=4,v=2", 4 * 64 + 8 * 1024 + 64, 64),  # math verifications: up to 1024
    ("adaptive", 16 * 64, 64),
]


def _report(entry: dict) -> None:
    path = os.environ.get("SOLVERIFY_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


@pytest.mark.parametrize(("spec", "cap", "max_tokens"), POLICIES,
                         ids=[p[0] for p in POLICIES])
def test_a_faulty_endpoint_loses_nothing_and_charges_exactly(
        spec, cap, max_tokens, tmp_path, proxy_factory, upstream, monkeypatch, capsys):
    check_a_faulty_run(spec, cap, max_tokens, tmp_path, proxy_factory, upstream,
                       monkeypatch, capsys)


EMULATED = [("sc:n=8", 8 * 64 + 2 * 64, 64), ("adaptive", 16 * 64, 64)]


@pytest.mark.parametrize(("spec", "cap", "max_tokens"), EMULATED,
                         ids=[p[0] for p in EMULATED])
def test_a_faulty_endpoint_without_n_loses_nothing_and_charges_exactly(
        spec, cap, max_tokens, tmp_path, proxy_factory, upstream_without_n, monkeypatch,
        capsys):
    """The same faults and checks with every n > 1 emulated (the server ignores n) and at
    most 6 streams open at once: a choice's fault is one single stream's, its siblings run
    on, and choices wait for a slot."""
    check_a_faulty_run(spec, cap, max_tokens, tmp_path, proxy_factory, upstream_without_n,
                       monkeypatch, capsys, extra=["--max-streams", "6"], emulated=True,
                       count=50)


def check_a_faulty_run(spec, cap, max_tokens, tmp_path, proxy_factory, upstream, monkeypatch,
                       capsys, *, extra: list[str] = (), emulated: bool = False,
                       count: int = PROBLEMS) -> None:
    proxy = proxy_factory(rate=0.2, seed=sum(map(ord, spec)) + emulated,
                          upstream=root(upstream))
    out = tmp_path / "out.jsonl"
    problems = problems_file(tmp_path / "p.jsonl", count)
    generated_before = upstream.generation_tokens_total
    argv = ["run", "--base-url", proxy.url, "--model", "test-model", "--problems",
            str(problems), "--policy", spec, "--out", str(out), "--no-progress",
            "--max-tokens", str(max_tokens), "--budget-tokens", str(cap),
            "--timeout", "8", "--idle-timeout", "1.5", "--concurrency", "16", *extra]
    rc, leftover = run_cli(argv, monkeypatch)
    captured = capsys.readouterr()

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert sorted(ids) == sorted(f"q{i}" for i in range(count)), "every problem once"
    assert len(ids) == len(set(ids))
    errors = [r for r in rows if ended_on_error(r)]
    assert rc == (1 if errors else 0), captured.err
    if errors:
        assert f"ended on an error {len(errors)} of {count}" in captured.out
    ledger = sum(r["completion_tokens"] for r in rows)
    stats = proxy.stats
    assert ledger == stats.tokens_forwarded, "ledger == tokens the upstream streamed"
    assert stats.retries_after_first_token() == []
    assert leftover == []
    assert wait_for(lambda: proxy.open_client_connections == 0)
    assert client_sockets_to(proxy.port) == 0
    assert max(r["completion_tokens"] for r in rows) <= cap
    assert all(stats.injected[k] > 0 for k in FAULT_KINDS), dict(stats.injected)
    if emulated:
        sent = [r.body or {} for r in upstream.generation_requests()
                if (r.body or {}).get("max_tokens") != 1]  # not the probe's
        assert sent and all(b.get("n", 1) == 1 for b in sent), "every request one choice"
    _report({
        "policy": spec, "emulated": emulated, "problems": len(rows), "exit": rc,
        "errors": len(errors),
        "injected": dict(stats.injected), "requests": stats.requests,
        "retried_attempts": stats.retried(), "ledger": ledger,
        "upstream_forwarded": stats.tokens_forwarded,
        "upstream_generated": upstream.generation_tokens_total - generated_before,
        "failed_samples": sum(1 for r in rows for f in r["failed"] if f["reason"] == "failed"),
        "leaked_tasks": len(leftover), "open_sockets": client_sockets_to(proxy.port),
        "max_completion_tokens": max(r["completion_tokens"] for r in rows), "cap": cap,
    })


# ---- exit statuses -----------------------------------------------------------------------
def test_every_request_failing_exits_1_with_the_first_error(tmp_path, proxy_factory,
                                                             monkeypatch, capsys):
    proxy = proxy_factory(rate=1.0, kinds=("503",))
    out = tmp_path / "o.jsonl"
    rc, _ = run_cli(["run", "--base-url", proxy.url, "--model", "test-model", "--problems",
                     str(problems_file(tmp_path / "p.jsonl", 2)), "--policy", "sc:n=1",
                     "--out", str(out), "--no-progress", "--max-tokens", "16"], monkeypatch)
    captured = capsys.readouterr()
    assert rc == 1
    assert "ended on an error 2 of 2 problem(s); first: q" in captured.out
    assert "503" in captured.out
    assert len(out.read_text().splitlines()) == 2


def test_a_hung_endpoint_fails_within_the_deadline(tmp_path, proxy_factory, monkeypatch,
                                                   capsys):
    from orchestrator.backends.openai_compat import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT

    assert DEFAULT_TIMEOUT + DEFAULT_IDLE_TIMEOUT < 60  # the defaults, without flags
    proxy = proxy_factory(rate=1.0, kinds=("hang",), seed=3)
    out = tmp_path / "o.jsonl"
    t0 = time.monotonic()
    rc, leftover = run_cli(["run", "--base-url", proxy.url, "--model", "test-model",
                            "--problems", str(problems_file(tmp_path / "p.jsonl", 2)),
                            "--policy", "sc:n=2", "--out", str(out), "--no-progress",
                            "--max-tokens", "16", "--timeout", "1.5", "--idle-timeout", "0.5"],
                           monkeypatch)
    took = time.monotonic() - t0
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert leftover == []
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["stop_code"] == "failures" for r in rows)
    # each sample: at most 1.5 s to a first token, then 0.5 s of silence; 2 failures each
    assert took < 60


def test_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    rc, _ = run_cli(["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                     "--problems", str(problems_file(tmp_path / "p.jsonl", 1)), "--policy",
                     "sc:n=1", "--out", str(tmp_path / "o.jsonl"), "--no-progress",
                     "--timeout", "2"], monkeypatch)
    assert rc == 2
    assert "solverify: error: cannot reach" in capsys.readouterr().err


# ---- crash and resume --------------------------------------------------------------------
def _cli_child(argv: list[str], log: str) -> None:
    """Run the CLI as a separate process, its stderr to ``log`` (forkserver target)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    os.environ["SOLVERIFY_LOG"] = "error"
    sys.exit(cli.main(argv))


def _spawner():
    """Processes forked from one server that has the CLI imported: a kill lands in a real
    separate process, without paying Python's start-up and imports for each of them."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["orchestrator.cli", "orchestrator.backends.openai_compat",
                                "orchestrator.runtime", "policies", "tests.test_faults"])
    return ctx


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_killed_at_random_points_and_resumed_the_file_holds_every_id_once(
        tmp_path, bg, proxy_factory):
    slow = OpenAIServer(MathResponder(), models=None, token_delay=0.004)
    bg.call(slow.start())
    ctx = _spawner()
    try:
        proxy = proxy_factory(rate=0.1, seed=11, upstream=root(slow),
                              kinds=("500", "429", "cut", "garbage", "truncated", "no_usage"))
        out = tmp_path / "out.jsonl"
        problems = problems_file(tmp_path / "p.jsonl", text=True)
        argv = ["run", "--base-url", proxy.url, "--model", "test-model", "--problems",
                str(problems), "--policy", "sc:n=4", "--out", str(out), "--no-progress",
                "--max-tokens", "16", "--concurrency", "6", "--resume"]
        rng = random.Random(7)
        points = sorted(rng.sample(range(4, PROBLEMS - 10), 5))
        kills: list[int] = []
        logs: list[Path] = []
        for i, point in enumerate(points):
            logs.append(tmp_path / f"run{i}.log")
            proc = ctx.Process(target=_cli_child, args=(argv, str(logs[-1])))
            proc.start()
            try:
                reached = wait_for(lambda p=point, pr=proc: _lines(out) >= p or
                                   not pr.is_alive(), within=120)
                time.sleep(rng.random() * 0.05)  # anywhere between two results
            finally:
                proc.kill()
                proc.join(30)
            assert reached and proc.exitcode == -signal.SIGKILL, logs[-1].read_text()
            kills.append(_lines(out))
            if i == 2:  # as if killed in the middle of writing a line
                with out.open("ab") as fh:
                    fh.write(b'{"id": "q1", "policy": "sc:n=4", "ans')
        logs.append(tmp_path / "final.log")
        final = ctx.Process(target=_cli_child, args=(argv, str(logs[-1])))
        final.start()
        final.join(180)
    finally:
        bg.call(slow.stop())
    assert final.exitcode in (0, 1), logs[-1].read_text()
    assert any("dropped a torn last line" in log.read_text() for log in logs)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == PROBLEMS
    assert set(ids) == {f"q{i}" for i in range(PROBLEMS)}
    assert kills == sorted(kills) and len(set(kills)) >= 3
    _report({"crash_resume": {"kill_points_lines": kills, "final_lines": len(rows),
                              "unique_ids": len(set(ids)), "exit": final.exitcode}})
