"""The ``solverify`` command line.

    solverify run --base-url URL --model NAME --problems FILE.jsonl --policy SPEC --out OUT
    solverify demo                # live: adaptive vs fixed policies on the bundled model
    solverify policies            # the policy-spec grammar and every policy
    solverify serve ...           # the bundled CPU vLLM (see DEVELOPERS.md)
    solverify bench ...           # record / replay / compute-matched benchmarks

Errors a user can fix (bad spec, bad file, unreachable endpoint, unknown model) print one
line on stderr and exit with status 2; nothing is lost: results are appended to ``--out``
as each problem finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cliargs import positive_float, positive_int
from orchestrator.errors import ConfigError, SolverifyError
from orchestrator.types import Budget

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def check_base_url(url: str, what: str = "--base-url") -> str:
    """An http(s) URL with a host, else a ConfigError at once (not retries later)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{what} {url!r} is not an http:// or https:// URL with a host "
                          "(e.g. http://127.0.0.1:8000/v1)")
    return url


def _base_url_arg(text: str) -> str:
    try:
        return check_base_url(text, "base URL")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    env_url = os.environ.get("OPENAI_BASE_URL") or None
    p.add_argument("--base-url", required=env_url is None, default=env_url, type=_base_url_arg,
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                        "(default: $OPENAI_BASE_URL, as the openai client reads it)")
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the API key (default: "
                        "$OPENAI_API_KEY if set, as the openai client reads it, else "
                        "none: sends 'EMPTY')")
    p.add_argument("--timeout", type=positive_float, default=600.0,
                   help="seconds per request (default 600)")


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", choices=("chat", "completions"), default=None,
                   help="API used for math problems (default chat; text-answer problem files "
                        "with 'aliases' always use few-shot completions)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="max completion tokens per solution (task default otherwise)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature for solutions (task default otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solverify",
        description="Spend LLM compute on solving or verifying, and stop when the answer "
                    "is settled.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run a policy over a problem file against an endpoint",
        description="Run a policy over a problem file against an OpenAI-compatible endpoint; "
                    "results are appended to --out as each problem finishes.",
        epilog="example:\n  solverify run --base-url http://127.0.0.1:8000/v1 --model NAME "
               "\\\n      --problems problems.jsonl --policy adaptive:max=16 --out results.jsonl"
               "\n\nPolicy specs (sc:n=16, genrm:s=8,v=4, adaptive:max=16, ...): "
               "solverify policies lists every policy and its parameters.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_endpoint_args(run)
    run.add_argument("--problems", required=True, type=Path,
                     help="JSONL with id, problem, optional answer/aliases")
    run.add_argument("--policy", required=True,
                     help="policy spec, e.g. sc:n=16 or genrm:s=8,v=4 (see solverify policies)")
    run.add_argument("--out", required=True, type=Path, help="results JSONL (appended)")
    run.add_argument("--limit", type=positive_int, default=None,
                     help="only the first N problems")
    run.add_argument("--concurrency", type=positive_int, default=16,
                     help="max requests in flight across the run (default 16)")
    run.add_argument("--rate", type=positive_float, default=None,
                     help="max requests per second (default: no limit)")
    run.add_argument("--budget-tokens", type=positive_int, default=None,
                     help="cap on completion tokens per problem (never exceeded)")
    run.add_argument("--budget-requests", type=positive_int, default=None,
                     help="cap on requests per problem")
    run.add_argument("--run-budget-tokens", type=positive_int, default=None,
                     help="cap on completion tokens over the whole run, shared by all "
                          "problems (never exceeded)")
    run.add_argument("--trace", type=Path, default=None,
                     help="also write every event as JSONL to this file")
    run.add_argument("--texts", action="store_true", help="include solution texts in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_task_args(run)

    sub.add_parser("demo", help="live demo: adaptive vs fixed policies on the bundled CPU "
                   "model (or --base-url/--model)", add_help=False)
    sub.add_parser("policies", help="list policies and the spec grammar")
    sub.add_parser("serve", help="provision / start / stop the bundled CPU vLLM server",
                   add_help=False)
    sub.add_parser("bench", help="record pools, replay policies, compute-matched analysis",
                   add_help=False)
    return parser


def make_task(problems, args):
    """The task for these problems, with the --endpoint/--max-tokens/--temperature overrides."""
    from orchestrator.grading import MathGrader
    from orchestrator.tasks import Task, task_for

    task = task_for(problems)
    overrides = {}
    if args.max_tokens is not None:
        overrides["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        overrides["temperature"] = args.temperature
    if args.endpoint is not None and task.endpoint != args.endpoint:
        if not isinstance(task.grader, MathGrader):
            raise ConfigError("text-answer problems (with 'aliases') use the completions "
                              "endpoint; --endpoint chat is not available for them")
        task = Task.math(endpoint=args.endpoint)
    if overrides:
        import dataclasses

        task = dataclasses.replace(task, **overrides)
    return task


def api_key_from(args) -> str:
    """The key named by --api-key-env (a clear error when unset), else $OPENAI_API_KEY,
    else 'EMPTY'."""
    if args.api_key_env is None:
        return os.environ.get("OPENAI_API_KEY") or "EMPTY"
    key = os.environ.get(args.api_key_env)
    if not key:
        raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is "
                          "not set or empty")
    return key


def summarise(results, wall: float) -> dict:
    """Run-level numbers for the closing summary."""
    graded = [r for r in results if r.correct is not None]
    sol_lengths = [s.completion_tokens for r in results for s in r.solutions]
    ver_lengths = [v.completion_tokens for r in results for v in r.verifications]
    from orchestrator.ledger import measure_lambda

    return {
        "problems": len(results),
        "graded": len(graded),
        "accuracy": (sum(1 for r in graded if r.correct) / len(graded)) if graded else None,
        "errors": sum(1 for r in results if r.error),
        "no_answer": sum(1 for r in results if r.answer is None),
        "prompt_tokens": sum(r.usage.prompt_tokens for r in results),
        "cached_prompt_tokens": _sum_known(r.usage.cached_prompt_tokens for r in results),
        "completion_tokens": sum(r.usage.completion_tokens for r in results),
        "tokens_estimated": any(r.usage.estimated for r in results),
        "solution_tokens": sum(r.solution_tokens for r in results),
        "verification_tokens": sum(r.verification_tokens for r in results),
        "requests": sum(r.requests for r in results),
        "solutions": len(sol_lengths),
        "verifications": len(ver_lengths),
        "cancelled_samples": sum(1 for r in results for f in r.failed if f.reason == "cancelled"),
        "failed_samples": sum(1 for r in results for f in r.failed if f.reason == "failed"),
        "lambda": measure_lambda(sol_lengths, ver_lengths),
        "wall_s": round(wall, 2),
    }


def _sum_known(values) -> int | None:
    """Sum of the values that are not None; None when all are."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def print_summary(summary: dict, policy: str, out: Path, file=sys.stdout) -> None:
    acc = summary["accuracy"]
    lam = summary["lambda"]
    cached = summary.get("cached_prompt_tokens")
    lines = [
        f"policy            {policy}",
        f"problems          {summary['problems']}"
        + (f"  ({summary['errors']} ended on an error)" if summary["errors"] else ""),
        "accuracy          " + (f"{acc:.3f} over {summary['graded']} graded"
                                if acc is not None else "n/a (no ground truth)"),
        f"no answer         {summary['no_answer']}",
        f"completion tokens {summary['completion_tokens']}"
        f"  (solutions {summary['solution_tokens']}, verifications "
        f"{summary['verification_tokens']})"
        + ("  [partly estimated]" if summary["tokens_estimated"] else ""),
        f"prompt tokens     {summary['prompt_tokens']}"
        + (f"  ({cached} served from the prefix cache)" if cached is not None else ""),
        f"requests          {summary['requests']}"
        f"  (cancelled samples {summary['cancelled_samples']}, failed {summary['failed_samples']})",
        "lambda (measured) " + (f"{lam:.3f}" if lam is not None else "n/a (no verifications)"),
        f"wall time         {summary['wall_s']:.1f} s",
        f"results           {out}",
    ]
    print("\n".join(lines), file=file)


async def _run(args) -> int:
    from orchestrator.backends.openai_compat import OpenAIBackend
    from orchestrator.events import JsonlTraceSink
    from orchestrator.problems import load_problems
    from orchestrator.runtime import run_batch
    from policies import parse_policy

    policy = parse_policy(args.policy)
    problems = load_problems(args.problems, limit=args.limit)
    task = make_task(problems, args)
    budget = Budget(tokens=args.budget_tokens, requests=args.budget_requests)
    backend = OpenAIBackend(base_url=args.base_url, model=args.model, api_key=api_key_from(args),
                            timeout=args.timeout)
    sinks = []
    trace = JsonlTraceSink(args.trace) if args.trace else None
    if trace is not None:
        sinks.append(trace)
    progress = None
    try:
        await backend.list_models()  # reachability: EndpointUnreachable after retries
        caps = await backend.probe(task.endpoint)  # a real tiny request: ModelNotFound etc.
        print(f"endpoint {args.base_url} model {args.model}: " + ", ".join(caps.describe()),
              file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(problems), unit="problem", desc=policy.spec,
                            file=sys.stderr, dynamic_ncols=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with args.out.open("a", encoding="utf-8") as out:
            correct = graded = 0

            def on_result(result) -> None:
                nonlocal correct, graded
                out.write(json.dumps(result.to_dict(texts=args.texts), ensure_ascii=False)
                          + "\n")
                out.flush()
                if result.correct is not None:
                    graded += 1
                    correct += int(result.correct)
                if progress is not None:
                    progress.update(1)
                    if graded:
                        progress.set_postfix(acc=f"{correct / graded:.3f}", refresh=False)

            results = await run_batch(problems, policy, budget, backend, task=task,
                                      concurrency=args.concurrency, rate=args.rate,
                                      sinks=sinks, on_result=on_result,
                                      run_tokens=args.run_budget_tokens)
        if progress is not None:
            progress.close()
            progress = None
        summary = summarise(results, time.monotonic() - started)
        summary["capabilities"] = list(caps.describe())
        print_summary(summary, policy.spec, args.out)
        return 0
    finally:
        if progress is not None:
            progress.close()
        if trace is not None:
            trace.close()
        await backend.aclose()


def _print_policies() -> int:
    from policies.spec import registered

    print("Policy specs: NAME or NAME:key=value,key=value   (e.g. sc:n=16, genrm:s=8,v=4)\n")
    entries = registered()
    width = max((len(f"{p.key}={p.type.__name__}" + (" or 'all'" if p.allow_all else ""))
                 for e in entries for p in e.params), default=0)
    for entry in entries:
        print(f"{entry.name:10s} {entry.help}")
        for p in entry.params:
            lhs = f"{p.key}={p.type.__name__}" + (" or 'all'" if p.allow_all else "")
            if p.required:
                tag = " [required]"
            elif p.default is not None:
                tag = f" [default {p.default}]"
            else:
                tag = ""  # the help says what the default depends on
            print(f"    {lhs:{width}s}  {p.help}{tag}")
    return 0


def _configure_logging() -> None:
    """The CLI is an application, so it (unlike the library) sets up structlog: plain
    lines on stderr at the level in $SOLVERIFY_LOG (default: warning)."""
    import logging

    import structlog

    name = os.environ.get("SOLVERIFY_LOG", "warning").upper()
    level = getattr(logging, name, None)
    if not isinstance(level, int):
        raise ConfigError(f"SOLVERIFY_LOG={name.lower()!r} is not a log level "
                          "(debug, info, warning, error)")
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = _guard(_configure_logging)
    if rc:
        return rc
    if argv and argv[0] == "serve":
        from orchestrator import serve

        return _guard(lambda: serve.main(argv[1:]))
    if argv and argv[0] == "demo":
        from orchestrator import demo

        return _guard(lambda: demo.main(argv[1:]))
    if argv and argv[0] == "bench":
        from benchmarks import cli as bench_cli

        return _guard(lambda: bench_cli.main(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "policies":
        return _print_policies()
    if args.command == "run":
        return _guard(lambda: asyncio.run(_run(args)))
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _guard(fn) -> int:
    """Run a command; turn expected errors into one line on stderr."""
    try:
        return fn()
    except SolverifyError as exc:
        print(f"solverify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. --out in a folder we cannot write
        print(f"solverify: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("solverify: interrupted; results written so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
