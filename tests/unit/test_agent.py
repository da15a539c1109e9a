"""The agent built from its table, without root: a fake datapath (that passes the same
conformance check as the real one), the real embedded kvstore on tmp_path, and the
node plumbing replaced by a component that only records its start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pilus.agent import Agent, AgentConfig, describe
from pilus.identity import reserved
from pilus.testing.check_datapath import check_datapath
from pilus.testing.fake_datapath import FakeDatapath


def test_fake_datapath_passes_the_conformance_check():
    check_datapath(FakeDatapath())


class FakeAddresses:
    node_ip = IPv4Address("192.0.2.10")
    device = None

    async def start(self) -> None:
        pass


class FakeTunnel:
    """The tunnel row without netlink: native routing as far as the datapath knows."""

    name, ifindex = None, 0

    async def start(self) -> None:
        pass


class FakeNodeRoutes:
    """The node-routes row without netlink or nft."""

    async def start(self) -> None:
        pass

    def retry_due(self) -> bool:
        return False

    def reconcilers_status(self) -> list[dict]:
        return []


class Recorder:
    """A component that records start and stop in one shared log."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    async def start(self) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


def _cfg(tmp_path: Path) -> AgentConfig:
    return AgentConfig(node_name="n1", state_dir=tmp_path / "s", pod_cidr=IPv4Network("10.210.1.0/24"),
                       bpffs_root=tmp_path / "bpf")


def _fakes(**more):
    return {"addresses": FakeAddresses, "tunnel": FakeTunnel, "datapath": FakeDatapath,
            "node": lambda: Recorder("node", []), "node-routes": FakeNodeRoutes, **more}


