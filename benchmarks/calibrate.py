"""Pick a policy threshold on one set of pools, and show how it holds on another.

The question a threshold answers is "how often may the cheap policy disagree with
``sc:n=all``?". So calibration targets *agreement with full Self-Consistency* — measured
on every (problem, order), a far denser signal than accuracy on 30-problem pools — and
picks the cheapest grid value whose mean agreement over the fit pools reaches the
target. The chosen value is then replayed on the holdout pools, and the report gives, per
split, the three figures the adaptive policy is judged by: median token saving (×),
mean accuracy delta and median latency ratio against ``sc:n=all``.

Cross-validation (:func:`cross_validate`, ``solverify bench calibrate --folds model``):
every candidate spec is replayed once on every pool; then, for each fold (the pools of one
model, or of one dataset), the choice rule is applied to the *other* pools and the chosen
spec is scored on the held-out ones. The report gives each fold's choice and held-out
figures, their spread, and the pooled held-out figures (each pool scored with the spec
chosen without it) — the figures to quote for pools not seen. Two choice rules:

* ``agreement``: the cheapest candidate (first in the list) whose mean agreement with
  ``sc:n=all`` reaches the target;
* ``accuracy``: the candidate with the largest median token saving among those whose mean
  accuracy delta is at least ``--min-delta`` and whose median latency ratio is at most
  ``--max-latency`` (none qualifying: the one with the best accuracy delta).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


# ---- cross-validation ---------------------------------------------------------------------
FOLDS = ("model", "dataset")
SELECT = ("agreement", "accuracy")


def pool_group(name: str, by: str, model: str | None = None) -> str:
    """The fold a pool belongs to. By model: the ``model`` field its lines share when
    given (:attr:`benchmarks.pools.Pool.model`; a ``+contested...`` batch keeps its
    suffix), else from its file stem ``<source>_<dataset>_<model>``; by dataset: from the
    stem (``boinf_aime2024_Qwen3-4B``: dataset ``aime2024``, model ``Qwen3-4B``). A stem
    without that shape is its own fold. (Grouping by the stem alone put
    ``..._Qwen3-4B_seed1`` in a fold of its own, beside ``..._Qwen3-4B``: one model on both
    sides of a fold; found by review.)"""
    if by not in FOLDS:
        raise ConfigError(f"folds must be one of {', '.join(FOLDS)}, got {by!r}")
    if by == "model" and model:
        _, plus, batch = name.partition("+")
        return f"{model}{plus}{batch}"
    parts = name.split("_", 2)
    if len(parts) < 3:
        return name
    return parts[2] if by == "model" else parts[1]


@dataclass(frozen=True, slots=True)
class PoolScore:
    """One spec on one pool, against ``sc:n=all`` on the same pool."""

    pool: str
    agreement: float
    accuracy_delta: float
    saving: float
    latency_ratio: float


def pool_scores(report: dict[str, Any], specs: Sequence[str]) -> dict[str, list[PoolScore]]:
    """Per spec, its score on every pool of a ``sweep`` report that also ran ``sc:n=all``."""
    by_pool: dict[str, dict[str, dict[str, Any]]] = {}
    for run in report["runs"]:
        by_pool.setdefault(run["pool"], {})[run["policy"]] = run
    out: dict[str, list[PoolScore]] = {s: [] for s in specs}
    for pool, runs in by_pool.items():
        base = runs[BASELINE]
        for spec in specs:
            run = runs[spec]
            out[spec].append(PoolScore(
                pool, run["agreement_with_full_sc"], run["accuracy"] - base["accuracy"],
                base["tokens_per_problem"] / max(run["tokens_per_problem"], 1e-9),
                run["latency_per_problem"] / max(base["latency_per_problem"], 1e-9)))
    return out


def aggregate(spec: str, scores: Sequence[PoolScore]) -> dict[str, Any]:
    """The judged figures over a set of pool scores (medians and means as in the README)."""
    if not scores:
        raise ConfigError("no pools to aggregate")
    worst = min(scores, key=lambda x: x.accuracy_delta)
    return {
        "policy": spec,
        "pools": len(scores),
        "agreement_with_full_sc": round(float(np.mean([x.agreement for x in scores])), 4),
        "accuracy_delta": round(float(np.mean([x.accuracy_delta for x in scores])), 5),
        "median_token_saving_x": round(float(np.median([x.saving for x in scores])), 3),
        "median_latency_ratio": round(float(np.median([x.latency_ratio for x in scores])), 3),
        "worst_pool": worst.pool,
        "worst_accuracy_delta": round(worst.accuracy_delta, 5),
    }


def choose(table: dict[str, list[PoolScore]], specs: Sequence[str], select: str,
           target_agreement: float = 0.975, min_delta: float = -0.003,
           max_latency: float = 1.0) -> tuple[str, bool]:
    """(chosen spec, whether it met the rule) among ``specs`` (cheapest first)."""
    if select not in SELECT:
        raise ConfigError(f"select must be one of {', '.join(SELECT)}, got {select!r}")
    figures = {s: aggregate(s, table[s]) for s in specs}
    if select == "agreement":
        for s in specs:
            if figures[s]["agreement_with_full_sc"] >= target_agreement:
                return s, True
        return specs[-1], False
    ok = [s for s in specs if figures[s]["accuracy_delta"] >= min_delta
          and figures[s]["median_latency_ratio"] <= max_latency]
    if ok:
        return max(ok, key=lambda s: figures[s]["median_token_saving_x"]), True
    return max(specs, key=lambda s: figures[s]["accuracy_delta"]), False


def cross_validate(sources: Sequence[Any], specs: Sequence[str], cfg: ReplayConfig, *,
                   folds: str = "model", select: str = "accuracy",
                   target_agreement: float = 0.975, min_delta: float = -0.003,
                   max_latency: float = 1.0,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Leave-one-group-out cross-validation of the choice among ``specs``."""
    if not specs:
        raise ConfigError("calibrate needs at least one candidate")
    groups: dict[str, list[str]] = {}
    models = {src.name: src.pool.model for src in sources}
    for src in sources:
        groups.setdefault(pool_group(src.name, folds, models[src.name]), []).append(src.name)
    if len(groups) < 2:
        raise ConfigError(f"cross-validation by {folds} needs pools of at least two "
                          f"{folds}s, got {len(groups)}")
    report = sweep(sources, [BASELINE, *specs], cfg, progress)
    table = pool_scores(report, specs)
    rule = {"select": select, "target_agreement": target_agreement, "min_delta": min_delta,
            "max_latency": max_latency}
    fold_rows = []
    held: list[PoolScore] = []
    for name, pools in groups.items():
        fit = {s: [x for x in table[s] if x.pool not in pools] for s in specs}
        chosen, met = choose(fit, specs, select, target_agreement, min_delta, max_latency)
        out = [x for x in table[chosen] if x.pool in pools]
        held.extend(out)
        fold_rows.append({"fold": name, "pools": pools, "chosen": chosen, "rule_met": met,
                          "fit": aggregate(chosen, fit[chosen]),
                          "holdout": aggregate(chosen, out),
                          "holdout_pools": [vars_of(x) for x in out]})
    final, met = choose(table, specs, select, target_agreement, min_delta, max_latency)
    keys = ("accuracy_delta", "median_token_saving_x", "median_latency_ratio")
    spread = {k: [min(f["holdout"][k] for f in fold_rows),
                  max(f["holdout"][k] for f in fold_rows)] for k in keys}
    pooled = aggregate("cross-validated choice", held)
    return {
        "folds_by": folds, "rule": rule, "candidates": list(specs),
        "folds": fold_rows,
        "pooled_holdout": pooled,
        "pooled_holdout_by": {"by": other_grouping(folds),
                              "groups": held_out_by(fold_rows, other_grouping(folds),
                                                    models)},
        "fold_spread": spread,
        "chosen_on_all": final, "chosen_on_all_met": met,
        "in_sample": [aggregate(s, table[s]) for s in specs],
        "per_pool": {s: [vars_of(x) for x in table[s]] for s in specs},
        "config": report["config"],
    }


