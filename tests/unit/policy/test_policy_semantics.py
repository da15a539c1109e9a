# ruff: noqa: E501  (table rows of inline YAML read better on one line)
"""Truth tables for policy semantics: policies + pods + port/proto -> verdict.

Every verdict goes through the engine's map entries and an independent datapath-style
lookup (pilus_policy_testlib.dp_allows). Rows with a surprising outcome carry a comment.
"""

from __future__ import annotations

import pytest
from pilus_policy_testlib import Cluster

from pilus.identity.labels import Labels
from pilus.policy import PolicyKey


def cnp(name: str, body: str, ns: str = "default", kind: str = "CiliumNetworkPolicy") -> str:
    meta = f"{{name: {name}, namespace: {ns}}}" if kind != "CiliumClusterwideNetworkPolicy" else f"{{name: {name}}}"
    lines = "\n".join("  " + ln for ln in body.strip("\n").splitlines())
    return f"---\napiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\nspec:\n{lines}\n"


def knp(name: str, body: str, ns: str = "default") -> str:
    lines = "\n".join("  " + ln for ln in body.strip("\n").splitlines())
    return f"---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{lines}\n"


def starwars(policies: str, **kw) -> Cluster:
    c = Cluster(policies, ns_labels={"default": {"team": "a"}, "other": {"team": "b"}}, **kw)
    c.pod("deathstar", org="empire", **{"class": "deathstar"}, named_ports={"http": (8080, 6)})
    c.pod("tiefighter", org="empire", **{"class": "tiefighter"})
    c.pod("xwing", org="alliance", **{"class": "xwing"})
    c.pod("other-tie", ns="other", org="empire", **{"class": "tiefighter"})
    c.pod("other-ds", ns="other", org="empire", **{"class": "deathstar"})
    c.pod("dns", ns="kube-system", app="dns")
    c.pod("prod", env="prod", org="empire")
    return c


DS = "endpointSelector: {matchLabels: {class: deathstar}}\n"

L3L4 = cnp(
    "l3l4",
    DS
    + """
ingress:
- fromEndpoints: [{matchLabels: {org: empire}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
)
L3ONLY = cnp(
    "l3",
    DS
    + """
ingress:
- fromEndpoints: [{matchLabels: {org: empire}}]
""",
)
L4ONLY = cnp(
    "l4",
    DS
    + """
ingress:
- toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
)
EMPTY_ELEM = cnp("empty", DS + "ingress: [{}]\n")
EMPTY_LIST = cnp("emptylist", DS + "ingress: []\n")
ALLOW_XWING_443 = cnp(
    "xw443",
    DS
    + """
ingress:
- fromEndpoints: [{matchLabels: {org: alliance}}]
  toPorts: [{ports: [{port: "443"}]}]
""",
)
DENY_XWING_L3 = cnp(
    "denyxw",
    DS
    + """
ingressDeny:
- fromEndpoints: [{matchLabels: {org: alliance}}]
""",
)
ALLOW_ALL_80 = cnp(
    "all80",
    DS
    + """
ingress:
- fromEntities: [all]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
)
DENY_80_L4 = cnp(
    "deny80",
    DS
    + """
ingressDeny:
- toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""",
)
NO_DD_DENY_XWING = cnp(
    "nodd",
    DS
    + """
enableDefaultDeny: {ingress: false}
ingressDeny:
- fromEndpoints: [{matchLabels: {org: alliance}}]
""",
)
EGRESS_DNS = cnp(
    "egress-dns",
    "endpointSelector: {matchLabels: {class: xwing}}\n"
    + """
egress:
- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, app: dns}}]
  toPorts: [{ports: [{port: "53", protocol: UDP}]}]
