"""Service load balancing in cil_from_container / cil_to_container (BPF_PROG_TEST_RUN):
DNAT to a backend with valid checksums, reverse NAT of replies, stickiness,
backend states, Maglev, affinity, hairpin and services without backends."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from lxc_env import EP_A, EP_B
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath.events import DropEvent
from pilus.datapath.lb import BackendEntry, Frontend
from pilus.datapath.testrun import run_skb
from pilus.loadbalancer.maglev import build_table
from pilus.observer.format import event_record

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VIP = "10.96.0.10"
LOOPBACK = "169.254.42.1"
REMOTE_BE = "10.200.2.9"  # a pod on another node: reached through the stack


def from_ep(dp, pkt, ep=EP_A):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=ep.ifindex)


def to_container(dp, pkt):
    return run_skb(dp.prog_fd("cil_to_container"), raw(pkt), ifindex=1)


def eth(ep=EP_A):
    return Ether(src=ep.mac, dst=ep.host_mac)


def checksums_ok(frame: bytes) -> bool:
    """IP and L4 checksums the datapath left equal freshly computed ones."""
    pkt = Ether(frame)
    ip = pkt[IP]
    got_ip = ip.chksum
    l4 = ip.payload
    got_l4 = l4.chksum
    fresh = IP(raw(ip))
    del fresh.chksum
    del fresh.payload.chksum
    fresh = IP(raw(fresh))
    return got_ip == fresh.chksum and got_l4 == fresh.payload.chksum


def metric(dp, reason, direction="egress"):
    return dp.metrics.get(reason, direction)[0]


def backend(bid, ip, port=8080, proto="TCP", state="active"):
    return BackendEntry(bid, IPv4Address(ip), port, proto, state)


def add_service(dp, svc_id, backends, vip=VIP, port=80, proto="TCP", algorithm="random",
                affinity=0):
    fe = Frontend(IPv4Address(vip), port, proto)
    table = None
    if algorithm == "maglev":
        table = build_table(
            [(b.id, str(b)) for b in backends if b.state == "active"],
            dp.lb.maglev_table_size,
        )
    dp.lb.upsert_service(svc_id, fe, backends, algorithm=algorithm, maglev_table=table,
                         affinity_timeout=affinity)
    return fe


def test_syn_to_frontend_is_dnated_and_reply_reverse_translated(dp, events):
    add_service(dp, 1, [backend(11, EP_B.ipv4)])
    a, b = str(EP_A.ipv4), str(EP_B.ipv4)
    syn = eth() / IP(src=a, dst=VIP, ttl=64) / TCP(sport=40001, dport=80, flags="S", seq=1000)
    r = from_ep(dp, syn)
    assert r.retval == TC_ACT_REDIRECT  # straight into the backend pod
    out = Ether(r.data)
    assert out.dst == EP_B.mac
    assert out[IP].src == a and out[IP].dst == b
    assert out[TCP].sport == 40001 and out[TCP].dport == 8080
    assert out[IP].ttl == 63
    assert checksums_ok(r.data)

    # the connection is tracked on the backend's tuple, with the service id
    ct = [c for c in dp.ct.items() if c["dport"] == 8080 and c["sport"] == 40001]
    assert len(ct) == 1 and ct[0]["dst"] == b

    synack = (eth(EP_B) / IP(src=b, dst=a) / TCP(sport=8080, dport=40001, flags="SA", seq=5,
                                                 ack=1001))
    r = from_ep(dp, synack, EP_B)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert out.dst == EP_A.mac
    assert out[IP].src == VIP and out[IP].dst == a
    assert out[TCP].sport == 80 and out[TCP].dport == 40001
    assert checksums_ok(r.data)

    # the rest of the connection sticks to the backend
    ack = eth() / IP(src=a, dst=VIP) / TCP(sport=40001, dport=80, flags="A", seq=1001, ack=6)
    r = from_ep(dp, ack)
    assert r.retval == TC_ACT_REDIRECT and Ether(r.data)[IP].dst == b
    svc_ct = sorted(dp.lb.ct_items(), key=lambda c: c["kind"])
    assert [(c["kind"], c["client"], c["frontend"], c["backend_id"], c["service_id"])
            for c in svc_ct] == [
        ("revnat", f"{a}:40001", f"{VIP}:80", 11, 1),
        ("service", f"{a}:40001", f"{VIP}:80", 11, 1),
    ]
    assert svc_ct[0]["backend"] == f"{b}:8080"
    assert 0 < svc_ct[1]["expires_in_s"] <= 8000


def test_udp_with_and_without_checksum(dp):
    add_service(dp, 2, [backend(21, EP_B.ipv4, 5353, "UDP")], port=53, proto="UDP")
    a = str(EP_A.ipv4)
    pkt = eth() / IP(src=a, dst=VIP) / UDP(sport=33000, dport=53) / b"query"
    r = from_ep(dp, pkt)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert (out[IP].dst, out[UDP].dport) == (str(EP_B.ipv4), 5353)
    assert checksums_ok(r.data)
    # UDP checksum 0 ("none") stays 0
    nock = IP(raw(IP(src=a, dst=VIP) / UDP(sport=33001, dport=53) / b"query"))
    nock[UDP].chksum = 0
    r = from_ep(dp, eth() / nock)
    out = Ether(r.data)
    assert out[UDP].chksum == 0 and out[UDP].dport == 5353
    reply = eth(EP_B) / IP(src=str(EP_B.ipv4), dst=a) / UDP(sport=5353, dport=33000) / b"answer"
    r = from_ep(dp, reply, EP_B)
    out = Ether(r.data)
    assert (out[IP].src, out[UDP].sport) == (VIP, 53)
    assert checksums_ok(r.data)


def test_remote_backend_reply_through_to_container(dp):
    """Backend on another node: the request goes to the stack, the reply comes
    back through the client's to-container and is reverse-translated there."""
    # the client's lxc is loopback (ifindex 1) for to-container runs
    client = type(EP_A)(ipv4=IPv4Address("10.200.1.7"), ifindex=1, ep_id=7, identity=1007,
                        mac="02:00:00:00:00:07", host_mac="02:00:00:00:01:07")
    dp.endpoints.upsert(client)
    dp.ipcache.upsert(IPv4Network(f"{client.ipv4}/32"), client.identity)
    add_service(dp, 3, [backend(31, REMOTE_BE)])
    c = str(client.ipv4)
    syn = eth(client) / IP(src=c, dst=VIP) / TCP(sport=41000, dport=80, flags="S")
    r = run_skb(dp.prog_fd("cil_from_container"), raw(syn), ingress_ifindex=1)
    assert r.retval == TC_ACT_OK
    out = Ether(r.data)
    assert (out[IP].dst, out[TCP].dport) == (REMOTE_BE, 8080)
    assert checksums_ok(r.data)
    synack = Ether() / IP(src=REMOTE_BE, dst=c) / TCP(sport=8080, dport=41000, flags="SA")
    r = to_container(dp, synack)
    assert r.retval == TC_ACT_OK
    out = Ether(r.data)
    assert (out[IP].src, out[TCP].sport) == (VIP, 80)
    assert checksums_ok(r.data)


