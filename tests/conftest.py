"""Shared fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.openai_server import OpenAIServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def openai_server() -> AsyncIterator[OpenAIServer]:
    """A real local OpenAI-compatible server (see tests/openai_server.py); configure it by
    setting its attributes (``responder``, ``token_delay``, ...) or its fault methods."""
    async with OpenAIServer() as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """The test server as its own process (``python -m tests.openai_server``, with an
    imitated prefix cache of 4-token blocks), for tests that run the CLI as a user does;
    yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.openai_server", "--port", str(port), "--model",
         "test-model", "--prefix-cache-block", "4"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("test server did not start")
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


def run_solverify(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``solverify ARGS`` in a subprocess, logs at warning level."""
    env = {**os.environ, "SOLVERIFY_LOG": "warning"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)
