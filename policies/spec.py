"""Policy spec strings: ``name`` or ``name:key=value,key=value``.

Examples: ``sc:n=16``, ``genrm:s=8,v=4``. Values are integers, floats, booleans, strings,
or the word ``all`` (see below). The registry is derived from the policy dataclasses: a
policy registers its name, its class (or a factory) and a one-line help, and its
parameters — the constructor argument each spec key maps to, its type, whether it is
required and its default — are read from the dataclass fields, so a default is written
once, in the class. ``solverify policies`` prints the table; an unknown name or parameter
is a ``ConfigError`` that lists what is valid.

``all``: with a size (``parse_policy(spec, size=N)``, as replays pass the pool size), an
integer parameter given as ``all`` is that size; without one, ``all`` is accepted only by
parameters whose ``None`` means "no cap" (``ac:max=all``), and means that.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError

__all__ = ["Param", "PolicyEntry", "params_of", "parse_policy", "parse_spec", "register",
           "register_dataclass", "registered", "uses_all"]


@dataclass(frozen=True, slots=True)
class Param:
    key: str  # as written in the spec
    arg: str  # constructor argument
    type: type
    required: bool = False
    default: Any = None
    help: str = ""
    allow_all: bool = False  # accepts the word "all" without a size (passed as None)


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    factory: Callable[..., Any]
    params: tuple[Param, ...]
    help: str


_REGISTRY: dict[str, PolicyEntry] = {}
_BUILTINS_LOADED = False


def register(name: str, factory: Callable[..., Any], params: tuple[Param, ...], help: str
             ) -> None:
    """Register a policy with explicit parameters (see :func:`register_dataclass` for a
    dataclass policy). A later registration of a name replaces the earlier one; the
    built-in policies never replace one registered before them."""
    _REGISTRY[name] = PolicyEntry(name, factory, params, help)


_SPEC_TYPES = (bool, int, float, str)


def _spec_type(hint: Any, where: str) -> type:
    """int, float, bool or str from a field's annotation (``X | None`` is X)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) == 1 and kinds[0] in _SPEC_TYPES:
        return kinds[0]
    raise TypeError(f"{where}: a spec parameter must be int, float, bool or str (or that "
                    f"or None), not {hint!r}; pass types={{...}}")


def params_of(cls: type, *, keys: Mapping[str, str] | None = None,
              helps: Mapping[str, str] | None = None, allow_all: Iterable[str] = (),
              types: Mapping[str, type] | None = None,
              optional: Iterable[str] = ()) -> tuple[Param, ...]:
    """The spec parameters of a policy dataclass, in field order: every init field not
    starting with ``_``. ``keys`` renames a field in specs (``solutions`` -> ``s``),
    ``helps`` gives its help, ``allow_all`` lists fields whose ``None`` means "no cap"
    (written ``all``), ``types`` overrides a field's spec type (the factory converts),
    ``optional`` lists fields without a default that the factory checks itself."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    keys, helps, types_ = dict(keys or {}), dict(helps or {}), dict(types or {})
    allow, opt = set(allow_all), set(optional)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = types_.get(f.name) or _spec_type(hints[f.name], f"{cls.__name__}.{f.name}")
        out.append(Param(keys.get(f.name, f.name), f.name, typ,
                         required=not has_default and f.name not in opt,
                         default=default, help=helps.get(f.name, ""),
                         allow_all=f.name in allow))
    unknown = (set(keys) | set(helps) | allow | set(types_) | opt) - {p.arg for p in out}
    if unknown:
        raise TypeError(f"{cls.__name__} has no spec fields {sorted(unknown)}")
    return tuple(out)


def register_dataclass(name: str, cls: type, help: str, *,
                       factory: Callable[..., Any] | None = None, **options: Any) -> None:
    """Register a dataclass policy; its parameters come from its fields
    (:func:`params_of`, which takes ``options``). ``factory`` builds it from the spec's
    values when that is not the class itself."""
    register(name, factory or cls, params_of(cls, **options), help)


def registered() -> tuple[PolicyEntry, ...]:
    _ensure_builtins()
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def _convert(entry: PolicyEntry, param: Param, raw: str, size: int | None) -> Any:
    if raw == "all":
        if size is not None and param.type is int:
            return size
        if param.allow_all:
            return None
        if param.type is int:
            raise ConfigError(f"policy '{entry.name}': {param.key}=all means the pool size, "
                              "which only a replay knows (solverify bench); give a number")
    try:
        if param.type is int:
            return int(raw)
        if param.type is float:
            return float(raw)
        if param.type is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return param.type(raw)
    except ValueError:
        kind = param.type.__name__ + (" or 'all'" if param.allow_all else "")
        raise ConfigError(
            f"policy '{entry.name}': {param.key}={raw!r} is not a valid {kind}"
        ) from None


def parse_spec(spec: str) -> tuple[PolicyEntry, dict[str, str]]:
    """The registry entry of a spec and its raw ``key=value`` pairs (checked: a known
    name, known keys, each once, required ones present). Only the module of the policy
    named is imported (``sc`` does not pull in numpy and scipy for the others)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty policy spec; try e.g. 'sc:n=16' (see `solverify policies`)")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    entry = _lookup(name)
    if entry is None:
        names = ", ".join(sorted(set(_REGISTRY) | set(_BUILTINS)))
        raise ConfigError(f"unknown policy '{name}' in spec {spec!r}; known policies: {names}")
    by_key = {p.key: p for p in entry.params}
    raw: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or not key or not value.strip():
                raise ConfigError(f"policy '{name}': expected key=value, got {item.strip()!r}")
            if key not in by_key:
                valid = ", ".join(p.key for p in entry.params) or "none"
                raise ConfigError(f"policy '{name}' has no parameter '{key}'; valid: {valid}")
            if key in raw:
                raise ConfigError(f"policy '{name}': parameter '{key}' given twice")
            raw[key] = value.strip()
    for p in entry.params:
        if p.required and p.key not in raw:
            raise ConfigError(f"policy '{name}' needs {p.key}=... ({p.help})")
    return entry, raw


