"""Compute-optimal fixed allocation: ``optimal:c=C,profile=FILE``.

Singhi et al. (2025) fit how the best GenRM configuration grows with compute:
S_opt ∝ C^a, V_opt ∝ C^b, C(S, V) = S·(1 + λV). ``solverify bench compute-matched
--profile-out FILE`` fits that law on pools (with their verifier, real or simulated) and
saves it in a :class:`~policies.profile.VerifierProfile` (its ``scaling``). This policy
reads the law and, for a compute budget of ``C`` units, runs:

* Self-Consistency over ``floor(C)`` samples where SC is the better use of that compute
  (below the law's crossover, or at any compute when GenRM never caught up with SC on
  the fitted grid: a useless verifier is then never consulted);
* otherwise GenRM(S, V) with (S, V) from the law, made to fit: V, then S, is lowered
  until S·(1 + λV) ≤ C (λ: the law's, else the profile's).

Each problem is then exactly the fixed policy it resolved to (composition: ``decide`` is
that policy's ``decide``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.decisions import Decision
from orchestrator.errors import ConfigError
from orchestrator.snapshot import ProblemSnapshot
from policies.base import non_default, num, policy_verifies
from policies.fixed import GenRM, SelfConsistency
from policies.profile import VerifierProfile

__all__ = ["Optimal", "allocate", "optimal_from_spec"]


def allocate(profile: VerifierProfile, compute: float) -> tuple[int, int]:
    """(S, V) for ``compute`` units of C(S, V); V = 0 means Self-Consistency over S."""
    if not (isinstance(compute, int | float) and math.isfinite(compute) and compute >= 1):
        raise ConfigError(f"optimal: c must be a number >= 1 (units of C(S,V)), got "
                          f"{compute!r}")
    law = profile.scaling
    if law is None:
        raise ConfigError("optimal: the profile has no scaling law; write one with "
                          "`solverify bench compute-matched --profile-out FILE`")
    if law.prefers_sc(compute):
        return max(1, math.floor(compute + 1e-9)), 0
    lam = law.lam if law.lam is not None else profile.lam
    if lam is None or not lam > 0:
        raise ConfigError("optimal: the profile gives no lambda (verification tokens / "
                          "solution tokens) to cost verifications with")
    s, v = law.allocation(compute)

    def cost(s: int, v: int) -> float:
        return s * (1 + lam * v)

    while v > 1 and cost(s, v) > compute + 1e-9:
        v -= 1
    while s > 1 and cost(s, v) > compute + 1e-9:
        s -= 1
    if cost(s, v) > compute + 1e-9:  # not even one verified solution fits: SC
        return max(1, math.floor(compute + 1e-9)), 0
    return s, v


@dataclass(frozen=True)
class Optimal:
    """The compute-optimal fixed allocation for ``compute`` units (see the module)."""

    compute: float
    profile: VerifierProfile
    max_failures: int | None = None
    _inner: SelfConsistency | GenRM = field(init=False, repr=False, compare=False)
    #: the profile file it was read from (by a spec): what its spec names
    _path: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.profile, VerifierProfile):
            raise ConfigError("optimal: profile must be a VerifierProfile")
        s, v = allocate(self.profile, self.compute)
        inner: SelfConsistency | GenRM = (
            SelfConsistency(s, self.max_failures) if v == 0
            else GenRM(s, v, self.max_failures))
        object.__setattr__(self, "_inner", inner)

    @property
    def allocation(self) -> tuple[int, int]:
        inner = self._inner
        if isinstance(inner, GenRM):
            return inner.solutions, inner.verifications
        return inner.n, 0

    @property
    def resolved(self) -> SelfConsistency | GenRM:
        """The fixed policy this allocation runs."""
        return self._inner

    @property
    def verifies(self) -> bool:
        """Whether the allocation sends solutions to the verifier (a GenRM one does): the
        runtime's budget check and the resume fingerprint read it (found by review)."""
        return policy_verifies(self._inner)

    @property
    def spec(self) -> str:
        """``optimal:c=C,profile=FILE`` when read from a file (it parses back to the same
        policy; :attr:`resolved` is the allocation); built from a profile object in code,
        a label naming the allocation instead."""
        if self._path is None:
            return f"optimal:c={num(self.compute)} ({self._inner.spec})"
        return ",".join([f"optimal:c={num(self.compute)}", f"profile={self._path}",
                         *non_default(self, "max_failures")])

    def decide(self, s: ProblemSnapshot) -> Sequence[Decision]:
        return self._inner.decide(s)


def optimal_from_spec(compute: float, profile: str | None = None,
                      max_failures: int | None = None) -> Optimal:
    """The spec factory: ``profile`` is the path of a profile file with a scaling law."""
    if profile is None:
        raise ConfigError("optimal needs profile=FILE: a verifier profile with a scaling law, "
                          "written by `solverify bench compute-matched --profile-out FILE`")
    policy = Optimal(compute, VerifierProfile.load(Path(profile)), max_failures)
    object.__setattr__(policy, "_path", profile)
    return policy
