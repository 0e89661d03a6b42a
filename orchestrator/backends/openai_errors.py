"""Failures talking to an OpenAI-compatible server, translated into :mod:`orchestrator.errors`.

:data:`TRANSLATIONS` is the one table: the first row whose test matches a failure names the
error class and the message users see. :func:`translate` applies it to a failure that
ended the retries, :func:`translate_deadline` to a request deadline that ran out. The
caller scrubs secrets from the result (:mod:`orchestrator.redact`) and raises it ``from``
the original.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from orchestrator.errors import (
    BackendError,
    EndpointUnreachable,
    ModelNotFound,
    RequestRejected,
    RetriesExhausted,
)
from orchestrator.retry import (
    MalformedStream,
    causes,
    certificate_refused,
    is_connection_error,
    is_retryable_status,
    status_code_of,
)

__all__ = [
    "TRANSLATIONS",
    "Failure",
    "Malformed",
    "ServerSaid",
    "describe",
    "error_message",
    "is_model_missing",
    "never_connected",
    "translate",
    "translate_deadline",
]


class Malformed(Exception):
    """A data line that is not a JSON object (garbage, truncated JSON)."""


class ServerSaid(Exception):
    """An error object the server sent inside its stream.

    ``status_code`` is the HTTP status the error object names when that status is one a
    retry may fix (vLLM puts ``"code": 503`` in it; some servers send ``"429"`` or only a
    type such as ``rate_limit_exceeded``), so :func:`orchestrator.retry.is_retryable`
    treats it as it would the same status on the response; otherwise None.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


_NEVER_CONNECTED = frozenset({"ConnectError", "ConnectTimeout", "gaierror"})
_MODEL_MISSING = re.compile(
    r"model\b.*\b(does not exist|not found|not exist|unknown|is not (served|available))"
    r"|(unknown|invalid|no such) model",
    re.IGNORECASE | re.DOTALL,
)


def error_message(exc: BaseException) -> str:
    """The server's own message of a failure (its JSON body's), else the exception's."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
        error = body.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


def describe(exc: BaseException) -> str:
    """``Type: message`` of a failure, with its direct cause."""
    text = f"{type(exc).__name__}: {error_message(exc)}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc:
        text += f" ({type(cause).__name__}: {cause})"
    return text


def is_model_missing(status: int, exc: BaseException) -> bool:
    if status not in (400, 404):
        return False
    body = getattr(exc, "body", None)
    code = str(body.get("code") or "") if isinstance(body, Mapping) else ""
    if code == "model_not_found":
        return True
    return bool(_MODEL_MISSING.search(error_message(exc)))


def never_connected(exc: BaseException) -> bool:
    """True when the chain of causes shows that no connection was ever made."""
    return any(isinstance(e, ConnectionRefusedError)
               or {cls.__name__ for cls in type(e).__mro__} & _NEVER_CONNECTED
               for e in causes(exc))


@dataclass(frozen=True, slots=True)
class Failure:
    """What is known about a failure when it is translated."""

    exc: BaseException
    base_url: str  # redacted
    model: str
    attempts: int
    v1_hint: str = ""  # said after a 404 (the base URL does not end in /v1)

    @property
    def status(self) -> int | None:
        return status_code_of(self.exc)

    @property
    def where(self) -> str:
        return f"{self.base_url} (model {self.model!r})"

    def fields(self) -> dict[str, object]:
        return {
            "where": self.where,
            "base_url": self.base_url,
            "model": self.model,
            "attempts": self.attempts,
            "status": self.status,
            "message": error_message(self.exc),
            "described": describe(self.exc),
            "exc": self.exc,
            "hint": self.v1_hint if self.status == 404 else "",
        }


@dataclass(frozen=True, slots=True)
class Translation:
    """One row of :data:`TRANSLATIONS`."""

    name: str
    matches: Callable[[Failure], bool]
    error: type[BackendError]
    template: str
    keeps_status: bool = False  # RequestRejected.status_code set from the response


def _has_status(f: Failure) -> bool:
    return f.status is not None


TRANSLATIONS: tuple[Translation, ...] = (
    Translation(
        "model not served",
        lambda f: f.status is not None and is_model_missing(f.status, f.exc),
        ModelNotFound,
        "model {model!r} is not served at {base_url} ({message}){served}",
    ),
    Translation(
        "retryable status, retried until giving up",
        lambda f: f.status is not None and is_retryable_status(f.status),
        RetriesExhausted,
        "{where}: gave up after {attempts} attempt(s); last status {status}: {message}",
    ),
    Translation(
        "status a retry cannot fix",
        _has_status,
        RequestRejected,
        "{where} answered {status}: {message}{hint}",
        keeps_status=True,
    ),
    Translation(
        "the server's TLS certificate failed verification (not retried)",
        lambda f: certificate_refused(f.exc),
        EndpointUnreachable,
        "cannot reach {base_url}: its TLS certificate failed verification "
        "({described}); for a certificate from a private CA, point SSL_CERT_FILE at "
        "that CA's bundle",
    ),
    Translation(
        "no connection ever made",
        lambda f: never_connected(f.exc),
        EndpointUnreachable,
        "cannot reach {base_url} after {attempts} attempt(s): {described}",
    ),
    Translation(
        "connection failures or malformed streams, retried until giving up",
        lambda f: is_connection_error(f.exc) or isinstance(f.exc, MalformedStream),
        RetriesExhausted,
        "{where}: gave up after {attempts} attempt(s); last error: {described}",
    ),
    Translation(
        "an error sent inside the stream",
        lambda f: isinstance(f.exc, ServerSaid),
        RequestRejected,
        "{where} sent an error in its stream: {exc}",
    ),
    Translation("anything else", lambda f: True, RequestRejected, "{where} failed: {described}"),
)


async def translate(
    failure: Failure, served: Callable[[], Awaitable[list[str] | None]]
) -> BackendError:
    """The error for a failure that ended the retries (first matching row of the table).

    ``served`` lists the endpoint's models; it is awaited only for a model not served, and
    ``None`` (the lookup failed) leaves the list out of the message."""
    row = next(t for t in TRANSLATIONS if t.matches(failure))
    fields = failure.fields()
    if row.error is ModelNotFound:
        available = await served()
        fields["served"] = f"; it serves: {', '.join(available)}" if available else ""
    message = row.template.format(**fields)
    if row.keeps_status:
        return RequestRejected(message, status_code=failure.status)
    return row.error(message)


def translate_deadline(
    last: BaseException | None, *, base_url: str, model: str, attempts: int, deadline: float
) -> BackendError:
    """The error for a request deadline (``--timeout``) that ran out: unreachable when
    the last failure shows no connection was made, else retries exhausted."""
    within = f"within the {deadline:g} s request deadline (--timeout)"
    if last is not None and never_connected(last):
        return EndpointUnreachable(
            f"cannot reach {base_url} after {attempts} attempt(s) {within}: {describe(last)}")
    tail = f"; last error: {describe(last)}" if last is not None else ""
    return RetriesExhausted(
        f"{base_url} (model {model!r}): no answer {within} after {attempts} attempt(s){tail}")
