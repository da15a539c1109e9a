"""End to end on real veths: pod-to-pod UDP delivered by bpf_redirect_peer.

Three throwaway namespaces (a node and two pods), the datapath attached on the
node side of each veth, no pins; everything is removed afterwards.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager, suppress
from ipaddress import IPv4Address, IPv4Network

import pyroute2
import pytest
from lxc_env import NODE_IP, POD_CIDR, ROUTER_IP

from pilus.datapath import Datapath, DatapathConfig, EndpointInfo, TraceEvent
from pilus.observer.format import event_record


@contextmanager
def in_netns(name):
    pyroute2.netns.pushns(name)
    try:
        yield
    finally:
        pyroute2.netns.popns()


def _mac(ipr, ifname):
    link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
    return link.get_attr("IFLA_ADDRESS")


@pytest.fixture
def topology():
    tag = f"{os.getpid() % 100000}"
    node, pods = f"pilus-tn-{tag}", [f"pilus-tp{i}-{tag}" for i in (1, 2)]
    created = []
    try:
        for ns in (node, *pods):
            pyroute2.netns.create(ns)
            created.append(ns)
        eps = []
        for i, pod in enumerate(pods):
            ip = IPv4Address(f"10.200.1.{5 + i}")
            lxc = f"lxct{i}"
            with in_netns(node), pyroute2.IPRoute() as ipr:
                ipr.link("add", ifname=lxc, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
                idx = ipr.link_lookup(ifname=lxc)[0]
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst=f"{ip}/32", oif=idx)
                host_mac = _mac(ipr, lxc)
            with in_netns(pod), pyroute2.IPRoute() as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                e0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=e0, state="up")
                ipr.addr("add", index=e0, address=str(ip), prefixlen=32)
                ipr.route("add", dst=f"{ROUTER_IP}/32", oif=e0, scope=253)
                ipr.route("add", dst="0.0.0.0/0", gateway=str(ROUTER_IP), oif=e0)
                pod_mac = _mac(ipr, "eth0")
            eps.append(
                EndpointInfo(
                    ipv4=ip,
                    ifindex=idx,
                    ep_id=10 + i,
                    identity=2000 + i,
                    mac=pod_mac,
                    host_mac=host_mac,
                )
            )
        yield node, pods, eps
    finally:
        for ns in created:
            with suppress(OSError):
                pyroute2.netns.remove(ns)


def test_udp_pod_to_pod_delivery(topology, tmp_path_factory):
    node, (pod1, pod2), (ep1, ep2) = topology
    cfg = DatapathConfig("veth-test", ROUTER_IP, NODE_IP, POD_CIDR)
    dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "veth-state", bpffs_root=None)
    dp.load()
    try:
        for ep in (ep1, ep2):
            dp.endpoints.upsert(ep)
            dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
        with in_netns(node):
            dp.attach_endpoint(ep1.ifindex)
            dp.attach_endpoint(ep2.ifindex)
        with dp.events() as reader:
            with in_netns(pod2):
                rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with in_netns(pod1):
                tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                rx.bind((str(ep2.ipv4), 9999))
                rx.settimeout(3)
                tx.sendto(b"through the peer", (str(ep2.ipv4), 9999))
                data, (src, sport) = rx.recvfrom(100)
                assert data == b"through the peer" and src == str(ep1.ipv4)
                # and back, on the same flow (a CT reply)
                rx.sendto(b"pong", (src, sport))
                tx.settimeout(3)
                assert tx.recvfrom(100)[0] == b"pong"
            finally:
                rx.close()
                tx.close()
            traces = [event_record(e) for e in reader.poll() if isinstance(e, TraceEvent)]
        udp = [t for t in traces if t["proto"] == "UDP"]
        assert [(t["observation_point"], t["ct_state"], t["dst_ep"]) for t in udp] == [
            ("to-endpoint", "new", ep2.ep_id),
            ("to-endpoint", "reply", ep1.ep_id),
        ]
        assert udp[0]["ifindex"] == ep2.ifindex
        flows = [c for c in dp.ct.items() if c["proto"] == "UDP" and c["dport"] == 9999]
        assert flows and flows[0]["tx_packets"] == 1 and flows[0]["rx_packets"] == 1
        with in_netns(node):
            assert {p["name"]: p["attached"] for p in dp.programs()} == {
                "cil_from_container": 2,
                "cil_to_container": 2,
            }
            dp.detach_endpoint(ep1.ifindex)
            dp.detach_endpoint(ep2.ifindex)
    finally:
        dp.close()
