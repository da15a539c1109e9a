"""Per-endpoint L3/L4 policy on crafted packets (BPF_PROG_TEST_RUN).

Endpoints A (id 5, identity 1000) and B (id 6, identity 1001) from lxc_env;
C (id 7, identity 1007) sits on ifindex 1 (loopback stands for its lxc) so
that both programs can run for it. Maps are seeded through dp.endpoints /
dp.ipcache / dp.policy like the agent does.
"""

from __future__ import annotations

import time
import uuid
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from lxc_env import EP_A, EP_B, EP_C, NODE_IP, POD_CIDR, ROUTER_IP, enforce, key
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    DatapathError,
    DropEvent,
    PolicyEntry,
    PolicyKey,
    PolicyVerdictEvent,
    TraceEvent,
    remove_pins,
)
from pilus.datapath.policy import match_type
from pilus.datapath.testrun import run_skb
from pilus.observer.format import event_record
from pilus.policy import mapstate

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
ING, EGR = ENDPOINT_F_POLICY_INGRESS, ENDPOINT_F_POLICY_EGRESS
TCP_, UDP_, ICMP_ = 6, 17, 1
HOST, WORLD = 1, 2
ALLOW, DENY = PolicyEntry(deny=False), PolicyEntry(deny=True)


def mirror(dp, ep_id, identity, egress, proto, port, ipblock_identity=0):
    """The Python mirror of the datapath lookup over what the map really holds."""
    v = mapstate.lookup(dp.policy.state(ep_id), identity, egress, proto, port, ipblock_identity)
    return {"action": v.action, "match_type": match_type(v)}

def from_ep(dp, ep, pkt):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=ep.ifindex)


def to_c(dp, pkt):
    return run_skb(dp.prog_fd("cil_to_container"), raw(pkt), ifindex=1)


def tcp(src, dst, dport, flags="S", sport=40000):
    return (
        Ether(src=src.mac, dst=src.host_mac)
        / IP(src=str(src.ipv4), dst=str(dst))
        / TCP(sport=sport, dport=dport, flags=flags)
    )


def tcp_in(saddr, dport, flags="S", sport=40000, dst=EP_C):
    return (
        Ether(src=dst.host_mac, dst=dst.mac)
        / IP(src=str(saddr), dst=str(dst.ipv4))
        / TCP(sport=sport, dport=dport, flags=flags)
    )


def verdicts(evs):
    return [event_record(e) for e in evs if isinstance(e, PolicyVerdictEvent)]


def drops(evs):
    return [event_record(e) for e in evs if isinstance(e, DropEvent)]


def metric(dp, reason, direction):
    return dp.metrics.get(reason, direction)[0]


def ct_ports(dp, dport):
    return [c for c in dp.ct.items() if c["dport"] == dport]


@pytest.fixture
def c_ep(dp):
    dp.endpoints.upsert(EP_C)
    dp.ipcache.upsert(IPv4Network(f"{EP_C.ipv4}/32"), EP_C.identity)
    return EP_C


# ---------------------------------------------------------------- egress


def test_l3_only_allow(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True): ALLOW})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 5432, sport=40001)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, "1.1.1.1", 80)).retval == TC_ACT_SHOT
    v = verdicts(events.poll())
    assert [(x["action"], x["match_type"], x["remote_identity"], x["dport"]) for x in v] == [
        ("allow", "L3-Only", EP_B.identity, 80),
        ("allow", "L3-Only", EP_B.identity, 5432),
        ("deny", "none", WORLD, 80),
    ]
    assert {x["direction"] for x in v} == {"egress"}
    assert {x["source_ep"] for x in v} == {a.ep_id}


def test_l3_l4_allow_on_port(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): ALLOW})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 81)).retval == TC_ACT_SHOT
    udp = Ether() / IP(src=str(a.ipv4), dst=str(EP_B.ipv4)) / UDP(sport=1, dport=80)
    assert from_ep(dp, a, udp).retval == TC_ACT_SHOT
    v = verdicts(events.poll())
    assert [(x["action"], x["match_type"], x["proto"], x["dport"]) for x in v] == [
        ("allow", "L3-L4", "TCP", 80),
        ("deny", "none", "TCP", 81),
        ("deny", "none", "UDP", 80),
    ]


