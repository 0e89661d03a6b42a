"""Several replicas of one model behind one :class:`Backend`: affinity, health, failover.

Without a router in front of the replicas (see README "Scaling out" for one with
``vllm-router``), :class:`MultiBackend` spreads requests over several backends itself:

* **Affinity.** A request goes to the replica that ranks first for its routing key under
  rendezvous (highest-random-weight) hashing: ``GenerationRequest.affinity`` (the runtime
  sets the problem id, so every sample and verification of a problem lands on one
  replica and its prompt prefix is served from that replica's cache), or a hash of the
  prompt when a caller sent none. Adding or losing a replica moves only the keys that
  ranked it first.
* **Health.** A replica that fails to open a stream with a connection-level error
  (:class:`~orchestrator.errors.EndpointUnreachable`, or
  :class:`~orchestrator.errors.RetriesExhausted` — it refused or kept failing through its
  own retries), or whose stream broke because the connection did, is marked down for
  ``cooldown`` seconds of the event loop's clock: it gets no new work while others are up.
  When every replica is down they are all tried again, in affinity order (a recovered
  replica is found again that way, and nothing waits forever on a cooldown).
* **Failover.** Only before a stream's first event: the request is opened on the next
  replica in its order (each child still retries on its own first, as a single backend
  does). A stream that broke after its first token is never moved: it surfaces as
  :class:`~orchestrator.errors.StreamBroken`, which the runtime records as a failed,
  replaceable sample. Errors that another replica cannot fix (a rejected request, an
  unknown model) are raised at once.
* **Accounting.** Each request is read from the one replica that served it, so the
  ledger stays the sum of the replicas' own counts; ``cut_grace`` is the largest of the
  children's, so a ``Stop`` settles cut streams as it does against one server.

``stats()`` says, per replica, how many requests it served, how many were moved off it and
whether it is down now.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator import logs
from orchestrator.backends.base import Backend, Capabilities, GenerationRequest, StreamEvent
from orchestrator.errors import (
    BackendError,
    ConfigError,
    EndpointUnreachable,
    RetriesExhausted,
    StreamBroken,
)
from orchestrator.retry import is_connection_error

log = logs.get_logger("solverify.backend.multi")

#: errors opening a stream after which the request is tried on the next replica
FAILOVER_ERRORS: tuple[type[BackendError], ...] = (EndpointUnreachable, RetriesExhausted)
#: seconds a replica stays down after a connection-level failure
DEFAULT_COOLDOWN = 30.0


@dataclass(slots=True)
class ReplicaStats:
    name: str
    requests: int = 0  # streams opened on it
    failovers: int = 0  # requests moved off it because it could not open them
    broken: int = 0  # streams it broke after their first event through a lost connection
    down_until: float | None = None  # loop time until which it gets no new work


def routing_key(request: GenerationRequest) -> str:
    """The request's affinity key, else a digest of its prompt (same prompt, same key)."""
    if request.affinity:
        return request.affinity
    text = request.prompt if request.prompt is not None else repr(request.messages)
    return "prompt:" + hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def rendezvous_order(key: str, names: Sequence[str]) -> list[int]:
    """Replica indices by descending hash weight of ``(key, name)``: index 0 is the key's
    home replica; removing a replica changes the home only of the keys it was home to."""
    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{key}\x00{names[i]}".encode(), digest_size=8).digest()

    return sorted(range(len(names)), key=weight, reverse=True)