""",
)

CASES = [
    # (policies, src, dst, port, proto, expected, note)
    ("", "xwing", "deathstar", 80, "TCP", "allowed", "no policy selects anything: allow all"),
    (L3L4, "tiefighter", "deathstar", 80, "TCP", "allowed", "L3+L4 allow"),
    (L3L4, "tiefighter", "deathstar", 81, "TCP", "denied", "port not listed"),
    (L3L4, "tiefighter", "deathstar", 80, "UDP", "denied", "protocol TCP only"),
    (L3L4, "xwing", "deathstar", 80, "TCP", "denied", "label not matched: default deny"),
    (L3L4, "other-tie", "deathstar", 80, "TCP", "denied", "CNP peers are limited to the policy namespace"),
    (L3L4, "xwing", "other-ds", 80, "TCP", "allowed", "CNP endpointSelector only selects its own namespace"),
    (
        L3L4,
        "deathstar",
        "tiefighter",
        80,
        "TCP",
        "allowed",
        "ingress policy of the deathstar does not police its egress",
    ),
    (L3L4, "world", "deathstar", 80, "TCP", "denied", ""),
    (L3ONLY, "tiefighter", "deathstar", 12345, "UDP", "allowed", "L3-only: every port and protocol"),
    (L3ONLY, "tiefighter", "deathstar", 8, "ICMP", "allowed", "L3-only covers ICMP too (proto 0 entry)"),
    (L4ONLY, "world", "deathstar", 80, "TCP", "allowed", "L4-only: any peer, even outside the cluster"),
    (L4ONLY, "xwing", "deathstar", 81, "TCP", "denied", ""),
    (EMPTY_ELEM, "tiefighter", "deathstar", 80, "TCP", "denied", "ingress: [{}] = default deny, allows nothing"),
    (EMPTY_ELEM, "host", "deathstar", 80, "TCP", "denied", "allow-localhost off in this table"),
    (EMPTY_LIST, "xwing", "deathstar", 80, "TCP", "allowed", "ingress: [] is 'no ingress rules': no default deny"),
    (L3L4 + ALLOW_XWING_443, "xwing", "deathstar", 443, "TCP", "allowed", "union across policies"),
    (L3L4 + ALLOW_XWING_443, "tiefighter", "deathstar", 80, "TCP", "allowed", "union across policies"),
    (L3L4 + ALLOW_XWING_443, "xwing", "deathstar", 80, "TCP", "denied", ""),
    (L3L4 + ALLOW_XWING_443, "tiefighter", "deathstar", 443, "TCP", "denied", ""),
    # deny beats allow, whatever the specificity
    (
        ALLOW_ALL_80 + DENY_XWING_L3,
        "xwing",
        "deathstar",
        80,
        "TCP",
        "denied",
        "an L3-only deny beats an L4 allow for that identity",
    ),
    (ALLOW_ALL_80 + DENY_XWING_L3, "tiefighter", "deathstar", 80, "TCP", "allowed", ""),
    (
        ALLOW_XWING_443 + DENY_XWING_L3,
        "xwing",
        "deathstar",
        443,
        "TCP",
        "denied",
        "L3-only deny beats L3+L4 allow (longer prefix) of the same identity",
    ),
    (L3ONLY + DENY_80_L4, "tiefighter", "deathstar", 80, "TCP", "denied", "L4-only deny beats L3-only allow"),
    (L3ONLY + DENY_80_L4, "tiefighter", "deathstar", 81, "TCP", "allowed", ""),
    # enableDefaultDeny: false
    (NO_DD_DENY_XWING, "tiefighter", "deathstar", 80, "TCP", "allowed", "no default deny: only the deny applies"),
    (NO_DD_DENY_XWING, "xwing", "deathstar", 80, "TCP", "denied", ""),
    (
        NO_DD_DENY_XWING + L3L4,
        "xwing",
        "deathstar",
        81,
        "TCP",
        "denied",
        "another rule selecting the endpoint asks for default deny: it wins",
    ),
    # egress
    (EGRESS_DNS, "xwing", "dns", 53, "UDP", "allowed", "namespace key in the selector crosses namespaces"),
    (EGRESS_DNS, "xwing", "dns", 53, "TCP", "denied", ""),
    (EGRESS_DNS, "xwing", "deathstar", 80, "TCP", "denied", "egress default deny"),
    (EGRESS_DNS, "xwing", "1.1.1.1", 443, "TCP", "denied", ""),
    (EGRESS_DNS, "tiefighter", "deathstar", 80, "TCP", "allowed", "tiefighter not selected"),
]


@pytest.mark.parametrize("policies,src,dst,port,proto,expected,note", CASES)
def test_cnp_truth_table(policies, src, dst, port, proto, expected, note):
    c = starwars(policies)
    assert c.verdict(src, dst, port, proto) == expected, note


def test_entry_shapes():
    c = starwars(L3L4 + L4ONLY + L3ONLY)
    pol = c.eng.policy_for(c.ids["deathstar"])
    tie = c.ids["tiefighter"]
    assert pol.ingress_enforced and not pol.egress_enforced
    assert PolicyKey(tie, False, 6, 80, 16) in pol.entries  # L3+L4
    assert PolicyKey(tie, False, 0, 0, 0) in pol.entries  # L3-only -> proto 0
    assert PolicyKey(0, False, 6, 80, 16) in pol.entries  # L4-only -> identity 0
    assert "CiliumNetworkPolicy default/l3l4" in pol.entries[PolicyKey(tie, False, 6, 80, 16)].rule


XWING_EGRESS_ALL = cnp("xw-eg", "endpointSelector: {matchLabels: {class: xwing}}\negress: [{toEntities: [all]}]\n")

MODES = [
    ("default", "", "allowed"),
    ("always", "", "denied"),  # always: default deny even without any rule
    ("never", L3L4 + DENY_XWING_L3, "allowed"),  # never: not even deny rules apply
    ("always", ALLOW_XWING_443, "denied"),  # always: the xwing's egress is default deny too
    ("always", ALLOW_XWING_443 + XWING_EGRESS_ALL, "allowed"),
    ("default", L3L4, "denied"),
]


@pytest.mark.parametrize("mode,policies,expected", MODES)
def test_enforcement_modes(mode, policies, expected):
    c = starwars(policies, mode=mode)
    assert c.verdict("xwing", "deathstar", 443, "TCP") == expected


def test_bad_mode():
    from pilus.policy import PolicyEngine

    with pytest.raises(ValueError, match="default, always, never"):
        PolicyEngine("audit")


def test_allow_localhost_default_on():
    # Cilium on Kubernetes (allow-localhost=auto -> always): the node may reach its pods
    # (kubelet probes) even under default deny; a deny rule for the host still wins.
    c = starwars(EMPTY_ELEM, allow_localhost=True)
    assert c.verdict("host", "deathstar", 80) == "allowed"
    assert c.verdict("remote-node", "deathstar", 80) == "denied"
    deny_host = cnp("denyhost", DS + "ingressDeny: [{fromEntities: [host]}]\n")
    c = starwars(EMPTY_ELEM + deny_host, allow_localhost=True)
    assert c.verdict("host", "deathstar", 80) == "denied"


SEL = [
    # matchExpressions operators and sources
    (
        "fromEndpoints: [{matchExpressions: [{key: org, operator: In, values: [empire, rebels]}]}]",
        "tiefighter",
        "allowed",
    ),
    ("fromEndpoints: [{matchExpressions: [{key: org, operator: NotIn, values: [empire]}]}]", "xwing", "allowed"),
    ("fromEndpoints: [{matchExpressions: [{key: org, operator: NotIn, values: [empire]}]}]", "tiefighter", "denied"),
    ("fromEndpoints: [{matchExpressions: [{key: env, operator: Exists}]}]", "prod", "allowed"),
    ("fromEndpoints: [{matchExpressions: [{key: env, operator: Exists}]}]", "tiefighter", "denied"),
    ("fromEndpoints: [{matchExpressions: [{key: env, operator: DoesNotExist}]}]", "tiefighter", "allowed"),
    # DoesNotExist: world has no env label but is not in the namespace -> not selected
    ("fromEndpoints: [{matchExpressions: [{key: env, operator: DoesNotExist}]}]", "world", "denied"),
    ("fromEndpoints: [{matchLabels: {k8s:org: empire}}]", "tiefighter", "allowed"),
    ("fromEndpoints: [{matchLabels: {any:org: empire}}]", "tiefighter", "allowed"),
    ("fromEndpoints: [{matchLabels: {container:org: empire}}]", "tiefighter", "denied"),  # wrong source
    ("fromEndpoints: [{}]", "xwing", "allowed"),  # empty selector = all of the namespace
    ("fromEndpoints: [{}]", "other-tie", "denied"),
    ("fromEndpoints: [{}]", "world", "denied"),
    ("fromEndpoints: []", "xwing", "denied"),  # explicitly empty list selects nothing (Cilium)
    ("fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: other}}]", "other-tie", "allowed"),
    # a namespace-labels key is a namespace selection: no same-namespace restriction (newer Cilium)
    ("fromEndpoints: [{matchLabels: {k8s:io.cilium.k8s.namespace.labels.team: b}}]", "other-tie", "allowed"),
    (
        "fromEndpoints: [{matchLabels: {io.cilium.k8s.policy.serviceaccount: default, org: alliance}}]",
        "xwing",
        "allowed",
    ),
    ("fromEndpoints: [{matchLabels: {reserved:host: ''}}]", "host", "allowed"),  # reserved key: no namespace added
    ("fromEndpoints: [{matchLabels: {org: empire}}, {matchLabels: {org: alliance}}]", "xwing", "allowed"),  # OR
    ("fromEndpoints: [{matchLabels: {org: empire, class: xwing}}]", "xwing", "denied"),  # AND
]


@pytest.mark.parametrize("peer,src,expected", SEL)
def test_selectors(peer, src, expected):
    c = starwars(cnp("p", DS + "ingress:\n- " + peer + "\n"))
    assert c.verdict(src, "deathstar", 80) == expected


def test_ccnp_across_namespaces():
    p = cnp(
        "cw", DS + "ingress:\n- fromEndpoints: [{matchLabels: {org: empire}}]\n", kind="CiliumClusterwideNetworkPolicy"
    )
    c = starwars(p)
    assert c.verdict("other-tie", "deathstar", 80) == "allowed"  # peers in every namespace
    assert c.verdict("tiefighter", "other-ds", 80) == "allowed"  # selects in every namespace
    assert c.verdict("xwing", "other-ds", 80) == "denied"
    p = cnp("cw", DS + "ingress:\n- fromEndpoints: [{}]\n", kind="CiliumClusterwideNetworkPolicy")
    c = starwars(p)
    assert c.verdict("other-tie", "deathstar", 80) == "allowed"
    # CCNP {} = every pod (namespace label exists), not the world nor the host
    assert c.verdict("world", "deathstar", 80) == "denied"
    assert c.verdict("host", "deathstar", 80) == "denied"


def test_from_requires():
    p = cnp(
        "req",
        DS
        + """
