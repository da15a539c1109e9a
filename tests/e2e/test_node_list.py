"""`pilus node list` on a real two-node cluster: each agent sees both nodes through the
node registry in the kvstore (cilium/state/nodes/v1/<cluster>/<node>)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from pilus.cluster.plan import DEFAULT_STATE_ROOT

from .conftest import pilus_cli, two_node_cluster

POD = "10.205.0.0/16"
UNDERLAY = "172.31.247.0/24"


@pytest.fixture
def two_nodes():
    with two_node_cluster("tn", POD, UNDERLAY) as cluster:
        yield cluster


def test_each_node_lists_both(two_nodes):
    name, doc = two_nodes
    want = {n["name"]: (n["node_ip"], n["pod_cidr"], n["router_ip"]) for n in doc["nodes"]}
    assert len(want) == 2
    for node in doc["nodes"]:
        deadline = time.monotonic() + 15
        while True:  # the other agent may register a moment later
            rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "node", "list", "-o", "json"))
            if len(rows) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {r["name"]: (r["node_ip"], r["pod_cidr"], r["router_ip"]) for r in rows} == want
        assert [r["name"] for r in rows if r["local"]] == [node["name"]]
        assert all(r["health"] == "Ok" and r["cluster"] == name for r in rows)
    table = pilus_cli("--cluster", name, "node", "list")
    assert table.startswith("NAME") and f"{doc['nodes'][0]['name']} (local)" in table
    assert "Cluster:                 2/2 nodes reachable" in pilus_cli("--cluster", name, "status")


def test_a_restarted_agent_registers_again(two_nodes):
    """node2's agent is killed; its supervisor starts it again, with a new boot id."""
    name, doc = two_nodes
    first, second = (n["name"] for n in doc["nodes"])

    def boot_ids():
        return {r["name"]: r["boot_id"]
                for r in json.loads(pilus_cli("--cluster", name, "--node", first, "node", "list", "-o", "json"))}

    deadline = time.monotonic() + 15
    while second not in (before := boot_ids()):
        assert time.monotonic() < deadline, before
        time.sleep(0.2)
    sup = json.loads((Path(DEFAULT_STATE_ROOT) / name / "supervisor.json").read_text())
    os.kill(sup["agents"][second]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (now := boot_ids()).get(second) == before[second]:
        assert time.monotonic() < deadline, "node2 did not register again"
        time.sleep(0.3)
    assert set(now) == {first, second} and now[first] == before[first]
