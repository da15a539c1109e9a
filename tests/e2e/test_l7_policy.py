"""L7 (HTTP and gRPC) policy end to end through the datapath's redirect and the agent's
proxy (issue 10): a two-node cluster, real servers in pods (an HTTP echo server that
reports the client address and headers it saw, a gRPC DoorManager), real clients (curl,
a grpcio client) in other pods, on the same node and across the tunnel.

Each test shows the outcome (the answer, 403 `Access denied`, PERMISSION_DENIED, a
timeout) and the evidence: the L7 event of the request (`/v1/monitor?type=l7`), the
proxy's counters, or the datapath's drop reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pilus.api.client import Client

from .conftest import EventLog, probe, two_node_cluster, wait_for

SUPPORT = Path(__file__).resolve().parents[1] / "unit" / "test_proxy_support.py"
HTTP, PLAIN, GRPC = 80, 8080, 50051


@pytest.fixture(scope="module")
def l7():
    with two_node_cluster("l7p", "10.214.0.0/16", "172.31.229.0/24") as (name, doc):
        n1, n2 = doc["nodes"]
        api1, api2 = Client(n1["socket"]), Client(n2["socket"])
        pods = {
            # the servers on node2; one client beside them, one on node1 (through the tunnel)
            "deathstar": api2.request("POST", "/endpoint", {"name": "default/deathstar",
                                                            "labels": ["org=empire", "class=deathstar"]}),
            "local-tie": api2.request("POST", "/endpoint", {"name": "default/local-tie",
                                                            "labels": ["org=empire", "class=tiefighter"]}),
            "tiefighter": api1.request("POST", "/endpoint", {"name": "default/tiefighter",
                                                             "labels": ["org=empire", "class=tiefighter"]}),
            "xwing": api1.request("POST", "/endpoint", {"name": "default/xwing",
                                                        "labels": ["org=alliance", "class=xwing"]}),
        }
        procs = []
        try:
            for kind, port in (("http", HTTP), ("http", PLAIN), ("grpc", GRPC)):
                procs.append(_start(pods["deathstar"]["netns"], kind, port))
            yield {"name": name, "api1": api1, "api2": api2, "pods": pods,
                   "log1": EventLog(api1, "l7", 5.0), "log2": EventLog(api2, "l7", 5.0)}
        finally:
            for p in procs:
                p.kill()
                p.wait(5)


def _start(netns: str, kind: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(SUPPORT), kind, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise AssertionError(f"{kind} server did not start: {line} {proc.stderr.read()}")
    return proc


def ip(l7, pod: str) -> str:
    return str(l7["pods"][pod]["ipv4"]).split("/")[0]


def apply(l7, text: str) -> None:
    api = l7["api1"]
    api.request("DELETE", "/policy?all=true")
    api.request("PUT", "/policy", {"yaml": textwrap.dedent(text)})


def curl(l7, pod: str, *args: str, timeout: float = 5) -> tuple[int, str]:
    """curl in a pod: (exit code, stdout); -w appends the status code on its own line."""
    done = subprocess.run(["ip", "netns", "exec", l7["pods"][pod]["netns"], "curl", "-s", "--max-time",
                           str(timeout), "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                          timeout=timeout + 10)
    return done.returncode, done.stdout


def status_of(out: str) -> int:
    return int(out.rsplit("\n", 1)[-1] or 0)


def grpc(l7, pod: str, method: str) -> dict:
    done = subprocess.run(["ip", "netns", "exec", l7["pods"][pod]["netns"], sys.executable, str(SUPPORT),
                           "grpc-call", f"{ip(l7, 'deathstar')}:{GRPC}", method, "leia"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def proxy_totals(api: Client) -> dict[str, int]:
    out: dict[str, int] = {}
    for lst in api.request("GET", "/proxy").get("listeners") or ():
        for k in ("forwarded", "denied", "parse_errors"):
            out[k] = out.get(k, 0) + int(lst.get(k) or 0)
    return out


INGRESS_L7 = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: rule1, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{class: deathstar}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{org: empire}}}}]
    toPorts:
    - ports: [{{port: "{HTTP}", protocol: TCP}}]
      rules:
        http:
        - {{method: POST, path: "/v1/request-landing"}}
        - {{method: GET, path: "/public/.*"}}
        - {{method: GET, path: "/token", headers: ["X-Token: 42"]}}
    - ports: [{{port: "{PLAIN}", protocol: TCP}}]
    - ports: [{{port: "{GRPC}", protocol: TCP}}]
      rules:
        http:
        - {{method: POST, path: "/cilium.examples.DoorManager/GetName"}}
"""


def wait_l7_ready(l7, pod: str = "tiefighter") -> None:
    """The proxy follows the policy within a moment: until then a denied path still passes."""
    def denied() -> bool:
        _rc, out = curl(l7, pod, "-X", "PUT", f"http://{ip(l7, 'deathstar')}/v1/exhaust-port")
        return status_of(out) == 403
    assert wait_for(denied, 20, 0.5), "the L7 policy never took effect"


