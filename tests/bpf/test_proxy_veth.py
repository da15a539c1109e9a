"""The L7 redirect on real veths: TCP through bpf_sk_assign to a transparent proxy.

The throwaway topology of test_veth_delivery (a node namespace, two pods, no
pins) with the node's policy routing for MARK_MAGIC_TO_PROXY as
node/setup.py installs it. The proxy is a small relay run here in the node
namespace the way pilus.proxy works (transparent listener; upstream socket
transparent, bound to the client's address, SO_MARK = the proxy's magic
mark), so the datapath is what is tested: the server must see the client's
address and the relay must have seen the original destination. Everything is
removed afterwards (namespaces take their links, routes and rules along).
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from dataclasses import replace
from ipaddress import IPv4Network

import pyroute2
import pytest
from lxc_env import NODE_IP, POD_CIDR, ROUTER_IP
from test_policy_veth import listener, setup_endpoints, try_connect
from test_veth_delivery import in_netns, topology  # noqa: F401 - fixture

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    PolicyEntry,
    PolicyKey,
    TraceEvent,
    abi,
    links,
)
from pilus.node.setup import install_proxy_routing
from pilus.observer.format import event_record

TCP = 6
HOST = 1
IP_TRANSPARENT = 19
ING_PORT, EGR_PORT = 15001, 15002


class Relay:
    """One transparent listener that relays one request per connection upstream."""

    def __init__(self, node: str, port: int, mark: int):
        self.mark = mark
        self.seen: list[tuple[tuple[str, int], tuple[str, int]]] = []  # (client, original dst)
        self.errors: list[BaseException] = []
        with in_netns(node):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.node = node
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # this thread lives in the node namespace (its upstream sockets too)
        pyroute2.netns.setns(self.node, flags=0)
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with conn:
                    self._relay(conn, peer)
            except Exception as exc:  # reported by the test
                self.errors.append(exc)

    def _relay(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        dst = conn.getsockname()
        self.seen.append((peer, dst))
        conn.settimeout(3)
        data = conn.recv(100)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with up:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            up.bind((peer[0], 0))
            up.settimeout(3)
            up.connect(dst)
            up.sendall(data)
            conn.sendall(b"relayed:" + up.recv(100))

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=2)


@pytest.fixture
def proxy_dp(tmp_path_factory):
    cfg = DatapathConfig("veth-proxy", ROUTER_IP, NODE_IP, POD_CIDR)
    dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "veth-state", bpffs_root=None)
    dp.load()
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture
def relays(topology):  # noqa: F811
    node, _pods, eps = topology
    install_proxy_routing(netns=node)
    # as the agent: a permanent neighbour per endpoint (the proxy's packets to
    # a pod are routed by the node's stack)
    with in_netns(node), pyroute2.IPRoute() as ipr:
        # (a node's lo is up; with lo down, a transparent socket's connect
        # loses its non-local bound address)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for i, ep in enumerate(eps):
            ipr.neigh("add", dst=str(ep.ipv4), lladdr=ep.mac,
                      ifindex=ipr.link_lookup(ifname=f"lxct{i}")[0], state=0x80)
    for key in ("all.rp_filter", "lxct0.rp_filter", "lxct1.rp_filter",
                "lxct0.accept_local", "lxct1.accept_local"):
        links.set_sysctl(f"net.ipv4.conf.{key}", key.endswith("accept_local") and 1 or 0,
                         netns=node)
    made = []
    try:
        made.append(Relay(node, ING_PORT, abi.MARK_MAGIC_PROXY_INGRESS))
        made.append(Relay(node, EGR_PORT, abi.MARK_MAGIC_PROXY_EGRESS))
        yield made[0], made[1]
    finally:
        for r in made:
            r.close()


def serve_once(srv: socket.socket, out: list) -> threading.Thread:
    def run() -> None:
        with suppress(OSError):
            conn, peer = srv.accept()
            with conn:
                out.append(peer[0])
                conn.sendall(b"pong:" + conn.recv(100))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def request(ns, dst, port) -> bytes:
    cli = try_connect(ns, dst, port, timeout=3)
    assert cli is not None, f"connect to {dst}:{port}"
    with cli:
        cli.settimeout(3)
        cli.sendall(b"ping")
        return cli.recv(100)


def ct_flags(dp, dport):
    """The direction and proxy flags of the port's entries (not the TCP state)."""
    keep = ("Ingress", "ProxyRedirect", "FromProxy")
    return sorted(tuple(f for f in c["flags"] if f in keep)
                  for c in dp.ct.items() if c["dport"] == dport)


