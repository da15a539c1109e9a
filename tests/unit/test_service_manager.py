"""ServiceManager: selector -> backends, ids, states, scopes, all-or-nothing requests.
The maps are an in-memory stand-in with LbMaps' interface (no root needed)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from lb_fakes import FakeDatapath

from pilus.datapath import lb as lbmaps
from pilus.loadbalancer.manager import (
    BackendNotFound,
    ServiceConflict,
    ServiceManager,
    ServiceNotFound,
)
from pilus.loadbalancer.model import ServiceValidationError, parse_documents
from pilus.testing.check_datapath import check_datapath


def ep(ip, app, ns="default", local=True, named=None, state="active"):
    return {
        "ip": ip,
        "labels": [f"k8s:app={app}", f"k8s:io.kubernetes.pod.namespace={ns}"],
        "named_ports": named or {},
        "node_local": local,
        "state": state,
    }


WEB = """
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


@pytest.fixture
def mgr():
    return ServiceManager(FakeDatapath(), node_ips=[IPv4Address("172.30.0.11")],
                          known_networks=[IPv4Network("10.200.0.0/16")])


def test_selector_to_backends_follows_endpoints(mgr):
    mgr.apply_yaml(WEB)
    lb = mgr.datapath.lb
    assert lb.slots("10.96.0.10", 80) == []  # no endpoints yet: no backends
    mgr.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.1.6", "web"), ep("10.200.1.7", "db"),
                       ep("10.200.1.8", "web", ns="other")])
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080", "10.200.1.6:8080"]
    mgr.set_endpoints([ep("10.200.1.6", "web")])
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.6:8080"]
    assert {str(b.address) for b in lb.be.values()} == {"10.200.1.6"}  # unused backend removed
    rows = mgr.frontends()
    assert rows[0]["id"] == 1 and rows[0]["frontend"] == "10.96.0.10:80/TCP"
    assert rows[0]["type"] == "ClusterIP" and rows[0]["service"] == "default/web"
    assert rows[0]["backends"] == [{"id": rows[0]["backends"][0]["id"],
                                    "address": "10.200.1.6:8080/TCP", "state": "active"}]


def test_named_target_port(mgr):
    mgr.apply_yaml(WEB.replace("targetPort: 8080", "targetPort: http"))
    mgr.set_endpoints([ep("10.200.1.5", "web", named={"http": (9090, "TCP")}),
                       ep("10.200.1.6", "web"),  # no such port: not a backend
                       ep("10.200.1.7", "web", named={"http": (9091, "UDP")})])  # wrong proto
    assert mgr.datapath.lb.slots("10.96.0.10", 80) == ["10.200.1.5:9090"]


def test_backends_follow_every_change_of_an_endpoint(mgr):
    """Derived frontends are kept per service between reconciles: each change of an
    endpoint that a selector matches (labels, named port, state, node) must reach them."""
    mgr.apply_yaml(WEB.replace("targetPort: 8080", "targetPort: http") + "---\n"
                   + WEB.replace("name: web", "name: db").replace("10.96.0.10", "10.96.0.11")
                   .replace("app: web", "app: db"))
    lb = mgr.datapath.lb
    mgr.set_endpoints([ep("10.200.1.5", "web", named={"http": (9090, "TCP")})])
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:9090"] and lb.slots("10.96.0.11", 80) == []
    mgr.set_endpoints([ep("10.200.1.5", "web", named={"http": (9091, "TCP")})])  # port moved
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:9091"]
    mgr.set_endpoints([ep("10.200.1.5", "db")])  # relabelled: from web to db
    assert lb.slots("10.96.0.10", 80) == [] and lb.slots("10.96.0.11", 80) == ["10.200.1.5:8080"]
    mgr.set_endpoints([ep("10.200.1.5", "db", state="terminating")])
    assert lb.slots("10.96.0.11", 80) == []
    assert lb.entry("10.96.0.11", 80)["backends"][0].state == "terminating"
    mgr.set_endpoints([ep("10.200.1.5", "db")])
    mgr.set_backend_state("10.200.1.5", 8080, "maintenance")
    assert lb.slots("10.96.0.11", 80) == []
    mgr.set_backend_state("10.200.1.5", 8080, "active")
    assert lb.slots("10.96.0.11", 80) == ["10.200.1.5:8080"]
    mgr.delete("default", "db")
    mgr.apply_yaml(WEB.replace("name: web", "name: db").replace("10.96.0.10", "10.96.0.11")
                   .replace("app: web", "app: db"))
    assert lb.slots("10.96.0.11", 80) == ["10.200.1.5:8080"]


