"""HTTP rules become redirects: the map entries they cover carry the proxy port of their
direction, a plain allow never bypasses them, and the proxy's rule sets say which
requests each peer may make (a plain allow there means every request, still visible)."""

from __future__ import annotations

from pilus_policy_testlib import Cluster
from test_policy_semantics import cnp, starwars

from pilus.policy import PolicyKey
from pilus.policy.mapstate import lookup

IN, EG = 15001, 15002
TCP = 6

L7 = cnp("rule1", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {org: empire}}]
  toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules:
      http:
      - {method: POST, path: "/v1/request-landing"}
""")


def cluster(policies: str) -> Cluster:
    c = starwars(policies)
    c.eng.set_proxy_ports("http", IN, EG)
    return c


def proxy_port(c: Cluster, dst: str, src: str, port: int, egress: bool = False) -> int:
    local, peer = (src, dst) if egress else (dst, src)
    pol = c.eng.policy_for(c.ids[local])
    v = lookup(pol.entries, c.resolve(peer), egress, TCP, port)
    assert v.allowed, (src, dst, port)
    return v.proxy_port


def test_http_rule_redirects_only_its_port_and_peers():
    c = cluster(L7)
    assert proxy_port(c, "deathstar", "tiefighter", 80) == IN
    assert c.verdict("xwing", "deathstar", 80) == "denied"  # L3/L4 still drops before any proxy
    assert c.verdict("tiefighter", "deathstar", 443) == "denied"
    sets = c.eng.proxy_rule_sets(c.ids["deathstar"])
    assert len(sets) == 1
    (s,) = sets
    assert (s["egress"], s["port"], s["end_port"]) == (False, 80, None)
    assert c.ids["tiefighter"] in s["peers"] and c.ids["xwing"] not in s["peers"]
    assert s["http"] == [{"method": "POST", "path": "/v1/request-landing"}]


def test_without_proxy_ports_the_rule_stays_l4():
    c = starwars(L7)
    assert proxy_port(c, "deathstar", "tiefighter", 80) == 0
    assert c.eng.proxy_rule_sets(c.ids["deathstar"]) == []


def test_plain_allow_for_the_same_identity_and_port_does_not_bypass():
    plain = cnp("plain", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {class: tiefighter}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    c = cluster(L7 + plain)
    assert proxy_port(c, "deathstar", "tiefighter", 80) == IN
    sets = c.eng.proxy_rule_sets(c.ids["deathstar"])
    allow_all = [s for s in sets if s["http"] == [{}]]
    assert len(allow_all) == 1 and allow_all[0]["peers"] == [c.ids["tiefighter"]]


def test_wildcard_http_rule_beats_an_identity_plain_allow():
    """An any-peer HTTP rule and a plain allow of one identity on the same port: the
    identity's entry would win the datapath lookup, so it takes the proxy port."""
    any_peer = cnp("any", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: GET}]}
""")
    plain = cnp("plain", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {class: xwing}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
""")
    c = cluster(any_peer + plain)
    pol = c.eng.policy_for(c.ids["deathstar"])
    assert pol.entries[PolicyKey(c.ids["xwing"], False, TCP, 80, 16)].proxy_port == IN
    assert proxy_port(c, "deathstar", "tiefighter", 80) == IN
    # an identity that appears later (incremental path) gets the same treatment
    c.pod("xwing2", org="alliance", **{"class": "xwing"})
    pol = c.eng.policy_for(c.ids["deathstar"])
    assert pol.entries[PolicyKey(c.ids["xwing2"], False, TCP, 80, 16)].proxy_port == IN


def test_l3_allow_covering_the_port_gives_allow_all_rules_there():
    l3 = cnp("l3", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {class: xwing}}]
""")
    c = cluster(L7 + l3)
    assert proxy_port(c, "deathstar", "xwing", 80) == 0  # only the empire's port 80 entries redirect
    assert proxy_port(c, "deathstar", "xwing", 22) == 0
    sets = c.eng.proxy_rule_sets(c.ids["deathstar"])
    assert any(s["http"] == [{}] and s["peers"] == [c.ids["xwing"]] and s["port"] == 80 for s in sets)


def test_egress_ranges_and_deny():
    eg = cnp("eg", """
endpointSelector: {matchLabels: {class: tiefighter}}
egress:
- toEndpoints: [{matchLabels: {class: deathstar}}]
  toPorts:
  - ports: [{port: "8000", endPort: 8003, protocol: TCP}]
    rules: {http: [{path: "/public/.*"}]}
egressDeny:
- toEndpoints: [{matchLabels: {class: deathstar}}]
  toPorts: [{ports: [{port: "8002", protocol: TCP}]}]
""")
    c = cluster(eg)
    assert proxy_port(c, "deathstar", "tiefighter", 8001, egress=True) == EG
    assert c.verdict("tiefighter", "deathstar", 8002) == "denied"
    sets = c.eng.proxy_rule_sets(c.ids["tiefighter"])
    assert sets and all(s["egress"] for s in sets)
    assert (sets[0]["port"], sets[0]["end_port"]) == (8000, 8003)


def test_set_proxy_ports_rewrites_entries():
    c = starwars(L7)
    assert proxy_port(c, "deathstar", "tiefighter", 80) == 0
    c.eng.set_proxy_ports("http", IN, EG)
    assert c.ids["deathstar"] in c.eng.changed_endpoints()
    assert proxy_port(c, "deathstar", "tiefighter", 80) == IN


def test_trace_names_the_http_rules():
    c = cluster(L7)
    r = c.eng.trace(c.labels[c.ids["tiefighter"]], c.labels[c.ids["deathstar"]], 80, TCP)
    assert r.verdict == "ALLOWED"
    assert r.ingress.http_rules == [{"method": "POST", "path": "/v1/request-landing"}]
    assert any("redirected to the HTTP proxy" in ln for ln in r.lines)
    assert any('"path":"/v1/request-landing"' in ln for ln in r.lines)
