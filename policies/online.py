"""A verifier profile estimated from the run itself, without labels.

The problems already finished in a run (``snapshot.history``) carry their votes and
verifier readings, never the ground truth. A reading of a solution whose answer is a
*settled* problem's vote majority (stop code ``settled``, one most frequent answer) is a
pseudo-positive, any other reading of such a problem a pseudo-negative; problems that
stopped on their cap, the budget, failures or an error are left out (their answer is not
settled), and so are those whose top vote is tied. The pseudo-labels are as good as the
majorities are: where those are right ~90% of the time, about one pseudo-positive in ten
is really a wrong answer, which pulls the estimated AUC towards 0.5 (a conservative
error: the verifier looks worse than it is, never better). They are the votes' and not
the answer a problem stopped with, which a verifying policy lets the readings choose:
labelled by that, a verifier's readings would vouch for the answers they chose, and a
useless verifier trusted once by chance stayed trusted. The verifying policies also
collect the readings they first learn from while their answers are still the vote's (see
:mod:`policies.verifying`).

The pseudo-labels and the profile come from :meth:`VerifierProfile.from_history` (one
estimator for policies and for ``solverify bench verifier``); this module adds when a
policy may trust it. The estimate is *usable* once each class has ``min_per_class``
readings and says the verifier is useful with margin: the AUC's one-sided 95% lower
bound (Hanley-McNeil standard error) above ``min_auc``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from orchestrator.history import ProblemRecord
from policies.profile import VerifierProfile

__all__ = ["OnlineEstimate", "auc_lower_bound", "estimate_online"]


@dataclass(frozen=True, slots=True)
class OnlineEstimate:
    """What the run's history says about the verifier."""

    profile: VerifierProfile | None
    positives: int
    negatives: int
    auc_low: float | None
    min_per_class: int
    min_auc: float

    @property
    def enough(self) -> bool:
        """Both classes have ``min_per_class`` readings."""
        return self.positives >= self.min_per_class and self.negatives >= self.min_per_class

    @property
    def usable(self) -> VerifierProfile | None:
        """The profile, when there are enough readings and it is useful with margin."""
        if self.profile is None or not self.enough or self.auc_low is None:
            return None
        return self.profile if self.auc_low > self.min_auc else None


def auc_lower_bound(auc: float, positives: int, negatives: int, z: float = 1.645) -> float:
    """AUC - z · SE, with the Hanley-McNeil (1982) standard error."""
    if positives < 1 or negatives < 1:
        return 0.0
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
           + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return auc - z * math.sqrt(max(var, 0.0))


def _estimate(records: tuple[ProblemRecord, ...], min_per_class: int, min_auc: float
              ) -> OnlineEstimate:
    profile = VerifierProfile.from_history(records, source="online (pseudo-labels)")
    if profile is None:
        return OnlineEstimate(None, 0, 0, None, min_per_class, min_auc)
    pos, neg = profile.n_correct, profile.n_wrong
    low = None if profile.auc is None else auc_lower_bound(profile.auc, pos, neg)
    return OnlineEstimate(profile if pos and neg else None, pos, neg, low, min_per_class,
                          min_auc)


_CACHE: OrderedDict[tuple[int, int, float], tuple[tuple[ProblemRecord, ...], OnlineEstimate]] \
    = OrderedDict()
_CACHE_SIZE = 32


def estimate_online(records: tuple[ProblemRecord, ...], *, min_per_class: int = 10,
                    min_auc: float = 0.55) -> OnlineEstimate:
    """The online estimate for a run's records (pure; memoised on the records tuple,
    which a run replaces whenever a problem finishes, so every decision of a problem
    reuses one estimate). ``positives``/``negatives`` count pseudo-labelled *solutions*."""
    key = (id(records), min_per_class, min_auc)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is records:
        return hit[1]
    est = _estimate(records, min_per_class, min_auc)
    _CACHE[key] = (records, est)
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return est
