"""One live status line on stderr, for the long steps of ``solverify demo`` and ``serve``.

On a terminal the line is redrawn in place (at most every ``redraw_s``); elsewhere (a log
file, CI) a changed status is printed as its own line at most every ``every_s`` seconds,
so a slow step still shows it is moving without flooding the log. ``line()`` prints a
permanent line (clearing the live one first).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class LiveLine:
    def __init__(self, stream: TextIO | None = None, *, every_s: float = 15.0,
                 redraw_s: float = 0.2, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.every_s = every_s
        self.redraw_s = redraw_s
        self._shown = ""  # what the live line holds on a terminal
        self._last_text = ""
        self._last_at = -1e9

    def update(self, text: str, *, force: bool = False) -> None:
        """Show ``text`` as the current status."""
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last_at < self.redraw_s:
                return
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            text = text if len(text) <= width else text[: width - 1] + "…"
            self.stream.write("\r" + text + " " * max(0, len(self._shown) - len(text)))
            self.stream.flush()
            self._shown = text
        else:
            if text == self._last_text and not force:
                return
            if not force and now - self._last_at < self.every_s:
                return
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_text = text
        self._last_at = now

    def clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r" + " " * len(self._shown) + "\r")
            self.stream.flush()
            self._shown = ""

    def line(self, text: str) -> None:
        """Print ``text`` as a permanent line."""
        self.clear()
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_text = text
        self._last_at = time.monotonic()

    def __call__(self, text: str) -> None:  # usable wherever a ``progress(str)`` is taken
        self.line(text)
