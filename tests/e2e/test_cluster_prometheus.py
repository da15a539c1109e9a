"""`pilus cluster up --prometheus`: Debian's prometheus scrapes every agent and every
node's Hubble metrics; the Hubble drop counter it reports matches the datagrams a
policy dropped, and the agents' own metrics are scraped too."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request

from pilus.api.client import Client
from pilus.cluster import cluster_down

from .conftest import pilus_cli, probe, wait_for

POD, UNDERLAY, PORT, SENT = "10.220.0.0/16", "172.31.232.0/24", 5353, 5


def _query(address: str, expr: str) -> list[dict]:
    url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=3) as reply:
        return json.loads(reply.read())["data"]["result"]


def _scalar(address: str, expr: str) -> float:
    result = _query(address, expr)
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_scrapes_agents_and_a_hubble_counter_that_matches_the_traffic():
    name = f"pr{os.getpid() % 10000}"
    cluster_down(name)
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", POD,
                                   "--underlay-cidr", UNDERLAY, "--prometheus", "-o", "json"))
        prom = doc["prometheus"]["address"]
        node1, node2 = doc["nodes"]
        a = json.loads(pilus_cli("--cluster", name, "--node", node1["name"], "endpoint", "create", "default/a",
                                 "-l", "app=a", "-o", "json"))
        b = json.loads(pilus_cli("--cluster", name, "--node", node2["name"], "endpoint", "create", "default/b",
                                 "-l", "app=b", "-o", "json"))
        Client(node1["socket"]).import_policy("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b-tcp-only, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
        # every target up: two agents, two Hubble metrics endpoints
        assert wait_for(lambda: _scalar(prom, 'count(up{job=~"pilus-agent|hubble"} == 1)') == 4, timeout=30), \
            _query(prom, "up")
        expr = 'sum(hubble_drop_total{reason="POLICY_DENIED",protocol="UDP"})'
        before = _scalar(prom, expr)
        # the policy reached node2: a datagram is dropped there
        assert wait_for(lambda: not probe(a["netns"], "udp-send", b["ipv4"], str(PORT), "x", "0.5")["ok"])
        time.sleep(3)  # one more scrape
        before = _scalar(prom, expr)
        for _ in range(SENT):
            assert not probe(a["netns"], "udp-send", b["ipv4"], str(PORT), "x", "0.3")["ok"]
        assert wait_for(lambda: _scalar(prom, expr) - before == SENT, timeout=15), (before, _scalar(prom, expr))
        # the agents' own metrics are there too
        assert _query(prom, 'up{job="pilus-agent"}')
    finally:
        cluster_down(name)
    left = subprocess.run(["pgrep", "-f", f"storage.tsdb.path=/run/pilus/{name}/"], capture_output=True)
    assert left.returncode == 1, left.stdout  # no prometheus of the cluster is left
