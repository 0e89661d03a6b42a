"""Policy spec strings: ``name`` or ``name:key=value,key=value``.

Examples: ``sc:n=16``, ``genrm:s=8,v=4``. Values are integers, floats, or the word ``all``
where a policy accepts it. Every policy registers its name, its parameters (with the
constructor argument each maps to, its type and default) and a one-line help; ``solverify
policies`` prints the table, and an unknown name or parameter is a ``ConfigError`` that
lists what is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Param:
    key: str  # as written in the spec
    arg: str  # constructor argument
    type: type
    required: bool = False
    default: Any = None
    help: str = ""
    allow_all: bool = False  # accepts the word "all" (passed as None)


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    name: str
    factory: Callable[..., Any]
    params: tuple[Param, ...]
    help: str


_REGISTRY: dict[str, PolicyEntry] = {}


def register(name: str, factory: Callable[..., Any], params: tuple[Param, ...], help: str
             ) -> None:
    _REGISTRY[name] = PolicyEntry(name, factory, params, help)


def registered() -> tuple[PolicyEntry, ...]:
    _ensure_builtins()
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def _convert(entry: PolicyEntry, param: Param, raw: str) -> Any:
    if param.allow_all and raw == "all":
        return None
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


def parse_policy(spec: str) -> Any:
    """Build a policy from its spec string; raises ``ConfigError`` with what is valid."""
    _ensure_builtins()
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("empty policy spec; try e.g. 'sc:n=16' (see `solverify policies`)")
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    entry = _REGISTRY.get(name)
    if entry is None:
        names = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown policy '{name}' in spec {spec!r}; known policies: {names}")
    by_key = {p.key: p for p in entry.params}
    kwargs: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip().lower()
            if not eq or not key or not raw.strip():
                raise ConfigError(f"policy '{name}': expected key=value, got {item.strip()!r}")
            param = by_key.get(key)
            if param is None:
                valid = ", ".join(p.key for p in entry.params) or "none"
                raise ConfigError(f"policy '{name}' has no parameter '{key}'; valid: {valid}")
            if param.arg in kwargs:
                raise ConfigError(f"policy '{name}': parameter '{key}' given twice")
            kwargs[param.arg] = _convert(entry, param, raw.strip())
    for p in entry.params:
        if p.required and p.arg not in kwargs:
            raise ConfigError(f"policy '{name}' needs {p.key}=... ({p.help})")
    return entry.factory(**kwargs)


#: ``adaptive``'s parameters, shared by the policies that sample like it (policies.verifying)
ADAPTIVE_PARAMS: tuple[Param, ...] = (
    Param("width", "width", int, default=8, help="samples kept in flight"),
    Param("confidence", "confidence", float, default=0.9,
          help="stop when P(leader is still sc:n=max's answer) >= confidence"),
    Param("max", "max", int, default=64,
          help="horizon: the sc:n=max approximated, and the sample cap "
               "(in replays 'all' = the pool size)"),
    Param("min_votes", "min_votes", int, default=3,
          help="votes the leader needs before a probabilistic stop"),
    Param("prior", "prior", float, default=1.0,
          help="Dirichlet pseudo-count of the base prior"),
    Param("max_failures", "max_failures", int, help="broken samples replaced (default max)"),
    Param("wide", "wide", int, default=32,
          help="most samples in flight when the votes are contested (= width: off)"),
    Param("shrink", "shrink", float, default=4.0,
          help="weight of the base prior against the run's finished problems"),
    Param("learn", "learn", bool, default=True,
          help="learn the prior from the problems already finished in the run"),
)


#: ``adaptive``'s accuracy-loss stop (not yet passed through by policies.verifying, whose
#: inner ``adaptive`` takes this default)
ADAPTIVE_LOSS = Param("loss", "loss", float, default=0.01,
                      help="also stop when the expected accuracy lost against going on to max "
                           "is at most this (0: off)")


def _ensure_builtins() -> None:
    if _REGISTRY:
        return
    from policies import fixed

    register(
        "sc", fixed.SelfConsistency,
        (Param("n", "n", int, required=True, help="number of samples"),
         Param("max_failures", "max_failures", int, help="broken samples replaced (default n)")),
        "Self-Consistency: majority vote over n samples",
    )
    register(
        "genrm", fixed.GenRM,
        (Param("s", "solutions", int, required=True, help="solutions sampled"),
         Param("v", "verifications", int, required=True, help="verifications per solution"),
         Param("max_failures", "max_failures", int, help="broken samples replaced (default s)")),
        "GenRM Best-of-N: s solutions x v verifications, score = mean P(Yes)",
    )
    from policies import literature

    register(
        "ac", literature.AdaptiveConsistency,
        (Param("threshold", "threshold", float, default=0.95,
               help="stop when P(leader is the mode) >= threshold"),
         Param("max", "max", int, default=64, allow_all=True,
               help="most samples ('all': no cap)"),
         Param("criterion", "criterion", str, default="beta",
               help="beta (top two votes) or dirichlet (all votes)"),
         Param("max_failures", "max_failures", int,
               help="broken samples replaced (default max, or 8)")),
        "Adaptive-Consistency (Aggarwal et al. 2023): sample until the vote is settled",
    )
    register(
        "esc", literature.EarlyStoppingSC,
        (Param("window", "window", int, default=5, help="samples per window"),
         Param("max", "max", int, default=64, allow_all=True,
               help="most samples ('all': no cap)"),
         Param("max_failures", "max_failures", int,
               help="broken samples replaced (default max, or 8)")),
        "Early-Stopping SC (Li et al. 2024): stop when a window of samples is unanimous",
    )
    register(
        "boinf", literature.BestOfInfinity,
        (Param("bayes_factor", "bayes_factor", float, default=30.0,
               help="stop when the leader's Bayes factor >= this"),
         Param("alpha", "alpha", float, default=1.0,
               help="Dirichlet pseudo-votes per answer and for the unseen-answer bucket"),
         Param("max", "max", int, default=64, allow_all=True,
               help="most samples ('all': no cap)"),
         Param("max_failures", "max_failures", int,
               help="broken samples replaced (default max, or 8)")),
        "Best-of-infinity (Komiyama et al. 2025): one sample at a time until the Bayes factor "
        "of the leader is large enough",
    )
    from policies import adaptive

    register(
        "adaptive", adaptive.Adaptive,
        (*ADAPTIVE_PARAMS, ADAPTIVE_LOSS),
        "Adaptive: finite-horizon posterior stop with a prior learned from the run, "
        "in-flight width following the evidence, stragglers cancelled",
    )
    from policies import optimal

    register(
        "optimal", optimal.optimal_from_spec,
        (Param("c", "compute", float, required=True,
               help="compute in units of C(S,V) = S(1 + lambda V)"),
         Param("profile", "profile", str,
               help="verifier profile with the scaling law (bench compute-matched "
                    "--profile-out); required"),
         Param("max_failures", "max_failures", int, help="broken samples replaced (default S)")),
        "compute-optimal fixed allocation: SC or GenRM(S,V) from the fitted power law",
    )
    from policies.verifying import solverify_entries

    solverify_entries()
