"""Policy resolution: rules + identities + endpoints -> per-endpoint policy map entries.

The engine keeps a selector cache (every distinct selector with the identities it
selects now), compiles each local endpoint's policy into *contributions*
(selector x direction x allow/deny x port keys) and expands them into map entries
``PolicyKey(identity, egress, proto, dport, prefix_len) -> PolicyEntry``, shaped as
Cilium's policy map (see ``docs/policy.md``). Adding or removing an identity only
touches the endpoints that use a selector whose selection changed, and only that
identity's entries (incremental); policy, label and named-port changes recompute
the affected endpoints.

The entries are normalised (``mapstate.normalize``: deny wins) and are exactly
what the endpoint's policy map holds; what the datapath decides with them is
``mapstate.lookup`` (the ipBlock identity of a peer's address:
:meth:`PolicyEngine.ipblock_identity`). The selector cache is ``selectorcache``,
the compiled form ``compiled``, the explanation ``trace``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pilus import protocols
from pilus.identity.labels import K8S, LABEL_CLUSTER, LABEL_NAMESPACE, RESERVED, Label, LabelError, Labels
from pilus.identity.reserved import HOST
from pilus.policy.compiled import PROXY_PARSERS, CompiledPolicy, Contribution, L4Key
from pilus.policy.l7 import L7Rules
from pilus.policy.mapstate import (
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    covers,
    merge_entry,
    normalize,
    port_range,
    redirect_wins,
)
from pilus.policy.rule import PeerRule, Rule, ServiceSelector, port_range_prefixes
from pilus.policy.schema import PolicyDoc
from pilus.policy.selector import CIDRSelector, EndpointSelector, FQDNSelector, Requirement
from pilus.policy.selectorcache import Selector, SelectorCache
from pilus.policy.trace import DirectionTrace, TraceResult, run_trace

__all__ = [
    "MODES",
    "DirectionTrace",
    "EndpointPolicy",
    "PolicyEngine",
    "PolicyEntry",
    "PolicyKey",
    "ServiceRef",
    "TraceResult",
]

MODES = ("default", "always", "never")
WILDCARD = EndpointSelector()


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



def _service_labels(ref: ServiceRef) -> Labels:
    """A service's metadata labels as ``k8s:`` labels (invalid ones cannot be selected)."""
    out = []
    for k, v in ref.labels.items():
        try:
            out.append(Label(K8S, k, v))
        except LabelError:
            continue
    return Labels(out)




@dataclass
class _Ep:
    labels: Labels
    named_ports: dict[str, tuple[int, int]]
    dirty: bool = True
    comp: CompiledPolicy | None = None
    by_sel: dict[Selector, list[Contribution]] = field(default_factory=dict)
    entries: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    by_id: dict[int, set[PolicyKey]] = field(default_factory=dict)
    last: EndpointPolicy | None = None
    changed: bool = True


