"""Policy resolution: rules + identities + endpoints -> per-endpoint policy map entries.

The engine keeps a selector cache (every distinct selector with the identities it
selects now), compiles each local endpoint's policy into *contributions*
(selector x direction x allow/deny x port keys) and expands them into map entries
``PolicyKey(identity, egress, proto, dport, prefix_len) -> PolicyEntry``, shaped as
Cilium's policy map (see ``docs/policy.md``). Adding or removing an identity only
touches the endpoints that use a selector whose selection changed, and only that
identity's entries (incremental); policy, label and named-port changes recompute
the affected endpoints.

The datapath contract (what :class:`EndpointPolicy` means):

* ``*_enforced`` false: the direction is not policed (allow all, no lookup).
* ``*_enforced`` true: look up ``(remote identity, dir, proto, dport)`` with the
  longest proto/port prefix, then the same with identity 0; a deny in either wins;
  otherwise any allow found allows; nothing found -> drop (reason 133, policy
  denied); deny -> drop (reason 181, policy deny).
* ``*_ipblock`` true (the direction's rules use a Kubernetes ``ipBlock``): also look
  up the identity of the longest ipBlock prefix covering the peer's address
  (:meth:`PolicyEngine.ipblock_identity`, the ``pilus_ipblock`` map) with its own
  longest proto/port prefix; a deny there also wins, an allow there also allows.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pilus.identity.labels import CIDR, K8S, LABEL_CLUSTER, LABEL_NAMESPACE, RESERVED, Label, LabelError, Labels
from pilus.identity.reserved import HOST
from pilus.policy.rule import PROTO_NUMBERS, PeerRule, Rule, ServiceSelector, port_range_prefixes
from pilus.policy.schema import PolicyDoc
from pilus.policy.selector import (
    CIDRSelector,
    EndpointSelector,
    Requirement,
    cidr_of_key,
    is_ipblock_identity,
)

__all__ = [
    "MODES",
    "DirectionTrace",
    "EndpointPolicy",
    "PolicyEngine",
    "PolicyEntry",
    "PolicyKey",
    "ServiceRef",
    "TraceResult",
    "key_covers",
]

MODES = ("default", "always", "never")
Selector = EndpointSelector | CIDRSelector
WILDCARD = EndpointSelector()

PROTO_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


@dataclass(frozen=True, order=True)
class PolicyKey:
    identity: int
    egress: bool
    proto: int
    dport: int
    prefix_len: int

    def __post_init__(self) -> None:
        if self.proto == 0 and (self.dport or self.prefix_len):
            raise ValueError("proto 0 (any) needs dport 0 and prefix_len 0")
        if not 0 <= self.prefix_len <= 16:
            raise ValueError("prefix_len must be 0-16")

    def covers_port(self, proto: int, dport: int) -> bool:
        if self.proto == 0:
            return True
        if self.proto != proto:
            return False
        shift = 16 - self.prefix_len
        return (dport >> shift) == (self.dport >> shift)

    @property
    def lpm_prefix_len(self) -> int:
        """proto+port prefix bits as in Cilium's entry (0..24)."""
        return 0 if self.proto == 0 else 8 + self.prefix_len

    def port_str(self) -> str:
        if self.proto == 0:
            return "ANY"
        p = PROTO_NAMES.get(self.proto, str(self.proto))
        if self.prefix_len == 0:
            return f"*/{p}"
        if self.prefix_len == 16:
            return f"{self.dport}/{p}"
        hi = self.dport | ((1 << (16 - self.prefix_len)) - 1)
        return f"{self.dport}-{hi}/{p}"


def key_covers(outer: PolicyKey, inner: PolicyKey) -> bool:
    """``outer`` matches every packet ``inner`` matches (same identity and direction assumed)."""
    if outer.proto == 0:
        return True
    if outer.proto != inner.proto or outer.prefix_len > inner.prefix_len:
        return False
    shift = 16 - outer.prefix_len
    return (outer.dport >> shift) == (inner.dport >> shift)


