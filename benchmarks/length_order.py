"""Do a trace's length and its completion order say whether it is right?

``python -m benchmarks.length_order --pool FILE ... [--markdown OUT.md] [--json OUT.json]``

Three cheap numpy checks on labelled pools (every pool has token counts; streaming backends
see both length and completion order), the evidence behind how ``adaptive`` samples:

* **length vs correctness**: among samples with an answer, the accuracy of each quintile
  of length within its problem (shortest fifth first), and the share without an answer
  (mostly traces cut at the length cap);
* **completion order**: launch a wave of ``W`` random samples of a problem; the ``k`` that
  finish first are the ``k`` shortest. Their majority against the majority of ``k`` random
  samples: accuracy, and agreement with the majority of the whole pool (``sc:n=all``);
* **share vs correctness** (the assumption of ``adaptive``'s ``loss`` rule, that an answer
  is right with the probability of its share): over all pools, how often the top answer
  and the runner-up of a problem are right, against their share difference ``u - v``;
* **a length-aware vote over the whole pool**: each vote weighted ``1 - beta * r``
  (``r`` = the sample's length rank within its problem, 0 shortest, 1 longest), ``beta``
  chosen by leave-one-model-out cross-validation (largest mean accuracy over the other
  models' pools), scored on the held-out model's pools against plain majority.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.calibrate import pool_group
from benchmarks.pools import PoolArrays, load_pool

BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def length_quintiles(a: PoolArrays) -> tuple[list[float], float]:
    """(accuracy of each within-problem length quintile among answered samples, share of
    samples without an answer)."""
    hit = np.zeros(5)
    cnt = np.zeros(5)
    none = 0
    total = 0
    for i in range(len(a.n)):
        n = int(a.n[i])
        key, tok, cor = a.key[i, :n], a.tokens[i, :n], a.correct[i, :n]
        none += int((key == -1).sum())
        total += n
        has = key >= 0
        m = int(has.sum())
        if m < 5:
            continue
        rank = np.argsort(np.argsort(tok[has], kind="stable"), kind="stable")
        q = rank * 5 // m
        np.add.at(hit, q, cor[has])
        np.add.at(cnt, q, 1)
    return [float(h / c) if c else float("nan") for h, c in zip(hit, cnt, strict=True)], (
        none / max(total, 1))


def _majority(keys: np.ndarray, weights: np.ndarray | None = None) -> int:
    """Key id with the most (weighted) votes; ties to the key seen first in ``keys``;
    -1 when nothing has an answer."""
    ok = keys >= 0
    if not ok.any():
        return -1
    ks = keys[ok]
    w = np.ones(len(ks)) if weights is None else weights[ok]
    order = list(dict.fromkeys(ks.tolist()))
    score = {k: float(w[ks == k].sum()) for k in order}
    return max(order, key=lambda k: score[k])


def completion_order(a: PoolArrays, k: int, wave: int, draws: int, rng: np.random.Generator
                     ) -> dict[str, float]:
    """First ``k`` finishers of a random wave of ``wave`` samples vs ``k`` random samples."""
    acc_first = acc_rand = agree_first = agree_rand = 0.0
    n_total = 0
    for i in range(len(a.n)):
        n = int(a.n[i])
        if n < wave:
            continue
        key, tok = a.key[i, :n], a.tokens[i, :n]
        full = _majority(key)
        label = a.key_correct[i]
        for _ in range(draws):
            w = rng.choice(n, wave, replace=False)
            first = w[np.argsort(tok[w], kind="stable")][:k]
            rand = w[:k]
            mf, mr = _majority(key[first]), _majority(key[rand])
            acc_first += bool(mf >= 0 and label[mf])
            acc_rand += bool(mr >= 0 and label[mr])
            agree_first += mf == full
            agree_rand += mr == full
            n_total += 1
    d = max(n_total, 1)
    return {"accuracy_first": acc_first / d, "accuracy_random": acc_rand / d,
            "agreement_first": agree_first / d, "agreement_random": agree_rand / d}


def weighted_vote_accuracy(a: PoolArrays, beta: float) -> float:
    """Accuracy of the whole-pool vote with weights ``1 - beta * length rank``."""
    right = 0
    for i in range(len(a.n)):
        n = int(a.n[i])
        key, tok = a.key[i, :n], a.tokens[i, :n]
        r = np.argsort(np.argsort(tok, kind="stable"), kind="stable") / max(n - 1, 1)
        m = _majority(key, 1.0 - beta * r)
        right += bool(m >= 0 and a.key_correct[i][m])
    return right / max(len(a.n), 1)


MARGINS = (0.0, 0.05, 0.1, 0.2, 0.4, 1.01)


def share_margins(a: PoolArrays) -> list[tuple[float, bool, bool]]:
    """Per problem with at least two answers: (u - v, top answer right, runner-up right),
    shares of the whole pool (ties to the answer seen first)."""
    out = []
    for i in range(len(a.n)):
        n = int(a.n[i])
        key = a.key[i, :n]
        ks = key[key >= 0]
        if len(ks) == 0:
            continue
        counts = np.bincount(ks)
        if (counts > 0).sum() < 2:
            continue
        order = sorted(range(len(counts)), key=lambda k: (-counts[k], k))
        top, second = order[0], order[1]
        out.append(((counts[top] - counts[second]) / n, bool(a.key_correct[i][top]),
                    bool(a.key_correct[i][second])))
    return out


def margin_table(rows: Sequence[tuple[float, bool, bool]]) -> list[dict[str, float]]:
    table = []
    arr = np.array(rows, dtype=float).reshape(-1, 3)
    for lo, hi in itertools.pairwise(MARGINS):
        m = (arr[:, 0] >= lo) & (arr[:, 0] < hi)
        if not m.any():
            continue
        table.append({"from": lo, "to": min(hi, 1.0), "problems": int(m.sum()),
                      "mean_margin": float(arr[m, 0].mean()),
                      "top_right": float(arr[m, 1].mean()),
                      "runner_up_right": float(arr[m, 2].mean())})
    return table


def analyse(paths: Sequence[Path], k: int = 3, wave: int = 8, draws: int = 40,
            seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pools: list[dict[str, Any]] = []
    margins: list[tuple[float, bool, bool]] = []
    for path in paths:
        pool = load_pool(path)
        a = pool.arrays
        margins += share_margins(a)
        quint, none = length_quintiles(a)
        pools.append({
            "pool": pool.name, "model": pool_group(pool.name, "model"),
            "length_quintile_accuracy": quint, "no_answer_share": none,
            "order": completion_order(a, k, wave, draws, rng),
            "weighted_vote": {str(b): weighted_vote_accuracy(a, b) for b in BETAS},
        })
    models = list(dict.fromkeys(p["model"] for p in pools))
    for p in pools:
        fit = [q for q in pools if q["model"] != p["model"]]
        if not fit:
            p["cv_beta"] = None
            continue
        best = max(BETAS, key=lambda b: np.mean([q["weighted_vote"][str(b)] for q in fit]))
        p["cv_beta"] = best
        p["cv_delta_vs_majority"] = (p["weighted_vote"][str(best)]
                                     - p["weighted_vote"]["0.0"])
    return {"k": k, "wave": wave, "draws": draws, "seed": seed, "models": len(models),
            "pools": pools, "share_margins": margin_table(margins)}


def markdown(result: dict[str, Any]) -> str:
    k, w = result["k"], result["wave"]
    lines = [
        "| pool | no answer | accuracy by length quintile (short → long) | "
        f"first {k} of {w}: accuracy / agreement | random {k}: accuracy / agreement | "
        "length-weighted vote: CV beta, Δ vs majority (pp) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for p in result["pools"]:
        q = " ".join(f"{x:.3f}" for x in p["length_quintile_accuracy"])
        o = p["order"]
        cv = ("n/a" if p.get("cv_beta") is None else
              f"{p['cv_beta']:g}, {100 * p['cv_delta_vs_majority']:+.2f}")
        lines.append(f"| {p['pool']} | {p['no_answer_share']:.3f} | {q} | "
                     f"{o['accuracy_first']:.3f} / {o['agreement_first']:.3f} | "
                     f"{o['accuracy_random']:.3f} / {o['agreement_random']:.3f} | {cv} |")
    ps = result["pools"]
    longest = sum(p["length_quintile_accuracy"][4] < min(p["length_quintile_accuracy"][:4])
                  for p in ps)
    better = sum(p["order"]["accuracy_first"] > p["order"]["accuracy_random"] for p in ps)
    deltas = [p["cv_delta_vs_majority"] for p in ps if p.get("cv_beta") is not None]
    lines += ["", f"Longest fifth least accurate in {longest} of {len(ps)} pools; the first "
              f"{k} finishers of {w} more accurate than {k} random samples in {better} of "
              f"{len(ps)}."]
    if deltas:
        lines.append(
            f"Length-weighted vote, held-out (leave-one-model-out) Δ vs majority: mean "
            f"{100 * np.mean(deltas):+.2f} pp, {sum(d > 0 for d in deltas)} pools better, "
            f"{sum(d < 0 for d in deltas)} worse, worst {100 * min(deltas):+.2f} pp.")
    lines += ["", "Share vs correctness, all pools (problems with two or more answers): "
              "how often the top answer and the runner-up are right, by their share "
              "difference u - v.", "",
              "| u - v | problems | mean u - v | top right | runner-up right | difference |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in result["share_margins"]:
        lines.append(f"| {r['from']:.2f}-{r['to']:.2f} | {r['problems']} | "
                     f"{r['mean_margin']:.3f} | {r['top_right']:.3f} | "
                     f"{r['runner_up_right']:.3f} | "
                     f"{r['top_right'] - r['runner_up_right']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.length_order",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", action="append", required=True, type=Path, metavar="FILE")
    ap.add_argument("--k", type=int, default=3, help="first finishers counted (default 3)")
    ap.add_argument("--wave", type=int, default=8, help="samples launched at once (default 8)")
    ap.add_argument("--draws", type=int, default=40, help="random waves per problem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.k <= args.wave:
        ap.error("--k must be between 1 and --wave")
    result = analyse(args.pool, args.k, args.wave, args.draws, args.seed)
    text = markdown(result)
    print(text, end="")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
