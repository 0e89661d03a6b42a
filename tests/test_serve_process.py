"""The server-process lifecycle without vLLM: records that ``serve status|stop`` read, the
start-up wait that fails fast, and the demo stopped by SIGINT / SIGTERM leaving no server
behind (the local test server stands in for vLLM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.serve import ServeError, ServerPaths, running_servers, stop_recorded
from orchestrator.serve.process import _process_alive, log_status
from tests.local_managed import REPO, LocalTestServer, ScriptServer

HANG_GUARD_S = 120  # only against a hang; nothing waits on it when the code is right


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_log_status_strips_vllm_prefixes() -> None:
    line = ("(EngineCore pid=7261) INFO 12-01 22:13:37 [ompmultiprocessing.py:185] "
            "OpenMP thread binding info:")
    assert log_status(line) == "OpenMP thread binding info:"
    assert log_status("plain line ") == "plain line"


async def test_started_server_is_recorded_until_stopped(tmp_path: Path) -> None:
    paths = ServerPaths.at(tmp_path)
    server = LocalTestServer(paths, started_by="test")
    async with server:
        records = running_servers(paths)
        assert [r["pid"] for r in records] == [server.pid]
        assert records[0]["base_url"] == server.base_url
        assert records[0]["started_by"] == "test" and records[0]["detached"] is False
        pid = server.pid
    assert running_servers(paths) == []
    assert _gone(pid)


async def test_serve_stop_finds_a_server_its_owner_left(tmp_path: Path) -> None:
    paths = ServerPaths.at(tmp_path)
    server = LocalTestServer(paths).start(detach=True)
    try:
        await server.wait_healthy_async()
        pid = server.pid
        assert pid is not None
        stopped = stop_recorded(paths)  # what `solverify serve stop` does
        assert [s["pid"] for s in stopped] == [pid]
        _wait_for(lambda: _gone(pid), "the stopped server to go")
        assert running_servers(paths) == []
    finally:
        server.kill()


def test_a_record_of_a_dead_process_is_dropped(tmp_path: Path) -> None:
    paths = ServerPaths.at(tmp_path)
    paths.run_dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (paths.run_dir / f"server-{proc.pid}.json").write_text(json.dumps(
        {"pid": proc.pid, "start_ticks": "1", "base_url": "http://127.0.0.1:1/v1"}))
    assert running_servers(paths) == []
    assert not list(paths.run_dir.glob("server-*.json"))


async def test_start_up_fails_at_once_when_the_process_dies(tmp_path: Path) -> None:
    server = ScriptServer("import sys; print('cannot load the model'); sys.exit(3)",
                          ServerPaths.at(tmp_path))
    server.start()
    with pytest.raises(ServeError, match=r"exited \(code 3\)") as info:
        await server.wait_healthy_async(silence_s=3600)
    assert "cannot load the model" in str(info.value)
    await server.stop_async()
    assert running_servers(ServerPaths.at(tmp_path)) == []


async def test_start_up_gives_up_when_the_log_goes_silent(tmp_path: Path) -> None:
    server = ScriptServer("import time; print('loading', flush=True); time.sleep(3600)",
                          ServerPaths.at(tmp_path))
    server.start()
    try:
        with pytest.raises(ServeError, match="has not moved") as info:
            await server.wait_healthy_async(silence_s=0.5)
        assert "--timeout" in info.value.hint
    finally:
        await server.stop_async(grace=0.1)


def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """Even a SIGKILLed owner leaves no server behind (parent-death signal)."""
    script = (
        "import os, sys; from pathlib import Path; from orchestrator.serve import ServerPaths; "
        "from tests.local_managed import LocalTestServer; "
        f"s = LocalTestServer(ServerPaths.at(Path({str(tmp_path)!r}))).start(); "
        "print(s.pid, flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid = int(owner.stdout.readline())
    assert _process_alive(pid)
    owner.kill()
    owner.wait()
    _wait_for(lambda: _gone(pid), "the orphaned server to die")


def _problems(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Count {'w ' * (i % 5)}",
                                        "answer": str(i % 5)}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stopped_by_a_signal_keeps_results_and_leaves_no_server(
        tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    script = ("import sys; from orchestrator import demo; "
              "from tests.local_managed import LocalTestServer; "
              "sys.exit(demo.main(sys.argv[1:], server_factory=LocalTestServer))")
    env = {**os.environ, "SOLVERIFY_CACHE": str(tmp_path / "cache"),
           "SOLVERIFY_TEST_TOKEN_DELAY": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--problems", str(_problems(tmp_path / "p.jsonl", 40)),
         "--limit", "0", "--policy", "sc:n=4", "--policy", "adaptive:max=4",
         "--concurrency", "2", "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    paths = ServerPaths.at(tmp_path / "cache")
    results = out / "results_sc_n-4.jsonl"
    try:
        _wait_for(lambda: results.is_file() and results.read_text().count("\n") >= 2,
                  "the first finished problems")
        servers = running_servers(paths)
        assert len(servers) == 1 and servers[0]["owner_pid"] == proc.pid
        server_pid = int(servers[0]["pid"])
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + int(sig), stderr
    assert _gone(server_pid)
    assert running_servers(paths) == []
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    assert 2 <= len(kept) < 40
    assert f"interrupted: {len(kept)}/40 problems" in stdout
    assert "server stopped" in stderr and "interrupted" in stderr


def test_auto_threads_pin_one_openmp_thread_on_a_busy_small_machine(monkeypatch) -> None:
    from orchestrator.serve.config import BUSY_LOAD_PER_CPU, server_env, thread_env

    busy, quiet = 2 * BUSY_LOAD_PER_CPU, 0.99 * 2 * BUSY_LOAD_PER_CPU
    assert thread_env([0, 1], load=busy) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert thread_env([0, 1], load=quiet) == {}  # quiet: vLLM's two threads
    assert thread_env([3], load=BUSY_LOAD_PER_CPU) == {"VLLM_CPU_OMP_THREADS_BIND": "3"}
    assert thread_env(list(range(8)), load=50.0) == {}  # more cores: vLLM's own binding
    assert thread_env([0, 1], "one", load=0.0) == {"VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert thread_env(list(range(8)), "one") == {"VLLM_CPU_OMP_THREADS_BIND": "7"}
    assert thread_env([0, 1], "all", load=9.0) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert server_env()["VLLM_CPU_OMP_THREADS_BIND"] == "auto"  # the user's setting wins
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server_env({"VLLM_CPU_OMP_THREADS_BIND": ""})


def test_the_thread_choice_is_said_and_recorded(tmp_path, monkeypatch) -> None:
    """What was chosen is made at start from the load then, in words, and a bad choice
    is refused when the server is made, not when it starts."""
    from orchestrator.serve import ServeError, ServerPaths, VLLMServer

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    server = VLLMServer(ServerPaths.at(tmp_path), port=1)
    env = server.environment()
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "machine busy: load 7.5 on 2 CPUs" in server.threads_note
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.3, 0.4))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server.environment()
    assert "machine quiet" in server.threads_note
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    server.environment()
    assert server.threads_note == "VLLM_CPU_OMP_THREADS_BIND=0 (from the environment)"
    with pytest.raises(ServeError, match="--threads"):
        VLLMServer(ServerPaths.at(tmp_path), port=1, threads="many")


class _WarmServer(LocalTestServer):
    warmup = ("/completions", {"prompt": "Hello", "max_tokens": 1, "logprobs": 1})


class _BadWarmServer(LocalTestServer):
    warmup = ("/no-such-endpoint", {"prompt": "Hello"})


async def test_a_server_is_ready_only_after_its_warm_up_request(tmp_path: Path) -> None:
    """A kind with a warm-up request (vLLM: the first logprobs request) counts as ready
    once that request was answered; a refused one is a ServeError naming it."""
    async with _WarmServer(ServerPaths.at(tmp_path)) as server:
        assert server.running
    bad = _BadWarmServer(ServerPaths.at(tmp_path))
    with pytest.raises(ServeError, match=r"warm-up request to /no-such-endpoint was refused"):
        async with bad:
            pass
    assert not bad.running
