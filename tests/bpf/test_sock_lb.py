"""Socket-level service LB (bpf_sock.c) with real sockets.

Topology of test_lb_veth (a node and two pods on veths, the tc datapath on both
lxc devices, no pins). The socket programs are attached to a throwaway cgroup v2
child the test process moves into for the test (and out of afterwards), and
translate only sockets of the namespaces whose cookie is in pilus_sock_netns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pyroute2
import pytest
from lxc_env import NODE_IP, POD_CIDR, ROUTER_IP
from test_lb_veth import connect, lbnet, listen  # noqa: F401 (fixture)
from test_veth_delivery import in_netns, topology  # noqa: F401 (fixture)

from pilus.datapath import Datapath, DatapathConfig, remove_pins
from pilus.datapath.lb import BackendEntry, Frontend
from pilus.datapath.socklb import (
    BPF_CGROUP_INET4_CONNECT,
    SOCK_PROGRAMS,
    PodNetns,
    cgroup2_root,
    cgroup_prog_ids,
    netns_cookie,
)
from pilus.loadbalancer.maglev import build_table

VIP = "10.96.0.20"


def _own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line.strip()[3:]
    raise RuntimeError("not in a cgroup v2 hierarchy")


@pytest.fixture
def cgroup():
    """A throwaway cgroup v2 child; this process lives in it during the test."""
    root = cgroup2_root()
    home = root / _own_cgroup().lstrip("/")
    cg = root / f"pilus-socklb-test-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        yield cg
    finally:
        (home / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture
def socknet(lbnet, cgroup):  # noqa: F811
    dp, pods, eps = lbnet
    sock = dp.load_socket_lb(cgroup=cgroup)
    # pod1 is this node's pod for the socket LB; pod2 is not registered
    sock.add_netns(PodNetns(netns_cookie(pods[0]), eps[0].ipv4, eps[0].ep_id))
    return dp, sock, pods, eps


def _port_server(sock):
    """TCP server answering with its own port and the peer address."""
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(f"{conn.getsockname()[1]} {peer[0]}".encode())


def tcp_listen(netns, ip, port):
    with in_netns(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    threading.Thread(target=_port_server, args=(s,), daemon=True).start()
    return s


def service_rows(dp):
    return [c for c in dp.lb.ct_items() if c["frontend"].startswith(VIP)]


def test_tcp_connect_goes_to_the_backend_and_getpeername_shows_the_vip(socknet):
    dp, sock, (pod1, pod2), (ep1, ep2) = socknet
    dp.lb.upsert_service(1, Frontend(IPv4Address(VIP), 80, "TCP"),
                         [BackendEntry(1, ep2.ipv4, 8080, "TCP")])
    srv = listen(pod2, str(ep2.ipv4), 8080)
    try:
        for _ in range(3):
            peer, seen = connect(pod1, VIP, 80)
            assert peer == (VIP, 80)  # getpeername4: the service address
            assert seen.split(":")[0] == str(ep1.ipv4)  # the backend sees the pod
    finally:
        srv.close()
    stats = sock.stats()
    assert stats["connect"] == 3 and stats["getpeername"] >= 3
    # translated at the socket: the per-packet LB saw a backend, not a frontend,
    # and kept no service/reverse-NAT state for these connections
    assert service_rows(dp) == []
    assert {r["frontend"] for r in sock.reverse_items()} == {f"{VIP}:80"}


def test_udp_sendmsg_recvmsg_round_trip_shows_the_vip(socknet):
    dp, sock, (pod1, pod2), (ep1, ep2) = socknet
    dp.lb.upsert_service(2, Frontend(IPv4Address(VIP), 53, "UDP"),
                         [BackendEntry(2, ep2.ipv4, 5353, "UDP")])
    usrv = listen(pod2, str(ep2.ipv4), 5353, socket.SOCK_DGRAM)
    usrv.settimeout(3)
    with in_netns(pod1):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cu = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.settimeout(3)
        # unconnected: sendmsg4 translates, recvmsg4 shows the VIP as the source
        for i in range(3):
            u.sendto(b"q%d" % i, (VIP, 53))
            data, peer = usrv.recvfrom(100)
            assert data == b"q%d" % i and peer[0] == str(ep1.ipv4)
            usrv.sendto(b"a%d" % i, peer)
            assert u.recvfrom(100) == (b"a%d" % i, (VIP, 53))
        # connected UDP: connect4 translates, getpeername / recvfrom show the VIP
        cu.settimeout(3)
        cu.connect((VIP, 53))
        assert cu.getpeername() == (VIP, 53)
        cu.send(b"c")
        data, peer = usrv.recvfrom(100)
        assert data == b"c" and peer[0] == str(ep1.ipv4)
        usrv.sendto(b"d", peer)
        assert cu.recvfrom(100) == (b"d", (VIP, 53))
    finally:
        u.close()
        cu.close()
        usrv.close()
    stats = sock.stats()
    assert stats["sendmsg"] == 3 and stats["connect"] == 1 and stats["recvmsg"] >= 4
    assert service_rows(dp) == []


def test_other_namespaces_and_other_nodes_are_untouched(socknet, tmp_path_factory):
    """pod2's namespace is not in this node's map: its connections go through the
    per-packet LB. A second node's socket LB on the same cgroup (its own maps)
    translates only its own pod (pod2), and never this node's pod1."""
    dp, sock, (pod1, pod2), (ep1, ep2) = socknet
    dp.lb.upsert_service(3, Frontend(IPv4Address(VIP), 81, "TCP"),
                         [BackendEntry(3, ep1.ipv4, 8081, "TCP")])
    srv = listen(pod1, str(ep1.ipv4), 8081)
    try:
        before = sock.stats()
        peer, seen = connect(pod2, VIP, 81)
        assert peer == (VIP, 81) and seen.split(":")[0] == str(ep2.ipv4)
        assert sock.stats() == before  # not ours
        assert any(r["kind"] == "service" and r["client"].startswith(str(ep2.ipv4))
                   for r in service_rows(dp))  # the per-packet LB did it

        # node B: same VIP:82 -> ep1:8081 in its own maps, pod2 registered there;
        # node A (ours) has VIP:82 without backends and would refuse
        cfg = DatapathConfig("socklb-test-b", ROUTER_IP, NODE_IP, POD_CIDR)
        dp_b = Datapath(cfg, tmp_path_factory.getbasetemp() / "socklb-b", bpffs_root=None)
        dp_b.load()
        try:
            sock_b = dp_b.load_socket_lb(cgroup=sock.cgroup)
            sock_b.add_netns(PodNetns(netns_cookie(pod2), ep2.ipv4, ep2.ep_id))
            dp_b.lb.upsert_service(9, Frontend(IPv4Address(VIP), 82, "TCP"),
                                   [BackendEntry(9, ep1.ipv4, 8081, "TCP")])
            dp.lb.upsert_service(4, Frontend(IPv4Address(VIP), 82, "TCP"), [])
            peer, seen = connect(pod2, VIP, 82)  # node B translated it, node A left it
            assert peer == (VIP, 82) and seen.split(":")[0] == str(ep2.ipv4)
            assert sock_b.stats()["connect"] == 1
            with pytest.raises(ConnectionRefusedError):  # node A's own pod: refused by A
                connect(pod1, VIP, 82)
            assert sock_b.stats()["connect"] == 1 and sock.stats()["no_backend"] == 1
        finally:
            dp_b.close()
    finally:
        srv.close()
    # the node's own namespace (not a pod) is not translated either
    assert netns_cookie() != netns_cookie(pod1)


