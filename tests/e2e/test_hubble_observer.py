"""Hubble's Observer API of a real agent (issue 12): real pods, a real policy drop and
allowed traffic, read over `<state-dir>/hubble.sock` with the stubs generated from our
protos and with plain grpcio calls by method name; health and ServerStatus.

The agent's `hubble` row serves it (on by default)."""

from __future__ import annotations

import textwrap
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc

from .conftest import Servers, probe, state_dir, wait_for

HTTP = 80
PODS = {
    "default/hub-deathstar": ["org=empire", "class=deathstar"],
    "default/hub-tiefighter": ["org=empire", "class=tiefighter"],
    "default/hub-xwing": ["org=alliance", "class=xwing"],
}
POLICY = """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: hubble-e2e, namespace: default}
    spec:
      endpointSelector: {matchLabels: {class: deathstar}}
      ingress:
      - fromEndpoints: [{matchLabels: {org: empire}}]
        toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def channel(node):
    sock = state_dir(node) / "hubble.sock"
    if not wait_for(sock.exists, timeout=5):
        pytest.fail(f"the agent serves no Hubble socket ({sock})")
    ch = grpc.insecure_channel(f"unix:{sock}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def pods(api, channel):
    created = {name: api.request("POST", "/endpoint", {"name": name, "labels": labels})
               for name, labels in PODS.items()}
    servers = Servers()
    servers.start(created["default/hub-deathstar"]["netns"], "tcp-server", HTTP)
    api.request("PUT", "/policy", {"yaml": textwrap.dedent(POLICY)})
    time.sleep(0.3)
    yield created
    servers.stop()
    api.request("DELETE", "/policy?name=hubble-e2e&namespace=default")
    for ep in created.values():
        api.delete_endpoint(ep["id"])


def connect(pods, src: str, dst: str) -> bool:
    return probe(pods[src]["netns"], "tcp-connect", pods[dst]["ipv4"], str(HTTP), "whoami", "1")["ok"]


def flows(channel, **req) -> list[flow_pb2.Flow]:
    stub = observer_pb2_grpc.ObserverStub(channel)
    return [r.flow for r in stub.GetFlows(observer_pb2.GetFlowsRequest(**req), timeout=10)
            if r.WhichOneof("response_types") == "flow"]


def test_health_and_server_status(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "hubble.server.Observer"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    status = observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
    assert status.max_flows == 4095 and status.uptime_ns > 0
    # the same call by method name, bytes in and out: field 2 of ServerStatusResponse is max_flows
    raw = channel.unary_unary("/observer.Observer/ServerStatus", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)(b"", timeout=5)
    assert b"\x10\xff\x1f" in raw  # tag (2 << 3 | 0) = 0x10, varint 4095 = ff 1f


def test_a_policy_drop_has_both_ends_names_labels_and_reason(channel, pods):
    assert not connect(pods, "default/hub-xwing", "default/hub-deathstar")
    wanted = dict(whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED],
                                                 source_pod=["default/hub-xwing"],
                                                 destination_pod=["default/hub-deathstar"])])
    dropped = wait_for(lambda: flows(channel, **wanted), timeout=10)
    assert dropped, "no DROPPED flow from hub-xwing to hub-deathstar"
    f = dropped[-1]
    assert f.drop_reason_desc == flow_pb2.POLICY_DENIED
    assert f.traffic_direction == flow_pb2.INGRESS
    assert f.source.namespace == "default" and f.source.pod_name == "hub-xwing"
    assert "k8s:org=alliance" in f.source.labels
    assert f.destination.pod_name == "hub-deathstar" and "k8s:class=deathstar" in f.destination.labels
    assert f.source.identity and f.destination.identity and pods["default/hub-xwing"]["id"] == f.source.ID
    assert f.IP.source == pods["default/hub-xwing"]["ipv4"] and f.l4.TCP.destination_port == HTTP
    assert f.l4.TCP.flags.SYN and f.node_name


def test_follow_sees_an_allowed_connection(channel, pods):
    stub = observer_pb2_grpc.ObserverStub(channel)
    stream = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True, whitelist=[flow_pb2.FlowFilter(
        source_pod=["default/hub-tiefighter"], destination_port=[str(HTTP)])]), timeout=30)
    try:
        assert connect(pods, "default/hub-tiefighter", "default/hub-deathstar")
        first = next(r for r in stream if r.WhichOneof("response_types") == "flow")
        assert first.flow.verdict == flow_pb2.FORWARDED
        assert first.flow.destination.pod_name == "hub-deathstar"
    finally:
        stream.cancel()
