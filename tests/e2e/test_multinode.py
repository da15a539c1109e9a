"""A flat L3 network across nodes, end to end: pods on three nodes of a tunnel-mode
cluster (VXLAN, the source identity in the VNI) and on two nodes of a native-routing
cluster reach each other over TCP, UDP and ICMP with their own addresses; the VNI
on the underlay is the sender's identity; a policy on a pod of node2 admits one
remote pod and denies another, and node2 reports the drop; a forged VNI is dropped
with its reason. Services are cluster-wide: one created through node1 exists on every
node; NodePort on any node reaches a backend on another node with SNAT to that
node's IP (tunnel and native), and externalTrafficPolicy: Local answers only where a
backend lives."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request

import pytest
from scapy.all import IP, TCP, UDP, VXLAN, AsyncSniffer, Ether, bind_layers, sendp
from scapy.layers.inet import ICMP

from pilus.api.client import Client
from pilus.cluster import cluster_down

from .conftest import EventLog, Servers, pilus_cli, probe, wait_for

TCP_PORT, UDP_PORT = 8080, 5353
DROP_POLICY, DROP_NO_SERVICE, DROP_INVALID_IDENTITY, DROP_INVALID_VNI = 133, 158, 171, 183
VXLAN_PORT = 8472
bind_layers(UDP, VXLAN, dport=VXLAN_PORT)  # scapy knows VXLAN on 4789 only


def _vxlan(packet) -> bool:
    return UDP in packet and packet[UDP].dport == VXLAN_PORT


@contextlib.contextmanager
def _cluster(prefix: str, nodes: int, pod: str, underlay: str, mode: str):
    name = f"{prefix}{os.getpid() % 10000}"
    cluster_down(name)
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", str(nodes), "--pod-cidr", pod,
                                   "--underlay-cidr", underlay, "--routing-mode", mode, "-o", "json"))
        yield name, doc
    finally:
        cluster_down(name)


def _pods(name: str, doc: dict, labels: dict[str, str]) -> dict[str, dict]:
    """One pod per node: pod i (label app=<labels[i]>) on node i."""
    pods = {}
    for node, (pod, app) in zip(doc["nodes"], labels.items(), strict=False):
        pods[pod] = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "endpoint", "create",
                                         f"default/{pod}", "-l", f"app={app}", "-o", "json"))
        pods[pod]["node"] = node
    return pods


def _wait_ipcache(name: str, node: dict, ips: list[str]) -> None:
    def known() -> bool:
        rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "bpf", "ipcache", "list", "-o", "json"))
        return all(f"{ip}/32" in {r["prefix"] for r in rows} for ip in ips)

    assert wait_for(known, timeout=15), f"{ips} not in {node['name']}'s ipcache"


@pytest.fixture(scope="module")
def tunnel():
    with _cluster("mt", 3, "10.212.0.0/16", "172.31.240.0/24", "tunnel") as (name, doc):
        pods = _pods(name, doc, {"a": "a", "b": "b", "c": "c"})
        for node in doc["nodes"]:
            _wait_ipcache(name, node, [p["ipv4"] for p in pods.values()])
        servers = Servers()
        try:
            for pod in ("b", "c"):
                servers.start(pods[pod]["netns"], "tcp-server", TCP_PORT)
                servers.start(pods[pod]["netns"], "udp-server", UDP_PORT)
            servers.start(doc["nodes"][1]["netns"], "tcp-server", TCP_PORT)
            yield name, doc, pods
        finally:
            servers.stop()


def test_pods_on_three_nodes_reach_each_other_with_their_own_addresses(tunnel):
    name, doc, pods = tunnel
    a, b, c = pods["a"], pods["b"], pods["c"]
    for dst in (b, c):
        tcp = probe(a["netns"], "tcp-connect", dst["ipv4"], str(TCP_PORT))
        assert tcp["ok"] and tcp["reply"].split(":")[0] == a["ipv4"], tcp  # the server sees the pod
        assert probe(a["netns"], "udp-send", dst["ipv4"], str(UDP_PORT))["ok"]
        assert probe(a["netns"], "ping", dst["ipv4"])["ok"]
    assert probe(c["netns"], "tcp-connect", b["ipv4"], str(TCP_PORT))["ok"]  # node3 -> node2


def test_pod_to_remote_node_and_node_to_remote_pod(tunnel):
    name, doc, pods = tunnel
    a, node1, node2 = pods["a"], doc["nodes"][0], doc["nodes"][1]
    to_node = probe(a["netns"], "tcp-connect", node2["node_ip"], str(TCP_PORT))
    assert to_node["ok"] and to_node["reply"].split(":")[0] == a["ipv4"], to_node  # not masqueraded
    from_node = probe(node1["netns"], "tcp-connect", pods["b"]["ipv4"], str(TCP_PORT))
    assert from_node["ok"] and from_node["reply"].split(":")[0] == node1["router_ip"], from_node


def test_the_vni_on_the_underlay_is_the_source_identity(tunnel):
    name, doc, pods = tunnel
    a, b = pods["a"], pods["b"]
    sniffer = AsyncSniffer(iface=doc["bridge"], lfilter=_vxlan)  # no libpcap: filtered in Python
    sniffer.start()
    time.sleep(0.5)
    try:
        assert probe(a["netns"], "ping", b["ipv4"])["ok"]
        time.sleep(0.3)
    finally:
        packets = sniffer.stop()
    inner = [(p[VXLAN].vni, p[VXLAN][IP].src, p[VXLAN][IP].dst) for p in packets
             if VXLAN in p and IP in p[VXLAN] and ICMP in p[VXLAN]]
    assert (a["identity"], a["ipv4"], b["ipv4"]) in inner, inner
    assert (b["identity"], b["ipv4"], a["ipv4"]) in inner, inner  # the reply carries b's identity


def _hubble_drops(node_ip: str) -> float:
    """hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} scraped from a node."""
    with urllib.request.urlopen(f"http://{node_ip}:9965/metrics", timeout=3) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("hubble_drop_total{") and 'reason="POLICY_DENIED"' in line and 'protocol="TCP"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_policy_across_nodes_admits_one_remote_pod_and_node2_reports_the_other(tunnel):
    name, doc, pods = tunnel
    a, b, c = pods["a"], pods["b"], pods["c"]
    node2 = Client(b["node"]["socket"])
    log = EventLog(node2)
    policy = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: b-from-a, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: b}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: a}}}}]
    toPorts: [{{ports: [{{port: "{TCP_PORT}", protocol: TCP}}]}}]
"""
    Client(a["node"]["socket"]).import_policy(policy)  # through node1: the kvstore carries it to node2
    try:
        denied = wait_for(lambda: not probe(c["netns"], "tcp-connect", b["ipv4"], str(TCP_PORT), "whoami",
                                            "1")["ok"], timeout=15)
        assert denied, "node3's pod still reaches b"
        assert probe(a["netns"], "tcp-connect", b["ipv4"], str(TCP_PORT))["ok"]
        drop = log.find(lambda e: e.get("type") == "drop" and e.get("src_ip") == c["ipv4"]
                        and e.get("dst_ip") == b["ipv4"] and e.get("reason") == DROP_POLICY)
        assert drop, f"node2 reported no policy drop of {c['ipv4']}: {log.events[-5:]}"
        assert drop.get("src_identity", c["identity"]) == c["identity"]  # the identity from the VNI

        def trace(src: str) -> str:  # asked on node2 about pods of node1 and node3
            return node2.request("POST", "/policy/trace", {"src_endpoint": src, "dst_endpoint": "default/b",
                                                           "dport": f"{TCP_PORT}/TCP"})["verdict"]

        assert (trace("default/a"), trace("default/c")) == ("ALLOWED", "DENIED")
        # Hubble metrics of node2 (cluster up turns them on, <node IP>:9965) count the drop
        assert wait_for(lambda: _hubble_drops(b["node"]["node_ip"]) >= 1, timeout=10), \
            _hubble_drops(b["node"]["node_ip"])
    finally:
        Client(a["node"]["socket"]).request("DELETE", "/policy?all=true")
    assert wait_for(lambda: probe(c["netns"], "tcp-connect", b["ipv4"], str(TCP_PORT), "whoami", "1")["ok"],
                    timeout=15)