def test_port_range_via_prefixes(dp, events):
    a = enforce(dp, EP_A, EGR)
    # 8000-8003 is one /14 port prefix
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 8000, 14): ALLOW})
    for port in (8000, 8001, 8002, 8003):
        assert from_ep(dp, a, tcp(a, EP_B.ipv4, port)).retval == TC_ACT_REDIRECT, port
    for port in (7999, 8004):
        assert from_ep(dp, a, tcp(a, EP_B.ipv4, port)).retval == TC_ACT_SHOT, port
    (row,) = dp.policy.items(a.ep_id)
    assert row["port"] == "8000-8003/TCP" and row["prefix_len"] == 14
    assert row["packets"] == 4
    assert {x["match_type"] for x in verdicts(events.poll()) if x["action"] == "allow"} == {"L3-L4"}


def test_l4_only_any_identity(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(0, True, TCP_, 443): ALLOW, key(0, True, UDP_): ALLOW})
    assert from_ep(dp, a, tcp(a, "1.1.1.1", 443)).retval == TC_ACT_OK
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 443)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 444)).retval == TC_ACT_SHOT
    udp = a_udp(a, "8.8.8.8", 53)
    assert from_ep(dp, a, udp).retval == TC_ACT_OK
    v = verdicts(events.poll())
    assert [(x["action"], x["match_type"], x["remote_identity"]) for x in v] == [
        ("allow", "L4-Only", WORLD),
        ("allow", "L4-Only", EP_B.identity),
        ("deny", "none", EP_B.identity),
        ("allow", "Proto-Only", WORLD),
    ]


def a_udp(src, dst, dport, sport=5353):
    return Ether() / IP(src=str(src.ipv4), dst=str(dst)) / UDP(sport=sport, dport=dport)


def test_match_types_all_and_l3_proto(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(0, True): ALLOW, key(EP_B.identity, True, UDP_): ALLOW})
    assert from_ep(dp, a, tcp(a, "1.1.1.1", 1)).retval == TC_ACT_OK
    assert from_ep(dp, a, a_udp(a, EP_B.ipv4, 9)).retval == TC_ACT_REDIRECT
    assert [x["match_type"] for x in verdicts(events.poll())] == ["all", "L3-Proto"]


def test_deny_beats_allow(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(
        a.ep_id,
        {
            key(0, True): ALLOW,  # allow everything ...
            key(EP_B.identity, True, TCP_, 22): DENY,  # ... but ssh to B
            key(0, True, TCP_, 23): DENY,  # ... and telnet to anyone
            key(EP_B.identity, True): ALLOW,  # (more specific allow for B)
        },
    )
    before = metric(dp, 181, "egress")
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 22)).retval == TC_ACT_SHOT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 23)).retval == TC_ACT_SHOT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 24)).retval == TC_ACT_REDIRECT
    evs = events.poll()
    assert [d["reason"] for d in drops(evs)] == [181, 181]
    assert drops(evs)[0]["reason_desc"] == "Policy denied by denylist"
    v = verdicts(evs)
    assert [(x["action"], x["match_type"], x["drop_reason"]) for x in v] == [
        ("deny", "L3-L4", 181),
        ("deny", "L4-Only", 181),
        ("allow", "L3-Only", 0),
    ]
    assert metric(dp, 181, "egress") == before + 2
    assert ct_ports(dp, 22) == [] and ct_ports(dp, 23) == []


def test_deny_covering_a_more_specific_allow_of_the_same_identity(dp, events):
    """allow 80/TCP + deny all TCP for one identity: the deny wins (written as deny)."""
    a = enforce(dp, EP_A, EGR)
    st = dp.policy.sync(
        a.ep_id,
        {key(EP_B.identity, True, TCP_, 80): ALLOW, key(EP_B.identity, True, TCP_): DENY},
    )
    assert st == {"added": 2, "updated": 0, "deleted": 0}
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_SHOT
    assert [d["reason"] for d in drops(events.poll())] == [181]
    assert all(r["deny"] for r in dp.policy.items(a.ep_id))


