"""Policy on service traffic through a real cluster: the datapath translates the
ClusterIP to a backend before egress policy, so a CNP egress `toServices` rule
(which allows the service's backends) lets a default-deny client reach a service,
and another service stays denied with drop reason 133 (egress) at the backend.
Services created after the policy, and deleted ones, are followed."""

from __future__ import annotations

import contextlib
import textwrap
import time

import pytest

from pilus.api.client import APIError

from .conftest import EventLog, probe, wait_for

PORT = 8080
WEB_VIP, DB_VIP, LATE_VIP = "10.96.30.10", "10.96.30.11", "10.96.30.12"




@pytest.fixture(scope="module")
def svc_api(api):
    return api


@pytest.fixture(scope="module")
def world(svc_api):
    from .conftest import Servers

    api = svc_api
    api.request("DELETE", "/policy?all=true")
    pods = {}
    for name, labels in (("default/sp-web1", ["app=sp-web"]), ("default/sp-web2", ["app=sp-web"]),
                         ("default/sp-db", ["app=sp-db"]), ("default/sp-late", ["app=sp-late"]),
                         ("default/sp-client", ["app=sp-client"])):
        pods[name.split("/")[1]] = api.create_endpoint(name, labels)
    servers = Servers()
    for name in ("sp-web1", "sp-web2", "sp-db", "sp-late"):
        servers.start(pods[name]["netns"], "tcp-server", PORT)
    made: list[tuple[str, str]] = []
    log = EventLog(api)
    time.sleep(0.3)
    yield pods, made, log
    servers.stop()
    api.request("DELETE", "/policy?all=true")
    for ns, name in made:
        with contextlib.suppress(APIError):
            api.delete_service(ns, name)
    for ep in pods.values():
        api.delete_endpoint(ep["id"])


def service(api, made, name: str, vip: str, app: str) -> None:
    api.put_service(yaml_text=f"""
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{team: sp}}}}
spec:
  clusterIP: {vip}
  selector: {{app: {app}}}
  ports: [{{port: 80, targetPort: {PORT}}}]
""")
    made.append(("default", name))


def connects(pods, dst: str, port: int = 80) -> bool:
    return probe(pods["sp-client"]["netns"], "tcp-connect", dst, str(port), "whoami", "1")["ok"]


def test_to_services_allows_the_backends_through_the_cluster_ip(svc_api, world):
    pods, made, log = world
    api = svc_api
    service(api, made, "sp-web", WEB_VIP, "sp-web")
    service(api, made, "sp-db", DB_VIP, "sp-db")
    assert connects(pods, DB_VIP)  # no policy yet
    api.request("PUT", "/policy", {"yaml": textwrap.dedent("""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: sp-client-to-web, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: sp-client}}
          egress:
          - toServices:
            - k8sService: {serviceName: sp-web, namespace: default}
            - k8sService: {serviceName: sp-late, namespace: default}
    """)})
    api.bpf_ct_flush()
    log.events.clear()
    client_ip = pods["sp-client"]["ipv4"]
    # through the ClusterIP: translated to a backend, whose identity the policy allows
    for _ in range(6):
        assert connects(pods, WEB_VIP)
    used = {c["dst"] for c in api.bpf_ct() if c["src"] == client_ip and c["dport"] == PORT}
    assert used and used <= {pods["sp-web1"]["ipv4"], pods["sp-web2"]["ipv4"]}, used
    # any port of the backends (toServices has no port restriction without toPorts)
    assert connects(pods, pods["sp-web1"]["ipv4"], PORT)
    # another service: denied at the backend's identity, drop 133 in the egress direction
    assert not connects(pods, DB_VIP)
    db_ip = pods["sp-db"]["ipv4"]
    drop = log.find(lambda e: e["type"] == "drop" and e.get("src_ip") == client_ip
                    and e.get("dst_ip") == db_ip and e.get("dport") == PORT and e.get("reason") == 133)
    assert drop, [e for e in log.events if e.get("src_ip") == client_ip]
    verdict = log.find(lambda e: e["type"] == "policy-verdict" and e.get("action") == "deny"
                       and e.get("src_ip") == client_ip and e.get("dst_ip") == db_ip)
    assert verdict and verdict["direction"] == "egress", verdict
    trace = api.request("POST", "/policy/trace", {"src_endpoint": "default/sp-client",
                                                  "dst_endpoint": "default/sp-web1", "dport": f"{PORT}/TCP"})
    assert trace["verdict"] == "ALLOWED", trace
    # a service the policy names, created after the policy
    assert not connects(pods, pods["sp-late"]["ipv4"], PORT)
    service(api, made, "sp-late", LATE_VIP, "sp-late")
    assert wait_for(lambda: connects(pods, LATE_VIP), timeout=10)
    # a deleted service no longer opens its backends
    api.delete_service("default", "sp-web")
    assert wait_for(lambda: not connects(pods, pods["sp-web1"]["ipv4"], PORT), timeout=10)
    assert connects(pods, LATE_VIP)
