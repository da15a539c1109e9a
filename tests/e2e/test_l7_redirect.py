"""The datapath's L7 redirect end to end (lib/proxy.h): real pods, the agent's proxy, curl.

Each scenario imports a CiliumNetworkPolicy with `rules.http`, waits until the policy map
carries the listener's port and the proxy has loaded the rule set, and then shows with curl
from a pod: an allowed request 200 (the server sees the client pod's address), a denied one
403 `Access denied`; as evidence the listener's counters, the l7 records on the monitor and
the connection's conntrack entry (ProxyRedirect with the port). A port without an L7 rule
is not redirected (no flag, the counters stay). Covered: ingress, egress, egress then
ingress (the egress proxy's upstream is hairpinned to the ingress proxy), egress to the
world (masqueraded; the reply finds the upstream socket through the prerouting mark), the
node itself as client (hairpin from to-container), and across two nodes in tunnel and
native routing (ingress L7 on the receiving node; egress L7 whose answers come back to the
proxy's upstream socket without a conntrack entry).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from pilus.api.client import Client

from .conftest import EXTERNAL_IP, Servers, pilus_cli, wait_for

ING, EGR = 15001, 15002



def curl(netns: str, url: str) -> tuple[int, str]:
    done = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10",
                           "-w", "\\n%{http_code}", url], capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


@pytest.fixture(scope="module")
def world(api, node, external):
    web = api.create_endpoint("default/l7rweb", ["app=l7rweb"])
    client = api.create_endpoint("default/l7rclient", ["app=l7rclient"])
    servers = Servers()
    try:
        for netns, port in ((web["netns"], 80), (web["netns"], 8080), (external, 80)):
            servers.hello(netns, port)
        yield {"web": web, "client": client, "node": node, "external": external}
    finally:
        servers.stop()
        with contextlib.suppress(Exception):
            api.request("DELETE", "/policy?all=true")
        for ep in (web, client):
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])


@pytest.fixture
def l7_events(api):
    events: list[dict] = []
    stream = api.stream_monitor(type="l7")
    threading.Thread(target=lambda: events.extend(stream), daemon=True).start()
    yield events
    with contextlib.suppress(Exception):
        stream.close()


def apply(api, text: str) -> None:
    api.request("DELETE", "/policy?all=true")
    api.bpf_ct_flush()  # each scenario's conntrack entries are its own
    api.request("PUT", "/policy", {"yaml": textwrap.dedent(text)})


def map_rows(api, ep_id: int) -> list[dict]:
    got = api.bpf_policy(ep_id)
    return got.get("entries", []) if isinstance(got, dict) else got


def listener(status: dict, direction: str) -> dict:
    (lst,) = [li for li in status["listeners"] if li["direction"] == direction]
    return lst


def ready(api, node, ep: dict, direction: str, port: int, proxy_port: int, paths: list[str]) -> bool:
    """The policy map redirects `port` to `proxy_port`, the proxy runs, and its config
    (written by the agent) has this scenario's rule set (its paths tell it from the last
    scenario's)."""
    rows = [r for r in map_rows(api, ep["id"])
            if r["direction"] == direction and r["dport"] == port and not r["deny"]]
    if not rows or any(r["proxy_port"] != proxy_port for r in rows):
        return False
    s = api.request("GET", "/proxy")
    if not (s["process"]["running"] and s["listeners"]):
        return False
    cfg = json.loads((Path(node["state_dir"]) / "proxy" / "config.json").read_text())
    return any(sorted(h.get("path") for h in rs.get("http") or []) == sorted(paths)
               and ep["ipv4"] in (rs.get("endpoint_ips") or []) and rs.get("port") == port
               for lst in cfg["listeners"] if lst["direction"] == direction for rs in lst["rules"])


def warm_up(netns: str, url: str) -> None:
    """The first allowed request, repeated until the proxy has reloaded the config it was
    written (the agent writes the file, then reloads the proxy)."""
    assert wait_for(lambda: curl(netns, url)[0] == 200, timeout=30), curl(netns, url)


