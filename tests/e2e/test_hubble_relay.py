"""The cluster's Hubble Relay and `pilus observe`, end to end (issue 12, requirements 3
and 4): a two-node cluster whose supervisor runs the relay on the bridge address :4245;
pods on both nodes, a policy drop on node2 (xwing on node1 -> deathstar on node2) and
allowed traffic on node1 (tiefighter -> web). Through the relay `pilus observe` shows
the flows of both nodes with both ends' pod names, filters them (--verdict DROPPED),
`--node` reads one node only, GetNodes lists both nodes connected, and after `pilus
cluster node remove` of node2 the relay reports it unavailable while node1's flows keep
coming (also in a follow stream that was open when node2 went)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pilus.api.client import Client
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc, relay_pb2

from .conftest import Servers, pilus_cli, probe, two_node_cluster, wait_for

HTTP = 80
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: relay-e2e, namespace: default}
spec:
  endpointSelector: {matchLabels: {role: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
#: pod -> (node index, labels)
PODS = {
    "relay-xwing": (0, "org=alliance,class=xwing"),
    "relay-tiefighter": (0, "org=empire,class=tiefighter"),
    "relay-web": (0, "role=server,app=web"),
    "relay-deathstar": (1, "role=server,org=empire,class=deathstar"),
}


def observe(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pilus", "--cluster", name, "observe", *args],
                          capture_output=True, text=True, timeout=60)


def observe_json(name: str, *args: str) -> list[dict]:
    r = observe(name, *args, "-o", "json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def flows_of(lines: list[dict]) -> list[dict]:
    return [line["flow"] for line in lines if "flow" in line]


def between(flows: list[dict], src: str, dst: str) -> list[dict]:
    return [f for f in flows if f.get("source", {}).get("pod_name") == src
            and f.get("destination", {}).get("pod_name") == dst]


def short(node_name: str) -> str:
    """A node name without Hubble's ``<cluster>/`` in front."""
    return node_name.rpartition("/")[2]


def connect(pods: dict, src: str, dst: str) -> bool:
    return probe(pods[src]["netns"], "tcp-connect", pods[dst]["ipv4"], str(HTTP), "whoami", "1")["ok"]


@pytest.fixture(scope="module")
def cluster():
    with two_node_cluster("hr", "10.217.0.0/16", "172.31.235.0/24") as (name, doc):
        nodes = doc["nodes"]
        pods = {}
        for pod, (i, labels) in PODS.items():
            pods[pod] = json.loads(pilus_cli("--cluster", name, "--node", nodes[i]["name"], "endpoint", "create",
                                             f"default/{pod}", "-l", labels, "-o", "json"))
            pods[pod]["node"] = nodes[i]
        for node in nodes:  # every node knows every pod (names of remote ends in flows)
            def known(node=node) -> bool:
                rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "bpf", "ipcache", "list",
                                            "-o", "json"))
                return all(f"{p['ipv4']}/32" in {r["prefix"] for r in rows} for p in pods.values())
            assert wait_for(known, timeout=20), f"not every pod is in {node['name']}'s ipcache"
        servers = Servers()
        try:
            for pod in ("relay-web", "relay-deathstar"):
                servers.start(pods[pod]["netns"], "tcp-server", HTTP)
            Client(nodes[0]["socket"]).import_policy(POLICY)
            time.sleep(1.0)  # the policy reaches node2 through the kvstore
            channel = grpc.insecure_channel(doc["relay_address"])
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False
            assert wait_for(serving, timeout=20), f"the relay at {doc['relay_address']} does not answer"
            assert wait_for(lambda: not connect(pods, "relay-xwing", "relay-deathstar"), timeout=15)
            assert connect(pods, "relay-tiefighter", "relay-web")
            yield name, doc, pods, channel
            channel.close()
        finally:
            servers.stop()


def test_the_relay_runs_on_the_bridge_address_and_lists_both_nodes(cluster):
    name, doc, pods, channel = cluster
    assert doc["relay_address"] == f"{doc['bridge_ip']}:4245"
    stub = observer_pb2_grpc.ObserverStub(channel)
    nodes = wait_for(lambda: [n for n in stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=5).nodes
                              if n.state == relay_pb2.NODE_CONNECTED], timeout=15)
    assert sorted(short(n.name) for n in nodes) == sorted(n["name"] for n in doc["nodes"])
    assert {n.address for n in nodes} == {f"{n['node_ip']}:4244" for n in doc["nodes"]}
    status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
    assert status.num_connected_nodes.value == 2 and status.num_unavailable_nodes.value == 0
    assert status.max_flows == 2 * 4095 and status.num_flows > 0


