"""CPU cost of a replay sweep, lean engine vs runtime, and their identity on some orders.

    python -m benchmarks.replay_speed --pool ../shared/data/pools/boinf_math500_Qwen3-14B.jsonl
        [--orders 100] [--engine auto|lean|runtime] [--check-orders 3]
        [--policy SPEC ... | --speed-sweep]

Replays the README's MATH-500 sweep (the seven peer baselines and three ``adaptive`` rows,
ten policies; ``--speed-sweep``: the README "Speed" sweep of ten policies plus ``adaptive``
instead) on one pool in one process (``workers=1``, so the process CPU time is the whole
cost) and prints the CPU seconds per policy and in all, with the load average, which says
how busy the machine was. The served orders are drawn once for the pool, as a sweep
(:func:`benchmarks.replay.sweep`) draws them, so the first policy's time includes them
(some 0.1 s per 100 orders of the MATH-500 pool). ``--check-orders K`` first replays K
orders of every non-fixed policy through both the lean engine and the runtime and stops
with an error unless every per-problem result is identical (and for ``ac``, ``esc`` and
``boinf`` unless the direct engine's metrics equal the lean engine's, latency to
rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

#: the README's MATH-500 sweep: the peer baselines, then the adaptive rows
SWEEP = ("sc:n=all", "ac:threshold=0.95,max=all", "boinf:bayes_factor=30", "ac:threshold=0.95",
         "esc:window=5", "sc:n=16", "sc:n=32", "adaptive", "adaptive:max=all",
         "adaptive:learn=false,wide=8")
#: the README "Speed" sweep (ten policies: SC at every n, AC, ESC), plus ``adaptive``; the
#: lean engine's goal is all of it in 10 s CPU at 100 orders on the MATH-500 pool
SPEED_SWEEP = ("sc:n=all", "sc:n=1", "sc:n=2", "sc:n=4", "sc:n=8", "sc:n=16", "sc:n=32",
               "sc:n=64", "ac:threshold=0.95", "esc:window=5", "adaptive")


def check(src, specs, orders: int) -> None:
    import asyncio

    import numpy as np

    from benchmarks.direct import supports
    from benchmarks.engine import run_order
    from benchmarks.replay import (
        ReplayConfig,
        _row,
        _run_problems,
        fixed_plan,
        policy_for,
        run_direct_order,
    )
    from orchestrator.simclock import SimulatedClockLoop

    cfg = ReplayConfig(orders=1)
    size = int(src.pool.arrays.n.max())
    for spec in specs:
        if fixed_plan(spec, size) is not None:
            continue
        policy = policy_for(spec, size)
        direct = supports(policy)
        handed = 0
        for r in range(orders):
            with asyncio.Runner(loop_factory=SimulatedClockLoop) as runner:
                slow = runner.run(_run_problems(src, policy, r, cfg))
            fast = run_order(src, policy, r)
            bad = [a.problem.id for a, b in zip(slow, fast, strict=True) if a != b]
            if bad:
                sys.exit(f"{spec} order {r}: {len(bad)} problems differ, e.g. {bad[:3]}")
            if direct:  # the direct engine's metrics against the lean engine's results
                got = run_direct_order(src, policy, r, cfg)
                if got is None:
                    handed += 1
                elif not np.allclose(got[0], _row(src, fast)[0], rtol=1e-12, atol=0,
                                     equal_nan=True):
                    sys.exit(f"{spec} order {r}: the direct engine's metrics differ")
        how = (f" (direct engine too; {handed} orders handed to the lean engine)"
               if direct else "")
        print(f"identical: {spec}, {orders} orders x {len(src.problems)} problems{how}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.pools import load_pool
    from benchmarks.replay import ReplayConfig, policy_for, replay_pool
    from benchmarks.source import ReplaySource

    ap = argparse.ArgumentParser(prog="python -m benchmarks.replay_speed")
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--orders", type=int, default=100)
    ap.add_argument("--engine", choices=("auto", "lean", "runtime"), default="auto")
    ap.add_argument("--check-orders", type=int, default=0)
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--speed-sweep", action="store_true",
                    help="the README Speed sweep plus adaptive (SPEED_SWEEP)")
    args = ap.parse_args(argv)
    if args.speed_sweep and args.policy:
        ap.error("--speed-sweep and --policy exclude each other")
    specs = list(SPEED_SWEEP) if args.speed_sweep else args.policy or list(SWEEP)
    src = ReplaySource(load_pool(args.pool))
    if args.check_orders:
        check(src, specs, args.check_orders)
    cfg = ReplayConfig(orders=args.orders, workers=1, engine=args.engine, bootstrap=1)
    # the policy objects first: parsing a spec imports its policy's module (numpy and
    # scipy through it), which is start-up, not replay
    t0 = time.process_time()
    size = int(src.pool.arrays.n.max())
    objs = {spec: policy_for(spec, size) for spec in specs}
    import benchmarks.engine  # noqa: F401  (imported on its first use otherwise)
    print(f"{'(parsing the specs, imports)':43s} {time.process_time() - t0:8.2f} s CPU")
    load0 = os.getloadavg()
    total0 = time.process_time()
    for spec in specs:
        t0 = time.process_time()
        (out,) = replay_pool(src, [objs[spec]], cfg)
        print(f"{spec:32s} {out.engine:10s} {time.process_time() - t0:8.2f} s CPU", flush=True)
    total = time.process_time() - total0
    load1 = os.getloadavg()
    print(f"total {total:.2f} s CPU (replay only) for {len(specs)} policies x "
          f"{args.orders} orders x {len(src.problems)} problems ({args.engine}); load average "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
