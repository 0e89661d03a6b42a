"""Compile the replay engines: ``python -m benchmarks.accelerate [--remove | --status]``.

mypyc (part of mypy: ``pip install -e ".[accel]"``) compiles ``benchmarks/engine.py`` (the
lean engine) and ``benchmarks/direct.py`` (the direct one) to C extensions, written beside
their sources, which Python then imports instead of them; nothing else changes (the same
code, the same results: CI runs the replay identity tests against the compiled modules).
Each module is compiled on its own, so its mypyc runtime library stays inside the
package. A stamp (``benchmarks/.accelerated.json``) records the SHA-256 of each source
compiled; ``benchmarks/__init__`` uses the source of a module edited since (with a
warning), so a stale build never runs. Needs a C compiler and the Python headers (a
checkout's virtual environment on Linux has both here). ``--remove`` deletes the builds.

Measured: README "Speed" (the speed sweep's CPU with and without them).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import COMPILED, STAMP, compiled_file, source_digest, stale

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _outputs(name: str) -> list[Path]:
    """Every file a build of ``name`` leaves in the package (extension, runtime library)."""
    return sorted(p for p in HERE.iterdir()
                  if p.name.startswith((f"{name}.", f"{name}__mypyc."))
                  and p.suffix in (".so", ".pyd"))


def remove() -> list[Path]:
    gone = [p for name in COMPILED for p in _outputs(name)]
    for p in gone:
        p.unlink()
    (HERE / STAMP).unlink(missing_ok=True)
    return gone


def build() -> dict[str, str]:
    """Compile every module of :data:`COMPILED`; returns the stamp written. Raises
    ``RuntimeError`` with mypyc's output when a build fails (nothing stale is left)."""
    try:
        import mypyc  # noqa: F401
    except ImportError:
        raise RuntimeError("mypyc is not installed: pip install -e \".[accel]\"") from None
    remove()
    stamp: dict[str, str] = {}
    for name in COMPILED:
        source = HERE / f"{name}.py"
        digest = source_digest(source)
        # in a scratch directory (mypyc's setup.py would read the project's pyproject.toml
        # there), which gets the C sources, then benchmarks/<name>*.so to move beside the
        # source
        with tempfile.TemporaryDirectory(prefix="solverify-accel-") as scratch:
            (Path(scratch) / "benchmarks").mkdir()
            done = subprocess.run(
                [sys.executable, "-m", "mypyc", "--ignore-missing-imports",
                 "--follow-imports=silent", str(source)],
                cwd=scratch, capture_output=True, text=True, check=False)
            built = sorted((Path(scratch) / "benchmarks").glob(f"{name}*"))
            built = [p for p in built if p.suffix in (".so", ".pyd")]
            if done.returncode != 0 or not built:
                remove()
                raise RuntimeError(f"mypyc could not compile {source.name} (the source "
                                   f"modules stay in use):\n{done.stdout[-3000:]}"
                                   f"{done.stderr[-3000:]}")
            for path in built:
                shutil.move(str(path), HERE / path.name)
        stamp[name] = digest
    (HERE / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def status() -> list[str]:
    old = set(stale(HERE))
    lines = []
    for name in COMPILED:
        path = compiled_file(HERE, name)
        state = "source" if path is None else ("stale build: source used" if name in old
                                              else f"compiled ({path.name})")
        lines.append(f"benchmarks.{name}: {state}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accelerate",
                                 description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--remove", action="store_true", help="delete the compiled builds")
    group.add_argument("--status", action="store_true", help="say what each module runs")
    args = ap.parse_args(argv)
    if args.status:
        print("\n".join(status()))
        return 0
    if args.remove:
        gone = remove()
        print(f"removed {len(gone)} file(s)")
        return 0
    try:
        stamp = build()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"compiled {', '.join(f'benchmarks.{n}' for n in stamp)}; "
          "`python -m benchmarks.accelerate --status` says what runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
