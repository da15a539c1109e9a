"""`pilus ui`, the service map, end to end (issue 12, requirement 6): a two-node cluster
with xwing (org=alliance) and tiefighter (org=empire) on node1 and the deathstar on node2,
a policy letting only org=empire reach the deathstar on port 80, traffic from both ships.
`pilus ui` reads the flows through the cluster's Hubble Relay; its data has the edges
(tiefighter -> deathstar forwarded, xwing -> deathstar dropped with POLICY_DENIED), a
new connection reaches it and the page's WebSocket live, and headless Chromium (Debian's
`chromium`) renders the page: the dumped DOM has both edges, the dropped one marked and
its reason in its title, the flow table below, and the screenshot is a PNG."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest

from pilus.api.client import Client

from .conftest import Servers, pilus_cli, probe, two_node_cluster, wait_for

HTTP = 80
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ui-e2e, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
#: pod -> (node index, labels)
PODS = {
    "xwing": (0, "org=alliance,class=xwing"),
    "tiefighter": (0, "org=empire,class=tiefighter"),
    "deathstar": (1, "org=empire,class=deathstar"),
}
TIE, XWING = "default/tiefighter->default/deathstar:80/TCP", "default/xwing->default/deathstar:80/TCP"
WINDOW = (1280, 800)


def connect(pods: dict, src: str) -> bool:
    return probe(pods[src]["netns"], "tcp-connect", pods["deathstar"]["ipv4"], str(HTTP), "whoami", "1")["ok"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def edges_of(view: dict) -> dict[str, dict]:
    return {e["id"]: e for e in view["edges"]}


class Elements(HTMLParser):
    """The service map's edges (SVG ``g.edge``) and flow table rows of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.edges: list[dict[str, str]] = []
        self.rows: list[list[str]] = []
        self.options: list[str] = []
        self._cell: list[str] | None = None
        self._in_td = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "g" and "edge" in classes:
            self.edges.append(a)
        elif tag == "tr" and "flow" in classes:
            self._cell = []
            self.rows.append(self._cell)
        elif tag == "td" and self._cell is not None:
            self._cell.append("")
            self._in_td = True
        elif tag == "option":
            self.options.append(a.get("value", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_td = False
        elif tag == "tr":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_td and self._cell:
            self._cell[-1] += data


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args],
                          capture_output=True, timeout=120)


