"""NodePort DSR end to end (`pilus cluster up --routing-mode native --bpf-lb-mode dsr`):
two nodes, the backend pod on node2, a NodePort service; this machine (the bridge
address, outside every node) connects to node1's NodePort. The backend sees the
client's own address, the client gets its answers, the packets node1 -> node2 carry
the DSR option (type 0x9a, the frontend node1:nodePort), and no packet of the
backend's replies passes node1's link: node2 answers the client directly with the
frontend as the source. A bulk exchange (full-size segments both ways) works too.
DSR with tunnel routing is refused by the agent and by `cluster up`, naming both flags."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

from scapy.all import IP, TCP, AsyncSniffer

from pilus.cluster import cluster_down
from pilus.datapath import abi
from pilus.datapath.lb import LB_TUPLE_F_REVNAT, Lb4CtEntry
from pilus.datapath.loader import obj_get
from pilus.datapath.maps import BpfMap

from .conftest import Servers, pilus_cli, probe, wait_for

POD_CIDR, UNDERLAY = "10.216.0.0/16", "172.31.236.0/24"
TCP_PORT, NODE_PORT = 8080, 30486
DSR_OPT_TYPE = 0x9A
BPFFS_ROOT = Path("/sys/fs/bpf/pilus")  # the agents' default --bpffs-root: pins in <root>/<node>/


@contextlib.contextmanager
def _dsr_cluster():
    name = f"md{os.getpid() % 10000}"
    cluster_down(name)
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", POD_CIDR,
                                   "--underlay-cidr", UNDERLAY, "--routing-mode", "native",
                                   "--bpf-lb-mode", "dsr", "-o", "json"))
        yield name, doc
    finally:
        cluster_down(name)


def _dsr_option(vip: str, port: int) -> bytes:
    """Cilium's encoding: htons/htonl of the network-order values (byte-reversed here)."""
    be_port = struct.unpack("=H", struct.pack("!H", port))[0]
    be_addr = struct.unpack("=I", IPv4Address(vip).packed)[0]
    return bytes([DSR_OPT_TYPE, 8]) + struct.pack("!H", be_port) + struct.pack("!I", be_addr)


def _options(pkt) -> bytes:
    ip = pkt[IP]
    return bytes(ip)[20:ip.ihl * 4]


def _frontends(name: str, node: dict) -> set[str]:
    rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "service", "list", "-o", "json"))
    return {r["frontend"] for r in rows if r.get("backends")}


def _revnat(node_name: str) -> list[tuple[tuple[str, int], tuple[str, int], tuple[str, int]]]:
    """The reverse entries of a node's pinned pilus_lb4_ct: (backend, client, frontend)."""
    fd = obj_get(BPFFS_ROOT / node_name / "pilus_lb4_ct")
    try:
        ct = BpfMap(fd, abi.Ipv4CtTuple, Lb4CtEntry, "pilus_lb4_ct")
        return [((str(abi.raw_to_ip4(k.saddr)), abi.raw_to_port(k.sport)),
                 (str(abi.raw_to_ip4(k.daddr)), abi.raw_to_port(k.dport)),
                 (str(abi.raw_to_ip4(v.nat_addr)), abi.raw_to_port(v.nat_port)))
                for k, v in ct.items() if k.flags & LB_TUPLE_F_REVNAT]
    finally:
        os.close(fd)


def _bulk(ip: str, port: int, rounds: int = 8, chunk: int = 32 * 1024) -> None:
    """Send ``rounds`` chunks to the echo server, each read back before the next (both
    directions carry full-size segments)."""
    with socket.create_connection((ip, port), timeout=10) as conn:
        for _ in range(rounds):
            data = os.urandom(chunk)
            conn.sendall(data)
            got = bytearray()
            while len(got) < chunk:
                part = conn.recv(65536)
                if not part:
                    break
                got += part
            assert bytes(got) == data, f"echoed {len(got)} of {chunk} bytes"


