"""Recorded pools: many samples (and optionally verifications) per problem, one JSONL line each.

Pool format (reads every file in ``shared/data/pools/`` as it is)::

    {"id": str, "problem": str, "answer": str|number|null, "aliases"?: [str],
     "samples": [
        {"pred": str|null,            # extracted answer (null/"" = none: never votes)
         "key"?: str|null,            # canonical vote key (default: the stripped pred)
         "correct"?: bool|null,       # label against the ground truth, when known
         "tokens"?: int,              # completion tokens of this sample
         "text"?: str,                # full solution text
         "finish_reason"?: str,
         "mean_logprob"?: float,      # logprob summary of the sample
         "score"?: float,             # an external reward-model score (higher = better)
         "p_yes"?: float,             # one deterministic verifier reading for this sample
         "verifications"?: [          # generative verifications of this sample
            {"p_yes": float|null, "tokens"?: int, "verdict"?: bool|null, "text"?: str}]
        }, ...],
     ...any other fields (model, source, ...) kept in ``meta``}

Answers are grouped by the sample's ``key`` when the pool gives one (``solverify bench
record`` writes the grader's canonical key), else by :func:`pool_key`, the
whitespace-stripped ``pred`` (empty or null = no answer), which is how the data README
computes maj@N. Correctness comes from the labels,
never from re-grading: :meth:`PoolProblem.label` gives a key's label (the label of the
first sample carrying it, in pool order; the shipped pools never disagree within a key).

:class:`PoolArrays` is the dense numpy view used by the vectorised replay and the
compute-matched analysis: key ids are numbered by first occurrence in pool order, so
``argmax`` over vote counts breaks ties in favour of the answer that occurs first in the
pool (the README's maj@N rule).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.errors import DataError
from orchestrator.problems import problem_from_dict
from orchestrator.types import Problem

__all__ = [
    "Pool",
    "PoolArrays",
    "PoolProblem",
    "PoolSample",
    "PoolVerification",
    "estimate_tokens",
    "load_pool",
    "pool_key",
    "pool_line",
    "read_pool_ids",
]

#: characters per token when a pool gives texts but no token counts
CHARS_PER_TOKEN = 4.0


def pool_key(pred: str | None) -> str | None:
    """The vote key of a pool answer: the whitespace-stripped pred; empty/None = no answer."""
    if pred is None:
        return None
    key = pred.strip()
    return key or None


def estimate_tokens(text: str) -> int:
    """Rough completion length of a text without a token count (4 characters a token)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True, slots=True)
class PoolVerification:
    p_yes: float | None
    tokens: int | None = None
    verdict: bool | None = None
    text: str | None = None


@dataclass(frozen=True, slots=True)
class PoolSample:
    pred: str | None
    correct: bool | None = None
    tokens: int | None = None
    text: str | None = None
    finish_reason: str | None = None
    mean_logprob: float | None = None
    score: float | None = None
    p_yes: float | None = None
    verifications: tuple[PoolVerification, ...] = ()
    canonical: str | None = None  # the pool's explicit "key", when it gives one

    @property
    def key(self) -> str | None:
        if self.canonical is not None:
            return pool_key(self.canonical)
        return pool_key(self.pred)


@dataclass(frozen=True, slots=True)
class PoolProblem:
    problem: Problem
    samples: tuple[PoolSample, ...]

    @property
    def id(self) -> str:
        return self.problem.id

    def label(self, key: str | None) -> bool | None:
        """Correctness of an answer key from the pool's labels (``None`` if unlabelled)."""
        if key is None:
            return False
        return self.labels.get(key)

    @property
    def labels(self) -> dict[str, bool | None]:
        out: dict[str, bool | None] = {}
        for s in self.samples:
            k = s.key
            if k is not None and k not in out:
                out[k] = s.correct
        return out


