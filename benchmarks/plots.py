"""Figures and Markdown tables for replay sweeps and the compute-matched analysis.

matplotlib is optional (the ``plot`` extra: ``pip install 'solverify[plot]'``; the
``dev`` extra includes it): an SDK that agent loops embed should not pull it in. It is
imported only when a figure is asked for (it is slow to import), with the Agg backend (no
display needed); a command asked for a figure without it fails before doing any work
(:func:`require_matplotlib`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import ConfigError

__all__ = [
    "PLOT_EXTRA",
    "compute_matched_markdown",
    "family",
    "have_matplotlib",
    "plot_compute_matched",
    "plot_replay",
    "replay_markdown",
    "require_matplotlib",
]


def family(spec: str) -> str:
    """The policy family a spec belongs to (its name, e.g. ``sc`` for ``sc:n=all``)."""
    return spec.strip().partition(":")[0].strip().lower()


#: How to get the optional plotting dependency.
PLOT_EXTRA = "pip install 'solverify[plot]'"


def have_matplotlib() -> bool:
    """Is matplotlib installed (without importing it)?"""
    return importlib.util.find_spec("matplotlib") is not None


def require_matplotlib(what: str = "--plot") -> None:
    """A ConfigError now, before any work, when a figure was asked for without matplotlib."""
    if not have_matplotlib():
        raise ConfigError(f"{what} needs matplotlib, which is optional: {PLOT_EXTRA}")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    require_matplotlib("this figure")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_pool(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    pools: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        pools.setdefault(r["pool"], []).append(r)
    return pools


def plot_replay(report: dict[str, Any], path: str | Path) -> Path:
    """Accuracy vs tokens and accuracy vs simulated latency, one row per pool, one curve per
    policy family (points sorted by tokens), 95% CIs as error bars."""
    plt = pyplot()
    from matplotlib import ticker

    pools = _by_pool(report["runs"])
    if not pools:
        raise ConfigError("nothing to plot: the report has no runs")
    fig, axes = plt.subplots(len(pools), 2, figsize=(11, 3.6 * len(pools)), squeeze=False)
    markers = "os^vDP*Xh<>"
    for row, (pool, runs) in enumerate(pools.items()):
        fams: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            fams.setdefault(family(r["policy"]), []).append(r)
        for col, (metric, label) in enumerate((("tokens_per_problem", "tokens / problem"),
                                               ("latency_per_problem",
                                                "simulated latency / problem (s)"))):
            ax = axes[row][col]
            for k, (fam, pts) in enumerate(sorted(fams.items())):
                pts = sorted(pts, key=lambda r: r[metric])
                xs = [max(r[metric], 1e-9) for r in pts]
                ys = [r["accuracy"] for r in pts]
                lo = [r["accuracy"] - r["accuracy_ci95"][0] for r in pts]
                hi = [r["accuracy_ci95"][1] - r["accuracy"] for r in pts]
                bars = ax.errorbar(xs, ys, yerr=[lo, hi], marker=markers[k % len(markers)],
                                   capsize=2, label=fam, linewidth=1.2, markersize=4,
                                   elinewidth=0.8)
                for line in bars[2]:
                    line.set_alpha(0.3)
                for r, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(r["policy"].partition(":")[2] or r["policy"], (x, y),
                                fontsize=6, alpha=0.7, xytext=(2, 2),
                                textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
            title = pool
            if runs[0].get("simulated_verifier"):
                title += "\n" + runs[0]["verifier"].replace("simulated", "SIMULATED", 1)
            ax.set_title(title, fontsize=9 if title == pool else 7)
            ax.grid(True, alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _horizons(runs: Sequence[dict[str, Any]]) -> str:
    """One horizon label for a policy over several pools: ``64``, or ``all (80-160)``."""
    labels = sorted({r.get("horizon", "?") for r in runs})
    if len(labels) > 1 and all(x.startswith("all (") for x in labels):
        sizes = sorted(int(x[5:-1]) for x in labels)
        return f"all ({sizes[0]}-{sizes[-1]})"
    return ", ".join(labels)


def summary_markdown(report: dict[str, Any]) -> str:
    """Every policy against the first one (the baseline) over all pools of a report: median
    over pools of the token saving (baseline tokens / policy tokens) and of the latency
    ratio, mean accuracy delta, mean agreement with ``sc:n=all``, the worst pool, and each
    row's horizon (the most samples it may draw per problem)."""
    by_pool = _by_pool(report["runs"])
    if not by_pool:
        return ""
    first = next(iter(by_pool.values()))
    base = first[0]["policy"]
    specs = list(dict.fromkeys(r["policy"] for runs in by_pool.values() for r in runs))
    lines = [f"Against `{base}` over {len(by_pool)} pools (saving, latency: median over pools; "
             "Δ accuracy, agreement: mean; worst: the pool with the largest accuracy loss):",
             "",
             "| policy | horizon | token saving | Δ accuracy (pp) | latency ratio | agreement "
             "| worst pool: saving / Δ (pp) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for spec in specs:
        rows = []
        for runs in by_pool.values():
            b = next((r for r in runs if r["policy"] == base), None)
            r = next((r for r in runs if r["policy"] == spec), None)
            if b is None or r is None:
                continue
            rows.append((b["tokens_per_problem"] / max(r["tokens_per_problem"], 1e-9),
                         r["accuracy"] - b["accuracy"],
                         r["latency_per_problem"] / max(b["latency_per_problem"], 1e-9),
                         r["agreement_with_full_sc"], r))
        if not rows:
            continue
        arr = np.array([x[:4] for x in rows])
        worst = min(rows, key=lambda x: x[1])
        only = f" ({len(rows)} pools)" if len(rows) < len(by_pool) else ""
        lines.append(
            f"| `{spec}`{only} | {_horizons([x[4] for x in rows])} | {np.median(arr[:, 0]):.2f}x | "
            f"{100 * arr[:, 1].mean():+.2f} | {np.median(arr[:, 2]):.2f} | "
            f"{arr[:, 3].mean():.3f} | {worst[0]:.2f}x / {100 * worst[1]:+.2f} |")
    return "\n".join(lines) + "\n"


def replay_markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The summary table, then a Markdown table per pool (what ``--markdown`` writes)."""
    cfg = report.get("config", {})
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [summary_markdown(report)]
    lines.append(
        f"{cfg.get('orders')} orders per problem, seed {cfg.get('seed')}, concurrency per "
        f"problem {cfg.get('concurrency') or 'unlimited'}, decode rate "
        f"{cfg.get('decode_rate')} tokens/s, TTFT {cfg.get('ttft')} s; accuracy CIs: paired "
        "bootstrap over problems.")
    for pool, runs in _by_pool(report["runs"]).items():
        ver = runs[0].get("verifier")
        ver = "" if not ver or ver == "no verifier" else (
            "; " + ver.replace("simulated", "SIMULATED", 1))
        split = any(r.get("verifications_per_problem") for r in runs)
        extra = (" of which verification (verifications)/problem |", "---:|") if split \
            else ("", "")
        lines += ["", f"**{pool}** ({runs[0]['problems']} problems{ver})", "",
                  "| policy | horizon | accuracy | 95% CI | tokens/problem |" + extra[0] +
                  " samples/problem | latency/problem (s) | engine |",
                  "|---|---:|---:|---:|---:|" + extra[1] + "---:|---:|---|"]
        for r in runs:
            lo, hi = r["accuracy_ci95"]
            vcell = (f" {r.get('verification_tokens_per_problem', 0):,.0f} "
                     f"({r.get('verifications_per_problem', 0):.2f}) |") if split else ""
            lines.append(
                f"| `{r['policy']}` | {r.get('horizon', '?')} | {r['accuracy']:.3f} | "
                f"[{lo:.3f}, {hi:.3f}] | "
                f"{r['tokens_per_problem']:,.0f} |{vcell} {r['samples_per_problem']:.2f} | "
                f"{r['latency_per_problem']:,.1f} | {r.get('engine', '')} |")
    return "\n".join(lines) + "\n"


def plot_compute_matched(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Success vs compute C (log2) per pool: SC, GenRM per V, and GenRM's frontier."""
    plt = pyplot()
    if not results:
        raise ConfigError("nothing to plot")
    fig, axes = plt.subplots(len(results), 1, figsize=(7.5, 4.2 * len(results)), squeeze=False)
    for row, res in enumerate(results):
        ax = axes[row][0]
        sc = res["sc"]
        ax.plot([p["C"] for p in sc], [p["success"] for p in sc], "k-o", label="SC",
                markersize=4)
        by_v: dict[int, list[dict[str, Any]]] = {}
        for p in res["genrm"]:
            by_v.setdefault(p["V"], []).append(p)
        for v, pts in sorted(by_v.items()):
            pts = sorted(pts, key=lambda p: p["C"])
            ax.plot([p["C"] for p in pts], [p["success"] for p in pts], "-", marker=".",
                    alpha=0.6, label=f"GenRM V={v}")
        cross = res.get("crossover_budget")
        if cross is not None:
            ax.axvline(cross, color="grey", linestyle="--", linewidth=1,
                       label=f"crossover C={cross:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compute C(S, V) = S(1 + λV)")
        ax.set_ylabel("success rate")
        title = f"{res['pool']} — λ={res['lambda']:.3g} ({res['lambda_source']})"
        if res.get("simulated_verifier"):
            title += "\n" + res["verifier"].replace("simulated", "SIMULATED", 1)
        ax.set_title(title, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compute_matched_markdown(results: Sequence[dict[str, Any]], command: str | None = None
                             ) -> str:
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| pool | verifier | λ | SC(max S) | best GenRM | crossover C | S_opt ∝ C^a | "
              "V_opt ∝ C^b |", "|---|---|---:|---:|---:|---:|---|---|"]
    for res in results:
        best = max(res["genrm"], key=lambda p: p["success"])
        sc_top = res["sc"][-1]
        sc_ = res["scaling"]

        def exp(key: str, sc_: dict[str, Any] = sc_) -> str:
            ci = sc_.get(f"{key}_exponent_ci95")
            ci_txt = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            return _fmt(sc_.get(f"{key}_exponent"), 2) + ci_txt

        verifier = "simulated" if res.get("simulated_verifier") else res["verifier"]
        lines.append(
            f"| {res['pool']} | {verifier} | {res['lambda']:.3g} | "
            f"{sc_top['success']:.3f} (S={sc_top['S']}) | {best['success']:.3f} "
            f"(S={best['S']}, V={best['V']}) | {_fmt(res['crossover_budget'], 0)} | "
            f"{exp('S')} | {exp('V')} |")
    return "\n".join(lines) + "\n"
