"""Accuracy vs compute per verifier quality: ``solverify bench quality-sweep``.

For each simulated verifier (Beta parameters for correct / wrong solutions, so a known
one-reading AUC) and each λ, on the ``--pool`` files:

* Self-Consistency and the fixed GenRM(S, V) grid by the exact estimators of
  :mod:`benchmarks.compute_matched`, and the crossover (the compute from which GenRM
  overtakes SC) per pool;
* ``optimal:c=C`` for each compute level, with its scaling law fitted on the
  ``--fit-pool`` files only (cross-validation: the law never sees the pools it is scored
  on); being a fixed allocation, its accuracy is the exact expectation of the SC or
  GenRM(S, V) it resolves to (no order noise, and the same random tie-break as the grid);
* the given ``--policy`` specs (e.g. ``adaptive``, ``verify-contested``, ``solverify``),
  replayed through the runtime with the same simulated readings; ``{profile}`` in a spec
  is replaced by the setting's profile (fitted on the ``--fit-pool`` files: Beta fits of
  4 readings a solution, λ, the law), e.g. ``solverify:profile={profile}``. Specs of one
  policy at several operating points form a curve (:mod:`benchmarks.sweep_analysis`:
  the gap to the fixed grid at every compute level, verification-token savings, and the
  operating point chosen by cross-validation).

Compute is in units of C(S, V) = S(1 + λV): one unit is one mean-length solution of the
pool, so a replayed policy's compute is its tokens per problem over the pool's mean
solution length. "Best fixed at C" is, per pool, the best of SC and every GenRM(S, V)
costing at most C, then the mean over pools. Every output says the verifier is simulated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.compute_matched import (
    CompareConfig,
    compute_matched,
    grid_success,
)
from benchmarks.pools import Pool
from benchmarks.replay import ReplayConfig, sweep
from benchmarks.source import ReplaySource, SimulatedVerifier
from benchmarks.sweep_analysis import analysis_markdown, curve_name, point_name
from benchmarks.verifier import scaling_profile
from orchestrator.errors import ConfigError
from policies.optimal import allocate

__all__ = ["Quality", "frontier", "plot_sweep", "quality_sweep", "sweep_markdown"]


@dataclass(frozen=True, slots=True)
class Quality:
    correct: tuple[float, float]
    wrong: tuple[float, float]

    @classmethod
    def parse(cls, text: str) -> Quality:
        """``A,B/C,D``: P(Yes)|correct ~ Beta(A,B), P(Yes)|wrong ~ Beta(C,D)."""
        try:
            c, w = text.split("/")
            ca, cb = (float(x) for x in c.split(","))
            wa, wb = (float(x) for x in w.split(","))
        except ValueError:
            raise ConfigError(f"verifier quality {text!r}: expected A,B/C,D (Beta "
                              "parameters for correct / wrong solutions)") from None
        return cls((ca, cb), (wa, wb))


def frontier(res: dict[str, Any], budget: float) -> tuple[float, str]:
    """Best success of SC or any GenRM(S, V) costing at most ``budget`` units in one
    compute-matched result, and which configuration reached it."""
    best, what = -math.inf, "none"
    for p in res["sc"]:
        if p["C"] <= budget + 1e-9 and p["success"] > best:
            best, what = p["success"], f"sc:n={p['S']}"
    for p in res["genrm"]:
        if p["C"] <= budget + 1e-9 and p["success"] > best + 1e-12:
            best, what = p["success"], f"genrm:s={p['S']},v={p['V']}"
    return best, what


def _sc_at(res: dict[str, Any], budget: float) -> float:
    ok = [p["success"] for p in res["sc"] if p["C"] <= budget + 1e-9]
    return max(ok) if ok else math.nan


def _genrm_at(res: dict[str, Any], budget: float) -> float:
    ok = [p["success"] for p in res["genrm"] if p["C"] <= budget + 1e-9]
    return max(ok) if ok else math.nan


def _exact_fixed(src: ReplaySource, s: int, v: int, cm: CompareConfig) -> float:
    """Expected accuracy of SC(s) (v = 0) or GenRM(s, v) on one pool (exact estimators)."""
    sc, genrm = grid_success(src, [s], [v] if v else [], cm.v_draws, cm.seed)
    return float(sc[:, 0].mean() if v == 0 else genrm[:, 0, 0].mean())


def _mean_solution_tokens(pool: Pool) -> float:
    a = pool.arrays
    return float(a.tokens[a.valid].mean())


def quality_sweep(pools: Sequence[Pool], fit_pools: Sequence[Pool],
                  qualities: Sequence[Quality], lams: Sequence[float],
                  policies: Sequence[str], computes: Sequence[float], *,
                  profile_dir: Path, cm: CompareConfig, replay: ReplayConfig,
                  vmax: int = 16, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole sweep as a JSON-ready dict (see the module docstring)."""
    if not pools or not fit_pools:
        raise ConfigError("quality-sweep needs --pool and --fit-pool files")
    overlap = {p.name for p in pools} & {p.name for p in fit_pools}
    if overlap:
        raise ConfigError(f"--fit-pool and --pool overlap ({', '.join(sorted(overlap))}): "
                          "the law must be fitted on other pools")
    t0 = time.perf_counter()
    profile_dir.mkdir(parents=True, exist_ok=True)
    settings = []
    for q in qualities:
        for lam in lams:
            sv = SimulatedVerifier(q.correct, q.wrong, lam=lam, vmax=vmax, seed=seed)
            if progress:
                progress(f"{sv.label}: compute-matched")

            def src(pool: Pool, sv: SimulatedVerifier = sv) -> ReplaySource:
                return ReplaySource(pool, seed=seed, verifier=sv)

            fit_sources = [src(p) for p in fit_pools]
            fit_results = [compute_matched(s, cm) for s in fit_sources]
            prof = scaling_profile(fit_sources, fit_results)
            ppath = profile_dir / (f"sim_c{q.correct[0]:g}-{q.correct[1]:g}_w{q.wrong[0]:g}-"
                                   f"{q.wrong[1]:g}_lam{lam:g}.json")
            prof.save(ppath)
            sources = [src(p) for p in pools]
            cms = [compute_matched(s, cm) for s in sources]
            by_pool = {r["pool"]: r for r in cms}
            runs = []
            for c in computes:  # a fixed allocation: its expected accuracy, exactly
                s_opt, v_opt = allocate(prof, c)
                cost = s_opt * (1 + lam * v_opt)
                spec = f"optimal:c={c:g}"
                for sname, srcx in zip([p.name for p in pools], sources, strict=True):
                    best, what = frontier(by_pool[sname], cost)
                    runs.append({"pool": sname, "policy": spec, "allocation": [s_opt, v_opt],
                                 "accuracy": _exact_fixed(srcx, s_opt, v_opt, cm),
                                 "compute": cost, "engine": "exact", "verifier": sv.label,
                                 "best_fixed_at_compute": best, "best_fixed_config": what})
            if progress:
                progress(f"{sv.label}: replay {len(policies)} policies")
            specs = [spec.replace("{profile}", str(ppath)) for spec in policies]
            rep = sweep(sources, specs, replay) if specs else {"runs": []}
            named = dict(zip(specs, policies, strict=True))
            sol = {p.name: _mean_solution_tokens(p) for p in pools}
            for r in rep["runs"]:
                c_units = r["tokens_per_problem"] / sol[r["pool"]]
                best, what = frontier(by_pool[r["pool"]], c_units)
                r = {**r, "policy": named.get(r["policy"], r["policy"])}
                runs.append({**{k: r[k] for k in ("pool", "policy", "accuracy",
                                                  "tokens_per_problem",
                                                  "verification_tokens_per_problem",
                                                  "verifications_per_problem",
                                                  "samples_per_problem", "engine",
                                                  "verifier")},
                             "compute": c_units,
                             "verify_compute": r["verification_tokens_per_problem"]
                             / sol[r["pool"]],
                             "best_fixed_at_compute": best, "best_fixed_config": what})
            law = prof.scaling
            assert law is not None
            settings.append({
                "verifier": sv.label, "simulated_verifier": True,
                "correct": list(q.correct), "wrong": list(q.wrong),
                "one_reading_auc": sv.auc(), "lambda": lam, "profile": str(ppath),
                "law": {"s_coef": law.s_coef, "s_exp": law.s_exp, "v_coef": law.v_coef,
                        "v_exp": law.v_exp, "crossover": law.crossover,
                        "verify_pays": law.verify_pays},
                "crossover_by_pool": {r["pool"]: r["crossover_budget"] for r in cms},
                "compute_matched": [{"pool": r["pool"], "sc": r["sc"], "genrm": r["genrm"]}
                                    for r in cms],
                "runs": runs,
            })
    return {"settings": settings, "pools": [p.name for p in pools],
            "fit_pools": [p.name for p in fit_pools], "computes": list(computes),
            "policies": list(policies), "orders": replay.orders, "seed": seed,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _policy_label(spec: str) -> str:
    if spec.startswith("optimal:"):
        return spec.split(",profile=")[0]
    return spec


def _aggregate(setting: dict[str, Any]) -> list[dict[str, Any]]:
    """Per policy: mean over pools of accuracy, compute, best fixed at compute."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in setting["runs"]:
        rows.setdefault(r["policy"], []).append(r)
    out = []
    for spec, rs in rows.items():
        alloc = rs[0].get("allocation")
        label = _policy_label(spec)
        if alloc:
            label += f" (S={alloc[0]}, V={alloc[1]})"
        out.append({"policy": label,
                    "compute": float(np.mean([r["compute"] for r in rs])),
                    "accuracy": float(np.mean([r["accuracy"] for r in rs])),
                    "best_fixed": float(np.mean([r["best_fixed_at_compute"] for r in rs]))})
    return out


def _curves(setting: dict[str, Any], budgets: Sequence[float]
            ) -> tuple[list[float], list[float], list[float]]:
    cms = setting["compute_matched"]
    sc = [float(np.mean([_sc_at(r, b) for r in cms])) for b in budgets]
    g = [float(np.mean([_genrm_at(r, b) for r in cms])) for b in budgets]
    best = [float(np.mean([frontier(r, b)[0] for r in cms])) for b in budgets]
    return sc, g, best


def _median_crossover(setting: dict[str, Any]) -> tuple[float | None, int, int]:
    xs = [c for c in setting["crossover_by_pool"].values() if c is not None]
    n = len(setting["crossover_by_pool"])
    return (float(np.median(xs)) if xs else None), len(xs), n


def sweep_markdown(report: dict[str, Any], command: str | None = None,
                   budgets: Sequence[float] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)) -> str:
    lines = []
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"**SIMULATED verifiers** on {len(report['pools'])} pools ({', '.join(report['pools'])}); "
        f"optimal's law fitted on {', '.join(report['fit_pools'])}; {report['orders']} orders "
        f"per problem, seed {report['seed']}; wall {report['wall_s']} s. Compute C in units "
        "of C(S,V) = S(1+λV) (one unit = one mean-length solution); accuracy = mean over "
        "pools; SC and GenRM by the exact estimators.", "",
        "Crossover (compute from which the best GenRM matches or beats the best SC; median "
        "over the pools where it happens):", "",
        "| verifier (simulated) | one-reading AUC | λ | crossover C (median) | pools crossed | "
        "optimal's law (fit pools) |",
        "|---|---:|---:|---:|---:|---|"]
    for s in report["settings"]:
        med, k, n = _median_crossover(s)
        law = s["law"]
        law_s = (f"S={law['s_coef']:.2g}·C^{law['s_exp']:.2f}, V={law['v_coef']:.2g}·"
                 f"C^{law['v_exp']:.2f}, from C={law['crossover']}" if law["verify_pays"]
                 else "SC at every C (GenRM never caught up)")
        lines.append(f"| Beta{tuple(s['correct'])} / Beta{tuple(s['wrong'])} | "
                     f"{s['one_reading_auc']:.3f} | {s['lambda']:g} | "
                     f"{'never' if med is None else f'{med:g}'} | {k}/{n} | {law_s} |")
    lines += ["", *summary_table(report), *analysis_markdown(report)]
    for s in report["settings"]:
        lines += ["", f"**SIMULATED verifier Beta{tuple(s['correct'])} / "
                      f"Beta{tuple(s['wrong'])}, one-reading AUC {s['one_reading_auc']:.3f}, "
                      f"λ = {s['lambda']:g}**", "",
                  "| C | SC (best S ≤ C) | GenRM (best S,V with C(S,V) ≤ C) | best fixed |",
                  "|---:|---:|---:|---:|"]
        sc, g, best = _curves(s, budgets)
        for b, x, y, z in zip(budgets, sc, g, best, strict=True):
            lines.append(f"| {b:g} | {_f(x)} | {_f(y)} | {_f(z)} |")
        lines += ["", "| policy | compute C | accuracy | best fixed at that C | Δ (pp) |",
                  "|---|---:|---:|---:|---:|"]
        for r in _aggregate(s):
            lines.append(f"| `{r['policy']}` | {r['compute']:.1f} | {r['accuracy']:.3f} | "
                         f"{r['best_fixed']:.3f} | "
                         f"{100 * (r['accuracy'] - r['best_fixed']):+.2f} |")
    return "\n".join(lines) + "\n"


def summary_table(report: dict[str, Any], levels: Sequence[float] = (16, 64)) -> list[str]:
    """One row per setting: crossover, SC / best fixed / optimal at a few compute levels,
    and each replayed policy's accuracy (compute; Δ against the best fixed at it); of a
    policy replayed at several operating points, its default point only (the curves are
    in :func:`benchmarks.sweep_analysis.analysis_markdown`)."""
    replayed = [p for p in report["policies"] if point_name(p) == "default"]
    head = ["AUC", "λ", "crossover C"]
    for c in levels:
        head += [f"SC@{c:g}", f"best fixed@{c:g}", f"optimal:c={c:g}"]
    head += [f"`{p.split(':profile=')[0]}{':profile' if ':profile=' in p else ''}` acc (C; Δ pp)"
             for p in replayed]
    lines = ["Summary (SIMULATED verifiers; mean over the scored pools):", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for st in report["settings"]:
        med, k, n = _median_crossover(st)
        cells = [f"{st['one_reading_auc']:.2f}", f"{st['lambda']:g}",
                 "never" if med is None else f"{med:g} ({k}/{n})"]
        sc, _, best = _curves(st, levels)
        rows = {r["policy"].split(" (S=")[0]: r for r in _aggregate(st)}
        for c, x, z in zip(levels, sc, best, strict=True):
            opt = rows.get(f"optimal:c={c:g}")
            cells += [_f(x), _f(z), "n/a" if opt is None else f"{opt['accuracy']:.3f}"]
        for pol in replayed:
            r = rows.get(pol)
            cells.append("n/a" if r is None else
                         f"{r['accuracy']:.3f} ({r['compute']:.1f}; "
                         f"{100 * (r['accuracy'] - r['best_fixed']):+.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def plot_sweep(report: dict[str, Any], path: str | Path) -> Path:
    from benchmarks.plots import pyplot

    plt = pyplot()
    settings = report["settings"]
    aucs = sorted({round(s["one_reading_auc"], 3) for s in settings})
    lams = sorted({s["lambda"] for s in settings})
    fig, axes = plt.subplots(len(aucs), len(lams), figsize=(4.2 * len(lams), 3.4 * len(aucs)),
                             squeeze=False, sharey="row")
    budgets = [2.0 ** k for k in range(0, 11)]
    for s in settings:
        ax = axes[aucs.index(round(s["one_reading_auc"], 3))][lams.index(s["lambda"])]
        sc, g, _ = _curves(s, budgets)
        ax.plot(budgets, sc, "o-", ms=3, lw=1.2, label="SC (best S ≤ C)")
        ax.plot(budgets, g, "s-", ms=3, lw=1.2, label="GenRM grid (best ≤ C)")
        rows = _aggregate(s)
        opt = sorted((r for r in rows if r["policy"].startswith("optimal")),
                     key=lambda r: r["compute"])
        if opt:
            ax.plot([r["compute"] for r in opt], [r["accuracy"] for r in opt], "^--", ms=4,
                    lw=1, label="optimal:c=C")
        markers = "DPX*vh"
        lines: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if not r["policy"].startswith("optimal"):
                lines.setdefault(curve_name(r["policy"]), []).append(r)
        for k, (name, pts) in enumerate(lines.items()):
            pts.sort(key=lambda r: r["compute"])
            ax.plot([r["compute"] for r in pts], [r["accuracy"] for r in pts],
                    markers[k % len(markers)] + "-", ms=6, lw=1, label=name)
        med, _, _ = _median_crossover(s)
        if med is not None:
            ax.axvline(med, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(f"SIMULATED verifier AUC {s['one_reading_auc']:.2f}, λ={s['lambda']:g}",
                     fontsize=8)
        ax.set_xlabel("compute C(S,V) = S(1+λV)")
        ax.set_ylabel("accuracy (mean over pools)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("accuracy vs compute, simulated verifiers (dotted: median crossover)",
                 fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
