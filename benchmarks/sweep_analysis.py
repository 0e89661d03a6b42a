"""What a quality sweep says about the verifying policies, beyond one row per policy.

A quality sweep (:mod:`benchmarks.quality_sweep`) replays each ``--policy`` spec on every
(simulated verifier, λ) setting. Specs of one *curve* (the same policy at several operating
points, e.g. ``solverify:profile={profile},settle=0.9`` and ``...,settle=0.99``) are read
together here:

* :func:`curves`: per setting and curve, the operating points sorted by compute, each with
  its accuracy, compute, verification compute and Δ against the best fixed configuration
  at its own compute; and the curve's *frontier*: at each compute level C inside the
  curve's range, the best operating point costing at most C against the best of SC and
  every GenRM(S, V) costing at most C (:func:`frontier_gaps`);
* :func:`verification_savings`: how many times fewer verification tokens an operating
  point spends than the cheapest fixed GenRM(S, V) reaching its accuracy, and whether the
  best fixed GenRM accuracy is reached with ≥ 4× fewer (by the mean over pools, and on
  how many pools one by one);
* :func:`cross_validate`: choose one operating point per curve on some pools (or some
  verifier qualities) by mean Δ against the best fixed at compute, and score the choice on
  the held-out ones (leave-one-pool-out, leave-one-AUC-level-out and leave-one-λ-out),
  against the policy's default point.

Means are over the scored pools, as in the sweep's tables. A GenRM(S, V) configuration's
verification compute is its nominal S·λ·V units (a simulated verification of a solution of
t tokens is λ·t tokens, and one unit is one mean-length solution); a replayed policy's is
its measured verification tokens per problem over the pool's mean solution length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "cross_validate",
    "curve_name",
    "curves",
    "frontier_gaps",
    "genrm_grid",
    "point_name",
    "verification_savings",
]

#: compute levels (units of C(S, V)) at which curves are compared with the fixed grid
LEVELS = tuple(2.0 ** (k / 2) for k in range(0, 21))
_PROFILE = re.compile(r"(^|,)\s*profile=[^,]*")


def curve_name(spec: str) -> str:
    """The curve a spec belongs to: its policy name, ``:profile`` when it is given a
    profile; other parameters are the operating point (``solverify:profile={profile},
    settle=0.99`` -> ``solverify:profile``)."""
    name, _, rest = spec.partition(":")
    return name.strip() + (":profile" if _PROFILE.search(rest) else "")


def point_name(spec: str) -> str:
    """The operating point's own parameters (``settle=0.99``; ``default`` when none)."""
    _, _, rest = spec.partition(":")
    rest = _PROFILE.sub("", rest).strip(", ")
    return rest or "default"


