"""The DNS proxy's rules: rule sets of the same shape as the HTTP proxy's (docs/l7.md), with
``dns`` (PortRuleDNS, Cilium's field names) instead of ``http``.

```
[{"endpoint": 12,                     reported in records
  "endpoint_ips": ["10.200.1.5"],     the client endpoint's IPs; null/absent = any
  "port": 53, "end_port": null,       the query's original destination port (range); null = any
  "peers": [2000],                    identities of the DNS servers; null = any server
  "dns": [{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}]}]   [] = every name
```

The proxy is an egress proxy: the local endpoint is the client, the peer is the server. The
names allowed for a query are the union of every set that applies; none applies: denied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pilus.proxy.config import ConfigError, rule_set_scope

from .matchpattern import NameMatcher

__all__ = ["DNSPolicy", "DNSPolicyError", "DNSRuleSet"]


class DNSPolicyError(ValueError):
    """Rule sets the proxy refuses; the message starts with the field path."""


@dataclass(frozen=True)
class DNSRuleSet:
    endpoint: int | None
    endpoint_ips: frozenset[str] | None
    port: int | None
    end_port: int | None
    peers: frozenset[int] | None
    names: NameMatcher

    def applies(self, client_ip: str, port: int, server_identity: int) -> bool:
        return ((self.endpoint_ips is None or client_ip in self.endpoint_ips)
                and (self.port is None or self.port <= port <= (self.end_port or self.port))
                and (self.peers is None or server_identity in self.peers))


class DNSPolicy:
    """Compiled rule sets (all or nothing); ``select`` is what one query is judged by."""

    def __init__(self, sets: Iterable[DNSRuleSet] = ()):
        self.sets = tuple(sets)

    @classmethod
    def from_rule_sets(cls, data: Any, where: str = "rule_sets") -> DNSPolicy:
        if not isinstance(data, list):
            raise DNSPolicyError(f"{where}: must be a list")
        return cls(_ruleset(d, f"{where}[{i}]") for i, d in enumerate(data))

    def select(self, client_ip: str, server_port: int, server_identity: int) -> tuple[NameMatcher | None, int | None]:
        """The names allowed for this (client, port, server) and the endpoint id; None: deny."""
        sets = [s for s in self.sets if s.applies(client_ip, server_port, server_identity)]
        if not sets:
            return None, None
        matcher = sets[0].names if len(sets) == 1 else NameMatcher.union(s.names for s in sets)
        return matcher, sets[0].endpoint

    def __len__(self) -> int:
        return len(self.sets)


def _ruleset(d: Any, where: str) -> DNSRuleSet:
    try:
        endpoint, ips, port, end_port, peers = rule_set_scope(d, where, ("dns",))
    except ConfigError as e:
        raise DNSPolicyError(str(e)) from None
    rules = d.get("dns", [])
    if not isinstance(rules, list):
        raise DNSPolicyError(f"{where}.dns: must be a list")
    try:
        names = NameMatcher.from_rules(rules, f"{where}.dns")
    except ValueError as e:
        raise DNSPolicyError(str(e)) from None
    return DNSRuleSet(endpoint, ips, port, end_port, peers, names)
