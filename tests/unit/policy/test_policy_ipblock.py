# ruff: noqa: E501  (table rows of inline YAML read better on one line)
"""Kubernetes NetworkPolicy ipBlock matches every address it covers, pods included
(the upstream NetworkPolicy e2e semantics), while Cilium's CIDR rules keep theirs.

Pods get addresses 10.1.2.10, .11, ... (pilus_policy_testlib.POD_NET); verdicts go
through the engine's entries and the independent two-lookup datapath model
(pilus_policy_testlib.dp_allows with the peer's ipBlock identity).
"""

from __future__ import annotations

import ipaddress

import pytest
from pilus_policy_testlib import Cluster
from test_policy_semantics import cnp, knp

from pilus.identity.labels import Labels
from pilus.policy import PolicyKey
from pilus.policy.selector import ipblock_identity_labels

CLIENT = "podSelector: {matchLabels: {app: client}}\npolicyTypes: [Egress]\n"
SERVER = "podSelector: {matchLabels: {app: server}}\npolicyTypes: [Ingress]\n"


def world() -> Cluster:
    c = Cluster(ns_labels={"default": {"team": "a"}})
    c.pod("client", app="client")  # 10.1.2.10
    c.pod("server", app="server")  # 10.1.2.11
    c.pod("other", app="other")  # 10.1.2.12
    c.mate("server-mate", "server")  # 10.1.2.13: the server's identity, another node
    return c


def scenario(policies: str) -> Cluster:
    c = world()
    c.set_policies(policies)
    return c


EGRESS_TO_SERVER = knp("to-server", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.11/32}}]\n")
EGRESS_EXCEPT = knp("except", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.0/24, except: [10.1.2.11/32]}}]\n")
EGRESS_EXCEPT_EQUAL = knp("equal", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.11/32, except: [10.1.2.11/32]}}]\n")
# upstream "an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed": one policy
# excepts the server from a block, another allows exactly the server
EGRESS_OVERLAP = EGRESS_EXCEPT + knp("overlap", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.11/32}}]\n")
# an except larger than another ipBlock's cidr
EGRESS_BIG_EXCEPT = knp(
    "big-except", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.2.0/24]}}, {ipBlock: {cidr: 10.1.2.12/32}}]\n"
)
EGRESS_PORTS = knp("ports", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.11/32}}]\n  ports: [{port: 80}]\n")
INGRESS_FROM_BLOCK = knp("from-block", SERVER + "ingress:\n- from: [{ipBlock: {cidr: 10.1.2.12/30, except: [10.1.2.12/32]}}]\n")
INGRESS_ALL = knp("from-all", SERVER + "ingress:\n- from: [{ipBlock: {cidr: 0.0.0.0/0}}]\n")
CNP_TO_CIDR = cnp("cidr", "endpointSelector: {matchLabels: {app: client}}\negress:\n- toCIDR: [10.1.2.0/24]\n")
CNP_DENY_SERVER = cnp(
    "deny", "endpointSelector: {matchLabels: {app: client}}\negressDeny:\n- toEndpoints: [{matchLabels: {app: server}}]\n  toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"
)
CNP_WORLD = cnp("world", "endpointSelector: {matchLabels: {app: client}}\negress:\n- toEntities: [world]\n")

