"""Client CPU per streamed sample: solverify's OpenAI backend against a bare openai loop.

    python -m benchmarks.client_cpu [--samples 512] [--tokens 128] [--rounds 5]
        [--in-flight 16] [--n 8] [--n 1] [--base-url URL --model NAME] [--json OUT]

Both clients stream the same requests from the same server, in one process, in
alternating rounds (bare, solverify, bare, solverify, ...), ``--in-flight`` requests at a
time; each round streams ``--samples`` samples as requests of ``n`` choices. What is
measured is this process's CPU time (``time.process_time``: user + system, every thread)
over the round, divided by the samples it streamed. The server runs in a separate
process (``tests/openai_server.py``, run from a checkout; its CPU is not counted) unless
``--base-url`` names one (a real vLLM, say).

The bare loop is what a user of ``openai.AsyncOpenAI`` writes: ``create(stream=True,
n=...)`` and ``async for chunk in stream``, collecting each choice's text. It asks for the
same ``stream_options`` as solverify (``include_usage`` and vLLM's
``continuous_usage_stats``), so both read the same bytes. solverify's side is
``OpenAIBackend.stream`` on a ``GenerationRequest``, collecting each choice's text and
token counts from its events (the runtime above it is not part of this measure).

The ratio printed per ``n`` is the median over rounds of solverify's CPU per sample
divided by the bare loop's in the neighbouring round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

PROMPT = "Solve: what is 6 * 7? Think step by step, then give the final answer."
MESSAGES = ({"role": "user", "content": PROMPT},)
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
WAIT_S = 120.0


# ---------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int, tokens: int | None) -> None:
    """Run the local test server (a checkout's tests/openai_server.py) answering ``tokens``
    tokens per choice; None: its default answer (``The final answer is \\boxed{42}.``)."""
    from tests.openai_server import OpenAIServer

    def responder(body: Any) -> list[list[str]]:
        assert tokens is not None
        count = min(tokens, int(body.get("max_tokens") or tokens))
        return [[f" w{i}" for i in range(count)]]

    async def main() -> None:
        async with OpenAIServer(responder if tokens else None, models=None, port=port):
            await asyncio.Event().wait()

    asyncio.run(main())


class ServerProcess:
    """The local test server in a process of its own (its CPU is not this process's)."""

    def __init__(self, tokens: int | None) -> None:
        self.port = _free_port()
        root = Path(__file__).resolve().parent.parent
        if not (root / "tests" / "openai_server.py").exists():
            raise SystemExit("the local server needs a checkout (tests/openai_server.py); "
                             "or pass --base-url")
        code = f"from benchmarks.client_cpu import serve; serve({self.port}, {tokens})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=root)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the local server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the local server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------- the two clients
Runner = Callable[[int], Awaitable[int]]  # one request of n choices -> tokens streamed


def bare_runner(client: Any, model: str, tokens: int) -> Runner:
    async def one(n: int) -> int:
        texts = [""] * n
        stream = await client.chat.completions.create(
            model=model, messages=list(MESSAGES), stream=True, n=n, max_tokens=tokens,
            temperature=1.0, extra_body={"stream_options": STREAM_OPTIONS})
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
        return sum(len(t.split()) for t in texts)

    return one


def solverify_runner(backend: Any, tokens: int) -> Runner:
    from orchestrator.backends.base import GenerationRequest, TextDelta

    async def one(n: int) -> int:
        request = GenerationRequest(kind="solve", messages=MESSAGES, n=n, max_tokens=tokens)
        texts = [""] * n
        counted = 0
        async with backend.stream(request) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    texts[event.choice] += event.text
                    counted += event.tokens
        return sum(len(t.split()) for t in texts)

    return one


async def _round(run: Runner, samples: int, n: int, in_flight: int) -> tuple[float, int]:
    """CPU seconds of this process for ``samples`` samples as requests of ``n``."""
    requests = -(-samples // n)
    gate = asyncio.Semaphore(in_flight)
    streamed = 0

    async def guarded() -> None:
        nonlocal streamed
        async with gate:
            got = await run(n)
        streamed += got

    start = time.process_time()
    async with asyncio.TaskGroup() as tg:
        for _ in range(requests):
            tg.create_task(guarded())
    return time.process_time() - start, streamed


async def measure(url: str, model: str, *, samples: int, tokens: int, rounds: int,
                  in_flight: int, ns: Sequence[int]) -> dict[str, Any]:
    import openai

    from orchestrator.backends.openai_compat import OpenAIBackend

    # no retries on the bare side; generous time limits on both (a busy machine can delay
    # a connection by seconds; time limits cost no CPU); solverify retries as it does
    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0,
                                timeout=openai.Timeout(WAIT_S, connect=WAIT_S))
    backend = OpenAIBackend(url, model, timeout=WAIT_S, idle_timeout=WAIT_S)
    bare, ours = bare_runner(client, model, tokens), solverify_runner(backend, tokens)
    out: dict[str, Any] = {}
    only = os.environ.get("CLIENT_CPU_ONLY")  # "bare" or "solverify": one side (profiling)
    try:
        await backend.probe("chat")
        for n in ns:
            for run in (bare, ours):  # warm both (connections, caches)
                await _round(run, min(samples, 4 * in_flight * n), n, in_flight)
            per: dict[str, list[float]] = {"bare": [], "solverify": []}
            tokens_seen: dict[str, int] = {}
            for _ in range(rounds):
                for name, run in (("bare", bare), ("solverify", ours)):
                    if only and name != only:
                        per[name].append(1.0)
                        continue
                    cpu, streamed = await _round(run, samples, n, in_flight)
                    per[name].append(cpu / samples)
                    tokens_seen[name] = streamed
            ratios = [s / b for s, b in zip(per["solverify"], per["bare"], strict=True)]
            out[f"n={n}"] = {
                "bare_ms_per_sample": [round(x * 1e3, 3) for x in per["bare"]],
                "solverify_ms_per_sample": [round(x * 1e3, 3) for x in per["solverify"]],
                "ratios": [round(r, 3) for r in ratios],
                "median_ratio": round(statistics.median(ratios), 3),
                "words_streamed_last_round": tokens_seen,
            }
    finally:
        await backend.aclose()
        await client.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="samples per round")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=16, help="requests in flight")
    parser.add_argument("--n", type=int, action="append", default=None,
                        help="choices per request (repeatable; default: 8 and 1)")
    parser.add_argument("--base-url", default=None, help="a server to use instead of the "
                        "local test server (a real vLLM)")
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    ns = args.n or [8, 1]
    server = None if args.base_url else ServerProcess(args.tokens)
    try:
        if server is not None:
            server.wait_ready()
        url = args.base_url or server.url  # type: ignore[union-attr]
        result = asyncio.run(measure(url, args.model, samples=args.samples,
                                     tokens=args.tokens, rounds=args.rounds,
                                     in_flight=args.in_flight, ns=ns))
    finally:
        if server is not None:
            server.stop()
    load = os.getloadavg()
    report = {"config": {"samples": args.samples, "tokens": args.tokens,
                         "rounds": args.rounds, "in_flight": args.in_flight,
                         "server": args.base_url or "tests/openai_server.py (own process)",
                         "loadavg_after": [round(x, 2) for x in load],
                         "cpus": os.cpu_count()},
              "results": result}
    for key, row in result.items():
        print(f"{key:>5}: bare {statistics.median(row['bare_ms_per_sample']):.3f} ms/sample, "
              f"solverify {statistics.median(row['solverify_ms_per_sample']):.3f} ms/sample, "
              f"ratio {row['median_ratio']:.2f} (rounds: {row['ratios']})")
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"on {os.cpu_count()} CPUs")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
