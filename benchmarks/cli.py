"""``solverify bench``: record pools, replay policies on them, and the compute-matched analysis.

    solverify bench replay --pool POOL.jsonl [--pool ...] --policy SPEC [--policy ...]
        [--orders R] [--seed S] [--concurrency C] [--json OUT] [--plot OUT.png]
        [--markdown OUT.md]
    solverify bench compute-matched --pool POOL.jsonl [--simulated-verifier] [--lam X]
        [--json OUT] [--plot OUT.png] [--markdown OUT.md]
    solverify bench record --base-url URL --model NAME --problems FILE --out POOL.jsonl
        --samples N [--verifications V]

``sc:n=all`` (and ``genrm:s=all,v=V``) mean every sample in the pool. Errors a user can fix
raise :class:`~orchestrator.errors.SolverifyError` (the top-level CLI prints one line).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator import defaults
from orchestrator.cliargs import (
    add_endpoint_args,
    add_resume_args,
    add_task_args,
    beta_params,
    check_output,
    float_list,
    fraction,
    int_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from orchestrator.errors import ConfigError

__all__ = ["build_parser", "main"]


def _add_pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", action="append", required=True, type=Path, metavar="FILE",
                   help="pool JSONL (repeatable)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N problems of each pool")
    _add_contested_arg(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--simulated-verifier", action="store_true",
                   help="draw verifier readings from Beta distributions conditioned on each "
                        "sample's label (clearly labelled as simulated in every output)")
    p.add_argument("--sim-correct", type=beta_params, default=(3.0, 2.0), metavar="A,B",
                   help="simulated P(Yes) of correct samples ~ Beta(A,B) (default 3,2)")
    p.add_argument("--sim-wrong", type=beta_params, default=(2.0, 3.0), metavar="A,B",
                   help="simulated P(Yes) of wrong samples ~ Beta(A,B) (default 2,3)")
    p.add_argument("--sim-lambda", type=positive_float, default=1.0, metavar="X",
                   help="simulated verification length / solution length (default 1)")
    p.add_argument("--sim-vmax", type=positive_int, default=32, metavar="V",
                   help="simulated readings per sample (default 32)")
    p.add_argument("--sim-corr", type=non_negative_float, default=0.0, metavar="R",
                   help="correlation of two simulated readings of one solution, in [0, 1] "
                        "(default 0: independent; 1: identical, like a one-token verdict)")
    p.add_argument("--verify-tokens", type=positive_int, default=1, metavar="T",
                   help="length of a recorded verification without a token count (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="write a figure")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                   help="write Markdown tables")
    p.add_argument("--quiet", action="store_true", help="no table or progress on the terminal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solverify bench",
        description="Record pools, replay policies on them, compute-matched analysis.")
    sub = parser.add_subparsers(dest="command", required=True)

    rp = sub.add_parser("replay", help="replay policies on recorded pools (simulated clock)")
    _add_pool_args(rp)
    rp.add_argument("--policy", action="append", required=True, metavar="SPEC",
                    help="policy spec (repeatable); sc:n=all = SC over the whole pool")
    rp.add_argument("--orders", type=positive_int, default=10,
                    help="random sample orders per problem (default 10)")
    rp.add_argument("--concurrency", type=positive_int, default=None,
                    help="samples in flight per problem (default: no cap)")
    rp.add_argument("--decode-rate", type=positive_float, default=50.0,
                    help="simulated tokens per second per sample (default 50)")
    rp.add_argument("--ttft", type=non_negative_float, default=0.0,
                    help="simulated seconds to the first token (default 0)")
    rp.add_argument("--engine", choices=("auto", "lean", "runtime"), default="auto",
                    help="auto: numpy for fixed policies, the direct engine for ac, esc and "
                         "boinf (handing to the lean engine the orders it cannot replay "
                         "exactly), the lean engine for the rest; lean: every policy through "
                         "the lean engine; runtime: every policy through the asyncio runtime "
                         "(slower; for cross-checks; also used under --concurrency). All give "
                         "the same numbers")
    rp.add_argument("--workers", type=positive_int, default=None,
                    help="processes for the direct, lean and runtime engines (default: one per "
                         "CPU)")
    rp.add_argument("--bootstrap", type=positive_int, default=2000,
                    help="bootstrap resamples (default 2000)")

    cm = sub.add_parser("compute-matched",
                        help="SC vs GenRM at equal compute C(S,V) = S(1 + lambda V)")
    _add_pool_args(cm)
    cm.add_argument("--lam", type=positive_float, default=None,
                    help="lambda (default: measured from the pool, or --sim-lambda)")
    cm.add_argument("--sizes", type=int_list, default=None, metavar="S1,S2,...",
                    help="solution counts S (default: powers of two up to the pool size)")
    cm.add_argument("--verifications", type=int_list, default=None, metavar="V1,V2,...",
                    help="verifications per solution V (default: powers of two)")
    cm.add_argument("--v-draws", type=positive_int, default=8,
                    help="Monte Carlo draws of V-subsets of the readings (default 8)")
    cm.add_argument("--bootstrap", type=positive_int, default=1000,
                    help="bootstrap resamples for the exponent CIs (default 1000)")
    cm.add_argument("--profile-out", type=Path, default=None, metavar="PROFILE.json",
                    help="write a verifier profile holding the fitted scaling law (one law "
                         "over all --pool files), for optimal:c=C,profile=FILE")

    ve = sub.add_parser("verifier", help="measure a verifier on labelled pools and write "
                        "its profile (P(Yes) by label, AUC, lambda, repeat ICC)")
    _add_pool_args(ve)
    ve.add_argument("--out", type=Path, default=None, metavar="PROFILE.json",
                    help="write the verifier profile (policies take it as profile=FILE)")
    ve.add_argument("--readings", type=positive_int, default=None, metavar="V",
                    help="readings per solution used (default: all recorded; simulated: 4)")
    ve.add_argument("--online-sizes", type=int_list, default=(8, 16), metavar="S1,S2",
                    help="samples per problem for the online (pseudo-label) estimate "
                         "(default 8,16)")
    ve.add_argument("--online-orders", type=positive_int, default=10,
                    help="served orders for the online estimate (default 10)")

    qs = sub.add_parser("quality-sweep", help="accuracy vs compute for SC, the GenRM grid, "
                        "optimal and given policies, per SIMULATED verifier quality and lambda")
    qs.add_argument("--pool", action="append", required=True, type=Path, metavar="FILE",
                    help="pool scored (repeatable)")
    qs.add_argument("--fit-pool", action="append", required=True, type=Path, metavar="FILE",
                    help="pool optimal's scaling law is fitted on (repeatable; not a --pool)")
    qs.add_argument("--quality", action="append", default=None, metavar="A,B/C,D",
                    help="simulated P(Yes)|correct ~ Beta(A,B), P(Yes)|wrong ~ Beta(C,D) "
                         "(repeatable; default 2.35,2/2,2.35 3,2/2,3 4,2/2,4: AUC 0.60, "
                         "0.76, 0.90)")
    qs.add_argument("--lams", type=float_list, default=(0.5, 1.0, 2.0), metavar="L1,L2",
                    help="simulated lambdas (default 0.5,1,2)")
    qs.add_argument("--policy", action="append", default=None, metavar="SPEC",
                    help="policy replayed besides optimal (repeatable; default adaptive)")
    qs.add_argument("--compute", type=float_list, default=(4, 8, 16, 32, 64, 128, 256),
                    metavar="C1,C2", help="compute levels for optimal:c=C "
                                         "(default 4,8,...,256)")
    qs.add_argument("--sizes", type=int_list, default=(1, 2, 4, 8, 16, 32, 64),
                    metavar="S1,S2", help="SC / GenRM solution counts (default 1..64)")
    qs.add_argument("--verifications", type=int_list, default=(1, 2, 4, 8, 16),
                    metavar="V1,V2", help="GenRM verifications (default 1,2,4,8,16)")
    qs.add_argument("--sim-vmax", type=positive_int, default=16, metavar="V",
                    help="simulated readings per sample (default 16)")
    qs.add_argument("--v-draws", type=positive_int, default=4,
                    help="Monte Carlo draws of V-subsets (default 4)")
    qs.add_argument("--orders", type=positive_int, default=5,
                    help="served orders per problem for replayed policies (default 5)")
    qs.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    qs.add_argument("--limit", type=positive_int, default=None,
                    help="only the first N problems of each pool")
    qs.add_argument("--workers", type=positive_int, default=None,
                    help="processes for the replay engines (default: one per CPU)")
    qs.add_argument("--profile-dir", type=Path, default=Path("quality-sweep-profiles"),
                    help="where the fitted profiles (one per setting) are written")
    qs.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")
    qs.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                    help="write Markdown tables")
    qs.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="write a figure")

    ca = sub.add_parser("calibrate", help="pick a policy threshold on --fit pools for a "
                        "target agreement with sc:n=all; report it on --holdout pools")
    ca.add_argument("--fit", action="append", default=[], type=Path, metavar="FILE",
                    help="pool the threshold is chosen on (repeatable)")
    ca.add_argument("--pool", action="append", default=[], type=Path, metavar="FILE",
                    help="with --folds: a pool of the cross-validation (repeatable)")
    _add_contested_arg(ca)
    ca.add_argument("--folds", choices=("model", "dataset"), default=None,
                    help="leave-one-model-out (or -dataset-out) cross-validation over the "
                         "--pool pools instead of one fit/holdout split")
    ca.add_argument("--candidate", action="append", default=[], metavar="SPEC",
                    help="a full policy spec to choose among (repeatable, cheapest first; "
                         "replaces --policy/--grid)")
    ca.add_argument("--select", choices=("agreement", "accuracy"), default="agreement",
                    help="with --folds: agreement = cheapest reaching --target-agreement; "
                         "accuracy = largest median saving with mean accuracy delta >= "
                         "--min-delta and median latency ratio <= --max-latency")
    ca.add_argument("--min-delta", type=float, default=-0.3, metavar="PP",
                    help="with --select accuracy: mean accuracy delta floor in pp "
                         "(default -0.3)")
    ca.add_argument("--max-latency", type=positive_float, default=1.0,
                    help="with --select accuracy: median latency ratio cap (default 1.0)")
    ca.add_argument("--holdout", action="append", default=[], type=Path, metavar="FILE",
                    help="pool the choice is checked on (repeatable)")
    ca.add_argument("--policy", default="adaptive:max=all,confidence={}",
                    help="policy template with {} for the value "
                         "(default adaptive:max=all,confidence={})")
    ca.add_argument("--grid", type=float_list,
                    default=(0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98),
                    metavar="X1,X2,...", help="values, cheapest first")
    ca.add_argument("--target-agreement", type=positive_float, default=0.97,
                    help="required mean agreement with sc:n=all on --fit (default 0.97)")
    ca.add_argument("--orders", type=positive_int, default=20,
                    help="random sample orders per problem (default 20)")
    ca.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ca.add_argument("--concurrency", type=positive_int, default=None,
                    help="samples in flight per problem (default: no cap)")
    ca.add_argument("--decode-rate", type=positive_float, default=50.0,
                    help="simulated tokens per second per sample (default 50)")
    ca.add_argument("--workers", type=positive_int, default=None,
                    help="processes for the replay engines (default: one per CPU)")
    ca.add_argument("--json", type=Path, default=None, metavar="OUT", help="write JSON here")
    ca.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                    help="write the Markdown report")

    rec = sub.add_parser("record", help="record a pool from a live endpoint (resumable)")
    add_endpoint_args(rec)
    rec.add_argument("--problems", required=True, type=Path, help="problem JSONL")
    rec.add_argument("--out", required=True, type=Path, help="pool JSONL (appended; resumable)")
    rec.add_argument("--samples", type=positive_int, required=True, help="solutions per problem")
    rec.add_argument("--verifications", type=non_negative_int, default=0,
                     help="verifications per answered solution (default 0)")
    rec.add_argument("--limit", type=positive_int, default=None, help="first N problems")
    rec.add_argument("--concurrency", type=positive_int, default=defaults.CONCURRENCY,
                     help=f"requests in flight (default {defaults.CONCURRENCY})")
    rec.add_argument("--rate", type=positive_float, default=None,
                     help="max HTTP requests per second to every endpoint together "
                          "(retries, probes and each stream of an emulated n count)")
    rec.add_argument("--no-texts", action="store_true", help="do not store texts")
    add_resume_args(rec)
    add_task_args(rec)
    return parser


def _add_contested_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contested", type=fraction, default=None, metavar="SHARE",
                   help="only the problems whose most common answer has less than SHARE "
                        "of their samples (a harder batch: a stress test; reports name "
                        "the pool <name>+contested<SHARE>)")


def _load(path: Path, args: argparse.Namespace, limit: int | None = None) -> Any:
    """A pool as the command's --limit and --contested select it."""
    from benchmarks.pools import load_pool

    pool = load_pool(path, limit=limit)
    return pool if args.contested is None else pool.contested(args.contested)


