"""Services on real veths and real sockets: ClusterIP TCP/UDP, hairpin, and a
service without backends refusing at once. Namespaces as in test_veth_delivery
(a node and two pods), the datapath attached to both lxc devices, no pins."""

from __future__ import annotations

import errno
import socket
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from lxc_env import NODE_IP, POD_CIDR, ROUTER_IP
from test_veth_delivery import in_netns, topology  # noqa: F401 (fixture)

from pilus.datapath import Datapath, DatapathConfig
from pilus.datapath.lb import BackendEntry, Frontend

VIP = "10.96.0.10"


def _tcp_server(sock):
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(f"{peer[0]}:{peer[1]}".encode())


@pytest.fixture
def lbnet(topology, tmp_path_factory):  # noqa: F811
    node, pods, eps = topology
    cfg = DatapathConfig("lb-veth-test", ROUTER_IP, NODE_IP, POD_CIDR)
    dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "lb-veth-state", bpffs_root=None)
    dp.load()
    try:
        for ep in eps:
            dp.endpoints.upsert(ep)
            dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
        with in_netns(node):
            for ep in eps:
                dp.attach_endpoint(ep.ifindex)
        yield dp, pods, eps
    finally:
        dp.close()


def listen(netns, ip, port, kind=socket.SOCK_STREAM):
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    if kind == socket.SOCK_STREAM:
        s.listen(16)
        threading.Thread(target=_tcp_server, args=(s,), daemon=True).start()
    return s


def connect(netns, ip, port, timeout=3.0):
    with in_netns(netns):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(timeout)
    try:
        c.connect((ip, port))
        peer = c.getpeername()
        data = c.recv(100).decode()
        return peer, data
    finally:
        c.close()


def test_clusterip_tcp_and_udp_through_real_sockets(lbnet):
    dp, (pod1, pod2), (ep1, ep2) = lbnet
    be = BackendEntry(1, ep2.ipv4, 8080, "TCP")
    dp.lb.upsert_service(1, Frontend(IPv4Address(VIP), 80, "TCP"), [be])
    ube = BackendEntry(2, ep2.ipv4, 5353, "UDP")
    dp.lb.upsert_service(2, Frontend(IPv4Address(VIP), 53, "UDP"), [ube])
    srv = listen(pod2, str(ep2.ipv4), 8080)
    usrv = listen(pod2, str(ep2.ipv4), 5353, socket.SOCK_DGRAM)
    try:
        for _ in range(5):  # several connections, each set up and torn down
            peer, seen = connect(pod1, VIP, 80)
            assert peer == (VIP, 80)  # the client talks to the service address
            assert seen.split(":")[0] == str(ep1.ipv4)  # the backend sees the client
        with in_netns(pod1):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.settimeout(3)
            u.connect((VIP, 53))  # connected: replies must come from VIP:53
            u.send(b"q")
            data, peer = usrv.recvfrom(100)
            assert data == b"q" and peer[0] == str(ep1.ipv4)
            usrv.sendto(b"a", peer)
            assert u.recv(100) == b"a"
        finally:
            u.close()
    finally:
        srv.close()
        usrv.close()


def test_hairpin_pod_reaches_itself(lbnet):
    dp, (pod1, _), (ep1, _) = lbnet
    dp.lb.upsert_service(3, Frontend(IPv4Address(VIP), 81, "TCP"),
                         [BackendEntry(3, ep1.ipv4, 8081, "TCP")])
    srv = listen(pod1, "0.0.0.0", 8081)
    try:
        peer, seen = connect(pod1, VIP, 81)
        assert peer == (VIP, 81)
        assert seen.split(":")[0] == "169.254.42.1"  # the pod sees the loopback address
    finally:
        srv.close()


def test_service_without_backends_refuses_at_once(lbnet):
    dp, (pod1, _), _ = lbnet
    dp.lb.upsert_service(4, Frontend(IPv4Address(VIP), 82, "TCP"), [])
    dp.lb.upsert_service(5, Frontend(IPv4Address(VIP), 54, "UDP"), [])
    before = dp.metrics.get(158, "egress")[0]
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(pod1, VIP, 82, timeout=5)
    assert time.monotonic() - t0 < 1.0  # a RST, not a timeout
    with in_netns(pod1):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.settimeout(3)
        u.connect((VIP, 54))
        u.send(b"anyone?")
        with pytest.raises(OSError) as ei:
            u.recv(100)
        assert ei.value.errno == errno.ECONNREFUSED  # the ICMP port unreachable
    finally:
        u.close()
    assert dp.metrics.get(158, "egress")[0] >= before + 2


def test_nodeport_from_an_external_namespace(lbnet):
    """A client outside the node reaches node-ip:nodePort; the backend pod
    answers and the client sees the node address."""
    import subprocess

    import pyroute2

    from pilus.datapath import lb as lbm

    dp, (_, pod2), (_, ep2) = lbnet
    node = None
    for ns in pyroute2.netns.listnetns():
        if ns.startswith("pilus-tn-"):
            node = ns
    assert node
    ext = node.replace("pilus-tn-", "pilus-tx-")
    pyroute2.netns.create(ext)
    try:
        with in_netns(node), pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname="ext0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": ext})
            idx = ipr.link_lookup(ifname="ext0")[0]
            ipr.addr("add", index=idx, address=str(NODE_IP), prefixlen=24)
            ipr.link("set", index=idx, state="up")
        with in_netns(ext), pyroute2.IPRoute() as ipr:
            e0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=e0, address="172.30.0.200", prefixlen=24)
            ipr.link("set", index=e0, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0"):
            subprocess.run(["ip", "netns", "exec", node, "sysctl", "-qw", key], check=True)
        with in_netns(node):
            dp.attach_netdev(idx)
        flags = lbm.SVC_FLAG_NODEPORT | lbm.SVC_FLAG_ROUTABLE
        dp.lb.upsert_service(6, Frontend(NODE_IP, 30080, "TCP"),
                             [BackendEntry(6, ep2.ipv4, 8080, "TCP")], flags=flags)
        dp.lb.upsert_service(7, Frontend(NODE_IP, 30081, "TCP"), [], flags=flags)
        srv = listen(pod2, str(ep2.ipv4), 8080)
        try:
            for _ in range(3):
                peer, seen = connect(ext, str(NODE_IP), 30080)
                assert peer == (str(NODE_IP), 30080)
                assert seen.split(":")[0] == "172.30.0.200"  # client address preserved
            t0 = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                connect(ext, str(NODE_IP), 30081)
            assert time.monotonic() - t0 < 1.0
        finally:
            srv.close()
    finally:
        with suppress_oserror():
            pyroute2.netns.remove(ext)


def suppress_oserror():
    import contextlib

    return contextlib.suppress(OSError)
