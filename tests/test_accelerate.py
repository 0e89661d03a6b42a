"""Compiled replay engines (benchmarks.accelerate): a build is used only while its source
is the one it was built from. (CI compiles them and reruns the replay identity tests on
the compiled modules: .ci/run.)"""

from __future__ import annotations

import importlib.machinery
import json
import sys

import pytest

from benchmarks import STAMP, source_digest, stale, use_sources_where_stale

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path, name="fakepkg"):
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("WHERE = 'source'\n")
    (pkg / "direct.py").write_text("WHERE = 'source'\n")
    return pkg


def test_no_build_is_never_stale(tmp_path):
    assert stale(_package(tmp_path)) == []


def test_a_build_is_stale_without_its_stamp_or_once_its_source_changes(tmp_path):
    pkg = _package(tmp_path)
    (pkg / f"engine{SUFFIX}").write_bytes(b"not a real extension")
    assert stale(pkg) == ["engine"]  # no stamp
    (pkg / STAMP).write_text(json.dumps({"engine": source_digest(pkg / "engine.py")}))
    assert stale(pkg) == []
    (pkg / "engine.py").write_text("WHERE = 'edited source'\n")
    assert stale(pkg) == ["engine"]
    (pkg / STAMP).write_text("{not json")
    assert stale(pkg) == ["engine"]


def test_a_stale_build_is_replaced_by_its_source_with_a_warning(tmp_path, monkeypatch):
    pkg = _package(tmp_path, "fakepkg_stale")
    # an extension that cannot even load: importing it would fail, so the source must win
    (pkg / f"engine{SUFFIX}").write_bytes(b"not a real extension")
    (pkg / STAMP).write_text(json.dumps({"engine": "0" * 64}))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import fakepkg_stale  # the package first, as its own __init__ would run the guard

        with pytest.warns(UserWarning, match="older than its source"):
            assert use_sources_where_stale("fakepkg_stale", pkg) == ["engine"]
        import fakepkg_stale.direct
        import fakepkg_stale.engine

        assert fakepkg_stale.engine.WHERE == "source"
        assert sys.modules["fakepkg_stale.engine"] is fakepkg_stale.engine
        assert fakepkg_stale.direct.WHERE == "source"  # no build: imported as usual
    finally:
        for mod in [m for m in sys.modules if m.startswith("fakepkg_stale")]:
            del sys.modules[mod]


def test_status_and_remove_without_a_build(capsys):
    from benchmarks import accelerate

    if any(accelerate.compiled_file(accelerate.HERE, n) for n in accelerate.COMPILED):
        pytest.skip("this checkout has compiled engines; --remove would delete them")
    assert accelerate.main(["--status"]) == 0
    out = capsys.readouterr().out
    assert "benchmarks.engine: source" in out and "benchmarks.direct: source" in out
    assert accelerate.main(["--remove"]) == 0
    assert "removed 0 file(s)" in capsys.readouterr().out