def test_nodeport_dsr_the_backend_answers_the_client_directly():
    with _dsr_cluster() as (name, doc):
        node1, node2 = doc["nodes"]
        client = doc["bridge_ip"]
        pod = json.loads(pilus_cli("--cluster", name, "--node", node2["name"], "endpoint", "create",
                                   "default/b", "-l", "app=b", "-o", "json"))
        backend = pod["ipv4"]
        servers = Servers()
        try:
            servers.start(pod["netns"], "tcp-server", TCP_PORT)
            pilus_cli("--cluster", name, "--node", node1["name"], "service", "create", "--name", "default/np",
                      "--type", "NodePort", "--frontend", "10.96.16.20:80/TCP", "--node-port", str(NODE_PORT),
                      "--selector", "app=b", "--target-port", str(TCP_PORT))
            frontend = f"{node1['node_ip']}:{NODE_PORT}/TCP"
            assert wait_for(lambda: frontend in _frontends(name, node1), timeout=15), _frontends(name, node1)

            # node1's link (bridge side) and node2's, both directions
            on_node1 = AsyncSniffer(iface=node1["host_veth"], lfilter=lambda p: IP in p and TCP in p)
            on_node2 = AsyncSniffer(iface=node2["host_veth"], lfilter=lambda p: IP in p and TCP in p)
            on_node1.start()
            on_node2.start()
            time.sleep(0.5)
            try:
                for _ in range(3):
                    reply = probe(None, "tcp-connect", node1["node_ip"], str(NODE_PORT))
                    assert reply["ok"], reply
                    ip, port = reply["reply"].split(":")
                    assert ip == client, reply  # the backend sees the client, not node1
                _bulk(node1["node_ip"], NODE_PORT)
                time.sleep(0.3)
            finally:
                seen1, seen2 = on_node1.stop(), on_node2.stop()

            # node1 -> node2: the client's address kept, the frontend in the option
            forwarded = [p for p in seen2 if p[IP].src == client and p[IP].dst == backend]
            assert forwarded, "nothing forwarded to node2"
            want = _dsr_option(node1["node_ip"], NODE_PORT)
            assert all(_options(p) == want for p in forwarded), {_options(p) for p in forwarded}
            assert any(len(p[TCP].payload) > 1000 for p in forwarded)  # full-size segments too
            # node2 -> client: the frontend is the source
            answers = [p for p in seen2 if p[IP].src == node1["node_ip"] and p[TCP].sport == NODE_PORT
                       and p[IP].dst == client]
            assert answers, "no answer from node2 to the client"
            assert any(len(p[TCP].payload) > 1000 for p in answers)
            # node1's link: the client's packets in and out again, but none of the replies
            assert [p for p in seen1 if p[IP].src == client and p[IP].dst == node1["node_ip"]]
            # (other traffic between node1 and this machine, e.g. Hubble's, is not ours)
            replies_via_node1 = [p for p in seen1 if p[IP].dst == client and (
                p[IP].src == backend or (p[IP].src == node1["node_ip"] and p[TCP].sport == NODE_PORT))]
            assert not replies_via_node1, replies_via_node1[:3]
            assert not [p for p in seen1 if p[IP].dst == node1["node_ip"] and p[IP].src == backend]

            # node2's LB conntrack: the reply tuples (backend -> client) with the frontend
            revnat = _revnat(node2["name"])
            mine = [r for r in revnat if r[2] == (node1["node_ip"], NODE_PORT)]
            assert len(mine) >= 4, revnat  # the 3 probes and the bulk connection
            assert all(r[0] == (backend, TCP_PORT) and r[1][0] == client for r in mine), mine

            # NodePort on node2 itself (local backend): unchanged, the client keeps its address
            local = probe(None, "tcp-connect", node2["node_ip"], str(NODE_PORT))
            assert local["ok"] and local["reply"].split(":")[0] == client, local
        finally:
            servers.stop()


def test_dsr_with_tunnel_routing_is_refused_naming_both_flags(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pilus", "agent", "--node-name", "x", "--state-dir", str(tmp_path),
         "--pod-cidr", "10.216.1.0/24", "--routing-mode", "tunnel", "--bpf-lb-mode", "dsr"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "--bpf-lb-mode dsr" in last and "--routing-mode native" in last, done.stderr
    assert not any(tmp_path.iterdir())  # refused before anything started
    name = f"mdt{os.getpid() % 10000}"
    try:
        up = subprocess.run(
            [sys.executable, "-m", "pilus", "cluster", "up", "--name", name, "--nodes", "1",
             "--pod-cidr", POD_CIDR, "--underlay-cidr", UNDERLAY, "--bpf-lb-mode", "dsr"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        cluster_down(name)  # nothing to remove when refused; a leftover if it was not
    assert up.returncode != 0
    assert "--bpf-lb-mode dsr" in up.stderr and "--routing-mode native" in up.stderr, up.stderr
