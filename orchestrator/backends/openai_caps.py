"""What an OpenAI-compatible endpoint supports: the probe, and downgrading on a 400.

:func:`downgraded` is the one reading of a 400's message: it names the feature the server
refused (``continuous_usage_stats``, ``stream_options``, ``n``, logprobs) and returns the
capabilities without it. The probe (:func:`run_probe`) and a real request that is refused
(:meth:`OpenAIBackend._open_once <orchestrator.backends.openai_compat.OpenAIBackend>`)
both use it. :func:`run_probe` sends nothing itself: it is given a ``call`` that sends one
tiny streaming request and returns its chunks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from orchestrator.backends.base import Capabilities, TextDelta
from orchestrator.backends.openai_errors import Malformed, error_message
from orchestrator.backends.openai_wire import ChunkDecoder, decode, get, to_int
from orchestrator.defaults import PROBE_TOP_LOGPROBS
from orchestrator.errors import RequestRejected

__all__ = ["PROBE_PROMPT", "PROBE_TOP_LOGPROBS", "ProbeCall", "downgraded", "narrower",
           "probe_kwargs", "run_probe"]

PROBE_PROMPT = "Say OK."
_N_WORD = re.compile(r"\bn\b")


def downgraded(
    caps: Capabilities, message: str, *, n: int = 1, top_logprobs: int | None = None
) -> Capabilities | None:
    """The capabilities left after a 400 whose message is ``message``, for a request that
    asked for ``n`` choices and ``top_logprobs`` alternatives; None when the message names
    nothing this request used that could be dropped (the 400 then stands).

    Checked in this order: continuous usage, ``stream_options``, ``n``, logprobs (a smaller
    ``top_logprobs`` of :data:`PROBE_TOP_LOGPROBS` first, then none)."""
    message = message.lower()
    if caps.stream_usage and caps.continuous_usage and "continuous_usage_stats" in message:
        return dataclasses.replace(caps, continuous_usage=False)
    if caps.stream_usage and "stream_options" in message:
        return dataclasses.replace(caps, stream_usage=False, continuous_usage=False)
    if n > 1 and caps.n and _N_WORD.search(message):
        return dataclasses.replace(caps, n=False)
    if top_logprobs is not None and caps.logprobs and "logprob" in message:
        asked = top_logprobs
        if caps.max_top_logprobs is not None:
            asked = min(asked, caps.max_top_logprobs)
        lower = [k for k in PROBE_TOP_LOGPROBS if k < asked]
        if lower:
            return dataclasses.replace(caps, max_top_logprobs=lower[0])
        return dataclasses.replace(caps, logprobs=False, max_top_logprobs=None)
    return None


def _choices(chunk: Any) -> list[Any]:
    """A probe chunk's ``choices`` when it is a list, else none."""
    choices = get(chunk, "choices")
    return choices if isinstance(choices, list) else []


def _decoded(decoder: ChunkDecoder, chunk: Any) -> list[Any]:
    """A probe chunk's events; none for a chunk the decoder cannot read."""
    try:
        return decode(decoder, chunk)
    except Malformed:
        return []


def narrower(a: Capabilities, b: Capabilities) -> Capabilities:
    """What both ``a`` and ``b`` allow, field by field: a capability one of them turned
    off stays off (two requests refused for different features at once)."""
    logprobs = a.logprobs and b.logprobs
    limits = [x for x in (a.max_top_logprobs, b.max_top_logprobs) if x is not None]
    return Capabilities(
        n=a.n and b.n,
        stream_usage=a.stream_usage and b.stream_usage,
        continuous_usage=a.continuous_usage and b.continuous_usage,
        logprobs=logprobs,
        max_top_logprobs=(min(limits) if limits else None) if logprobs else None,
    )


def stream_options_of(caps: Capabilities) -> dict[str, bool] | None:
    """The ``stream_options`` a request sends with these capabilities (None: leave it out)."""
    if not caps.stream_usage:
        return None
    options = {"include_usage": True}
    if caps.continuous_usage:
        options["continuous_usage_stats"] = True
    return options