async def _get(path: Path, url: str) -> tuple[int, dict]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(f"GET {url} HTTP/1.1\r\nHost: pilus\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"chunked" in head.lower():
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            chunks.append(rest[:n])
            rest = rest[n + 2:]
        body = b"".join(chunks)
    return status, json.loads(body)


def _spied(agent: Agent, log: list[str]) -> None:
    """Record every row's start and stop (the real components still run)."""

    def spy(what, name, fn):
        async def run(part):
            log.append(f"{what} {name}")
            result = fn(part)
            if asyncio.iscoroutine(result):
                await result
        return run

    agent.rows = [dataclasses.replace(r, start=spy("start", r.name, r.start),
                                      stop=spy("stop", r.name, r.stop) if r.stop else None)
                  for r in agent.rows]


def test_starts_in_table_order_and_stops_in_reverse(tmp_path):
    log: list[str] = []
    agent = Agent(_cfg(tmp_path), replace=_fakes())
    _spied(agent, log)

    async def run():
        await agent.start()
        started = list(log)
        await agent.stop()
        return started

    started = asyncio.run(run())
    enabled = [r.name for r in agent.rows if r.enabled]
    with_stop = [r.name for r in agent.rows if r.enabled and r.stop]
    assert started == [f"start {n}" for n in enabled]
    assert log[len(started):] == [f"stop {n}" for n in reversed(with_stop)]
    assert with_stop[:2] == ["lock", "kvstore"] and with_stop[-3:] == ["events", "hubble", "api"]
    assert all(agent.state[r.name] == ("Stopped" if r.enabled else "Disabled") for r in agent.rows)


def test_a_failing_start_stops_the_started_ones(tmp_path):
    log: list[str] = []
    agent = Agent(_cfg(tmp_path), replace=_fakes(identities=lambda: Recorder("identities", [], fail=True)))
    _spied(agent, log)
    with pytest.raises(RuntimeError, match="identities cannot start"):
        asyncio.run(agent.start())
    names = [r.name for r in agent.rows]
    before = names[:names.index("identities")]
    assert log[:len(before) + 1] == [f"start {n}" for n in before + ["identities"]]
    # the failed one too: it may have started half-way
    stopped = [r.name for r in agent.rows if r.name in before + ["identities"] and r.stop]
    assert log[len(before) + 1:] == [f"stop {n}" for n in reversed(stopped)]
    assert agent.state["identities"].startswith("Failed: identities cannot start")
    assert agent.state["api"] == "Pending" and agent.state["lock"] == "Stopped"
    assert agent.state["endpoints"] == "Pending"
    # the kvstore was closed: a new agent opens the same state dir
    again = Agent(_cfg(tmp_path), replace=_fakes())

    async def run():
        await again.start()
        await again.stop()

    asyncio.run(run())


def test_describe_is_the_table(tmp_path):
    cfg = _cfg(tmp_path)
    agent = Agent(cfg)
    text = describe(cfg)
    listed = [line.split()[0] for line in text.split("components (start order):\n")[1]
              .split("settings:")[0].splitlines()]
    assert listed == [r.name for r in agent.rows]
    for row in agent.rows:
        assert row.job in text
    assert "metrics " in text and "(off)" in text
    assert not cfg.state_dir.exists()  # neither building nor describing does I/O


def test_unknown_replacement_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no component named nodes"):
        Agent(_cfg(tmp_path), replace={"nodes": FakeAddresses})


def test_agent_with_fakes_answers_healthz_over_the_socket(tmp_path):
    cfg = _cfg(tmp_path)
    agent = Agent(cfg, replace=_fakes())

    async def run():
        await agent.start()
        try:
            status, body = await _get(cfg.socket_path, "/v1/healthz")
            _, endpoints = await _get(cfg.socket_path, "/v1/endpoint")
            _, ipcache = await _get(cfg.socket_path, "/v1/bpf/ipcache")
            _, services = await _get(cfg.socket_path, "/v1/service")
            return status, body, endpoints, ipcache, services
        finally:
            await agent.stop()

    status, body, endpoints, ipcache, services = asyncio.run(run())
    assert status == 200
    assert body["node"] == "n1" and body["node_ip"] == "192.0.2.10" and body["router_ip"] == "10.210.1.1"
    assert [c["name"] for c in body["components"]] == [r.name for r in agent.rows]
    assert {c["name"]: c["state"] for c in body["components"]}["metrics"] == "Disabled"
    assert all(c["state"] == "Ok" for c in body["components"] if c["name"] != "metrics")
    maps = {c["name"]: c.get("maps") for c in body["components"]}
    assert maps["ipcache"][0]["name"] == "ipcache" and maps["ipcache"][0]["state"] == "Ok"
    assert {m["name"] for m in maps["services"]} >= {"lb-backends", "lb-frontends"}
    assert body["kvstore"]["state"] == "Ok"
    assert {p["name"] for p in body["datapath"]["programs"]} >= {"cil_from_container", "cil_to_container"}
    # creating nothing still works: no endpoints, no services, the node's own entries
    assert endpoints == [] and services == [] and body["endpoints"]["total"] == 0
    assert {(r["prefix"], r["identity"]) for r in ipcache} == {
        ("10.210.1.1/32", reserved.HOST), ("192.0.2.10/32", reserved.HOST), ("0.0.0.0/0", reserved.WORLD)}
    assert not cfg.socket_path.exists()


def test_events_reach_the_hub_through_the_fake(tmp_path):
    cfg = _cfg(tmp_path)
    agent = Agent(cfg, replace=_fakes())

    async def run():
        await agent.start()
        try:
            agent.datapath.emit(b"\xff" + bytes(15))  # an event type nobody decodes
            for _ in range(50):
                await asyncio.sleep(0.01)
                if agent.events.received:
                    break
            return agent.events.received
        finally:
            await agent.stop()

    assert asyncio.run(run()) == 1


def test_second_agent_on_the_state_dir_is_refused(tmp_path):
    from pilus.errors import AgentError

    cfg = _cfg(tmp_path)

    async def run():
        first = Agent(cfg, replace=_fakes())
        await first.start()
        try:
            second = Agent(cfg, replace=_fakes())
            with pytest.raises(AgentError, match="another pilus agent"):
                await second.start()
        finally:
            await first.stop()

    asyncio.run(run())
    assert socket  # (UNIX sockets are used above)


def test_a_failed_map_write_shows_in_status_and_is_retried(tmp_path):
    from pilus.ipcache import Source
    from pilus.reconcile import ReconcileError

    cfg = _cfg(tmp_path)
    agent = Agent(cfg, replace=_fakes())
    prefix = IPv4Network("10.210.1.9/32")

    async def run():
        await agent.start()
        try:
            fake = agent.datapath.ipcache
            real_upsert = fake.upsert

            def broken(*args, **kwargs):
                raise OSError("map full")

            fake.upsert = broken
            with pytest.raises(ReconcileError, match="map full"):
                agent.ipcache.upsert(prefix, 16777300, Source.LOCAL)
            ipcache_maps = {c["name"]: c.get("maps") for c in agent.components()}["ipcache"][0]
            fake.upsert = real_upsert
            await asyncio.sleep(0.15)  # the first backoff
            retried = agent.parts["retries"].retry_due_now()
            return ipcache_maps, retried, [row for row in fake.items() if row[0] == prefix]
        finally:
            await agent.stop()

    status, retried, rows = asyncio.run(run())
    assert status["state"] == "Pending" and status["pending"] == 1 and "map full" in status["last_error"]
    assert retried == 1 and rows == [(prefix, 16777300, None)]
