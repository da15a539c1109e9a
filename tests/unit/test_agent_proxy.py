"""The agent's proxy row without a process: the config it writes from the policy engine (and
that the proxy's own parser accepts), when it rewrites it, the secrets file's mode, the
redirects view, and records from the socket becoming L7 events (bad lines counted)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from aio_helpers import eventually, run

from pilus.agent_proxy import (
    AgentProxy,
    LocalEndpoint,
    RecordListener,
    build_config,
    is_our_proxy,
    parse_record,
    redirects,
    stop_proxy,
    write_if_changed,
)
from pilus.identity.labels import endpoint_labels
from pilus.identity.reserved import RESERVED_IDENTITIES
from pilus.observer.l7 import L7Event
from pilus.policy import PolicyEngine, parse_policies
from pilus.proxy.config import ProxyConfig

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public/.*"}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts:
    - ports: [{port: "8000", endPort: 8010, protocol: TCP}]
      rules:
        http: [{method: POST}]
"""

RECORD = {"time": 1.5, "listener": "ingress:15001", "direction": "ingress", "endpoint": 12,
          "source": {"ip": "10.200.1.7", "port": 40000, "identity": 300},
          "destination": {"ip": "10.200.1.5", "port": 80, "identity": 301},
          "protocol": "HTTP/1.1", "method": "GET", "url": "http://web/private", "host": "web",
          "path": "/private", "status": 403, "grpc_status": None, "verdict": "DENIED", "latency_ns": 1000,
          "header_mismatches": []}


@dataclass
class FakeEndpoint:
    name: str
    ipv4: IPv4Address


