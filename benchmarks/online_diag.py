"""How a verifying policy's online verifier estimate fares in a replay, order by order.

``python -m benchmarks.online_diag --pool FILE [--policy solverify] [--orders 3]
[--sim-correct 4,2 --sim-wrong 2,4 --sim-lambda 1] [--seed 0]``

Replays the policy (lean engine, simulated clock, a SIMULATED verifier with the given
Beta parameters, as ``bench replay --simulated-verifier``) and reports per order: the
readings that returned and those a stop cut; the online estimate the run's history gives
at the end of the order (pseudo-positive and pseudo-negative readings, estimated AUC and
its 95% lower bound, whether it is usable); the first simulated time at which a decision
saw a usable estimate; how many pseudo-labels were wrong against the pool's labels (a
pseudo-negative that is really a right answer, e.g. an equivalent form of it that the
pool keys differently); and the accuracy. It explains what limits the policies' online
estimate on a given pool; it is not a benchmark of the policy.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.engine import run_order
from benchmarks.pools import load_pool
from benchmarks.replay import policy_for
from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.cliargs import beta_params, positive_float, positive_int
from orchestrator.decisions import Decision
from orchestrator.errors import ConfigError
from orchestrator.history import RunHistory
from orchestrator.snapshot import ProblemSnapshot
from policies.online import estimate_online
from policies.verifying import Solverify, VerifyContested


class _Traced:
    """The policy, recording when a decision first saw a usable verifier estimate."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.first_usable: float | None = None
        self.spec = policy.spec
        self.verifies = True

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        if self.first_usable is None and self.policy.verifier(s)[0] is not None:
            self.first_usable = s.elapsed
        return self.policy.decide(s)


def diagnose(src: ReplaySource, spec: str, orders: int) -> list[dict[str, Any]]:
    """One row per order (see the module docstring)."""
    if not src.problems:
        raise ConfigError(f"pool {src.name} has no problems")
    policy = policy_for(spec, int(src.pool.arrays.n.max()))
    if not isinstance(policy, Solverify | VerifyContested) or policy.profile:
        raise ConfigError(f"{spec}: a verifying policy without a profile is needed "
                          "(verify-contested or solverify)")
    grader = src.task.grader
    rows = []
    for order in range(orders):
        traced = _Traced(policy)
        history = RunHistory()
        results = run_order(src, traced, order, history=history)
        est = estimate_online(history.records, min_per_class=policy.explore,
                              min_auc=policy.min_auc)
        wrong_pos = wrong_neg = 0
        for r in results:
            if r.stop_code != "settled" or r.key is None:
                continue
            keys = {s.id: s for s in r.solutions}
            for v in r.verifications:
                sol = keys[v.solution_id]
                right = bool(grader.is_correct(sol.answer, r.problem))
                if sol.key == r.key and not right:
                    wrong_pos += 1
                elif sol.key != r.key and right:
                    wrong_neg += 1
        rows.append({
            "order": order,
            "readings": sum(len(r.verifications) for r in results),
            "readings_cut": sum(1 for r in results for f in r.failed if f.kind == "verify"),
            "pseudo_positives": est.positives,
            "pseudo_negatives": est.negatives,
            "pseudo_positives_wrong": wrong_pos,
            "pseudo_negatives_right": wrong_neg,
            "auc": None if est.profile is None else est.profile.auc,
            "auc_low": est.auc_low,
            "usable_at_end": est.usable is not None,
            "first_usable_s": traced.first_usable,
            "last_problem_s": max(r.elapsed for r in results),
            "accuracy": sum(bool(r.correct) for r in results) / len(results),
            "tokens": sum(r.usage.completion_tokens for r in results),
        })
    return rows


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.online_diag",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--policy", default="solverify")
    ap.add_argument("--orders", type=positive_int, default=3)
    ap.add_argument("--sim-correct", type=beta_params, default=(4.0, 2.0), metavar="A,B")
    ap.add_argument("--sim-wrong", type=beta_params, default=(2.0, 4.0), metavar="A,B")
    ap.add_argument("--sim-lambda", type=positive_float, default=1.0, metavar="X")
    ap.add_argument("--sim-vmax", type=positive_int, default=16, metavar="V")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sim = SimulatedVerifier(correct=args.sim_correct, wrong=args.sim_wrong,
                            lam=args.sim_lambda, vmax=args.sim_vmax, seed=args.seed)
    src = ReplaySource(load_pool(args.pool), seed=args.seed, verifier=sim)
    print(f"# {src.name}: {args.policy}, {src.verifier_label}")
    for r in diagnose(src, args.policy, args.orders):
        print(f"order {r['order']}: readings {r['readings']} returned, {r['readings_cut']} cut; "
              f"pseudo-labels +{r['pseudo_positives']} / -{r['pseudo_negatives']} "
              f"(wrong: {r['pseudo_positives_wrong']} / {r['pseudo_negatives_right']}); "
              f"AUC {_fmt(r['auc'])}, lower bound {_fmt(r['auc_low'])}, usable at the end: "
              f"{'yes' if r['usable_at_end'] else 'no'}; first usable at "
              f"{_fmt(r['first_usable_s'], '.0f')} s of {r['last_problem_s']:.0f} s; "
              f"accuracy {r['accuracy']:.3f}, {r['tokens']} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
