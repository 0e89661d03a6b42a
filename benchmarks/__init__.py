"""Benchmarks: replay engines, calibration, client and start-up measurements (README).

The direct and lean replay engines may be compiled (``python -m benchmarks.accelerate``);
a compiled engine is used only while its source is the one it was built from, so an edit
is never shadowed by a stale build: :func:`use_sources_where_stale` (run here, before any
engine is imported) loads the source of a module whose build is stale, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
import warnings
from pathlib import Path

#: the modules ``python -m benchmarks.accelerate`` compiles, in import order
COMPILED = ("engine", "direct")
#: what it writes beside them: each compiled module's source SHA-256
STAMP = ".accelerated.json"


def compiled_file(directory: Path, name: str) -> Path | None:
    """The extension module this interpreter would import for ``name``, if present."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale(directory: Path, names: tuple[str, ...] = COMPILED) -> list[str]:
    """The modules of ``names`` with a compiled build in ``directory`` that was not built
    from their present source (by the stamp; no stamp: all of them)."""
    built = [n for n in names if compiled_file(directory, n) is not None]
    if not built:
        return []
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    return [n for n in built if stamp.get(n) != source_digest(directory / f"{n}.py")]


def use_sources_where_stale(package: str, directory: Path,
                            names: tuple[str, ...] = COMPILED) -> list[str]:
    """Load the source of each module of ``package`` whose compiled build is stale, in
    place of the build, and warn; returns their names."""
    old = stale(directory, names)
    for name in old:
        qualified = f"{package}.{name}"
        if qualified in sys.modules:
            continue
        warnings.warn(f"{qualified}: its compiled build is older than its source; using the "
                      "source (rebuild: python -m benchmarks.accelerate, or remove the "
                      "build: python -m benchmarks.accelerate --remove)", stacklevel=2)
        loader = importlib.machinery.SourceFileLoader(qualified, str(directory / f"{name}.py"))
        spec = importlib.util.spec_from_loader(qualified, loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            loader.exec_module(module)
        except BaseException:
            del sys.modules[qualified]
            raise
        parent = sys.modules.get(package)
        if parent is not None:  # as the import system binds a submodule it loads
            setattr(parent, name, module)
    return old


use_sources_where_stale(__name__, Path(__file__).resolve().parent)
