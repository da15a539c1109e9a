"""The L7 proxy redirect (lib/proxy.h) on crafted packets (BPF_PROG_TEST_RUN).

What a test run can show: which connections are sent to the proxy (the
CT_F_PROXY_REDIRECT entry with its port, the hairpin mark, the drop reason when
no proxy listens) and which are not. bpf_sk_assign itself needs a real tc
ingress (the kernel refuses it in a test run: DROP_PROXY_SET_FAILED once the
listener was found); test_proxy_veth.py runs real connections through it.
Endpoints as in test_policy.py: A (5), B (6) and C (7, on loopback).
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Network

import pytest
from lxc_env import EP_A, EP_B, EP_C, enforce, key
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    DropEvent,
    PolicyEntry,
    TraceEvent,
    abi,
)
from pilus.datapath.testrun import run_skb
from pilus.observer.format import event_record

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
ING, EGR = ENDPOINT_F_POLICY_INGRESS, ENDPOINT_F_POLICY_EGRESS
ICMP_, TCP_ = 1, 6
WORLD = 2
IP_TRANSPARENT = 19
ALLOW_L4 = PolicyEntry(deny=False)


def l7(port):
    return PolicyEntry(deny=False, proxy_port=port)


@pytest.fixture
def c_ep(dp):
    dp.endpoints.upsert(EP_C)
    dp.ipcache.upsert(IPv4Network(f"{EP_C.ipv4}/32"), EP_C.identity)
    return EP_C


@pytest.fixture
def free_port():
    """A TCP port nobody listens on (bound and closed)."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def proxy_listener():
    """A transparent listener on 0.0.0.0 as the proxy's (its port)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(4)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def from_ep(dp, ep, pkt, mark=0):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=ep.ifindex, mark=mark)


def to_c(dp, pkt, mark=0):
    return run_skb(dp.prog_fd("cil_to_container"), raw(pkt), ifindex=1, mark=mark)


def tcp(src, dst, dport, flags="S", sport=40000):
    return (Ether(src=src.mac, dst=src.host_mac) / IP(src=str(src.ipv4), dst=str(dst))
            / TCP(sport=sport, dport=dport, flags=flags))


def tcp_in(saddr, dport, flags="S", sport=40000, dst=EP_C):
    return (Ether(src=dst.host_mac, dst=dst.mac) / IP(src=str(saddr), dst=str(dst.ipv4))
            / TCP(sport=sport, dport=dport, flags=flags))


def ct_entry(dp, dport, sport=40000):
    rows = [c for c in dp.ct.items() if c["dport"] == dport and c["sport"] == sport]
    assert len(rows) == 1, rows
    return rows[0]


def drops(evs):
    return [event_record(e) for e in evs if isinstance(e, DropEvent)]


def test_no_proxy_listener_drops_with_proxy_lookup_failed(dp, events, free_port):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): l7(free_port)})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_SHOT
    # the retransmitted SYN rides the entry and is sent to the proxy again
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_SHOT
    d = drops(events.poll())
    assert [x["reason"] for x in d] == [abi.DROP_PROXY_LOOKUP_FAILED] * 2
    assert d[0]["reason_desc"] == "Socket lookup failed"
    assert dp.metrics.get(abi.DROP_PROXY_LOOKUP_FAILED, "egress")[0] == 2
    e = ct_entry(dp, 80)
    assert "ProxyRedirect" in e["flags"] and e["proxy_port"] == free_port
    # never delivered around the proxy
    assert dp.metrics.get(0, "egress")[0] == 0


def test_listener_found_then_assign_needs_tc_ingress(dp, events, proxy_listener):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): l7(proxy_listener)})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 80)).retval == TC_ACT_SHOT
    assert [x["reason"] for x in drops(events.poll())] == [abi.DROP_PROXY_SET_FAILED]


def test_egress_port_wins_else_destination_ingress_port(dp, free_port):
    a = enforce(dp, EP_A, EGR)
    b = enforce(dp, EP_B, ING)
    egress_port, ingress_port = free_port, free_port + 1 if free_port < 65535 else free_port - 1
    dp.policy.sync(a.ep_id, {key(b.identity, True, TCP_, 80): l7(egress_port),
                             key(b.identity, True, TCP_, 81): ALLOW_L4})
    dp.policy.sync(b.ep_id, {key(a.identity, False, TCP_, 80): l7(ingress_port),
                             key(a.identity, False, TCP_, 81): l7(ingress_port)})
    from_ep(dp, a, tcp(a, b.ipv4, 80))
    from_ep(dp, a, tcp(a, b.ipv4, 81))
    assert ct_entry(dp, 80)["proxy_port"] == egress_port
    assert ct_entry(dp, 81)["proxy_port"] == ingress_port


def test_port_without_l7_and_icmp_are_not_redirected(dp, events, free_port):
    """(UDP with a proxy port is redirected: test_proxy_udp.py.)"""
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 8080): ALLOW_L4,
                             key(EP_B.identity, True, ICMP_, 8): l7(free_port)})
    assert from_ep(dp, a, tcp(a, EP_B.ipv4, 8080)).retval == TC_ACT_REDIRECT
    ping = Ether(src=a.mac, dst=a.host_mac) / IP(src=str(a.ipv4), dst=str(EP_B.ipv4)) / ICMP(
        type=8, id=40000)
    # ICMP with a proxy port: plain L4 (no proxy parses it)
    assert from_ep(dp, a, ping).retval == TC_ACT_REDIRECT
    assert ct_entry(dp, 8080)["flags"] == [] and ct_entry(dp, 0)["flags"] == []
    assert drops(events.poll()) == []


def test_to_container_hairpins_with_the_port_in_the_mark(dp, c_ep, events, free_port):
    c = enforce(dp, c_ep, ING)
    dp.policy.sync(c.ep_id, {key(WORLD, False, TCP_, 80): l7(free_port)})
    r = to_c(dp, tcp_in("1.1.1.1", 80))
    assert r.retval == TC_ACT_REDIRECT
    assert r.ctx.mark == abi.MARK_MAGIC_TO_PROXY | free_port << 16
    e = ct_entry(dp, 80)
    assert e["flags"] == ["Ingress", "ProxyRedirect"] and e["proxy_port"] == free_port
    # established packets too; the replies pass into the pod
    r = to_c(dp, tcp_in("1.1.1.1", 80, flags="A"))
    assert (r.retval, r.ctx.mark) == (TC_ACT_REDIRECT, abi.MARK_MAGIC_TO_PROXY | free_port << 16)
    reply = Ether(src=c.mac, dst=c.host_mac) / IP(src=str(c.ipv4), dst="1.1.1.1") / TCP(
        sport=80, dport=40000, flags="SA")
    assert from_ep(dp, c, reply).retval == TC_ACT_OK
    traces = [event_record(x) for x in events.poll() if isinstance(x, TraceEvent)]
    assert traces[0]["observation_point"] == "to-proxy"
    # the hairpinned packet in from-container: to the port in the mark (no
    # listener here: the lookup fails, with the reason)
    r = from_ep(dp, c, tcp_in("1.1.1.1", 80), mark=abi.MARK_MAGIC_TO_PROXY | free_port << 16)
    assert r.retval == TC_ACT_SHOT
    assert [x["reason"] for x in drops(events.poll())] == [abi.DROP_PROXY_LOOKUP_FAILED]


def test_ingress_proxy_upstream_skips_policy_and_replies_go_to_the_stack(dp, c_ep, events):
    c = enforce(dp, c_ep, ING)  # enforced, nothing allowed
    dp.policy.sync(c.ep_id, {})
    assert to_c(dp, tcp_in(EP_A.ipv4, 80)).retval == TC_ACT_SHOT
    up = tcp_in(EP_A.ipv4, 80, sport=41000)
    assert to_c(dp, up, mark=abi.MARK_MAGIC_PROXY_INGRESS).retval == TC_ACT_OK
    assert ct_entry(dp, 80, 41000)["flags"] == ["Ingress", "FromProxy"]
    # C answers the proxy's socket, which has A's address: to the stack,
    # marked for local delivery, not redirected into A
    reply = Ether(src=c.mac, dst=c.host_mac) / IP(src=str(c.ipv4), dst=str(EP_A.ipv4)) / TCP(
        sport=80, dport=41000, flags="SA")
    r = from_ep(dp, c, reply)
    assert (r.retval, r.ctx.mark) == (TC_ACT_OK, abi.MARK_MAGIC_TO_PROXY)
    assert [x["reason"] for x in drops(events.poll())] == [abi.DROP_POLICY]


def test_egress_proxy_upstream_passes_ingress_policy_then_hairpin(dp, c_ep, events, free_port):
    c = enforce(dp, c_ep, ING)
    dp.policy.sync(c.ep_id, {key(EP_A.identity, False, TCP_, 80): l7(free_port)})
    assert to_c(dp, tcp_in(EP_A.ipv4, 9000), mark=abi.MARK_MAGIC_PROXY_EGRESS).retval == TC_ACT_SHOT
    r = to_c(dp, tcp_in(EP_A.ipv4, 80), mark=abi.MARK_MAGIC_PROXY_EGRESS)
    assert (r.retval, r.ctx.mark) == (TC_ACT_REDIRECT, abi.MARK_MAGIC_TO_PROXY | free_port << 16)
    e = ct_entry(dp, 80)
    assert e["flags"] == ["Ingress", "ProxyRedirect", "FromProxy"]
    # the ingress proxy's answer to that upstream socket (the reverse tuple),
    # met in to-container: back into the stack, not into the pod
    ans = (Ether(src=c.host_mac, dst=c.mac) / IP(src=str(c.ipv4), dst=str(EP_A.ipv4))
           / TCP(sport=80, dport=40000, flags="SA"))
    r = to_c(dp, ans)
    assert (r.retval, r.ctx.mark) == (TC_ACT_REDIRECT, abi.MARK_MAGIC_TO_PROXY)
    assert [x["reason"] for x in drops(events.poll())] == [abi.DROP_POLICY]


def test_from_other_node_goes_to_the_ingress_proxy(dp, c_ep, events, free_port):
    """lib/deliver.h (bpf_host's from-netdev): a connection from another node's pod."""
    c = enforce(dp, c_ep, ING)
    remote = "10.200.2.9"
    dp.ipcache.upsert(IPv4Network(f"{remote}/32"), 3000)
    dp.policy.sync(c.ep_id, {key(3000, False, TCP_, 80): l7(free_port)})
    pkt = Ether(dst="02:00:00:00:aa:01") / IP(src=remote, dst=str(c.ipv4)) / TCP(
        sport=40000, dport=80, flags="S")
    r = run_skb(dp.prog_fd("cil_from_netdev"), raw(pkt), ingress_ifindex=50)
    assert r.retval == TC_ACT_SHOT
    assert [x["reason"] for x in drops(events.poll())] == [abi.DROP_PROXY_LOOKUP_FAILED]
    e = ct_entry(dp, 80)
    assert e["flags"] == ["Ingress", "ProxyRedirect"] and e["proxy_port"] == free_port
