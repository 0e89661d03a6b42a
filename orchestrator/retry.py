"""Retry and pacing decisions for talking to model servers, as small pure functions.

The constants that shape retrying are defined in :mod:`orchestrator.defaults` and named
here too. The backend asks three questions:

* :func:`is_retryable` — may this failure go away if the same request is sent again?
  Connection errors and timeouts, and the statuses in :data:`RETRYABLE_STATUS_CODES`;
  not a server certificate that failed verification (:func:`certificate_refused`).
* :func:`next_delay` — how long to wait before the next attempt? The server's
  ``Retry-After`` (``retry-after-ms``, delta-seconds or an HTTP date) when it sent one,
  capped at :data:`RETRY_AFTER_CAP`; otherwise exponential backoff with full jitter.
* :func:`build_retrying` — a ready ``tenacity.AsyncRetrying`` that puts both together and
  stops after ``max_attempts`` attempts, re-raising the last failure unchanged.

:func:`make_throttler` turns a requests-per-second limit into a throttler (a backend's
``rate_limit``; one throttler given to several backends is a limit on them together, as
the CLI's ``--rate``); the run-wide ``rate`` of :mod:`orchestrator.limiter` builds its own
the same way.

The backend retries only while opening a stream, i.e. before the first event has been
handed to its consumer; a failure after that is never retried. A stream whose data was
malformed before any token arrived (:class:`MalformedStream`) is retried like a stream
cut before its first event.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import tenacity
from asyncio_throttle import Throttler

from orchestrator import defaults
from orchestrator.errors import ConfigError

RETRYABLE_STATUS_CODES: frozenset[int] = frozenset({408, 409, 429, 500, 502, 503, 504})
"""408 request timeout, 409 conflict (a lock timeout on some servers), 429 rate limited,
500/502/503/504 server or gateway trouble."""

DEFAULT_MAX_ATTEMPTS = defaults.MAX_ATTEMPTS
"""Attempts in all (the first one included)."""

BACKOFF_BASE = defaults.BACKOFF_BASE_S
"""Seconds; the n-th retry waits uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**(n-1)))."""

BACKOFF_CAP = defaults.BACKOFF_CAP_S
"""Seconds; the most a jittered backoff may wait."""

RETRY_AFTER_CAP = defaults.RETRY_AFTER_CAP_S
"""Seconds; a longer ``Retry-After`` is shortened to this."""

RandomFn = Callable[[], float]


class MalformedStream(Exception):
    """A stream sent data that is not a JSON chunk before its first token: retryable."""

SleepFn = Callable[[float], Awaitable[None]]


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status carried by an exception (``status_code`` attribute), else None."""
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def is_retryable_status(status_code: int) -> bool:
    return status_code in RETRYABLE_STATUS_CODES


def is_connection_error(exc: BaseException) -> bool:
    """True for failures to get any response at all: transport errors and timeouts.

    Recognised by class name along the MRO, so this works for the ``openai`` client
    whichever HTTP package it sits on (``APIConnectionError`` and ``APITimeoutError``,
    ``httpx``/``httpx2`` transport errors) and for plain ``OSError``/``TimeoutError``.
    """
    if isinstance(exc, (OSError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"APIConnectionError", "APITimeoutError", "TransportError"})


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__``), and so on,
    each once (a chain that loops ends where it would repeat)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def certificate_refused(exc: BaseException) -> bool:
    """True when the chain of causes holds a failed verification of the server's TLS
    certificate: the same request would fail the same way (an untrusted or expired
    certificate, a host name it does not name)."""
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(exc))


def is_retryable(exc: BaseException) -> bool:
    """May sending the same request again succeed? Never true for cancellation."""
    if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
        return False
    if isinstance(exc, MalformedStream):
        return True
    code = status_code_of(exc)
    if code is not None:
        return is_retryable_status(code)
    return is_connection_error(exc) and not certificate_refused(exc)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date.

    Returns None when the value is missing or unreadable; a date in the past gives 0.
    Fractional seconds are accepted (not standard, but some servers send them).
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        seconds = email.utils.mktime_tz(parsed) - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def retry_after_from_headers(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or ``Retry-After`` (in that order)."""
    if headers is None:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            ms = float(millis)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms):
            return max(0.0, ms / 1000.0)
    return parse_retry_after(lowered.get("retry-after"), now=now)


def retry_after_of(exc: BaseException) -> float | None:
    """The ``Retry-After`` of the response an exception carries, if any."""
    response: Any = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    return retry_after_from_headers(headers)


def backoff_delay(
    retry_number: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    rng: RandomFn = random.random,
) -> float:
    """Full-jitter exponential backoff for the ``retry_number``-th retry (1-based)."""
    if retry_number < 1:
        raise ValueError(f"retry_number must be >= 1, got {retry_number}")
    ceiling = min(cap, base * 2.0 ** min(retry_number - 1, 62))
    return ceiling * rng()


def next_delay(
    exc: BaseException,
    retry_number: int,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    retry_after_cap: float = RETRY_AFTER_CAP,
    rng: RandomFn = random.random,
) -> float:
    """Seconds to wait before retry ``retry_number`` after failure ``exc``."""
    asked = retry_after_of(exc)
    if asked is not None:
        return min(asked, retry_after_cap)
    return backoff_delay(retry_number, base=base, cap=cap, rng=rng)


def build_retrying(
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    *,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
    retry_after_cap: float = RETRY_AFTER_CAP,
    rng: RandomFn = random.random,
    sleep: SleepFn = asyncio.sleep,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> tenacity.AsyncRetrying:
    """A fresh ``AsyncRetrying``: retries :func:`is_retryable` failures, waits
    :func:`next_delay`, stops after ``max_attempts`` attempts and re-raises the last
    failure itself (not a ``tenacity.RetryError``)."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is None:
            return 0.0
        return next_delay(
            exc,
            state.attempt_number,
            base=base,
            cap=cap,
            retry_after_cap=retry_after_cap,
            rng=rng,
        )

    return tenacity.AsyncRetrying(
        sleep=sleep,
        stop=tenacity.stop_after_attempt(max_attempts),
        wait=wait,
        retry=tenacity.retry_if_exception(is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )


def make_throttler(rate: float | None) -> Throttler | None:
    """A throttler letting ``rate`` requests per second through (None: no limit).

    The burst is ``floor(rate)`` requests (at least 1) per ``burst / rate`` seconds, so the
    average rate is exact and no burst is larger than a second's worth: 2.5 -> 2 requests
    every 0.8 s, 0.5 -> 1 request every 2 s."""
    if rate is None:
        return None
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"rate must be a positive number of requests/second, got {rate!r}")
    burst = max(1, int(rate))
    return Throttler(rate_limit=burst, period=burst / rate)