def test_no_entry_drops_with_events_and_metrics(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {})
    before = metric(dp, 133, "egress")
    pkt = tcp(a, EP_B.ipv4, 80)
    assert from_ep(dp, a, pkt).retval == TC_ACT_SHOT
    evs = events.poll()
    (d,) = drops(evs)
    assert d["reason"] == 133 and d["reason_desc"] == "Policy denied"
    assert d["source_ep"] == a.ep_id and d["dst_identity"] == EP_B.identity
    (v,) = verdicts(evs)
    assert v["type"] == "policy-verdict"
    assert (v["direction"], v["action"], v["match_type"]) == ("egress", "deny", "none")
    assert (v["source_ep"], v["remote_identity"], v["local_identity"]) == (
        a.ep_id,
        EP_B.identity,
        a.identity,
    )
    assert (v["proto"], v["dport"], v["drop_reason"]) == ("TCP", 80, 133)
    assert v["summary"] == "10.200.1.5:40000 -> 10.200.1.6:80 tcp SYN"
    assert v["orig_len"] == len(raw(pkt))
    assert metric(dp, 133, "egress") == before + 1
    assert not [e for e in evs if isinstance(e, TraceEvent)]


def test_enforced_endpoint_without_map_allows_nothing(dp, events):
    a = enforce(dp, EP_A, EGR)
    assert dp.policy.endpoints() == []
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_SHOT
    assert [d["reason"] for d in drops(events.poll())] == [133]


def test_enforcement_flag_clear_allows_all(dp, events):
    dp.policy.sync(EP_A.ep_id, {})  # empty map, but egress not enforced
    dp.policy.sync(EP_B.ep_id, {})
    assert from_ep(dp, EP_A, tcp(EP_A, EP_B.ipv4, 80)).retval == TC_ACT_REDIRECT
    a = enforce(dp, EP_A, ING)  # ingress only: egress still open
    assert from_ep(dp, a, tcp(a, "1.1.1.1", 80)).retval == TC_ACT_OK
    evs = events.poll()
    assert verdicts(evs) == [] and drops(evs) == []


def test_icmp_type_rules(dp, events):
    a = enforce(dp, EP_A, EGR)
    b = enforce(dp, EP_B, ING)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, ICMP_, 8): ALLOW})
    dp.policy.sync(b.ep_id, {key(0, False, ICMP_, 8): ALLOW})
    req = Ether() / IP(src=str(a.ipv4), dst=str(b.ipv4)) / ICMP(type=8, id=7, seq=1)
    ts = Ether() / IP(src=str(a.ipv4), dst=str(b.ipv4)) / ICMP(type=13, id=7)
    rep = Ether() / IP(src=str(b.ipv4), dst=str(a.ipv4)) / ICMP(type=0, id=7, seq=1)
    assert from_ep(dp, a, req).retval == TC_ACT_REDIRECT
    assert from_ep(dp, b, rep).retval == TC_ACT_REDIRECT  # reply of an allowed echo
    assert from_ep(dp, a, ts).retval == TC_ACT_SHOT
    v = verdicts(events.poll())
    assert [(x["direction"], x["action"], x["proto"], x["dport"], x["match_type"]) for x in v] == [
        ("egress", "allow", "ICMP", 8, "L3-L4"),
        ("ingress", "allow", "ICMP", 8, "L4-Only"),
        ("egress", "deny", "ICMP", 13, "none"),
    ]
    assert dp.policy.items(a.ep_id)[0]["port"] == "8/ICMP"


def test_replies_pass_after_allowed_syn(dp, events):
    """A -> B:80 allowed; B's egress and A's ingress allow nothing, yet replies pass."""
    a = enforce(dp, EP_A, EGR | ING)
    b = enforce(dp, EP_B, EGR | ING)
    dp.policy.sync(a.ep_id, {key(b.identity, True, TCP_, 80): ALLOW})
    dp.policy.sync(b.ep_id, {key(a.identity, False, TCP_, 80): ALLOW})
    assert from_ep(dp, a, tcp(a, b.ipv4, 80, "S", 41000)).retval == TC_ACT_REDIRECT
    synack = tcp(b, a.ipv4, 41000, "SA", sport=80)
    assert from_ep(dp, b, synack).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, b.ipv4, 80, "A", 41000)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, b, tcp(b, a.ipv4, 41000, "PA", sport=80)).retval == TC_ACT_REDIRECT
    # a connection in the other direction is still denied (B's egress)
    assert from_ep(dp, b, tcp(b, a.ipv4, 80, "S", 42000)).retval == TC_ACT_SHOT
    evs = events.poll()
    v = verdicts(evs)
    assert [(x["source_ep"], x["direction"], x["action"]) for x in v] == [
        (a.ep_id, "egress", "allow"),
        (b.ep_id, "ingress", "allow"),
        (b.ep_id, "egress", "deny"),
    ]
    (c,) = ct_ports(dp, 80)
    assert c["tx_packets"] == 2 and c["rx_packets"] == 2 and c["seen_non_syn"]
    assert 60 < c["expires_in_s"] <= 8000  # established lifetime


