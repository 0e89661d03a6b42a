"""The HTTP transport of the openai client, with its TLS set-up built at the first
``https://`` request instead of when the client is made.

The default transport of the HTTP package under the openai client builds an SSL context
(reading the CA bundle: some 25-30 ms of CPU on the dev box) as it is constructed, which
a local ``http://`` endpoint (the usual vLLM) never uses; at start-up that is about a
tenth of what ``solverify run`` costs beyond ``import openai``
(``benchmarks/startup.py``). :class:`LazyTLSTransport` sends ``http://`` requests through
a pool of its own and every other request (``https://``, also one an ``http://`` base URL
redirects to) through the package's default transport, built unchanged, with the
default TLS set-up and the same pool limits, when the first such request comes. So TLS
is what it would have been, with one difference: ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are
read at that first request, not when the backend is made.

The ``http://`` pool is given a TLS context that trusts nothing (certificates and host
names required, no CA loaded), so that if it ever opened TLS the handshake would fail
rather than go unverified.
"""

from __future__ import annotations

import ssl
from types import ModuleType, TracebackType
from typing import Any

__all__ = ["LazyTLSTransport"]


class LazyTLSTransport:
    """An ``AsyncBaseTransport`` of ``http`` (httpx or httpx2, the package the openai
    client sits on): plain HTTP through one pool, the rest through the package's default
    transport, made at its first request."""

    def __init__(self, http: ModuleType, limits: Any) -> None:
        self._http = http
        self._limits = limits
        self._plain = http.AsyncHTTPTransport(
            verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), limits=limits)
        self._tls: Any = None

    @property
    def tls_built(self) -> bool:
        """Whether the TLS transport (and its SSL context) has been made."""
        return self._tls is not None

    def _tls_transport(self) -> Any:
        if self._tls is None:
            self._tls = self._http.AsyncHTTPTransport(limits=self._limits)
        return self._tls

    async def handle_async_request(self, request: Any) -> Any:
        if request.url.scheme == "http":
            return await self._plain.handle_async_request(request)
        return await self._tls_transport().handle_async_request(request)

    async def aclose(self) -> None:
        try:
            await self._plain.aclose()
        finally:
            if self._tls is not None:
                await self._tls.aclose()

    async def __aenter__(self) -> LazyTLSTransport:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc: BaseException | None = None,
                        tb: TracebackType | None = None) -> None:
        await self.aclose()
