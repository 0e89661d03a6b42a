"""The Policy protocol, defined by the core (:mod:`orchestrator.protocols`, where its
contract is documented) and re-exported here for policy authors."""

from orchestrator.protocols import Policy, policy_verifies

__all__ = ["Policy", "policy_verifies"]