def test_ids_are_stable_and_reused(mgr):
    mgr.apply_yaml(WEB)
    mgr.apply_yaml(WEB.replace("name: web", "name: api").replace("10.96.0.10", "10.96.0.11"))
    ids = {r["frontend"]: r["id"] for r in mgr.frontends()}
    assert ids == {"10.96.0.10:80/TCP": 1, "10.96.0.11:80/TCP": 2}
    mgr.set_endpoints([ep("10.200.1.5", "web")])
    assert {r["frontend"]: r["id"] for r in mgr.frontends()} == ids
    mgr.delete("default", "web")
    assert [r["frontend"] for r in mgr.frontends()] == ["10.96.0.11:80/TCP"]
    with pytest.raises(ServiceNotFound):
        mgr.delete("default", "web")


def test_algorithm_default_and_annotation():
    m = ServiceManager(FakeDatapath(), default_algorithm="maglev")
    m.apply_yaml(WEB)
    m.apply_yaml(WEB.replace("{name: web}", "{name: r, annotations: "
                             "{service.cilium.io/lb-algorithm: random}}")
                 .replace("10.96.0.10", "10.96.0.12"))
    m.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.1.6", "web")])
    lb = m.datapath.lb
    assert lb.entry("10.96.0.10", 80)["algorithm"] == "maglev"
    assert set(lb.entry("10.96.0.10", 80)["table"]) == {b.id for b in lb.be.values()}
    assert lb.entry("10.96.0.12", 80)["algorithm"] == "random"
    with pytest.raises(ValueError):
        ServiceManager(FakeDatapath(), default_algorithm="rr")


def test_backend_states(mgr):
    mgr.apply_yaml(WEB)
    mgr.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.1.6", "web", state="terminating")])
    lb = mgr.datapath.lb
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080"]  # terminating: no new flows
    assert {b.state for b in lb.be.values()} == {"active", "terminating"}  # but still known
    assert mgr.set_backend_state("10.200.1.5", 8080, "maintenance") == 1
    assert lb.slots("10.96.0.10", 80) == []
    assert mgr.frontends()[0]["backends"][0]["state"] == "maintenance"
    mgr.set_backend_state("10.200.1.5", 8080, "active")
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080"]
    with pytest.raises(BackendNotFound):
        mgr.set_backend_state("10.200.1.99", 8080, "maintenance")
    with pytest.raises(ServiceValidationError, match="state: must be one of"):
        mgr.set_backend_state("10.200.1.5", 8080, "sleeping")


def test_nodeport_externalips_and_traffic_policies(mgr):
    mgr.apply_yaml("""
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  selector: {app: web}
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
""")
    mgr.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.2.5", "web", local=False)])
    lb = mgr.datapath.lb
    kinds = {(r["frontend"], r["scope"]): r["type"] for r in mgr.frontends()}
    assert kinds == {
        ("10.96.0.30:80/TCP", "external"): "ClusterIP",
        ("172.30.0.11:30080/TCP", "external"): "NodePort",
        ("172.30.0.11:30080/TCP", "internal"): "NodePort",
        ("192.0.2.10:80/TCP", "external"): "ExternalIPs",
        ("192.0.2.10:80/TCP", "internal"): "ExternalIPs",
    }
    # in-cluster clients use every backend, external ones only this node's
    assert lb.slots("10.96.0.30", 80) == ["10.200.1.5:8080", "10.200.2.5:8080"]
    assert lb.slots("172.30.0.11", 30080) == ["10.200.1.5:8080"]
    assert lb.slots("172.30.0.11", 30080, scope=1) == ["10.200.1.5:8080", "10.200.2.5:8080"]
    np = lb.entry("172.30.0.11", 30080)
    assert np["flags"] & lbmaps.SVC_FLAG_NODEPORT and np["flags"] & lbmaps.SVC_FLAG_EXT_LOCAL_SCOPE
    assert np["flags2"] & lbmaps.SVC_FLAG2_TWO_SCOPES
    # both scopes share the frontend's id (one reverse NAT)
    assert np["id"] == lb.entry("172.30.0.11", 30080, scope=1)["id"]