def ct_rows(api, src: str, dst: str, dport: int) -> list[dict]:
    return [c for c in api.bpf_ct() if c["src"] == src and c["dst"] == dst and c["dport"] == dport]


def counters(api, direction: str) -> dict:
    return listener(api.request("GET", "/proxy"), direction)


def test_ingress_l7_allowed_denied_and_plain_port(api, world, l7_events):
    web, client = world["web"], world["client"]
    apply(api, """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7r-ingress, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7rweb}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: l7rclient}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/in/.*"}]
            - ports: [{port: "8080", protocol: TCP}]
        """)
    assert wait_for(lambda: ready(api, world["node"], web, "ingress", 80, ING, ["/in/.*"]), timeout=30)
    warm_up(client["netns"], f"http://{web['ipv4']}/in/warm")
    before = counters(api, "ingress")
    code, body = curl(client["netns"], f"http://{web['ipv4']}/in/a")
    assert code == 200 and body.strip() == f"hello /in/a from {client['ipv4']}"
    code, body = curl(client["netns"], f"http://{web['ipv4']}/private")
    assert (code, body.strip()) == (403, "Access denied")
    mid = counters(api, "ingress")
    assert (mid["forwarded"], mid["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)
    assert mid["connections"] == before["connections"] + 2
    # no L7 rule on 8080: straight to the pod, the proxy sees nothing
    code, body = curl(client["netns"], f"http://{web['ipv4']}:8080/private")
    assert code == 200 and body.strip() == f"hello /private from {client['ipv4']}"
    after = counters(api, "ingress")
    assert after["connections"] == mid["connections"]
    rows = ct_rows(api, client["ipv4"], web["ipv4"], 80)
    redirected = [c for c in rows if "ProxyRedirect" in c["flags"]]
    assert len(redirected) >= 3 and {c["proxy_port"] for c in redirected} == {ING}, rows
    # the proxy's own upstream connections to the server, from the client's address
    # (one fewer: the denied request never got one)
    upstream = [c for c in rows if "FromProxy" in c["flags"]]
    assert len(upstream) == len(redirected) - 1, rows
    assert not any("ProxyRedirect" in c["flags"] for c in upstream), rows
    plain = ct_rows(api, client["ipv4"], web["ipv4"], 8080)
    assert plain and all("ProxyRedirect" not in c["flags"] for c in plain)
    denied = wait_for(lambda: [e for e in l7_events if e.get("verdict") == "DENIED"], timeout=10)
    assert denied and "/private" in str(denied[0]), l7_events


def test_egress_l7(api, world, l7_events):
    web, client = world["web"], world["client"]
    apply(api, """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7r-egress, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7rclient}}
          egress:
          - toEndpoints: [{matchLabels: {app: l7rweb}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/out/.*"}]
        """)
    assert wait_for(lambda: ready(api, world["node"], client, "egress", 80, EGR, ["/out/.*"]), timeout=30)
    warm_up(client["netns"], f"http://{web['ipv4']}/out/warm")
    before = counters(api, "egress")
    code, body = curl(client["netns"], f"http://{web['ipv4']}/out/e")
    assert code == 200 and body.strip() == f"hello /out/e from {client['ipv4']}"
    code, body = curl(client["netns"], f"http://{web['ipv4']}/private")
    assert (code, body.strip()) == (403, "Access denied")
    after = counters(api, "egress")
    assert (after["forwarded"], after["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)
    rows = [c for c in ct_rows(api, client["ipv4"], web["ipv4"], 80) if "ProxyRedirect" in c["flags"]]
    assert rows and {c["proxy_port"] for c in rows} == {EGR}
    assert wait_for(lambda: [e for e in l7_events if e.get("verdict") == "DENIED"], timeout=10), l7_events


def test_egress_then_ingress_l7(api, world):
    """Both ends have HTTP rules: the egress proxy's upstream connection meets the
    server's ingress rule in to-container and is hairpinned to the ingress proxy."""
    web, client = world["web"], world["client"]
    apply(api, """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7r-out, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7rclient}}
          egress:
          - toEndpoints: [{matchLabels: {app: l7rweb}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/both/.*"}, {method: GET, path: "/eonly/.*"}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7r-in, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7rweb}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: l7rclient}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/both/.*"}]
        """)
    assert wait_for(lambda: ready(api, world["node"], client, "egress", 80, EGR, ["/both/.*", "/eonly/.*"])
                    and ready(api, world["node"], web, "ingress", 80, ING, ["/both/.*"]), timeout=30)
    warm_up(client["netns"], f"http://{web['ipv4']}/both/warm")
    eg0, in0 = counters(api, "egress"), counters(api, "ingress")
    code, body = curl(client["netns"], f"http://{web['ipv4']}/both/b")
    assert code == 200 and body.strip() == f"hello /both/b from {client['ipv4']}"
    # allowed by the client's egress rules, denied by the server's ingress rules
    code, body = curl(client["netns"], f"http://{web['ipv4']}/eonly/x")
    assert (code, body.strip()) == (403, "Access denied")
    eg1, in1 = counters(api, "egress"), counters(api, "ingress")
    assert eg1["forwarded"] == eg0["forwarded"] + 2  # the 403 came back through it
    assert (in1["forwarded"], in1["denied"]) == (in0["forwarded"] + 1, in0["denied"] + 1)


def test_egress_l7_to_the_world(api, world):
    """Masqueraded upstream: the reply is de-NATed in prerouting and marked for the
    proxy's socket by the node's `socket transparent` rule."""
    client, node = world["client"], world["node"]
    apply(api, f"""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: l7r-world, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: l7rclient}}}}
          egress:
          - toCIDR: ["{EXTERNAL_IP}/32"]
            toPorts:
            - ports: [{{port: "80", protocol: TCP}}]
              rules:
                http: [{{method: GET, path: "/world/.*"}}]
        """)
    assert wait_for(lambda: ready(api, node, client, "egress", 80, EGR, ["/world/.*"]), timeout=30)
    warm_up(client["netns"], f"http://{EXTERNAL_IP}/world/warm")
    before = counters(api, "egress")
    code, body = curl(client["netns"], f"http://{EXTERNAL_IP}/world/w")
    assert code == 200 and body.strip() == f"hello /world/w from {node['node_ip']}", body  # masqueraded
    code, body = curl(client["netns"], f"http://{EXTERNAL_IP}/private")
    assert (code, body.strip()) == (403, "Access denied")
    after = counters(api, "egress")
    assert (after["forwarded"], after["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)


def test_node_as_client_goes_through_the_ingress_proxy(api, world):
    web, node = world["web"], world["node"]
    apply(api, """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7r-host, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7rweb}}
          ingress:
          - fromEntities: [host]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/host/.*"}]
        """)
    assert wait_for(lambda: ready(api, node, web, "ingress", 80, ING, ["/host/.*"]), timeout=30)
    warm_up(node["netns"], f"http://{web['ipv4']}/host/warm")
    before = counters(api, "ingress")
    code, body = curl(node["netns"], f"http://{web['ipv4']}/host/n")
    assert code == 200 and body.startswith("hello /host/n from "), body
    code, body = curl(node["netns"], f"http://{web['ipv4']}/private")
    assert (code, body.strip()) == (403, "Access denied")
    after = counters(api, "ingress")
    assert (after["forwarded"], after["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)


# ------------------------------------------------------------------ across nodes


@contextlib.contextmanager
def _two_nodes(prefix: str, pod: str, underlay: str, mode: str):
    from pilus.cluster import cluster_down

    name = f"{prefix}{os.getpid() % 10000}"
    cluster_down(name)
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", pod,
                                   "--underlay-cidr", underlay, "--routing-mode", mode, "-o", "json"))
        yield name, doc
    finally:
        cluster_down(name)


@pytest.fixture(scope="module", params=["tunnel", "native"])
def two_nodes(request):
    """Pod a (app=l7a) on node1, pod b (app=l7b, HTTP on 80) on node2."""
    nets = {"tunnel": ("10.214.0.0/16", "172.31.238.0/24"), "native": ("10.215.0.0/16", "172.31.237.0/24")}
    pod, underlay = nets[request.param]
    with _two_nodes("l7m" + request.param[0], pod, underlay, request.param) as (name, doc):
        n1, n2 = doc["nodes"]
        a = json.loads(pilus_cli("--cluster", name, "--node", n1["name"], "endpoint", "create", "default/l7a",
                                 "-l", "app=l7a", "-o", "json"))
        b = json.loads(pilus_cli("--cluster", name, "--node", n2["name"], "endpoint", "create", "default/l7b",
                                 "-l", "app=l7b", "-o", "json"))
        servers = Servers()
        try:
            servers.hello(b["netns"], 80)
            api1, api2 = Client(n1["socket"]), Client(n2["socket"])
            # both nodes know both pods (the proxies resolve identities from the ipcache)
            assert wait_for(lambda: all({a["ipv4"], b["ipv4"]} <= {str(r.get("prefix", "")).split("/")[0]
                                                                     for r in api.bpf_ipcache()}
                                        for api in (api1, api2)), timeout=30)
            yield {"a": a, "b": b, "n1": n1, "n2": n2, "api1": api1, "api2": api2}
        finally:
            servers.stop()


def test_ingress_l7_from_another_node(two_nodes):
    """lib/deliver.h: the connection arrives from the tunnel / native device on node2."""
    t = two_nodes
    a, b = t["a"], t["b"]
    apply(t["api1"], """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7m-in, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7b}}
          ingress:
          - fromEndpoints: [{matchLabels: {app: l7a}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/far/.*"}]
        """)
    assert wait_for(lambda: ready(t["api2"], t["n2"], b, "ingress", 80, ING, ["/far/.*"]), timeout=30)
    warm_up(a["netns"], f"http://{b['ipv4']}/far/warm")
    before = counters(t["api2"], "ingress")
    code, body = curl(a["netns"], f"http://{b['ipv4']}/far/x")
    assert code == 200 and body.strip() == f"hello /far/x from {a['ipv4']}"
    code, body = curl(a["netns"], f"http://{b['ipv4']}/near")
    assert (code, body.strip()) == (403, "Access denied")
    after = counters(t["api2"], "ingress")
    assert (after["forwarded"], after["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)
    rows = [c for c in ct_rows(t["api2"], a["ipv4"], b["ipv4"], 80) if "ProxyRedirect" in c["flags"]]
    assert rows and {c["proxy_port"] for c in rows} == {ING}


def test_egress_l7_to_another_node(two_nodes):
    """The egress proxy's upstream leaves node1 through its stack; node2's answers are
    conntrack-new on node1 and find the upstream socket (lib/deliver.h)."""
    t = two_nodes
    a, b = t["a"], t["b"]
    apply(t["api1"], """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: l7m-out, namespace: default}
        spec:
          endpointSelector: {matchLabels: {app: l7a}}
          egress:
          - toEndpoints: [{matchLabels: {app: l7b}}]
            toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http: [{method: GET, path: "/away/.*"}]
        """)
    assert wait_for(lambda: ready(t["api1"], t["n1"], a, "egress", 80, EGR, ["/away/.*"]), timeout=30)
    warm_up(a["netns"], f"http://{b['ipv4']}/away/warm")
    before = counters(t["api1"], "egress")
    code, body = curl(a["netns"], f"http://{b['ipv4']}/away/x")
    assert code == 200 and body.strip() == f"hello /away/x from {a['ipv4']}"
    code, body = curl(a["netns"], f"http://{b['ipv4']}/home")
    assert (code, body.strip()) == (403, "Access denied")
    after = counters(t["api1"], "egress")
    assert (after["forwarded"], after["denied"]) == (before["forwarded"] + 1, before["denied"] + 1)
