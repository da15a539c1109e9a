"""Kubernetes Service / Endpoints / EndpointSlice parsing and validation."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from pilus.loadbalancer.model import (
    ServiceValidationError,
    parse_documents,
    parse_selector,
    service_from_json,
)

WEB = """
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    service.cilium.io/lb-algorithm: maglev
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
  externalIPs: [192.0.2.10]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalTrafficPolicy: Local
"""


def problems(text):
    with pytest.raises(ServiceValidationError) as ei:
        parse_documents(text)
    return ei.value.problems


def test_full_service():
    (s,) = parse_documents(WEB)
    assert s.key == ("shop", "web")
    assert s.type == "NodePort"
    assert s.cluster_ip == IPv4Address("10.96.0.10")
    assert [(p.name, p.port, p.protocol, p.target, p.node_port) for p in s.ports] == [
        ("http", 80, "TCP", "http", 30080),
        ("dns", 53, "UDP", 5353, 30053),
    ]
    assert s.selector == {"app": "web"}
    assert s.external_ips == [IPv4Address("192.0.2.10")]
    assert s.session_affinity and s.affinity_timeout == 600
    assert s.external_traffic_policy == "Local" and s.internal_traffic_policy == "Cluster"
    assert s.algorithm == "maglev"
    # round trip through the Kubernetes form
    (again,) = parse_documents(__import__("json").dumps(s.to_k8s()))
    assert again.to_json() == s.to_json()


def test_defaults():
    s = service_from_json({"kind": "Service", "metadata": {"name": "db"},
                           "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432}]}})
    assert s.namespace == "default" and s.type == "ClusterIP"
    assert s.ports[0].target == 5432 and s.ports[0].protocol == "TCP"
    assert not s.session_affinity and s.algorithm is None and s.selector is None


@pytest.mark.parametrize(
    "patch,expected",
    [
        ("port: 70000", "spec.ports[0].port: must be 1-65535, got 70000"),
        ("port: 0", "spec.ports[0].port: must be 1-65535, got 0"),
        ("port: 80, targetPort: 99999", "spec.ports[0].targetPort: must be 1-65535"),
        ("port: 80, protocol: SCTP", "spec.ports[0].protocol: must be TCP or UDP"),
        ("port: 80, nodePort: 30001", "spec.ports[0].nodePort: only NodePort and LoadBalancer"),
    ],
)
def test_bad_ports_name_the_field(patch, expected):
    text = f"""
kind: Service
metadata: {{name: a}}
spec:
  clusterIP: 10.96.0.1
  ports: [{{{patch}}}]
"""
    assert any(expected in p for p in problems(text)), problems(text)


def test_bad_selector_and_ips():
    text = """
kind: Service
metadata: {name: a}
spec:
  clusterIP: 10.96.0.300
  selector: {"bad key!": web, app: "-x-"}
  externalIPs: [nope]
  ports: [{port: 80}]
"""
    got = problems(text)
    assert any(p.startswith("spec.clusterIP: '10.96.0.300' is not an IPv4 address") for p in got)
    assert any(p.startswith("spec.selector.bad key!: invalid label key") for p in got)
    assert any(p.startswith("spec.selector.app: invalid label value") for p in got)
    assert any(p.startswith("spec.externalIPs[0]:") for p in got)


def test_structural_problems():
    assert any("spec.clusterIP: required" in p for p in problems(
        "kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1}]}"))
    assert any("spec.ports: required" in p for p in problems(
        "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}"))
    assert any("metadata.name" in p for p in problems(
        "kind: Service\nmetadata: {name: Bad_Name}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}"))
    assert any("kind: must be Service" in p for p in problems("kind: Pod\nmetadata: {name: a}"))
    assert any("not valid YAML" in p for p in problems("kind: [unclosed"))
    two = "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1}, {port: 2}]}"
    assert any("spec.ports[0].name: required" in p for p in problems(two))
    dup = ("kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: "
           "[{name: a, port: 1}, {name: b, port: 1}]}")
    assert any("spec.ports[1].port: 1/TCP is already spec.ports[0]" in p for p in problems(dup))
    np = ("kind: Service\nmetadata: {name: a}\n"
          "spec: {type: NodePort, clusterIP: 10.96.0.1, ports: [{port: 1, nodePort: 80}]}")
    assert any("spec.ports[0].nodePort: must be 30000-32767" in p for p in problems(np))
    ann = ("kind: Service\nmetadata: {name: a, annotations: {service.cilium.io/lb-algorithm: rr}}\n"
           "spec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}")
    assert any("lb-algorithm]: must be random or maglev" in p for p in problems(ann))


def test_endpoints_and_slices():
    text = """
kind: Service
metadata: {name: ext}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
---
kind: Endpoints
metadata: {name: ext}
subsets:
- addresses: [{ip: 10.200.1.5}, {ip: 10.200.1.6}]
  notReadyAddresses: [{ip: 10.200.1.7}]
  ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-abc, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.200.1.8]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.200.1.9]
  conditions: {ready: false, serving: false}
"""
    (s,) = parse_documents(text)
    assert [(str(e.ip), e.state) for e in s.endpoints] == [
        ("10.200.1.5", "active"), ("10.200.1.6", "active"), ("10.200.1.8", "terminating"),
    ]
    assert s.endpoints[0].ports == (("http", 8080, "TCP"),)


def test_endpoints_errors():
    text = """
kind: Endpoints
metadata: {name: orphan}
subsets: [{addresses: [{ip: 10.0.0.1}], ports: [{port: 123456}]}]
"""
    got = problems(text)
    assert any("subsets[0].ports[0].port: must be 1-65535" in p for p in got)


def test_selector_parsing():
    assert parse_selector("app=web, k8s:tier=front") == {"app": "web", "tier": "front"}
    with pytest.raises(ServiceValidationError, match="not key=value"):
        parse_selector("app")