def test_frontend_without_backends_refuses_at_connect(socknet):
    dp, sock, (pod1, _), _ = socknet
    dp.lb.upsert_service(5, Frontend(IPv4Address(VIP), 83, "TCP"), [])
    dp.lb.upsert_service(6, Frontend(IPv4Address(VIP), 55, "UDP"), [])
    before = dp.metrics.get(158, "egress")[0]
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        connect(pod1, VIP, 83, timeout=5)
    assert time.monotonic() - t0 < 1.0
    with in_netns(pod1):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OSError) as ei:
            u.sendto(b"anyone?", (VIP, 55))
        assert ei.value.errno == errno.ECONNREFUSED
    finally:
        u.close()
    assert sock.stats()["no_backend"] == 2
    assert dp.metrics.get(158, "egress")[0] == before + 2


def test_maglev_and_affinity_use_the_shared_maps(socknet):
    dp, sock, (pod1, pod2), (ep1, ep2) = socknet
    bes = [BackendEntry(11, ep2.ipv4, 8090, "TCP"), BackendEntry(12, ep2.ipv4, 8091, "TCP")]
    table = build_table([(b.id, str(b)) for b in bes], dp.lb.maglev_table_size)
    servers = [tcp_listen(pod2, str(ep2.ipv4), p) for p in (8090, 8091)]
    try:
        dp.lb.upsert_service(7, Frontend(IPv4Address(VIP), 90, "TCP"), bes,
                             algorithm="maglev", maglev_table=table)
        ports = {connect(pod1, VIP, 90)[1].split()[0] for _ in range(24)}
        assert ports == {"8090", "8091"}  # a per-connection value spreads over the table
        # ClientIP affinity: every connection of the pod sticks to one backend,
        # recorded under the pod's address in the per-packet LB's affinity map
        dp.lb.upsert_service(8, Frontend(IPv4Address(VIP), 91, "TCP"), bes,
                             algorithm="maglev", maglev_table=table, affinity_timeout=60)
        ports = {connect(pod1, VIP, 91)[1].split()[0] for _ in range(8)}
        assert len(ports) == 1
        aff = [(k.client_ip, k.rev_nat_index) for k, _ in dp.lb.affinity.items()]
        from pilus.datapath import abi

        assert (abi.ip4_to_raw(ep1.ipv4), 8) in aff
    finally:
        for s in servers:
            s.close()


