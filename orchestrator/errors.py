"""The one exception tree of solverify.

Lower-level errors (openai, httpx, OS, JSON) are translated at the boundary where they
occur, with ``raise ... from exc`` so the cause stays visible.

    SolverifyError
    ├── ConfigError          bad arguments, policy specs, budgets
    ├── DataError            malformed problem or pool files, empty datasets
    ├── BackendError         anything that went wrong talking to a model server
    │   ├── EndpointUnreachable   connection refused / DNS / timeout before any response
    │   ├── ModelNotFound         the server does not serve the requested model
    │   ├── RequestRejected       a 4xx that retrying cannot fix (bad request, auth, ...)
    │   ├── RetriesExhausted      408/429/5xx or connection errors, retried until giving up
    │   └── StreamBroken          a stream failed after its first token (never retried)
    └── PolicyError          a policy returned something the runtime cannot carry out
"""

from __future__ import annotations


class SolverifyError(Exception):
    """Base class of every error solverify raises on purpose."""


class ConfigError(SolverifyError, ValueError):
    """Invalid configuration: arguments, policy specs, budgets."""


class DataError(SolverifyError, ValueError):
    """A problem or pool file that cannot be used as it is."""


class BackendError(SolverifyError):
    """A model server could not give what was asked."""


class EndpointUnreachable(BackendError):
    """No response at all from the endpoint (connection refused, DNS, timeout)."""


class ModelNotFound(BackendError):
    """The endpoint answered but does not serve the requested model."""


class RequestRejected(BackendError):
    """The endpoint refused the request in a way a retry cannot fix."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RetriesExhausted(BackendError):
    """A retryable failure persisted through every allowed attempt."""


class StreamBroken(BackendError):
    """A stream failed after its first token; the partial work is recorded, not retried."""


#: errors after which a problem cannot make progress: it ends with the error recorded
#: (orchestrator.loop), and an emulated n sends no more of its choices
#: (orchestrator.backends.streams)
FATAL_ERRORS: tuple[type[BackendError], ...] = (EndpointUnreachable, ModelNotFound, RequestRejected)


class PolicyError(SolverifyError):
    """A policy returned a decision the runtime cannot carry out."""


def error_text(error: BaseException) -> str:
    """How an error is written down: ``"ErrorType: message"``."""
    return f"{type(error).__name__}: {error}"