def test_no_backend_syn_gets_rst_and_drop_is_counted(dp, events):
    add_service(dp, 4, [], port=81)
    a = str(EP_A.ipv4)
    before = metric(dp, 158)
    syn = eth() / IP(src=a, dst=VIP) / TCP(sport=42000, dport=81, flags="S", seq=7777)
    r = from_ep(dp, syn)
    assert r.retval == TC_ACT_REDIRECT  # the RST goes back to the pod at once
    out = Ether(r.data)
    assert out.dst == EP_A.mac and out.src == EP_A.host_mac
    assert (out[IP].src, out[IP].dst) == (VIP, a)
    assert (out[TCP].sport, out[TCP].dport) == (81, 42000)
    assert out[TCP].flags == "RA" and out[TCP].ack == 7778
    assert len(out[TCP].payload) == 0
    assert checksums_ok(r.data)
    assert metric(dp, 158) == before + 1
    drops = [e for e in events.poll() if isinstance(e, DropEvent)]
    assert [d.reason for d in drops] == [158]
    assert event_record(drops[0])["reason_desc"] == "Service backend not found"
    # nothing tracked
    assert [c for c in dp.ct.items() if c["sport"] == 42000] == []
    # a non-SYN is just dropped
    ack = eth() / IP(src=a, dst=VIP) / TCP(sport=42000, dport=81, flags="A")
    assert from_ep(dp, ack).retval == TC_ACT_SHOT
    assert metric(dp, 158) == before + 2


