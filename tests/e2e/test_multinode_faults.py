"""Faults of a two-node tunnel-mode cluster on etcd, during traffic across the tunnel:
etcd killed (the datapath does not need the store: no connection fails; `status`
shows the outage; the agents resync without a restart), and node2's agent killed
(connections to its pod keep working; node1 keeps node2's entries), then node2
removed (`pilus cluster node remove`: node1 forgets its pods, node and routes at once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pilus.api.client import unix_http
from pilus.cluster import cluster_down

from .conftest import Servers, pilus_cli, wait_for

POD, UNDERLAY, PORT = "10.214.0.0/16", "172.31.238.0/24", 8080


def _supervisor(name: str) -> dict:
    return json.loads((Path("/run/pilus") / name / "supervisor.json").read_text())


def _kvstore_state(node: dict) -> str:
    status, body = unix_http(node["socket"], "GET", "/v1/healthz", timeout=3)
    return body["kvstore"]["state"] if status == 200 else "unreachable"


def _ipcache(name: str, node: dict) -> set[str]:
    rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "bpf", "ipcache", "list", "-o", "json"))
    return {r["prefix"] for r in rows}


def test_traffic_across_nodes_survives_etcd_and_agent_kills():
    name = f"mf{os.getpid() % 10000}"
    cluster_down(name)
    servers = Servers()
    loop = None
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", POD,
                                   "--underlay-cidr", UNDERLAY, "--kvstore", "etcd", "-o", "json"))
        node1, node2 = doc["nodes"]
        a = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "endpoint", "create", "default/a",
                                 "-l", "app=a", "-o", "json"))
        b = json.loads(pilus_cli("--cluster", name, "--node", node2["name"], "endpoint", "create", "default/b",
                                 "-l", "app=b", "-o", "json"))
        assert wait_for(lambda: f"{b['ipv4']}/32" in _ipcache(name, node1), timeout=15)
        servers.start(b["netns"], "tcp-server", PORT)
        agent1 = _supervisor(name)["agents"][node1["name"]]["pid"]

        # a new connection every 4 ms from node1's pod to node2's for the whole test
        loop = subprocess.Popen(["ip", "netns", "exec", a["netns"], sys.executable, "-m", "pilus.testing.probe",
                                 "tcp-connect-loop", b["ipv4"], str(PORT), "30"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(1)

        etcd = _supervisor(name)["etcd"]["pid"]
        os.kill(etcd, signal.SIGKILL)
        assert wait_for(lambda: _kvstore_state(node1) == "Failure", timeout=5, interval=0.05), \
            "node1's status did not show the etcd outage"
        assert wait_for(lambda: _kvstore_state(node1) == "Ok" and _kvstore_state(node2) == "Ok", timeout=30)
        # resynced without a restart: node2's new pod reaches node1's ipcache through the new etcd
        c = json.loads(pilus_cli("--cluster", name, "--node", node2["name"], "endpoint", "create", "default/c",
                                 "-l", "app=c", "-o", "json"))
        assert wait_for(lambda: f"{c['ipv4']}/32" in _ipcache(name, node1), timeout=20)
        assert _supervisor(name)["agents"][node1["name"]]["pid"] == agent1

        # node2's agent killed: its pod stays reachable, node1 keeps its entries (lease)
        agent2 = _supervisor(name)["agents"][node2["name"]]["pid"]
        os.kill(agent2, signal.SIGKILL)
        time.sleep(2)
        assert f"{b['ipv4']}/32" in _ipcache(name, node1)

        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["connected"] > 300 and result["failed"] == 0, result

        # node2 taken away: node1 forgets its pods, node and route at once (its leases are
        # revoked), not after the lease TTL
        bad = subprocess.run([sys.executable, "-m", "pilus", "cluster", "node", "remove", "--name", name,
                              f"{name}-node9"], capture_output=True, text=True)
        assert bad.returncode != 0 and f"no node named '{name}-node9'" in bad.stderr, bad.stderr
        t0 = time.monotonic()
        out = pilus_cli("cluster", "node", "remove", "--name", name, node2["name"])
        assert "kvstore lease" in out and f"netns {node2['netns']}" in out, out
        assert wait_for(lambda: not {f"{b['ipv4']}/32", f"{c['ipv4']}/32"} & _ipcache(name, node1), timeout=5)
        nodes = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "node", "list", "-o", "json"))
        assert [n["name"] for n in nodes] == [node1["name"]], nodes
        assert wait_for(lambda: b["ipv4"].rsplit(".", 1)[0] not in pilus_cli(
            "--cluster", name, "--node", node1["name"], "bpf", "tunnel", "list"), timeout=5)
        assert time.monotonic() - t0 < 20  # well inside the lease TTL after the agent stopped
        assert node2["netns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                    text=True).stdout
        last = subprocess.run([sys.executable, "-m", "pilus", "cluster", "node", "remove", "--name", name,
                               node1["name"]], capture_output=True, text=True)
        assert last.returncode != 0 and "last node" in last.stderr, last.stderr
    finally:
        if loop is not None and loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
            loop.wait()
        servers.stop()
        cluster_down(name)
