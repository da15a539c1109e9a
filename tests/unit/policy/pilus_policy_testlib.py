"""Test helpers for policy tests: a small cluster of identities and endpoints, and a
datapath-style lookup written independently of the engine (remote identity lookup,
identity-0 lookup, deny wins, longest proto/port prefix, nothing -> drop; for
endpoints whose policy uses an ipBlock also the ipBlock identity of the peer's
address, where a deny also wins and an allow also allows)."""

from __future__ import annotations

import ipaddress

from pilus.identity.labels import Label, Labels, endpoint_labels
from pilus.identity.reserved import RESERVED_IDENTITIES
from pilus.policy import PolicyEngine, parse_policies
from pilus.policy.selector import ipblock_identity_labels

PROTOS = {"TCP": 6, "UDP": 17, "ICMP": 1, "SCTP": 132}


POD_NET = ipaddress.ip_network("10.1.2.0/24")  # pod i gets 10.1.2.(10 + i)


def dp_allows(pol, ident: int, egress: bool, proto: int, dport: int, ipblock_ident: int = 0) -> bool:
    """What the BPF program will do with an EndpointPolicy (independent re-implementation)."""
    enforced = pol.egress_enforced if egress else pol.ingress_enforced
    if not enforced:
        return True

    def plen(k) -> int:
        return 0 if k.proto == 0 else 8 + k.prefix_len

    def match(k) -> bool:
        if k.proto == 0:
            return True
        if k.proto != proto:
            return False
        mask = (0xFFFF << (16 - k.prefix_len)) & 0xFFFF
        return (k.dport & mask) == (dport & mask)

    def best(i):
        c = [k for k in pol.entries if k.identity == i and k.egress == egress and match(k)]
        return max(c, key=plen) if c else None

    a, b = best(ident), best(0)
    c = best(ipblock_ident) if ipblock_ident and (pol.egress_ipblock if egress else pol.ingress_ipblock) else None
    if any(x is not None and pol.entries[x].deny for x in (a, b, c)):
        return False
    return a is not None or b is not None or c is not None


class Cluster:
    """Pods (local endpoints, identity = endpoint id), reserved identities, CIDR identities."""

    def __init__(
        self,
        yaml_text: str = "",
        mode: str = "default",
        cluster: str = "default",
        allow_localhost: bool = False,
        ns_labels: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.eng = PolicyEngine(mode, cluster, allow_localhost=allow_localhost)
        self.cluster = cluster
        self.ns_labels = ns_labels or {}
        self.ids: dict[str, int] = {}
        self.labels: dict[int, Labels] = {}
        self.local: set[int] = set()
        self.named: dict[int, dict[str, tuple[int, int]]] = {}
        self.cidr_ids: dict[ipaddress.IPv4Network, int] = {}
        self.ipblock_ids: dict[ipaddress.IPv4Network, int] = {}
        self.ips: dict[str, ipaddress.IPv4Address] = {}  # pod name -> address
        self.mates: set[str] = set()  # pods that are not local endpoints (see mate())
        self.next_id = 256
        for r in RESERVED_IDENTITIES:
            if r.id:
                self.eng.upsert_identity(r.id, r.labels)
                self.ids[r.name] = r.id
                self.labels[r.id] = r.labels
        if yaml_text:
            self.set_policies(yaml_text)

    def set_policies(self, yaml_text: str) -> None:
        self.eng.set_policies(parse_policies(yaml_text) if yaml_text.strip() else [])
        for pfx in self.eng.cidr_prefixes():
            if pfx not in self.cidr_ids:
                i = (1 << 24) | (len(self.cidr_ids) + 1)
                self.cidr_ids[pfx] = i
                lbls = Labels([Label("cidr", str(pfx)), Label("reserved", "world")])
                self.labels[i] = lbls
                self.eng.upsert_identity(i, lbls)
        for pfx in self.eng.ipblock_prefixes():
            if pfx not in self.ipblock_ids:
                i = (1 << 24) | 0x8000 | (len(self.ipblock_ids) + 1)
                self.ipblock_ids[pfx] = i
                self.labels[i] = ipblock_identity_labels(pfx)
                self.eng.upsert_identity(i, self.labels[i])

    def pod(
        self,
        name: str,
        ns: str = "default",
        named_ports=None,
        sa: str = "default",
        cluster: str | None = None,
        **labels: str,
    ) -> int:
        lbls = endpoint_labels(
            ns, labels, sa, cluster or self.cluster, {"kubernetes.io/metadata.name": ns, **self.ns_labels.get(ns, {})}
        )
        i = self.next_id
        self.next_id += 1
        self.ids[name] = i
        self.ips[name] = POD_NET[10 + len(self.ips)]
        self.labels[i] = lbls
        self.local.add(i)
        self.named[i] = dict(named_ports or {})
        self.eng.upsert_identity(i, lbls)
        self.eng.upsert_endpoint(i, lbls, self.named[i])
        return i

    def mate(self, name: str, of: str) -> None:
        """A pod elsewhere with the same identity as pod ``of`` but its own address."""
        self.ids[name] = self.ids[of]
        self.ips[name] = POD_NET[10 + len(self.ips)]
        self.mates.add(name)

    def ipblock_of(self, who: str) -> int:
        """The ipBlock identity of the longest ipBlock prefix covering ``who``'s address, 0 if none."""
        addr = self.ips.get(who)
        if addr is None and who not in self.ids:
            addr = ipaddress.ip_address(who)
        if addr is None:
            return 0
        hits = [(p.prefixlen, i) for p, i in self.ipblock_ids.items() if addr in p]
        return max(hits)[1] if hits else 0

    def resolve(self, who: str) -> int:
        if who in self.ids:
            return self.ids[who]
        ip = ipaddress.ip_address(who)  # an outside address: ipcache longest prefix, else world
        best = None
        for pfx, i in self.cidr_ids.items():
            if ip in pfx and (best is None or pfx.prefixlen > best[0].prefixlen):
                best = (pfx, i)
        return best[1] if best else self.ids["world"]

    def verdict(self, src: str, dst: str, port: int, proto: str = "TCP") -> str:
        s, d = self.resolve(src), self.resolve(dst)
        p = PROTOS[proto]
        ok = True
        if s in self.local and src not in self.mates:
            ok &= dp_allows(self.eng.policy_for(s), d, True, p, port, self.ipblock_of(dst))
        if d in self.local and dst not in self.mates:
            ok &= dp_allows(self.eng.policy_for(d), s, False, p, port, self.ipblock_of(src))
        return "allowed" if ok else "denied"
