"""The datapath's UDP redirect for the DNS proxy, end to end on real namespaces.

A node namespace with two pods (lxc veths, bpf_lxc.o) and a native device (bpf_host.o)
to a "world" namespace, the node's proxy routing and masquerade as node/setup.py
installs them, and policy entries written straight into the maps (UDP/53 with proxy
port 15053, as the policy engine does for a DNS rule). The DNS proxy is stood in for
by a small transparent UDP responder in the node namespace that works the way the
agent's does: it reads the query's original destination (IP_RECVORIGDSTADDR), sends it
upstream from the pod's address (port 51000-60999, SO_MARK 0x0B00), and answers the
pod from the original destination's address. So the datapath is what is tested:

- (a) a server pod on the same node (its answers are a FromProxy entry's replies),
- (c) the world, masqueraded (its answers find the upstream socket through the NAT by
  the node's `socket transparent` mark),
- a routed peer outside the node that is not masqueraded (as another node's pod in
  native routing): its answers are conntrack-new in from-netdev and find the upstream
  socket by its exact tuple (lib/proxy.h proxy_reply_to_node_socket4),
- (b) a pod on another node through the tunnel (a second node namespace with its own
  datapath): the VNI carries the client's identity (the server admits only it), the
  answer is conntrack-new in from-overlay and finds the upstream socket.

Evidence: the responder's log of original destinations, the pod's answer (prefixed by
the responder; the pod's socket is connected, so it came from server:53), the address
each server saw, the conntrack entries (ProxyRedirect with the port, FromProxy) and the
to-proxy traces. Everything lives in throwaway namespaces, removed afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network

import pyroute2
import pytest

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    EndpointInfo,
    PolicyEntry,
    PolicyKey,
    TraceEvent,
    abi,
    links,
)
from pilus.endpoint.plumbing import POD_EPHEMERAL_PORTS
from pilus.node.setup import install_masquerade, install_proxy_routing, set_cluster_node_ips
from pilus.observer.format import event_record
from pilus.proxy.context import UPSTREAM_PORTS as _UPSTREAM

ROUTER_IP = IPv4Address("10.200.1.1")
NODE_IP = IPv4Address("172.30.0.11")
POD_CIDR = IPv4Network("10.200.1.0/24")
WORLD_IP = "172.30.0.100"  # masqueraded
PEER_IP = "172.30.0.101"  # in cluster_nodes: routed, not masqueraded
WORLD = 2
UDP = 17
DNS_PROXY_PORT = 15053
IP_TRANSPARENT, IP_RECVORIGDSTADDR = 19, 20
UPSTREAM_PORTS = range(_UPSTREAM[0], _UPSTREAM[1] + 1)  # the proxies' source ports


@contextmanager
def in_netns(name):
    pyroute2.netns.pushns(name)
    try:
        yield
    finally:
        pyroute2.netns.popns()


def sock_in(ns, kind=socket.SOCK_DGRAM) -> socket.socket:
    with in_netns(ns):
        return socket.socket(socket.AF_INET, kind)


def _mac(ipr, ifname):
    return ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")


class UdpEcho:
    """A UDP server on one address: answers `pong:<data> from <peer>` and records peers."""

    def __init__(self, ns: str, ip: str, port: int):
        self.sock = sock_in(ns)
        self.sock.bind((ip, port))
        self.sock.settimeout(0.2)
        self.peers: list[tuple[str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer)
            self.sock.sendto(b"pong:" + data + f" from {peer[0]}".encode(), peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


class TransparentUdpResponder:
    """The DNS proxy's socket handling, without DNS: one transparent unconnected socket
    on 0.0.0.0:port; per datagram an upstream socket (pod's address, a proxy port,
    SO_MARK 0x0B00) to the original destination, and the answer from that address."""

    def __init__(self, node: str, port: int):
        self.node = node
        self.log: list[dict] = []
        self.errors: list[BaseException] = []
        self.sock = sock_in(node)
        self.sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        self.sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.settimeout(0.2)
        self._ports = iter(UPSTREAM_PORTS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pyroute2.netns.setns(self.node, flags=0)  # this thread's new sockets: the node's
        while not self.stop.is_set():
            try:
                data, cmsgs, _flags, client = self.sock.recvmsg(512, 256)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._handle(data, cmsgs, client)
            except Exception as exc:  # reported by the test
                self.errors.append(exc)

    def _handle(self, data: bytes, cmsgs, client: tuple[str, int]) -> None:
        dst = None
        for level, kind, raw in cmsgs:
            if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR:
                port, addr = struct.unpack_from("!2xH4s", raw)
                dst = (socket.inet_ntoa(addr), port)
        entry = {"client": client, "orig_dst": dst}
        self.log.append(entry)
        assert dst is not None, "no IP_ORIGDSTADDR"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.MARK_MAGIC_PROXY_EGRESS)
            up.bind((client[0], next(self._ports)))
            up.connect(dst)
            up.settimeout(3)
            entry["upstream_src"] = up.getsockname()
            up.send(data)
            reply = up.recv(512)
        entry["reply"] = reply
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ans:
            ans.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            ans.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ans.bind(dst)
            ans.sendto(b"proxied:" + reply, client)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def remove_netns(name: str) -> None:
    with suppress(OSError):
        pyroute2.netns.remove(name)


def build(tag: str, stack: ExitStack):
    """Namespaces node / pod1 / pod2 / world; returns (node, pods, eps, native ifname)."""
    node, world = f"pilus-un-{tag}", f"pilus-uw-{tag}"
    pods = [f"pilus-up{i}-{tag}" for i in (1, 2)]
    for ns in (node, world, *pods):
        pyroute2.netns.create(ns)
        stack.callback(remove_netns, ns)
    eps = []
    for i, pod in enumerate(pods):
        ip = IPv4Address(f"10.200.1.{5 + i}")
        with in_netns(node), pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname=f"lxu{i}", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
            idx = ipr.link_lookup(ifname=f"lxu{i}")[0]
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{ip}/32", oif=idx)
            host_mac = _mac(ipr, f"lxu{i}")
        with in_netns(pod), pyroute2.IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            e0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=e0, state="up")
            ipr.addr("add", index=e0, address=str(ip), prefixlen=32)
            ipr.route("add", dst=f"{ROUTER_IP}/32", oif=e0, scope=253)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(ROUTER_IP), oif=e0)
            pod_mac = _mac(ipr, "eth0")
        # as the agent's pods: ephemeral ports below the proxies' range
        links.set_sysctl("net.ipv4.ip_local_port_range", "{} {}".format(*POD_EPHEMERAL_PORTS), netns=pod)
        eps.append(EndpointInfo(ipv4=ip, ifindex=idx, ep_id=10 + i, identity=2000 + i,
                                mac=pod_mac, host_mac=host_mac))
    with in_netns(node), pyroute2.IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        ipr.link("add", ifname="ntu0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": world})
        nd = ipr.link_lookup(ifname="ntu0")[0]
        ipr.link("set", index=nd, state="up")
        ipr.addr("add", index=nd, address=str(NODE_IP), prefixlen=24)
        # the proxy's packets to a pod are routed by the node's stack (as the agent does)
        for i, ep in enumerate(eps):
            ipr.neigh("add", dst=str(ep.ipv4), lladdr=ep.mac,
                      ifindex=ipr.link_lookup(ifname=f"lxu{i}")[0], state=0x80)
    with in_netns(world), pyroute2.IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        w0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=w0, state="up")
        for addr in (WORLD_IP, PEER_IP):
            ipr.addr("add", index=w0, address=addr, prefixlen=24)
        ipr.route("add", dst=str(POD_CIDR), gateway=str(NODE_IP), oif=w0)
    for key, value in (("all.rp_filter", 0), ("default.rp_filter", 0), ("ntu0.rp_filter", 0),
                       ("lxu0.rp_filter", 0), ("lxu1.rp_filter", 0),
                       ("lxu0.accept_local", 1), ("lxu1.accept_local", 1)):
        links.set_sysctl(f"net.ipv4.conf.{key}", value, netns=node)
    install_proxy_routing(netns=node)
    with in_netns(node):  # nft runs in the calling thread's namespace
        install_masquerade(POD_CIDR, POD_CIDR)
        set_cluster_node_ips([IPv4Address(PEER_IP)])
    return node, world, pods, eps


@pytest.fixture
def topo(tmp_path_factory):
    with ExitStack() as stack:
        node, world, pods, eps = build(f"{os.getpid() % 100000}", stack)
        cfg = DatapathConfig("udp-proxy-e2e", ROUTER_IP, NODE_IP, POD_CIDR)
        dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "udp-proxy-state", bpffs_root=None)
        dp.load()
        stack.callback(dp.close)  # before the namespaces go (callbacks run in reverse)
        client, server = replace(eps[0], flags=ENDPOINT_F_POLICY_EGRESS), eps[1]
        for ep in (client, server):
            dp.endpoints.upsert(ep)
            dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
        # what the policy engine writes for `toPorts: [{port: "53"}], rules: {dns: ...}`
        dp.policy.sync(client.ep_id, {
            PolicyKey(server.identity, True, UDP, 53, 16): PolicyEntry(deny=False, proxy_port=DNS_PROXY_PORT),
            PolicyKey(server.identity, True, UDP, 5300, 16): PolicyEntry(deny=False),
            PolicyKey(WORLD, True, UDP, 53, 16): PolicyEntry(deny=False, proxy_port=DNS_PROXY_PORT),
        })
        with in_netns(node), pyroute2.IPRoute() as ipr:
            for ep in (client, server):
                dp.attach_endpoint(ep.ifindex)
            dp.attach_netdev(ipr.link_lookup(ifname="ntu0")[0])
        servers = [UdpEcho(pods[1], str(server.ipv4), 53), UdpEcho(pods[1], str(server.ipv4), 5300),
                   UdpEcho(world, WORLD_IP, 53), UdpEcho(world, PEER_IP, 53)]
        for s in servers:
            stack.callback(s.close)
        responder = TransparentUdpResponder(node, DNS_PROXY_PORT)
        stack.callback(responder.close)
        yield {"dp": dp, "client": client, "server": server, "pods": pods,
               "servers": dict(zip(("pod53", "pod5300", "world", "peer"), servers, strict=True)),
               "responder": responder}


def ask(pod: str, dst: str, port: int, payload: bytes) -> tuple[bytes, int]:
    """One query from a connected socket (it only accepts answers from dst:port);
    returns (answer, the pod's source port)."""
    with sock_in(pod) as s:
        s.settimeout(5)
        s.connect((dst, port))
        s.send(payload)
        return s.recv(512), s.getsockname()[1]


def ct(dp, src: str, sport: int, dst: str, dport: int) -> dict:
    (row,) = [c for c in dp.ct.items() if (c["src"], c["sport"], c["dst"], c["dport"]) == (src, sport, dst, dport)]
    return row


def test_udp_to_port_53_goes_through_the_transparent_responder(topo):
    dp, client, server = topo["dp"], topo["client"], topo["server"]
    pod1 = topo["pods"][0]
    cip, sip = str(client.ipv4), str(server.ipv4)
    with dp.events() as reader:
        same, same_port = ask(pod1, sip, 53, b"q-same")
        world, world_port = ask(pod1, WORLD_IP, 53, b"q-world")
        peer, peer_port = ask(pod1, PEER_IP, 53, b"q-peer")
        plain, plain_port = ask(pod1, sip, 5300, b"q-plain")
        evs = reader.poll()
    r = topo["responder"]
    assert not r.errors, r.errors
    # the pod's answers: through the responder, from server:53 (connected sockets)
    assert same == f"proxied:pong:q-same from {cip}".encode()
    assert world == f"proxied:pong:q-world from {NODE_IP}".encode()  # masqueraded
    assert peer == f"proxied:pong:q-peer from {cip}".encode()
    assert plain == f"pong:q-plain from {cip}".encode()  # no proxy port: direct
    # the responder saw each query's original destination, from the pod
    assert [(e["client"], e["orig_dst"]) for e in r.log] == [
        ((cip, same_port), (sip, 53)), ((cip, world_port), (WORLD_IP, 53)),
        ((cip, peer_port), (PEER_IP, 53))]
    ups = [e["upstream_src"] for e in r.log]
    assert all(a == cip and p in UPSTREAM_PORTS for a, p in ups), ups
    srv = topo["servers"]
    assert srv["pod53"].peers == [ups[0]] and srv["peer"].peers == [ups[2]]
    assert [a for a, _ in srv["world"].peers] == [str(NODE_IP)]
    assert srv["pod5300"].peers == [(cip, plain_port)]
    # conntrack: the pod's flows are redirected to the port; the responder's
    # upstream to the local server is a FromProxy entry (its replies went to the
    # stack); upstreams that left the node have none here
    for dst, port in ((sip, same_port), (WORLD_IP, world_port), (PEER_IP, peer_port)):
        e = ct(dp, cip, port, dst, 53)
        assert (e["proto"], e["flags"], e["proxy_port"]) == ("UDP", ["ProxyRedirect"], DNS_PROXY_PORT), e
        assert e["tx_packets"] == 1 and e["rx_packets"] == 1, e  # query to the proxy, answer to the pod
    up = ct(dp, cip, ups[0][1], sip, 53)
    assert up["flags"] == ["Ingress", "FromProxy"] and up["rx_packets"] == 1, up
    assert ct(dp, cip, plain_port, sip, 5300)["flags"] == []
    assert not [c for c in dp.ct.items() if c["dst"] in (WORLD_IP, PEER_IP) and c["sport"] in UPSTREAM_PORTS]
    # monitor: each query flow's first packet traced to-proxy; so are the answers to
    # the upstream sockets (the local server's in from-container, the routed peer's
    # in from-netdev)
    traces = [event_record(e) for e in evs if isinstance(e, TraceEvent)]
    to_proxy = {(t["src_ip"], t["sport"], t["dst_ip"], t["dport"]) for t in traces
                if t["observation_point"] == "to-proxy"}
    assert {(cip, same_port, sip, 53), (cip, world_port, WORLD_IP, 53),
            (cip, peer_port, PEER_IP, 53), (sip, 53, cip, ups[0][1]),
            (PEER_IP, 53, cip, ups[2][1])} <= to_proxy, traces


# ------------------------------------------------------------------ across nodes (tunnel)

N1_IP, N2_IP = IPv4Address("172.30.1.11"), IPv4Address("172.30.1.12")
CIDR1, CIDR2 = IPv4Network("10.200.1.0/24"), IPv4Network("10.200.2.0/24")
VXLAN_PORT, VXLAN_DEV = 8472, "pvx0"


def build_two_nodes(tag: str, stack: ExitStack):
    """Nodes n1 / n2 on an underlay veth, each with a collect-metadata VXLAN device and
    one pod (client on n1, server on n2); returns (n1, n2, client pod, server pod, eps)."""
    n1, n2, p1, p2 = (f"pilus-u{x}-{tag}" for x in ("a", "b", "c", "s"))
    for ns in (n1, n2, p1, p2):
        pyroute2.netns.create(ns)
        stack.callback(remove_netns, ns)
    with in_netns(n1), pyroute2.IPRoute() as ipr:
        ipr.link("add", ifname="und0", kind="veth", peer={"ifname": "und0", "net_ns_fd": n2})
    eps = []
    for node, pod, node_ip, cidr, peer_cidr, i in ((n1, p1, N1_IP, CIDR1, CIDR2, 0),
                                                  (n2, p2, N2_IP, CIDR2, CIDR1, 1)):
        ip = IPv4Address(int(cidr.network_address) + 5 + i)
        router = IPv4Address(int(cidr.network_address) + 1)
        with in_netns(node), pyroute2.IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            und = ipr.link_lookup(ifname="und0")[0]
            ipr.link("set", index=und, state="up")
            ipr.addr("add", index=und, address=str(node_ip), prefixlen=24)
            ipr.link("add", ifname="lxu0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
            idx = ipr.link_lookup(ifname="lxu0")[0]
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst=f"{ip}/32", oif=idx)
            host_mac = _mac(ipr, "lxu0")
        with in_netns(pod), pyroute2.IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            e0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=e0, state="up")
            ipr.addr("add", index=e0, address=str(ip), prefixlen=32)
            ipr.route("add", dst=f"{router}/32", oif=e0, scope=253)
            ipr.route("add", dst="0.0.0.0/0", gateway=str(router), oif=e0)
            pod_mac = _mac(ipr, "eth0")
        links.set_sysctl("net.ipv4.ip_local_port_range", "{} {}".format(*POD_EPHEMERAL_PORTS), netns=pod)
        vx = links.create_vxlan(VXLAN_DEV, VXLAN_PORT, 1450, netns=node)
        with in_netns(node), pyroute2.IPRoute() as ipr:
            # the node's own traffic to the other node's pods (as node/routes.py)
            ipr.route("add", dst=str(peer_cidr), oif=vx)
            ipr.neigh("add", dst=str(ip), lladdr=pod_mac, ifindex=idx, state=0x80)
        for key, value in (("all.rp_filter", 0), ("default.rp_filter", 0), ("lxu0.rp_filter", 0),
                           (f"{VXLAN_DEV}.rp_filter", 0), ("lxu0.accept_local", 1)):
            links.set_sysctl(f"net.ipv4.conf.{key}", value, netns=node)
        install_proxy_routing(netns=node)
        eps.append(EndpointInfo(ipv4=ip, ifindex=idx, ep_id=10 + i, identity=2000 + i,
                                mac=pod_mac, host_mac=host_mac))
    return n1, n2, p1, p2, eps, vx


