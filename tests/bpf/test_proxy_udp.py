"""The UDP proxy redirect (lib/proxy.h) for the DNS proxy.

BPF_PROG_TEST_RUN (endpoints of test_policy.py): a UDP flow whose allow entry has
a proxy port is recorded with CT_F_PROXY_REDIRECT and its port and handed to the
proxy's socket on that port (no socket: dropped, 178; found: the kernel refuses
bpf_sk_assign in a test run, 179); UDP without a proxy port is delivered as before;
TCP still finds its proxy; a conntrack-new UDP answer from another node is handed to
the stack only when it matches a connected proxy socket (mark 0x0B00) exactly.
On real veths (the throwaway topology of test_veth_delivery): a pod's datagrams
reach a transparent UDP socket in the node namespace with their original
destination and mark 0x0200, also while an answer socket is bound to server:53.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from contextlib import contextmanager, suppress
from dataclasses import replace
from ipaddress import IPv4Network

import pyroute2
import pytest
from lxc_env import EP_A, EP_B, EP_C, NODE_IP, POD_CIDR, ROUTER_IP, enforce, key
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw
from test_policy_veth import setup_endpoints, sock_in
from test_veth_delivery import in_netns, topology  # noqa: F401 - fixture

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    DropEvent,
    PolicyEntry,
    PolicyKey,
    TraceEvent,
    abi,
)
from pilus.datapath.testrun import run_skb
from pilus.node.setup import install_proxy_routing
from pilus.observer.format import event_record

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
ING, EGR = ENDPOINT_F_POLICY_INGRESS, ENDPOINT_F_POLICY_EGRESS
TCP_, UDP_ = 6, 17
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
SO_RCVMARK = 75  # Linux 6.1: the skb mark as a SOL_SOCKET/SO_MARK cmsg
ALLOW_L4 = PolicyEntry(deny=False)
REMOTE = "10.200.2.9"  # another node's pod (ipcache identity 3000)


def l7(port):
    return PolicyEntry(deny=False, proxy_port=port)


def udp(src, dst, dport, sport=40000):
    return (Ether(src=src.mac, dst=src.host_mac) / IP(src=str(src.ipv4), dst=str(dst))
            / UDP(sport=sport, dport=dport) / b"query")


def from_ep(dp, ep, pkt):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=ep.ifindex)


def ct_rows(dp, proto, dport, sport=40000):
    return [c for c in dp.ct.items()
            if c["proto"] in (proto, {6: "TCP", 17: "UDP"}[proto]) and c["dport"] == dport
            and c["sport"] == sport]


def drops(evs):
    return [event_record(e)["reason"] for e in evs if isinstance(e, DropEvent)]


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.fixture
def udp_listener():
    """An unconnected UDP socket on 0.0.0.0 as the DNS proxy's (its port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind(("0.0.0.0", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_udp_with_proxy_port_and_no_socket_is_dropped(dp, events):
    port = free_udp_port()
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, UDP_, 53): l7(port)})
    assert from_ep(dp, a, udp(a, EP_B.ipv4, 53)).retval == TC_ACT_SHOT
    # the next datagram of the flow rides the entry to the proxy again
    assert from_ep(dp, a, udp(a, EP_B.ipv4, 53)).retval == TC_ACT_SHOT
    assert drops(events.poll()) == [abi.DROP_PROXY_LOOKUP_FAILED] * 2
    (e,) = ct_rows(dp, UDP_, 53)
    assert e["flags"] == ["ProxyRedirect"] and e["proxy_port"] == port
    assert dp.metrics.get(0, "egress")[0] == 0  # never delivered around the proxy


def test_udp_finds_only_an_unconnected_wildcard_socket(dp, events, udp_listener):
    a = enforce(dp, EP_A, EGR)
    # a socket on the port bound to an address is not the proxy's listener
    bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with bound:
        bound.bind(("127.0.0.1", 0))
        dp.policy.sync(a.ep_id, {key(EP_B.identity, True, UDP_, 53): l7(bound.getsockname()[1]),
                                 key(EP_B.identity, True, UDP_, 54): l7(udp_listener)})
        assert from_ep(dp, a, udp(a, EP_B.ipv4, 53)).retval == TC_ACT_SHOT
    # the listener is found; a test run cannot assign it (needs a real tc ingress)
    assert from_ep(dp, a, udp(a, EP_B.ipv4, 54)).retval == TC_ACT_SHOT
    assert drops(events.poll()) == [abi.DROP_PROXY_LOOKUP_FAILED, abi.DROP_PROXY_SET_FAILED]