def uses_all(spec: str) -> bool:
    """Does the spec give some parameter as ``all`` in the sense of "the pool size" or
    "no cap" (an integer parameter, or one that allows ``all``)? A string parameter's
    value ``all`` (``adaptive:rivals=all``) is just that string."""
    entry, raw = parse_spec(spec)
    by_key = {p.key: p for p in entry.params}
    return any(v == "all" and (by_key[k].type is int or by_key[k].allow_all)
               for k, v in raw.items())


def parse_policy(spec: str, *, size: int | None = None) -> Any:
    """Build a policy from its spec string; raises ``ConfigError`` with what is valid.
    ``size``: what ``all`` means for an integer parameter (replays: the pool size)."""
    entry, raw = parse_spec(spec)
    by_key = {p.key: p for p in entry.params}
    kwargs = {by_key[k].arg: _convert(entry, by_key[k], v, size) for k, v in raw.items()}
    return entry.factory(**kwargs)


# ---- the built-in policies --------------------------------------------------------------
_FAILURES = "broken samples replaced"

#: help of the parameters ``adaptive`` and the verifying policies share
ADAPTIVE_HELP: dict[str, str] = {
    "width": "samples kept in flight",
    "confidence": "stop when P(runner-up does not catch the leader by max) >= confidence",
    "max": "horizon: the sc:n=max approximated, and the sample cap "
           "(in replays 'all' = the pool size)",
    "min_votes": "votes the leader needs before a probabilistic stop",
    "prior": "Dirichlet pseudo-count of the base prior",
    "max_failures": f"{_FAILURES} (default max)",
    "wide": "most samples in flight when the votes are contested (= width or below: off)",
    "shrink": "weight of the base prior against the run's finished problems",
    "learn": "learn the prior from the problems already finished in the run",
    "loss": "also stop when the expected accuracy lost against going on to max is at most "
            "this (0: off)",
    "rivals": "whose overturn the stop counts: runner-up, or all (every answer that can "
              "still reach the leader, summed)",
}

#: help of the parameters the verifying policies add
VERIFYING_HELP: dict[str, str] = {
    **ADAPTIVE_HELP,
    "profile": "verifier profile JSON (solverify bench verifier); default: estimated "
               "online from the run",
    "settle": "stop when P(best answer right) >= settle and it has a reading",
    "max_reads": "readings per answer at most",
    "explore": "online: pseudo-labelled solutions per class before trusting the estimate "
               "(0: never verify without a profile)",
    "explore_others": "online: answers besides the leader read while pseudo-negatives are "
                      "short",
    "min_auc": "use the verifier only when its AUC (online: 95% lower bound) > this",
    "max_icc": "read one solution again only when the profile's repeat ICC < this",
    "doubt": "prior probability that the most frequent answer is not the right one "
             "(0: the votes' mode is right, as SC assumes)",
    "extend": "sample on past adaptive's stop, up to max, while the posterior is not "
              "settled",
}