class MultiBackend(Backend):
    """One :class:`Backend` over several replicas serving the same model.

    ``names`` label the replicas in stats and logs (default: each child's ``base_url``,
    else its position); ``clock`` is the time source for cooldowns (default: the running
    event loop's ``time()``, which the simulated clock in tests also drives).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        names: Sequence[str] | None = None,
        cooldown: float = DEFAULT_COOLDOWN,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not backends:
            raise ConfigError("MultiBackend needs at least one backend")
        for b in backends:
            if not isinstance(b, Backend):
                raise ConfigError(f"MultiBackend replica {b!r} is not a Backend: it needs "
                                  "stream(request), aclose() and cut_grace (subclass "
                                  "orchestrator.backends.base.Backend)")
        if names is not None and len(names) != len(backends):
            raise ConfigError(f"MultiBackend got {len(backends)} backends but {len(names)} names")
        if not cooldown >= 0:
            raise ConfigError(f"cooldown must be a non-negative number of seconds, "
                              f"got {cooldown!r}")
        self._backends = tuple(backends)
        labels = list(names) if names is not None else [
            str(getattr(b, "base_url", f"replica-{i}")) for i, b in enumerate(backends)]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"MultiBackend replica names must differ, got {labels}")
        self._names = tuple(labels)
        self._stats = [ReplicaStats(n) for n in labels]
        self._cooldown = cooldown
        self._clock = clock
        self.cut_grace = max(b.cut_grace for b in backends)

    # ---- routing & health ---------------------------------------------------------------
    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def is_up(self, index: int) -> bool:
        until = self._stats[index].down_until
        return until is None or self._now() >= until

    def order(self, request: GenerationRequest) -> list[int]:
        """Replicas to try for ``request``: the healthy ones in affinity order, then (as a
        last resort) the ones marked down, in the same order."""
        ranked = rendezvous_order(routing_key(request), self._names)
        up = [i for i in ranked if self.is_up(i)]
        return up + [i for i in ranked if i not in up]

    def _mark_down(self, index: int, why: BaseException) -> None:
        stats = self._stats[index]
        stats.down_until = self._now() + self._cooldown
        log.warning("replica.down", replica=stats.name, cooldown_s=self._cooldown,
                    error=f"{type(why).__name__}: {why}")

    def _mark_up(self, index: int) -> None:
        stats = self._stats[index]
        if stats.down_until is not None:
            stats.down_until = None
            log.info("replica.up", replica=stats.name)

    def stats(self) -> list[dict[str, Any]]:
        return [{"replica": s.name, "requests": s.requests, "failovers": s.failovers,
                 "broken": s.broken, "up": self.is_up(i)} for i, s in enumerate(self._stats)]

    # ---- Backend protocol -----------------------------------------------------------------
    @asynccontextmanager
    async def stream(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Open ``request`` on its home replica, failing over before the first event."""
        last: BackendError | None = None
        for index in self.order(request):
            stack = AsyncExitStack()
            try:
                events = await stack.enter_async_context(self._backends[index].stream(request))
            except FAILOVER_ERRORS as exc:
                await stack.aclose()
                self._stats[index].failovers += 1
                self._mark_down(index, exc)
                last = exc
                continue
            break
        else:
            assert last is not None
            raise type(last)(f"every replica failed ({len(self._backends)}): {last}") from last
        self._mark_up(index)
        self._stats[index].requests += 1
        try:
            async with stack:
                yield events
        except StreamBroken as exc:
            if is_connection_error(exc.__cause__):
                self._stats[index].broken += 1
                self._mark_down(index, exc)
            raise

    async def aclose(self) -> None:
        """Close every replica's backend (each close is idempotent)."""
        async with asyncio.TaskGroup() as tg:
            for b in self._backends:
                tg.create_task(b.aclose())

    async def __aenter__(self) -> MultiBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---- what the CLI's preflight asks ------------------------------------------------------
    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    @property
    def model(self) -> str | None:
        return getattr(self._backends[0], "model", None)

    @property
    def base_url(self) -> str:
        return ", ".join(self._names)

    @property
    def probe_completion_tokens(self) -> int:
        """Tokens the replicas' capability probes made them generate (charged to no problem)."""
        return sum(getattr(b, "probe_completion_tokens", 0) for b in self._backends)

    async def _each(self, call: Callable[[Any], Any]) -> list[Any]:
        """``call(backend)`` on every replica concurrently: results, or the BackendError."""
        async def one(b: Any) -> Any:
            try:
                return await call(b)
            except BackendError as exc:
                return exc

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(b)) for b in self._backends]
        return [t.result() for t in tasks]

    def _check_each(self, results: list[Any], what: str) -> None:
        """Replicas that failed with a connection-level error are marked down (an error
        only when every one did); any other error (a rejected request, an unknown model:
        the replicas are not configured alike) is raised, naming the replica, as the
        same error type with the same status code."""
        for i, r in enumerate(results):
            if isinstance(r, BackendError) and not isinstance(r, FAILOVER_ERRORS):
                raise _retold(r, f"replica {self._names[i]}: {r}")
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BackendError)]
        for i, r in failed:
            self._mark_down(i, r)
        if len(failed) == len(results):
            first = failed[0][1]
            raise _retold(first, f"no replica could be {what}: {first}")

    async def list_models(self) -> list[str]:
        """Models every reachable replica serves; replicas that cannot be reached are
        marked down (an error only when none can be)."""
        results = await self._each(lambda b: b.list_models())
        self._check_each(results, "reached")
        served: set[str] | None = None
        for r in results:
            if not isinstance(r, BackendError):
                served = set(r) if served is None else served & set(r)
        assert served is not None
        return sorted(served)

    async def probe(self, endpoint: str = "chat") -> Capabilities:
        """Probe every reachable replica; the result is what all of them support."""
        results = await self._each(lambda b: b.probe(endpoint))
        self._check_each(results, "probed")
        caps = [r for r in results if isinstance(r, Capabilities)]
        limits = [c.max_top_logprobs for c in caps if c.max_top_logprobs is not None]
        return Capabilities(
            n=all(c.n for c in caps),
            stream_usage=all(c.stream_usage for c in caps),
            continuous_usage=all(c.continuous_usage for c in caps),
            logprobs=all(c.logprobs for c in caps),
            max_top_logprobs=min(limits) if limits else None,
        )


def _retold(error: BackendError, message: str) -> BackendError:
    """``error`` with ``message``: the same type and attributes (a status code), raised
    from the original."""
    again = copy.copy(error)
    again.args = (message,)
    again.__cause__ = error
    return again
