"""Identity-based L3/L4 network policy: schema, selectors, repository, resolution, trace.

See ``docs/policy.md`` for the semantics.
"""

from pilus.policy.engine import (
    DirectionTrace,
    EndpointPolicy,
    PolicyEngine,
    PolicyEntry,
    PolicyKey,
    ServiceRef,
    TraceResult,
)
from pilus.policy.repository import PolicyNotFound, Repository
from pilus.policy.rule import Rule
from pilus.policy.schema import PolicyDoc, PolicyValidationError, ValidationIssue, parse_policies
from pilus.policy.selector import CIDRSelector, EndpointSelector

__all__ = [
    "CIDRSelector",
    "DirectionTrace",
    "EndpointPolicy",
    "EndpointSelector",
    "PolicyDoc",
    "PolicyEngine",
    "PolicyEntry",
    "PolicyKey",
    "PolicyNotFound",
    "PolicyValidationError",
    "Repository",
    "Rule",
    "ServiceRef",
    "TraceResult",
    "ValidationIssue",
    "parse_policies",
]
