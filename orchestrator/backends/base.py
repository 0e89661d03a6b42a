"""The Backend seam: one streaming call plus ``aclose()``.

A backend turns a :class:`GenerationRequest` into an async stream of :class:`StreamEvent`
values. The stream is an async context manager: leaving it (normally, by an exception, or
by cancellation) closes the underlying connection, which is how a server learns that a
request was aborted.

Token accounting contract
-------------------------
* ``TextDelta.tokens`` is the backend's count of new completion tokens for that choice in
  this delta: exact when it comes from logprobs entries or from per-choice usage, else an
  estimate (``estimated=True``; one token per non-empty chunk).
* ``UsageReport`` is the server's own request-level count (all choices together). With
  ``final=False`` it is a running count (vLLM's ``continuous_usage_stats``); with
  ``final=True`` it is the closing usage chunk. The ledger trusts the latest server report
  over the sum of deltas, so a cancelled stream is charged what the server generated up
  to the last chunk received.
* Retries happen inside the backend only before the first event of a stream has been
  yielded; after that a failure raises :class:`~orchestrator.errors.StreamBroken`.
* Optional ``cut_grace`` attribute (seconds): a backend whose server counts tokens that
  may still be on their way when a stream is closed (a real HTTP server) sets it > 0, and
  the runtime then settles each stream it stops before closing it (read to the end of the
  next burst of chunks, waiting at most ``cut_grace``; see :mod:`orchestrator.runtime`).
  Backends that count only what they hand over (fake, replay) leave it out: their streams
  are cancelled at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from orchestrator.defaults import MAX_TOP_LOGPROBS
from orchestrator.types import RequestKind, TokenLogprob


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation request. Exactly one of ``prompt`` (completions) or ``messages``
    (chat) is set. ``n`` asks for that many choices of the same prompt; ``top_logprobs``
    (``None`` = no logprobs) asks for per-token logprobs with that many alternatives.
    ``affinity`` is the request's routing key (the runtime sets the problem id): requests
    with one key belong on one replica, whose prefix cache then holds their prompt
    (:class:`~orchestrator.backends.multi.MultiBackend` routes by it; the OpenAI backend
    sends it as the ``X-Session-ID`` header, which a router's session affinity keys on).
    ``verifies`` is, for a verification, the id of the solution it verifies."""

    kind: RequestKind
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    affinity: str | None = None
    verifies: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenerationRequest needs exactly one of prompt= or messages=")
        if self.n < 1:
            raise ValueError(f"GenerationRequest.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"GenerationRequest.max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def endpoint(self) -> str:
        return "completions" if self.prompt is not None else "chat"


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New text for choice ``choice``; ``finish_reason`` is set on the choice's last delta."""

    choice: int
    text: str
    tokens: int
    estimated: bool = False
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The server's own token count for the whole request so far (or at the end).

    ``cached_prompt_tokens``: prompt tokens served from the server's prefix cache, when the
    server says (vLLM: in the final usage chunk only, with ``--enable-prompt-tokens-details``).
    """

    prompt_tokens: int
    completion_tokens: int
    final: bool
    cached_prompt_tokens: int | None = None


StreamEvent = TextDelta | UsageReport


@runtime_checkable
class Backend(Protocol):
    """What the runtime needs from a model server."""

    def stream(
        self, request: GenerationRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[StreamEvent]]:
        """Open one streaming generation; the context manager closes it."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an endpoint was found (or assumed) to support."""

    n: bool = True
    stream_usage: bool = True
    continuous_usage: bool = True
    logprobs: bool = True
    max_top_logprobs: int | None = MAX_TOP_LOGPROBS

    def describe(self) -> Sequence[str]:
        return [
            f"n={'yes' if self.n else 'no'}",
            f"stream_usage={'yes' if self.stream_usage else 'no'}",
            f"continuous_usage={'yes' if self.continuous_usage else 'no'}",
            f"logprobs={'yes' if self.logprobs else 'no'}",
            f"max_top_logprobs={self.max_top_logprobs}",
        ]
