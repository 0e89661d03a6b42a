"""Measure the bundled CPU vLLM: start-up, throughput, stream usage, cancellation.

Not a test (pytest does not collect it). Run after provisioning:

    .venv/bin/python tests/live/measure_vllm_server.py [extra vllm args...]

It starts its own server on a free port and stops it at the end. The numbers it printed
on the 2-core dev machine are in DEVELOPERS.md.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from typing import Any

import httpx2 as httpx
import openai

from orchestrator.serve import VLLMServer

FEW_SHOT = (
    "Q: What is the capital of Belgium?\nA: Brussels\n\nQ: What is the capital of Peru?\n"
    "A: Lima\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the capital of "
    "France?\nA:"
)
RAMBLE = "Write a very long story about a dragon who travels the world. Once upon a time,"
USAGE = {"include_usage": True, "continuous_usage_stats": True}
GEN = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"


async def throughput(srv: VLLMServer, client: openai.AsyncOpenAI, reps: int = 3) -> None:
    cap: dict[str, Any] = {"prompt": FEW_SHOT, "max_tokens": 12, "stop": "\n"}
    dec: dict[str, Any] = {"prompt": RAMBLE, "max_tokens": 64, "extra_body": {"ignore_eos": True}}
    shapes = {  # name: (request kwargs, n per request, requests)
        "capitals 2 x n=16": (cap, 16, 2),
        "capitals 32 x n=1": (cap, 1, 32),
        "decode64 1 x n=16": (dec, 16, 1),
        "decode64 16 x n=1": (dec, 1, 16),
        "decode64 1 x n=1": (dec, 1, 1),
    }
    rates: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(reps):
        for name, (kw, n, count) in shapes.items():
            before = srv.metrics()[GEN]
            t0 = time.monotonic()
            outs = await asyncio.gather(
                *[
                    client.completions.create(model=srv.model_name, temperature=1, n=n, **kw)
                    for _ in range(count)
                ]
            )
            took = time.monotonic() - t0
            tokens = sum(o.usage.completion_tokens for o in outs if o.usage)
            assert srv.metrics()[GEN] - before == tokens
            rates[name].append(tokens / took)
    for name, vals in rates.items():
        print(f"{name:20s} median {statistics.median(vals):6.1f} tok/s  {[round(v) for v in vals]}")


async def read_stream(
    http: httpx.AsyncClient, srv: VLLMServer, n: int, cut: int, delay: float
) -> dict[int, int]:
    """Stream a long completion, keep each choice's latest usage, close after `cut` chunks."""
    body = {
        "model": srv.model_name, "prompt": RAMBLE, "max_tokens": 400, "temperature": 1,
        "n": n, "stream": True, "stream_options": USAGE, "ignore_eos": True,
    }  # fmt: skip
    seen: dict[int, int] = {}
    chunks = 0
    async with http.stream("POST", f"{srv.base_url}/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data: "))
            for choice in data["choices"]:
                seen[choice["index"]] = data["usage"]["completion_tokens"]
            chunks += 1
            if delay:
                await asyncio.sleep(delay)
            if chunks >= cut:
                break
    return seen


async def cancellation(srv: VLLMServer) -> None:
    cases = [  # label, n, parallel streams, chunks read before closing, delay per chunk
        ("n=1, eager reader", 1, 1, 30, 0.0),
        ("4 streams n=1, eager", 1, 4, 30, 0.0),
        ("n=4, eager reader", 4, 1, 30, 0.0),
        ("n=1, reader 0.3 s/chunk", 1, 1, 10, 0.3),
    ]
    async with httpx.AsyncClient(timeout=60) as http:
        for label, n, parallel, cut, delay in cases:
            before = srv.metrics()[GEN]
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(read_stream(http, srv, n, cut, delay)) for _ in range(parallel)
                ]
            at_close = srv.metrics()[GEN] - before
            t0 = time.monotonic()
            while srv.metrics()[RUNNING] > 0 and time.monotonic() - t0 < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            to_zero = time.monotonic() - t0
            await asyncio.sleep(0.5)
            final = srv.metrics()[GEN] - before
            seen = [t.result() for t in tasks]
            ledger = sum(sum(s.values()) for s in seen)
            print(
                f"{label:24s} client saw {ledger:4d}  metric at close {at_close:4.0f}  "
                f"0.5 s later {final:4.0f}  running->0 in {to_zero:.2f}s  per-choice {seen[0]}"
            )


async def main(extra: list[str]) -> None:
    srv = VLLMServer(extra_args=extra)
    srv.start()
    try:
        print(f"healthy after {await srv.wait_healthy_async():.1f}s")
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        await client.completions.create(model=srv.model_name, prompt=FEW_SHOT, max_tokens=4)
        await throughput(srv, client)
        await cancellation(srv)
    finally:
        await srv.stop_async()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