@pytest.fixture
def two_nodes(tmp_path_factory):
    with ExitStack() as stack:
        n1, n2, p1, p2, (client, server), vx = build_two_nodes(f"{os.getpid() % 100000}", stack)
        dps = []
        for node, node_ip, cidr in ((n1, N1_IP, CIDR1), (n2, N2_IP, CIDR2)):
            router = IPv4Address(int(cidr.network_address) + 1)
            cfg = DatapathConfig(f"udp-proxy-{node[-12:]}", router, node_ip, cidr,
                                 tunnel_device=VXLAN_DEV, tunnel_ifindex=vx)
            dp = Datapath(cfg, tmp_path_factory.getbasetemp() / f"udp-proxy-{node}", bpffs_root=None)
            with in_netns(node):  # load() attaches bpf_overlay.o to the VXLAN device by name
                dp.load()
            stack.callback(dp.close)
            dps.append(dp)
        dp1, dp2 = dps
        client = replace(client, flags=ENDPOINT_F_POLICY_EGRESS)
        # the server only admits the client's identity: the VNI must carry it
        server = replace(server, flags=ENDPOINT_F_POLICY_INGRESS)
        for dp, local, remote, remote_node in ((dp1, client, server, N2_IP), (dp2, server, client, N1_IP)):
            dp.endpoints.upsert(local)
            dp.ipcache.upsert(IPv4Network(f"{local.ipv4}/32"), local.identity)
            dp.ipcache.upsert(IPv4Network(f"{remote.ipv4}/32"), remote.identity, remote_node)
        dp1.policy.sync(client.ep_id, {
            PolicyKey(server.identity, True, UDP, 53, 16): PolicyEntry(deny=False, proxy_port=DNS_PROXY_PORT)})
        dp2.policy.sync(server.ep_id, {PolicyKey(client.identity, False, UDP, 53, 16): PolicyEntry(deny=False)})
        for dp, node, ep in ((dp1, n1, client), (dp2, n2, server)):
            with in_netns(node):
                dp.attach_endpoint(ep.ifindex)
        echo = UdpEcho(p2, str(server.ipv4), 53)
        stack.callback(echo.close)
        responder = TransparentUdpResponder(n1, DNS_PROXY_PORT)
        stack.callback(responder.close)
        yield {"dp1": dp1, "dp2": dp2, "client": client, "server": server, "client_pod": p1,
               "echo": echo, "responder": responder}