# ---- shared helpers ---------------------------------------------------------------------------
def _sources(args: argparse.Namespace) -> list[Any]:
    from benchmarks.source import ReplaySource, SimulatedVerifier

    verifier: Any = "auto"
    if args.simulated_verifier:
        verifier = SimulatedVerifier(correct=args.sim_correct, wrong=args.sim_wrong,
                                     lam=args.sim_lambda, vmax=args.sim_vmax, seed=args.seed,
                                     corr=args.sim_corr)
    return _checked(args.pool, [
        ReplaySource(_load(p, args, args.limit), seed=args.seed, verifier=verifier,
                     verify_tokens=args.verify_tokens) for p in args.pool])


def _checked(paths: Sequence[Path], sources: list[Any]) -> list[Any]:
    """``sources`` (one per path), refused when two share a name (reports and folds go by
    name: one would hide the other) or one has no label at all (its accuracy read as
    0.000 for every policy)."""
    seen: dict[str, Path] = {}
    for path, src in zip(paths, sources, strict=True):
        if src.name in seen:
            raise ConfigError(f"two pools are named {src.name!r} ({seen[src.name]} and "
                              f"{path}): give the files distinct names")
        seen[src.name] = path
        if not src.pool.arrays.key_labelled.any():
            raise ConfigError(
                f"pool {src.name} ({path}): no answered sample has a 'correct' label, so "
                "no accuracy can be replayed (it read as 0.000 for every policy); label "
                "the samples (bench record does, from the problems' answers)")
    return sources


