"""Label selectors over identities, as Cilium's EndpointSelector and CIDR selectors.

An :class:`EndpointSelector` is a Kubernetes label selector whose keys may carry a
Cilium label source (``k8s:app``, ``any:app``, ``reserved:host``); a key without a
source means ``any`` (matches a label of every source). It is an AND of
:class:`Requirement` s; ``matchLabels: {k: v}`` is the requirement ``k In (v)``.
The empty selector selects everything (Cilium's wildcard: identity 0 entries).

A :class:`CIDRSelector` (``fromCIDR``/``fromCIDRSet``/``ipBlock``) selects the local
CIDR identities (labels ``cidr:<prefix>`` + ``reserved:world``) whose prefix lies
inside its ``cidr`` and not inside any ``except``; a ``/0`` cidr also selects the
identities labelled ``reserved:world`` (world, world-ipv4) that carry no cidr label.

A Kubernetes NetworkPolicy ``ipBlock`` is a CIDRSelector with ``ipblock=True``: it
selects the *ipBlock identities* instead (labels ``cidr:<prefix>`` +
``reserved:ipblock``, one per prefix that an ipBlock names, looked up by the peer's
address in a second datapath lookup), so that it matches pod addresses too. Only
ipBlock selectors select ipBlock identities; CIDR rules of Cilium policies keep
Cilium's semantics and never select a pod.

Both are immutable, hashable and have a canonical ``str()`` used as the
selector-cache key and shown by ``pilus policy selectors``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pilus.fqdn.matchpattern import compile_pattern, normalize
from pilus.identity.labels import ANY, CIDR, FQDN, RESERVED, SOURCES, Label, Labels

__all__ = [
    "IPBLOCK_LABEL",
    "OPERATORS",
    "CIDRSelector",
    "EndpointSelector",
    "FQDNSelector",
    "Requirement",
    "SelectorError",
    "ipblock_identity_labels",
    "is_ipblock_identity",
    "split_key",
]

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

#: the label that marks an ipBlock identity (see the module doc)
IPBLOCK_LABEL = Label(RESERVED, "ipblock")


def ipblock_identity_labels(prefix: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Labels:
    """The labels of the ipBlock identity of one prefix."""
    return Labels([Label(CIDR, str(prefix)), IPBLOCK_LABEL])


def is_ipblock_identity(labels: Labels) -> bool:
    lbl = labels.get(IPBLOCK_LABEL.key)
    return lbl is not None and lbl.source == RESERVED


class SelectorError(ValueError):
    """A selector that cannot be built; the message says why."""


def split_key(key: str, default_source: str = ANY) -> tuple[str, str]:
    """``"k8s:app"`` -> ``("k8s", "app")``; ``"app"`` -> ``(default_source, "app")``.

    Cilium also writes the source with a dot (``k8s.app``) internally; only the
    ``:`` form is accepted in policy YAML (as in Cilium).
    """
    src, sep, rest = key.partition(":")
    if sep and src in SOURCES:
        return src, rest
    return default_source, key


@dataclass(frozen=True, order=True)
class Requirement:
    """``source:key <op> values``; ``values`` sorted (empty for Exists/DoesNotExist)."""

    key: str
    source: str
    operator: str
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise SelectorError(f"operator {self.operator!r} is not one of {', '.join(OPERATORS)}")
        if self.source not in SOURCES:
            raise SelectorError(f"unknown label source {self.source!r}")
        if not self.key:
            raise SelectorError("key must not be empty")
        vals = tuple(sorted(set(self.values)))
        if self.operator in ("In", "NotIn") and not vals:
            raise SelectorError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and vals:
            raise SelectorError(f"operator {self.operator} takes no values")
        object.__setattr__(self, "values", vals)

    @property
    def full_key(self) -> str:
        return f"{self.source}:{self.key}"

    def present(self, labels: Labels) -> str | None:
        """The value of the matching label, or None when the key (with source) is absent."""
        lbl = labels.get(self.key)
        if lbl is None:
            return None
        if lbl.source == self.source or self.source == ANY or lbl.source == ANY:
            return lbl.value
        return None

    def matches(self, labels: Labels) -> bool:
        v = self.present(labels)
        op = self.operator
        if op == "In":
            return v is not None and v in self.values
        if op == "NotIn":
            return v is None or v not in self.values
        if op == "Exists":
            return v is not None
        return v is None


@dataclass(frozen=True)
class EndpointSelector:
    """AND of requirements; no requirements = wildcard (selects all identities)."""

    requirements: tuple[Requirement, ...] = ()
    _str: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        reqs = tuple(sorted(set(self.requirements)))
        object.__setattr__(self, "requirements", reqs)
        object.__setattr__(self, "_str", _render(reqs))

    # construction ----------------------------------------------------------

    @classmethod
    def from_labels(cls, labels: Mapping[str, str] | None = None, default_source: str = ANY) -> EndpointSelector:
        return cls.from_k8s(labels, None, default_source)

    @classmethod
    def from_k8s(
        cls,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Sequence[Mapping[str, object]] | None = None,
        default_source: str = ANY,
    ) -> EndpointSelector:
        """From ``matchLabels`` / ``matchExpressions`` (dicts with key, operator, values)."""
        reqs: list[Requirement] = []
        for k, v in (match_labels or {}).items():
            src, key = split_key(k, default_source)
            reqs.append(Requirement(key, src, "In", (v if v is not None else "",)))
        for e in match_expressions or ():
            src, key = split_key(str(e["key"]), default_source)
            values = e.get("values") or ()
            reqs.append(Requirement(key, src, str(e["operator"]), tuple(str(x) for x in values)))  # type: ignore[union-attr]
        return cls(tuple(reqs))

    def with_requirements(self, extra: Iterable[Requirement]) -> EndpointSelector:
        return EndpointSelector(self.requirements + tuple(extra))

    # queries ---------------------------------------------------------------

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def has_key(self, key: str, source: str | None = None) -> bool:
        """A requirement on ``key`` (and ``source`` if given)."""
        return any(r.key == key and (source is None or r.source == source) for r in self.requirements)

    def has_key_prefix(self, prefix: str) -> bool:
        return any(r.key.startswith(prefix) for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def get_match(self, key: str) -> tuple[str, ...] | None:
        for r in self.requirements:
            if r.key == key and r.operator == "In":
                return r.values
        return None

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements) and not is_ipblock_identity(labels)

    def __str__(self) -> str:
        return self._str

    def to_dict(self) -> dict[str, object]:
        return json.loads(self._str)


def _render(reqs: tuple[Requirement, ...]) -> str:
    ml: dict[str, str] = {}
    me: list[dict[str, object]] = []
    for r in reqs:
        if r.operator == "In" and len(r.values) == 1 and r.full_key not in ml:
            ml[r.full_key] = r.values[0]
        else:
            d: dict[str, object] = {"key": r.full_key, "operator": r.operator}
            if r.values:
                d["values"] = list(r.values)
            me.append(d)
    out: dict[str, object] = {}
    if ml:
        out["matchLabels"] = dict(sorted(ml.items()))
    if me:
        out["matchExpressions"] = me
    return json.dumps(out, separators=(",", ":"), sort_keys=False)


@lru_cache(maxsize=65536)
def cidr_of_key(key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(key.replace("-", ":"), strict=False)


@dataclass(frozen=True)
class CIDRSelector:
    """``cidr`` minus ``excepts``: selects CIDR identities by their ``cidr:`` label
    (``ipblock``: ipBlock identities instead, see the module doc)."""

    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    excepts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ipblock: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "excepts", tuple(sorted(set(self.excepts), key=lambda n: (n.version, n))))

    @property
    def is_wildcard(self) -> bool:
        return False

    def selects_prefix(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        if net.version != self.cidr.version or not net.subnet_of(self.cidr):  # type: ignore[arg-type]
            return False
        return not any(net.version == e.version and net.subnet_of(e) for e in self.excepts)  # type: ignore[arg-type]

    @property
    def prefixes(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Every prefix this selector names (its cidr and excepts)."""
        return (self.cidr, *self.excepts)

    def matches(self, labels: Labels) -> bool:
        if self.ipblock != is_ipblock_identity(labels):
            return False
        has_cidr = False
        for lbl in labels:
            if lbl.source == CIDR:
                has_cidr = True
                if self.selects_prefix(cidr_of_key(lbl.key)):
                    return True
        if not has_cidr and self.cidr.prefixlen == 0 and not self.ipblock:
            w = labels.get("world") or labels.get("world-ipv4" if self.cidr.version == 4 else "world-ipv6")
            return w is not None and w.source == RESERVED
        return False

    def __str__(self) -> str:
        s = f"{'ipblock' if self.ipblock else 'cidr'}:{self.cidr}"
        if self.excepts:
            s += " except " + ",".join(str(e) for e in self.excepts)
        return s


