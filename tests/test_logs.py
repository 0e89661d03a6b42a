"""orchestrator.logs: structlog is imported at the first line written, and what it logs
is what module-level structlog loggers logged.

The start-up cases run in a child interpreter: this one has structlog loaded already
(the tests import it), which is the other case (the set-up applies at once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from orchestrator import logs

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SOLVERIFY_LOG"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=120,
                          check=False)


def test_library_loggers_forward_every_level_to_structlogs_current_configuration():
    log = logs.get_logger("solverify.test")
    with capture_logs() as first:
        log.debug("d", a=1)
        log.info("i")
        log.warning("w", b="x")
        log.error("e")
    with capture_logs() as second:  # a later configuration applies to the same logger
        log.info("again")
    assert [(e["event"], e["log_level"]) for e in first] == [
        ("d", "debug"), ("i", "info"), ("w", "warning"), ("e", "error")]
    assert first[0]["a"] == 1 and first[2]["b"] == "x"
    assert [e["event"] for e in second] == ["again"]


def test_configure_with_structlog_loaded_applies_the_setup_at_once():
    calls = []
    try:
        logs.configure(30, lambda: calls.append("setup"))
        assert calls == ["setup"]
        assert logs._pending is None
        with capture_logs() as seen:  # nothing is held back once applied
            logs.get_logger("t").debug("kept")
        assert [e["event"] for e in seen] == ["kept"]
    finally:
        structlog.reset_defaults()


def test_cli_run_that_logs_nothing_never_imports_structlog():
    done = _child("""
        import sys
        from orchestrator import cli
        cli._configure_logging()
        from orchestrator import logs
        logs.get_logger("t").info("below the default level")
        logs.get_logger("t").debug("below it too")
        print("structlog" in sys.modules)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert done.stderr == ""


def test_first_line_at_the_level_loads_structlog_with_the_clis_setup():
    done = _child("""
        import sys
        from orchestrator import cli, logs
        cli._configure_logging()
        log = logs.get_logger("t")
        log.debug("dropped: below info")
        assert "structlog" not in sys.modules
        log.info("first", url="http://user:pw123@host/v1")
        assert "structlog" in sys.modules
        log.debug("still below info")
        logs.get_logger("other").warning("second")
    """, SOLVERIFY_LOG="info")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr
    assert "first" in lines[0] and "http://***@host/v1" in lines[0]
    assert "pw123" not in done.stderr  # the CLI's redacting processor is in place
    assert "second" in lines[1] and "warning" in lines[1]
    assert "dropped" not in done.stderr and "still below" not in done.stderr


def test_a_bad_level_is_refused_before_anything_is_logged():
    done = _child("""
        from orchestrator import cli
        try:
            cli._configure_logging()
        except cli.ConfigError as e:
            print(e)
    """, SOLVERIFY_LOG="loud")
    assert done.returncode == 0, done.stderr
    assert "SOLVERIFY_LOG='loud' is not a log level" in done.stdout
