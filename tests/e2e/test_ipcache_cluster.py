"""The cluster-wide ipcache on a real two-node cluster: an endpoint created on node2 is
in node1's pilus_ipcache (its identity, tunnel endpoint = node2's IP) through the
kvstore (cilium/state/ip/v1/<cluster>/<ip>), node2's IP is remote-node there, and the
entry goes when the endpoint is deleted."""

from __future__ import annotations

import json
import time

import pytest

from pilus.identity import reserved

from .conftest import pilus_cli, two_node_cluster

POD = "10.206.0.0/16"
UNDERLAY = "172.31.246.0/24"


@pytest.fixture
def two_nodes():
    with two_node_cluster("ic", POD, UNDERLAY) as cluster:
        yield cluster


def test_a_remote_endpoint_and_node_are_in_the_ipcache(two_nodes):
    name, doc = two_nodes
    first, second = doc["nodes"]

    def ipcache() -> dict[str, dict]:
        rows = json.loads(pilus_cli("--cluster", name, "--node", first["name"], "bpf", "ipcache", "list", "-o", "json"))
        return {r["prefix"]: r for r in rows}

    def wait_for(pred, what: str, timeout: float = 10) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while not pred(rows := ipcache()):
            assert time.monotonic() < deadline, f"{what}: {rows}"
            time.sleep(0.2)
        return rows

    ep = json.loads(pilus_cli("--cluster", name, "--node", second["name"], "endpoint", "create", "default/remote",
                          "-l", "app=remote", "-o", "json"))
    ip = f"{ep['ipv4']}/32"
    rows = wait_for(lambda rows: ip in rows, "node2's endpoint in node1's ipcache")
    assert rows[ip]["identity"] == ep["identity"] and rows[ip]["tunnel_endpoint"] == second["node_ip"]
    node2 = f"{second['node_ip']}/32"
    rows = wait_for(lambda rows: node2 in rows, "node2's IP in node1's ipcache")
    assert rows[node2]["identity"] == reserved.REMOTE_NODE
    assert rows[f"{first['node_ip']}/32"]["identity"] == reserved.HOST

    pilus_cli("--cluster", name, "--node", second["name"], "endpoint", "delete", "default/remote")
    wait_for(lambda rows: ip not in rows, "the deleted endpoint gone from node1", timeout=5)
