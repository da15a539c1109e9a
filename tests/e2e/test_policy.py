"""Network policy end to end: real pods in namespaces, real TCP/UDP/ICMP probes, the
full reachability matrix per scenario, the drop reason and verdict event for every
denial, and `policy trace` agreeing with what the datapath did."""

from __future__ import annotations

import textwrap
import time

import pytest

from pilus.api.client import APIError

from .conftest import EXTERNAL_IP, EventLog, probe, wait_for

HTTP, ALT, DB = 80, 8080, 5432

PODS = {
    "default/deathstar": (["org=empire", "class=deathstar"], {"http": "80/TCP"}),
    "default/tiefighter": (["org=empire", "class=tiefighter"], {}),
    "default/xwing": (["org=alliance", "class=xwing"], {}),
    "prod/db": (["app=db"], {}),
    "dev/client": (["app=client"], {}),
    "dev/other": (["app=other"], {}),
}


_LOGS: list[EventLog] = []  # the module's monitor, reset whenever a scenario starts




@pytest.fixture(scope="module")
def world(api, node, external):
    api.request("PUT", "/namespace/prod", {"labels": {"team": "prod"}})
    api.request("PUT", "/namespace/dev", {"labels": {"team": "dev"}})
    pods = {}
    for name, (labels, ports) in PODS.items():
        pods[name] = api.request("POST", "/endpoint", {"name": name, "labels": labels, "named_ports": ports})
    from .conftest import Servers

    servers = Servers()
    for port in (HTTP, ALT):
        servers.start(pods["default/deathstar"]["netns"], "tcp-server", port)
    servers.start(pods["default/deathstar"]["netns"], "udp-server", 53)
    servers.start(pods["prod/db"]["netns"], "tcp-server", DB)
    servers.start(external, "tcp-server", ALT)
    servers.start(external, "tcp-server", HTTP)
    servers.start(node["netns"], "tcp-server", 7000)
    log = EventLog(api)
    _LOGS.append(log)
    time.sleep(0.3)
    yield pods, log
    servers.stop()
    api.request("DELETE", "/policy?all=true")
    for ep in pods.values():
        api.delete_endpoint(ep["id"])
    for ns in ("prod", "dev"):
        api.request("DELETE", f"/namespace/{ns}")


def apply(api, text: str) -> int:
    for log in _LOGS:
        log.events.clear()
    api.request("DELETE", "/policy?all=true")
    return api.request("PUT", "/policy", {"yaml": textwrap.dedent(text)})["revision"]


def tcp(pods, src: str, dst_ip: str, port: int) -> bool:
    return probe(pods[src]["netns"], "tcp-connect", dst_ip, str(port), "whoami", "1")["ok"]


def reach(api, pods, src: str, dst: str, port: int) -> bool:
    """Probe pod to pod over TCP, and check that `policy trace` predicts the outcome."""
    connected = tcp(pods, src, ip(pods, dst), port)
    predicted = trace(api, src, dst, f"{port}/TCP")
    assert predicted == ("ALLOWED" if connected else "DENIED"), (src, dst, port, connected, predicted)
    return connected


def ip(pods, name: str) -> str:
    return pods[name]["ipv4"]


def assert_denied(log: EventLog, src_ip: str, dst_ip: str, dport: int, reason: int, direction: str) -> None:
    drop = log.find(lambda e: e["type"] == "drop" and e.get("src_ip") == src_ip and e.get("dst_ip") == dst_ip
                    and e.get("dport") == dport and e.get("reason") == reason)
    assert drop, f"no drop {reason} for {src_ip} -> {dst_ip}:{dport}"
    verdict = log.find(lambda e: e["type"] == "policy-verdict" and e.get("action") == "deny"
                       and e.get("src_ip") == src_ip and e.get("dst_ip") == dst_ip and e.get("dport") == dport)
    assert verdict and verdict["direction"] == direction, verdict


def trace(api, src: str, dst: str, dport: str) -> str:
    return api.request("POST", "/policy/trace", {"src_endpoint": src, "dst_endpoint": dst, "dport": dport})["verdict"]


def test_no_policy_allows_everything(api, world):
    pods, _ = world
    api.request("DELETE", "/policy?all=true")
    assert reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert reach(api, pods, "dev/other", "prod/db", DB)
    assert trace(api, "default/xwing", "default/deathstar", "80/TCP") == "ALLOWED"