def test_denied_syn_leaves_no_ct_entry(dp, events):
    a = enforce(dp, EP_A, EGR | ING)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): ALLOW})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 9000, "S", 43000)).retval == TC_ACT_SHOT
    assert ct_ports(dp, 9000) == []
    # later packets of the "connection" are checked again, not waved through
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 9000, "A", 43000)).retval == TC_ACT_SHOT
    assert ct_ports(dp, 9000) == []
    # nor can the peer's packets pose as replies: new, and A's ingress allows nothing
    b_pkt = tcp(EP_B, a.ipv4, 43000, "SA", sport=9000)
    assert from_ep(dp, EP_B, b_pkt).retval == TC_ACT_SHOT
    evs = events.poll()
    assert [d["reason"] for d in drops(evs)] == [133, 133, 133]
    assert dp.ct.items() == []


def test_ingress_denied_at_destination_leaves_no_ct_entry(dp, events):
    """Egress allowed at A but ingress denied at B: nothing recorded."""
    a = enforce(dp, EP_A, EGR)
    b = enforce(dp, EP_B, ING)
    dp.policy.sync(a.ep_id, {key(0, True): ALLOW})
    dp.policy.sync(b.ep_id, {})
    before = metric(dp, 133, "ingress")
    assert from_ep(dp, a, tcp(a, b.ipv4, 8443)).retval == TC_ACT_SHOT
    assert ct_ports(dp, 8443) == []
    evs = events.poll()
    (d,) = drops(evs)
    assert d["reason"] == 133 and d["source_ep"] == b.ep_id and d["dst_ep"] == b.ep_id
    assert d["src_identity"] == a.identity and d["ifindex"] == b.ifindex
    v = verdicts(evs)
    assert [(x["source_ep"], x["direction"], x["action"]) for x in v] == [
        (a.ep_id, "egress", "allow"),
        (b.ep_id, "ingress", "deny"),
    ]
    assert metric(dp, 133, "ingress") == before + 1


def test_per_entry_counters(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): ALLOW, key(0, True, UDP_): ALLOW})
    syn = tcp(a, EP_B.ipv4, 80, "S", 44000)
    assert from_ep(dp, a, syn).retval == TC_ACT_REDIRECT
    for _ in range(3):  # established: no policy lookup
        assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80, "A", 44000)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80, "S", 44001)).retval == TC_ACT_REDIRECT
    rows = {r["port"]: r for r in dp.policy.items(a.ep_id)}
    assert rows["80/TCP"]["packets"] == 2
    assert rows["80/TCP"]["bytes"] == 2 * len(raw(syn))
    assert rows["ANY/UDP"]["packets"] == 0
    # a re-sync that keeps the entry keeps its counters
    st = dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): ALLOW})
    assert st == {"added": 0, "updated": 0, "deleted": 1}
    (row,) = dp.policy.items(a.ep_id)
    assert row["packets"] == 2


def test_ingress_on_local_delivery_uses_sender_identity(dp, events):
    b = enforce(dp, EP_B, ING)
    dp.policy.sync(b.ep_id, {key(EP_A.identity, False, TCP_, 80): ALLOW})
    assert from_ep(dp, EP_A, tcp(EP_A, b.ipv4, 80)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, EP_A, tcp(EP_A, b.ipv4, 81)).retval == TC_ACT_SHOT
    v = verdicts(events.poll())
    assert [(x["source_ep"], x["direction"], x["remote_identity"], x["action"]) for x in v] == [
        (b.ep_id, "ingress", EP_A.identity, "allow"),
        (b.ep_id, "ingress", EP_A.identity, "deny"),
    ]
    assert v[0]["src_identity"] == EP_A.identity and v[0]["dst_identity"] == b.identity
    assert v[0]["ifindex"] == b.ifindex