def test_no_backend_udp_gets_icmp_port_unreachable(dp, events):
    add_service(dp, 5, [backend(51, EP_B.ipv4, 53, "UDP", state="terminating")], port=53,
                proto="UDP")
    a = str(EP_A.ipv4)
    pkt = eth() / IP(src=a, dst=VIP, id=42) / UDP(sport=43000, dport=53) / (b"x" * 100)
    r = from_ep(dp, pkt)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert (out[IP].src, out[IP].dst) == (VIP, a)
    icmp = out[ICMP]
    assert (icmp.type, icmp.code) == (3, 3)
    assert out[IPerror].dst == VIP and out[IPerror].id == 42
    assert out[UDPerror].sport == 43000 and out[UDPerror].dport == 53
    got = icmp.chksum
    fresh = ICMP(raw(icmp))
    del fresh.chksum
    assert ICMP(raw(fresh)).chksum == got
    assert checksums_ok(r.data)
    assert [e.reason for e in events.poll() if isinstance(e, DropEvent)] == [158]


def test_terminating_backend_keeps_existing_connections_only(dp):
    b1, b2 = backend(61, EP_B.ipv4), backend(62, REMOTE_BE)
    add_service(dp, 6, [b1, b2], port=82)
    a = str(EP_A.ipv4)

    def syn(sport):
        return eth() / IP(src=a, dst=VIP) / TCP(sport=sport, dport=82, flags="S")

    def ack(sport):
        return eth() / IP(src=a, dst=VIP) / TCP(sport=sport, dport=82, flags="A")

    chosen = {}
    for sport in range(50000, 50040):
        chosen[sport] = Ether(from_ep(dp, syn(sport)).data)[IP].dst
    assert set(chosen.values()) == {str(EP_B.ipv4), REMOTE_BE}  # random uses both
    # b1 terminates: established flows to it continue, new flows avoid it
    add_service(dp, 6, [backend(61, EP_B.ipv4, state="terminating"), b2], port=82)
    for sport, dst in chosen.items():
        assert Ether(from_ep(dp, ack(sport)).data)[IP].dst == dst
    for sport in range(51000, 51040):
        assert Ether(from_ep(dp, syn(sport)).data)[IP].dst == REMOTE_BE
    # maintenance / quarantined: not selected either
    add_service(dp, 6, [b1, backend(62, REMOTE_BE, state="maintenance")], port=82)
    for sport in range(52000, 52020):
        assert Ether(from_ep(dp, syn(sport)).data)[IP].dst == str(EP_B.ipv4)
    # a backend removed altogether: its flows are moved to a remaining one
    add_service(dp, 6, [b1], port=82)
    dp.lb.delete_backend(62)
    moved = [s for s, d in chosen.items() if d == REMOTE_BE]
    assert Ether(from_ep(dp, ack(moved[0])).data)[IP].dst == str(EP_B.ipv4)