def test_internal_traffic_policy_local(mgr):
    mgr.apply_yaml(WEB.replace("ports:", "internalTrafficPolicy: Local\n  ports:"))
    mgr.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.2.5", "web", local=False)])
    assert mgr.datapath.lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080"]


def test_affinity(mgr):
    mgr.apply_yaml(WEB.replace("ports:", "sessionAffinity: ClientIP\n  ports:"))
    e = mgr.datapath.lb.entry("10.96.0.10", 80)
    assert e["affinity"] == 10800 and e["flags"] & lbmaps.SVC_FLAG_AFFINITY


def test_overlapping_frontends_rejected_nothing_applied(mgr):
    mgr.apply_yaml(WEB)
    writes = mgr.datapath.lb.writes
    clash = WEB.replace("name: web", "name: other")
    with pytest.raises(ServiceConflict, match="10.96.0.10:80/TCP is already used by service default/web"):
        mgr.apply_yaml(clash + "\n---\n" + WEB.replace("name: web", "name: fine")
                       .replace("10.96.0.10", "10.96.0.99"))
    assert mgr.datapath.lb.writes == writes
    assert [s.name for s in mgr.services()] == ["web"]
    # replacing the same service is not a conflict
    mgr.apply_yaml(WEB.replace("8080", "9090"))
    np = """
kind: Service
metadata: {name: np%d}
spec: {type: NodePort, clusterIP: 10.96.1.%d, ports: [{port: 80, nodePort: 30080}]}
"""
    mgr.apply_yaml(np % (1, 1))
    with pytest.raises(ServiceConflict, match=r"spec.ports\[0\].nodePort"):
        mgr.apply_yaml(np % (2, 2))


def test_backend_outside_known_networks(mgr):
    text = WEB.replace("  selector: {app: web}\n", "") + """
---
kind: Endpoints
metadata: {name: web}
subsets: [{addresses: [{ip: 10.200.1.5}, {ip: 8.8.8.8}], ports: [{port: 8080}]}]
"""
    with pytest.raises(ServiceValidationError, match=r"endpoints\[1\].ip: 8.8.8.8 is outside any "
                                                     r"known network \(10.200.0.0/16\)"):
        mgr.apply_yaml(text)
    assert mgr.services() == []
    mgr.apply_yaml(text.replace("8.8.8.8", "10.200.3.3"))
    assert mgr.datapath.lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080", "10.200.3.3:8080"]


def test_too_many_backends(monkeypatch, mgr):
    import pilus.loadbalancer.manager as manager

    monkeypatch.setattr(manager, "MAX_BACKENDS_PER_FRONTEND", 3)
    text = WEB.replace("  selector: {app: web}\n", "") + """
---
kind: Endpoints
metadata: {name: web}
subsets: [{addresses: [{ip: 10.200.1.1}, {ip: 10.200.1.2}, {ip: 10.200.1.3}, {ip: 10.200.1.4}],
           ports: [{port: 8080}]}]
"""
    with pytest.raises(ServiceValidationError, match="4 backends for 10.96.0.10:80/TCP: more than"):
        mgr.apply_yaml(text)
    assert mgr.services() == [] and mgr.datapath.lb.svc == {}


def test_persist_and_restore(tmp_path):
    dp = FakeDatapath()
    m = ServiceManager(dp, state_path=tmp_path / "services.json")
    m.apply_yaml(WEB)
    m.set_endpoints([ep("10.200.1.5", "web")])
    m.set_backend_state("10.200.1.5", 8080, "maintenance")
    ids = {r["frontend"]: r["id"] for r in m.frontends()}
    # a new agent on the same maps and state file
    m2 = ServiceManager(dp, state_path=tmp_path / "services.json")
    assert m2.restore() == 1
    m2.set_endpoints([ep("10.200.1.5", "web")])
    assert {r["frontend"]: r["id"] for r in m2.frontends()} == ids
    assert m2.frontends()[0]["backends"][0]["state"] == "maintenance"
    assert parse_documents  # (documents are re-validated on restore)


