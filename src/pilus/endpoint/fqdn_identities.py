"""toFQDNs: the IPs the DNS proxy learned become local identities that FQDN selectors select.

Input: the DNS cache's names with their IPs (every endpoint's live entries and zombies,
``pilus.fqdn``), and the policies' FQDN selectors. Output: one local identity per IP
that some selector's names resolved to, labelled ``fqdn:<selector>`` for every selector
that names one of its names, plus ``cidr:<ip>/32`` and ``reserved:world`` (so CIDR
rules covering the address select it too); the ipcache maps the ``/32`` to it as an
FQDN claim (above policy CIDRs, below endpoints and nodes: an in-cluster address keeps
its identity, as for CIDR rules).

An IP keeps its number while it stays selected (a relabel when the set of selectors
changes), so policy maps change by the entries of that IP alone. Pure bookkeeping: the
caller (``PolicySync``, on its worker thread) feeds the engine and the ipcache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pilus.identity.labels import Label, Labels
from pilus.identity.reserved import LOCAL_IDENTITY_FLAG
from pilus.policy.selector import FQDNSelector

__all__ = ["FQDN_IDENTITY_BASE", "FQDNChange", "FQDNIdentities"]

#: FQDN identities are numbered apart from CIDR (LOCAL | 1 ..) and ipBlock (LOCAL | 1 << 23 ..) ones
FQDN_IDENTITY_BASE = LOCAL_IDENTITY_FLAG | 3 << 22
FQDN_IDENTITY_MAX = LOCAL_IDENTITY_FLAG | 0xFFFFFF


@dataclass
class FQDNChange:
    """What one recomputation changed: identities to (re)label and to drop, per IP."""

    upserts: dict[IPv4Address, tuple[int, Labels]] = field(default_factory=dict)
    removes: dict[IPv4Address, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.removes)


class FQDNIdentities:
    def __init__(self) -> None:
        self.by_ip: dict[IPv4Address, tuple[int, Labels]] = {}
        self.names: dict[str, frozenset[IPv4Address]] = {}
        self._next = FQDN_IDENTITY_BASE

    def set_names(self, names: Mapping[str, Iterable[str | IPv4Address]]) -> None:
        """The DNS cache's names (any case, trailing dot or not) and their IPv4 addresses."""
        out: dict[str, frozenset[IPv4Address]] = {}
        for name, ips in names.items():
            v4 = frozenset(a for a in (_v4(ip) for ip in ips) if a is not None)
            if v4:
                out[name.lower().rstrip(".") + "."] = v4
        self.names = out

    def refresh(self, selectors: Iterable[FQDNSelector]) -> FQDNChange:
        """Recompute every IP's labels for these selectors; returns what changed."""
        keys_by_ip: dict[IPv4Address, set[str]] = {}
        sels = sorted(set(selectors), key=str)
        for name, ips in self.names.items():
            keys = {s.key for s in sels if s.matches_name(name)}
            if keys:
                for ip in ips:
                    keys_by_ip.setdefault(ip, set()).update(keys)
        change = FQDNChange()
        for ip in [ip for ip in self.by_ip if ip not in keys_by_ip]:
            change.removes[ip] = self.by_ip.pop(ip)[0]
        used = {ident for ident, _ in self.by_ip.values()}
        for ip, keys in sorted(keys_by_ip.items()):
            labels = Labels([*(Label("fqdn", k) for k in sorted(keys)), Label("cidr", f"{ip}/32"),
                             Label("reserved", "world")])
            old = self.by_ip.get(ip)
            if old is not None and old[1] == labels:
                continue
            ident = old[0] if old is not None else self._allocate(used)
            used.add(ident)
            self.by_ip[ip] = (ident, labels)
            change.upserts[ip] = (ident, labels)
        return change

    def _allocate(self, used: set[int]) -> int:
        for _ in range(FQDN_IDENTITY_MAX - FQDN_IDENTITY_BASE + 1):
            ident = self._next
            self._next = ident + 1 if ident < FQDN_IDENTITY_MAX else FQDN_IDENTITY_BASE
            if ident not in used:
                return ident
        raise RuntimeError("no FQDN identity left (4194304 IPs selected by toFQDNs)")

    def identity_of(self, ip: str | IPv4Address) -> int | None:
        hit = self.by_ip.get(IPv4Address(str(ip)))
        return hit[0] if hit else None


def _v4(ip: str | IPv4Address) -> IPv4Address | None:
    try:
        return IPv4Address(str(ip))
    except ValueError:
        return None  # IPv6 answers: pilus is IPv4 only