def _jhash_3words(a, b, c, initval):
    m = 0xFFFFFFFF

    def rol(x, s):
        return ((x << s) | (x >> (32 - s))) & m

    initval = (initval + 0xDEADBEEF + 12) & m
    a, b, c = (a + initval) & m, (b + initval) & m, (c + initval) & m
    c ^= b; c = (c - rol(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - rol(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - rol(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - rol(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - rol(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - rol(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - rol(b, 24)) & m  # noqa: E702
    return c


def test_maglev_uses_the_table(dp):
    bes = [backend(70 + i, f"10.200.3.{i + 1}") for i in range(5)]
    add_service(dp, 7, bes, port=83, algorithm="maglev")
    table = dp.lb.maglev_get(7)
    assert table is not None and len(table) == dp.lb.maglev_table_size
    by_id = {b.id: str(b.address) for b in bes}
    a = str(EP_A.ipv4)
    seed = dp.cfg.lb.maglev_seed
    for sport in range(45000, 45050):
        pkt = eth() / IP(src=a, dst=VIP) / TCP(sport=sport, dport=83, flags="S")
        got = Ether(from_ep(dp, pkt).data)[IP].dst
        h = _jhash_3words(int(IPv4Address(a)), int(IPv4Address(VIP)), (sport << 16) | 83,
                          seed ^ 6)
        assert got == by_id[table[h % len(table)]]


def test_session_affinity_client_ip(dp):
    bes = [backend(80 + i, f"10.200.3.{10 + i}") for i in range(4)]
    add_service(dp, 8, bes, port=84, affinity=60)
    a = str(EP_A.ipv4)
    dsts = set()
    for sport in range(46000, 46030):
        pkt = eth() / IP(src=a, dst=VIP) / TCP(sport=sport, dport=84, flags="S")
        dsts.add(Ether(from_ep(dp, pkt).data)[IP].dst)
    assert len(dsts) == 1
    # the remembered backend leaves the service: affinity is not honoured any more
    gone = dsts.pop()
    add_service(dp, 8, [b for b in bes if str(b.address) != gone], port=84, affinity=60)
    pkt = eth() / IP(src=a, dst=VIP) / TCP(sport=47000, dport=84, flags="S")
    assert Ether(from_ep(dp, pkt).data)[IP].dst != gone


def test_hairpin_pod_reaches_itself_through_the_service(dp):
    add_service(dp, 9, [backend(91, EP_A.ipv4)], port=85)
    a = str(EP_A.ipv4)
    syn = eth() / IP(src=a, dst=VIP) / TCP(sport=48000, dport=85, flags="S")
    r = from_ep(dp, syn)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert out.dst == EP_A.mac
    assert (out[IP].src, out[IP].dst) == (LOOPBACK, a)
    assert (out[TCP].sport, out[TCP].dport) == (48000, 8080)
    assert checksums_ok(r.data)
    synack = eth() / IP(src=a, dst=LOOPBACK) / TCP(sport=8080, dport=48000, flags="SA")
    r = from_ep(dp, synack)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert (out[IP].src, out[IP].dst) == (VIP, a)
    assert (out[TCP].sport, out[TCP].dport) == (85, 48000)
    assert checksums_ok(r.data)


def test_non_service_traffic_untouched_and_delete(dp):
    fe = add_service(dp, 10, [backend(101, EP_B.ipv4)], port=86)
    a = str(EP_A.ipv4)
    other = eth() / IP(src=a, dst=VIP) / TCP(sport=49000, dport=87, flags="S")
    r = from_ep(dp, other)
    assert r.retval == TC_ACT_OK and Ether(r.data)[IP].dst == VIP
    assert [s.id for s in dp.lb.items()] == [10]
    assert dp.lb.delete_service(10, fe)
    assert dp.lb.items() == []
    syn = eth() / IP(src=a, dst=VIP) / TCP(sport=49001, dport=86, flags="S")
    assert Ether(from_ep(dp, syn).data)[IP].dst == VIP


@pytest.mark.parametrize("m", [251, 16381])
def test_maglev_table_size_is_a_load_time_setting(bpf_state_dir, m):
    from dataclasses import replace

    from lxc_env import make_datapath

    from pilus.datapath.lb import LbConfig

    dp = make_datapath(bpf_state_dir)
    try:
        cfg = replace(dp.cfg, lb=LbConfig(maglev_table_size=m))
    finally:
        dp.close()
    from pilus.datapath import Datapath

    d = Datapath(cfg, bpf_state_dir, bpffs_root=None)
    d.load()
    try:
        d.endpoints.upsert(EP_A)
        d.endpoints.upsert(EP_B)
        bes = [backend(1, EP_B.ipv4), backend(2, REMOTE_BE)]
        table = build_table([(b.id, str(b)) for b in bes], m)
        d.lb.upsert_service(1, Frontend(IPv4Address(VIP), 80), bes, algorithm="maglev",
                            maglev_table=table)
        assert d.lb.maglev_get(1) == table
        syn = eth() / IP(src=str(EP_A.ipv4), dst=VIP) / TCP(sport=1234, dport=80, flags="S")
        r = run_skb(d.prog_fd("cil_from_container"), raw(syn), ingress_ifindex=EP_A.ifindex)
        assert Ether(r.data)[IP].dst in (str(EP_B.ipv4), REMOTE_BE)
    finally:
        d.close()


def test_policy_applies_to_the_backend_after_translation(dp, events):
    """Egress policy of the client and ingress policy of the backend see the
    backend's identity and port, not the frontend's."""
    from dataclasses import replace

    from pilus.datapath import (
        ENDPOINT_F_POLICY_EGRESS,
        ENDPOINT_F_POLICY_INGRESS,
        PolicyEntry,
        PolicyKey,
    )

    add_service(dp, 11, [backend(111, EP_B.ipv4, 8080)], port=88)
    a = replace(EP_A, flags=ENDPOINT_F_POLICY_EGRESS)
    b = replace(EP_B, flags=ENDPOINT_F_POLICY_INGRESS)
    dp.endpoints.upsert(a)
    dp.endpoints.upsert(b)
    allow = PolicyEntry(deny=False)
    # A may talk to B's identity on 8080; B accepts A's identity on 8080
    dp.policy.sync(a.ep_id, {PolicyKey(EP_B.identity, True, 6, 8080, 16): allow})
    dp.policy.sync(b.ep_id, {PolicyKey(EP_A.identity, False, 6, 8080, 16): allow})
    syn = eth() / IP(src=str(EP_A.ipv4), dst=VIP) / TCP(sport=44000, dport=88, flags="S")
    r = from_ep(dp, syn)
    assert r.retval == TC_ACT_REDIRECT and Ether(r.data)[IP].dst == str(EP_B.ipv4)
    # a rule for the frontend's port would not have been enough
    dp.policy.sync(a.ep_id, {PolicyKey(EP_B.identity, True, 6, 88, 16): allow})
    syn2 = eth() / IP(src=str(EP_A.ipv4), dst=VIP) / TCP(sport=44001, dport=88, flags="S")
    assert from_ep(dp, syn2).retval == TC_ACT_SHOT
    drops = [e for e in events.poll() if isinstance(e, DropEvent)]
    assert drops and drops[-1].reason == 133
    assert event_record(drops[-1])["dst_ip"] == str(EP_B.ipv4)


NODE = "172.30.0.11"  # lxc_env.NODE_IP
CLIENT = "172.30.0.200"  # outside the cluster


def test_nodeport_from_outside_and_reply(dp, events):
    from pilus.datapath import lb as lbm

    # the backend sits on ifindex 1 so that both of its programs can run
    be_ep = type(EP_A)(ipv4=IPv4Address("10.200.1.7"), ifindex=1, ep_id=7, identity=1007,
                       mac="02:00:00:00:00:07", host_mac="02:00:00:00:01:07")
    dp.endpoints.upsert(be_ep)
    dp.ipcache.upsert(IPv4Network(f"{be_ep.ipv4}/32"), be_ep.identity)
    bes = [backend(121, be_ep.ipv4, 8080)]
    dp.lb.upsert_service(12, Frontend(IPv4Address(NODE), 30080), bes,
                         flags=lbm.SVC_FLAG_NODEPORT | lbm.SVC_FLAG_ROUTABLE)
    dp.lb.upsert_service(13, Frontend(IPv4Address(VIP), 80), bes)  # ClusterIP
    dp.lb.upsert_service(14, Frontend(IPv4Address(NODE), 30081), [],
                         flags=lbm.SVC_FLAG_NODEPORT | lbm.SVC_FLAG_ROUTABLE)
    netdev = dp.prog_fd("cil_from_netdev")
    wire = Ether(src="02:aa:00:00:00:01", dst="02:bb:00:00:00:01")
    syn = wire / IP(src=CLIENT, dst=NODE) / TCP(sport=50500, dport=30080, flags="S", seq=9)
    r = run_skb(netdev, raw(syn), ingress_ifindex=2)
    # straight into the local backend (BPF host routing), tracked there (world -> backend)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert (out[IP].src, out[IP].dst, out[TCP].dport) == (CLIENT, str(be_ep.ipv4), 8080)
    assert (out.src, out.dst) == (be_ep.host_mac, be_ep.mac)
    assert checksums_ok(r.data)
    # the backend's reply leaves with the node address and node port as source
    synack = (Ether(src=be_ep.mac, dst=be_ep.host_mac)
              / IP(src=str(be_ep.ipv4), dst=CLIENT) / TCP(sport=8080, dport=50500, flags="SA"))
    r = run_skb(dp.prog_fd("cil_from_container"), raw(synack), ingress_ifindex=1)
    assert r.retval == TC_ACT_OK
    out = Ether(r.data)
    assert (out[IP].src, out[TCP].sport, out[IP].dst) == (NODE, 30080, CLIENT)
    assert checksums_ok(r.data)
    # a ClusterIP is not reachable from outside: left alone
    cip = wire / IP(src=CLIENT, dst=VIP) / TCP(sport=50501, dport=80, flags="S")
    r = run_skb(netdev, raw(cip), ingress_ifindex=2)
    assert r.retval == TC_ACT_OK and Ether(r.data)[IP].dst == VIP
    # no backend: RST back out of the device, drop counted (ingress)
    before = metric(dp, 158, "ingress")
    nob = wire / IP(src=CLIENT, dst=NODE) / TCP(sport=50502, dport=30081, flags="S", seq=1)
    r = run_skb(netdev, raw(nob), ingress_ifindex=2)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert out.dst == "02:aa:00:00:00:01" and out[TCP].flags == "RA" and out[IP].src == NODE
    assert metric(dp, 158, "ingress") == before + 1
    # anything else passes untouched
    other = wire / IP(src=CLIENT, dst=NODE) / UDP(sport=1, dport=53)
    assert run_skb(netdev, raw(other), ingress_ifindex=2).retval == TC_ACT_OK


def test_direct_connection_reusing_a_service_tuple_is_not_reverse_translated(dp):
    add_service(dp, 15, [backend(151, EP_B.ipv4)], port=89)
    a, b = str(EP_A.ipv4), str(EP_B.ipv4)
    via_vip = eth() / IP(src=a, dst=VIP) / TCP(sport=45500, dport=89, flags="S")
    assert Ether(from_ep(dp, via_vip).data)[IP].dst == b
    rst = eth() / IP(src=a, dst=VIP) / TCP(sport=45500, dport=89, flags="R")
    from_ep(dp, rst)
    # the same client port now connects to the backend directly
    direct = eth() / IP(src=a, dst=b) / TCP(sport=45500, dport=8080, flags="S")
    assert from_ep(dp, direct).retval == TC_ACT_REDIRECT
    synack = eth(EP_B) / IP(src=b, dst=a) / TCP(sport=8080, dport=45500, flags="SA")
    out = Ether(from_ep(dp, synack, EP_B).data)
    assert (out[IP].src, out[TCP].sport) == (b, 8080)  # not rewritten to the VIP
