"""Services through a real cluster: ClusterIP from pods (TCP, UDP), backend
states, a service without backends refusing at once, NodePort from the external
namespace, session affinity, and backends added/removed under load."""

from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from pilus.api.client import APIError
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc

from .conftest import EXTERNAL_IP, probe, state_dir, wait_for

VIP = "10.96.10.10"
PORT = 8080


@pytest.fixture(scope="module")
def svc_api(api):
    return api


@pytest.fixture(scope="module")
def pods(svc_api):
    created = {}
    for name, labels in (("default/web1", ["app=web"]), ("default/web2", ["app=web"]),
                         ("default/client", ["app=client"])):
        created[name.split("/")[1]] = svc_api.create_endpoint(name, labels)
    yield created
    for ep in created.values():
        svc_api.delete_endpoint(ep["id"])


@pytest.fixture
def service(svc_api):
    made = []

    def make(yaml_text):
        res = svc_api.put_service(yaml_text=yaml_text)
        made.extend(res["applied"])
        return res

    yield make
    for full in made:
        ns, name = full.split("/")
        with contextlib.suppress(APIError):
            svc_api.delete_service(ns, name)


def web_yaml(name="web", vip=VIP, extra=""):
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: {PORT}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {PORT}}}
{extra}"""


def backends_used(api, client_ip):
    return {c["dst"] for c in api.bpf_ct() if c["src"] == client_ip and c["dport"] == PORT}


def test_clusterip_tcp_and_udp_from_a_pod(svc_api, pods, servers, service):
    for w in ("web1", "web2"):
        servers.start(pods[w]["netns"], "tcp-server", PORT)
        servers.start(pods[w]["netns"], "udp-server", PORT)
    service(web_yaml())
    svc_api.bpf_ct_flush()  # pod IPs are reused across tests: start from a clean table
    rows = [r for r in svc_api.list_services() if r["service"] == "default/web"]
    assert {r["frontend"] for r in rows} == {f"{VIP}:80/TCP", f"{VIP}:53/UDP"}
    assert all(len(r["backends"]) == 2 for r in rows)
    client = pods["client"]
    for _ in range(12):
        res = probe(client["netns"], "tcp-connect", VIP, "80")
        assert res["ok"], res
        assert res["reply"].split(":")[0] == client["ipv4"]  # backends see the client
    assert backends_used(svc_api, client["ipv4"]) == {pods["web1"]["ipv4"], pods["web2"]["ipv4"]}
    res = probe(client["netns"], "udp-send", VIP, "53", "hello")
    assert res == {"ok": True, "reply": "hello", "peer": f"{VIP}:53"}


def test_service_without_backends_refuses_at_once(svc_api, pods, service, node):
    service(web_yaml(name="nobody", vip="10.96.10.11").replace("app: web", "app: nobody"))
    before = sum(m["packets"] for m in svc_api.bpf_metrics() if m["reason"] == 158)
    t0 = time.monotonic()
    res = probe(pods["client"]["netns"], "tcp-connect", "10.96.10.11", "80")
    assert res == {"ok": False, "error": "refused"}
    assert time.monotonic() - t0 < 5
    after = sum(m["packets"] for m in svc_api.bpf_metrics() if m["reason"] == 158)
    assert after > before
    # Hubble's flow of the drop names the service whose frontend the pod asked for
    want = flow_pb2.FlowFilter(destination_service=["default/nobody"], verdict=[flow_pb2.DROPPED])
    with grpc.insecure_channel(f"unix:{state_dir(node) / 'hubble.sock'}") as ch:
        got = [r.flow for r in observer_pb2_grpc.ObserverStub(ch).GetFlows(
            observer_pb2.GetFlowsRequest(number=5, whitelist=[want]), timeout=10) if r.HasField("flow")]
    assert got, "no DROPPED flow with destination_service default/nobody"
    f = got[-1]
    assert f.drop_reason_desc == flow_pb2.SERVICE_BACKEND_NOT_FOUND
    assert (f.IP.destination, f.l4.TCP.destination_port) == ("10.96.10.11", 80)
    assert (f.source.namespace, f.source.pod_name) == ("default", "client")


def test_maintenance_backend_gets_no_new_connections(svc_api, pods, servers, service):
    for w in ("web1", "web2"):
        servers.start(pods[w]["netns"], "tcp-server", PORT)
    service(web_yaml(name="maint", vip="10.96.10.12"))
    svc_api.bpf_ct_flush()
    svc_api.set_backend_state(f"{pods['web1']['ipv4']}:{PORT}", "maintenance")
    try:
        for _ in range(8):
            assert probe(pods["client"]["netns"], "tcp-connect", "10.96.10.12", "80")["ok"]
        assert backends_used(svc_api, pods["client"]["ipv4"]) == {pods["web2"]["ipv4"]}
    finally:
        svc_api.set_backend_state(f"{pods['web1']['ipv4']}:{PORT}", "active")


def test_session_affinity_client_ip(svc_api, pods, servers, service):
    for w in ("web1", "web2"):
        servers.start(pods[w]["netns"], "tcp-server", PORT)
    service(web_yaml(name="sticky", vip="10.96.10.13", extra="  sessionAffinity: ClientIP\n"))
    svc_api.bpf_ct_flush()
    for _ in range(8):
        assert probe(pods["client"]["netns"], "tcp-connect", "10.96.10.13", "80")["ok"]
    assert len(backends_used(svc_api, pods["client"]["ipv4"])) == 1


def test_nodeport_from_the_external_namespace(svc_api, node, pods, servers, service, external):
    for w in ("web1", "web2"):
        servers.start(pods[w]["netns"], "tcp-server", PORT)
    service(f"""
kind: Service
metadata: {{name: np, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.10.14
  selector: {{app: web}}
  externalTrafficPolicy: Local
  ports: [{{port: 80, targetPort: {PORT}, nodePort: 30080}}]
""")
    kinds = {r["type"] for r in svc_api.list_services() if r["service"] == "default/np"}
    assert "NodePort" in kinds
    for _ in range(6):
        res = probe(external, "tcp-connect", node["node_ip"], "30080")
        assert res["ok"], res
        assert res["reply"].split(":")[0] == EXTERNAL_IP  # client address preserved
    # a ClusterIP is not reachable from outside (the external namespace has no
    # route to it anyway); the node's address on another port is not a service
    res = probe(external, "tcp-connect", node["node_ip"], "30099")
    assert not res["ok"]


def test_backends_change_under_load(svc_api, pods, servers, service):
    """A client keeps connecting while a backend is drained and removed from
    the service: only connections to the removed backend may fail."""
    for w in ("web1", "web2"):
        servers.start(pods[w]["netns"], "tcp-server", PORT)
    service(web_yaml(name="churn", vip="10.96.10.15"))
    results: list[dict] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            results.append(probe(pods["client"]["netns"], "tcp-connect", "10.96.10.15", "80"))

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: len(results) >= 5, timeout=20)
        svc_api.set_backend_state(f"{pods['web2']['ipv4']}:{PORT}", "terminating")
        n = len(results)
        wait_for(lambda: len(results) >= n + 5, timeout=20)
    finally:
        stop.set()
        t.join(30)
        svc_api.set_backend_state(f"{pods['web2']['ipv4']}:{PORT}", "active")
    failed = [r for r in results if not r["ok"]]
    assert failed == [], failed