@dataclass(frozen=True)
class ServiceRef:
    """What ``toServices`` needs to know about one service (``PolicyEngine.set_services``).

    ``labels``: the service's metadata labels (``k8sServiceSelector`` matches them);
    ``selector``: its pod selector (backends = pods of the service's namespace with
    these ``k8s:`` labels), ``None``/empty for a service with explicit backends,
    whose ``backend_ips`` are then selected as CIDR ``/32`` identities.
    """

    labels: Mapping[str, str] = field(default_factory=dict)
    selector: Mapping[str, str] | None = None
    backend_ips: Sequence[ipaddress.IPv4Address] = ()

    def normalized(self) -> ServiceRef:
        return ServiceRef(
            {str(k): str(v) for k, v in (self.labels or {}).items()},
            {str(k): str(v) for k, v in self.selector.items()} if self.selector else None,
            tuple(sorted({ipaddress.IPv4Address(str(i)) for i in self.backend_ips or ()})),
        )


@dataclass(frozen=True)
class PolicyEntry:
    deny: bool
    proxy_port: int = 0
    rule: str = ""


@dataclass(frozen=True)
class EndpointPolicy:
    ingress_enforced: bool
    egress_enforced: bool
    entries: dict[PolicyKey, PolicyEntry]
    ingress_ipblock: bool = False
    egress_ipblock: bool = False

    def lookup(
        self, identity: int, egress: bool, proto: int, dport: int, ipblock_identity: int = 0
    ) -> tuple[str, PolicyKey | None]:
        """Reference datapath lookup: ("allow"|"deny"|"drop", matching key).
        ``ipblock_identity``: of the peer's address (0: no ipBlock prefix covers it)."""
        enforced = self.egress_enforced if egress else self.ingress_enforced
        if not enforced:
            return "allow", None
        verdict, key = self._lookup_identity(identity, egress, proto, dport)
        if verdict == "deny" or not ipblock_identity or not (self.egress_ipblock if egress else self.ingress_ipblock):
            return verdict, key
        c = self._best(ipblock_identity, egress, proto, dport)
        if c is not None and self.entries[c].deny:
            return "deny", c
        if verdict == "allow" or c is None:
            return verdict, key
        return "allow", c

    def _best(self, ident: int, egress: bool, proto: int, dport: int) -> PolicyKey | None:
        cand = None
        for k in self._candidates(ident, egress, proto, dport):
            if cand is None or k.lpm_prefix_len > cand.lpm_prefix_len:
                cand = k
        return cand

    def _lookup_identity(self, identity: int, egress: bool, proto: int, dport: int) -> tuple[str, PolicyKey | None]:
        a, b = self._best(identity, egress, proto, dport), self._best(0, egress, proto, dport)
        if a is not None and self.entries[a].deny:
            return "deny", a
        if b is not None and self.entries[b].deny:
            return "deny", b
        if a is None and b is None:
            return "drop", None
        if a is None or (b is not None and b.lpm_prefix_len > a.lpm_prefix_len):
            return "allow", b
        return "allow", a

    def _candidates(self, ident: int, egress: bool, proto: int, dport: int) -> Iterable[PolicyKey]:
        e = self.entries
        k0 = PolicyKey(ident, egress, 0, 0, 0)
        if k0 in e:
            yield k0
        for plen in range(0, 17):
            shift = 16 - plen
            k = PolicyKey(ident, egress, proto, (dport >> shift) << shift if plen else 0, plen)
            if k in e:
                yield k


# ---------------------------------------------------------------------------
# selector cache


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


def _service_labels(ref: ServiceRef) -> Labels:
    """A service's metadata labels as ``k8s:`` labels (invalid ones cannot be selected)."""
    out = []
    for k, v in ref.labels.items():
        try:
            out.append(Label(K8S, k, v))
        except LabelError:
            continue
    return Labels(out)


def _prefixes(labels: Labels) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [cidr_of_key(lbl.key) for lbl in labels if lbl.source == CIDR]


# ---------------------------------------------------------------------------
# compiled endpoint policy

L4Key = tuple[int, int, int]  # proto, dport, prefix_len


@dataclass(frozen=True)
class _Contrib:
    egress: bool
    deny: bool
    keys: tuple[L4Key, ...]
    origin: str
    l7: bool = False