def test_l3_l4_ingress_allow_and_default_deny(api, world):
    pods, log = world
    apply(api, """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: rule1, namespace: default}
        spec:
          endpointSelector: {matchLabels: {org: empire, class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """)
    deathstar = ip(pods, "default/deathstar")
    assert reach(api, pods, "default/tiefighter", "default/deathstar", HTTP)
    assert not reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert_denied(log, ip(pods, "default/xwing"), deathstar, HTTP, 133, "ingress")
    assert not reach(api, pods, "default/tiefighter", "default/deathstar", ALT)
    # the endpoint is only selected for ingress: its own egress stays open
    assert tcp(pods, "default/deathstar", EXTERNAL_IP, HTTP)
    assert trace(api, "default/xwing", "default/deathstar", "80/TCP") == "DENIED"
    assert trace(api, "default/tiefighter", "default/deathstar", "80/TCP") == "ALLOWED"
    assert trace(api, "default/tiefighter", "default/deathstar", "8080/TCP") == "DENIED"
    entries = api.request("GET", "/bpf/policy/default/deathstar")["entries"]
    # the host (identity 1) may always reach local endpoints (Cilium's allow-localhost default)
    allowed = [e for e in entries if not e["deny"] and e["direction"] == "ingress" and e["identity"] != 1]
    assert allowed and all(e["dport"] == HTTP and e["proto"] == 6 for e in allowed)
    empire = {pods["default/tiefighter"]["identity"], pods["default/deathstar"]["identity"]}
    assert {e["identity"] for e in allowed} == empire


def test_deny_wins_over_allow(api, world):
    pods, log = world
    apply(api, """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: allow-empire, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEndpoints: [{matchLabels: {org: empire}}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: deny-tiefighter, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingressDeny:
          - fromEndpoints: [{matchLabels: {class: tiefighter}}]
            toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """)
    deathstar = ip(pods, "default/deathstar")
    assert not reach(api, pods, "default/tiefighter", "default/deathstar", HTTP)
    assert_denied(log, ip(pods, "default/tiefighter"), deathstar, HTTP, 181, "ingress")
    assert reach(api, pods, "default/tiefighter", "default/deathstar", ALT)  # the deny names port 80 only
    assert trace(api, "default/tiefighter", "default/deathstar", "80/TCP") == "DENIED"


def test_k8s_networkpolicy_namespace_and_pod_selector_and(api, world):
    pods, log = world
    apply(api, """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: db-from-dev-client, namespace: prod}
        spec:
          podSelector: {matchLabels: {app: db}}
          policyTypes: [Ingress]
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {team: dev}}
              podSelector: {matchLabels: {app: client}}
            ports: [{protocol: TCP, port: 5432}]
    """)
    db = ip(pods, "prod/db")
    assert reach(api, pods, "dev/client", "prod/db", DB)
    assert not reach(api, pods, "dev/other", "prod/db", DB)  # right namespace, wrong pod
    assert not reach(api, pods, "default/xwing", "prod/db", DB)  # wrong namespace
    assert_denied(log, ip(pods, "dev/other"), db, DB, 133, "ingress")


def test_k8s_networkpolicy_two_peers_are_or(api, world):
    pods, _ = world
    apply(api, """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: db-or, namespace: prod}
        spec:
          podSelector: {}
          ingress:
          - from:
            - namespaceSelector: {matchLabels: {team: dev}}
            - podSelector: {matchLabels: {app: nothing}}
    """)
    assert reach(api, pods, "dev/client", "prod/db", DB)
    assert reach(api, pods, "dev/other", "prod/db", DB)
    assert not reach(api, pods, "default/xwing", "prod/db", DB)


