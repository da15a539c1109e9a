"""The selector cache: every selector in use and the identities it selects now.

Identities are indexed by label (a new selector scans only candidate identities)
and CIDR identities by prefix, so thousands of `/32` rules cost one lookup each.
Adding or removing an identity returns the selectors whose selection changed,
which is what the engine's incremental update walks.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from pilus.identity.labels import CIDR, RESERVED, Labels
from pilus.policy.selector import CIDRSelector, EndpointSelector, FQDNSelector, cidr_of_key, is_ipblock_identity

__all__ = ["Selector", "SelectorCache"]

Selector = EndpointSelector | CIDRSelector | FQDNSelector


@dataclass
class _CachedSel:
    ids: set[int] = field(default_factory=set)
    users: int = 0


class SelectorCache:
    """Every selector in use and the identities it selects; indexed identities.

    CIDR identities and CIDR selectors are indexed by prefix, so thousands of
    `/32` rules cost one lookup each instead of every selector x every prefix:
    a selector's candidates are the identities whose prefix lies inside its CIDR
    (a range query per prefix length), and an identity's candidate selectors
    are those whose CIDR is one of its prefix's supernets.
    """

    def __init__(self) -> None:
        self.identities: dict[int, Labels] = {}
        self._by_kv: dict[str, dict[str, set[int]]] = {}
        self._world_ids: set[int] = set()  # reserved:world* identities without a cidr label
        self.ipblock_ids: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}  # prefix -> ipBlock identity
        # (version, prefix length) -> sorted [(network address as int, identity)]
        self._cidr_index: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.sels: dict[Selector, _CachedSel] = {}
        self.id_sels: dict[int, set[Selector]] = {}
        self._cidr_sels: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, set[Selector]] = {}
        self._label_sels: set[Selector] = set()  # every selector that is not a CIDRSelector

    # identities ------------------------------------------------------------

    def _index(self, id_: int, labels: Labels, add: bool) -> None:
        for lbl in labels:
            vals = self._by_kv.setdefault(lbl.key, {})
            s = vals.setdefault(lbl.value, set())
            if add:
                s.add(id_)
            else:
                s.discard(id_)
                if not s:
                    del vals[lbl.value]
                    if not vals:
                        del self._by_kv[lbl.key]
        prefixes = _prefixes(labels)
        if prefixes and is_ipblock_identity(labels):
            for net in prefixes:
                if add:
                    self.ipblock_ids[net] = id_
                elif self.ipblock_ids.get(net) == id_:
                    del self.ipblock_ids[net]
        for net in prefixes:
            bucket = self._cidr_index.setdefault((net.version, net.prefixlen), [])
            entry = (int(net.network_address), id_)
            pos = bisect.bisect_left(bucket, entry)
            if add and (pos == len(bucket) or bucket[pos] != entry):
                bucket.insert(pos, entry)
            elif not add and pos < len(bucket) and bucket[pos] == entry:
                del bucket[pos]
        if not prefixes and any(lbl.source == RESERVED and lbl.key.startswith("world") for lbl in labels):
            (self._world_ids.add if add else self._world_ids.discard)(id_)

    def _selectors_for(self, id_: int, labels: Labels) -> Iterable[Selector]:
        """Selectors that could select (or did select) this identity."""
        cands = set(self._label_sels) | self.id_sels.get(id_, set())
        prefixes = _prefixes(labels) or [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        for net in prefixes:
            for bits in range(net.prefixlen, -1, -1):
                cands |= self._cidr_sels.get(net.supernet(new_prefix=bits), set())
        return cands

    def upsert_identity(self, id_: int, labels: Labels) -> set[Selector]:
        """Store; return the selectors whose selection changed."""
        old = self.identities.get(id_)
        if old is not None:
            if old == labels:
                return set()
            self._index(id_, old, False)
        self.identities[id_] = labels
        self._index(id_, labels, True)
        changed: set[Selector] = set()
        mine = self.id_sels.setdefault(id_, set())
        for sel in self._selectors_for(id_, labels):
            c = self.sels[sel]
            m = sel.matches(labels)
            if m != (id_ in c.ids):
                changed.add(sel)
                if m:
                    c.ids.add(id_)
                    mine.add(sel)
                else:
                    c.ids.discard(id_)
                    mine.discard(sel)
        return changed

    def remove_identity(self, id_: int) -> set[Selector]:
        old = self.identities.pop(id_, None)
        if old is None:
            return set()
        self._index(id_, old, False)
        changed = self.id_sels.pop(id_, set())
        for sel in changed:
            self.sels[sel].ids.discard(id_)
        return changed

    # selectors -------------------------------------------------------------

    def _candidates(self, sel: Selector) -> Iterable[int]:
        if isinstance(sel, CIDRSelector):
            net = sel.cidr
            out = set(self._world_ids) if net.prefixlen == 0 else set()
            start, end = int(net.network_address), int(net.broadcast_address)
            for (version, plen), bucket in self._cidr_index.items():
                if version == net.version and plen >= net.prefixlen:
                    lo = bisect.bisect_left(bucket, (start, -1))
                    hi = bisect.bisect_right(bucket, (end, float("inf")))
                    out.update(i for _addr, i in bucket[lo:hi])
            return out
        if isinstance(sel, FQDNSelector):  # identities with a label of its key (any source)
            return set().union(*self._by_kv.get(sel.key, {}).values())
        best: set[int] | None = None
        for r in sel.requirements:
            if r.operator == "In":
                vals = self._by_kv.get(r.key, {})
                cand: set[int] = set().union(*(vals.get(v, set()) for v in r.values))
            elif r.operator == "Exists":
                cand = set().union(*self._by_kv.get(r.key, {}).values())
            else:
                continue
            if best is None or len(cand) < len(best):
                best = cand
        return self.identities.keys() if best is None else best

    def acquire(self, sel: Selector) -> _CachedSel:
        c = self.sels.get(sel)
        if c is None:
            c = _CachedSel()
            ids = self.identities
            for i in self._candidates(sel):
                if sel.matches(ids[i]):
                    c.ids.add(i)
                    self.id_sels.setdefault(i, set()).add(sel)
            self.sels[sel] = c
            if isinstance(sel, CIDRSelector):
                self._cidr_sels.setdefault(sel.cidr, set()).add(sel)
            else:
                self._label_sels.add(sel)
        c.users += 1
        return c

    def release(self, sel: Selector) -> None:
        c = self.sels.get(sel)
        if c is None:
            return
        c.users -= 1
        if c.users <= 0:
            del self.sels[sel]
            if isinstance(sel, CIDRSelector):
                group = self._cidr_sels.get(sel.cidr, set())
                group.discard(sel)
                if not group:
                    self._cidr_sels.pop(sel.cidr, None)
            else:
                self._label_sels.discard(sel)
            for i in c.ids:
                s = self.id_sels.get(i)
                if s is not None:
                    s.discard(sel)


def _prefixes(labels: Labels) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [cidr_of_key(lbl.key) for lbl in labels if lbl.source == CIDR]