def probe_kwargs(
    model: str,
    endpoint: str,
    *,
    n: int,
    stream_options: Mapping[str, bool] | None,
    top_logprobs: int | None = None,
) -> dict[str, Any]:
    """The body of one probe request (``max_tokens=1``)."""
    kwargs: dict[str, Any] = {"model": model, "stream": True, "max_tokens": 1}
    if endpoint == "chat":
        kwargs["messages"] = [{"role": "user", "content": PROBE_PROMPT}]
        if top_logprobs is not None:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = top_logprobs
    else:
        kwargs["prompt"] = PROBE_PROMPT
        if top_logprobs is not None:
            kwargs["logprobs"] = top_logprobs
    if n != 1:
        kwargs["n"] = n
    if stream_options is not None:
        kwargs["extra_body"] = {"stream_options": dict(stream_options)}
    return kwargs


class ProbeCall(Protocol):
    """Sends one probe request and returns its chunks; failures are already translated
    (a refusal is a :class:`~orchestrator.errors.RequestRejected` with its status)."""

    def __call__(
        self, *, n: int, stream_options: Mapping[str, bool] | None,
        top_logprobs: int | None = None,
    ) -> Awaitable[list[Any]]: ...


async def run_probe(call: ProbeCall, endpoint: str) -> Capabilities:
    """Learn what the endpoint supports with tiny requests sent through ``call``.

    First a stream asking for ``n=2`` and continuous usage (dropping what a 400 refuses,
    see :func:`downgraded`): whether two choices come back, whether a closing usage chunk
    and running counts do. Then the largest ``top_logprobs`` of :data:`PROBE_TOP_LOGPROBS`
    that the server accepts (400/422: try the next) and answers with logprobs."""
    caps = Capabilities(n=True, stream_usage=True, continuous_usage=True)
    while True:
        n = 2 if caps.n else 1
        try:
            chunks = await call(n=n, stream_options=stream_options_of(caps))
            break
        except RequestRejected as exc:
            if exc.status_code != 400:
                raise
            new = downgraded(caps, error_message(exc.__cause__ or exc), n=n)
            if new is None:
                raise
            caps = new
    # a chunk of an odd shape ("choices": 5) is no evidence of anything (it used to raise
    # a bare TypeError out of the probe; found by review)
    chunks = [ch for ch in chunks if isinstance(ch, Mapping)]
    indices = {to_int(get(c, "index", 0)) for ch in chunks for c in _choices(ch)
               if isinstance(c, Mapping)}
    n_ok = n > 1 and len(indices) >= n
    usage_ok = any(isinstance(get(ch, "usage"), Mapping) and not _choices(ch) for ch in chunks)
    continuous_ok = any(isinstance(get(ch, "usage"), Mapping) and _choices(ch)
                        for ch in chunks)
    # a server that counts on every chunk also closes with a count: a probe stream
    # that lost its closing chunk (a flaky proxy) must not turn usage off for good
    usage_ok = usage_ok or continuous_ok

    logprobs_ok, max_top = False, None
    for k in PROBE_TOP_LOGPROBS:
        try:
            chunks = await call(n=1, stream_options=None, top_logprobs=k)
        except RequestRejected as exc:
            if exc.status_code in (400, 422):
                continue
            raise
        decoder = ChunkDecoder(n=1, chat=endpoint == "chat")
        entries = [
            lp
            for ch in chunks
            for ev in _decoded(decoder, ch)
            if isinstance(ev, TextDelta)
            for lp in ev.logprobs
        ]
        if entries:
            logprobs_ok, max_top = True, k
        break
    return Capabilities(
        n=n_ok,
        stream_usage=usage_ok,
        continuous_usage=continuous_ok,
        logprobs=logprobs_ok,
        max_top_logprobs=max_top,
    )