ingress:
- fromEndpoints: [{matchLabels: {org: empire}}]
""",
    ) + cnp(
        "req2",
        DS
        + """
ingress:
- fromRequires: [{matchLabels: {env: prod}}]
""",
    )
    c = starwars(p)
    assert c.verdict("prod", "deathstar", 80) == "allowed"
    # fromRequires of another rule is ANDed into this rule's fromEndpoints
    assert c.verdict("tiefighter", "deathstar", 80) == "denied"


ENT = [
    ("world", "world", "allowed"),
    ("world", "1.2.3.4", "allowed"),
    ("world", "tiefighter", "denied"),
    ("world", "host", "denied"),
    ("host", "host", "allowed"),
    ("host", "remote-node", "denied"),
    ("remote-node", "remote-node", "allowed"),
    # the kube-apiserver identity carries reserved:remote-node too
    ("remote-node", "kube-apiserver", "allowed"),
    ("kube-apiserver", "kube-apiserver", "allowed"),
    ("kube-apiserver", "remote-node", "denied"),
    ("cluster", "tiefighter", "allowed"),
    ("cluster", "other-tie", "allowed"),
    ("cluster", "host", "allowed"),
    ("cluster", "remote-node", "allowed"),
    ("cluster", "health", "allowed"),
    ("cluster", "world", "denied"),
    ("all", "world", "allowed"),
    ("all", "xwing", "allowed"),
    ("all", "other-tie", "allowed"),
    ("init", "init", "allowed"),
    ("health", "health", "allowed"),
    ("unmanaged", "unmanaged", "allowed"),
    ("ingress", "ingress", "allowed"),
    ("ingress", "world", "denied"),
    ("none", "world", "denied"),
    ("none", "tiefighter", "denied"),
]


@pytest.mark.parametrize("entity,src,expected", ENT)
def test_entities(entity, src, expected):
    c = starwars(cnp("e", DS + f"ingress:\n- fromEntities: [{entity}]\n"))
    assert c.verdict(src, "deathstar", 80) == expected


def test_entity_cluster_other_cluster_name():
    c = starwars(cnp("e", DS + "ingress:\n- fromEntities: [cluster]\n"), cluster="c1")
    c.pod("foreign", cluster="c2", org="x")  # a pod labelled with another cluster's name
    assert c.verdict("tiefighter", "deathstar", 80) == "allowed"
    assert c.verdict("foreign", "deathstar", 80) == "denied"


CIDR = [
    ("fromCIDR: [10.0.0.0/8]", "10.1.2.3", "allowed"),
    ("fromCIDR: [10.0.0.0/8]", "11.0.0.1", "denied"),
    ("fromCIDR: [10.0.0.0/8]", "tiefighter", "denied"),  # pods are matched by identity, never by CIDR
    ("fromCIDR: [10.1.2.3]", "10.1.2.3", "allowed"),  # a plain IP is a /32
    ("fromCIDR: [10.1.2.3]", "10.1.2.4", "denied"),
    ("fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]", "10.1.0.1", "allowed"),
    ("fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]", "10.96.0.1", "denied"),
    ("fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]", "10.111.255.255", "denied"),
    ("fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]", "10.112.0.1", "allowed"),
    ("fromCIDR: [0.0.0.0/0]", "world", "allowed"),  # /0 = the world identity + every CIDR identity
    ("fromCIDR: [0.0.0.0/0]", "host", "denied"),
    ("fromCIDRSet: [{cidr: 0.0.0.0/0, except: [192.168.0.0/16]}]", "8.8.8.8", "allowed"),
    ("fromCIDRSet: [{cidr: 0.0.0.0/0, except: [192.168.0.0/16]}]", "192.168.1.1", "denied"),
]


@pytest.mark.parametrize("peer,src,expected", CIDR)
def test_cidr(peer, src, expected):
    c = starwars(cnp("c", DS + "ingress:\n- " + peer + "\n"))
    assert c.verdict(src, "deathstar", 80) == expected


def test_cidr_nested_prefix_from_other_policy():
    # another policy references 10.96.0.0/11 (contains the except 10.96.0.0/12): an address in the
    # /11 but outside the /12 still matches the first rule; the /12 stays excluded (LPM in the ipcache)
    p = cnp("c", DS + "ingress:\n- fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n")
    p += cnp("c2", "endpointSelector: {matchLabels: {class: xwing}}\negress:\n- toCIDR: [10.96.0.0/11]\n")
    c = starwars(p)
    assert c.verdict("10.120.0.1", "deathstar", 80) == "allowed"
    assert c.verdict("10.96.0.1", "deathstar", 80) == "denied"
    assert c.eng.cidr_prefixes() >= {
        __import__("ipaddress").ip_network(n) for n in ("10.0.0.0/8", "10.96.0.0/12", "10.96.0.0/11")
    }


PORTS = [
    ('[{port: "8000", endPort: 8100, protocol: TCP}]', 8050, "TCP", "allowed"),
    ('[{port: "8000", endPort: 8100, protocol: TCP}]', 8000, "TCP", "allowed"),
    ('[{port: "8000", endPort: 8100, protocol: TCP}]', 8100, "TCP", "allowed"),
    ('[{port: "8000", endPort: 8100, protocol: TCP}]', 8101, "TCP", "denied"),
    ('[{port: "8000", endPort: 8100, protocol: TCP}]', 7999, "TCP", "denied"),
    ('[{port: "53", protocol: UDP}]', 53, "UDP", "allowed"),
    ('[{port: "53", protocol: UDP}]', 53, "TCP", "denied"),
    ('[{port: "53"}]', 53, "TCP", "allowed"),  # protocol omitted = ANY: TCP and UDP
    ('[{port: "53", protocol: ANY}]', 53, "UDP", "allowed"),
    ('[{port: "53", protocol: ANY}]', 53, "ICMP", "denied"),  # ANY with a port is TCP+UDP only
    ('[{port: "0", protocol: TCP}]', 31337, "TCP", "allowed"),  # port 0 = every port of the protocol
    ('[{port: "0", protocol: TCP}]', 31337, "UDP", "denied"),
    ('[{port: "0", protocol: ANY}]', 8, "ICMP", "allowed"),  # port 0 + ANY = proto 0 wildcard
    ("[{port: http}]", 8080, "TCP", "allowed"),  # named port of the selected endpoint
    ("[{port: http}]", 80, "TCP", "denied"),
    ("[{port: http, protocol: UDP}]", 8080, "TCP", "denied"),  # protocol must agree with the named port's
    ("[{port: nosuch}]", 8080, "TCP", "denied"),  # unknown name: nothing allowed
    ('[{port: "80", protocol: SCTP}]', 80, "TCP", "denied"),  # SCTP rule ignored (warning), not widened
]


@pytest.mark.parametrize("ports,port,proto,expected", PORTS)
def test_ports(ports, port, proto, expected):
    c = starwars(cnp("p", DS + f"ingress:\n- fromEndpoints: [{{}}]\n  toPorts: [{{ports: {ports}}}]\n"))
    assert c.verdict("tiefighter", "deathstar", port, proto) == expected


ICMP = [
    ("[{fields: [{type: 8, family: IPv4}]}]", 8, "ICMP", "allowed"),
    ("[{fields: [{type: EchoRequest}]}]", 8, "ICMP", "allowed"),
    ("[{fields: [{type: EchoRequest}]}]", 0, "ICMP", "denied"),
    ("[{fields: [{type: EchoRequest}]}]", 8, "TCP", "denied"),
    ("[{fields: [{type: TimeExceeded}, {type: DestinationUnreachable}]}]", 11, "ICMP", "allowed"),
    ("[{fields: [{type: TimeExceeded}, {type: DestinationUnreachable}]}]", 3, "ICMP", "allowed"),
]


@pytest.mark.parametrize("icmps,typ,proto,expected", ICMP)
def test_icmp(icmps, typ, proto, expected):
    c = starwars(cnp("i", DS + f"ingress:\n- fromEndpoints: [{{}}]\n  icmps: {icmps}\n"))
    assert c.verdict("tiefighter", "deathstar", typ, proto) == expected
    pol = c.eng.policy_for(c.ids["deathstar"])
    assert any(k.proto == 1 and k.prefix_len == 16 for k in pol.entries)


def test_egress_named_port_cluster_wide():
    p = cnp(
        "e",
        "endpointSelector: {matchLabels: {class: xwing}}\negress:\n- toEndpoints: [{}]\n  toPorts: [{ports: [{port: http}]}]\n",
    )
    c = starwars(p)
    assert c.verdict("xwing", "deathstar", 8080) == "denied"  # cluster map not known yet
    for i in c.local:
        c.eng.policy_for(i)
    assert c.eng.changed_endpoints() == set()
    c.eng.set_cluster_named_ports({"http": {(8080, 6)}})
    assert c.eng.changed_endpoints() == {c.ids["xwing"]}
    assert c.verdict("xwing", "deathstar", 8080) == "allowed"
    assert c.verdict("xwing", "deathstar", 80) == "denied"


# ---------------------------------------------------------------------------
# Kubernetes NetworkPolicy

DENY_ALL = knp("deny", "podSelector: {}\npolicyTypes: [Ingress]\n")
NP_ALLOW_ALL = knp("all", "podSelector: {matchLabels: {class: deathstar}}\ningress: [{}]\n")
NP_PODSEL = knp(
    "pods",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{podSelector: {matchLabels: {org: empire}}}]\n",
)
NP_NSSEL = knp(
    "ns",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: b}}}]\n",
)
NP_NSSEL_EMPTY = knp(
    "nse", "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{namespaceSelector: {}}]\n"
)
NP_AND = knp(
    "and",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: b}}, podSelector: {matchLabels: {class: deathstar}}}]\n",
)
NP_OR = knp(
    "or",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{namespaceSelector: {matchLabels: {team: b}}}, {podSelector: {matchLabels: {class: xwing}}}]\n",
)
NP_IPBLOCK = knp(
    "ip",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{ipBlock: {cidr: 172.16.0.0/12, except: [172.17.0.0/16]}}]\n",
)
NP_PORTS = knp(
    "ports",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- ports: [{port: 80}, {port: 9000, endPort: 9010, protocol: UDP}, {port: http}]\n",
)
NP_EGRESS = knp(
    "eg",
    "podSelector: {matchLabels: {class: xwing}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {class: deathstar}}}]\n  ports: [{port: 80}]\n",
)
NP_EGRESS_IMPLIED = knp(
    "eg2",
    "podSelector: {matchLabels: {class: xwing}}\negress:\n- to: [{podSelector: {matchLabels: {class: deathstar}}}]\n",
)
NP_EGRESS_IGNORED = knp(
    "eg3",
    "podSelector: {matchLabels: {class: xwing}}\npolicyTypes: [Ingress]\negress:\n- to: [{podSelector: {matchLabels: {class: deathstar}}}]\n",
)
NP_NS_NOTIN = knp(
    "notin",
    "podSelector: {matchLabels: {class: deathstar}}\ningress:\n- from: [{namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [a]}]}}]\n",
)

NP_CASES = [
    (DENY_ALL, "tiefighter", "deathstar", 80, "TCP", "denied", "policyTypes Ingress without rules: deny all"),
    (DENY_ALL, "deathstar", "tiefighter", 80, "TCP", "denied", "tiefighter also selected by podSelector {}"),
    (DENY_ALL, "deathstar", "other-tie", 80, "TCP", "allowed", "egress not in policyTypes; other namespace"),
    (DENY_ALL + NP_ALLOW_ALL, "world", "deathstar", 1234, "UDP", "allowed", "ingress [{}] allows all, even outside"),
    (NP_PODSEL, "tiefighter", "deathstar", 80, "TCP", "allowed", ""),
    (NP_PODSEL, "other-tie", "deathstar", 80, "TCP", "denied", "podSelector alone = policy namespace"),
    (NP_PODSEL, "tiefighter", "deathstar", 80, "UDP", "allowed", "no ports = all ports and protocols"),
    (NP_NSSEL, "other-tie", "deathstar", 80, "TCP", "allowed", "namespace labels"),
    (NP_NSSEL, "tiefighter", "deathstar", 80, "TCP", "denied", ""),
    (NP_NSSEL_EMPTY, "dns", "deathstar", 80, "TCP", "allowed", "empty namespaceSelector = every namespace"),
    (NP_NSSEL_EMPTY, "world", "deathstar", 80, "TCP", "denied", "... but pods only"),
    (NP_AND, "other-ds", "deathstar", 80, "TCP", "allowed", "podSelector AND namespaceSelector in one peer"),
    (NP_AND, "other-tie", "deathstar", 80, "TCP", "denied", ""),
    (NP_OR, "other-tie", "deathstar", 80, "TCP", "allowed", "two peers = OR"),
    (NP_OR, "xwing", "deathstar", 80, "TCP", "allowed", ""),
    (NP_OR, "tiefighter", "deathstar", 80, "TCP", "denied", ""),
    (NP_NS_NOTIN, "other-tie", "deathstar", 80, "TCP", "allowed", ""),
    (NP_NS_NOTIN, "world", "deathstar", 80, "TCP", "denied", "a namespaceSelector never selects non-pods"),
    (NP_IPBLOCK, "172.20.0.1", "deathstar", 80, "TCP", "allowed", ""),
    (NP_IPBLOCK, "172.17.0.1", "deathstar", 80, "TCP", "denied", "except"),
    (NP_PORTS, "world", "deathstar", 80, "TCP", "allowed", "ports without from: every source"),
    (NP_PORTS, "world", "deathstar", 80, "UDP", "denied", "protocol defaults to TCP"),
    (NP_PORTS, "xwing", "deathstar", 9005, "UDP", "allowed", "endPort"),
    (NP_PORTS, "xwing", "deathstar", 9011, "UDP", "denied", ""),
    (NP_PORTS, "xwing", "deathstar", 8080, "TCP", "allowed", "named port"),
    (NP_EGRESS, "xwing", "deathstar", 80, "TCP", "allowed", ""),
    (NP_EGRESS, "xwing", "deathstar", 81, "TCP", "denied", "egress default deny"),
    (NP_EGRESS, "xwing", "1.1.1.1", 80, "TCP", "denied", ""),
    (NP_EGRESS, "tiefighter", "xwing", 80, "TCP", "allowed", "Ingress not in policyTypes"),
    (NP_EGRESS_IMPLIED, "xwing", "tiefighter", 80, "TCP", "denied", "egress rules imply policyTypes Egress"),
    (NP_EGRESS_IMPLIED, "tiefighter", "xwing", 80, "TCP", "denied", "... and Ingress (always implied)"),
    (NP_EGRESS_IGNORED, "xwing", "tiefighter", 80, "TCP", "allowed", "egress rules ignored: not in policyTypes"),
    (NP_PODSEL + ALLOW_XWING_443, "xwing", "deathstar", 443, "TCP", "allowed", "union of NP and CNP"),
    (NP_PODSEL + DENY_XWING_L3 + NP_OR, "xwing", "deathstar", 80, "TCP", "denied", "CNP deny beats NP allow"),
]


@pytest.mark.parametrize("policies,src,dst,port,proto,expected,note", NP_CASES)
def test_knp_truth_table(policies, src, dst, port, proto, expected, note):
    c = starwars(policies)
    assert c.verdict(src, dst, port, proto) == expected, note


def test_trace_explains():
    c = starwars(L3L4 + DENY_XWING_L3)
    lbl = c.labels
    t = c.eng.trace(lbl[c.ids["xwing"]], lbl[c.ids["deathstar"]], 80, 6)
    assert t.verdict == "DENIED"
    assert "denied by ingressDeny in CiliumNetworkPolicy default/denyxw" in t.ingress.reason
    t = c.eng.trace(lbl[c.ids["tiefighter"]], lbl[c.ids["deathstar"]], 81, 6)
    assert t.verdict == "DENIED" and t.ingress.reason.startswith(
        "default deny: rules select the endpoint for ingress but none allows"
    )
    t = c.eng.trace(lbl[c.ids["tiefighter"]], lbl[c.ids["deathstar"]], 80, 6)
    assert t.verdict == "ALLOWED" and t.to_dict()["ingress"]["allowed_by"]
    assert any("Final verdict: ALLOWED" in ln for ln in t.lines)
    t = c.eng.trace(Labels.parse("reserved:world"), lbl[c.ids["deathstar"]], 80, 6, src_is_local=False)
    assert t.verdict == "DENIED" and not t.egress.evaluated


def test_trace_agrees_with_datapath():
    pol = L3L4 + ALLOW_XWING_443 + DENY_80_L4 + EGRESS_DNS + NP_OR + NP_EGRESS
    c = starwars(pol)
    names = ["deathstar", "tiefighter", "xwing", "other-tie", "other-ds", "dns", "prod"]
    for s in names:
        for d in names:
            for port, proto in ((80, "TCP"), (443, "TCP"), (53, "UDP"), (8080, "TCP")):
                t = c.eng.trace(c.labels[c.ids[s]], c.labels[c.ids[d]], port, {"TCP": 6, "UDP": 17}[proto])
                assert t.verdict.lower() == c.verdict(s, d, port, proto), (s, d, port, proto)