@pytest.mark.parametrize("client", ["tiefighter", "local-tie"])
def test_ingress_http_allow_deny_with_evidence(l7, client):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7, client)
    ds = ip(l7, "deathstar")
    rc, out = curl(l7, client, "-X", "POST", f"http://{ds}/v1/request-landing")
    assert rc == 0 and status_of(out) == 200
    seen = json.loads(out.rsplit("\n", 1)[0])
    assert seen["client"] == ip(l7, client)  # the server sees the pod, not the proxy
    rc, out = curl(l7, client, "-X", "PUT", f"http://{ds}/v1/exhaust-port")
    assert status_of(out) == 403 and out.startswith("Access denied")
    ev = l7["log2"].find(lambda e: "exhaust-port" in json.dumps(e))
    assert ev is not None, "no L7 event for the denied request"
    text = json.dumps(ev)
    assert "PUT" in text and "403" in text


def test_keep_alive_across_a_denied_request(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    ds = ip(l7, "deathstar")
    # one curl, three requests on one connection: allowed, denied, allowed
    done = subprocess.run(["ip", "netns", "exec", l7["pods"]["tiefighter"]["netns"], "curl", "-s", "--max-time", "5",
                           "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                           "-w", "%{http_code} %{num_connects}\n",
                           f"http://{ds}/public/a", f"http://{ds}/private", f"http://{ds}/public/b"],
                          capture_output=True, text=True, timeout=20)
    codes = [ln.split() for ln in done.stdout.splitlines()]
    assert [c[0] for c in codes] == ["200", "403", "200"], done.stdout
    assert sum(int(c[1]) for c in codes) == 1, f"the connection was not kept: {codes}"


def test_header_rule(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    ds = ip(l7, "deathstar")
    assert status_of(curl(l7, "tiefighter", f"http://{ds}/token")[1]) == 403
    assert status_of(curl(l7, "tiefighter", "-H", "X-Token: 41", f"http://{ds}/token")[1]) == 403
    assert status_of(curl(l7, "tiefighter", "-H", "X-Token: 42", f"http://{ds}/token")[1]) == 200


def test_grpc_methods(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    ok = grpc(l7, "tiefighter", "GetName")
    assert ok["code"] == "OK", ok
    assert grpc(l7, "tiefighter", "OpenDoor")["code"] == "PERMISSION_DENIED"
    ev = l7["log2"].find(lambda e: "OpenDoor" in json.dumps(e))
    assert ev is not None and "DoorManager" in json.dumps(ev)


def test_only_covered_ports_are_redirected(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    before = proxy_totals(l7["api2"])
    # port 8080 is allowed at L4 only: any method passes and the proxy sees nothing
    rc, out = curl(l7, "tiefighter", "-X", "PUT", f"http://{ip(l7, 'deathstar')}:{PLAIN}/v1/exhaust-port")
    assert rc == 0 and status_of(out) == 200
    time.sleep(0.5)
    after = proxy_totals(l7["api2"])
    assert after.get("forwarded") == before.get("forwarded") and after.get("denied") == before.get("denied")


def test_l3_l4_still_drops_before_the_proxy(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    before = proxy_totals(l7["api2"])
    rc, _out = curl(l7, "xwing", "-X", "POST", f"http://{ip(l7, 'deathstar')}/v1/request-landing", timeout=2)
    assert rc == 28  # dropped: no answer at all, not a 403
    assert proxy_totals(l7["api2"]) == before
    drops = l7["api2"].request("GET", "/metrics")
    assert any(s["name"] == "pilus_drop_count_total" and "Policy denied" in json.dumps(s["labels"])
               for s in drops)


EGRESS_L7 = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: egress1, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{class: tiefighter}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{class: deathstar}}}}]
    toPorts:
    - ports: [{{port: "{HTTP}", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: "/public/.*"}}]
"""


@pytest.mark.parametrize(("client", "log"), [("tiefighter", "log1"), ("local-tie", "log2")])
def test_egress_http(l7, client, log):
    apply(l7, EGRESS_L7)
    ds = ip(l7, "deathstar")

    def denied() -> bool:
        return status_of(curl(l7, client, f"http://{ds}/private")[1]) == 403
    assert wait_for(denied, 20, 0.5)
    rc, out = curl(l7, client, f"http://{ds}/public/x")
    assert rc == 0 and status_of(out) == 200
    assert json.loads(out.rsplit("\n", 1)[0])["client"] == ip(l7, client)
    ev = l7[log].find(lambda e: "/private" in json.dumps(e) and "egress" in json.dumps(e).lower())
    assert ev is not None, "the egress proxy on the client's node recorded no event"


def test_policy_removed_means_no_redirect(l7):
    apply(l7, INGRESS_L7)
    wait_l7_ready(l7)
    l7["api1"].request("DELETE", "/policy?all=true")
    ds = ip(l7, "deathstar")
    assert wait_for(lambda: status_of(curl(l7, "tiefighter", "-X", "PUT", f"http://{ds}/v1/exhaust-port")[1])
                    == 200, 20, 0.5)
    assert probe(l7["pods"]["xwing"]["netns"], "tcp-connect", ds, str(HTTP), "GET / HTTP/1.0\r\n\r\n", "2")["ok"]
