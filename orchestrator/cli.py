"""The ``solverify`` command line.

    solverify run --base-url URL --model NAME --problems FILE.jsonl --policy SPEC --out OUT
    solverify demo                # live: adaptive vs fixed policies on the bundled model
    solverify policies            # the policy-spec grammar and every policy
    solverify serve ...           # the bundled CPU vLLM (see DEVELOPERS.md)
    solverify bench ...           # record / replay / compute-matched benchmarks

Exit status (``run``; ``bench record`` alike): 0 every problem was answered or stopped
normally; 1 some problems ended on an error (the summary says how many and the first
error); 2 bad input or could not start (bad spec, bad file, unreachable endpoint, unknown
model: one ``solverify: error:`` line on stderr); 130 interrupted. Nothing is lost: each
result is written to ``--out`` as its problem finishes, and ``--resume`` continues a run
that was stopped (see :mod:`orchestrator.results_io`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cliargs import (
    add_endpoint_args,
    add_resume_args,
    add_task_args,
    add_verifier_args,
    api_key_from,
    base_urls,
    check_output,
    endpoint_backend,
    make_task,
    positive_float,
    positive_int,
    verifier_backend,
    warn,
)
from orchestrator.defaults import CONCURRENCY as DEFAULT_CONCURRENCY
from orchestrator.errors import ConfigError, SolverifyError
from orchestrator.result import EXIT_PROBLEM_ERRORS, ended_on_error, first_error
from orchestrator.types import Budget

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Once(argparse.Action):
    """A flag that may be given once: ``run --policy A --policy B`` ran B alone, silently
    (found by review; ``demo`` and ``bench replay`` take several policies, ``run`` one)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice: a run has one policy (to compare "
                         "several, use solverify demo or solverify bench replay)")
        setattr(namespace, self.dest, values)


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
    run.add_argument("--policy", required=True, action=_Once,
                     help="policy spec, e.g. sc:n=16 or genrm:s=8,v=4 (see solverify policies)")
    run.add_argument("--out", required=True, type=Path,
                     help="results JSONL, one line per problem as it finishes")
    add_resume_args(run)
    run.add_argument("--limit", type=positive_int, default=None,
                     help="only the first N problems")
    run.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                     help=f"max requests in flight across the run (default "
                          f"{DEFAULT_CONCURRENCY})")
    run.add_argument("--rate", type=positive_float, default=None,
                     help="max HTTP requests per second across the run, to every "
                          "endpoint and the verifier together (default: no limit); "
                          "retries, probes, tokenizer counts and each stream of an "
                          "emulated n count")
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
    add_verifier_args(run)

    sub.add_parser("demo", help="live demo: adaptive vs fixed policies on the bundled CPU "
                   "model (or --base-url/--model)", add_help=False)
    sub.add_parser("policies", help="list policies and the spec grammar")
    sub.add_parser("serve", help="provision / start / stop the bundled CPU vLLM server",
                   add_help=False)
    sub.add_parser("bench", help="record pools, replay policies, compute-matched analysis",
                   add_help=False)
    return parser


def streams_line(stats: dict) -> str:
    """The summary's line about the endpoint's HTTP streams (and a server that cut them)."""
    line = (f"streams           {stats['streams_opened']} opened, at most "
            f"{stats['peak_streams']} at once (limit {stats['configured_max_streams'] or 'none'})")
    if stats.get("one_stream_at_a_time"):
        line += (f"; the server cut {stats['cut_streams']} running stream(s) when another "
                 "arrived: one stream at a time from then on")
    return line


def summarise(results, wall: float) -> dict:
    """Run-level numbers for the closing summary (:class:`orchestrator.result.RunSummary`
    over ``results``)."""
    from orchestrator.result import RunSummary

    tally = RunSummary()
    for r in results:
        tally.add(r)
    return tally.as_dict(wall)


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
        + (f"  [partly estimated from: {', '.join(summary.get('tokens_estimated_from', ()))}]"
           if summary["tokens_estimated"] else ""),
        f"prompt tokens     {summary['prompt_tokens']}"
        + (f"  ({cached} served from the prefix cache)" if cached is not None else ""),
        f"requests          {summary['requests']}"
        + (f"  ({summary['http_requests']} HTTP requests)"
           if summary.get("http_requests", 0) > summary["requests"] else "")
        + f"  (cancelled samples {summary['cancelled_samples']}, failed "
        f"{summary['failed_samples']})"
        + (f"\n                  {summary['abandoned_http_requests']} HTTP requests given up "
           "before a first token: the server may have generated tokens for them that no "
           "stream reported, so the token counts are a lower bound"
           if summary.get("abandoned_http_requests") else ""),
        "lambda (measured) " + (f"{lam:.3f}" if lam is not None else "n/a (no verifications)")
        + (f"  (verifier {summary['verifier']})" if summary.get("verifier") else ""),
        f"wall time         {summary['wall_s']:.1f} s",
        f"results           {out}",
    ]
    print("\n".join(lines), file=file)


