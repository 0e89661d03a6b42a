"""Ctrl-C and SIGTERM for the long-running commands (``demo``, ``serve start``).

``async with cancel_on_signals() as sig:`` inside the main coroutine: the first SIGINT or
SIGTERM cancels that coroutine, so every ``finally`` and ``async with`` below it runs
(streams closed, the server stopped, results kept); ``sig.received`` then says which
signal it was, for the exit status (128 + signal number). A second signal calls
``on_second`` (e.g. kill the server at once and exit) for a user who will not wait.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class Signalled:
    received: signal.Signals | None = None
    count: int = 0

    @property
    def exit_status(self) -> int:
        return 128 + int(self.received) if self.received is not None else 0


@asynccontextmanager
async def cancel_on_signals(
    on_first: Callable[[signal.Signals], None] | None = None,
    on_second: Callable[[signal.Signals], None] | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> AsyncIterator[Signalled]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    state = Signalled()

    def handle(sig: signal.Signals) -> None:
        state.count += 1
        if state.count == 1:
            state.received = sig
            if on_first is not None:
                on_first(sig)
            task.cancel()
        elif on_second is not None:
            on_second(sig)

    installed = []
    try:
        for sig in signals:
            loop.add_signal_handler(sig, handle, sig)
            installed.append(sig)
        yield state
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