CASES = [
    # (policies, src, dst, port, expected, note)
    (EGRESS_TO_SERVER, "client", "server", 80, "allowed", "ipBlock /32 of a pod's address"),
    (EGRESS_TO_SERVER, "client", "server-mate", 80, "denied", "same identity, other address: not covered"),
    (EGRESS_TO_SERVER, "client", "other", 80, "denied", ""),
    (EGRESS_TO_SERVER, "client", "8.8.8.8", 80, "denied", ""),
    (EGRESS_EXCEPT, "client", "server", 80, "denied", "carved out by except"),
    (EGRESS_EXCEPT, "client", "other", 80, "allowed", "the rest of the block"),
    (EGRESS_EXCEPT, "client", "server-mate", 80, "allowed", "the server's identity-mate is not excepted"),
    (EGRESS_EXCEPT_EQUAL, "client", "server", 80, "denied", "except equal to cidr: nothing left"),
    (EGRESS_OVERLAP, "client", "server", 80, "allowed", "excepted by one ipBlock, allowed by another"),
    (EGRESS_OVERLAP, "client", "other", 80, "allowed", ""),
    (EGRESS_BIG_EXCEPT, "client", "other", 80, "allowed", "inside the larger except, but its own /32 is allowed"),
    (EGRESS_BIG_EXCEPT, "client", "server", 80, "denied", "inside the except"),
    (EGRESS_BIG_EXCEPT, "client", "10.9.9.9", 80, "allowed", "outside address in the block"),
    (EGRESS_PORTS, "client", "server", 80, "allowed", "ipBlock with ports"),
    (EGRESS_PORTS, "client", "server", 81, "denied", ""),
    (INGRESS_FROM_BLOCK, "server-mate", "server", 80, "allowed", "ingress from a block covering a pod (10.1.2.13)"),
    (INGRESS_FROM_BLOCK, "other", "server", 80, "denied", "other (10.1.2.12) is excepted"),
    (INGRESS_FROM_BLOCK, "client", "server", 80, "denied", "client (10.1.2.10) is outside the /30"),
    (INGRESS_ALL, "client", "server", 80, "allowed", "0.0.0.0/0 covers pods too"),
    (INGRESS_ALL, "8.8.8.8", "server", 80, "allowed", "... and the world"),
    (CNP_TO_CIDR, "client", "server", 80, "denied", "Cilium toCIDR never selects a pod"),
    (CNP_TO_CIDR, "client", "10.1.2.99", 80, "allowed", "... an outside address in it, yes"),
    (CNP_TO_CIDR + EGRESS_TO_SERVER, "client", "other", 80, "denied", "a CNP CIDR does not use the ipBlock lookup"),
    (CNP_DENY_SERVER + EGRESS_TO_SERVER, "client", "server", 80, "denied", "deny of the pod's identity beats the ipBlock allow"),
    (CNP_DENY_SERVER + EGRESS_TO_SERVER, "client", "server", 443, "allowed", "the deny is on port 80 only"),
    (CNP_WORLD + EGRESS_TO_SERVER, "client", "server-mate", 80, "denied", "toEntities world never selects an ipBlock identity"),
]


@pytest.mark.parametrize("policies,src,dst,port,expected,note", CASES)
def test_ipblock_truth_table(policies, src, dst, port, expected, note):
    c = scenario(policies)
    assert c.verdict(src, dst, port) == expected, note


@pytest.mark.parametrize("policies,src,dst,port,expected,note", CASES)
def test_trace_agrees_with_the_two_lookups(policies, src, dst, port, expected, note):
    c = scenario(policies)
    src_local, dst_local = src in c.ids and src not in c.mates, dst in c.ids and dst not in c.mates
    t = c.eng.trace(
        c.labels[c.resolve(src)], c.labels[c.resolve(dst)], port, 6, src_is_local=src_local,
        dst_is_local=dst_local, src_ip=c.ips.get(src) or ipaddress.ip_address(src),
        dst_ip=c.ips.get(dst) or ipaddress.ip_address(dst),
    )
    assert t.verdict.lower() == expected, (note, t.lines)


def test_flags_only_where_an_ipblock_is_used():
    c = scenario(EGRESS_TO_SERVER + INGRESS_FROM_BLOCK + CNP_TO_CIDR)
    client, server, other = (c.eng.policy_for(c.ids[n]) for n in ("client", "server", "other"))
    assert (client.egress_ipblock, client.ingress_ipblock) == (True, False)
    assert (server.egress_ipblock, server.ingress_ipblock) == (False, True)
    assert (other.egress_ipblock, other.ingress_ipblock) == (False, False)
    only_cidr = scenario(CNP_TO_CIDR).eng.policy_for(c.ids["client"])
    assert not only_cidr.egress_ipblock  # Cilium CIDR rules: no second lookup


def test_prefixes_split_between_ipcache_and_ipblock():
    c = scenario(EGRESS_EXCEPT + INGRESS_ALL + CNP_TO_CIDR)
    net = ipaddress.ip_network
    assert c.eng.cidr_prefixes() == {net("10.1.2.0/24")}  # the ipcache: Cilium's CIDR rules only
    assert c.eng.ipblock_prefixes() == {net("10.1.2.0/24"), net("10.1.2.11/32"), net("0.0.0.0/0")}
    found = c.eng.ipblock_identity(ipaddress.ip_address("10.1.2.11"))
    assert found == (net("10.1.2.11/32"), c.ipblock_ids[net("10.1.2.11/32")])
    assert c.eng.ipblock_identity(ipaddress.ip_address("10.1.2.12"))[0] == net("10.1.2.0/24")
    assert c.eng.ipblock_identity(ipaddress.ip_address("8.8.8.8"))[0] == net("0.0.0.0/0")