# ---------------------------------------------------------------- to-container


def test_to_container_identity_from_ipcache(dp, events, c_ep):
    c = enforce(dp, c_ep, ING)
    cidr_id = (1 << 24) | 1
    dp.ipcache.upsert(IPv4Network("9.9.9.0/24"), cidr_id)
    dp.policy.sync(
        c.ep_id,
        {key(HOST, False, TCP_, 80): ALLOW, key(cidr_id, False, TCP_, 80): ALLOW},
    )
    assert to_c(dp, tcp_in(ROUTER_IP, 80, sport=1001)).retval == TC_ACT_OK  # host
    assert to_c(dp, tcp_in(NODE_IP, 80, sport=1002)).retval == TC_ACT_OK  # host
    assert to_c(dp, tcp_in("9.9.9.9", 80, sport=1003)).retval == TC_ACT_OK  # CIDR identity
    assert to_c(dp, tcp_in("8.8.8.8", 80, sport=1004)).retval == TC_ACT_SHOT  # world
    assert to_c(dp, tcp_in(ROUTER_IP, 81, sport=1005)).retval == TC_ACT_SHOT
    evs = events.poll()
    v = verdicts(evs)
    assert [(x["remote_identity"], x["action"]) for x in v] == [
        (HOST, "allow"),
        (HOST, "allow"),
        (cidr_id, "allow"),
        (WORLD, "deny"),
        (HOST, "deny"),
    ]
    assert {(x["direction"], x["source_ep"]) for x in v} == {("ingress", c.ep_id)}
    assert [d["src_identity"] for d in drops(evs)] == [WORLD, HOST]
    assert {x["direction"] for x in dp.ct.items() if x["dst"] == str(c.ipv4)} == {"ingress"}


def test_to_container_replies_of_egress_connections_pass(dp, events, c_ep):
    """pod -> outside (masqueraded in the node): the reply comes back de-NATed
    with the original tuple reversed and passes, though ingress allows nothing."""
    c = enforce(dp, c_ep, ING | EGR)
    dp.policy.sync(c.ep_id, {key(0, True, UDP_, 53): ALLOW, key(0, True, TCP_, 443): ALLOW})
    q = a_udp(c, "8.8.8.8", 53, sport=33333)
    assert from_ep(dp, c, q).retval == TC_ACT_OK
    ans = Ether() / IP(src="8.8.8.8", dst=str(c.ipv4)) / UDP(sport=53, dport=33333)
    assert to_c(dp, ans).retval == TC_ACT_OK
    assert from_ep(dp, c, tcp(c, "1.1.1.1", 443, "S", 45000)).retval == TC_ACT_OK
    assert to_c(dp, tcp_in("1.1.1.1", 45000, "SA", sport=443)).retval == TC_ACT_OK
    # unsolicited: dropped
    assert to_c(dp, tcp_in("1.1.1.1", 45001, "S", sport=443)).retval == TC_ACT_SHOT
    evs = events.poll()
    assert [x["action"] for x in verdicts(evs)] == ["allow", "allow", "deny"]
    traces = [event_record(e) for e in evs if isinstance(e, TraceEvent)]
    assert [t["ct_state"] for t in traces if t["observation_point"] == "to-endpoint"] == [
        "reply",
        "reply",
    ]


def test_icmp_error_related_to_a_flow_passes(dp, events, c_ep):
    c = enforce(dp, c_ep, ING | EGR)
    dp.policy.sync(c.ep_id, {key(0, True, UDP_, 53): ALLOW})
    q = a_udp(c, "8.8.8.8", 53, sport=34444)
    assert from_ep(dp, c, q).retval == TC_ACT_OK

    def unreachable(inner_dport):
        return (
            Ether()
            / IP(src=str(ROUTER_IP), dst=str(c.ipv4))
            / ICMP(type=3, code=3)
            / IPerror(src=str(c.ipv4), dst="8.8.8.8", proto=17)
            / UDPerror(sport=34444, dport=inner_dport)
        )

    assert to_c(dp, unreachable(53)).retval == TC_ACT_OK
    assert to_c(dp, unreachable(54)).retval == TC_ACT_SHOT  # not about a tracked flow
    evs = events.poll()
    traces = [event_record(e) for e in evs if isinstance(e, TraceEvent)]
    assert [t["ct_state"] for t in traces if t["observation_point"] == "to-endpoint"] == ["related"]
    (v,) = [x for x in verdicts(evs) if x["direction"] == "ingress"]
    assert (v["action"], v["proto"], v["dport"]) == ("deny", "ICMP", 3)


