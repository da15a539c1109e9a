"""Typed L7 rules of a ``toPorts[].rules`` item, with Cilium's field names.

HTTP and Kafka rules are enforced by the L7 proxy, DNS rules by the agent's DNS proxy
(``PolicyEngine.proxy_rule_sets`` is their input; the map entries they cover carry the
proxy's port); ``l7proto`` rules are validated and allowed at L4 (no generic parser).
Frozen and hashable, like the rest of the internal rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["HeaderMatch", "L7Rules", "PortRuleDNS", "PortRuleHTTP", "PortRuleKafka", "PortRuleL7", "Secret"]


@dataclass(frozen=True)
class Secret:
    namespace: str
    name: str


@dataclass(frozen=True)
class HeaderMatch:
    """A header that must match (``value`` or ``secret``); ``mismatch`` is what to do
    when it does not ("" = fail the request, LOG, ADD, DELETE, REPLACE)."""

    name: str
    value: str | None = None
    secret: Secret | None = None
    mismatch: str = ""


@dataclass(frozen=True)
class PortRuleHTTP:
    """``method``, ``path``, ``host``: POSIX extended regexes ('' = any); ``headers``:
    "Name" or "Name: value" that must be present."""

    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()
    headerMatches: tuple[HeaderMatch, ...] = ()  # noqa: N815 - Cilium's name

    def to_dict(self) -> dict[str, Any]:
        """As written in a policy (and read by the L7 proxy): defaults left out."""
        return _fields(self)


@dataclass(frozen=True)
class PortRuleKafka:
    """``role`` (produce / consume) or ``apiKey``, not both; '' fields match any."""

    role: str = ""
    apiKey: str = ""  # noqa: N815
    apiVersion: str = ""  # noqa: N815
    clientID: str = ""  # noqa: N815
    topic: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True)
class PortRuleDNS:
    """Exactly one of ``matchName`` (a DNS name) and ``matchPattern`` (``*`` wildcards)."""

    matchName: str = ""  # noqa: N815
    matchPattern: str = ""  # noqa: N815

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True)
class PortRuleL7:
    """One generic rule of an ``l7proto`` parser: key/value pairs."""

    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class L7Rules:
    """A port rule's ``rules``: one kind of rule list (or none: ``rules: {}``)."""

    http: tuple[PortRuleHTTP, ...] = ()
    kafka: tuple[PortRuleKafka, ...] = ()
    dns: tuple[PortRuleDNS, ...] = ()
    l7proto: str = ""
    l7: tuple[PortRuleL7, ...] = ()

    @property
    def parser(self) -> str:
        """Which proxy parser the rules are for: http, kafka, dns, the l7proto, or ''."""
        for kind in ("http", "kafka", "dns"):
            if getattr(self, kind):
                return kind
        return self.l7proto

    def to_dict(self) -> dict[str, Any]:
        """The rules as written in a policy (fields at their defaults left out)."""
        out: dict[str, Any] = {}
        for kind in ("http", "kafka", "dns"):
            rules = getattr(self, kind)
            if rules:
                out[kind] = [_fields(r) for r in rules]
        if self.l7proto:
            out["l7proto"] = self.l7proto
        if self.l7:
            out["l7"] = [dict(r.fields) for r in self.l7]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, val in obj.__dict__.items():
        if val in ("", (), None):
            continue
        if isinstance(val, tuple):
            val = [_fields(v) if hasattr(v, "__dict__") else v for v in val]
        elif hasattr(val, "__dict__"):
            val = _fields(val)
        out[name] = val
    return out
