"""Pick a policy threshold on one set of pools, and show how it holds on another.

The question a threshold answers is "how often may the cheap policy disagree with
``sc:n=all``?". So calibration targets *agreement with full Self-Consistency* — measured
on every (problem, order), a far denser signal than accuracy on 30-problem pools — and
picks the cheapest grid value whose mean agreement over the fit pools reaches the
target. The chosen value is then replayed on the holdout pools, and the report gives, per
split, the three figures the adaptive policy is judged by: median token saving (×),
mean accuracy delta and median latency ratio against ``sc:n=all``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.replay import ReplayConfig, sweep
from orchestrator.errors import ConfigError

BASELINE = "sc:n=all"


@dataclass(frozen=True, slots=True)
class SplitScore:
    """The judged figures of one policy spec on one set of pools."""

    spec: str
    agreement: float  # mean over pools of agreement with sc:n=all
    accuracy_delta: float  # mean over pools, in accuracy points (0.01 = 1 pp)
    median_saving: float  # median over pools of tokens(sc:n=all) / tokens(policy)
    median_latency_ratio: float  # median over pools of latency(policy) / latency(sc:n=all)
    pools: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.spec, "agreement_with_full_sc": round(self.agreement, 4),
            "accuracy_delta": round(self.accuracy_delta, 5),
            "median_token_saving_x": round(self.median_saving, 3),
            "median_latency_ratio": round(self.median_latency_ratio, 3), "pools": self.pools,
        }


def spec_for(template: str, value: float) -> str:
    if "{}" not in template:
        raise ConfigError(f"policy template {template!r} needs a '{{}}' where the value goes, "
                          "e.g. 'adaptive:max=all,confidence={}'")
    return template.replace("{}", f"{value:g}")


def score_split(report: dict[str, Any], specs: Sequence[str]) -> list[SplitScore]:
    """Per spec, the judged figures from a ``sweep`` report that also ran ``sc:n=all``."""
    by_pool: dict[str, dict[str, dict[str, Any]]] = {}
    for run in report["runs"]:
        by_pool.setdefault(run["pool"], {})[run["policy"]] = run
    scores = []
    for spec in specs:
        agree, delta, saving, latency = [], [], [], []
        for runs in by_pool.values():
            base, run = runs[BASELINE], runs[spec]
            agree.append(run["agreement_with_full_sc"])
            delta.append(run["accuracy"] - base["accuracy"])
            saving.append(base["tokens_per_problem"] / max(run["tokens_per_problem"], 1e-9))
            latency.append(run["latency_per_problem"] / max(base["latency_per_problem"], 1e-9))
        scores.append(SplitScore(spec, float(np.mean(agree)), float(np.mean(delta)),
                                 float(np.median(saving)), float(np.median(latency)),
                                 len(by_pool)))
    return scores


def calibrate(fit: Sequence[Any], holdout: Sequence[Any], template: str,
              grid: Sequence[float], target_agreement: float, cfg: ReplayConfig,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Choose the grid value on ``fit`` pools, then replay it on ``holdout`` pools.

    The grid is ordered from cheapest (stops earliest) to most careful; the choice is the
    first value whose fit agreement reaches ``target_agreement`` (the last one if none
    does, flagged ``"target_met": false``).
    """
    if not fit:
        raise ConfigError("calibrate needs at least one --fit pool")
    if not grid:
        raise ConfigError("calibrate needs a non-empty --grid")
    if not 0 < target_agreement <= 1:
        raise ConfigError(f"target agreement must be in (0, 1], got {target_agreement}")
    specs = [spec_for(template, v) for v in grid]
    fit_report = sweep(fit, [BASELINE, *specs], cfg, progress)
    fit_scores = score_split(fit_report, specs)
    chosen = next((s for s in fit_scores if s.agreement >= target_agreement), None)
    target_met = chosen is not None
    if chosen is None:
        chosen = fit_scores[-1]
    out: dict[str, Any] = {
        "template": template,
        "grid": list(grid),
        "target_agreement": target_agreement,
        "target_met": target_met,
        "chosen": chosen.spec,
        "fit": {"pools": [s.name for s in fit],
                "scores": [s.to_dict() for s in fit_scores]},
        "config": fit_report["config"],
    }
    if holdout:
        hold_report = sweep(holdout, [BASELINE, chosen.spec], cfg, progress)
        (hold,) = score_split(hold_report, [chosen.spec])
        out["holdout"] = {"pools": [s.name for s in holdout], "score": hold.to_dict(),
                          "runs": hold_report["runs"]}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Calibration of `{result['template']}` for agreement with `sc:n=all` "
        f">= {result['target_agreement']:g} on the fit pools "
        f"({len(result['fit']['pools'])} pools):",
        "",
        "| policy | agreement | accuracy delta (pp) | median token saving | median latency ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in result["fit"]["scores"]:
        mark = " **(chosen)**" if s["policy"] == result["chosen"] else ""
        lines.append(f"| `{s['policy']}`{mark} | {s['agreement_with_full_sc']:.4f} | "
                     f"{100 * s['accuracy_delta']:+.2f} | {s['median_token_saving_x']:.2f}x | "
                     f"{s['median_latency_ratio']:.2f} |")
    if not result["target_met"]:
        lines.append("\nNo grid value reached the target; the most careful one is reported.")
    if "holdout" in result:
        h = result["holdout"]["score"]
        lines += [
            "",
            f"Holdout ({len(result['holdout']['pools'])} pools), `{result['chosen']}`: "
            f"agreement {h['agreement_with_full_sc']:.4f}, accuracy delta "
            f"{100 * h['accuracy_delta']:+.2f} pp, median token saving "
            f"{h['median_token_saving_x']:.2f}x, median latency ratio "
            f"{h['median_latency_ratio']:.2f}.",
        ]
    return "\n".join(lines) + "\n"