def test_restore_keeps_the_maps_until_endpoints_are_known(tmp_path):
    """An agent restart: the new manager must not take "no endpoints yet" as truth
    (that would leave the service without backends: SYNs answered with RST)."""
    dp = FakeDatapath()
    lb = dp.lb
    m = ServiceManager(dp, state_path=tmp_path / "services.json")
    m.apply_yaml(WEB + "---\n" + WEB.replace("name: web", "name: sticky")
                 .replace("10.96.0.10", "10.96.0.11")
                 .replace("ports:", "sessionAffinity: ClientIP\n  ports:"))
    m.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.1.6", "web")])
    m.set_backend_state("10.200.1.6", 8080, "maintenance")
    before = {fe: dict(v) for fe, v in lb.svc.items()}, dict(lb.be)
    writes = lb.writes

    m2 = ServiceManager(dp, state_path=tmp_path / "services.json")
    assert m2.restore() == 2
    assert lb.writes == writes  # nothing written while the endpoints are not restored
    m2.apply_yaml(WEB.replace("name: web", "name: late").replace("10.96.0.10", "10.96.0.12"))
    assert lb.writes == writes  # a request is kept for the first reconcile, too
    m2.set_endpoints([ep("10.200.1.5", "web"), ep("10.200.1.6", "web")])
    # only the difference was written: the new service (its frontend; the backends exist)
    assert lb.writes == writes + 1
    assert ({fe: v for fe, v in lb.svc.items() if str(fe.address) != "10.96.0.12"}, lb.be) == before
    assert lb.slots("10.96.0.12", 80) == ["10.200.1.5:8080"]
    m2.set_endpoints([ep("10.200.1.6", "web")])  # a pod that did not come back
    assert lb.slots("10.96.0.10", 80) == [] and lb.slots("10.96.0.11", 80) == []
    assert {str(b.address) for b in lb.be.values()} == {"10.200.1.6"}


def test_restore_rewrites_a_lost_maglev_table(tmp_path):
    dp = FakeDatapath()
    m = ServiceManager(dp, state_path=tmp_path / "services.json")
    m.apply_yaml(WEB.replace("metadata: {name: web}", "metadata:\n  name: web\n  annotations: "
                             "{service.cilium.io/lb-algorithm: maglev}"))
    m.set_endpoints([ep("10.200.1.5", "web")])
    entry = dp.lb.entry("10.96.0.10", 80)
    table, entry["table"] = entry["table"], None  # as if the Maglev map came back empty
    m2 = ServiceManager(dp, state_path=tmp_path / "services.json")
    m2.restore()
    m2.set_endpoints([ep("10.200.1.5", "web")])
    assert dp.lb.entry("10.96.0.10", 80)["table"] == table


def test_endpoints_for_services_from_agent_endpoints(mgr):
    from types import SimpleNamespace

    from pilus.loadbalancer.endpoints import endpoints_for_services

    eps = [
        SimpleNamespace(ipv4=IPv4Address("10.200.1.5"), state=SimpleNamespace(value="ready"),
                        labels=["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"],
                        named_ports={"http": "8080/TCP"}),
        SimpleNamespace(ipv4=IPv4Address("10.200.1.6"), state="disconnecting",
                        labels=["k8s:app=web"], named_ports={}),
        SimpleNamespace(ipv4=IPv4Address("10.200.1.7"), state="waiting-for-identity",
                        labels=[], named_ports={}),
    ]
    got = endpoints_for_services(eps)
    assert [(e["ip"], e["state"]) for e in got] == [("10.200.1.5", "active"),
                                                     ("10.200.1.6", "terminating")]
    mgr.apply_yaml(WEB.replace("targetPort: 8080", "targetPort: http"))
    mgr.set_endpoints(got)
    assert mgr.datapath.lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080"]


def test_the_write_counting_fake_passes_the_datapath_check():
    check_datapath(FakeDatapath())


def test_a_failed_map_write_is_pending_and_retried(mgr):
    from pilus.reconcile import ReconcileError

    lb = mgr.datapath.lb
    real = lb.upsert_service
    mgr.apply_yaml(WEB)
    lb.upsert_service = lambda *a, **kw: (_ for _ in ()).throw(OSError("no space"))
    with pytest.raises(ReconcileError, match="no space"):
        mgr.set_endpoints([ep("10.200.1.5", "web")])
    frontends = {s["name"]: s for s in mgr.reconcilers_status()}["lb-frontends"]
    assert frontends["pending"] == 1 and frontends["errors"] >= 1
    lb.upsert_service = real
    import time

    time.sleep(0.15)
    assert mgr.retry_due()
    mgr.retry()
    assert lb.slots("10.96.0.10", 80) == ["10.200.1.5:8080"]
    assert {s["name"]: s for s in mgr.reconcilers_status()}["lb-frontends"]["pending"] == 0