# ---------------------------------------------------------------- conntrack


def test_tcp_lifetimes_and_gc(dp, events):
    syn = tcp(EP_A, EP_B.ipv4, 7000, "S", 46000)
    assert from_ep(dp, EP_A, syn).retval == TC_ACT_REDIRECT
    (c,) = ct_ports(dp, 7000)
    assert 50 < c["expires_in_s"] <= 60
    assert from_ep(dp, EP_B, tcp(EP_B, EP_A.ipv4, 46000, "SA", 7000)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, EP_A, tcp(EP_A, EP_B.ipv4, 7000, "A", 46000)).retval == TC_ACT_REDIRECT
    (c,) = ct_ports(dp, 7000)
    assert 7990 < c["expires_in_s"] <= 8000
    assert from_ep(dp, EP_A, tcp(EP_A, EP_B.ipv4, 7000, "R", 46000)).retval == TC_ACT_REDIRECT
    (c,) = ct_ports(dp, 7000)
    assert c["expires_in_s"] <= 10
    assert from_ep(dp, EP_A, a_udp(EP_A, EP_B.ipv4, 7001)).retval == TC_ACT_REDIRECT
    (u,) = ct_ports(dp, 7001)
    assert 50 < u["expires_in_s"] <= 60

    n = len(dp.ct.items())
    assert dp.ct.gc() == 0  # nothing expired
    assert len(dp.ct.items()) == n
    now = int(time.clock_gettime(time.CLOCK_MONOTONIC))
    assert dp.ct.gc(now=now + 30) == 1  # the closing TCP entry
    assert ct_ports(dp, 7000) == [] and len(ct_ports(dp, 7001)) == 1
    assert dp.ct.gc(now=now + 100) == n - 1
    assert dp.ct.items() == []


# ---------------------------------------------------------------- control plane


def test_sync_diffs_and_items(dp):
    ep = EP_A.ep_id
    first = {
        key(1001, True, TCP_, 80): ALLOW,
        key(1001, False): ALLOW,
        key(0, False, TCP_, 22): DENY,
    }
    assert dp.policy.sync(ep, first) == {"added": 3, "updated": 0, "deleted": 0}
    assert dp.policy.sync(ep, first) == {"added": 0, "updated": 0, "deleted": 0}
    second = {
        key(1001, True, TCP_, 80): DENY,  # changed
        key(1001, False): ALLOW,  # kept
        key(2, True, UDP_, 5000, 13): ALLOW,  # new: 5000-5007
    }
    assert dp.policy.sync(ep, second) == {"added": 1, "updated": 1, "deleted": 1}
    rows = dp.policy.items(ep)
    assert [(r["direction"], r["identity"], r["port"], r["deny"]) for r in rows] == [
        ("egress", 2, "5000-5007/UDP", False),
        ("egress", 1001, "80/TCP", True),
        ("ingress", 1001, "ANY", False),
    ]
    assert rows[0]["proto"] == UDP_ and rows[0]["dport"] == 5000 and rows[0]["prefix_len"] == 13
    assert rows[0]["proxy_port"] == 0 and rows[0]["packets"] == 0 and rows[0]["bytes"] == 0
    assert dp.policy.endpoints() == [ep]
    dp.policy.sync(EP_B.ep_id, {})
    assert dp.policy.endpoints() == [EP_A.ep_id, EP_B.ep_id]
    dp.policy.delete(ep)
    assert dp.policy.endpoints() == [EP_B.ep_id]
    assert dp.policy.items(ep) == []


