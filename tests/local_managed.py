"""A :class:`~orchestrator.serve.ManagedServer` that runs the local OpenAI test server
(``python -m tests.openai_server``) as its process: the demo's and ``serve``'s process
handling (records, start-up wait, signals, stop) tested without vLLM."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from orchestrator.serve import ManagedServer

REPO = Path(__file__).resolve().parent.parent


class LocalTestServer(ManagedServer):
    kind = "test-server"
    #: seconds per streamed token (slow enough that a run is still going when signalled)
    token_delay = float(os.environ.get("SOLVERIFY_TEST_TOKEN_DELAY", "0.02"))

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_name", "test-model")
        super().__init__(*args, **kwargs)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tests.openai_server", "--port", str(self.port),
                "--model", self.model_name, "--delay", str(self.token_delay)]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["PYTHONPATH"] = str(REPO)
        env["PYTHONUNBUFFERED"] = "1"
        return env


class ScriptServer(ManagedServer):
    """Runs ``python -c SCRIPT`` (for start-up failures: dies, or goes silent)."""

    kind = "script-server"

    def __init__(self, script: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-u", "-c", self.script]
