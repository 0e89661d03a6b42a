"""A real ``vllm-router`` (PyPI ``vllm-router``, a Rust binary) in front of local workers,
for the router tests: fast ones over tests/openai_server.py, live ones over vLLM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import free_port

ROUTER = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
#: how long the router may take to see every worker healthy (it polls their /health)
READY_S = 60.0


def replicas_by_affinity(servers) -> dict[str, set[int]]:
    """Per ``X-Session-ID`` value, the indices of the test servers that received it."""
    from orchestrator.backends.openai_compat import AFFINITY_HEADER

    where: dict[str, set[int]] = {}
    for i, s in enumerate(servers):
        for r in s.generation_requests():
            key = r.headers.get(AFFINITY_HEADER.lower())
            if key:
                where.setdefault(key, set()).add(i)
    return where


def router_installed() -> bool:
    return os.access(ROUTER, os.X_OK)


@contextlib.asynccontextmanager
async def vllm_router(policy: str, worker_urls: Sequence[str], *,
                      extra: Sequence[str] = ("--disable-retries",)) -> AsyncIterator[str]:
    """A vllm-router subprocess on a free 127.0.0.1 port in front of ``worker_urls``
    (``http://host:port``, or base URLs ending in /v1); yields the router's /v1 URL and
    stops it when the block ends."""
    port = free_port()
    urls = [u.removesuffix("/").removesuffix("/v1") for u in worker_urls]
    proc = await asyncio.create_subprocess_exec(
        ROUTER, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
        "--worker-urls", *urls, "--log-level", "warning", *extra,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_S
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            if proc.returncode is not None or loop.time() > deadline:
                pytest.fail(f"vllm-router did not start (exit {proc.returncode})")
            await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
