"""Default values used in more than one place, written once.

Every module that needs one of these imports it from here (the CLI's ``--help`` texts
too), so a default cannot drift between the library, the CLI and the benchmarks. This
module imports nothing.
"""

from __future__ import annotations

# ---------------------------------------------------------------------- requests
REQUEST_TIMEOUT_S = 30.0
"""Request deadline (s): a stream's first event, retries included, or a small call's
answer (``--timeout``)."""

IDLE_TIMEOUT_S = 20.0
"""Seconds a stream (or any response) may send no bytes before it counts as broken
(``--idle-timeout``)."""

CONNECT_TIMEOUT_S = 10.0
"""Seconds to establish a connection."""

KEEPALIVE_EXPIRY_S = 2.0
"""Seconds an idle pooled HTTP connection is kept for reuse. Below the 5 s after which
uvicorn-based servers (vLLM, llama-cpp-python) close an idle connection: with equal
timeouts (the HTTP client's default is also 5 s) a request sent on a connection the
server is closing at that moment fails with a connection error and is retried."""

CUT_GRACE_S = 1.0
"""Seconds the runtime waits for a stopped stream's next step before cutting it anyway
(HTTP backends; see :mod:`orchestrator.reader`, "Cutting a stream exactly")."""

# ---------------------------------------------------------------------- retries
MAX_ATTEMPTS = 4
"""Attempts in all (the first one included)."""

BACKOFF_BASE_S = 0.5
"""Seconds; the n-th retry waits uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**(n-1)))."""

BACKOFF_CAP_S = 8.0
"""Seconds; the most a jittered backoff may wait."""

RETRY_AFTER_CAP_S = 60.0
"""Seconds; a longer ``Retry-After`` is shortened to this."""

# ---------------------------------------------------------------------- a run
CONCURRENCY = 16
"""Requests in flight across a run (``run_batch``, ``solverify run --concurrency``,
``bench record``, ``solverify demo``)."""

MAX_N = 16
"""Largest ``n`` put in one request; a bigger ``Sample(k)`` is split."""

MAX_TOP_LOGPROBS = 20
"""The most ``top_logprobs`` alternatives asked for (OpenAI's and vLLM's default cap):
what an endpoint is assumed to accept before it is probed, what a verifier asks for."""

PROBE_TOP_LOGPROBS: tuple[int, ...] = (MAX_TOP_LOGPROBS, 5, 1)
"""``top_logprobs`` values the capability probe tries, largest first (also the steps a
refused ``top_logprobs`` is lowered through)."""