@dataclass(frozen=True)
class FQDNSelector:
    """A ``toFQDNs`` item (``matchName`` or ``matchPattern``): selects the identities
    labelled ``fqdn:<key>``, which the agent gives the IPs that the DNS proxy saw in
    answers for matching names (``pilus.fqdn``); ``key`` is the name or pattern in
    lower case without the trailing dot. A pattern's ``*`` is Cilium's
    (``pilus.fqdn.matchpattern``)."""

    key: str
    pattern: bool = False

    @classmethod
    def of(cls, match_name: str = "", match_pattern: str = "") -> FQDNSelector:
        raw = match_pattern or match_name
        key = raw.lower().rstrip(".") or raw
        return cls(key, bool(match_pattern) and "*" in key)

    @property
    def is_wildcard(self) -> bool:
        return False

    @property
    def label(self) -> Label:
        return Label(FQDN, self.key)

    def matches(self, labels: Labels) -> bool:
        lbl = labels.get(self.key)
        return lbl is not None and lbl.source == FQDN

    def matches_name(self, name: str) -> bool:
        """Whether a DNS name (any case, trailing dot or not) is one this selector names."""
        return _fqdn_regex(self.key).fullmatch(normalize(name)) is not None

    def __str__(self) -> str:
        return f"fqdn:{self.key}"


@lru_cache(maxsize=4096)
def _fqdn_regex(key: str) -> re.Pattern[str]:
    return compile_pattern(key)  # pilus.fqdn.matchpattern: the one place of the pattern semantics