@dataclass
class _Compiled:
    """What one endpoint's policy is made of (before expansion to identities)."""

    rules: list[Rule]
    ingress_enforced: bool
    egress_enforced: bool
    ingress_default_deny: bool
    egress_default_deny: bool
    # (selector or None for wildcard, peer rule, contribution) in rule order
    items: list[tuple[Selector | None, PeerRule, _Contrib]]
    static: dict[PolicyKey, PolicyEntry]
    uses_cluster_named_ports: bool = False
    # the direction's rules use a Kubernetes ipBlock (the datapath's second lookup)
    ingress_ipblock: bool = False
    egress_ipblock: bool = False
    # toServices items of the selected rules (a service change recomputes the endpoint)
    service_sels: set[ServiceSelector] = field(default_factory=set)


@dataclass
class _Ep:
    labels: Labels
    named_ports: dict[str, tuple[int, int]]
    dirty: bool = True
    comp: _Compiled | None = None
    by_sel: dict[Selector, list[_Contrib]] = field(default_factory=dict)
    entries: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    by_id: dict[int, set[PolicyKey]] = field(default_factory=dict)
    zero_denies: dict[bool, list[PolicyKey]] = field(default_factory=dict)
    last: EndpointPolicy | None = None
    changed: bool = True


def _endpoint_policy(comp: _Compiled, entries: dict[PolicyKey, PolicyEntry]) -> EndpointPolicy:
    return EndpointPolicy(
        comp.ingress_enforced, comp.egress_enforced, entries, comp.ingress_ipblock, comp.egress_ipblock
    )


def _merge(d: dict[PolicyKey, PolicyEntry], key: PolicyKey, entry: PolicyEntry) -> None:
    old = d.get(key)
    if old is None or (entry.deny and not old.deny):
        d[key] = entry


def _normalize(
    entries: dict[PolicyKey, PolicyEntry], keys: Iterable[PolicyKey], zero_denies: dict[bool, list[PolicyKey]]
) -> None:
    """Deny beats allow: drop allow entries covered by a deny of the same identity (or identity 0)."""
    keys = list(keys)
    denies: dict[bool, list[PolicyKey]] = {}
    for k in keys:
        if entries[k].deny:
            denies.setdefault(k.egress, []).append(k)
    if not denies and not zero_denies:
        return
    for k in keys:
        e = entries.get(k)
        if e is None or e.deny:
            continue
        ds = denies.get(k.egress, [])
        if k.identity != 0:
            ds = ds + zero_denies.get(k.egress, [])
        if any(key_covers(d, k) for d in ds):
            del entries[k]


# ---------------------------------------------------------------------------
# trace result


