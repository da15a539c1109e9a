"""One endpoint's compiled policy: the rules that select it, as contributions.

A contribution is one rule element's (direction, allow/deny, proto/port keys)
before it is expanded to the identities its selectors select; the engine expands
them into map entries (``mapstate``) and ``policy trace`` evaluates them against
labels. Both read the same compilation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from pilus.policy.l7 import L7Rules
from pilus.policy.mapstate import PolicyEntry, PolicyKey
from pilus.policy.rule import PeerRule, Rule, ServiceSelector
from pilus.policy.selectorcache import Selector

__all__ = ["PROXY_PARSERS", "CompiledPolicy", "Contribution", "L4Key"]

L4Key = tuple[int, int, int]  # proto, dport, prefix_len

#: the L7 rule kinds that have a proxy (an l7proto parser has none: plain L4)
PROXY_PARSERS = ("http", "kafka", "dns")
#: the protocols each proxy takes; a key of another protocol (UDP under an HTTP rule on an
#: ANY port) stays a plain allow, as Cilium redirects only what its proxies speak
PROXY_PROTOCOLS = {"http": (6,), "kafka": (6,), "dns": (6, 17)}


@dataclass(frozen=True)
class Contribution:
    egress: bool
    deny: bool
    keys: tuple[L4Key, ...]
    origin: str
    # the typed L7 rules of the port rules behind a key (the L7 proxy's input)
    l7: tuple[tuple[L4Key, L7Rules], ...] = ()

    @cached_property
    def proxy_keys(self) -> dict[L4Key, str]:
        """The keys an HTTP, Kafka or DNS rule covers, with the parser: their traffic is
        redirected to that parser's proxy (the first port rule naming a key decides; only
        the protocols of ``PROXY_PROTOCOLS``)."""
        out: dict[L4Key, str] = {}
        for k, rules in self.l7:
            if k[0] in PROXY_PROTOCOLS.get(rules.parser, ()):
                out.setdefault(k, rules.parser)
        return out


@dataclass
class CompiledPolicy:
    """What one endpoint's policy is made of (before expansion to identities)."""

    rules: list[Rule]
    ingress_enforced: bool
    egress_enforced: bool
    ingress_default_deny: bool
    egress_default_deny: bool
    # (selector or None for wildcard, peer rule, contribution) in rule order
    items: list[tuple[Selector | None, PeerRule, Contribution]]
    static: dict[PolicyKey, PolicyEntry]
    uses_cluster_named_ports: bool = False
    # the direction's rules use a Kubernetes ipBlock (the datapath's second lookup)
    ingress_ipblock: bool = False
    egress_ipblock: bool = False
    # toServices items of the selected rules (a service change recomputes the endpoint)
    service_sels: set[ServiceSelector] = field(default_factory=set)

    def enforced(self, egress: bool) -> bool:
        return self.egress_enforced if egress else self.ingress_enforced

    def default_deny(self, egress: bool) -> bool:
        return self.egress_default_deny if egress else self.ingress_default_deny

    def ipblock(self, egress: bool) -> bool:
        return self.egress_ipblock if egress else self.ingress_ipblock