class FakePolicySync:
    """What the row uses of PolicySync: its worker, the local endpoints, change callbacks."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.endpoints: dict[int, FakeEndpoint] = {}
        self.change_callbacks: list = []
        self._worker = ThreadPoolExecutor(max_workers=1)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _sync_changed(self) -> None:
        for cb in self.change_callbacks:
            cb()

    def add(self, ep_id: int, name: str, ip: str, **labels: str) -> None:
        ns, pod = name.split("/")
        self.engine.upsert_endpoint(ep_id, endpoint_labels(ns, labels, cluster="default"), {})
        self.engine.upsert_identity(ep_id, endpoint_labels(ns, labels, cluster="default"))
        self.endpoints[ep_id] = FakeEndpoint(name, IPv4Address(ip))


def _engine() -> PolicyEngine:
    eng = PolicyEngine("default", "default")
    for r in RESERVED_IDENTITIES:
        if r.id:
            eng.upsert_identity(r.id, r.labels)
    eng.set_policies(parse_policies(POLICY))
    return eng


def _proxy(tmp_path: Path) -> tuple[AgentProxy, FakePolicySync]:
    eng = _engine()
    sync = FakePolicySync(eng)
    sync.add(300, "default/web", "10.200.1.5", app="web")
    sync.add(301, "default/client", "10.200.1.7", app="client")
    ap = AgentProxy(state_dir=tmp_path, policy=sync, engine=eng, ingress_port=15001, egress_port=15002)
    ap.dir.mkdir()
    return ap, sync


def test_config_from_the_engine_is_accepted_by_the_proxy(tmp_path):
    ap, sync = _proxy(tmp_path)

    async def go():
        await sync._run(sync.engine.set_proxy_ports, "http", 15001, 15002)
        return await ap._write_files()

    assert run(go()) is True
    doc = json.loads(ap.config_path.read_text())
    ingress, egress = doc["listeners"]
    assert (ingress["direction"], ingress["port"], ingress["transparent"]) == ("ingress", 15001, True)
    assert (egress["direction"], egress["port"], ingress["address"]) == ("egress", 15002, "0.0.0.0")
    (rs,) = ingress["rules"]
    assert rs["endpoint"] == 300 and rs["endpoint_ips"] == ["10.200.1.5"] and rs["port"] == 80
    assert rs["peers"] == [301] and rs["http"] == [{"method": "GET", "path": "/public/.*"}]
    assert "egress" not in rs
    # the engine splits endPort ranges into prefix-aligned keys, as the policy map holds them
    assert [(es["endpoint"], es["endpoint_ips"], es["port"], es["end_port"]) for es in egress["rules"]] == [
        (301, ["10.200.1.7"], 8000, 8007), (301, ["10.200.1.7"], 8008, 8009), (301, ["10.200.1.7"], 8010, None)]
    cfg = ProxyConfig.from_file(ap.config_path)  # the proxy's own parser, all or nothing
    assert [lst.port for lst in cfg.listeners] == [15001, 15002]
    assert ap.redirects() == [
        {"endpoint": 300, "name": "default/web", "ingress": [80], "egress": []},
        {"endpoint": 301, "name": "default/client", "ingress": [], "egress": ["8000-8007", "8008-8009", 8010]},
    ]
    assert ap._wanted.is_set()  # L7 rule sets exist: the supervisor would start a proxy
    summary = ap.summary()
    assert summary["redirects"] == 4 and summary["state"] == "Failure"  # wanted, not running


def test_unchanged_policy_writes_nothing_and_secrets_are_private(tmp_path):
    ap, sync = _proxy(tmp_path)

    class Secrets:
        def __init__(self):
            self.data = {"default/tok": "s3cret"}

        def values(self):
            return dict(self.data)

        def subscribe(self, fn):
            return lambda: None

    ap.secrets = Secrets()

    async def go():
        await sync._run(sync.engine.set_proxy_ports, "http", 15001, 15002)
        first = await ap._write_files()
        inode = ap.config_path.stat().st_ino
        second = await ap._write_files()
        assert ap.config_path.stat().st_ino == inode  # not even replaced
        ap.secrets.data["default/tok"] = "rotated"
        third = await ap._write_files()
        return first, second, third

    assert run(go()) == (True, False, True)
    assert stat.S_IMODE(ap.secrets_path.stat().st_mode) == 0o600
    assert json.loads(ap.secrets_path.read_text()) == {"default/tok": "rotated"}


def test_without_l7_rules_no_proxy_is_wanted(tmp_path):
    eng = PolicyEngine("default", "default")
    sync = FakePolicySync(eng)
    sync.add(300, "default/web", "10.200.1.5", app="web")
    ap = AgentProxy(state_dir=tmp_path, policy=sync, engine=eng)
    ap.dir.mkdir()
    assert run(ap._write_files()) is True
    doc = json.loads(ap.config_path.read_text())
    assert [lst["rules"] for lst in doc["listeners"]] == [[], []]
    assert not ap._wanted.is_set()
    assert ap.summary()["state"] == "Ok" and ap.summary()["process"]["running"] is False


def test_build_config_orders_by_endpoint_and_splits_directions():
    a = LocalEndpoint(7, "default/a", "10.0.0.7")
    b = LocalEndpoint(3, "default/b", "10.0.0.3")
    sets_a = [{"egress": True, "endpoint": 7, "port": None, "end_port": None, "peers": None, "http": [{}]}]
    sets_b = [{"egress": False, "endpoint": 3, "port": 443, "end_port": None, "peers": [2], "http": []}]
    ports = {"ingress": 16001, "egress": 16002, "kafka-ingress": 16003, "kafka-egress": 16004}
    doc = build_config([(a, sets_a), (b, sets_b)], ports)
    assert [lst["name"] for lst in doc["listeners"]] == ["ingress:16001", "egress:16002"]  # no Kafka rules: no listener
    assert [r["endpoint"] for r in doc["listeners"][0]["rules"]] == [3]
    assert doc["listeners"][1]["rules"][0]["endpoint_ips"] == ["10.0.0.7"]
    kafka = [{"egress": False, "parser": "kafka", "endpoint": 3, "port": 9092, "end_port": None, "proto": 6,
              "peers": [5], "kafka": [{"role": "produce", "topic": "t"}]}]
    doc = build_config([(b, sets_b + kafka)], ports)
    by_name = {lst["name"]: lst for lst in doc["listeners"]}
    assert sorted(by_name) == ["egress:16002", "ingress:16001", "ingress:16003"]
    assert by_name["ingress:16003"]["protocol"] == "kafka" and "protocol" not in by_name["ingress:16001"]
    assert by_name["ingress:16003"]["rules"] == [{"endpoint": 3, "port": 9092, "end_port": None, "peers": [5],
                                                  "kafka": [{"role": "produce", "topic": "t"}],
                                                  "endpoint_ips": ["10.0.0.3"]}]
    assert [r["port"] for r in by_name["ingress:16001"]["rules"]] == [443]
    assert redirects([(a, sets_a), (b, sets_b)]) == [
        {"endpoint": 3, "name": "default/b", "ingress": [443], "egress": []},
        {"endpoint": 7, "name": "default/a", "ingress": [], "egress": ["any"]},
    ]


def test_write_if_changed_is_atomic_and_keeps_mode(tmp_path):
    path = tmp_path / "f.json"
    assert write_if_changed(path, "a", 0o600) is True
    assert write_if_changed(path, "a", 0o600) is False
    os.chmod(path, 0o644)
    assert write_if_changed(path, "a", 0o600) is False  # same text, mode repaired
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_if_changed(path, "b", 0o600) is True and path.read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no tmp file left


def test_parse_record():
    ev = parse_record(json.dumps(RECORD).encode())
    assert isinstance(ev, L7Event)
    assert (ev.verdict, ev.endpoint, ev.status, ev.source.identity) == ("DENIED", 12, 403, 300)
    for bad in (b"not json", b"[1, 2]", json.dumps({**RECORD, "verdict": "MAYBE"}).encode(),
                json.dumps({**RECORD, "source": "x"}).encode(), b"\xff\xfe"):
        with pytest.raises(ValueError):
            parse_record(bad)


class Hub:
    def __init__(self) -> None:
        self.events: list = []

    def publish(self, event) -> None:
        self.events.append(event)


def test_record_listener_publishes_and_counts_bad_lines(tmp_path):
    hub = Hub()
    path = tmp_path / "records.sock"

    async def go():
        ready: Hub | None = None
        listener = RecordListener(path, lambda: ready)
        await listener.start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        _r, w = await asyncio.open_unix_connection(str(path))
        w.write(json.dumps(RECORD).encode() + b"\n" + b"garbage\n\n")
        await w.drain()
        await asyncio.sleep(0.3)
        assert listener.received == 0  # no hub yet: the lines wait in the socket
        ready = hub
        await eventually(lambda: listener.received == 1 and listener.bad == 1)
        w.close()
        # a second connection (the proxy restarted) is served too
        _r2, w2 = await asyncio.open_unix_connection(str(path))
        w2.write(json.dumps({**RECORD, "verdict": "FORWARDED", "status": 200}).encode() + b"\n")
        await w2.drain()
        await eventually(lambda: listener.received == 2)
        await listener.stop()
        assert not path.exists()
        return listener.status()

    status = run(go())
    assert status == {"received": 2, "bad": 1, "connections": 2}
    assert [e.verdict for e in hub.events] == ["DENIED", "FORWARDED"]


def test_stop_proxy_ignores_a_pid_that_is_not_our_proxy(tmp_path):
    pdir = tmp_path / "proxy"
    pdir.mkdir()
    (pdir / "proxy.pid").write_text(f"{os.getpid()}\n")  # this pytest process: never killed
    assert not is_our_proxy(os.getpid(), pdir / "control.sock")
    assert stop_proxy(tmp_path) is None
    assert stop_proxy(tmp_path / "nothing") is None