@pytest.mark.parametrize("vni,reason", [(1, DROP_INVALID_IDENTITY), (0, DROP_INVALID_VNI)])
def test_a_forged_vni_is_dropped_with_its_reason(tunnel, vni, reason):
    name, doc, pods = tunnel
    b = pods["b"]
    log = EventLog(Client(b["node"]["socket"]))
    time.sleep(0.3)
    link = json.loads(subprocess.run(["ip", "-n", b["node"]["netns"], "-j", "link", "show", "eth0"],
                                     capture_output=True, text=True, check=True).stdout)
    frame = (Ether(dst=link[0]["address"]) / IP(src=doc["bridge_ip"], dst=b["node"]["node_ip"])
             / UDP(sport=40000, dport=VXLAN_PORT) / VXLAN(vni=vni, flags=0x08)
             / Ether() / IP(src="10.212.1.200", dst=b["ipv4"]) / UDP(sport=1, dport=UDP_PORT) / b"forged")
    sendp(frame, iface=doc["bridge"], verbose=False, count=3)
    drop = log.find(lambda e: e.get("type") == "drop" and e.get("reason") == reason, timeout=5)
    assert drop, f"no drop {reason} for VNI {vni}: {log.events[-5:]}"


NODE_PORT = 30480
SNAT_PORT_MIN = 61000


