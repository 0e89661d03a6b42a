"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.openai_server import OpenAIServer


@pytest.fixture
async def openai_server() -> AsyncIterator[OpenAIServer]:
    """A real local OpenAI-compatible server (see tests/openai_server.py); configure it by
    setting its attributes (``responder``, ``token_delay``, ...) or its fault methods."""
    async with OpenAIServer() as server:
        yield server