def other_grouping(folds: str) -> str:
    return "dataset" if folds == "model" else "model"


def held_out_by(fold_rows: Sequence[dict[str, Any]], by: str,
                models: Mapping[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """The pooled held-out figures split by another grouping of the pools (e.g. the held-out
    AIME pools alone, each scored with the choice made without its model); ``models``: each
    pool's ``model`` field, by name (:func:`pool_group`)."""
    groups: dict[str, list[PoolScore]] = {}
    for f in fold_rows:
        for x in f["holdout_pools"]:
            model = (models or {}).get(x["pool"])
            groups.setdefault(pool_group(x["pool"], by, model), []).append(PoolScore(
                x["pool"], x["agreement_with_full_sc"], x["accuracy_delta"],
                x["token_saving_x"], x["latency_ratio"]))
    return {g: aggregate("cross-validated choice", xs) for g, xs in groups.items()}


def vars_of(x: PoolScore) -> dict[str, Any]:
    return {"pool": x.pool, "agreement_with_full_sc": round(x.agreement, 4),
            "accuracy_delta": round(x.accuracy_delta, 5), "token_saving_x": round(x.saving, 3),
            "latency_ratio": round(x.latency_ratio, 3)}


def cv_markdown(result: dict[str, Any]) -> str:
    """The cross-validation report (what ``--markdown`` writes with ``--folds``)."""
    r = result["rule"]
    if r["select"] == "agreement":
        how = f"the cheapest candidate with agreement >= {r['target_agreement']:g}"
    else:
        how = (f"the largest median token saving with mean accuracy delta >= "
               f"{100 * r['min_delta']:+.2f} pp and median latency ratio <= "
               f"{r['max_latency']:g}")
    lines = [
        f"Leave-one-{result['folds_by']}-out cross-validation over {len(result['folds'])} "
        f"folds; rule: {how}, applied to the other folds' pools. Figures vs `sc:n=all` on "
        "the held-out pools (saving and latency: medians over pools; accuracy delta: mean).",
        "",
        "| held-out fold | pools | chosen on the others | held-out saving | Δ accuracy (pp) "
        "| latency ratio | agreement | worst pool Δ (pp) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for f in result["folds"]:
        h = f["holdout"]
        mark = "" if f["rule_met"] else " (rule not met)"
        lines.append(
            f"| {f['fold']} | {h['pools']} | `{f['chosen']}`{mark} | "
            f"{h['median_token_saving_x']:.2f}x | {100 * h['accuracy_delta']:+.2f} | "
            f"{h['median_latency_ratio']:.2f} | {h['agreement_with_full_sc']:.4f} | "
            f"{100 * h['worst_accuracy_delta']:+.2f} |")
    p, sp = result["pooled_holdout"], result["fold_spread"]
    lines += [
        f"| **pooled held-out** | {p['pools']} | (per fold) | "
        f"**{p['median_token_saving_x']:.2f}x** | **{100 * p['accuracy_delta']:+.2f}** | "
        f"**{p['median_latency_ratio']:.2f}** | {p['agreement_with_full_sc']:.4f} | "
        f"{100 * p['worst_accuracy_delta']:+.2f} ({p['worst_pool']}) |",
        "",
        f"Spread across folds: saving {sp['median_token_saving_x'][0]:.2f}x to "
        f"{sp['median_token_saving_x'][1]:.2f}x, accuracy delta "
        f"{100 * sp['accuracy_delta'][0]:+.2f} to {100 * sp['accuracy_delta'][1]:+.2f} pp, "
        f"latency ratio {sp['median_latency_ratio'][0]:.2f} to "
        f"{sp['median_latency_ratio'][1]:.2f}.",
        "",
    ]
    other = other_grouping(result["folds_by"])
    by = result.get("pooled_holdout_by", {}).get("groups") or held_out_by(result["folds"], other)
    if len(by) > 1:
        lines += [f"Held-out pools by {other} (each scored with the choice made without its "
                  f"{result['folds_by']}):", "",
                  f"| {other} | pools | saving | Δ accuracy (pp) | latency ratio | agreement "
                  "| worst pool Δ (pp) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for g, a in by.items():
            lines.append(f"| {g} | {a['pools']} | {a['median_token_saving_x']:.2f}x | "
                         f"{100 * a['accuracy_delta']:+.2f} | {a['median_latency_ratio']:.2f} "
                         f"| {a['agreement_with_full_sc']:.4f} | "
                         f"{100 * a['worst_accuracy_delta']:+.2f} ({a['worst_pool']}) |")
        lines.append("")
    lines += [
        f"Chosen on all pools (the default to ship): `{result['chosen_on_all']}`"
        + ("" if result["chosen_on_all_met"] else " (rule not met)") + ".",
        "",
        "In-sample figures of every candidate on all pools (for reference only; not the "
        "figures to quote):",
        "",
        "| candidate | saving | Δ accuracy (pp) | latency ratio | agreement | worst pool Δ (pp) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["in_sample"]:
        lines.append(f"| `{s['policy']}` | {s['median_token_saving_x']:.2f}x | "
                     f"{100 * s['accuracy_delta']:+.2f} | {s['median_latency_ratio']:.2f} | "
                     f"{s['agreement_with_full_sc']:.4f} | "
                     f"{100 * s['worst_accuracy_delta']:+.2f} |")
    return "\n".join(lines) + "\n"