def test_entries_are_keyed_by_the_ipblock_identity():
    c = scenario(EGRESS_EXCEPT)
    entries = c.eng.policy_for(c.ids["client"]).entries
    block = c.ipblock_ids[ipaddress.ip_network("10.1.2.0/24")]
    allowed = {k for k, v in entries.items() if k.egress and not v.deny}
    assert allowed == {PolicyKey(block, True, 0, 0, 0)}  # the except's identity gets nothing
    assert "NetworkPolicy default/except" in entries[PolicyKey(block, True, 0, 0, 0)].rule


def test_only_ipblock_selectors_select_ipblock_identities():
    c = scenario(EGRESS_TO_SERVER + CNP_TO_CIDR + CNP_WORLD)
    ib = c.ipblock_ids[ipaddress.ip_network("10.1.2.11/32")]
    for ep in c.local:
        c.eng.policy_for(ep)
    by_sel = {row["selector"]: set(row["identities"]) for row in c.eng.selectors()}
    assert by_sel["ipblock:10.1.2.11/32"] == {ib}
    assert all(ib not in ids for sel, ids in by_sel.items() if sel != "ipblock:10.1.2.11/32")
    assert ipblock_identity_labels(ipaddress.ip_network("10.1.2.11/32")) == Labels.parse(
        "cidr:10.1.2.11/32,reserved:ipblock"
    )


def test_trace_explains_the_covering_prefix():
    c = scenario(EGRESS_TO_SERVER)
    ib = c.ipblock_ids[ipaddress.ip_network("10.1.2.11/32")]
    lbl = c.labels
    t = c.eng.trace(lbl[c.ids["client"]], lbl[c.ids["server"]], 80, 6, src_ip=c.ips["client"], dst_ip=c.ips["server"])
    assert t.verdict == "ALLOWED"
    assert t.egress.reason == (
        f"10.1.2.11 is covered by ipBlock prefix 10.1.2.11/32 (identity {ib}): "
        "allowed by NetworkPolicy default/to-server (egress)"
    )
    t = c.eng.trace(lbl[c.ids["client"]], lbl[c.ids["server"]], 80, 6, dst_ip=c.ips["server-mate"])
    assert t.verdict == "DENIED" and "    10.1.2.13 is not covered by any ipBlock prefix" in t.lines
    t = c.eng.trace(lbl[c.ids["client"]], lbl[c.ids["server"]], 80, 6)
    assert t.verdict == "DENIED" and any("address is not known" in ln for ln in t.lines)


def test_removing_the_policy_clears_the_second_lookup():
    c = scenario(EGRESS_TO_SERVER)
    assert c.eng.policy_for(c.ids["client"]).egress_ipblock
    c.set_policies("")
    pol = c.eng.policy_for(c.ids["client"])
    assert not pol.egress_ipblock and not pol.egress_enforced and c.eng.ipblock_prefixes() == set()


def test_bad_ipblock_names_the_field():
    from pilus.policy import PolicyValidationError, parse_policies

    bad = knp("bad", CLIENT + "egress:\n- to: [{ipBlock: {cidr: 10.1.2.0/24, except: [10.1.3.0/24]}}]\n")
    with pytest.raises(PolicyValidationError, match=r"spec\.egress\[0\]\.to\[0\]\.ipBlock\.except\[0\]: 10\.1\.3\.0/24 is not inside cidr"):
        parse_policies(EGRESS_EXCEPT + bad)  # the whole import fails


def test_ipv6_ipblock_warns_that_it_cannot_match():
    from pilus.policy import parse_policies

    (doc,) = parse_policies(knp("v6", CLIENT + "egress:\n- to: [{ipBlock: {cidr: '2001:db8::/64'}}]\n"))
    assert doc.warnings == ["spec.egress[0].to[0].ipBlock: IPv6 prefix 2001:db8::/64 cannot match on this IPv4-only datapath"]