@dataclass
class DirectionTrace:
    direction: str
    evaluated: bool
    verdict: str  # "allowed" / "denied"
    reason: str
    rules_selected: list[str] = field(default_factory=list)
    allowed_by: list[str] = field(default_factory=list)
    denied_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TraceResult:
    lines: list[str]
    ingress: DirectionTrace
    egress: DirectionTrace
    verdict: str  # "ALLOWED" / "DENIED"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "ingress": self.ingress.to_dict(),
            "egress": self.egress.to_dict(),
            "lines": list(self.lines),
        }

    def __str__(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------


class PolicyEngine:
    def __init__(self, mode: str = "default", cluster: str = "default", *, allow_localhost: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"policy enforcement mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.cluster = cluster
        self.allow_localhost = allow_localhost
        self._rules: list[Rule] = []
        self._docs: list[PolicyDoc] = []
        self._cache = SelectorCache()
        self._eps: dict[int, _Ep] = {}
        self._cluster_named: dict[str, set[tuple[int, int]]] = {}
        self._services: dict[tuple[str, str], ServiceRef] = {}
        self._svc_labels: dict[tuple[str, str], Labels] = {}
        self._entity_cache: dict[str, tuple[Selector, ...]] = {}
        self.stats = {"full": 0, "incremental": 0}

    # inputs ----------------------------------------------------------------

    def set_policies(self, docs: list[PolicyDoc]) -> None:
        new_rules = [r for d in docs for r in d.rules]
        old, new = set(self._rules), set(new_rules)
        changed = old ^ new
        reordered = [r.origin for r in new_rules] != [r.origin for r in self._rules]
        self._docs = list(docs)
        self._rules = new_rules
        if not changed:
            if reordered:  # only which rule an entry is attributed to can change
                self._mark_all()
            return
        subjects = {r.subject for r in changed if r.subject is not None}
        for ep in self._eps.values():
            if not ep.dirty and any(s.matches(ep.labels) for s in subjects):
                ep.dirty = True

    def upsert_identity(self, id: int, labels: Labels) -> None:  # noqa: A002 - API name
        if id == 0:
            return  # identity 0 is the map's wildcard, never a peer
        changed = self._cache.upsert_identity(id, labels)
        self._apply_identity(id, changed)

    def remove_identity(self, id: int) -> None:  # noqa: A002
        changed = self._cache.remove_identity(id)
        self._apply_identity(id, changed)

    def upsert_endpoint(self, ep_id: int, labels: Labels, named_ports: Mapping[str, tuple[int, int]] = {}) -> None:  # noqa: B006
        ep = self._eps.get(ep_id)
        np_ = {k.lower(): (int(v[0]), int(v[1])) for k, v in named_ports.items()}
        if ep is None:
            self._eps[ep_id] = _Ep(labels, np_)
            return
        if ep.labels != labels or ep.named_ports != np_:
            ep.labels, ep.named_ports, ep.dirty = labels, np_, True

    def remove_endpoint(self, ep_id: int) -> None:
        ep = self._eps.pop(ep_id, None)
        if ep is not None and ep.comp is not None:
            for sel in ep.by_sel:
                self._cache.release(sel)

    def set_cluster_named_ports(self, ports: Mapping[str, set[tuple[int, int]]]) -> None:
        new = {k.lower(): {(int(p), int(q)) for p, q in v} for k, v in ports.items()}
        if new == self._cluster_named:
            return
        self._cluster_named = new
        for ep in self._eps.values():
            if ep.comp is not None and ep.comp.uses_cluster_named_ports:
                ep.dirty = True

    def set_services(self, services: Mapping[tuple[str, str], ServiceRef]) -> None:
        """The cluster's services, ``{(namespace, name): ServiceRef}`` (the full set).

        Endpoints whose rules have a ``toServices`` item matching a service that was
        added, removed or changed (before or after) are recomputed; others are not.
        """
        new = {(str(ns), str(name)): ref.normalized() for (ns, name), ref in services.items()}
        old = self._services
        if new == old:
            return
        changed: list[tuple[tuple[str, str], Labels]] = []
        for key in set(old) | set(new):
            if old.get(key) != new.get(key):
                for ref in (old.get(key), new.get(key)):
                    if ref is not None:
                        changed.append((key, _service_labels(ref)))
        self._services = new
        self._svc_labels = {k: _service_labels(v) for k, v in new.items()}
        for ep in self._eps.values():
            if ep.dirty or ep.comp is None or not ep.comp.service_sels:
                continue
            if any(ss.matches(k[0], k[1], lbls) for ss in ep.comp.service_sels for k, lbls in changed):
                ep.dirty = True

    def services(self) -> dict[tuple[str, str], ServiceRef]:
        return dict(self._services)

    # outputs ---------------------------------------------------------------

    def policy_for(self, ep_id: int) -> EndpointPolicy:
        ep = self._eps.get(ep_id)
        if ep is None:
            raise KeyError(f"endpoint {ep_id} is not known to the policy engine")
        if ep.dirty:
            self._recompute(ep)
        if ep.changed or ep.last is None:
            assert ep.comp is not None
            ep.last = _endpoint_policy(ep.comp, dict(ep.entries))
            ep.changed = False
        return ep.last

    def changed_endpoints(self) -> set[int]:
        out = set()
        for ep_id, ep in self._eps.items():
            if ep.dirty:
                self._recompute(ep)
            if ep.changed or ep.last is None:
                out.add(ep_id)
        return out

    def endpoints(self) -> list[int]:
        return sorted(self._eps)

    def cidr_prefixes(self) -> set[ipaddress.IPv4Network]:
        """Prefixes that need a CIDR identity in the ipcache (Cilium policies' CIDR
        rules, toServices backend IPs); ipBlocks are :meth:`ipblock_prefixes`."""
        out: set[ipaddress.IPv4Network] = set()
        for p in self._peers():
            for c in p.cidrs or ():
                if not c.ipblock:
                    out.update(n for n in c.prefixes if isinstance(n, ipaddress.IPv4Network) and n.prefixlen > 0)
            for ss in p.services or ():
                for _key, ref in self._matching_services(ss):
                    if not ref.selector:
                        out.update(ipaddress.IPv4Network(f"{ip}/32") for ip in ref.backend_ips)
        return out

    def ipblock_prefixes(self) -> set[ipaddress.IPv4Network]:
        """Every prefix a Kubernetes ipBlock names (cidr and except alike, /0 included):
        each needs an ipBlock identity (``ipblock_identity_labels``) and a ``pilus_ipblock`` entry."""
        return {n for p in self._peers() for c in p.cidrs or () if c.ipblock
                for n in c.prefixes if isinstance(n, ipaddress.IPv4Network)}

    def _peers(self):
        """Every peer rule of every policy rule, allow and deny, both directions."""
        for r in self._rules:
            for sec in (r.ingress, r.ingress_deny, r.egress, r.egress_deny):
                yield from sec

    def ipblock_identity(self, addr: ipaddress.IPv4Address) -> tuple[ipaddress.IPv4Network, int] | None:
        """The longest ipBlock prefix covering ``addr`` and its identity, as the
        datapath's ``pilus_ipblock`` lookup finds it; ``None`` if none covers it."""
        ids = self._cache.ipblock_ids
        if not ids:
            return None
        for plen in range(32, -1, -1):
            net = ipaddress.IPv4Network((int(addr) >> (32 - plen) << (32 - plen) if plen else 0, plen))
            if net in ids:
                return net, ids[net]
        return None

    def selectors(self) -> list[dict[str, Any]]:
        return sorted(
            (
                {"selector": str(sel), "identities": sorted(c.ids), "users": c.users}
                for sel, c in self._cache.sels.items()
            ),
            key=lambda d: d["selector"],
        )

    def identities(self) -> dict[int, Labels]:
        return dict(self._cache.identities)

    # compile ---------------------------------------------------------------

    def _entity_selectors(self, name: str) -> tuple[Selector, ...]:
        hit = self._entity_cache.get(name)
        if hit is not None:
            return hit

        def res(n: str) -> EndpointSelector:
            return EndpointSelector((Requirement(n, RESERVED, "Exists"),))

        if name == "all":
            out: tuple[Selector, ...] = (WILDCARD,)
        elif name == "none":
            out = ()
        elif name == "world":
            out = (res("world"), res("world-ipv4"))
        elif name == "cluster":
            out = tuple(
                res(n) for n in ("host", "remote-node", "init", "health", "unmanaged", "kube-apiserver", "ingress")
            ) + (EndpointSelector((Requirement(LABEL_CLUSTER, K8S, "In", (self.cluster,)),)),)
        else:
            out = (res(name),)
        self._entity_cache[name] = out
        return out

    def _matching_services(self, ss: ServiceSelector) -> list[tuple[tuple[str, str], ServiceRef]]:
        if ss.selector is None and ss.namespace:
            ref = self._services.get((ss.namespace, ss.name))
            return [] if ref is None else [((ss.namespace, ss.name), ref)]
        return [(k, ref) for k, ref in sorted(self._services.items()) if ss.matches(k[0], k[1], self._svc_labels[k])]

    def _service_selectors(self, ss: ServiceSelector, reqs: tuple[Requirement, ...]) -> list[Selector]:
        """The backends of the services ``ss`` matches: pods the service selects (its
        selector AND its namespace, plus toRequires), or its explicit backend IPs as /32s."""
        out: list[Selector] = []
        for (ns, _name), ref in self._matching_services(ss):
            if ref.selector:
                es = EndpointSelector(
                    tuple(Requirement(k, K8S, "In", (v,)) for k, v in ref.selector.items())
                    + (Requirement(LABEL_NAMESPACE, K8S, "In", (ns,)),)
                )
                out.append(es.with_requirements(reqs) if reqs else es)
            else:
                out.extend(CIDRSelector(ipaddress.IPv4Network(f"{ip}/32")) for ip in ref.backend_ips)
        return out

    def _peer_selectors(self, peer: PeerRule, reqs: tuple[Requirement, ...]) -> list[Selector | None]:
        """Selectors of a rule element; ``None`` = wildcard (identity 0 entries)."""
        if not peer.has_l3:
            return [None]
        out: list[Selector | None] = []
        for es in peer.endpoints or ():
            out.append(es.with_requirements(reqs) if reqs else es)
        for ent in peer.entities or ():
            out.extend(self._entity_selectors(ent))
        out.extend(peer.cidrs or ())
        for ss in peer.services or ():
            out.extend(self._service_selectors(ss, reqs))
        out = list(dict.fromkeys(out)) if peer.services else out
        return [None if isinstance(s, EndpointSelector) and s.is_wildcard else s for s in out]

    def _l4_keys(
        self, peer: PeerRule, egress: bool, named: Mapping[str, tuple[int, int]]
    ) -> tuple[tuple[L4Key, ...], bool, bool]:
        """(proto, dport, prefix_len) keys of a rule element; also (uses cluster named ports, has L7)."""
        if not peer.has_l4:
            return ((0, 0, 0),), False, False
        keys: list[L4Key] = []
        uses_cluster = False
        l7 = False
        for pr in peer.to_ports:
            l7 = l7 or bool(pr.l7)
            for pp in pr.ports:
                if pp.protocol == "_NONE":
                    continue
                want = PROTO_NUMBERS[pp.protocol]
                if pp.name:
                    if egress:
                        uses_cluster = True
                        cands = self._cluster_named.get(pp.name, set())
                    else:
                        c = named.get(pp.name)
                        cands = {c} if c else set()
                    for port, proto in sorted(cands):
                        if want in (0, proto) and 0 < port <= 65535:
                            keys.append((proto, port, 16))
                    continue
                protos = (6, 17) if want == 0 else (want,)
                if pp.port == 0:
                    keys.extend([(0, 0, 0)] if want == 0 else [(p, 0, 0) for p in protos])
                    continue
                for val, plen in port_range_prefixes(pp.port, pp.end_port or pp.port):
                    keys.extend((p, val, plen) for p in protos)
        for f in peer.icmps:
            keys.append((1 if f.family == "IPv4" else 58, f.type, 16))
        return tuple(dict.fromkeys(keys)), uses_cluster, l7

    def _compile(self, labels: Labels, named: Mapping[str, tuple[int, int]]) -> _Compiled:
        rules = [r for r in self._rules if r.subject is not None and r.subject.matches(labels)]
        enforced = {}
        dd = {}
        for eg in (False, True):
            has = any(r.has_egress if eg else r.has_ingress for r in rules)
            if self.mode == "never":
                enforced[eg], dd[eg] = False, False
            elif self.mode == "always":
                enforced[eg], dd[eg] = True, True
            else:
                enforced[eg] = has
                dd[eg] = any(r.default_deny_egress if eg else r.default_deny_ingress for r in rules)
        comp = _Compiled(rules, enforced[False], enforced[True], dd[False], dd[True], [], {})
        if self.mode == "never":
            return comp
        for eg in (False, True):
            if enforced[eg] and not dd[eg]:
                _merge(
                    comp.static,
                    PolicyKey(0, eg, 0, 0, 0),
                    PolicyEntry(False, 0, "enableDefaultDeny=false: default allow"),
                )
        if self.allow_localhost and enforced[False]:
            _merge(
                comp.static,
                PolicyKey(HOST, False, 0, 0, 0),
                PolicyEntry(False, 0, "allow-localhost: the host may reach local endpoints"),
            )
        for eg in (False, True):
            reqs: list[Requirement] = []
            for r in rules:
                allow, deny = r.sections(eg)
                for p in (*allow, *deny):
                    for s in p.requires:
                        reqs.extend(s.requirements)
            rq = tuple(reqs)
            for r in rules:
                allow, deny = r.sections(eg)
                for is_deny, sec in ((False, allow), (True, deny)):
                    kind = ("egress" if eg else "ingress") + ("Deny" if is_deny else "")
                    for p in sec:
                        if not p.has_l3 and not p.has_l4:
                            continue  # an empty element ({}) selects the endpoint but allows nothing
                        keys, uses_cluster, l7 = self._l4_keys(p, eg, named)
                        comp.uses_cluster_named_ports |= uses_cluster
                        if not keys:
                            continue
                        c = _Contrib(eg, is_deny, keys, f"{r.origin} ({kind})", l7)
                        comp.service_sels.update(p.services or ())
                        for sel in self._peer_selectors(p, rq):
                            comp.items.append((sel, p, c))
        for sel, _p, c in comp.items:
            if isinstance(sel, CIDRSelector) and sel.ipblock:
                if c.egress:
                    comp.egress_ipblock = True
                else:
                    comp.ingress_ipblock = True
        return comp

    # expand ----------------------------------------------------------------

    def _recompute(self, ep: _Ep) -> None:
        self.stats["full"] += 1
        comp = self._compile(ep.labels, ep.named_ports)
        by_sel: dict[Selector, list[_Contrib]] = {}
        entries: dict[PolicyKey, PolicyEntry] = dict(comp.static)
        for sel, _p, c in comp.items:
            if sel is None:
                e = PolicyEntry(c.deny, 0, c.origin)
                for proto, dport, plen in c.keys:
                    _merge(entries, PolicyKey(0, c.egress, proto, dport, plen), e)
            else:
                by_sel.setdefault(sel, []).append(c)
        cache = self._cache
        for sel in by_sel:
            cache.acquire(sel)
        if ep.comp is not None:
            for sel in ep.by_sel:
                cache.release(sel)
        for sel, contribs in by_sel.items():
            ids = cache.sels[sel].ids
            for c in contribs:
                e = PolicyEntry(c.deny, 0, c.origin)
                for ident in ids:
                    for proto, dport, plen in c.keys:
                        _merge(entries, PolicyKey(ident, c.egress, proto, dport, plen), e)
        by_id: dict[int, set[PolicyKey]] = {}
        for k in entries:
            by_id.setdefault(k.identity, set()).add(k)
        zero = {eg: [k for k in by_id.get(0, ()) if k.egress == eg and entries[k].deny] for eg in (False, True)}
        zero = {eg: v for eg, v in zero.items() if v}
        _normalize(entries, by_id.get(0, ()), {})
        for ident, keys in by_id.items():
            if ident:
                _normalize(entries, keys, zero)
        by_id = {}
        for k in entries:
            by_id.setdefault(k.identity, set()).add(k)
        ep.comp, ep.by_sel, ep.entries, ep.by_id, ep.zero_denies = comp, by_sel, entries, by_id, zero
        ep.dirty = False
        new = _endpoint_policy(comp, entries)
        ep.changed = ep.last is None or ep.last != new

    def _identity_entries(self, ep: _Ep, ident: int) -> dict[PolicyKey, PolicyEntry]:
        assert ep.comp is not None
        out: dict[PolicyKey, PolicyEntry] = {k: v for k, v in ep.comp.static.items() if k.identity == ident}
        for sel in self._cache.id_sels.get(ident, ()):
            for c in ep.by_sel.get(sel, ()):
                e = PolicyEntry(c.deny, 0, c.origin)
                for proto, dport, plen in c.keys:
                    _merge(out, PolicyKey(ident, c.egress, proto, dport, plen), e)
        _normalize(out, list(out), ep.zero_denies)
        return out

    def _apply_identity(self, ident: int, changed: set[Selector]) -> None:
        if not changed:
            return
        for ep in self._eps.values():
            if ep.dirty or ep.comp is None:
                continue
            if not any(s in ep.by_sel for s in changed):
                continue
            self.stats["incremental"] += 1
            new = self._identity_entries(ep, ident)
            old_keys = ep.by_id.get(ident, set())
            if len(new) == len(old_keys) and all(ep.entries.get(k) == v for k, v in new.items()):
                continue
            for k in old_keys:
                del ep.entries[k]
            ep.entries.update(new)
            if new:
                ep.by_id[ident] = set(new)
            else:
                ep.by_id.pop(ident, None)
            ep.changed = True

    def _mark_all(self) -> None:
        for ep in self._eps.values():
            ep.dirty = True

    # trace -----------------------------------------------------------------

    def trace(
        self,
        src_labels: Labels,
        dst_labels: Labels,
        dport: int,
        proto: int,
        src_is_local: bool = True,
        dst_is_local: bool = True,
        *,
        src_ip: ipaddress.IPv4Address | None = None,
        dst_ip: ipaddress.IPv4Address | None = None,
    ) -> TraceResult:
        """Explain a verdict; the addresses (when known) let ipBlock rules match."""
        from pilus.policy.trace import run_trace

        return run_trace(self, src_labels, dst_labels, dport, proto, src_is_local, dst_is_local, src_ip, dst_ip)

    def _named_ports_for(self, labels: Labels) -> Mapping[str, tuple[int, int]]:
        for ep in self._eps.values():
            if ep.labels == labels:
                return ep.named_ports
        return {}