def test_observe_through_the_relay_shows_both_nodes_with_both_ends(cluster):
    name, doc, pods, _ = cluster
    node1, node2 = (n["name"] for n in doc["nodes"])

    def both() -> list[dict] | None:
        flows = flows_of(observe_json(name, "--last", "100"))
        ok = between(flows, "relay-xwing", "relay-deathstar") and between(flows, "relay-tiefighter", "relay-web")
        return flows if ok else None
    flows = wait_for(both, timeout=15)
    assert flows, "the relay did not return the drop on node2 and the allowed flow on node1"
    assert {short(f["node_name"]) for f in between(flows, "relay-xwing", "relay-deathstar")} == {node2}
    assert {short(f["node_name"]) for f in between(flows, "relay-tiefighter", "relay-web")} == {node1}
    times = [datetime.fromisoformat(f["time"]) for f in flows]
    assert times == sorted(times)  # merged by time
    assert len(flows) <= 100
    compact = observe(name, "--last", "100", "--from-pod", "default/relay-xwing")
    assert compact.returncode == 0, compact.stderr
    line = next(x for x in compact.stdout.splitlines() if "default/relay-deathstar:80" in x)
    assert ": default/relay-xwing:" in line and ("DENIED" in line or "DROPPED" in line), line


def test_verdict_dropped_shows_only_the_drop_with_its_reason(cluster):
    name, doc, pods, _ = cluster
    flows = flows_of(observe_json(name, "--last", "100", "--verdict", "DROPPED"))
    assert flows and all(f["verdict"] == "DROPPED" for f in flows)
    drops = between(flows, "relay-xwing", "relay-deathstar")
    assert drops and all(f["drop_reason_desc"] == "POLICY_DENIED" for f in drops)
    assert not between(flows, "relay-tiefighter", "relay-web")
    assert "k8s:class=xwing" in drops[-1]["source"]["labels"]
    assert "k8s:class=deathstar" in drops[-1]["destination"]["labels"]


def test_node_reads_one_node_only(cluster):
    name, doc, pods, _ = cluster
    node1 = doc["nodes"][0]["name"]
    flows = flows_of(observe_json(name, "--node", node1, "--last", "100"))
    assert flows and {short(f["node_name"]) for f in flows} == {node1}
    assert between(flows, "relay-tiefighter", "relay-web")
    assert not between(flows, "relay-xwing", "relay-deathstar")  # node2 reported that drop


def test_a_removed_node_is_unavailable_and_the_others_flows_keep_coming(cluster):
    name, doc, pods, channel = cluster
    node1, node2 = (n["name"] for n in doc["nodes"])
    stub = observer_pb2_grpc.ObserverStub(channel)
    follow = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, whitelist=[flow_pb2.FlowFilter(
        source_pod=["default/relay-tiefighter"])]), timeout=120)
    seen: list[observer_pb2.GetFlowsResponse] = []

    def read() -> None:
        try:
            for r in follow:
                seen.append(r)
        except grpc.RpcError:
            pass
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: seen, timeout=10), "the follow stream sent nothing"
        pilus_cli("cluster", "node", "remove", "--name", name, node2)

        def unavailable() -> bool:
            try:
                reply = stub.GetNodes(observer_pb2.GetNodesRequest(), timeout=5)
            except grpc.RpcError as exc:  # asked while the node's namespace went away: ask again
                log.append(f"GetNodes: {exc.code().name}")
                return False
            nodes = {short(n.name): n.state for n in reply.nodes}
            return nodes.get(node1) == relay_pb2.NODE_CONNECTED and nodes.get(node2) in (
                relay_pb2.NODE_UNAVAILABLE, relay_pb2.NODE_GONE, None)
        log: list[str] = []
        assert wait_for(unavailable, timeout=20), f"the relay does not report node2 gone: {log}"
        status = stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
        assert status.num_connected_nodes.value == 1
        assert [short(n) for n in status.unavailable_nodes] in ([node2], [])
        assert wait_for(lambda: any(r.HasField("node_status") and r.node_status.state_change ==
                                    relay_pb2.NODE_UNAVAILABLE and node2 in map(short, r.node_status.node_names)
                                    for r in seen), timeout=10), "the follow stream did not report node2"

        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert connect(pods, "relay-tiefighter", "relay-web")
        assert wait_for(lambda: any(r.HasField("flow") and short(r.flow.node_name) == node1
                                    and r.flow.destination.pod_name == "relay-web"
                                    and r.flow.time.ToDatetime(tzinfo=UTC) >= datetime.fromisoformat(started)
                                    for r in seen), timeout=10), "node1's new flow did not come through the follow"
        r = observe(name, "--since", started, "--from-pod", "default/relay-tiefighter", "-o", "json")
        assert r.returncode == 0, r.stderr
        fresh = flows_of([json.loads(x) for x in r.stdout.splitlines() if x.strip()])
        assert between(fresh, "relay-tiefighter", "relay-web") and {short(f["node_name"]) for f in fresh} == {node1}
        if r.stderr:  # node2 still known: its node_status (JSON with -o json) on stderr
            status_lines = [json.loads(x)["node_status"] for x in r.stderr.splitlines()]
            assert [(s["state_change"], [short(n) for n in s["node_names"]]) for s in status_lines] == \
                [("NODE_UNAVAILABLE", [node2])]
            text = observe(name, "--since", started, "--from-pod", "default/relay-tiefighter")
            assert text.returncode == 0 and "default/relay-tiefighter:" in text.stdout, text.stderr
            assert text.stderr.strip().endswith(f": 1 nodes are unavailable: {name}/{node2}"), text.stderr
    finally:
        follow.cancel()
        reader.join(timeout=5)