def _nodeport_service(name: str, node: dict, svc: str, vip: str, policy: str = "Cluster") -> None:
    """A NodePort service of app=b created through ``node`` (the others learn it)."""
    pilus_cli("--cluster", name, "--node", node["name"], "service", "create", "--name", svc,
              "--type", "NodePort", "--frontend", f"{vip}:80/TCP", "--node-port", str(NODE_PORT),
              "--selector", "app=b", "--target-port", str(TCP_PORT), "--external-traffic-policy", policy)


def _frontends(name: str, node: dict) -> set[str]:
    rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "service", "list", "-o", "json"))
    return {r["frontend"] for r in rows if r.get("backends")}


def _nodeport_reaches_the_remote_backend(name: str, doc: dict, b: dict) -> None:
    """From this machine (outside every node) to NodePort on each node without b: the
    backend sees the entry node's IP and a SNAT port, the client the node's address."""
    nodes = [n for n in doc["nodes"] if not b["netns"].startswith(n["netns"])]
    for node in nodes:
        assert wait_for(lambda node=node: f"{node['node_ip']}:{NODE_PORT}/TCP" in _frontends(name, node),
                        timeout=15), _frontends(name, node)
        for _ in range(3):
            reply = probe(None, "tcp-connect", node["node_ip"], str(NODE_PORT))
            assert reply["ok"], (node["name"], reply)
            ip, port = reply["reply"].split(":")
            assert ip == node["node_ip"] and int(port) >= SNAT_PORT_MIN, (node["name"], reply)


def test_services_are_cluster_wide_and_nodeport_reaches_a_backend_on_another_node(tunnel):
    name, doc, pods = tunnel
    node1, node2 = doc["nodes"][0], doc["nodes"][1]
    _nodeport_service(name, node1, "default/np", "10.96.12.20")
    try:
        # created through node1, served by node2 and node3 too, each on its own address
        for node in doc["nodes"]:
            assert wait_for(lambda node=node: {"10.96.12.20:80/TCP", f"{node['node_ip']}:{NODE_PORT}/TCP"}
                            <= _frontends(name, node), timeout=15), (node["name"], _frontends(name, node))
        _nodeport_reaches_the_remote_backend(name, doc, pods["b"])
        # node2 holds b: NodePort there is delivered locally, the client keeps its address
        reply = probe(None, "tcp-connect", node2["node_ip"], str(NODE_PORT))
        assert reply["ok"] and reply["reply"].split(":")[0] == doc["bridge_ip"], reply
        # the SNATed connections are in node1's LB conntrack: reply tuple to the node IP
        rows = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "bpf", "lb", "list", "-o", "json"))
        assert rows, "no LB state on node1"
    finally:
        pilus_cli("--cluster", name, "--node", node2["name"], "service", "delete", "default/np")
    for node in doc["nodes"]:  # deleted through node2: gone everywhere
        assert wait_for(lambda node=node: "10.96.12.20:80/TCP" not in _frontends(name, node), timeout=15)