def _by_spec(setting: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in setting["runs"]:
        if r.get("engine") == "exact":  # optimal:c=C, scored exactly, not a replay
            continue
        out.setdefault(r["policy"], []).append(r)
    return out


def _best_fixed(setting: dict[str, Any], budget: float) -> float:
    """Mean over pools of the best SC or GenRM(S, V) costing at most ``budget``."""
    vals = []
    for res in setting["compute_matched"]:
        ok = [p["success"] for p in (*res["sc"], *res["genrm"]) if p["C"] <= budget + 1e-9]
        vals.append(max(ok) if ok else math.nan)
    return float(np.mean(vals))


def genrm_grid(setting: dict[str, Any]) -> list[dict[str, float]]:
    """Each GenRM(S, V) of the grid: mean accuracy over pools, compute, verification
    compute S·λ·V."""
    acc: dict[tuple[int, int], list[float]] = {}
    lam = float(setting["lambda"])
    for res in setting["compute_matched"]:
        for p in res["genrm"]:
            acc.setdefault((int(p["S"]), int(p["V"])), []).append(float(p["success"]))
    n = len(setting["compute_matched"])
    return [{"S": s, "V": v, "accuracy": float(np.mean(a)), "compute": s * (1 + lam * v),
             "verify_compute": s * lam * v}
            for (s, v), a in sorted(acc.items()) if len(a) == n]


def _points(setting: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per curve, its operating points (mean over pools), sorted by compute."""
    out: dict[str, list[dict[str, Any]]] = {}
    for spec, rs in _by_spec(setting).items():
        out.setdefault(curve_name(spec), []).append({
            "spec": spec, "point": point_name(spec), "pools": len(rs),
            "accuracy": float(np.mean([r["accuracy"] for r in rs])),
            "compute": float(np.mean([r["compute"] for r in rs])),
            "verify_compute": float(np.mean([r.get("verify_compute", 0.0) for r in rs])),
            "verifications": float(np.mean([r.get("verifications_per_problem", 0.0)
                                            for r in rs])),
            "best_fixed": float(np.mean([r["best_fixed_at_compute"] for r in rs])),
        })
    for pts in out.values():
        pts.sort(key=lambda p: p["compute"])
    return out


def frontier_gaps(points: Sequence[dict[str, Any]], setting: dict[str, Any],
                  levels: Sequence[float] = LEVELS) -> list[dict[str, float]]:
    """At each level C from the curve's cheapest point to its dearest: the best point's
    accuracy among those costing at most C, the best fixed at C, and the gap (pp)."""
    if not points:
        return []
    lo = min(p["compute"] for p in points)
    hi = max(p["compute"] for p in points)
    cs = sorted({lo, hi, *(c for c in levels if lo <= c <= hi)})
    out = []
    for c in cs:
        acc = max(p["accuracy"] for p in points if p["compute"] <= c + 1e-9)
        best = _best_fixed(setting, c)
        out.append({"C": c, "accuracy": acc, "best_fixed": best,
                    "gap_pp": 100 * (acc - best)})
    return out


def verification_savings(points: Sequence[dict[str, Any]], setting: dict[str, Any]
                         ) -> dict[str, Any]:
    """Per point: the cheapest (in verification compute) GenRM(S, V) whose mean accuracy
    reaches the point's, and the ratio of verification compute (None: no GenRM of the grid
    reaches it). And the goal: the best GenRM accuracy of the grid reached by some point
    with ≥ 4× fewer verification tokens than the GenRM configuration that attains it."""
    grid = genrm_grid(setting)
    rows = []
    for p in points:
        reach = [g for g in grid if g["accuracy"] >= p["accuracy"] - 1e-12]
        cheapest = min(reach, key=lambda g: g["verify_compute"]) if reach else None
        ratio = None
        if cheapest is not None and p["verify_compute"] > 0:
            ratio = cheapest["verify_compute"] / p["verify_compute"]
        rows.append({"spec": p["spec"], "point": p["point"], "accuracy": p["accuracy"],
                     "verify_compute": p["verify_compute"],
                     "genrm": None if cheapest is None else
                     f"genrm:s={cheapest['S']},v={cheapest['V']}",
                     "genrm_verify_compute": None if cheapest is None else
                     cheapest["verify_compute"],
                     "ratio": ratio})
    best = max(grid, key=lambda g: (g["accuracy"], -g["verify_compute"])) if grid else None
    goal = None
    if best is not None:
        hits = [p for p in points if p["accuracy"] >= best["accuracy"] - 1e-12]
        fewest = min(hits, key=lambda p: p["verify_compute"]) if hits else None
        goal = {"best_genrm": f"genrm:s={best['S']},v={best['V']}",
                "best_genrm_accuracy": best["accuracy"],
                "best_genrm_verify_compute": best["verify_compute"],
                "point": None if fewest is None else fewest["point"],
                "point_verify_compute": None if fewest is None else fewest["verify_compute"],
                "ratio": None if fewest is None or fewest["verify_compute"] <= 0 else
                best["verify_compute"] / fewest["verify_compute"]}
        goal["met"] = goal["ratio"] is not None and goal["ratio"] >= 4.0
        goal["pools_reached"] = None if fewest is None else \
            _pools_reached(setting, fewest["spec"], best["S"], best["V"])
    return {"points": rows, "goal": goal}


def _pools_reached(setting: dict[str, Any], spec: str, s: int, v: int) -> list[int]:
    """[pools where ``spec``'s accuracy reaches GenRM(s, v)'s on the same pool, pools]: a
    mean reached on the mean alone may hide pools it falls short on."""
    genrm = {res["pool"]: next(p["success"] for p in res["genrm"]
                               if int(p["S"]) == s and int(p["V"]) == v)
             for res in setting["compute_matched"]}
    rs = [r for r in _by_spec(setting).get(spec, []) if r["pool"] in genrm]
    return [sum(r["accuracy"] >= genrm[r["pool"]] - 1e-12 for r in rs), len(rs)]


def curves(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting, per curve: points, frontier gaps, verification savings."""
    out = []
    for st in report["settings"]:
        for name, pts in _points(st).items():
            gaps = frontier_gaps(pts, st)
            out.append({"verifier": st["verifier"], "auc": st["one_reading_auc"],
                        "lambda": st["lambda"], "curve": name, "points": pts,
                        "frontier": gaps,
                        "worst_gap_pp": min((g["gap_pp"] for g in gaps), default=None),
                        "savings": verification_savings(pts, st)})
    return out


def _cells(report: dict[str, Any], curve: str) -> dict[tuple[int, str], dict[str, float]]:
    """(setting index, pool) -> {point: Δ against the best fixed at its own compute}."""
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for k, st in enumerate(report["settings"]):
        for spec, rs in _by_spec(st).items():
            if curve_name(spec) != curve:
                continue
            for r in rs:
                cells.setdefault((k, r["pool"]), {})[point_name(spec)] = \
                    100 * (r["accuracy"] - r["best_fixed_at_compute"])
    return cells


def cross_validate(report: dict[str, Any], curve: str, default: str = "default"
                   ) -> dict[str, Any] | None:
    """Choose the curve's operating point on training cells by mean Δ (pp) against the best
    fixed configuration at its own compute, score it on held-out cells: folds leave one
    pool out, then one verifier AUC level out, then one λ out. None when the curve has < 2
    points."""
    cells = _cells(report, curve)
    points = sorted({p for c in cells.values() for p in c})
    if len(points) < 2:
        return None
    cells = {k: v for k, v in cells.items() if set(v) == set(points)}
    aucs = [round(st["one_reading_auc"], 2) for st in report["settings"]]
    lams = [float(st["lambda"]) for st in report["settings"]]
    groupings = {"pool": lambda key: key[1], "auc": lambda key: aucs[key[0]],
                 "lambda": lambda key: lams[key[0]]}
    out: dict[str, Any] = {"curve": curve, "points": points,
                           "in_sample": {p: float(np.mean([c[p] for c in cells.values()]))
                                         for p in points}}
    for gname, group in groupings.items():
        folds = []
        for held in sorted({group(k) for k in cells}, key=str):
            train = [c for k, c in cells.items() if group(k) != held]
            test = [c for k, c in cells.items() if group(k) == held]
            if not train or not test:
                continue
            chosen = max(points, key=lambda p: (np.mean([c[p] for c in train]), p == default))
            folds.append({"held_out": held, "chosen": chosen,
                          "held_out_delta_pp": float(np.mean([c[chosen] for c in test])),
                          "default_delta_pp": float(np.mean([c[default] for c in test]))
                          if default in points else None})
        out[gname] = {
            "folds": folds,
            "held_out_delta_pp": float(np.mean([f["held_out_delta_pp"] for f in folds]))
            if folds else None,
            "default_delta_pp": float(np.mean([f["default_delta_pp"] for f in folds]))
            if folds and folds[0]["default_delta_pp"] is not None else None,
        }
    return out


def analysis_markdown(report: dict[str, Any]) -> list[str]:
    """The curves, the verification-token goal and the cross-validation, as Markdown."""
    cs = curves(report)
    if not cs:
        return []
    lines = ["", "**Operating-point curves** (SIMULATED verifiers; mean over the scored "
             "pools). Worst gap: over every compute level C in the curve's range, the best "
             "point costing ≤ C minus the best SC or GenRM(S,V) costing ≤ C. Verification "
             "goal: a point reaching the grid's best GenRM accuracy with ≥ 4× fewer "
             "verification tokens (verification compute in mean-solution units); pools: "
             "on how many scored pools that point reaches the same GenRM's accuracy.", "",
             "| AUC | λ | curve | points: C → accuracy (verification C) | worst gap (pp) | "
             "best GenRM (verif. C) | reached by (verif. C) | ratio | ≥ 4× |",
             "|---:|---:|---|---|---:|---|---|---:|:---:|"]
    for c in cs:
        pts = "; ".join(f"{p['point']}: {p['compute']:.1f} → {p['accuracy']:.3f} "
                        f"({p['verify_compute']:.1f})" for p in c["points"])
        g = c["savings"]["goal"]
        if g is None:
            tail = "n/a | n/a | n/a | n/a"
        else:
            tail = (f"`{g['best_genrm']}` {g['best_genrm_accuracy']:.3f} "
                    f"({g['best_genrm_verify_compute']:.1f}) | "
                    + ("not reached | — | no" if g["point"] is None else
                       f"{g['point']} ({g['point_verify_compute']:.1f}) | "
                       + ("∞" if g["ratio"] is None else f"{g['ratio']:.1f}×") + " | "
                       + ("yes" if g["met"] else "no")
                       + ("" if not g.get("pools_reached") else
                          " ({}/{} pools)".format(*g["pools_reached"]))))
        worst = "n/a" if c["worst_gap_pp"] is None else f"{c['worst_gap_pp']:+.2f}"
        lines.append(f"| {c['auc']:.2f} | {c['lambda']:g} | `{c['curve']}` | {pts} | "
                     f"{worst} | {tail} |")
    names = sorted({c["curve"] for c in cs})
    cvs = [cv for cv in (cross_validate(report, n) for n in names) if cv is not None]
    if cvs:
        lines += ["", "**Choosing the operating point by cross-validation** (Δ = accuracy "
                  "minus the best fixed configuration at the point's own compute, pp; "
                  "chosen on the other folds, scored on the held-out one):", "",
                  "| curve | folds | chosen per fold | held-out Δ (pp) | default's held-out "
                  "Δ (pp) | in-sample Δ per point (pp) |", "|---|---|---|---:|---:|---|"]
        for cv in cvs:
            ins = "; ".join(f"{p}: {v:+.2f}" for p, v in cv["in_sample"].items())
            for gname in ("pool", "auc", "lambda"):
                g = cv[gname]
                if not g["folds"]:  # one λ (or one AUC level): nothing to hold out
                    continue
                chosen = ", ".join(f"{f['held_out']}→{f['chosen']}" for f in g["folds"])
                dflt = "n/a" if g["default_delta_pp"] is None else \
                    f"{g['default_delta_pp']:+.2f}"
                held = "n/a" if g["held_out_delta_pp"] is None else \
                    f"{g['held_out_delta_pp']:+.2f}"
                lines.append(f"| `{cv['curve']}` | leave one {gname} out | {chosen} | "
                             f"{held} | {dflt} | {ins if gname == 'pool' else ''} |")
    return lines
