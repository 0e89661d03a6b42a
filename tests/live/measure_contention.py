"""Measure the bundled CPU vLLM's throughput with and without a busy loop on every core,
under several OpenMP / binding settings, interleaved and repeated.

Not a test (pytest does not collect it). Run after provisioning, one server at a time:

    .venv/bin/python tests/live/measure_contention.py [--rounds 2] \
        'vllm-auto:VLLM_CPU_OMP_THREADS_BIND=auto' 'ours:' 'passive:OMP_WAIT_POLICY=PASSIVE'

Each argument is ``NAME:VAR=VALUE,VAR=VALUE`` (empty after the colon: solverify's server
defaults, see ``orchestrator.serve.config.thread_env``); ``VAR=`` (empty value) removes
that variable from the server's environment; ``VLLM_CPU_OMP_THREADS_BIND=auto`` is vLLM's
own default (one OpenMP thread pinned to each core).
For every round and every setting (in that order, so the settings interleave) it starts a
server, then measures quiet, busy, quiet, busy ("busy": one ``while True: pass`` process
per core, at the server's own priority), and prints one line per measurement and a
median summary at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import openai

from orchestrator.serve import VLLMServer

FEW_SHOT = (
    "Q: What is the capital of Belgium?\nA: Brussels\n\nQ: What is the capital of Peru?\n"
    "A: Lima\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\nQ: What is the capital of "
    "France?\nA:"
)
RAMBLE = "Write a very long story about a dragon who travels the world. Once upon a time,"
SHAPES: dict[str, tuple[dict[str, Any], int]] = {  # name: (request kwargs, requests)
    "capitals 32 x n=1": ({"prompt": FEW_SHOT, "max_tokens": 12, "stop": "\n"}, 32),
    "decode64 4 x n=1": (
        {"prompt": RAMBLE, "max_tokens": 64, "extra_body": {"ignore_eos": True}}, 4),
}


def busy_loops() -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]


async def shape_rate(client: openai.AsyncOpenAI, model: str, kw: dict[str, Any],
                     count: int) -> float:
    t0 = time.monotonic()
    outs = await asyncio.gather(*[
        client.completions.create(model=model, temperature=1, **kw) for _ in range(count)])
    tokens = sum(o.usage.completion_tokens for o in outs if o.usage)
    return tokens / (time.monotonic() - t0)


async def one_setting(name: str, env: dict[str, str], results: dict) -> None:
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    srv = VLLMServer(startup_timeout=900)
    try:
        srv.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        healthy = await srv.wait_healthy_async()
        print(f"[{name}] healthy after {healthy:.1f}s", flush=True)
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="unused", max_retries=0,
                                    timeout=600)
        await client.completions.create(model=srv.model_name, prompt=FEW_SHOT, max_tokens=4)
        for cond in ("quiet", "busy", "quiet", "busy"):
            loops = busy_loops() if cond == "busy" else []
            try:
                for shape, (kw, count) in SHAPES.items():
                    rate = await shape_rate(client, srv.model_name, kw, count)
                    results.setdefault((name, cond, shape), []).append(rate)
                    print(f"[{name}] {cond:5s} {shape:20s} {rate:6.1f} tok/s", flush=True)
            finally:
                for p in loops:
                    p.kill()
                    p.wait()
    finally:
        await srv.stop_async()


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    env = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    return name, env


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("settings", nargs="+")
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.settings]
    results: dict = {}
    for r in range(args.rounds):
        for name, env in settings:
            print(f"== round {r + 1}: {name} {env}", flush=True)
            await one_setting(name, env, results)
    print("\n== medians (tok/s), all rounds")
    for (name, cond, shape), vals in sorted(results.items()):
        print(f"{name:16s} {cond:5s} {shape:20s} {statistics.median(vals):6.1f}  "
              f"{[round(v, 1) for v in vals]}")


if __name__ == "__main__":
    asyncio.run(main())