def test_udp_without_proxy_port_and_tcp_redirect_unchanged(dp, events, udp_listener):
    a = enforce(dp, EP_A, EGR)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, UDP_, 53): ALLOW_L4,
                             key(EP_B.identity, True, TCP_, 80): l7(udp_listener)})
    assert from_ep(dp, a, udp(a, EP_B.ipv4, 53)).retval == TC_ACT_REDIRECT
    (e,) = ct_rows(dp, UDP_, 53)
    assert e["flags"] == [] and e["proxy_port"] == 0
    tl = socket.socket()
    tl.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    with tl:
        tl.bind(("0.0.0.0", 0))
        tl.listen(1)
        dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): l7(tl.getsockname()[1])})
        syn = (Ether(src=a.mac, dst=a.host_mac) / IP(src=str(a.ipv4), dst=str(EP_B.ipv4))
               / TCP(sport=40000, dport=80, flags="S"))
        assert from_ep(dp, a, syn).retval == TC_ACT_SHOT
    # TCP: the listener was found (179, not 178)
    assert drops(events.poll()) == [abi.DROP_PROXY_SET_FAILED]
    (t,) = ct_rows(dp, TCP_, 80)
    assert "ProxyRedirect" in t["flags"]


def test_udp_ingress_entry_hairpins_to_the_proxy_port(dp, events):
    """It falls out of the TCP path: to-container marks the hairpin with the port,
    from-container then looks for the UDP socket on it (none here: 178)."""
    port = free_udp_port()
    c = enforce(dp, EP_C, ING)
    dp.ipcache.upsert(IPv4Network(f"{EP_C.ipv4}/32"), EP_C.identity)
    dp.policy.sync(c.ep_id, {key(2, False, UDP_, 5353): l7(port)})
    pkt = (Ether(src=c.host_mac, dst=c.mac) / IP(src="1.1.1.1", dst=str(c.ipv4))
           / UDP(sport=40000, dport=5353) / b"query")
    r = run_skb(dp.prog_fd("cil_to_container"), raw(pkt), ifindex=1)
    assert (r.retval, r.ctx.mark) == (TC_ACT_REDIRECT, abi.MARK_MAGIC_TO_PROXY | port << 16)
    (e,) = ct_rows(dp, UDP_, 5353)
    assert e["flags"] == ["Ingress", "ProxyRedirect"] and e["proxy_port"] == port
    r = run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=c.ifindex,
                mark=abi.MARK_MAGIC_TO_PROXY | port << 16)
    assert r.retval == TC_ACT_SHOT
    assert drops(events.poll()) == [abi.DROP_PROXY_LOOKUP_FAILED]


@contextmanager
def scratch_netns():
    """A namespace of its own for sockets with pod addresses (test runs use the
    caller's namespace for socket lookups)."""
    name = f"pilus-tu-{os.getpid() % 100000}"
    pyroute2.netns.create(name)
    try:
        with pyroute2.IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            # a route towards REMOTE for connect() (a veth pair: no dummy devices
            # on every kernel)
            ipr.link("add", ifname="v0", kind="veth", peer={"ifname": "v1"})
            for dev in ("v0", "v1"):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], state="up")
            ipr.addr("add", index=ipr.link_lookup(ifname="v0")[0], address="10.200.2.1",
                     prefixlen=24)
        with in_netns(name):
            yield
    finally:
        with suppress(OSError):
            pyroute2.netns.remove(name)