def _command_line(argv: Sequence[str]) -> str:
    return "solverify bench " + " ".join(shlex.quote(a) for a in argv)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _print_replay_table(report: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout
    # as wide as the longest name (found by review: 'adaptive:max=all,rivals=all' was cut
    # to 'adaptive:max=all,rivals=')
    pw = max([28, *(len(r["pool"]) for r in report["runs"])])
    sw = max([24, *(len(r["policy"]) for r in report["runs"])])
    head = (f"{'pool':{pw}s} {'policy':{sw}s} {'accuracy':>8s} {'95% CI':>15s} "
            f"{'tokens/prob':>12s} {'verif. tok':>10s} {'samples':>8s} {'latency s':>10s} engine")
    print(head, file=file)
    shown: set[str] = set()
    for r in report["runs"]:
        ver = r.get("verifier")
        if r["pool"] not in shown and ver and ver != "no verifier":
            shown.add(r["pool"])
            print(f"# {r['pool']}: {ver.replace('simulated', 'SIMULATED', 1)}", file=file)
        lo, hi = r["accuracy_ci95"]
        print(f"{r['pool']:{pw}s} {r['policy']:{sw}s} {r['accuracy']:8.3f} "
              f"[{lo:.3f},{hi:.3f}] {r['tokens_per_problem']:12,.0f} "
              f"{r.get('verification_tokens_per_problem', 0):10,.0f} "
              f"{r['samples_per_problem']:8.2f} {r['latency_per_problem']:10,.1f} "
              f"{r.get('engine', '')}", file=file)
    print(f"wall time {report['wall_s']:.1f} s", file=file)


# ---- commands -----------------------------------------------------------------------------------
def _replay(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks.plots import plot_replay, replay_markdown
    from benchmarks.replay import ReplayConfig, sweep

    cfg = ReplayConfig(orders=args.orders, seed=args.seed, concurrency=args.concurrency,
                       decode_rate=args.decode_rate, ttft=args.ttft, workers=args.workers,
                       engine=args.engine, bootstrap=args.bootstrap)
    sources = _sources(args)
    _warn_beyond_pool(sources, args.policy)
    progress = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        total = len(sources) * len(args.policy) * args.orders
        progress = tqdm(total=total, unit="order", desc="replay", file=sys.stderr,
                        dynamic_ncols=True)
    try:
        report = sweep(sources, args.policy, cfg,
                       progress=None if progress is None else progress.update)
    finally:
        if progress is not None:
            progress.close()
    report["command"] = _command_line(argv)
    if not args.quiet:  # first: a file that cannot be written after all loses no table
        _print_replay_table(report)
    if args.json:
        _write_json(args.json, report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(replay_markdown(report, report["command"]), encoding="utf-8")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_replay(report, args.plot)
    return 0


def _warn_beyond_pool(sources: Sequence[Any], specs: Sequence[str]) -> None:
    """A policy whose horizon exceeds what a pool holds replays with the pool's samples
    only (``sc:n=100`` on a 16-sample pool is ``sc:n=all``): say so, as its row's label
    and horizon do not."""
    from benchmarks.replay import horizon
    from orchestrator.cliargs import warn

    for src in sources:
        size = int(src.pool.arrays.n.max())
        for spec in specs:
            cap = horizon(spec, size)
            if cap.isdigit() and int(cap) > size:
                warn(f"{spec} may draw {cap} samples a problem, but pool {src.name} holds "
                     f"at most {size}: it replays with those (the samples column says how "
                     "many it drew)")


def _compute_matched(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks.compute_matched import CompareConfig, compute_matched
    from benchmarks.plots import compute_matched_markdown, plot_compute_matched

    cfg = CompareConfig(sizes=args.sizes, verifications=args.verifications, lam=args.lam,
                        v_draws=args.v_draws, bootstrap=args.bootstrap, seed=args.seed)
    t0 = time.perf_counter()
    results = []
    sources = _sources(args)
    for src in sources:
        res = compute_matched(src, cfg)
        results.append(res)
        if not args.quiet:
            sc = res["scaling"]

            def exp(key: str, sc: dict[str, Any] = sc) -> str:
                value, ci = sc[f"{key}_exponent"], sc[f"{key}_exponent_ci95"]
                text = "n/a" if value is None else f"{value:.2f}"
                return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

            print(f"{res['pool']}: {res['verifier']}; lambda={res['lambda']:.3g} "
                  f"({res['lambda_source']}); crossover C={res['crossover_budget']}; "
                  f"S_opt ~ C^{exp('S')}, V_opt ~ C^{exp('V')}")
    report = {"results": results, "command": _command_line(argv),
              "wall_s": round(time.perf_counter() - t0, 3)}
    if args.json:
        _write_json(args.json, report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(compute_matched_markdown(results, report["command"]),
                                 encoding="utf-8")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_compute_matched(results, args.plot)
    if args.profile_out:
        from benchmarks.verifier import scaling_profile

        prof = scaling_profile(sources, results)
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        prof.save(args.profile_out)
        if not args.quiet:
            law = prof.scaling
            assert law is not None
            print(f"profile written to {args.profile_out}: S_opt = {law.s_coef:.3g} C^"
                  f"{law.s_exp:.3g}, V_opt = {law.v_coef:.3g} C^{law.v_exp:.3g}, crossover "
                  f"C={law.crossover}, verification pays: {law.verify_pays}")
    return 0


def _verifier(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks.verifier import measure_verifier, report_text

    t0 = time.perf_counter()
    profile, report = measure_verifier(_sources(args), readings=args.readings,
                                       online_sizes=args.online_sizes,
                                       online_orders=args.online_orders)
    report["command"] = _command_line(argv)
    report["wall_s"] = round(time.perf_counter() - t0, 3)
    text = report_text(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        profile.save(args.out)
    if args.json:
        _write_json(args.json, report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"```\n{report['command']}\n```\n\n```\n{text}```\n",
                                 encoding="utf-8")
    if not args.quiet:
        print(text, end="")
        if args.out:
            print(f"profile written to {args.out}")
    return 0


def _quality_sweep(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks.compute_matched import CompareConfig
    from benchmarks.pools import load_pool
    from benchmarks.quality_sweep import Quality, plot_sweep, quality_sweep, sweep_markdown
    from benchmarks.replay import ReplayConfig

    qualities = [Quality.parse(q) for q in
                 (args.quality or ["2.35,2/2,2.35", "3,2/2,3", "4,2/2,4"])]
    cm = CompareConfig(sizes=args.sizes, verifications=args.verifications,
                       v_draws=args.v_draws, bootstrap=1, seed=args.seed)
    rc = ReplayConfig(orders=args.orders, seed=args.seed, workers=args.workers, bootstrap=200)
    report = quality_sweep(
        [load_pool(p, limit=args.limit) for p in args.pool],
        [load_pool(p, limit=args.limit) for p in args.fit_pool], qualities, args.lams,
        args.policy or ["adaptive"], args.compute, profile_dir=args.profile_dir, cm=cm,
        replay=rc, vmax=args.sim_vmax, seed=args.seed,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    report["command"] = _command_line(argv)
    text = sweep_markdown(report, report["command"])
    if args.json:
        _write_json(args.json, report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text, encoding="utf-8")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_sweep(report, args.plot)
    print(text, end="")
    return 0


def _record(args: argparse.Namespace) -> int:
    import asyncio

    from benchmarks.record import record
    from orchestrator.cliargs import api_key_from, endpoint_backend, make_task
    from orchestrator.problems import load_problems
    from orchestrator.redact import redact_text

    problems = load_problems(args.problems, limit=args.limit)
    task = make_task(problems, args)
    api_key = api_key_from(args)
    writer = _check_record_out(args, task)

    async def go() -> int:
        from orchestrator.retry import make_throttler

        backend = endpoint_backend(args, api_key, make_throttler(args.rate))
        try:
            # reachability, then a real tiny request (EndpointUnreachable, ModelNotFound:
            # exit 2 with one line), before the pool file is touched
            await backend.list_models()
            await backend.probe(task.endpoint)
            writer.commit()  # --overwrite's truncation and the fingerprint, now
            writer.close()
            summary = await record(problems, backend, task, args.out, samples=args.samples,
                                   verifications=args.verifications,
                                   concurrency=args.concurrency,
                                   model=args.model, texts=not args.no_texts)
        finally:
            writer.close()
            await backend.aclose()
        print(f"recorded {summary.recorded} problems ({summary.skipped} already in "
              f"{summary.path}); {summary.samples} samples, {summary.verifications} "
              f"verifications, {summary.failed_samples} failed samples, "
              f"{summary.errors} problems ended on an error (not written; rerun to retry)")
        if summary.first_error is not None:
            print(f"first error: {redact_text(summary.first_error)}")
        return 0 if summary.errors == 0 else 1

    return asyncio.run(go())


def _check_record_out(args: argparse.Namespace, task: Any) -> Any:
    """--resume/--overwrite for the pool file (orchestrator.results_io): refuse a non-empty
    --out without one, a resume of a different recording, and drop a torn last line. The
    writer it returns applies the rest (truncation, fingerprint) at its ``commit()``."""
    from orchestrator.cliargs import warn as _warn
    from orchestrator.results_io import file_sha256, open_results

    fingerprint = {"command": "bench record", "model": args.model, "samples": args.samples,
                   "verifications": args.verifications, "problems": args.problems.name,
                   "problems_sha256": file_sha256(args.problems), "endpoint": task.endpoint,
                   "max_tokens": task.max_tokens, "temperature": task.temperature}
    _, writer = open_results(args.out, fingerprint, resume=args.resume,
                             overwrite=args.overwrite, warn=_warn)
    return writer  # benchmarks.record appends, skipping ids already in the file


def _calibrate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks.calibrate import calibrate, markdown
    from benchmarks.replay import ReplayConfig
    from benchmarks.source import ReplaySource

    cfg = ReplayConfig(orders=args.orders, seed=args.seed, concurrency=args.concurrency,
                       decode_rate=args.decode_rate, workers=args.workers)

    def sources(paths: Sequence[Path]) -> list[Any]:
        return _checked(paths, [ReplaySource(_load(p, args), seed=args.seed) for p in paths])

    if args.folds is not None:
        from benchmarks.calibrate import cross_validate, cv_markdown, spec_for

        if args.fit or args.holdout:
            raise ConfigError("--folds cross-validates over --pool pools; drop --fit/--holdout")
        if not args.pool:
            raise ConfigError("--folds needs --pool FILE (repeatable)")
        specs = args.candidate or [spec_for(args.policy, v) for v in args.grid]
        result = cross_validate(sources(args.pool), specs, cfg, folds=args.folds,
                                select=args.select, target_agreement=args.target_agreement,
                                min_delta=args.min_delta / 100, max_latency=args.max_latency)
        result["command"] = _command_line(argv)
        text = cv_markdown(result)
    else:
        if not args.fit:
            raise ConfigError("calibrate needs --fit FILE (or --folds with --pool FILE)")
        if args.candidate:
            raise ConfigError("--candidate needs --folds; without it use --policy and --grid")
        result = calibrate(sources(args.fit), sources(args.holdout), args.policy, args.grid,
                           args.target_agreement, cfg)
        result["command"] = _command_line(argv)
        text = markdown(result)
    if args.json:
        _write_json(args.json, result)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"```\n{result['command']}\n```\n\n{text}", encoding="utf-8")
    print(text, end="")
    return 0


#: each command's output paths: (attribute, flag, a folder rather than a file)
_OUTPUTS = (("json", "--json", False), ("markdown", "--markdown", False),
            ("plot", "--plot", False), ("profile_out", "--profile-out", False),
            ("out", "--out", False), ("profile_dir", "--profile-dir", True))


def _check_outputs(args: argparse.Namespace) -> None:
    """Every output path the command was given, checked before the work (found by review:
    a --json that was a folder failed after the whole sweep, and the table was lost)."""
    for attr, flag, folder in _OUTPUTS:
        check_output(flag, getattr(args, attr, None), folder=folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``solverify bench``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    _check_outputs(args)  # fail now, not after the work
    if getattr(args, "plot", None) is not None:  # fail now, not after the work
        from benchmarks.plots import require_matplotlib

        require_matplotlib()
    if args.command == "replay":
        return _replay(args, args_list)
    if args.command == "compute-matched":
        return _compute_matched(args, args_list)
    if args.command == "record":
        return _record(args)
    if args.command == "calibrate":
        return _calibrate(args, args_list)
    if args.command == "verifier":
        return _verifier(args, args_list)
    if args.command == "quality-sweep":
        return _quality_sweep(args, args_list)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
