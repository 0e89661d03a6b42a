"""Where a policy's accuracy gap to a baseline comes from, problem by problem.

``python -m benchmarks.problem_gaps --pool FILE [--pool ...] --policy BASE --policy SPEC ...
[--orders 40] [--seed 0] [--min-gap 0.02] [--json OUT.json]``

Replays every ``--policy`` (the first is the baseline, e.g. ``sc:n=all``) on each pool as
``bench replay`` does (same engines, same served orders, so the same numbers) and lists
the problems on which a policy's accuracy, averaged over the orders, differs from the
baseline's by at least ``--min-gap``. Each line gives the whole pool's vote counts for
the three most frequent answers (``*`` marks a right one), the mean samples each policy
drew, and the per-problem accuracies; the listed gaps, summed and divided by the number
of problems, are the pool's accuracy difference up to the gaps below ``--min-gap``.

What it is for: a pool-level loss such as "`adaptive` −2.3 pp on this pool" is often one
or two problems whose whole-pool vote is an exact or near tie, which the baseline's tie
rule (the answer whose first vote finished first: with every sample launched at once, the
shortest trace) wins in every order and any policy that votes over fewer samples wins
only sometimes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pools import load_pool
from benchmarks.replay import ReplayConfig, replay_pool
from benchmarks.source import ReplaySource
from orchestrator.errors import ConfigError


def vote_summary(src: ReplaySource, i: int, top: int = 3) -> list[tuple[int, bool]]:
    """The whole pool's ``top`` largest vote counts of problem ``i`` with each answer's
    label (ties in pool order of first occurrence)."""
    a = src.pool.arrays
    n = int(a.n[i])
    keys = a.key[i, :n]
    counts = np.bincount(keys[keys >= 0], minlength=int(a.n_keys[i]))
    order = np.argsort(-counts, kind="stable")[:top]
    return [(int(counts[k]), bool(a.key_correct[i, k])) for k in order if counts[k] > 0]


def problem_gaps(src: ReplaySource, specs: Sequence[str], cfg: ReplayConfig,
                 min_gap: float) -> dict[str, Any]:
    """The per-problem accuracy gaps of ``specs[1:]`` to ``specs[0]`` on one pool."""
    if len(specs) < 2:
        raise ConfigError("problem_gaps needs a baseline and at least one more --policy")
    if not src.problems:
        raise ConfigError(f"pool {src.name} has no problems")
    outcomes = replay_pool(src, list(specs), cfg)
    acc = {o.policy: np.nanmean(o.correct, axis=0) for o in outcomes}
    samples = {o.policy: o.samples.mean(axis=0) for o in outcomes}
    names = [o.policy for o in outcomes]
    base = names[0]
    rows = []
    for i, problem in enumerate(src.problems):
        gaps = {name: float(acc[name][i] - acc[base][i]) for name in names[1:]}
        if max(abs(g) for g in gaps.values()) < min_gap:
            continue
        rows.append({
            "problem": problem.id,
            "pool_samples": int(src.pool.arrays.n[i]),
            "votes": vote_summary(src, i),
            "accuracy": {name: float(acc[name][i]) for name in names},
            "samples": {name: float(samples[name][i]) for name in names},
            "gap": gaps,
        })
    total = {name: float(np.nanmean(acc[name]) - np.nanmean(acc[base])) for name in names[1:]}
    listed = {name: sum(r["gap"][name] for r in rows) / len(src.problems)
              for name in names[1:]}
    return {"pool": src.name, "problems": len(src.problems), "orders": cfg.orders,
            "baseline": base, "policies": names, "rows": rows, "pool_gap": total,
            "listed_gap": listed}


def _votes_text(votes: list[tuple[int, bool]]) -> str:
    return "-".join(f"{c}{'*' if ok else ''}" for c, ok in votes) or "no answer"


def print_report(r: dict[str, Any]) -> None:
    base = r["baseline"]
    print(f"# {r['pool']}: {r['problems']} problems, {r['orders']} orders, baseline {base}")
    for name in r["policies"][1:]:
        print(f"  {name}: pool gap {100 * r['pool_gap'][name]:+.2f} pp, of which the listed "
              f"problems {100 * r['listed_gap'][name]:+.2f} pp")
    for row in r["rows"]:
        accs = ", ".join(f"{name} {row['accuracy'][name]:.2f} ({row['samples'][name]:.1f} "
                         f"samples)" for name in r["policies"])
        print(f"  {row['problem']}: whole-pool votes {_votes_text(row['votes'])} of "
              f"{row['pool_samples']}; {accs}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.problem_gaps",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", action="append", required=True, type=Path)
    ap.add_argument("--policy", action="append", required=True,
                    help="the first is the baseline")
    ap.add_argument("--orders", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-gap", type=float, default=0.02)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if len(args.policy) < 2:
        ap.error("give a baseline --policy and at least one more")
    cfg = ReplayConfig(orders=args.orders, seed=args.seed, bootstrap=1)
    reports = []
    for path in args.pool:
        src = ReplaySource(load_pool(path), seed=args.seed)
        report = problem_gaps(src, args.policy, cfg, args.min_gap)
        print_report(report)
        reports.append(report)
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
