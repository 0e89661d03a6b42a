"""The live suite's server: ONE bundled CPU vLLM for the whole ``pytest -m live`` session.

``vllm_server`` provisions (idempotent: ~0.1 s when done, ~3 min from scratch), starts the
server on a free port, waits until it answers (~45 s on the 2-core dev machine) and stops it
when the session ends. It is only set up when a live test asks for it, so the fast suite
(``pytest``, which deselects ``live``) never starts it. A provisioning or start failure is an
error of every live test, with the server's message and what to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from orchestrator import serve
from orchestrator.backends.base import Capabilities
from orchestrator.backends.openai_compat import OpenAIBackend
from orchestrator.serve import VLLMServer
from tests.live.livekit import NOTES, note


@pytest.fixture(scope="session")
def vllm_server(pytestconfig: pytest.Config) -> Iterator[VLLMServer]:
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[live] {line}")

    t0 = time.monotonic()
    paths = serve.provision(progress=say)
    provisioned = time.monotonic() - t0
    server = VLLMServer(paths)
    say(f"starting vLLM on {server.base_url} (log: {server.log_path})")
    server.start()
    try:
        healthy = asyncio.run(server.wait_healthy_async())
        note(f"server: provisioning check {provisioned:.1f}s, healthy after {healthy:.1f}s")
        say(f"healthy after {healthy:.1f}s")
        yield server
    finally:
        t1 = time.monotonic()
        asyncio.run(server.stop_async())
        note(f"server: stopped in {time.monotonic() - t1:.1f}s")


@pytest.fixture
async def backend(vllm_server: VLLMServer) -> AsyncIterator[OpenAIBackend]:
    """A backend told what the server supports (the probe test checks it is so): probing
    spends a few tokens, which would upset the ledger-versus-/metrics comparisons."""
    async with OpenAIBackend(vllm_server.base_url, vllm_server.model_name,
                             capabilities=Capabilities()) as b:
        yield b


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if NOTES:
        terminalreporter.section("live numbers")
        for line in NOTES:
            terminalreporter.write_line(line)