def upstream_socket(port: int, mark: int, connect=True) -> socket.socket:
    """A proxy's upstream socket: transparent, bound to C's address, connected to REMOTE:53."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.bind((str(EP_C.ipv4) if connect else "0.0.0.0", port))
    if connect:
        s.connect((REMOTE, 53))
    return s


def test_udp_answer_from_another_node_finds_the_upstream_socket(dp, events):
    """lib/deliver.h: no conntrack entry (the query left through the stack); only an
    exact, connected, proxy-marked socket takes the answer before policy."""
    c = enforce(dp, EP_C, ING)  # enforced, nothing allowed
    dp.endpoints.upsert(c)
    dp.ipcache.upsert(IPv4Network(f"{EP_C.ipv4}/32"), EP_C.identity)
    dp.ipcache.upsert(IPv4Network(f"{REMOTE}/32"), 3000)
    dp.policy.sync(c.ep_id, {})

    def answer(dport):
        pkt = (Ether(dst="02:00:00:00:aa:01") / IP(src=REMOTE, dst=str(EP_C.ipv4))
               / UDP(sport=53, dport=dport) / b"answer")
        return run_skb(dp.prog_fd("cil_from_netdev"), raw(pkt), ingress_ifindex=50)

    with scratch_netns():
        up = upstream_socket(51000, abi.MARK_MAGIC_PROXY_EGRESS)
        plain = upstream_socket(51001, 0)  # connected, but no proxy's
        wild = upstream_socket(51002, abi.MARK_MAGIC_PROXY_EGRESS, connect=False)
        with up, plain, wild:
            r = answer(51000)
            assert (r.retval, r.ctx.mark) == (TC_ACT_OK, abi.MARK_MAGIC_TO_PROXY)
            assert answer(51001).retval == TC_ACT_SHOT
            assert answer(51002).retval == TC_ACT_SHOT
    evs = events.poll()
    assert drops(evs) == [abi.DROP_POLICY] * 2
    points = [event_record(e)["observation_point"] for e in evs if isinstance(e, TraceEvent)]
    assert points == ["to-proxy"]
    assert ct_rows(dp, UDP_, 51000, sport=53) == []  # not a connection to the pod


# ------------------------------------------------------------------ real veths

DNS_PORT = 15053


def origdst(cmsgs) -> tuple[str, int] | None:
    for level, kind, data in cmsgs:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
            port, addr = struct.unpack_from("!2xH4s", data)
            return socket.inet_ntoa(addr), port
    return None


def cmsg_mark(cmsgs) -> int | None:
    for level, kind, data in cmsgs:
        if level == socket.SOL_SOCKET and kind == socket.SO_MARK:
            return struct.unpack("I", data[:4])[0]
    return None


@pytest.fixture
def veth_dp(tmp_path_factory):
    cfg = DatapathConfig("veth-udp-proxy", ROUTER_IP, NODE_IP, POD_CIDR)
    dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "veth-udp-state", bpffs_root=None)
    dp.load()
    try:
        yield dp
    finally:
        dp.close()


def test_pod_datagrams_reach_the_transparent_socket(topology, veth_dp):  # noqa: F811
    node, (pod1, pod2), (ep1, ep2) = topology
    dp = veth_dp
    install_proxy_routing(netns=node)
    with in_netns(node):
        lst = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ans = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv = sock_in(pod2, socket.AF_INET, socket.SOCK_DGRAM)
    cli = sock_in(pod1, socket.AF_INET, socket.SOCK_DGRAM)
    with lst, ans, srv, cli:
        for s in (lst, ans):
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        lst.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        lst.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
        lst.bind(("0.0.0.0", DNS_PORT))
        lst.settimeout(3)
        # the proxy's answer socket for this server: it must not take queries
        ans.bind((str(ep2.ipv4), 53))
        srv.bind((str(ep2.ipv4), 53))
        srv.setblocking(False)
        ep1 = replace(ep1, flags=ENDPOINT_F_POLICY_EGRESS)
        dp.policy.sync(ep1.ep_id, {
            PolicyKey(ep2.identity, True, UDP_, 53, 16): PolicyEntry(deny=False, proxy_port=DNS_PORT)})
        setup_endpoints(dp, node, (ep1, ep2))
        try:
            with dp.events() as reader:
                cli.connect((str(ep2.ipv4), 53))
                got = []
                for payload in (b"q1", b"q2"):
                    cli.send(payload)
                    data, cmsgs, _flags, peer = lst.recvmsg(100, 256)
                    got.append((data, peer, origdst(cmsgs), cmsg_mark(cmsgs)))
                evs = reader.poll()
            cport = cli.getsockname()[1]
            want = [(p, (str(ep1.ipv4), cport), (str(ep2.ipv4), 53), abi.MARK_MAGIC_TO_PROXY)
                    for p in (b"q1", b"q2")]
            assert got == want
            # the server got nothing (and the answer socket neither)
            for s in (srv, ans):
                s.setblocking(False)
                with pytest.raises(OSError) as exc:
                    s.recv(100)
                assert exc.value.errno == errno.EAGAIN
            (e,) = [c for c in dp.ct.items() if c["dport"] == 53 and c["sport"] == cport]
            assert e["flags"] == ["ProxyRedirect"] and e["proxy_port"] == DNS_PORT
            traces = [event_record(x) for x in evs if isinstance(x, TraceEvent)]
            assert [t["observation_point"] for t in traces if t.get("dport") == 53] == ["to-proxy"]
        finally:
            with in_netns(node):
                for ep in (ep1, ep2):
                    dp.detach_endpoint(ep.ifindex)