def test_named_ports_of_a_remote_pod_resolve_for_egress_rules_and_service_target_ports(tunnel):
    name, doc, pods = tunnel
    a, node1, node3 = pods["a"], doc["nodes"][0], doc["nodes"][2]
    srv = json.loads(pilus_cli("--cluster", name, "--node", node3["name"], "endpoint", "create", "default/np-srv",
                               "-l", "app=np-srv", "-p", "web=8080/TCP", "-o", "json"))
    servers = Servers()
    api1 = Client(node1["socket"])
    try:
        servers.start(srv["netns"], "tcp-server", TCP_PORT)
        servers.start(srv["netns"], "tcp-server", 9090)
        _wait_ipcache(name, node1, [srv["ipv4"]])
        # a Service whose targetPort names node3's pod's port: node1 learns the number from the kvstore
        pilus_cli("--cluster", name, "--node", node1["name"], "service", "create", "--name", "default/np-web",
                  "--frontend", "10.96.12.30:80/TCP", "--selector", "app=np-srv", "--target-port", "web")
        assert wait_for(lambda: any(be["address"] == f"{srv['ipv4']}:{TCP_PORT}/TCP"
                                    for r in json.loads(pilus_cli("--cluster", name, "--node", node1["name"],
                                                                  "service", "list", "-o", "json"))
                                    for be in r.get("backends") or []), timeout=15)
        reply = probe(a["netns"], "tcp-connect", "10.96.12.30", "80")
        assert reply["ok"], reply
        # an egress rule on node1's pod that names the port: 8080 allowed, 9090 not
        api1.import_policy("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a-to-web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: a}}
  egress:
  - toEndpoints: [{matchLabels: {app: np-srv}}]
    toPorts: [{ports: [{port: "web", protocol: TCP}]}]
""")
        assert wait_for(lambda: not probe(a["netns"], "tcp-connect", srv["ipv4"], "9090", "whoami", "1")["ok"],
                        timeout=15), "egress to 9090 still allowed"
        assert probe(a["netns"], "tcp-connect", srv["ipv4"], str(TCP_PORT))["ok"]
        trace = api1.request("POST", "/policy/trace", {"src_endpoint": "default/a", "dst_endpoint": "default/np-srv",
                                                      "dport": f"{TCP_PORT}/TCP"})
        assert trace["verdict"] == "ALLOWED", trace
    finally:
        servers.stop()
        api1.request("DELETE", "/policy?all=true")
        with contextlib.suppress(AssertionError):
            pilus_cli("--cluster", name, "--node", node1["name"], "service", "delete", "default/np-web")
        pilus_cli("--cluster", name, "--node", node3["name"], "endpoint", "delete", "default/np-srv")


def test_external_traffic_policy_local_answers_only_on_the_backends_node(tunnel):
    name, doc, pods = tunnel
    node1, node2 = doc["nodes"][0], doc["nodes"][1]
    _nodeport_service(name, node2, "default/np-local", "10.96.12.21", policy="Local")
    try:
        assert wait_for(lambda: "10.96.12.21:80/TCP" in _frontends(name, node1), timeout=15)
        reply = probe(None, "tcp-connect", node2["node_ip"], str(NODE_PORT))
        assert reply["ok"] and reply["reply"].split(":")[0] == doc["bridge_ip"], reply
        log = EventLog(Client(node1["socket"]))
        refused = probe(None, "tcp-connect", node1["node_ip"], str(NODE_PORT))
        assert not refused["ok"], refused  # node1 has no local backend: refused, and said why
        assert log.find(lambda e: e.get("type") == "drop" and e.get("reason") == DROP_NO_SERVICE
                        and e.get("dst_ip") == node1["node_ip"]), log.events
    finally:
        pilus_cli("--cluster", name, "--node", node1["name"], "service", "delete", "default/np-local")


def test_native_routing_reaches_the_other_node_without_encapsulation():
    with _cluster("mn", 2, "10.213.0.0/16", "172.31.239.0/24", "native") as (name, doc):
        pods = _pods(name, doc, {"a": "a", "b": "b"})
        a, b = pods["a"], pods["b"]
        _wait_ipcache(name, doc["nodes"][1], [a["ipv4"]])
        node1 = doc["nodes"][0]
        routes = pilus_cli("--cluster", name, "--node", node1["name"], "bpf", "tunnel", "list")
        assert "no tunnel" in routes.lower() or b["ipv4"] not in routes
        servers = Servers()
        sniffer = AsyncSniffer(iface=doc["bridge"], lfilter=lambda p: _vxlan(p) or TCP in p)
        try:
            servers.start(b["netns"], "tcp-server", TCP_PORT)
            sniffer.start()
            time.sleep(0.5)
            tcp = probe(a["netns"], "tcp-connect", b["ipv4"], str(TCP_PORT))
            assert tcp["ok"] and tcp["reply"].split(":")[0] == a["ipv4"], tcp
            assert probe(a["netns"], "ping", b["ipv4"])["ok"]
            time.sleep(0.3)
        finally:
            packets = sniffer.stop()
            servers.stop()
        assert not [p for p in packets if VXLAN in p], "native routing encapsulated"
        assert [p for p in packets if IP in p and p[IP].src == a["ipv4"] and p[IP].dst == b["ipv4"]]
        # NodePort on node1 to b on node2: SNAT, routed without the tunnel
        servers = Servers()
        try:
            servers.start(b["netns"], "tcp-server", TCP_PORT)
            _nodeport_service(name, node1, "default/np", "10.96.13.20")
            _nodeport_reaches_the_remote_backend(name, doc, b)
        finally:
            servers.stop()



def test_a_selector_service_on_node1_balances_to_backends_on_two_other_nodes(tunnel):
    name, doc, pods = tunnel
    a, node1 = pods["a"], doc["nodes"][0]
    webs = {}
    servers = Servers()
    try:
        for node in doc["nodes"][1:]:
            web = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "endpoint", "create",
                                       f"default/web-{node['name']}", "-l", "app=web", "-o", "json"))
            webs[web["ipv4"]] = web
            servers.start(web["netns"], "tcp-server", TCP_PORT)
        pilus_cli("--cluster", name, "--node", node1["name"], "service", "create", "--name", "default/web",
                  "--frontend", "10.96.12.10:80/TCP", "--selector", "app=web", "--target-port", str(TCP_PORT))

        def backends() -> set[str]:
            rows = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "service", "list", "-o", "json"))
            return {be["address"].split(":")[0] for svc in rows for be in svc.get("backends") or []}

        assert wait_for(lambda: backends() == set(webs), timeout=15), backends()
        for _ in range(30):
            reply = probe(a["netns"], "tcp-connect", "10.96.12.10", "80")
            assert reply["ok"] and reply["reply"].split(":")[0] == a["ipv4"], reply  # the backend sees the pod

        def served(web: dict) -> int:  # connections from a in the backend node's conntrack
            node = next(n for n in doc["nodes"] if web["netns"].startswith(n["netns"]))
            rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "bpf", "ct", "list", "-o", "json"))
            return sum(1 for r in rows if r["src"] == a["ipv4"] and r["dst"] == web["ipv4"]
                       and r["dport"] == TCP_PORT and r["direction"] == "ingress")

        assert all(served(web) > 0 for web in webs.values()), {ip: served(w) for ip, w in webs.items()}
    finally:
        servers.stop()
        with contextlib.suppress(AssertionError):
            pilus_cli("--cluster", name, "--node", node1["name"], "service", "delete", "default/web")
        for web in webs.values():  # the other tests do not expect them
            node = next(n for n in doc["nodes"] if web["netns"].startswith(n["netns"]))
            pilus_cli("--cluster", name, "--node", node["name"], "endpoint", "delete", web["name"])
