"""An asyncio event loop with a simulated clock, for replaying recorded runs.

``loop.time()`` is virtual: it starts at 0 and only moves when the loop has nothing ready
to run, at which point it jumps straight to the next scheduled timer instead of sleeping.
``asyncio.sleep``, ``loop.call_at`` and the runtime's ``loop.time()`` therefore all agree
on one simulated timeline, and thousands of simulated seconds pass in microseconds.

    with simulated_runner() as runner:
        result = runner.run(solve(problem, policy, backend=replay_backend, task=task))

Restriction: the loop does not poll real file descriptors while timers are pending, so it
is only for pure simulations (no sockets). With no timer pending and nothing ready it
blocks on the real selector, so work handed to threads (``run_in_executor``) still
completes.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any

__all__ = ["SimulatedClockLoop", "simulated_runner"]


class _SimulatedSelector(selectors.BaseSelector):
    """Delegates registration to a real selector; a timed ``select`` advances the clock."""

    def __init__(self, loop_clock: list[float]) -> None:
        self._real = selectors.DefaultSelector()
        self._clock = loop_clock  # one-element list shared with the loop: [now]

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # nothing scheduled and nothing ready: only another thread can wake us
            return self._real.select(None)
        if timeout > 0:
            self._clock[0] += timeout
        return []

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._real.get_map()


class SimulatedClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is simulated (see the module docstring)."""

    def __init__(self) -> None:
        self._sim_now = [0.0]
        super().__init__(selector=_SimulatedSelector(self._sim_now))

    def time(self) -> float:
        return self._sim_now[0]


def simulated_runner() -> asyncio.Runner:
    """An :class:`asyncio.Runner` on a fresh :class:`SimulatedClockLoop`."""
    return asyncio.Runner(loop_factory=SimulatedClockLoop)