async def live_flow(url: str, pods: dict) -> tuple[dict, dict]:
    """The page's WebSocket: its snapshot, then the flow a new tiefighter connection makes."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        first = await ws.receive_json(timeout=10)
        assert first["type"] == "snapshot", first
        assert await asyncio.to_thread(connect, pods, "tiefighter")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
            if msg["type"] == "flow" and msg["data"]["edge"]["id"] == TIE:
                return first["data"], msg["data"]
        raise AssertionError("no live flow of tiefighter -> deathstar on the page's WebSocket")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    with two_node_cluster("ui", "10.219.0.0/16", "172.31.233.0/24") as (name, doc):
        nodes = doc["nodes"]
        pods = {}
        for pod, (i, labels) in PODS.items():
            pods[pod] = json.loads(pilus_cli("--cluster", name, "--node", nodes[i]["name"], "endpoint", "create",
                                             f"default/{pod}", "-l", labels, "-o", "json"))
        for node in nodes:  # every node knows every pod (names of remote ends in flows)
            def known(node=node) -> bool:
                rows = json.loads(pilus_cli("--cluster", name, "--node", node["name"], "bpf", "ipcache", "list",
                                            "-o", "json"))
                return all(f"{p['ipv4']}/32" in {r["prefix"] for r in rows} for p in pods.values())
            assert wait_for(known, timeout=20), f"not every pod is in {node['name']}'s ipcache"
        servers = Servers()
        proc = None
        log = (tmp_path_factory.mktemp("ui") / "ui.log").open("w")
        try:
            servers.start(pods["deathstar"]["netns"], "tcp-server", HTTP)
            Client(nodes[0]["socket"]).import_policy(POLICY)
            assert wait_for(lambda: not connect(pods, "xwing"), timeout=15), "the policy does not stop xwing"
            assert connect(pods, "tiefighter")
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "pilus", "--cluster", name, "ui",
                                     "--listen", f"127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            base = f"http://127.0.0.1:{port}"

            def both() -> dict | None:
                with contextlib.suppress(OSError, ValueError):
                    view = get_json(f"{base}/api/graph")
                    return view if {TIE, XWING} <= edges_of(view).keys() else None
                return None
            view = wait_for(both, timeout=30)
            assert view, f"pilus ui has not both edges: {Path(log.name).read_text()}"
            yield base, pods, doc
        finally:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()
            servers.stop()


def test_the_graph_has_the_forwarded_and_the_dropped_edge(ui):
    base, pods, doc = ui
    view = get_json(f"{base}/api/graph")
    assert view["status"]["connected"] and doc["relay_address"] in view["status"]["target"]
    assert "default" in view["namespaces"]
    nodes = {n["id"]: n for n in view["nodes"]}
    assert {"default/xwing", "default/tiefighter", "default/deathstar"} <= nodes.keys()
    assert "k8s:class=deathstar" in nodes["default/deathstar"]["labels"]
    edges = edges_of(view)
    tie, xwing = edges[TIE], edges[XWING]
    assert tie["state"] == "forwarded" and tie["forwarded"] > 0 and tie["dropped"] == 0
    assert xwing["state"] == "dropped" and xwing["dropped"] > 0 and xwing["forwarded"] == 0
    assert xwing["last_reason"] == "POLICY_DENIED" and set(xwing["reasons"]) == {"POLICY_DENIED"}
    rows = [r for r in view["rows"] if r["edge"] == XWING]
    assert rows and all(r["verdict"] == "DROPPED" and r["reason"] == "POLICY_DENIED" for r in rows)
    assert {r["node_name"].rpartition("/")[2] for r in rows} == {doc["nodes"][1]["name"]}  # node2 dropped them
    other = get_json(f"{base}/api/graph?namespace=kube-system")
    assert other["edges"] == [] and other["rows"] == []


def test_a_new_connection_reaches_the_page_live(ui):
    base, pods, _ = ui
    before = edges_of(get_json(f"{base}/api/graph"))[TIE]["forwarded"]
    snapshot, flow = asyncio.run(live_flow(base.replace("http:", "ws:") + "/api/stream?namespace=default", pods))
    assert snapshot["namespace"] == "default" and TIE in edges_of(snapshot)
    assert flow["row"]["source_pod"] == "default/tiefighter" and flow["row"]["verdict"] == "FORWARDED"
    assert flow["edge"]["forwarded"] > before
    assert {n["id"] for n in flow["nodes"]} == {"default/tiefighter", "default/deathstar"}


def test_headless_chromium_renders_the_edges_the_drop_and_the_table(ui, tmp_path):
    base, _, _ = ui
    url = f"{base}/?namespace=default"
    dump = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dump.returncode == 0, dump.stderr.decode()[-2000:]
    page = Elements()
    page.feed(dump.stdout.decode())
    edges = {(e["data-source"], e["data-destination"], e["data-port"]): e for e in page.edges}
    tie = edges[("default/tiefighter", "default/deathstar", "80")]
    xwing = edges[("default/xwing", "default/deathstar", "80")]
    assert tie["class"].split() == ["edge", "forwarded"] and int(tie["data-forwarded"]) > 0
    assert xwing["class"].split() == ["edge", "dropped"] and int(xwing["data-dropped"]) > 0
    assert xwing["data-reason"] == "POLICY_DENIED" and "drop reason: POLICY_DENIED" in xwing["title"]
    assert "default" in page.options
    dropped = [r for r in page.rows if r[1:3] == ["default/xwing", "default/deathstar"]]
    assert dropped and all(r[3] == "80/TCP" and r[4] == "DROPPED" and r[5] == "POLICY_DENIED" for r in dropped)
    assert any(r[1:3] == ["default/tiefighter", "default/deathstar"] and r[4] == "FORWARDED" for r in page.rows)

    shot = tmp_path / "service-map.png"
    done = chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url,
                    profile=tmp_path / "profile-shot")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    assert struct.unpack(">II", data[16:24]) == WINDOW
    assert len(data) > 10_000  # boxes, edges and a table, not a blank page