def _endpoint_policy(comp: CompiledPolicy, entries: dict[PolicyKey, PolicyEntry]) -> EndpointPolicy:
    return EndpointPolicy(
        comp.ingress_enforced, comp.egress_enforced, entries, comp.ingress_ipblock, comp.egress_ipblock
    )


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
        #: each L7 parser's proxy ports (ingress, egress); 0: no proxy, its rules stay L4
        self._proxy_ports: dict[str, tuple[int, int]] = {p: (0, 0) for p in PROXY_PARSERS}
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

    def set_proxy_ports(self, parser: str, ingress: int, egress: int) -> None:
        """One parser's (http, kafka, dns) proxy listener ports: allow entries that its
        rules cover carry the direction's port, so the datapath redirects that traffic to
        the proxy (0: no proxy there, the rules stay L4)."""
        if parser not in PROXY_PARSERS:
            raise ValueError(f"proxy parser must be one of {', '.join(PROXY_PARSERS)}, got {parser!r}")
        if (ingress, egress) != self._proxy_ports[parser]:
            self._proxy_ports[parser] = (ingress, egress)
            self._mark_all()

    def proxy_port(self, parser: str, egress: bool) -> int:
        return self._proxy_ports.get(parser, (0, 0))[egress]

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

    def l7_rules(self, ep_id: int, key: PolicyKey) -> tuple[L7Rules, ...]:
        """The typed L7 rules of the allow rules behind one key of the endpoint's map
        (what the L7 proxy will enforce for traffic that key allows; () = plain L4)."""
        ep = self._eps.get(ep_id)
        if ep is None:
            raise KeyError(f"endpoint {ep_id} is not known to the policy engine")
        if ep.dirty:
            self._recompute(ep)
        assert ep.comp is not None
        l4 = (key.proto, key.dport, key.prefix_len)
        out: list[L7Rules] = []
        for sel, _p, c in ep.comp.items:
            if c.deny or c.egress != key.egress or not c.l7:
                continue
            if (key.identity != 0) if sel is None else key.identity not in self._cache.sels[sel].ids:
                continue
            out.extend(rules for k, rules in c.l7 if k == l4)
        return tuple(dict.fromkeys(out))

    def proxy_rule_sets(self, ep_id: int) -> list[dict[str, Any]]:
        """The proxies' rule sets for one endpoint (docs/l7.md, config ``rules``; the
        caller adds ``endpoint_ips``): ``egress`` and ``parser`` (http, kafka, dns) say
        which listener each is for, the parser's name holds its rules.

        One per (allow contribution, key with L7 rules whose proxy has a port): its peers
        and its rules. Besides, every other allow of the same direction whose keys cover
        that key gives its peers an allow-all set there: the redirect wins over a plain
        allow, which then means "every request, visible" (Cilium's wildcarded L7 rule)."""
        ep = self._eps.get(ep_id)
        if ep is None:
            raise KeyError(f"endpoint {ep_id} is not known to the policy engine")
        if ep.dirty:
            self._recompute(ep)
        assert ep.comp is not None
        items = [(sel, c) for sel, _p, c in ep.comp.items if not c.deny]
        l7_keys = {(c.egress, k): parser for _sel, c in items for k, parser in c.proxy_keys.items()
                   if self.proxy_port(parser, c.egress)}
        out: list[dict[str, Any]] = []
        for sel, c in items:
            peers = None if sel is None else sorted(self._cache.sels[sel].ids)
            for (egress, k), parser in sorted(l7_keys.items()):
                if egress != c.egress:
                    continue
                if c.proxy_keys.get(k) == parser:
                    rules = [r.to_dict() for kk, l7 in c.l7 if kk == k and l7.parser == parser
                             for r in getattr(l7, parser)]
                elif any(covers(PolicyKey(0, egress, *ck), PolicyKey(0, egress, *k)) for ck in c.keys):
                    rules = [{}]
                else:
                    continue
                lo, hi = port_range(k[1], k[2]) if k[0] and k[2] else (None, None)
                out.append({"egress": egress, "parser": parser, "endpoint": ep_id, "port": lo,
                            "end_port": hi if hi != lo else None, "proto": k[0], "peers": peers, parser: rules})
        return out

    def fqdn_selectors(self) -> set[FQDNSelector]:
        """Every toFQDNs selector of every rule: the names whose IPs need identities."""
        return {f for p in self._peers() for f in p.fqdns or ()}

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
        out.extend(peer.fqdns or ())
        for ss in peer.services or ():
            out.extend(self._service_selectors(ss, reqs))
        out = list(dict.fromkeys(out)) if peer.services else out
        return [None if isinstance(s, EndpointSelector) and s.is_wildcard else s for s in out]

    def _l4_keys(
        self, peer: PeerRule, egress: bool, named: Mapping[str, tuple[int, int]]
    ) -> tuple[tuple[L4Key, ...], bool, tuple[tuple[L4Key, L7Rules], ...]]:
        """(proto, dport, prefix_len) keys of a rule element; also whether it uses cluster
        named ports, and the L7 rules of the port rules behind each key."""
        if not peer.has_l4:
            return ((0, 0, 0),), False, ()
        keys: list[L4Key] = []
        uses_cluster = False
        l7: list[tuple[L4Key, L7Rules]] = []
        for pr in peer.to_ports:
            first = len(keys)
            for pp in pr.ports:
                if pp.protocol == "_NONE":
                    continue
                want = protocols.NUMBERS[pp.protocol]
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
            if pr.l7 is not None:
                l7.extend((k, pr.l7) for k in keys[first:])
        for f in peer.icmps:
            keys.append((protocols.ICMP if f.family == "IPv4" else protocols.ICMPV6, f.type, 16))
        return tuple(dict.fromkeys(keys)), uses_cluster, tuple(dict.fromkeys(l7))

    def compile_for(self, labels: Labels) -> CompiledPolicy:
        """The compiled policy of an endpoint with these labels (named ports of a known
        endpoint with the same labels); what ``policy trace`` evaluates."""
        named: Mapping[str, tuple[int, int]] = {}
        for ep in self._eps.values():
            if ep.labels == labels:
                named = ep.named_ports
                break
        return self._compile(labels, named)

    def rules(self) -> list[Rule]:
        return list(self._rules)

    def _compile(self, labels: Labels, named: Mapping[str, tuple[int, int]]) -> CompiledPolicy:
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
        comp = CompiledPolicy(rules, enforced[False], enforced[True], dd[False], dd[True], [], {})
        if self.mode == "never":
            return comp
        for eg in (False, True):
            if enforced[eg] and not dd[eg]:
                merge_entry(
                    comp.static,
                    PolicyKey(0, eg, 0, 0, 0),
                    PolicyEntry(False, 0, "enableDefaultDeny=false: default allow"),
                )
        if self.allow_localhost and enforced[False]:
            merge_entry(
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
                        c = Contribution(eg, is_deny, keys, f"{r.origin} ({kind})", l7)
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
        by_sel: dict[Selector, list[Contribution]] = {}
        entries: dict[PolicyKey, PolicyEntry] = dict(comp.static)
        for sel, _p, c in comp.items:
            if sel is None:
                for k in c.keys:
                    merge_entry(entries, PolicyKey(0, c.egress, *k), self._entry(c, k))
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
                for k in c.keys:
                    e = self._entry(c, k)
                    for ident in ids:
                        merge_entry(entries, PolicyKey(ident, c.egress, *k), e)
        entries = normalize(entries)
        by_id: dict[int, set[PolicyKey]] = {}
        for k in entries:
            by_id.setdefault(k.identity, set()).add(k)
        ep.comp, ep.by_sel, ep.entries, ep.by_id = comp, by_sel, entries, by_id
        ep.dirty = False
        new = _endpoint_policy(comp, entries)
        ep.changed = ep.last is None or ep.last != new

    def _identity_entries(self, ep: _Ep, ident: int) -> dict[PolicyKey, PolicyEntry]:
        assert ep.comp is not None
        out: dict[PolicyKey, PolicyEntry] = {k: v for k, v in ep.comp.static.items() if k.identity == ident}
        for sel in self._cache.id_sels.get(ident, ()):
            for c in ep.by_sel.get(sel, ()):
                for k in c.keys:
                    merge_entry(out, PolicyKey(ident, c.egress, *k), self._entry(c, k))
        out = normalize(out)  # deny wins within one identity: its entries alone decide
        redirect_wins(out, {k: ep.entries[k] for k in ep.by_id.get(0, ())})
        return out

    def _entry(self, c: Contribution, key: L4Key) -> PolicyEntry:
        """The map entry of one contribution under one of its keys: an allow that L7
        rules cover carries the direction's port of their proxy."""
        parser = c.proxy_keys.get(key)
        proxy = 0 if c.deny or parser is None else self.proxy_port(parser, c.egress)
        return PolicyEntry(c.deny, proxy, c.origin)

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
        return run_trace(self, src_labels, dst_labels, dport, proto, src_is_local, dst_is_local, src_ip, dst_ip)
