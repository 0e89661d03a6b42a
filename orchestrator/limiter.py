"""Run-wide request limits: :class:`Limiter`."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from asyncio_throttle import Throttler

from orchestrator.defaults import CONCURRENCY
from orchestrator.errors import ConfigError

__all__ = ["DEFAULT_CONCURRENCY", "Limiter"]

#: requests in flight across a run when the caller does not say: ``run_batch``'s default
#: and the CLI's ``--concurrency`` (:data:`orchestrator.defaults.CONCURRENCY`)
DEFAULT_CONCURRENCY = CONCURRENCY


class Limiter:
    """Run-wide limits shared by every problem: concurrent requests and requests/second."""

    def __init__(self, concurrency: int | None = None, rate: float | None = None) -> None:
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1 or None, got {concurrency}")
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"rate must be a positive number of requests/second, got {rate}")
        self.concurrency = concurrency
        self.rate = rate
        self._sem = asyncio.Semaphore(concurrency) if concurrency else None
        if rate is None:
            self._throttler = None
        elif rate >= 1:
            self._throttler = Throttler(rate_limit=int(rate), period=int(rate) / rate)
        else:
            self._throttler = Throttler(rate_limit=1, period=1.0 / rate)

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
