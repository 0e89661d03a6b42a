"""Run-wide request limits: :class:`Limiter`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from orchestrator.defaults import CONCURRENCY
from orchestrator.errors import ConfigError
from orchestrator.retry import make_throttler

__all__ = ["DEFAULT_CONCURRENCY", "Limiter"]

#: requests in flight across a run when the caller does not say: ``run_batch``'s default
#: and the CLI's ``--concurrency`` (:data:`orchestrator.defaults.CONCURRENCY`)
DEFAULT_CONCURRENCY = CONCURRENCY


class Limiter:
    """Run-wide limits shared by every problem: concurrent requests and requests/second."""

    def __init__(self, concurrency: int | None = None, rate: float | None = None) -> None:
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 or None, got {concurrency}")
        self.concurrency = concurrency
        self.rate = rate
        self._sem = asyncio.Semaphore(concurrency) if concurrency else None
        # the same builder as a backend's own rate limit (one rounding of the burst)
        self._throttler = make_throttler(rate)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem is not None:
            await self._sem.acquire()
        try:
            if self._throttler is not None:
                await self._throttler.acquire()
            yield
        finally:
            if self._sem is not None:
                self._sem.release()
