"""Measure a verifier on labelled pools: ``solverify bench verifier``.

For every answered, labelled sample of the pools, its verifier readings (recorded, or drawn
by a :class:`~benchmarks.source.SimulatedVerifier`) are split by the sample's label:

* the P(Yes) distributions of correct and of wrong solutions (summary statistics, a
  10-bin histogram, Beta fits), the AUC over per-solution mean scores, λ measured from the
  pools' token counts, and the repeat ICC / within-solution spread over solutions read
  more than once — written as a :class:`~policies.profile.VerifierProfile` JSON;
* Best-of-N by mean P(Yes) against the majority vote over the whole pool (the exact
  estimators of :mod:`benchmarks.compute_matched`), the plainest sign of a useless
  verifier;
* how well the **online** estimate works: a run has no labels, only the answers its
  problems settled on. :meth:`VerifierProfile.from_history` labels a reading correct when
  the verified solution agrees with a settled problem's vote majority. Here every
  problem, in each of ``orders`` served orders, draws its first ``S`` samples and reads
  the first reading of each; the problem counts as settled when its leader holds a
  strict majority of the ``S`` votes. The pseudo-label AUC is compared with the
  true-label AUC of the same readings and with the whole-pool AUC (mean and spread over
  orders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.compute_matched import bon_expected, joint_scaling, measured_lambda, sc_expected
from benchmarks.source import ReplaySource, SimulatedVerifier
from orchestrator.errors import ConfigError, DataError
from orchestrator.history import ProblemRecord
from policies.profile import VerifierProfile, auc

__all__ = [
    "distribution",
    "measure_verifier",
    "online_estimate",
    "pool_readings",
    "report_text",
    "scaling_profile",
]

BINS = 10
#: readings per solution measured by default with a simulated verifier (a recorded pool:
#: all it holds)
SIMULATED_READINGS = 4


def _vmax(src: ReplaySource, readings: int | None) -> int:
    if isinstance(src.verifier, SimulatedVerifier):
        cap = src.verifier.vmax
    else:
        cap = max((len(s.verifications) or (1 if s.p_yes is not None else 0)
                   for p in src.pool.problems for s in p.samples), default=0)
    if cap == 0:
        raise ConfigError(f"pool {src.name} has no verifier readings; use a pool recorded "
                          "with verifications or --simulated-verifier")
    if readings is None and isinstance(src.verifier, SimulatedVerifier):
        readings = SIMULATED_READINGS
    return cap if readings is None else min(readings, cap)


def pool_readings(src: ReplaySource, readings: int | None = None
                  ) -> list[tuple[Any, bool, float | None]]:
    """``(solution id, correct, P(Yes) or None)`` for the first ``readings`` readings of
    every answered, labelled sample (``None``: all recorded readings)."""
    if not src.can_verify:
        raise ConfigError(f"pool {src.name} has no verifier readings; use a pool recorded "
                          "with verifications or --simulated-verifier")
    a = src.pool.arrays
    if not a.labelled:
        raise DataError(f"pool {src.name}: some answered samples have no 'correct' label; "
                        "bench verifier needs a labelled pool")
    v = _vmax(src, readings)
    va = src.verifier_arrays(v)
    out: list[tuple[Any, bool, float | None]] = []
    for i in range(len(src.pool.problems)):
        for j in range(int(a.n[i])):
            if a.key[i, j] < 0:
                continue  # no answer: never verified
            for k in range(v):
                if va.ok[i, j, k]:
                    p = va.p[i, j, k]
                    out.append(((src.name, i, j), bool(a.correct[i, j]),
                                None if math.isnan(p) else float(p)))
    return out


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Summary statistics and a 10-bin histogram on [0, 1]."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"n": 0}
    q = np.percentile(x, [10, 25, 50, 75, 90])
    hist, _ = np.histogram(np.clip(x, 0, 1), bins=BINS, range=(0.0, 1.0))
    return {"n": int(x.size), "mean": float(x.mean()),
            "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p90": float(q[4]),
            "histogram": [int(h) for h in hist]}


def _bon_vs_majority(src: ReplaySource, v: int) -> dict[str, float]:
    """Whole-pool Best-of-N by mean P(Yes) of the first ``v`` readings, and majority@N."""
    a = src.pool.arrays
    va = src.verifier_arrays(v)
    bon, maj = [], []
    for i in range(len(src.pool.problems)):
        n = int(a.n[i])
        keys = a.key[i, :n]
        usable = va.ok[i, :n] & ~np.isnan(va.p[i, :n]) & (keys >= 0)[:, None]
        k = usable.sum(1)
        score = np.where(k > 0, np.where(usable, va.p[i, :n], 0.0).sum(1) / np.maximum(k, 1),
                         -np.inf)
        bon.append(float(bon_expected(score, a.correct[i, :n], [n])[0]))
        maj.append(float(sc_expected(keys, a.key_correct[i], [n])[0]))
    return {"bon_at_n": float(np.mean(bon)), "majority_at_n": float(np.mean(maj))}


def online_estimate(src: ReplaySource, sizes: Sequence[int] = (8, 16),
                    orders: int = 10) -> list[dict[str, Any]]:
    """Pseudo-label (online) AUC against the true-label AUC, per number of samples S."""
    a = src.pool.arrays
    va = src.verifier_arrays(1)
    out = []
    for S in sizes:
        pseudo, same, agree, settled_share = [], [], [], []
        for r in range(orders):
            served = src.orders(r)
            records: list[ProblemRecord] = []
            pos: list[float] = []
            neg: list[float] = []
            n_agree = n_lab = 0
            for i, pp in enumerate(src.pool.problems):
                idx = [int(j) for j in served[i, :S] if j >= 0]
                keys = [int(a.key[i, j]) for j in idx]
                counts: dict[int, int] = {}
                for k in keys:
                    if k >= 0:
                        counts[k] = counts.get(k, 0) + 1
                if not counts:
                    continue
                top = max(counts.values())
                leader = next(k for k in keys if k >= 0 and counts[k] == top)  # first to arrive
                is_settled = 2 * top > sum(counts.values())
                names = a.keys[i]
                reads = []
                for j, k in zip(idx, keys, strict=True):
                    p = va.p[i, j, 0]
                    if k < 0 or not va.ok[i, j, 0] or math.isnan(p):
                        continue
                    reads.append((names[k], float(p)))
                    if is_settled:
                        (pos if a.correct[i, j] else neg).append(float(p))
                        n_lab += 1
                        n_agree += int((k == leader) == bool(a.correct[i, j]))
                records.append(ProblemRecord(
                    problem_id=pp.id, stop_code="settled" if is_settled else "max",
                    answer_key=names[leader], keys=tuple(names[k] if k >= 0 else None
                                                         for k in keys),
                    lengths=tuple(int(a.tokens[i, j]) for j in idx), readings=tuple(reads),
                    solution_tokens=int(sum(a.tokens[i, j] for j in idx)),
                    verification_tokens=int(sum(va.tokens[i, j, 0] for j in idx
                                                if a.key[i, j] >= 0 and va.ok[i, j, 0]))))
            prof = VerifierProfile.from_history(records)
            if prof is not None and prof.auc is not None:
                pseudo.append(prof.auc)
            t = auc(pos, neg)
            if t is not None:
                same.append(t)
            if n_lab:
                agree.append(n_agree / n_lab)
            settled_share.append(sum(rec.stop_code == "settled" for rec in records)
                                 / max(len(records), 1))
        out.append({
            "S": int(S), "orders": orders,
            "settled_share": _mean_sd(settled_share),
            "pseudo_label_accuracy": _mean_sd(agree),
            "auc_pseudo": _mean_sd(pseudo),
            "auc_true_same_readings": _mean_sd(same),
        })
    return out


def _first_reading_auc(rs: Sequence[tuple[Any, bool, float | None]]) -> float | None:
    first: dict[Any, tuple[bool, float]] = {}
    for sid, lab, p in rs:
        if p is not None and sid not in first:
            first[sid] = (lab, p)
    return auc([p for lab, p in first.values() if lab], [p for lab, p in first.values()
                                                         if not lab])


def _mean_sd(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "sd": None}
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0}


def measure_verifier(sources: Sequence[ReplaySource], *, readings: int | None = None,
                     online_sizes: Sequence[int] = (8, 16), online_orders: int = 10
                     ) -> tuple[VerifierProfile, dict[str, Any]]:
    """The profile over all ``sources`` and a JSON-ready report (per pool and overall)."""
    if not sources:
        raise ConfigError("no pools to measure")
    simulated = [isinstance(s.verifier, SimulatedVerifier) for s in sources]
    all_readings: list[tuple[Any, bool, float | None]] = []
    pools = []
    lam_num = lam_den = 0.0
    for src in sources:
        rs = pool_readings(src, readings)
        all_readings.extend(rs)
        v = _vmax(src, readings)
        lam = measured_lambda(src, v)
        sol = float(src.pool.arrays.tokens[src.pool.arrays.valid].mean())
        if lam is not None:  # pooled λ: the ratio of pooled means, weighted by samples
            n_sol = int(src.pool.arrays.valid.sum())
            lam_num += lam * sol * n_sol
            lam_den += sol * n_sol
        prof = VerifierProfile.from_readings(rs, lam=lam, source=src.name,
                                             simulated=isinstance(src.verifier,
                                                                  SimulatedVerifier))
        entry = {"pool": src.name, "verifier": src.verifier_label,
                 "simulated_verifier": isinstance(src.verifier, SimulatedVerifier),
                 "readings_per_solution": v, "profile": prof.to_dict(),
                 "auc_one_reading": _first_reading_auc(rs),
                 "correct": distribution([p for _, lab, p in rs if lab and p is not None]),
                 "wrong": distribution([p for _, lab, p in rs if not lab and p is not None]),
                 **_bon_vs_majority(src, v)}
        if isinstance(src.verifier, SimulatedVerifier):
            entry["simulated_one_reading_auc"] = src.verifier.auc()
        if online_sizes:
            entry["online"] = online_estimate(src, online_sizes, online_orders)
        pools.append(entry)
    lam_all = lam_num / lam_den if lam_den > 0 else None
    profile = VerifierProfile.from_readings(
        all_readings, lam=lam_all, source=", ".join(s.name for s in sources),
        simulated=any(simulated))
    report = {"profile": profile.to_dict(), "pools": pools,
              "verifier": sources[0].verifier_label if len(
                  {s.verifier_label for s in sources}) == 1 else "mixed",
              "simulated_verifier": any(simulated)}
    return profile, report


def _hist_line(h: Sequence[int], width: int = 40) -> list[str]:
    top = max(h) if h else 0
    lines = []
    for b, count in enumerate(h):
        bar = "#" * (0 if top == 0 else round(width * count / top))
        lines.append(f"    [{b / BINS:.1f},{(b + 1) / BINS:.1f}) {count:7d} {bar}")
    return lines


def report_text(report: dict[str, Any]) -> str:
    """The terminal report of ``solverify bench verifier``."""
    lines: list[str] = []
    for e in report["pools"]:
        prof = e["profile"]
        sim = "SIMULATED " if e["simulated_verifier"] else ""
        lines.append(f"{e['pool']}: {sim}{e['verifier']}")
        auc_s = "n/a" if prof["auc"] is None else f"{prof['auc']:.3f}"
        lam_s = "n/a" if prof["lam"] is None else f"{prof['lam']:.3g}"
        icc = prof["repeat_icc"]
        wsd = prof["within_sd"]
        lines.append(
            f"  solutions: {prof['n_correct']} correct, {prof['n_wrong']} wrong; readings "
            f"{prof['n_readings']} (parse rate {prof['parse_rate']:.3f}, up to "
            f"{e['readings_per_solution']} per solution)")
        one = e.get("auc_one_reading")
        lines.append(
            f"  AUC {auc_s} (mean of a solution's readings; one reading: "
            f"{'n/a' if one is None else f'{one:.3f}'}); lambda {lam_s}; repeat ICC "
            f"{'n/a' if icc is None else f'{icc:.3f}'}; within-solution sd "
            f"{'n/a' if wsd is None else f'{wsd:.4f}'}")
        if "simulated_one_reading_auc" in e:
            lines.append(f"  (simulated: one-reading AUC {e['simulated_one_reading_auc']:.3f})")
        lines.append(f"  Best-of-N by P(Yes) {e['bon_at_n']:.3f} vs majority@N "
                     f"{e['majority_at_n']:.3f}")
        for name in ("correct", "wrong"):
            d = e[name]
            fit = prof[name]
            if not d.get("n"):
                lines.append(f"  P(Yes) | {name}: no readings")
                continue
            lines.append(
                f"  P(Yes) | {name}: n={d['n']} mean {d['mean']:.3f} sd {d['sd']:.3f} "
                f"quartiles {d['p25']:.3f}/{d['median']:.3f}/{d['p75']:.3f} "
                f"(Beta fit {fit['a']:.3g}, {fit['b']:.3g})")
            lines.extend(_hist_line(d["histogram"]))
        for o in e.get("online", ()):
            def ms(d: dict[str, float | None]) -> str:
                if d["mean"] is None:
                    return "n/a"
                return f"{d['mean']:.3f} ± {d['sd']:.3f}"

            lines.append(
                f"  online estimate, first {o['S']} samples x {o['orders']} orders: AUC from "
                f"pseudo-labels {ms(o['auc_pseudo'])} vs true labels (same readings) "
                f"{ms(o['auc_true_same_readings'])}; pseudo-labels right "
                f"{ms(o['pseudo_label_accuracy'])}; settled {ms(o['settled_share'])}")
    if len(report["pools"]) > 1:
        prof = report["profile"]
        lines.append(f"all pools: AUC {prof['auc']:.3f}, lambda "
                     f"{'n/a' if prof['lam'] is None else format(prof['lam'], '.3g')}")
    return "\n".join(lines) + "\n"


def scaling_profile(sources: Sequence[ReplaySource], results: Sequence[dict[str, Any]]
                    ) -> VerifierProfile:
    """The verifier profile of ``sources`` (their readings, as ``bench verifier``
    measures them) carrying the scaling law fitted jointly on ``results``."""
    law = joint_scaling(results)
    # the readings bench verifier measures by default (all recorded; simulated: 4)
    readings = [r for src in sources for r in pool_readings(src)]
    simulated = any(isinstance(src.verifier, SimulatedVerifier) for src in sources)
    return VerifierProfile.from_readings(
        readings, lam=law.lam, source="compute-matched: " + ", ".join(s.name for s in sources),
        simulated=simulated, scaling=law)