@dataclass(frozen=True)
class Pool:
    """A loaded pool. ``name`` is the file stem (what reports call the pool)."""

    name: str
    problems: tuple[PoolProblem, ...]
    path: Path | None = None

    def __post_init__(self) -> None:
        if not self.problems:
            raise DataError(f"pool {self.name}: no problems")

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def model(self) -> str | None:
        """The ``model`` field its problems share (a non-empty string on every line), else
        None: what ``bench calibrate --folds model`` groups it by before its file name."""
        models = {p.problem.meta.get("model") for p in self.problems}
        if len(models) == 1:
            (model,) = models
            if isinstance(model, str) and model.strip():
                return model.strip()
        return None

    @cached_property
    def index(self) -> dict[str, int]:
        return {p.id: i for i, p in enumerate(self.problems)}

    @cached_property
    def arrays(self) -> PoolArrays:
        return PoolArrays.from_pool(self)

    @property
    def has_verifications(self) -> bool:
        return any(s.verifications or s.p_yes is not None
                   for p in self.problems for s in p.samples)

    def subset(self, limit: int) -> Pool:
        return Pool(self.name, self.problems[:limit], self.path)

    def contested(self, share: float) -> Pool:
        """The problems whose most common answer has less than ``share`` of the problem's
        samples (samples without an answer count in the total, not as an answer): a
        harder batch, to see how a policy holds up where more problems are contested
        (``bench replay`` / ``bench calibrate --contested``). Named
        ``<name>+contested<share>``, so reports tell it from the whole pool; for
        ``bench calibrate --folds`` its dataset is the pool's, and every pool of one model
        still makes one model fold (``<model>+contested<share>``)."""
        if not 0 < share <= 1:
            raise DataError(f"contested share must be in (0, 1], got {share!r}")
        kept = tuple(p for p in self.problems if majority_share(p) < share)
        if not kept:
            raise DataError(f"pool {self.name}: no problem has a majority share below "
                            f"{share:g}")
        return Pool(f"{self.name}+contested{share:g}", kept, self.path)


def majority_share(problem: PoolProblem) -> float:
    """The fraction of a problem's samples that gave its most common answer."""
    counts: dict[str, int] = {}
    for s in problem.samples:
        if s.key is not None:
            counts[s.key] = counts.get(s.key, 0) + 1
    return max(counts.values(), default=0) / len(problem.samples) if problem.samples else 0.0