def test_pinned_links_survive_the_object_and_go_with_the_pins(cgroup, tmp_path):
    """Pinned: the links stay after the datapath object is closed (the agent
    stops), a reload swaps the program in the same link, and removing the pin
    directory (cluster down / remove_pins) detaches them. The maps are shared
    with the tc object through the pins: a service written through the tc
    object's maps is translated by the socket programs."""
    root = Path(f"/sys/fs/bpf/pilus-socklb-test-{os.getpid()}")
    node = "socklb-pin"
    ns = f"pilus-tsl-{os.getpid() % 100000}"
    cfg = DatapathConfig(node, ROUTER_IP, NODE_IP, POD_CIDR)
    pyroute2.netns.create(ns)
    try:
        with in_netns(ns), pyroute2.IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        srv = tcp_listen(ns, "127.0.0.1", 8080)
        dp = Datapath(cfg, tmp_path / "state", bpffs_root=root)
        dp.load()
        dp.load_socket_lb(cgroup=cgroup)
        link_ids = [r["link_id"] for r in dp.socket_lb.attached()]
        assert sorted(p.name for p in (root / node / "links").iterdir()) == sorted(SOCK_PROGRAMS)
        dp.socket_lb.add_netns(PodNetns(netns_cookie(ns), IPv4Address("127.0.0.1")))
        dp.lb.upsert_service(1, Frontend(IPv4Address(VIP), 80, "TCP"),
                             [BackendEntry(1, IPv4Address("127.0.0.1"), 8080, "TCP")])
        dp.close()  # the agent stops: the programs stay
        assert len(cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT)) == 1
        peer, data = connect(ns, VIP, 80)
        assert peer == (VIP, 80) and data.split()[0] == "8080"

        dp = Datapath(cfg, tmp_path / "state", bpffs_root=root)  # restart
        dp.load()
        dp.load_socket_lb(cgroup=cgroup)
        assert [r["link_id"] for r in dp.socket_lb.attached()] == link_ids  # same links
        assert len(cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT)) == 1
        assert connect(ns, VIP, 80)[0] == (VIP, 80)
        dp.close()
        srv.close()
    finally:
        with contextlib.suppress(OSError):
            remove_pins(node, root)
        with contextlib.suppress(OSError):
            pyroute2.netns.remove(ns)
    for _ in range(50):  # link release is asynchronous
        if not cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT):
            break
        time.sleep(0.05)
    assert cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT) == []
    assert not root.exists()


def test_the_object_table_loads_the_socket_lb_by_config_and_removes_it(cgroup, tmp_path):
    """DatapathConfig(socket_lb=True): load() attaches bpf_sock.o (links pinned);
    socket_lb=False: load() removes the links an earlier run left; the netns map
    is written through its Reconciler (a fresh object prunes what it did not set)."""
    root = Path(f"/sys/fs/bpf/pilus-socklb-table-{os.getpid()}")
    node = "socklb-table"
    on = DatapathConfig(node, ROUTER_IP, NODE_IP, POD_CIDR, socket_lb=True, socket_lb_cgroup=cgroup)
    try:
        dp = Datapath(on, tmp_path / "state", bpffs_root=root)
        dp.load()
        assert dp.socket_lb is not None and dp.socket_lb.cgroup == cgroup
        assert sorted(p.name for p in (root / node / "links").iterdir()) == sorted(SOCK_PROGRAMS)
        assert len(cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT)) == 1
        pods = [PodNetns(11, IPv4Address("10.0.0.11"), 1), PodNetns(12, IPv4Address("10.0.0.12"), 2)]
        dp.socket_lb.sync_netns(pods)
        assert sorted(dp.socket_lb.netns_items(), key=lambda p: p.cookie) == pods
        dp.socket_lb.sync_netns(pods[1:])
        assert dp.socket_lb.netns_items() == pods[1:]
        assert dp.socket_lb.netns_sync.status()["pending"] == 0
        dp.close()

        dp = Datapath(on, tmp_path / "state", bpffs_root=root)  # restart: same links, map pruned
        dp.load()
        dp.socket_lb.sync_netns([pods[0]])
        assert dp.socket_lb.netns_items() == [pods[0]]
        dp.close()

        off = DatapathConfig(node, ROUTER_IP, NODE_IP, POD_CIDR, socket_lb=False)
        dp = Datapath(off, tmp_path / "state", bpffs_root=root)
        dp.load()
        assert dp.socket_lb is None
        assert not (root / node / "links").exists()
        dp.close()
    finally:
        with contextlib.suppress(OSError):
            remove_pins(node, root)
    for _ in range(50):  # link release is asynchronous
        if not cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT):
            break
        time.sleep(0.05)
    assert cgroup_prog_ids(cgroup, BPF_CGROUP_INET4_CONNECT) == []
