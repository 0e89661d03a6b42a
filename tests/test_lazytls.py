"""The openai client's transport (orchestrator.backends.lazytls): an ``http://`` endpoint
never builds an SSL context; ``https://``, also reached through a redirect from an
``http://`` base URL, is verified with the default TLS set-up (``SSL_CERT_FILE`` read),
and a certificate that fails verification is refused at once, not retried.

The HTTPS server is the local test server with a self-signed certificate for 127.0.0.1
made for these tests (tests/data/tls, valid to 2126)."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from orchestrator.backends.base import Capabilities, GenerationRequest, TextDelta
from orchestrator.backends.lazytls import LazyTLSTransport
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.errors import EndpointUnreachable
from orchestrator.retry import causes
from tests.openai_server import OpenAIServer, serve_handler

TLS = Path(__file__).resolve().parent / "data" / "tls"
CERT = TLS / "cert.pem"


def _chat() -> GenerationRequest:
    return GenerationRequest(kind="solve", max_tokens=8,
                             messages=({"role": "user", "content": "say hello"},))


async def _text(backend: OpenAIBackend) -> str:
    out = []
    async with backend.stream(_chat()) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                out.append(event.text)
    return "".join(out)


def _transport(backend: OpenAIBackend) -> LazyTLSTransport:
    transport = backend._client._client._transport
    assert isinstance(transport, LazyTLSTransport)
    return transport


def _untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The system's trust only, which does not hold the test certificate."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


@pytest.fixture
async def https_server() -> AsyncIterator[OpenAIServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT, TLS / "key.pem")
    async with OpenAIServer(ssl_context=context) as server:
        yield server


@pytest.fixture
async def redirector(https_server: OpenAIServer) -> AsyncIterator[str]:
    """An ``http://`` base URL whose every request is sent on (307) to the HTTPS server."""
    target = https_server.url.removesuffix("/v1")

    async def forward(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target + request.path_qs)

    runner, root = await serve_handler(forward)
    try:
        yield root + "/v1"
    finally:
        await runner.cleanup()


def _backend(url: str) -> OpenAIBackend:
    return OpenAIBackend(url, "test-model", capabilities=Capabilities(),
                         backoff_base=0.001, backoff_cap=0.01)


PROXY_VARS = [v for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
              for v in (base, base.upper())]


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch):
    for name in PROXY_VARS:  # these tests are about the direct transport
        monkeypatch.delenv(name, raising=False)


async def test_a_plain_http_endpoint_never_loads_a_ca_bundle(openai_server, monkeypatch):
    loads = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self, *args, **kwargs):
        loads.append(args or kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)
    backend = _backend(openai_server.url)
    try:
        assert await _text(backend)
        assert loads == []
        assert not _transport(backend).tls_built
    finally:
        await backend.aclose()


async def test_https_is_verified_with_the_default_setup_built_at_the_first_request(
        https_server, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))
    backend = _backend(https_server.url)
    try:
        assert not _transport(backend).tls_built  # nothing built before a request
        assert await _text(backend)
        assert _transport(backend).tls_built
    finally:
        await backend.aclose()


async def _assert_refused_at_once(url: str, https_server: OpenAIServer) -> None:
    """A request to ``url`` is refused with a clear error, and not retried (it would fail
    the same way again); nothing reached the HTTPS server."""
    backend = _backend(url)
    try:
        with capture_logs() as logged, pytest.raises(EndpointUnreachable) as caught:
            await _text(backend)
    finally:
        await backend.aclose()
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in causes(caught.value))
    assert "TLS certificate failed verification" in str(caught.value)
    assert "SSL_CERT_FILE" in str(caught.value)
    assert [e for e in logged if e["event"] == "backend.retry"] == []
    assert https_server.generation_requests() == []


async def test_an_untrusted_https_certificate_is_refused_at_once(https_server, monkeypatch):
    _untrusted(monkeypatch)
    await _assert_refused_at_once(https_server.url, https_server)


async def test_an_http_base_url_redirecting_to_https_is_followed_and_verified(
        https_server, redirector, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(CERT))
    backend = _backend(redirector)
    try:
        assert await _text(backend)
        assert _transport(backend).tls_built
        assert len(https_server.generation_requests()) == 1
    finally:
        await backend.aclose()


async def test_a_redirect_to_an_untrusted_https_server_is_refused(
        https_server, redirector, monkeypatch):
    _untrusted(monkeypatch)
    await _assert_refused_at_once(redirector, https_server)


async def test_a_replica_whose_certificate_is_refused_is_failed_over(
        https_server, openai_server, monkeypatch):
    """MultiBackend: the refusal is an EndpointUnreachable, so a replica with an untrusted
    certificate is marked down and its requests go to the next one, each at once."""
    from orchestrator.backends.multi import MultiBackend

    _untrusted(monkeypatch)
    backend = MultiBackend([_backend(https_server.url), _backend(openai_server.url)],
                           names=["https", "http"])
    try:
        requests = [dataclasses.replace(_chat(), affinity=f"p{i}") for i in range(4)]
        first = next(r for r in requests if next(iter(backend.order(r))) == 0)
        with capture_logs() as logged:
            for request in (first, *requests):  # the first one's home is the https replica
                async with backend.stream(request) as events:
                    assert [e async for e in events if isinstance(e, TextDelta)]
        https, http = backend.stats()
    finally:
        await backend.aclose()
    assert https_server.generation_requests() == []
    assert http["requests"] == 5
    assert https["requests"] == 0 and https["failovers"] == 1 and not https["up"]
    assert [e for e in logged if e["event"] == "backend.retry"] == []


@pytest.mark.parametrize("var", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
async def test_a_proxy_in_the_environment_is_used(openai_server, monkeypatch, var):
    """A transport given to the HTTP client turns off the environment's proxies, so a
    user behind a proxy got EndpointUnreachable or went around it (found by review):
    with a proxy variable set, requests go through it (here a proxy that forwards
    nothing and answers GET /models itself)."""
    seen: list[str] = []

    async def proxy(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({"object": "list", "data": [{"id": "via-proxy"}]})

    runner, root = await serve_handler(proxy)
    monkeypatch.setenv(var, root)
    backend = _backend(openai_server.url)
    try:
        assert await backend.list_models() == ["via-proxy"]
    finally:
        await backend.aclose()
        await runner.cleanup()
    assert seen and seen[0].startswith("GET http://127.0.0.1:")  # absolute form: a proxy's
