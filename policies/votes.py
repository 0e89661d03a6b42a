"""Shared vote arithmetic.

Tie rule (documented, deterministic): among answers with equally many votes, the one whose
*first* vote arrived earliest (lowest completion index) wins. Solutions without an
extracted answer never vote and never win.
"""

from __future__ import annotations

from orchestrator.decisions import Stop, StopCode
from orchestrator.snapshot import ProblemSnapshot, VoteCount


def leader(snapshot: ProblemSnapshot) -> VoteCount | None:
    votes = snapshot.votes()
    return votes[0] if votes else None


def majority_stop(snapshot: ProblemSnapshot, why: str, code: StopCode = "settled") -> Stop:
    """Stop with the majority answer; the reason says how many votes it had."""
    votes = snapshot.votes()
    if not votes:
        return Stop(None, f"{why}: no solution had an answer", code=code)
    top = votes[0]
    total = sum(v.votes for v in votes)
    return Stop(top.answer, f"{why}: majority {top.votes}/{total}", top.key, code)
