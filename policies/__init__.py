"""Policies: pure ``decide(snapshot) -> decisions`` functions, and their spec grammar."""

from policies.base import Policy
from policies.fixed import GenRM, SelfConsistency
from policies.spec import parse_policy, registered

__all__ = ["GenRM", "Policy", "SelfConsistency", "parse_policy", "registered"]
