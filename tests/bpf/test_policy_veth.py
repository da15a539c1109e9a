"""Policy on real veths: TCP through the datapath with real sockets.

Same throwaway topology as test_veth_delivery (a node namespace and two pods,
no pins), plus, for masquerade, an "outside" namespace behind the node with an
nftables masquerade rule as the agent installs it. Everything is removed
afterwards (namespaces take their links, routes and nft tables with them).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import subprocess
from dataclasses import replace
from ipaddress import IPv4Network

import pyroute2
import pytest
from lxc_env import NODE_IP, POD_CIDR, ROUTER_IP
from test_veth_delivery import in_netns, topology  # noqa: F401 - fixture

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    DropEvent,
    PolicyEntry,
    PolicyKey,
    PolicyVerdictEvent,
)
from pilus.observer.format import event_record

ALLOW = PolicyEntry(deny=False)
TCP = 6
WORLD = 2


def sock_in(ns, *args):
    with in_netns(ns):
        return socket.socket(*args)


def try_connect(ns, dst, port, timeout=1.0) -> socket.socket | None:
    s = sock_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((str(dst), port))
        return s
    except (TimeoutError, OSError) as exc:
        s.close()
        if isinstance(exc, TimeoutError) or exc.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH):
            return None
        raise


def listener(ns, ip, port):
    s = sock_in(ns, socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((str(ip), port))
    s.listen(8)
    s.settimeout(3)
    return s


def echo_once(srv, cli):
    conn, _ = srv.accept()
    with conn:
        cli.sendall(b"ping")
        assert conn.recv(10) == b"ping"
        conn.sendall(b"pong")
        cli.settimeout(3)
        assert cli.recv(10) == b"pong"


@pytest.fixture
def policy_dp(tmp_path_factory):
    cfg = DatapathConfig("veth-policy", ROUTER_IP, NODE_IP, POD_CIDR)
    dp = Datapath(cfg, tmp_path_factory.getbasetemp() / "veth-state", bpffs_root=None)
    dp.load()
    try:
        yield dp
    finally:
        dp.close()


def setup_endpoints(dp, node, eps):
    for ep in eps:
        dp.endpoints.upsert(ep)
        dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
    with in_netns(node):
        for ep in eps:
            dp.attach_endpoint(ep.ifindex)


def test_tcp_allowed_by_l3_l4_and_other_port_dropped(topology, policy_dp):  # noqa: F811
    node, (pod1, pod2), (ep1, ep2) = topology
    dp = policy_dp
    # both directions enforced on both pods; only 1 -> 2:8080 is allowed
    ep1 = replace(ep1, flags=ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
    ep2 = replace(ep2, flags=ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
    dp.policy.sync(ep1.ep_id, {PolicyKey(ep2.identity, True, 0, 0, 0): ALLOW})
    dp.policy.sync(ep2.ep_id, {PolicyKey(ep1.identity, False, TCP, 8080, 16): ALLOW})
    setup_endpoints(dp, node, (ep1, ep2))

    srv_ok = listener(pod2, ep2.ipv4, 8080)
    srv_no = listener(pod2, ep2.ipv4, 8081)
    try:
        with dp.events() as reader:
            cli = try_connect(pod1, ep2.ipv4, 8080)
            assert cli is not None, "8080 is allowed by the L3-L4 entry"
            with cli:
                echo_once(srv_ok, cli)
            assert try_connect(pod1, ep2.ipv4, 8081) is None, "8081 must be dropped"
            # and pod2 cannot open connections towards pod1 at all
            assert try_connect(pod2, ep1.ipv4, 8080, timeout=0.5) is None
            evs = reader.poll()
    finally:
        srv_ok.close()
        srv_no.close()
    drops = [event_record(e) for e in evs if isinstance(e, DropEvent) and e.packet.proto == "TCP"]
    assert drops and {d["reason"] for d in drops} == {133}
    assert {(d["source_ep"], d["dport"]) for d in drops} == {(ep2.ep_id, 8081), (ep2.ep_id, 8080)}
    v = [event_record(e) for e in evs if isinstance(e, PolicyVerdictEvent)]
    first = [(x["source_ep"], x["direction"], x["action"], x["dport"], x["match_type"]) for x in v]
    assert first[:2] == [
        (ep1.ep_id, "egress", "allow", 8080, "L3-Only"),
        (ep2.ep_id, "ingress", "allow", 8080, "L3-L4"),
    ]
    assert (ep2.ep_id, "ingress", "deny", 8081, "none") in first
    assert (ep2.ep_id, "egress", "deny", 8080, "none") in first
    rows = {r["port"]: r for r in dp.policy.items(ep2.ep_id)}
    assert rows["8080/TCP"]["packets"] == 1  # one connection, counted once
    assert dp.metrics.get(133, "ingress")[0] >= 1 and dp.metrics.get(133, "egress")[0] >= 1
    with in_netns(node):
        dp.detach_endpoint(ep1.ifindex)
        dp.detach_endpoint(ep2.ifindex)


@pytest.mark.skipif(
    subprocess.run(["which", "nft"], capture_output=True).returncode != 0,
    reason="nft (nftables) not installed: make setup",
)
def test_masqueraded_connection_reply_passes_ingress(topology, policy_dp):  # noqa: F811
    """pod -> outside through the node's nftables masquerade: the reply comes
    back de-NATed into to-container as CT_REPLY and passes an ingress policy
    that allows nothing; a connection from outside is dropped."""
    node, (pod1, _pod2), (ep1, _ep2) = topology
    dp = policy_dp
    outside = f"{node}-out"
    pyroute2.netns.create(outside)
    try:
        with in_netns(node), pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname="ext0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": outside})
            ext = ipr.link_lookup(ifname="ext0")[0]
            ipr.addr("add", index=ext, address="192.168.77.1", prefixlen=24)
            ipr.link("set", index=ext, state="up")
            lxc = ipr.link_lookup(ifname="lxct0")[0]
            ipr.neigh("add", dst=str(ep1.ipv4), lladdr=ep1.mac, ifindex=lxc, state=0x80)
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
        with in_netns(outside), pyroute2.IPRoute() as ipr:
            for name in ("lo", "eth0"):
                idx = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=idx, state="up")
            e0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=e0, address="192.168.77.2", prefixlen=24)
            ipr.route("add", dst="10.200.0.0/16", gateway="192.168.77.1")
        rules = (
            "table ip pilus_t {\n chain post {\n"
            "  type nat hook postrouting priority srcnat;\n"
            f'  ip saddr {POD_CIDR} oifname != "lxc*" masquerade\n }}\n}}\n'
        )
        subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], input=rules, text=True, check=True)

        ep1 = replace(ep1, flags=ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS)
        dp.policy.sync(ep1.ep_id, {PolicyKey(WORLD, True, TCP, 9000, 16): ALLOW})
        setup_endpoints(dp, node, (ep1,))

        srv = listener(outside, "192.168.77.2", 9000)
        pod_srv = listener(pod1, ep1.ipv4, 9001)
        try:
            with dp.events() as reader:
                cli = try_connect(pod1, "192.168.77.2", 9000)
                assert cli is not None, "egress 9000/TCP to world is allowed"
                with cli:
                    conn, (peer, _) = srv.accept()
                    with conn:
                        assert peer == "192.168.77.1"  # masqueraded by the node
                        cli.sendall(b"x")
                        assert conn.recv(1) == b"x"
                        conn.sendall(b"y")
                        cli.settimeout(3)
                        assert cli.recv(1) == b"y"
                assert try_connect(outside, ep1.ipv4, 9001) is None
                evs = reader.poll()
        finally:
            srv.close()
            pod_srv.close()
        v = [event_record(e) for e in evs if isinstance(e, PolicyVerdictEvent)]
        assert [(x["direction"], x["action"], x["remote_identity"], x["dport"]) for x in v][:2] == [
            ("egress", "allow", WORLD, 9000),
            ("ingress", "deny", WORLD, 9001),
        ]
        flows = [c for c in dp.ct.items() if c["dport"] == 9000]
        assert len(flows) == 1 and flows[0]["rx_packets"] >= 2  # replies matched the entry
        with in_netns(node):
            dp.detach_endpoint(ep1.ifindex)
    finally:
        with contextlib.suppress(OSError):
            pyroute2.netns.remove(outside)
