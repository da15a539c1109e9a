"""cil_from_container / cil_to_container on crafted packets (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from lxc_env import EP_A, EP_B, NODE_IP, POD_CIDR, ROUTER_IP, make_datapath, seed
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import raw

from pilus.datapath import (
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    DropEvent,
    PolicyVerdictEvent,
    TraceEvent,
    remove_pins,
)
from pilus.datapath.abi import NOTIFY_TRACE
from pilus.datapath.events import listen_mask
from pilus.datapath.testrun import run_skb
from pilus.observer.format import event_record

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


def from_a(dp, pkt, ingress_ifindex=EP_A.ifindex):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=ingress_ifindex)


def to_container(dp, pkt):
    # skb->ifindex must be a real device in the test run: loopback (1) stands for the lxc
    return run_skb(dp.prog_fd("cil_to_container"), raw(pkt), ifindex=1)


def a_eth():
    return Ether(src=EP_A.mac, dst=EP_A.host_mac)


def metric(dp, reason, direction):
    return dp.metrics.get(reason, direction)[0]


def test_pod_to_pod_redirects_to_peer(dp, events):
    pkt = (
        a_eth()
        / IP(src=str(EP_A.ipv4), dst=str(EP_B.ipv4), ttl=64)
        / UDP(sport=43512, dport=80)
        / b"hello"
    )
    before = metric(dp, 0, "egress")
    r = from_a(dp, pkt)
    assert r.retval == TC_ACT_REDIRECT

    out = Ether(r.data)
    assert out.dst == EP_B.mac
    assert out.src == EP_B.host_mac
    assert out[IP].ttl == 63
    # the checksum the datapath left equals a recomputed one
    got = out[IP].chksum
    del out[IP].chksum
    assert IP(raw(out[IP]))[IP].chksum == got
    assert out[UDP].dport == 80 and bytes(out[UDP].payload) == b"hello"

    evs = events.poll()
    traces = [e for e in evs if isinstance(e, TraceEvent)]
    assert len(traces) == 1, evs
    t = event_record(traces[0])
    assert t["type"] == "trace"
    assert t["observation_point"] == "to-endpoint"
    assert t["ct_state"] == "new"
    assert t["ifindex"] == EP_B.ifindex
    assert t["dst_ep"] == EP_B.ep_id
    assert t["source_ep"] == EP_A.ep_id
    assert t["src_identity"] == EP_A.identity
    assert t["dst_identity"] == EP_B.identity
    assert t["summary"] == "10.200.1.5:43512 -> 10.200.1.6:80 udp"
    assert metric(dp, 0, "egress") == before + 1

    # same flow again: forwarded, but aggregated (no new trace)
    r = from_a(dp, pkt)
    assert r.retval == TC_ACT_REDIRECT
    assert [e for e in events.poll() if isinstance(e, TraceEvent)] == []

    ct = [c for c in dp.ct.items() if c["dport"] == 80]
    assert len(ct) == 1
    assert ct[0]["proto"] == "UDP" and ct[0]["tx_packets"] == 2
    assert ct[0]["direction"] == "egress"
    assert 0 < ct[0]["expires_in_s"] <= 60


def test_spoofed_source_is_dropped(dp, events):
    before = metric(dp, 132, "egress")
    pkt = a_eth() / IP(src="10.200.1.99", dst=str(EP_B.ipv4)) / TCP(sport=1111, dport=22, flags="S")
    r = from_a(dp, pkt)
    assert r.retval == TC_ACT_SHOT

    drops = [e for e in events.poll() if isinstance(e, DropEvent)]
    assert len(drops) == 1
    d = event_record(drops[0])
    assert d["type"] == "drop"
    assert d["reason"] == 132
    assert d["reason_desc"] == "Invalid source ip"
    assert d["source_ep"] == EP_A.ep_id
    assert d["src_ip"] == "10.200.1.99" and d["dst_ip"] == str(EP_B.ipv4)
    assert d["sport"] == 1111 and d["dport"] == 22 and d["tcp_flags"] == ["SYN"]
    assert d["summary"] == "10.200.1.99:1111 -> 10.200.1.6:22 tcp SYN"
    assert metric(dp, 132, "egress") == before + 1
    m = [x for x in dp.metrics.items() if x["reason"] == 132][0]
    assert m["bytes"] == len(raw(pkt))
    # nothing tracked for a dropped packet
    assert [c for c in dp.ct.items() if c["dport"] == 22] == []


def test_to_stack_for_outside_destination(dp, events):
    pkt = a_eth() / IP(src=str(EP_A.ipv4), dst="1.1.1.1") / TCP(sport=40000, dport=443, flags="S")
    r = from_a(dp, pkt)
    assert r.retval == TC_ACT_OK
    out = Ether(r.data)
    assert out.dst == EP_A.host_mac and out[IP].ttl == 64  # untouched: the stack routes it
    t = [e for e in events.poll() if isinstance(e, TraceEvent)]
    assert len(t) == 1
    assert t[0].observation_point == "to-stack"
    assert t[0].dst_identity == 2  # world
    assert event_record(t[0])["tcp_flags"] == ["SYN"]


def test_to_router_goes_to_stack_with_host_identity(dp, events):
    pkt = a_eth() / IP(src=str(EP_A.ipv4), dst=str(ROUTER_IP)) / ICMP(type=8, id=7)
    assert from_a(dp, pkt).retval == TC_ACT_OK
    t = [e for e in events.poll() if isinstance(e, TraceEvent)]
    assert t and t[0].dst_identity == 1 and t[0].observation_point == "to-stack"


def test_arp_request_for_router_is_answered(dp):
    req = Ether(src=EP_A.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=EP_A.mac, psrc=str(EP_A.ipv4), pdst=str(ROUTER_IP)
    )
    r = from_a(dp, req)
    assert r.retval == TC_ACT_REDIRECT
    rep = Ether(r.data)
    assert rep.dst == EP_A.mac and rep.src == EP_A.host_mac
    assert rep[ARP].op == 2
    assert rep[ARP].hwsrc == EP_A.host_mac
    assert rep[ARP].psrc == str(ROUTER_IP)
    assert rep[ARP].hwdst == EP_A.mac
    assert rep[ARP].pdst == str(EP_A.ipv4)


def test_arp_any_other_target_answered_but_not_own_ip(dp):
    req = Ether(src=EP_A.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=EP_A.mac, psrc=str(EP_A.ipv4), pdst="10.200.1.77"
    )
    r = from_a(dp, req)
    assert r.retval == TC_ACT_REDIRECT and Ether(r.data)[ARP].hwsrc == EP_A.host_mac
    own = Ether(src=EP_A.mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=EP_A.mac, psrc="0.0.0.0", pdst=str(EP_A.ipv4)
    )
    assert from_a(dp, own).retval == TC_ACT_OK


def test_unknown_sender_and_unknown_l3(dp, events):
    pkt = Ether() / IP(src="10.200.1.50", dst=str(EP_B.ipv4)) / UDP()
    assert from_a(dp, pkt, ingress_ifindex=4242).retval == TC_ACT_SHOT
    v6 = a_eth() / IPv6(src="fe80::1", dst="ff02::2") / UDP()
    assert from_a(dp, v6).retval == TC_ACT_SHOT
    reasons = [e.reason for e in events.poll() if isinstance(e, DropEvent)]
    assert reasons == [172, 139]
    assert metric(dp, 172, "egress") >= 1 and metric(dp, 139, "egress") >= 1


def test_ttl_exceeded_on_local_delivery(dp, events):
    pkt = a_eth() / IP(src=str(EP_A.ipv4), dst=str(EP_B.ipv4), ttl=1) / UDP(sport=5, dport=6)
    assert from_a(dp, pkt).retval == TC_ACT_SHOT
    assert [e.reason for e in events.poll() if isinstance(e, DropEvent)] == [196]


def test_tcp_conntrack_and_trace_aggregation(dp, events):
    a, b = str(EP_A.ipv4), str(EP_B.ipv4)
    syn = a_eth() / IP(src=a, dst=b) / TCP(sport=50000, dport=8080, flags="S")
    synack = (
        Ether(src=EP_B.mac, dst=EP_B.host_mac)
        / IP(src=b, dst=a)
        / TCP(sport=8080, dport=50000, flags="SA")
    )
    ack = a_eth() / IP(src=a, dst=b) / TCP(sport=50000, dport=8080, flags="A")
    fin = a_eth() / IP(src=a, dst=b) / TCP(sport=50000, dport=8080, flags="FA")

    assert from_a(dp, syn).retval == TC_ACT_REDIRECT
    assert from_a(dp, synack, ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
    assert from_a(dp, ack).retval == TC_ACT_REDIRECT
    assert from_a(dp, ack).retval == TC_ACT_REDIRECT
    assert from_a(dp, fin).retval == TC_ACT_REDIRECT

    traces = [event_record(e) for e in events.poll() if isinstance(e, TraceEvent)]
    assert [(t["ct_state"], t["tcp_flags"]) for t in traces] == [
        ("new", ["SYN"]),
        ("reply", ["SYN", "ACK"]),
        ("established", ["FIN", "ACK"]),
    ]
    assert traces[1]["source_ep"] == EP_B.ep_id and traces[1]["dst_ep"] == EP_A.ep_id
    ct = [c for c in dp.ct.items() if c["dport"] == 8080]
    assert len(ct) == 1
    c = ct[0]
    assert c["tx_packets"] == 4 and c["rx_packets"] == 1
    assert set(c["tx_flags_seen"]) == {"SYN", "ACK", "FIN"}
    assert set(c["rx_flags_seen"]) == {"SYN", "ACK"}
    assert c["closing"] == ["tx"] and c["expires_in_s"] <= 10
    assert dp.ct.flush() >= 1
    assert [c for c in dp.ct.items() if c["dport"] == 8080] == []


def test_icmp_echo_reply_matches(dp, events):
    a, b = str(EP_A.ipv4), str(EP_B.ipv4)
    req = a_eth() / IP(src=a, dst=b) / ICMP(type=8, id=99, seq=1)
    rep = Ether(src=EP_B.mac, dst=EP_B.host_mac) / IP(src=b, dst=a) / ICMP(type=0, id=99, seq=1)
    assert from_a(dp, req).retval == TC_ACT_REDIRECT
    assert from_a(dp, rep, ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
    traces = [event_record(e) for e in events.poll() if isinstance(e, TraceEvent)]
    assert [t["ct_state"] for t in traces] == ["new", "reply"]  # first reply is reported
    assert from_a(dp, req).retval == TC_ACT_REDIRECT
    assert from_a(dp, rep, ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
    assert [e for e in events.poll() if isinstance(e, TraceEvent)] == []  # aggregated
    c = [c for c in dp.ct.items() if c["proto"] == "ICMP"]
    assert len(c) == 1 and c[0]["tx_packets"] == 2 and c[0]["rx_packets"] == 2


def test_to_container_identity_and_reply(dp, events):
    # the lxc for this run is loopback (ifindex 1)
    dp.endpoints.upsert(
        type(EP_A)(
            ipv4=IPv4Address("10.200.1.7"),
            ifindex=1,
            ep_id=7,
            identity=1007,
            mac="02:00:00:00:00:07",
            host_mac="02:00:00:00:01:07",
        )
    )
    before = metric(dp, 0, "ingress")
    pkt = (
        Ether(src="02:00:00:00:01:07", dst="02:00:00:00:00:07")
        / IP(src=str(ROUTER_IP), dst="10.200.1.7")
        / UDP(sport=53, dport=5353)
    )
    assert to_container(dp, pkt).retval == TC_ACT_OK
    pkt2 = Ether() / IP(src="9.9.9.9", dst="10.200.1.7") / TCP(sport=1, dport=2, flags="S")
    assert to_container(dp, pkt2).retval == TC_ACT_OK
    t = [event_record(e) for e in events.poll() if isinstance(e, TraceEvent)]
    assert [
        (x["observation_point"], x["src_identity"], x["dst_ep"], x["dst_identity"]) for x in t
    ] == [
        ("to-endpoint", 1, 7, 1007),
        ("to-endpoint", 2, 7, 1007),
    ]
    assert metric(dp, 0, "ingress") == before + 2
    assert {c["direction"] for c in dp.ct.items() if c["dst"] == "10.200.1.7"} == {"ingress"}
    # unknown non-IP into the pod
    assert to_container(dp, Ether() / IPv6() / UDP()).retval == TC_ACT_SHOT
    assert metric(dp, 139, "ingress") >= 1
    # ARP passes
    assert to_container(dp, Ether() / ARP(pdst="10.200.1.7")).retval == TC_ACT_OK


def _spoofed_drops(dp, n: int) -> tuple[int, int]:
    """Send n packets from an address no endpoint has (each dropped, 132): the drop events
    read and the events the datapath counted as lost meanwhile."""
    seed(dp)
    with dp.events() as reader:
        lost0 = reader.lost()
        pkt = a_eth() / IP(src="10.200.1.66", dst=str(EP_B.ipv4)) / UDP()
        for _ in range(n):
            assert from_a(dp, pkt).retval == TC_ACT_SHOT
        drops = len([e for e in reader.poll() if isinstance(e, DropEvent)])
        return drops, reader.lost() - lost0


def test_event_rate_limit(bpf_state_dir):
    dp = make_datapath(bpf_state_dir, events_rate=1, events_burst=3)
    # the token bucket is per CPU: run every packet on one CPU so one bucket is measured
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        drops, lost = _spoofed_drops(dp, 20)
        # the bucket holds 3, refills 1/s: the test takes well under a second
        assert 3 <= drops <= 4
        assert lost == 20 - drops
        # every drop is still counted
        assert metric(dp, 132, "egress") >= 20
    finally:
        os.sched_setaffinity(0, affinity)
        dp.close()


def test_event_rate_limit_zero_is_no_limit(bpf_state_dir):
    dp = make_datapath(bpf_state_dir, events_rate=0, events_burst=0)  # --bpf-events-default-rate-limit 0
    try:
        assert _spoofed_drops(dp, 300) == (300, 0)
    finally:
        dp.close()


def test_pinned_maps_survive_reload(bpf_state_dir):
    root = Path("/sys/fs/bpf") / f"pilus-test-{uuid.uuid4().hex[:8]}"
    cfg = DatapathConfig("n1", ROUTER_IP, NODE_IP, POD_CIDR)
    try:
        dp = Datapath(cfg, bpf_state_dir, bpffs_root=root)
        dp.load()
        dp.endpoints.upsert(EP_A)
        dp.ipcache.upsert(IPv4Network("10.0.0.0/8"), 42, IPv4Address("172.30.0.12"))
        id1 = {p["name"]: p["prog_id"] for p in dp.programs()}
        dp.close()
        for name in (
            "pilus_lxc",
            "pilus_lxc_if",
            "pilus_ipcache",
            "pilus_ct4",
            "pilus_metrics",
            "pilus_events",
        ):
            assert (root / "n1" / name).exists(), name
        assert (root / "n1" / "progs" / "cil_from_container").exists()

        dp2 = Datapath(cfg, bpf_state_dir, bpffs_root=root)
        dp2.load()
        try:
            assert dp2.endpoints.items() == [EP_A]
            assert dp2.ipcache.items() == [
                (IPv4Network("10.0.0.0/8"), 42, IPv4Address("172.30.0.12"))
            ]
            id2 = {p["name"]: p["prog_id"] for p in dp2.programs()}
            assert id2 != id1  # new programs, old maps
            stats = {m["name"]: m for m in dp2.map_stats()}
            assert stats["pilus_lxc"]["entries"] == 1 and stats["pilus_lxc_if"]["entries"] == 1
            dp2.endpoints.delete(EP_A.ipv4)
            assert dp2.endpoints.items() == []
            assert stats["pilus_lxc"]["type"] == "hash"
        finally:
            dp2.close()
    finally:
        remove_pins("n1", root)
    assert not root.exists()


def test_attach_replace_detach_on_veth(bpf_state_dir):
    """attach/replace/detach through netlink, on a veth created in a throwaway netns."""
    import pyroute2

    ns = f"pilus-t-{os.getpid()}"
    pyroute2.netns.create(ns)
    try:
        pyroute2.netns.pushns(ns)
        try:
            with pyroute2.IPRoute() as ipr:
                ipr.link("add", ifname="lxctest0", kind="veth", peer="eth0")
                idx = ipr.link_lookup(ifname="lxctest0")[0]
            dp = make_datapath(bpf_state_dir)
            try:
                dp.attach_endpoint(idx)
                dp.attach_endpoint(idx)  # idempotent (replace)
                progs = {p["name"]: p for p in dp.programs()}
                assert progs["cil_from_container"]["attached"] == 1
                assert progs["cil_to_container"]["attached"] == 1
                dp2 = make_datapath(bpf_state_dir)  # "agent restart": replace in place
                try:
                    dp2.attach_endpoint(idx)
                    assert {p["name"]: p["attached"] for p in dp2.programs()} == {
                        "cil_from_container": 1,
                        "cil_to_container": 1,
                    }
                    assert {p["name"]: p["attached"] for p in dp.programs()} == {
                        "cil_from_container": 0,
                        "cil_to_container": 0,
                    }
                    dp2.detach_endpoint(idx)
                    assert {p["attached"] for p in dp2.programs()} == {0}
                    dp2.detach_endpoint(idx)  # nothing there: fine
                    dp2.detach_endpoint(999999)  # vanished device: fine
                finally:
                    dp2.close()
            finally:
                dp.close()
        finally:
            pyroute2.netns.popns()
    finally:
        pyroute2.netns.remove(ns)


@pytest.mark.parametrize("flags", ["S", "A", "R", "FA"])
def test_tcp_flags_never_crash(dp, flags):
    pkt = a_eth() / IP(src=str(EP_A.ipv4), dst=str(EP_B.ipv4)) / TCP(sport=1, dport=2, flags=flags)
    assert from_a(dp, pkt).retval == TC_ACT_REDIRECT


def test_events_only_for_types_somebody_listens_to(dp, events):
    """The agent's listen mask: nothing is emitted (nor counted as lost) for a type
    nobody listens to, every drop is still counted in metrics, and a subscriber's
    types come back as soon as the mask has them."""
    a, b = str(EP_A.ipv4), str(EP_B.ipv4)
    spoofed = a_eth() / IP(src="10.200.1.66", dst=b) / UDP()

    def syn(sport):
        return a_eth() / IP(src=a, dst=b) / TCP(sport=sport, dport=8080, flags="S")

    lost0, drops0 = events.lost(), metric(dp, 132, "egress")
    events.set_listen_mask(listen_mask([]))
    assert from_a(dp, spoofed).retval == TC_ACT_SHOT
    assert from_a(dp, syn(51000)).retval == TC_ACT_REDIRECT
    assert events.poll() == [] and events.records == 0
    assert events.lost() == lost0  # not wanted is not lost
    assert metric(dp, 132, "egress") == drops0 + 1

    events.set_listen_mask(listen_mask([frozenset({"drop"})]))
    assert from_a(dp, spoofed).retval == TC_ACT_SHOT
    assert from_a(dp, syn(51001)).retval == TC_ACT_REDIRECT
    assert [(type(e), e.reason) for e in events.poll()] == [(DropEvent, 132)]

    events.set_listen_mask(listen_mask([frozenset({"trace"}), frozenset({"drop"})]))
    assert from_a(dp, spoofed).retval == TC_ACT_SHOT
    assert from_a(dp, syn(51002)).retval == TC_ACT_REDIRECT
    # both reach the ring; the reader decodes only what the caller wants
    got = events.poll(want=lambda t: t == NOTIFY_TRACE)
    assert [(type(e), event_record(e)["ct_state"]) for e in got] == [(TraceEvent, "new")]
    assert events.records == 3
    assert metric(dp, 132, "egress") == drops0 + 3

    # B enforces ingress with nothing allowed: a policy drop, and its verdict event
    # only for a policy-verdict subscriber
    dp.endpoints.upsert(replace(EP_B, flags=ENDPOINT_F_POLICY_INGRESS))
    events.set_listen_mask(listen_mask([frozenset({"drop"})]))
    assert from_a(dp, syn(51003)).retval == TC_ACT_SHOT
    assert [(type(e), e.reason) for e in events.poll()] == [(DropEvent, 133)]
    events.set_listen_mask(listen_mask([frozenset({"policy-verdict"})]))
    assert from_a(dp, syn(51004)).retval == TC_ACT_SHOT
    assert [(type(e), e.verdict) for e in events.poll()] == [(PolicyVerdictEvent, -133)]
    assert metric(dp, 133, "ingress") == 2
