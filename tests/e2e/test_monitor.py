"""Events cost nothing while nobody listens: the datapath emits an event type only
while some `pilus monitor` subscriber wants it (healthz events.listening), the agent
reads nothing else, and drops are counted in metrics either way."""

from __future__ import annotations

import threading
import time

import pytest

from .conftest import probe, wait_for

PORT = 8095


@pytest.fixture(scope="module")
def pods(api):
    created = {}
    for name in ("mon-client", "mon-server"):
        created[name] = api.create_endpoint(f"default/{name}", [f"app={name}"])
    yield created
    for ep in created.values():
        api.delete_endpoint(ep["id"])


def _events(api) -> dict:
    return api.healthz()["events"]


def _drops(api, reason: int) -> int:
    return sum(r["packets"] for r in api.bpf_metrics() if r["reason"] == reason)


def test_traces_only_while_a_subscriber_wants_them(api, pods, servers):
    client, server = pods["mon-client"], pods["mon-server"]
    servers.start(server["netns"], "tcp-server", PORT)

    # nobody listens to traces: a new connection leaves no trace record at all
    assert "trace" not in _events(api)["listening"]
    traces0 = _events(api)["received_by_type"]["trace"]
    assert probe(client["netns"], "tcp-connect", server["ipv4"], str(PORT))["ok"]
    time.sleep(1)  # the agent reads the ring within ~10 ms; nothing must have come
    assert _events(api)["received_by_type"]["trace"] == traces0

    # a drop is counted in metrics whether anybody listens or not
    spoofed0 = _drops(api, 132)
    probe(client["netns"], "spoof-udp", "10.201.1.250", server["ipv4"], str(PORT))
    assert wait_for(lambda: _drops(api, 132) > spoofed0)

    # a trace subscriber turns traces on: the next connection is traced
    stream = api.stream_monitor(type="trace")
    seen: list[dict] = []

    def ours(e: dict) -> bool:
        return e.get("dport") == PORT and e.get("ct_state") == "new"

    def collect():
        for event in stream:
            seen.append(event)
            if ours(event):
                return  # leaves the stream free to be closed below

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    assert "trace" in _events(api)["listening"]  # subscribed before stream_monitor returned
    assert probe(client["netns"], "tcp-connect", server["ipv4"], str(PORT))["ok"]
    assert wait_for(lambda: any(ours(e) for e in seen), timeout=5), seen
    reader.join(timeout=5)
    event = next(e for e in seen if ours(e))
    assert event["src_ip"] == client["ipv4"] and event["dst_ip"] == server["ipv4"]
    assert _events(api)["received_by_type"]["trace"] > traces0

    # the subscriber leaves: the agent notices on its next write, and traces stop
    stream.close()

    def stopped() -> bool:
        probe(client["netns"], "tcp-connect", server["ipv4"], str(PORT))
        return "trace" not in _events(api)["listening"]

    assert wait_for(stopped, timeout=20, interval=0.2)
