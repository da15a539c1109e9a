"""Socket LB across nodes (`pilus cluster up --socket-lb`): a pod on node1 connects to a
ClusterIP whose only backend is on node2; connect() is translated at the socket, so
node1's conntrack sees the backend address and never the VIP, the per-packet LB
records nothing, and the backend sees the pod's own address through the tunnel."""

from __future__ import annotations

import json
import os

from pilus.api.client import Client
from pilus.cluster import cluster_down

from .conftest import Servers, pilus_cli, probe, wait_for

POD, UNDERLAY, VIP, PORT = "10.222.0.0/16", "172.31.231.0/24", "10.96.22.10", 8080


def test_socket_lb_reaches_a_backend_on_another_node():
    name = f"ms{os.getpid() % 10000}"
    cluster_down(name)
    servers = Servers()
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", POD,
                                   "--underlay-cidr", UNDERLAY, "--socket-lb", "-o", "json"))
        node1, node2 = doc["nodes"]
        a = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "endpoint", "create", "default/a",
                                 "-l", "app=a", "-o", "json"))
        web = json.loads(pilus_cli("--cluster", name, "--node", node2["name"], "endpoint", "create", "default/web",
                                   "-l", "app=web", "-o", "json"))
        servers.start(web["netns"], "tcp-server", PORT)
        pilus_cli("--cluster", name, "--node", node1["name"], "service", "create", "--name", "default/web",
                  "--frontend", f"{VIP}:80/TCP", "--selector", "app=web", "--target-port", str(PORT))
        api1 = Client(node1["socket"])
        progs = {p["name"]: p for p in api1.status()["datapath"]["programs"]}
        assert progs["cil_sock4_connect"]["attached"] == 1

        def served() -> bool:
            return any(be["address"] == f"{web['ipv4']}:{PORT}/TCP"
                       for r in json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "service",
                                                     "list", "-o", "json"))
                       for be in r.get("backends") or [])

        assert wait_for(served, timeout=15)
        for _ in range(3):
            reply = probe(a["netns"], "tcp-connect", VIP, "80")
            assert reply["ok"] and reply["reply"].split(":")[0] == a["ipv4"], reply
        flows = api1.bpf_ct()
        assert any(c["dst"] == web["ipv4"] and c["dport"] == PORT for c in flows), flows
        assert not any(c["dst"] == VIP for c in flows)  # translated at connect(), not per packet
    finally:
        servers.stop()
        cluster_down(name)