# ---- reading ---------------------------------------------------------------------------
def _opt_int(value: Any, where: str, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or (
            isinstance(value, float) and not value.is_integer()):
        raise DataError(f"{where}: '{name}' must be a non-negative integer, got {value!r}")
    return int(value)


def _opt_float(value: Any, where: str, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{where}: '{name}' must be a finite number, got {value!r}")
    return float(value)


def _opt_bool(value: Any, where: str, name: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise DataError(f"{where}: '{name}' must be true, false or null, got {value!r}")
    return value


def _opt_str(value: Any, where: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be a string or null, got {value!r}")
    return value


def _probability(value: Any, where: str) -> float | None:
    p = _opt_float(value, where, "p_yes")
    if p is not None and not 0.0 <= p <= 1.0:
        raise DataError(f"{where}: 'p_yes' must lie in [0, 1], got {p}")
    return p


def _verification(obj: Any, where: str) -> PoolVerification:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a verification must be an object")
    return PoolVerification(
        p_yes=_probability(obj.get("p_yes"), where),
        tokens=_opt_int(obj.get("tokens"), where, "tokens"),
        verdict=_opt_bool(obj.get("verdict"), where, "verdict"),
        text=_opt_str(obj.get("text"), where, "text"),
    )


def _sample(obj: Any, where: str) -> PoolSample:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a sample must be an object")
    if "pred" not in obj:
        raise DataError(f"{where}: sample has no 'pred' (use null for no answer)")
    vers = obj.get("verifications") or ()
    if not isinstance(vers, list | tuple):
        raise DataError(f"{where}: 'verifications' must be a list")
    return PoolSample(
        pred=_opt_str(obj["pred"], where, "pred"),
        correct=_opt_bool(obj.get("correct"), where, "correct"),
        canonical=_opt_str(obj.get("key"), where, "key"),
        tokens=_opt_int(obj.get("tokens"), where, "tokens"),
        text=_opt_str(obj.get("text"), where, "text"),
        finish_reason=_opt_str(obj.get("finish_reason"), where, "finish_reason"),
        mean_logprob=_opt_float(obj.get("mean_logprob"), where, "mean_logprob"),
        score=_opt_float(obj.get("score"), where, "score"),
        p_yes=_probability(obj.get("p_yes"), where),
        verifications=tuple(_verification(v, f"{where} verification {j}")
                            for j, v in enumerate(vers)),
    )


def _problem(obj: Any, where: str) -> PoolProblem:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    samples = obj.get("samples")
    if not isinstance(samples, list) or not samples:
        raise DataError(f"{where}: 'samples' must be a non-empty list")
    base = problem_from_dict({k: v for k, v in obj.items() if k != "samples"}, where)
    return PoolProblem(base, tuple(_sample(s, f"{where} sample {j}")
                                   for j, s in enumerate(samples)))


def iter_pool_lines(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"pool file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read pool file {path}: {exc.strerror}") from exc
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None


def load_pool(path: str | Path, *, limit: int | None = None) -> Pool:
    """Read a pool file (see the module docstring); ``limit`` keeps the first N problems."""
    p = Path(path)
    problems: list[PoolProblem] = []
    seen: set[str] = set()
    for lineno, obj in iter_pool_lines(p):
        prob = _problem(obj, f"{p}:{lineno}")
        if prob.id in seen:
            raise DataError(f"{p}:{lineno}: duplicate id {prob.id!r}")
        seen.add(prob.id)
        problems.append(prob)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{p}: no problems in pool file")
    return Pool(p.stem, tuple(problems), p)


def read_pool_ids(path: str | Path) -> set[str]:
    """Ids already present in a (possibly partial) pool file; empty if it does not exist."""
    p = Path(path)
    if not p.exists():
        return set()
    return {str(obj.get("id")) for _, obj in iter_pool_lines(p) if isinstance(obj, dict)}


def pool_line(problem: Problem, samples: Iterable[Mapping[str, Any]], **extra: Any) -> str:
    """One pool line (JSON text, no newline) for ``problem`` and sample dicts."""
    obj: dict[str, Any] = {"id": problem.id, "problem": problem.problem,
                           "answer": problem.answer}
    if problem.aliases:
        obj["aliases"] = list(problem.aliases)
    obj["samples"] = [dict(s) for s in samples]
    obj.update(extra)
    return json.dumps(obj, ensure_ascii=False)


# ---- the dense view --------------------------------------------------------------------
@dataclass(frozen=True)
class PoolArrays:
    """Dense per-(problem, sample) arrays; padding beyond ``n[i]`` samples is inert.

    ``key[i, j]``: key id of sample j (ids by first occurrence in pool order; -1 = no
    answer, -2 = padding). ``key_correct[i, k]``: label of key k (its first labelled
    sample's), ``key_labelled[i, k]``: whether any sample of key k has a label (an answer
    without one is ungraded, as the runtime and the other engines grade it). ``tokens``:
    completion tokens (estimated from the text when the pool gives none;
    ``tokens_estimated`` says so). ``labelled``: every answered sample has a label.
    """

    n: np.ndarray  # (P,) int
    key: np.ndarray  # (P, N) int32
    correct: np.ndarray  # (P, N) bool
    tokens: np.ndarray  # (P, N) float64
    key_correct: np.ndarray  # (P, K) bool
    key_labelled: np.ndarray  # (P, K) bool
    n_keys: np.ndarray  # (P,) int
    tokens_estimated: bool
    labelled: bool
    keys: tuple[tuple[str, ...], ...] = field(repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.key.shape  # type: ignore[return-value]

    @property
    def valid(self) -> np.ndarray:
        return self.key > -2

    @classmethod
    def from_pool(cls, pool: Pool) -> PoolArrays:
        P = len(pool.problems)
        N = max(len(p.samples) for p in pool.problems)
        key = np.full((P, N), -2, dtype=np.int32)
        correct = np.zeros((P, N), dtype=bool)
        tokens = np.zeros((P, N), dtype=np.float64)
        n = np.zeros(P, dtype=np.int64)
        all_keys: list[tuple[str, ...]] = []
        labels: list[list[bool | None]] = []
        estimated = False
        labelled = True
        for i, prob in enumerate(pool.problems):
            ids: dict[str, int] = {}
            lab: list[bool | None] = []
            n[i] = len(prob.samples)
            for j, s in enumerate(prob.samples):
                k = s.key
                if k is None:
                    key[i, j] = -1
                else:
                    if k not in ids:
                        ids[k] = len(ids)
                        lab.append(None)
                    key[i, j] = ids[k]
                    if lab[ids[k]] is None and s.correct is not None:
                        lab[ids[k]] = bool(s.correct)
                if s.correct is None and k is not None:
                    labelled = False
                correct[i, j] = bool(s.correct) and k is not None
                if s.tokens is not None:
                    tokens[i, j] = s.tokens
                elif s.text is not None:
                    tokens[i, j] = estimate_tokens(s.text)
                    estimated = True
                else:
                    raise DataError(f"pool {pool.name}, problem {prob.id}, sample {j}: no "
                                    "'tokens' and no 'text' to estimate them from")
            all_keys.append(tuple(ids))
            labels.append(lab)
        K = max(1, max(len(lab) for lab in labels))
        key_correct = np.zeros((P, K), dtype=bool)
        key_labelled = np.zeros((P, K), dtype=bool)
        for i, lab in enumerate(labels):
            key_correct[i, : len(lab)] = [bool(x) for x in lab]
            key_labelled[i, : len(lab)] = [x is not None for x in lab]
        return cls(n=n, key=key, correct=correct, tokens=tokens, key_correct=key_correct,
                   key_labelled=key_labelled,
                   n_keys=np.array([len(lab) for lab in labels], dtype=np.int64),
                   tokens_estimated=estimated, labelled=labelled, keys=tuple(all_keys))