def test_ingress_l7_pod_to_pod_through_the_proxy(topology, proxy_dp, relays):  # noqa: F811
    node, (pod1, pod2), (ep1, ep2) = topology
    ingress, egress = relays
    dp = proxy_dp
    ep2 = replace(ep2, flags=ENDPOINT_F_POLICY_INGRESS)
    dp.policy.sync(ep2.ep_id, {
        PolicyKey(ep1.identity, False, TCP, 8080, 16): PolicyEntry(deny=False, proxy_port=ING_PORT),
        PolicyKey(ep1.identity, False, TCP, 8081, 16): PolicyEntry(deny=False),
    })
    setup_endpoints(dp, node, (ep1, ep2))
    srv = listener(pod2, ep2.ipv4, 8080)
    plain = listener(pod2, ep2.ipv4, 8081)
    peers: list[str] = []
    try:
        with dp.events() as reader:
            t = serve_once(srv, peers)
            assert request(pod1, ep2.ipv4, 8080) == b"relayed:pong:ping"
            t.join(3)
            t = serve_once(plain, peers)
            assert request(pod1, ep2.ipv4, 8081) == b"pong:ping"  # no L7 rule: direct
            t.join(3)
            evs = reader.poll()
    finally:
        srv.close()
        plain.close()
    assert not ingress.errors and not egress.errors
    # the proxy got the original destination; the server saw the client pod
    assert [(c[0], d) for c, d in ingress.seen] == [(str(ep1.ipv4), (str(ep2.ipv4), 8080))]
    assert egress.seen == []
    assert peers == [str(ep1.ipv4), str(ep1.ipv4)]
    assert ct_flags(dp, 8080) == [("Ingress", "FromProxy"),
                                  ("ProxyRedirect",)]
    assert ct_flags(dp, 8081) == [()]
    points = [(r["observation_point"], r.get("dport"))
              for r in (event_record(e) for e in evs if isinstance(e, TraceEvent))]
    assert ("to-proxy", 8080) in points and ("to-proxy", 8081) not in points
    with in_netns(node):
        for ep in (ep1, ep2):
            dp.detach_endpoint(ep.ifindex)


def test_egress_l7_then_ingress_l7_hairpin(topology, proxy_dp, relays):  # noqa: F811
    """Egress proxy first; its upstream meets the server's ingress L7 entry in
    to-container and is hairpinned to the ingress proxy; the ingress proxy's
    answers to the egress proxy's socket are hairpinned back to the stack."""
    node, (pod1, pod2), (ep1, ep2) = topology
    ingress, egress = relays
    dp = proxy_dp
    ep1 = replace(ep1, flags=ENDPOINT_F_POLICY_EGRESS)
    ep2 = replace(ep2, flags=ENDPOINT_F_POLICY_INGRESS)
    dp.policy.sync(ep1.ep_id, {
        PolicyKey(ep2.identity, True, TCP, 8080, 16): PolicyEntry(deny=False, proxy_port=EGR_PORT)})
    dp.policy.sync(ep2.ep_id, {
        PolicyKey(ep1.identity, False, TCP, 8080, 16): PolicyEntry(deny=False, proxy_port=ING_PORT)})
    setup_endpoints(dp, node, (ep1, ep2))
    srv = listener(pod2, ep2.ipv4, 8080)
    peers: list[str] = []
    try:
        t = serve_once(srv, peers)
        assert request(pod1, ep2.ipv4, 8080) == b"relayed:relayed:pong:ping"
        t.join(3)
    finally:
        srv.close()
    assert not ingress.errors and not egress.errors
    assert [d for _, d in egress.seen] == [(str(ep2.ipv4), 8080)]
    assert [(c[0], d) for c, d in ingress.seen] == [(str(ep1.ipv4), (str(ep2.ipv4), 8080))]
    assert peers == [str(ep1.ipv4)]
    assert ct_flags(dp, 8080) == [("Ingress", "FromProxy"),
                                  ("Ingress", "ProxyRedirect", "FromProxy"),
                                  ("ProxyRedirect",)]
    with in_netns(node):
        for ep in (ep1, ep2):
            dp.detach_endpoint(ep.ifindex)


def test_node_as_client_is_hairpinned_to_the_ingress_proxy(topology, proxy_dp, relays):  # noqa: F811
    node, (_pod1, pod2), (_ep1, ep2) = topology
    ingress, _egress = relays
    dp = proxy_dp
    with in_netns(node), pyroute2.IPRoute() as ipr:
        # the node's own address (on lo: no dummy devices on every kernel)
        ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=str(ROUTER_IP),
                 prefixlen=32)
    dp.ipcache.upsert(IPv4Network(f"{ROUTER_IP}/32"), HOST)
    ep2 = replace(ep2, flags=ENDPOINT_F_POLICY_INGRESS)
    dp.policy.sync(ep2.ep_id, {
        PolicyKey(HOST, False, TCP, 8080, 16): PolicyEntry(deny=False, proxy_port=ING_PORT)})
    setup_endpoints(dp, node, (ep2,))
    srv = listener(pod2, ep2.ipv4, 8080)
    peers: list[str] = []
    try:
        t = serve_once(srv, peers)
        assert request(node, ep2.ipv4, 8080) == b"relayed:pong:ping"
        t.join(3)
    finally:
        srv.close()
    assert not ingress.errors
    assert [(c[0], d) for c, d in ingress.seen] == [(str(ROUTER_IP), (str(ep2.ipv4), 8080))]
    assert peers == [str(ROUTER_IP)]
    assert ct_flags(dp, 8080) == [("Ingress", "FromProxy"),
                                  ("Ingress", "ProxyRedirect")]
    with in_netns(node):
        dp.detach_endpoint(ep2.ifindex)