def test_sync_rejects_more_than_capacity(dp):
    entries = {key(i + 1, False): ALLOW for i in range(20000)}
    with pytest.raises(DatapathError) as ei:
        dp.policy.sync(3, entries)
    assert str(ei.value) == "endpoint 3 policy needs 20000 entries, the policy map holds 16384"
    assert dp.policy.endpoints() == []
    with pytest.raises(DatapathError, match="prefix_len"):
        dp.policy.sync(3, {PolicyKey(1, False, 6, 80, 17): ALLOW})


def test_sync_swaps_in_a_new_map_when_old_and_new_do_not_fit(dp, events):
    a = enforce(dp, EP_A, EGR)
    old = {key(100000 + i, True): ALLOW for i in range(9000)}
    old[key(EP_B.identity, True, TCP_, 80)] = ALLOW
    dp.policy.sync(a.ep_id, old)
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80, "S", 47000)).retval == TC_ACT_REDIRECT
    new = {key(200000 + i, True): ALLOW for i in range(9000)}
    new[key(EP_B.identity, True, TCP_, 80)] = ALLOW
    st = dp.policy.sync(a.ep_id, new)
    assert st == {"added": 9000, "updated": 0, "deleted": 9000}
    rows = dp.policy.items(a.ep_id)
    assert len(rows) == 9001
    assert [r["packets"] for r in rows if r["port"] == "80/TCP"] == [1]  # counters carried
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80, "S", 47001)).retval == TC_ACT_REDIRECT
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 81, "S", 47002)).retval == TC_ACT_SHOT


def test_python_verdict_agrees_with_datapath(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(
        a.ep_id,
        {
            key(EP_B.identity, True, TCP_, 80): ALLOW,
            key(0, True, TCP_, 8000, 14): ALLOW,
            key(0, True, TCP_, 22): DENY,
            key(EP_B.identity, True, UDP_): ALLOW,
        },
    )
    cases = [(TCP_, 80), (TCP_, 81), (TCP_, 8002), (TCP_, 22), (UDP_, 9)]
    for i, (proto, port) in enumerate(cases):
        sport = 48000 + i
        pkt = tcp(a, EP_B.ipv4, port, "S", sport) if proto == TCP_ else a_udp(a, EP_B.ipv4, port, sport)
        ret = from_ep(dp, a, pkt).retval
        (v,) = verdicts(events.poll())
        py = mirror(dp, a.ep_id, EP_B.identity, True, proto, port)
        assert py["action"] == v["action"], (proto, port)
        assert py["match_type"] == v["match_type"], (proto, port)
        assert (ret == TC_ACT_REDIRECT) == (py["action"] == "allow")


def test_policy_maps_survive_an_agent_restart(bpf_state_dir):
    root = Path("/sys/fs/bpf") / f"pilus-test-{uuid.uuid4().hex[:8]}"
    cfg = DatapathConfig("n1", ROUTER_IP, NODE_IP, POD_CIDR)
    entries = {key(EP_B.identity, True, TCP_, 80): ALLOW, key(0, False): DENY}
    try:
        dp = Datapath(cfg, bpf_state_dir, bpffs_root=root)
        dp.load()
        dp.policy.sync(EP_A.ep_id, entries)
        dp.policy.sync(EP_B.ep_id, {})
        before = dp.policy.items(EP_A.ep_id)
        dp.close()  # the agent dies: pins keep the maps
        assert (root / "n1" / "pilus_policy").exists()
        assert (root / "n1" / f"pilus_policy_{EP_A.ep_id:05d}").exists()

        dp2 = Datapath(cfg, bpf_state_dir, bpffs_root=root)
        dp2.load()
        try:
            assert dp2.policy.endpoints() == [EP_A.ep_id, EP_B.ep_id]
            assert dp2.policy.items(EP_A.ep_id) == before
            assert dp2.policy.sync(EP_A.ep_id, entries) == {"added": 0, "updated": 0, "deleted": 0}
            stats = {m["name"]: m for m in dp2.map_stats()}
            assert stats["pilus_policy"]["type"] == "hash_of_maps"
            assert stats["pilus_policy"]["entries"] == 2
            dp2.policy.delete(EP_B.ep_id)
            assert not (root / "n1" / f"pilus_policy_{EP_B.ep_id:05d}").exists()
        finally:
            dp2.close()
    finally:
        remove_pins("n1", root)
    assert not root.exists()