class Outcomes:
    """The rows of a run as they come, reduced to what its exit status needs (how many,
    how many ended on an error, the first such row), so no row has to be kept."""

    def __init__(self) -> None:
        self.rows = 0
        self.bad = 0
        self.first_bad: dict | None = None

    def add(self, row: dict) -> None:
        self.rows += 1
        if ended_on_error(row):
            self.bad += 1
            if self.first_bad is None:
                self.first_bad = row

    def lines(self, earlier: int) -> tuple[int, list[str]]:
        """The exit status and the lines that explain it (``earlier``: of the rows,
        those resumed from the file)."""
        lines = []
        if earlier:
            lines.append(f"resumed           {earlier} problem(s) were already done; "
                         f"{self.rows - earlier} run now")
        if self.first_bad is None:
            return EXIT_OK, lines
        lines.append(f"ended on an error {self.bad} of {self.rows} problem(s); first: "
                     f"{self.first_bad.get('id')}: {first_error(self.first_bad)}")
        return EXIT_PROBLEM_ERRORS, lines


def outcome_lines(rows: list[dict], earlier: int) -> tuple[int, list[str]]:
    """The exit status for these rows (this run's and ``earlier`` resumed ones) and the
    lines that explain it."""
    outcomes = Outcomes()
    for row in rows:
        outcomes.add(row)
    return outcomes.lines(earlier)


def run_fingerprint(args, policy, task, budget) -> dict:
    """What must match for ``--resume`` to continue a results file (results_io). For a
    policy that verifies, also the verifier: its model and the verification requests'
    settings and prompt (a resumed file must not mix two verifiers); the endpoints' URLs
    are not in it, for the solver as for the verifier (a resume may reach the same model
    elsewhere)."""
    import hashlib

    from orchestrator.protocols import policy_verifies
    from orchestrator.results_io import file_sha256

    fingerprint = {
        "command": "run", "model": args.model, "policy": policy.spec,
        "problems": str(args.problems.name), "problems_sha256": file_sha256(args.problems),
        "endpoint": task.endpoint, "max_tokens": task.max_tokens,
        "temperature": task.temperature, "texts": bool(args.texts),
        "budget_tokens": budget.tokens, "budget_requests": budget.requests,
        "run_budget_tokens": args.run_budget_tokens,
    }
    if policy_verifies(policy):
        template = getattr(task, "verify_template", None)
        fingerprint.update({
            "verifier_model": args.verifier_model or args.model,
            "verify_max_tokens": getattr(task, "verify_max_tokens", None),
            "verify_temperature": getattr(task, "verify_temperature", None),
            "verify_prompt_sha256": None if template is None
            else hashlib.sha256(template.encode("utf-8")).hexdigest(),
        })
    return fingerprint


