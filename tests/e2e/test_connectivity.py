"""Three endpoints on one node: TCP, UDP and ICMP between them, to the node, to an
external namespace (masqueraded), and a spoofed packet dropped with its reason."""

from __future__ import annotations

import threading

import pytest

from .conftest import EXTERNAL_IP, probe, wait_for

PORT = 8080


@pytest.fixture(scope="module")
def pods(api):
    created = {}
    for name, labels in (
        ("default/deathstar", ["org=empire", "class=deathstar"]),
        ("default/tiefighter", ["org=empire", "class=tiefighter"]),
        ("default/xwing", ["org=alliance", "class=xwing"]),
    ):
        created[name.split("/")[1]] = api.create_endpoint(name, labels)
    yield created
    for ep in created.values():
        api.delete_endpoint(ep["id"])


def test_endpoints_are_ready_with_identities(api, pods):
    listed = {ep["name"]: ep for ep in api.list_endpoints()}
    assert set(listed) >= {"default/deathstar", "default/tiefighter", "default/xwing"}
    for ep in pods.values():
        assert listed[ep["name"]]["state"] == "ready"
        assert ep["identity"] >= 256
        assert "k8s:io.kubernetes.pod.namespace=default" in ep["labels"]
    # same labels -> same identity; different labels -> different identity
    assert pods["deathstar"]["identity"] != pods["xwing"]["identity"]
    ids = {row["id"] for row in api.list_identities()}
    assert {1, 2, pods["xwing"]["identity"]} <= ids
    ipcache = {row["prefix"]: row["identity"] for row in api.bpf_ipcache()}
    assert ipcache[f"{pods['xwing']['ipv4']}/32"] == pods["xwing"]["identity"]


@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_pod_to_pod(pods, servers, kind):
    target = pods["deathstar"]
    if kind == "tcp":
        servers.start(target["netns"], "tcp-server", PORT)
    elif kind == "udp":
        servers.start(target["netns"], "udp-server", PORT)
    for client in ("tiefighter", "xwing"):
        src = pods[client]
        if kind == "tcp":
            result = probe(src["netns"], "tcp-connect", target["ipv4"], str(PORT))
            assert result["ok"], result
            assert result["reply"].split(":")[0] == src["ipv4"]  # no NAT between pods
        elif kind == "udp":
            result = probe(src["netns"], "udp-send", target["ipv4"], str(PORT), "hello")
            assert result == {"ok": True, "reply": "hello", "peer": f"{target['ipv4']}:{PORT}"}
        else:
            assert probe(src["netns"], "ping", target["ipv4"])["ok"]


def test_pod_to_node_and_node_to_pod(node, pods, servers):
    servers.start(node["netns"], "tcp-server", PORT)
    for dst in (node["router_ip"], node["node_ip"]):
        result = probe(pods["xwing"]["netns"], "tcp-connect", dst, str(PORT))
        assert result["ok"], (dst, result)
        assert result["reply"].split(":")[0] == pods["xwing"]["ipv4"]
    assert probe(pods["xwing"]["netns"], "ping", node["router_ip"])["ok"]
    servers.start(pods["deathstar"]["netns"], "tcp-server", PORT + 1)
    result = probe(node["netns"], "tcp-connect", pods["deathstar"]["ipv4"], str(PORT + 1))
    assert result["ok"], result
    assert probe(node["netns"], "ping", pods["deathstar"]["ipv4"])["ok"]


def test_pod_to_external_is_masqueraded(node, pods, external, servers):
    servers.start(external, "tcp-server", PORT)
    servers.start(external, "udp-server", PORT)
    result = probe(pods["tiefighter"]["netns"], "tcp-connect", EXTERNAL_IP, str(PORT))
    assert result["ok"], result
    assert result["reply"].split(":")[0] == node["node_ip"]  # seen from outside as the node
    assert probe(pods["tiefighter"]["netns"], "udp-send", EXTERNAL_IP, str(PORT))["ok"]
    assert probe(pods["tiefighter"]["netns"], "ping", EXTERNAL_IP)["ok"]
    # the external side has no route to pods: only the node's address is reachable
    assert not probe(external, "ping", pods["tiefighter"]["ipv4"], "1")["ok"]


def _drop_count(api, reason_desc: str) -> int:
    return sum(r["packets"] for r in api.bpf_metrics() if r["reason_desc"] == reason_desc)


def test_spoofed_source_is_dropped_and_reported(api, pods, servers):
    xwing, deathstar = pods["xwing"], pods["deathstar"]
    server = servers.start(deathstar["netns"], "udp-server", PORT + 2)
    events: list[dict] = []
    stream = api.stream_monitor(type="drop")
    ready = threading.Event()

    def collect():
        ready.set()
        for event in stream:
            events.append(event)
            if event.get("reason") == 132:
                return

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    ready.wait(5)
    before = _drop_count(api, "Invalid source ip")
    forged = "10.201.1.250"
    # resend until the monitor subscription is live (the first send may precede it)
    for _ in range(20):
        probe(xwing["netns"], "spoof-udp", forged, deathstar["ipv4"], str(PORT + 2))
        if wait_for(lambda: any(e.get("reason") == 132 for e in events), timeout=0.5):
            break
    drops = [e for e in events if e.get("reason") == 132]
    assert drops, f"no drop event seen; got {events}"
    event = drops[0]
    assert event["source_ep"] == xwing["id"]
    assert event["src_ip"] == forged and event["dst_ip"] == deathstar["ipv4"]
    assert event["reason_desc"] == "Invalid source ip"
    assert wait_for(lambda: _drop_count(api, "Invalid source ip") > before)
    # and the datagram never reached the server
    server.kill()
    out = server.stdout.read()
    assert "spoofed" not in out


def test_bad_input_changes_nothing(api, pods):
    from pilus.api.client import APIError

    before = api.list_endpoints()
    with pytest.raises(APIError) as dup:
        api.create_endpoint("default/xwing", ["org=alliance"])
    assert dup.value.status == 409 and "already exists" in str(dup.value)
    with pytest.raises(APIError) as bad:
        api.create_endpoint("default/ywing", ["org=al liance"])
    assert bad.value.status == 400 and "org=al liance" in str(bad.value)
    with pytest.raises(APIError) as badname:
        api.create_endpoint("Default/Bad_Name", [])
    assert badname.value.status == 400
    assert api.list_endpoints() == before