def __getattr__(name: str) -> Any:
    if name == "ADAPTIVE_PARAMS":  # the parameters the verifying policies share with adaptive
        from policies.adaptive import Adaptive

        return params_of(Adaptive, helps=ADAPTIVE_HELP)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _builtin(name: str, cls: type, help: str, **options: Any) -> None:
    if name not in _REGISTRY:  # a policy registered by the user under this name wins
        register_dataclass(name, cls, help, **options)


def _lookup(name: str) -> PolicyEntry | None:
    """The entry registered under ``name``, loading that built-in first if it is one."""
    if name not in _REGISTRY and name in _BUILTINS:
        _BUILTINS[name]()
    return _REGISTRY.get(name)


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for load in _BUILTINS.values():
        load()


# one loader per built-in policy: each imports only its own module
def _load_sc() -> None:
    from policies import fixed

    _builtin("sc", fixed.SelfConsistency,
             "Self-Consistency: majority vote over n samples",
             helps={"n": "number of samples", "max_failures": f"{_FAILURES} (default n)"})


def _load_genrm() -> None:
    from policies import fixed

    _builtin("genrm", fixed.GenRM,
             "GenRM Best-of-N: s solutions x v verifications, score = mean P(Yes)",
             keys={"solutions": "s", "verifications": "v"},
             helps={"solutions": "solutions sampled",
                    "verifications": "verifications per solution",
                    "max_failures": f"{_FAILURES} (default s)"})


_CAP = {"max": "most samples ('all': no cap)",
        "max_failures": f"{_FAILURES} (default max, or 8)"}


def _load_ac() -> None:
    from policies import literature

    _builtin("ac", literature.AdaptiveConsistency,
             "Adaptive-Consistency (Aggarwal et al. 2023): sample until the vote is settled",
             allow_all=("max",),
             helps={"threshold": "stop when P(leader is the mode) >= threshold",
                    "criterion": "beta (top two votes) or dirichlet (all votes)", **_CAP})


def _load_esc() -> None:
    from policies import literature

    _builtin("esc", literature.EarlyStoppingSC,
             "Early-Stopping SC (Li et al. 2024): stop when a window of samples is unanimous",
             allow_all=("max",), helps={"window": "samples per window", **_CAP})


def _load_boinf() -> None:
    from policies import literature

    _builtin("boinf", literature.BestOfInfinity,
             "Best-of-infinity (Komiyama et al. 2025): one sample at a time until the Bayes "
             "factor of the leader is large enough",
             allow_all=("max",),
             helps={"bayes_factor": "stop when the leader's Bayes factor >= this",
                    "alpha": "Dirichlet pseudo-votes per answer and for the unseen-answer "
                             "bucket", **_CAP})


def _load_adaptive() -> None:
    from policies import adaptive

    _builtin("adaptive", adaptive.Adaptive,
             "Adaptive: finite-horizon posterior stop with a prior learned from the run, "
             "in-flight width following the evidence, stragglers cancelled",
             helps=ADAPTIVE_HELP)


def _load_optimal() -> None:
    from policies import optimal

    _builtin("optimal", optimal.Optimal,
             "compute-optimal fixed allocation: SC or GenRM(S,V) from the fitted power law",
             factory=optimal.optimal_from_spec, keys={"compute": "c"},
             types={"profile": str}, optional=("profile",),
             helps={"compute": "compute in units of C(S,V) = S(1 + lambda V)",
                    "profile": "verifier profile with the scaling law (bench compute-matched "
                               "--profile-out); required",
                    "max_failures": f"{_FAILURES} (default S)"})


def _load_verify_contested() -> None:
    from policies import verifying

    _builtin("verify-contested", verifying.VerifyContested,
             "adaptive + verify the answers that can still win until the posterior settles",
             helps={**VERIFYING_HELP, "floor": "verify answers whose posterior >= floor"})


def _load_solverify() -> None:
    from policies import verifying

    _builtin("solverify", verifying.Solverify,
             "sample, verify or stop by expected gain in P(right) per token; with a useless "
             "verifier it is adaptive",
             helps={**VERIFYING_HELP,
                    "min_gain": "least expected gain in P(right) a verification must add"})


#: the built-in policies by name, each loaded on first use
_BUILTINS: dict[str, Callable[[], None]] = {
    "sc": _load_sc,
    "genrm": _load_genrm,
    "ac": _load_ac,
    "esc": _load_esc,
    "boinf": _load_boinf,
    "adaptive": _load_adaptive,
    "optimal": _load_optimal,
    "verify-contested": _load_verify_contested,
    "solverify": _load_solverify,
}
