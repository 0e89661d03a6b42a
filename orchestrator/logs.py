"""Loggers that import structlog at their first log line, not at start-up.

``import structlog`` is a large part of what ``solverify run`` costs beyond ``import
openai``: it loads ``structlog.dev``, which loads rich and pygments where they are
installed (some 85 ms of CPU in the dev venv, 28 ms in a plain install; see
``benchmarks/startup.py``). A run at the CLI's default level (warning) usually logs
nothing at all, so the modules here log through :func:`get_logger`, whose loggers import
structlog only when a line is to be written.

Each call forwards to ``structlog.get_logger(name)`` (itself a lazy proxy, so what
``structlog.configure`` or ``structlog.testing.capture_logs`` sets applies to every
later call, as it did to module-level structlog loggers). The library never configures
structlog: every call is forwarded, and structlog's own configuration decides what is
written. The CLI, an application, calls :func:`configure` with its level and its
structlog set-up: where structlog is loaded already this applies the set-up at once;
otherwise it is applied at the first line at or above the level, and lines below it are
dropped without importing structlog, as the filtering logger the set-up installs would
drop them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["LazyLogger", "configure", "get_logger"]

# the numbers of the stdlib's logging levels (what structlog's filtering loggers compare)
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "exception": 40,
          "critical": 50}

# (level, set-up) given by configure() before structlog was loaded; None once applied
_pending: tuple[int, Callable[[], None]] | None = None


def configure(level: int, setup: Callable[[], None]) -> None:
    """Apply ``setup`` (which calls ``structlog.configure``) now if structlog is loaded,
    else at the first line logged at ``level`` or above; until then lines below ``level``
    are dropped."""
    global _pending
    if "structlog" in sys.modules:
        _pending = None
        setup()
    else:
        _pending = (level, setup)


def _structlog_logger(name: str | None) -> Any:
    global _pending
    import structlog

    pending, _pending = _pending, None
    if pending is not None:
        pending[1]()
    return structlog.get_logger(name) if name is not None else structlog.get_logger()


class LazyLogger:
    """The methods of a structlog logger that this project calls, for one logger name."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str | None) -> None:
        self._name = name
        self._logger: Any = None

    def _log(self, method: str, event: str, kw: dict[str, Any]) -> Any:
        pending = _pending
        if pending is not None and LEVELS[method] < pending[0]:
            return None  # the set-up still to apply would filter it out
        if self._logger is None or pending is not None:
            self._logger = _structlog_logger(self._name)
        return getattr(self._logger, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> Any:
        return self._log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> Any:
        return self._log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> Any:
        return self._log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> Any:
        return self._log("error", event, kw)

    def exception(self, event: str, **kw: Any) -> Any:
        return self._log("exception", event, kw)

    def critical(self, event: str, **kw: Any) -> Any:
        return self._log("critical", event, kw)


def get_logger(name: str | None = None) -> LazyLogger:
    """A logger for ``name`` that imports structlog at its first line written."""
    return LazyLogger(name)