def test_udp_to_another_nodes_pod_through_the_tunnel(two_nodes):
    t = two_nodes
    dp1, dp2, client, server = t["dp1"], t["dp2"], t["client"], t["server"]
    cip, sip = str(client.ipv4), str(server.ipv4)
    with dp1.events() as reader:
        answer, cport = ask(t["client_pod"], sip, 53, b"q-far")
        evs = reader.poll()
    r = t["responder"]
    assert not r.errors, r.errors
    assert answer == f"proxied:pong:q-far from {cip}".encode()
    assert [(e["client"], e["orig_dst"]) for e in r.log] == [((cip, cport), (sip, 53))]
    (up,) = [e["upstream_src"] for e in r.log]
    assert up[0] == cip and up[1] in UPSTREAM_PORTS
    assert t["echo"].peers == [up]  # the server pod saw the client's address
    e = ct(dp1, cip, cport, sip, 53)
    assert (e["flags"], e["proxy_port"]) == (["ProxyRedirect"], DNS_PROXY_PORT), e
    # node2 admitted the upstream query under the client's identity (from the VNI)
    far = ct(dp2, cip, up[1], sip, 53)
    assert far["flags"] == ["Ingress"] and far["src_identity"] == client.identity, far
    # node1: the answer was conntrack-new in from-overlay and went to the upstream socket
    assert not [c for c in dp1.ct.items() if c["sport"] == up[1]]
    traces = [event_record(x) for x in evs if isinstance(x, TraceEvent)]
    assert any(x["observation_point"] == "to-proxy" and (x["src_ip"], x["sport"], x["dport"]) == (sip, 53, up[1])
               for x in traces), traces