def test_egress_default_deny_with_cidr_and_except(api, world):
    pods, log = world
    apply(api, f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: xwing-egress, namespace: default}}
        spec:
          podSelector: {{matchLabels: {{class: xwing}}}}
          policyTypes: [Egress]
          egress:
          - to:
            - ipBlock: {{cidr: {EXTERNAL_IP}/32}}
            ports: [{{protocol: TCP, port: {ALT}}}]
    """)
    xwing = ip(pods, "default/xwing")
    assert tcp(pods, "default/xwing", EXTERNAL_IP, ALT)
    assert not tcp(pods, "default/xwing", EXTERNAL_IP, HTTP)
    # the trace resolves the external address through the ipcache, as the datapath did
    for port, verdict in ((ALT, "ALLOWED"), (HTTP, "DENIED")):
        traced = api.request("POST", "/policy/trace",
                             {"src_endpoint": "default/xwing", "dst_ip": EXTERNAL_IP, "dport": f"{port}/TCP"})
        assert traced["verdict"] == verdict, traced
    assert not reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert_denied(log, xwing, ip(pods, "default/deathstar"), HTTP, 133, "egress")
    assert tcp(pods, "default/tiefighter", EXTERNAL_IP, HTTP)  # not selected
    apply(api, f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: xwing-egress-except, namespace: default}}
        spec:
          podSelector: {{matchLabels: {{class: xwing}}}}
          policyTypes: [Egress]
          egress:
          - to:
            - ipBlock: {{cidr: 172.31.250.0/24, except: [{EXTERNAL_IP}/32]}}
    """)
    assert not tcp(pods, "default/xwing", EXTERNAL_IP, ALT)
    traced = api.request("POST", "/policy/trace",
                         {"src_endpoint": "default/xwing", "dst_ip": EXTERNAL_IP, "dport": f"{ALT}/TCP"})
    assert traced["verdict"] == "DENIED", traced  # the except carves the address out


def test_port_range_and_named_port(api, world):
    pods, _ = world
    apply(api, """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: ranges, namespace: default}
        spec:
          podSelector: {matchLabels: {class: deathstar}}
          ingress:
          - ports: [{protocol: TCP, port: 8000, endPort: 8100}]
    """)
    assert reach(api, pods, "default/xwing", "default/deathstar", ALT)
    assert not reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    apply(api, """
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: named, namespace: default}
        spec:
          podSelector: {matchLabels: {class: deathstar}}
          ingress:
          - ports: [{protocol: TCP, port: http}]
    """)
    assert reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert not reach(api, pods, "default/xwing", "default/deathstar", ALT)


def test_entities_and_icmp(api, node, world):
    pods, _ = world
    apply(api, """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: host-and-ping, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress:
          - fromEntities: [host]
          - icmps: [{fields: [{type: 8, family: IPv4}]}]
    """)
    deathstar = ip(pods, "default/deathstar")
    assert probe(node["netns"], "tcp-connect", deathstar, str(HTTP), "whoami", "1")["ok"]
    assert probe(pods["default/xwing"]["netns"], "ping", deathstar, "1")["ok"]
    assert not reach(api, pods, "default/xwing", "default/deathstar", HTTP)


def test_union_of_policies_and_new_pod_gets_access_incrementally(api, world):
    pods, _ = world
    apply(api, """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: a, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress: [{fromEndpoints: [{matchLabels: {class: xwing}}]}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: b, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress: [{fromEndpoints: [{matchLabels: {class: ywing}}]}]
    """)
    deathstar = ip(pods, "default/deathstar")
    assert reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert not reach(api, pods, "default/tiefighter", "default/deathstar", HTTP)
    ywing = api.request("POST", "/endpoint", {"name": "default/ywing", "labels": ["class=ywing"]})
    try:
        assert wait_for(lambda: tcp({"y": ywing}, "y", deathstar, HTTP), timeout=3)
    finally:
        api.delete_endpoint(ywing["id"])


def test_bad_policy_changes_nothing(api, world):
    pods, _ = world
    before = apply(api, """
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: keep, namespace: default}
        spec:
          endpointSelector: {matchLabels: {class: deathstar}}
          ingress: [{fromEndpoints: [{matchLabels: {org: empire}}]}]
    """)
    bad = textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: ok, namespace: default}
        spec:
          endpointSelector: {}
          ingress: [{}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: broken, namespace: default}
        spec:
          endpointSelector: {}
          ingress:
          - toPorts: [{ports: [{port: "70000", protocol: TCP}]}]
    """)
    with pytest.raises(APIError) as err:
        api.request("PUT", "/policy", {"yaml": bad})
    assert err.value.status == 400
    assert "document 1" in str(err.value) and "spec.ingress[0].toPorts[0].ports[0].port" in str(err.value)
    current = api.request("GET", "/policy")
    assert current["revision"] == before and [p["metadata"]["name"] for p in current["policies"]] == ["keep"]
    assert not reach(api, pods, "default/xwing", "default/deathstar", HTTP)
    assert reach(api, pods, "default/tiefighter", "default/deathstar", HTTP)
    with pytest.raises(APIError) as missing:
        api.request("DELETE", "/policy?name=nope&namespace=default")
    assert missing.value.status == 404 and "not found" in str(missing.value)