async def _run(args) -> int:
    from orchestrator.events import JsonlTraceSink
    from orchestrator.problems import load_problems
    from orchestrator.redact import redact_secrets, redact_text, redact_url
    from orchestrator.results_io import open_results
    from orchestrator.runtime import run_batch
    from policies import parse_policy

    policy = parse_policy(args.policy)
    check_output("--trace", args.trace)  # before any request: not after the first problem
    problems = load_problems(args.problems, limit=args.limit)
    task = make_task(problems, args)
    budget = Budget(tokens=args.budget_tokens, requests=args.budget_requests)
    from orchestrator.runtime import check_budget_fits

    check_budget_fits(policy, budget, task, problems[0], args.run_budget_tokens)  # no request yet
    done, writer = open_results(args.out, run_fingerprint(args, policy, task, budget),
                                resume=args.resume, overwrite=args.overwrite, warn=warn,
                                redo=ended_on_error)
    if done.redo:
        warn(f"{args.out}: {len(done.redo)} problem(s) ended on an error in the run being "
             f"resumed (e.g. {done.redo[0]!r}); they are run again and their rows replaced")
    todo = [p for p in problems if p.id not in done.ids]
    ids = {p.id for p in problems}
    earlier = [r for r in done.rows if str(r.get("id")) in ids]
    if not todo:
        writer.close()
        print(f"all {len(problems)} problem(s) already in {args.out}; nothing to run",
              file=sys.stderr)
        rc, lines = outcome_lines(earlier, len(earlier))
        if lines:
            print("\n".join(lines))
        return rc
    # there is work, so --out will be written, and its fingerprint beside it: before any
    # request, not after the first problem (a finished run resumed writes nothing)
    check_output("--out", args.out, siblings=True)
    api_key = api_key_from(args)
    # --rate paces HTTP requests, every one of them (each replica's, the verifier's, the
    # probes, retries, the streams of an emulated n, the tokenizer's counts): one
    # throttler shared by every backend, so the limit is the run's
    from orchestrator.retry import make_throttler

    pace = make_throttler(args.rate)
    verifier = verifier_backend(args, api_key, pace)
    backend = endpoint_backend(args, api_key, pace)
    sinks = []
    trace = JsonlTraceSink(args.trace) if args.trace else None
    if trace is not None:
        sinks.append(trace)
    progress = None
    from orchestrator.result import RunSummary

    outcomes = Outcomes()  # neither rows nor results are kept: they are in the file
    for row in earlier:
        outcomes.add(row)
    resumed = len(earlier)
    del earlier
    tally = RunSummary()
    try:
        await backend.list_models()  # reachability: EndpointUnreachable after retries
        caps = await backend.probe(task.endpoint)  # a real tiny request: ModelNotFound etc.
        print(f"endpoint {', '.join(redact_url(u) for u in base_urls(args))} model "
              f"{args.model}: "
              + ", ".join(caps.describe()), file=sys.stderr)
        if verifier is not None:  # probed like the solver's: unreachable/unknown model fail here
            await verifier.list_models()
            vcaps = await verifier.probe(task.endpoint)
            print(f"verifier {redact_url(verifier.base_url)} model {verifier.model}: "
                  + ", ".join(vcaps.describe()), file=sys.stderr)
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(todo), unit="problem", desc=policy.spec,
                            file=sys.stderr, dynamic_ncols=True)
        started = time.monotonic()
        correct = graded = 0

        def on_result(result) -> None:
            nonlocal correct, graded
            row = result.to_dict(texts=args.texts)
            writer.write(row, redact=redact_secrets)  # model text: values only
            outcomes.add(row)
            tally.add(result)
            if result.correct is not None:
                graded += 1
                correct += int(result.correct)
            if progress is not None:
                progress.update(1)
                if graded:
                    progress.set_postfix(acc=f"{correct / graded:.3f}", refresh=False)

        await run_batch(todo, policy, budget, backend, task=task,
                        concurrency=args.concurrency,
                        sinks=sinks, on_result=on_result,
                        run_tokens=args.run_budget_tokens, verifier=verifier,
                        keep_results=False)
        if progress is not None:
            progress.close()
            progress = None
        summary = tally.as_dict(time.monotonic() - started)
        summary["capabilities"] = list(caps.describe())
        if verifier is not None:
            summary["verifier"] = f"{verifier.model} at {verifier.base_url}"
        print_summary(summary, policy.spec, args.out)
        print(f"probe tokens      {backend.probe_completion_tokens}  (the capability check "
              "at start-up; charged to no problem)")
        from orchestrator.backends.openai_compat import OpenAIBackend

        if isinstance(backend, OpenAIBackend):
            print(streams_line(backend.stats()))
        rc, lines = outcomes.lines(resumed)
        if lines:
            print(redact_text("\n".join(lines)))
        return rc
    finally:
        writer.close()
        if progress is not None:
            progress.close()
        if trace is not None:
            trace.close()
        await backend.aclose()
        if verifier is not None:
            await verifier.aclose()


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
    lines on stderr (that of this moment) at the level in $SOLVERIFY_LOG (default:
    warning). The level is checked now; structlog itself is set up when it is first
    loaded (``orchestrator.logs``), so a run that logs nothing never imports it."""
    import logging  # (loaded anyway: openai imports it)

    from orchestrator import logs

    name = os.environ.get("SOLVERIFY_LOG", "warning").upper()
    level = getattr(logging, name, None)
    if not isinstance(level, int):
        raise ConfigError(f"SOLVERIFY_LOG={name.lower()!r} is not a log level "
                          "(debug, info, warning, error)")
    stream = sys.stderr

    def setup() -> None:
        import structlog

        processors = [x for x in structlog.get_config()["processors"]
                      if x is not _redact_event]
        structlog.configure(
            processors=[*processors[:-1], _redact_event, processors[-1]],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(stream),
        )

    logs.configure(level, setup)


def _redact_event(logger, method, event: dict) -> dict:
    """structlog processor: no secret (URL userinfo, API key, credentials) in a log line."""
    from orchestrator.redact import redact_text

    out = {}
    for key, value in event.items():
        if isinstance(value, str):
            value = redact_text(value)
        elif isinstance(value, list | tuple | dict):
            text = repr(value)
            clean = redact_text(text)
            value = value if clean == text else clean
        out[key] = value
    return out


def register_secrets(argv: Sequence[str]) -> None:
    """Tell :mod:`orchestrator.redact` the secrets this command line carries: the
    userinfo of any URL in it and the API key named by ``--api-key-env``."""
    from orchestrator.redact import register_secret, secrets_of_url

    for i, arg in enumerate(argv):
        for value in secrets_of_url(arg.split("=", 1)[-1]):
            register_secret(value)
        for flag in ("--api-key-env", "--verifier-api-key-env"):
            if arg == flag and i + 1 < len(argv):
                register_secret(os.environ.get(argv[i + 1]))
            elif arg.startswith(flag + "="):
                register_secret(os.environ.get(arg.split("=", 1)[1]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_secrets(argv)
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
    from orchestrator.redact import redact_text

    try:
        return fn()
    except SolverifyError as exc:
        print(f"solverify: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. --out in a folder we cannot write
        print(f"solverify: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("solverify: interrupted; results written so far are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
