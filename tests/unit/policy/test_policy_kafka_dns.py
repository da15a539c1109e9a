"""Kafka and DNS rules become redirects to their own proxies (one port per parser and
direction, as Cilium's listeners), and toFQDNs selects the identities the agent gives
the IPs of answers (``FQDNIdentities``): labelled ``fqdn:<selector>`` plus the address's
CIDR label, relabelled in place when another selector starts naming the IP."""

from __future__ import annotations

from ipaddress import IPv4Address

from pilus_policy_testlib import Cluster
from test_policy_semantics import cnp, starwars

from pilus.endpoint.fqdn_identities import FQDN_IDENTITY_BASE, FQDNIdentities
from pilus.policy.mapstate import lookup

TCP, UDP = 6, 17
HTTP_IN, HTTP_EG, KAFKA_IN, KAFKA_EG, DNS = 15001, 15002, 15003, 15004, 15053

KAFKA = cnp("kafka", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {class: tiefighter}}]
  toPorts:
  - ports: [{port: "9092", protocol: TCP}]
    rules:
      kafka:
      - {role: produce, topic: deathstar-plans}
- fromEndpoints: [{matchLabels: {org: empire}}]
  toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
""")

DNS_RULES = cnp("dns", """
endpointSelector: {matchLabels: {class: xwing}}
egress:
- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, app: dns}}]
  toPorts:
  - ports: [{port: "53", protocol: ANY}]
    rules:
      dns: [{matchPattern: "*.cilium.io"}, {matchName: "api.github.com"}]
- toFQDNs: [{matchName: api.github.com}, {matchPattern: "*.cilium.io"}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
""")


def cluster(policies: str) -> Cluster:
    c = starwars(policies)
    c.eng.set_proxy_ports("http", HTTP_IN, HTTP_EG)
    c.eng.set_proxy_ports("kafka", KAFKA_IN, KAFKA_EG)
    c.eng.set_proxy_ports("dns", 0, DNS)
    return c


def entry(c: Cluster, local: str, peer_identity: int, egress: bool, proto: int, port: int):
    return lookup(c.eng.policy_for(c.ids[local]).entries, peer_identity, egress, proto, port)


def test_kafka_rules_redirect_to_the_kafka_listener():
    c = cluster(KAFKA)
    assert entry(c, "deathstar", c.resolve("tiefighter"), False, TCP, 9092).proxy_port == KAFKA_IN
    # prod (org empire) has only the plain allow of another identity-specific rule: plain L4,
    # as for HTTP (docs/l7.md); only a covering any-peer L7 allow takes an identity's plain allow
    assert entry(c, "deathstar", c.resolve("prod"), False, TCP, 9092).proxy_port == 0
    assert c.verdict("xwing", "deathstar", 9092) == "denied"
    sets = c.eng.proxy_rule_sets(c.ids["deathstar"])
    assert {s["parser"] for s in sets} == {"kafka"}
    by_rules = {str(s["kafka"]): s for s in sets}
    produce = by_rules[str([{"role": "produce", "topic": "deathstar-plans"}])]
    assert c.ids["tiefighter"] in produce["peers"] and c.ids["prod"] not in produce["peers"]
    # tiefighter is org empire too: the plain allow gives it every request besides the rule
    assert c.ids["tiefighter"] in by_rules[str([{}])]["peers"]


def test_an_any_port_under_kafka_rules_redirects_tcp_only():
    c = cluster(cnp("kafka-any", """
endpointSelector: {matchLabels: {class: deathstar}}
ingress:
- fromEndpoints: [{matchLabels: {class: tiefighter}}]
  toPorts:
  - ports: [{port: "9092", protocol: ANY}]
    rules:
      kafka: [{role: produce, topic: deathstar-plans}]
"""))
    tie = c.resolve("tiefighter")
    assert entry(c, "deathstar", tie, False, TCP, 9092).proxy_port == KAFKA_IN
    udp = entry(c, "deathstar", tie, False, UDP, 9092)
    assert udp.allowed and udp.proxy_port == 0  # no Kafka over UDP: a plain allow, never a dead redirect


def test_dns_rules_redirect_udp_and_tcp_53_to_the_dns_proxy_egress_only():
    c = cluster(DNS_RULES)
    dns_pod = c.resolve("dns")
    assert entry(c, "xwing", dns_pod, True, UDP, 53).proxy_port == DNS
    assert entry(c, "xwing", dns_pod, True, TCP, 53).proxy_port == DNS
    sets = [s for s in c.eng.proxy_rule_sets(c.ids["xwing"]) if s["parser"] == "dns"]
    assert sets and all(s["peers"] == [dns_pod] and s["port"] == 53 for s in sets)
    assert sets[0]["dns"] == [{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}]
    r = c.eng.trace(c.labels[c.ids["xwing"]], c.labels[c.ids["dns"]], 53, UDP)  # the trace names the DNS proxy
    assert r.egress.l7_parser == "dns" and {"matchName": "api.github.com"} in r.egress.l7_rules


def test_without_a_dns_proxy_port_dns_rules_stay_l4():
    c = starwars(DNS_RULES)
    assert entry(c, "xwing", c.resolve("dns"), True, UDP, 53).proxy_port == 0
    assert c.eng.proxy_rule_sets(c.ids["xwing"]) == []


def test_tofqdns_selects_the_identities_of_learned_ips_only():
    c = cluster(DNS_RULES)
    assert {str(s) for s in c.eng.fqdn_selectors()} == {"fqdn:api.github.com", "fqdn:*.cilium.io"}
    fq = FQDNIdentities()
    fq.set_names({"API.github.com.": ["192.0.2.10"], "docs.cilium.io": ["192.0.2.20"],
                  "a.b.cilium.io": ["192.0.2.30"], "example.com": ["192.0.2.40"]})
    change = fq.refresh(c.eng.fqdn_selectors())
    assert set(change.upserts) == {IPv4Address("192.0.2.10"), IPv4Address("192.0.2.20")}  # one label deep
    for ident, labels in change.upserts.values():
        assert ident >= FQDN_IDENTITY_BASE
        c.eng.upsert_identity(ident, labels)
    github = fq.identity_of("192.0.2.10")
    assert {str(lbl) for lbl in change.upserts[IPv4Address("192.0.2.10")][1]} == {
        "fqdn:api.github.com", "cidr:192.0.2.10/32", "reserved:world"}
    assert entry(c, "xwing", github, True, TCP, 443).allowed
    assert not entry(c, "xwing", github, True, TCP, 80).allowed
    assert not entry(c, "xwing", 2, True, TCP, 443).allowed  # world (an IP nobody resolved)
    assert c.eng.selectors() and any(s["selector"] == "fqdn:api.github.com" and s["identities"] == [github]
                                     for s in c.eng.selectors())
    # a second name for the same IP: relabelled, same number; the IP's names gone: removed
    fq.set_names({"api.github.com": ["192.0.2.10"], "x.cilium.io": ["192.0.2.10"]})
    change = fq.refresh(c.eng.fqdn_selectors())
    assert change.upserts[IPv4Address("192.0.2.10")][0] == github
    assert set(change.removes) == {IPv4Address("192.0.2.20")}
    fq.set_names({})
    assert set(fq.refresh(c.eng.fqdn_selectors()).removes) == {IPv4Address("192.0.2.10")}
