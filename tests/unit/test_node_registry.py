"""The node registry on the real embedded store: nodes see each other, dead ones go."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest
from aio_helpers import eventually, run

from pilus.kvstore import open_store
from pilus.node.registry import NODES_PREFIX, NodeEntry, NodeRegistry, NodeRegistryError


def entry(n: int, cluster: str = "c1") -> NodeEntry:
    return NodeEntry(
        name=f"node{n}", cluster=cluster, node_ip=IPv4Address(f"192.168.50.{n}"),
        pod_cidr=IPv4Network(f"10.200.{n}.0/24"), router_ip=IPv4Address(f"10.200.{n}.1"),
    )


def test_entry_json_round_trip():
    e = NodeEntry(**{**entry(1).__dict__, "boot_id": "b", "started": 1.5})
    assert NodeEntry.from_json(e.to_json()) == e
    assert e.to_json()["pod_cidr"] == "10.200.1.0/24"


def test_bad_names_refused(tmp_path):
    with pytest.raises(NodeRegistryError):
        NodeRegistry(open_store(path=tmp_path / "kv.db"), NodeEntry(**{**entry(1).__dict__, "name": "a/b"}))


def test_two_nodes_see_each_other_and_a_dead_one_goes(tmp_path):
    async def main():
        s1 = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        s2 = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        r1, r2 = NodeRegistry(s1, entry(1)), NodeRegistry(s2, entry(2))
        other = NodeRegistry(s2, entry(3, cluster="c2"))  # another cluster stays apart
        seen: list[set[str]] = []
        r1.on_change(lambda nodes: seen.append(set(nodes)))
        try:
            await r1.start()
            await r2.start()
            await other.start()
            assert r1.key == f"{NODES_PREFIX}/c1/node1"
            await eventually(lambda: set(r1.nodes) == {"node1", "node2"})
            await eventually(lambda: set(r2.nodes) == {"node1", "node2"})
            assert r1.nodes["node2"].pod_cidr == IPv4Network("10.200.2.0/24")
            assert r1.nodes["node2"].boot_id and r1.nodes["node2"].health == "Ok"
            assert [row["local"] for row in r1.rows()] == [True, False]
            assert r1.status() == {"nodes": 2, "reachable": 2}
            assert set(other.nodes) == {"node3"}
            await r2.stop(revoke_lease=True)  # as if its lease expired
            await eventually(lambda: set(r1.nodes) == {"node1"})
            assert seen[-1] == {"node1"} and {"node1", "node2"} in seen
        finally:
            for r in (r1, r2, other):
                await r.stop()
            await s1.close()
            await s2.close()

    run(main())


def test_entry_expires_with_its_lease(tmp_path):
    async def main():
        s1 = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        s2 = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        r1, r2 = NodeRegistry(s1, entry(1)), NodeRegistry(s2, entry(2), lease_ttl=0.6)
        try:
            await r1.start()
            await r2.start()
            await eventually(lambda: "node2" in r1.nodes)
            for t in r2._tasks:  # the agent dies: nobody keeps its lease alive
                t.cancel()
            await eventually(lambda: "node2" not in r1.nodes, timeout=5)
        finally:
            await r1.stop()
            await r2.stop()
            await s1.close()
            await s2.close()

    run(main())


def test_bad_value_is_ignored_with_a_log(tmp_path, caplog):
    async def main():
        store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        await store.put(f"{NODES_PREFIX}/c1/junk", "{not json")
        await store.put(f"{NODES_PREFIX}/c1/liar", '{"name": "node9"}')
        r1 = NodeRegistry(store, entry(1))
        try:
            await r1.start()
            assert set(r1.nodes) == {"node1"}
            await store.put(f"{NODES_PREFIX}/c1/junk2", "[]")
            await store.put(f"{NODES_PREFIX}/c1/node7", entry(7).to_json().__repr__())  # not JSON
            good = NodeRegistry(store, entry(5))
            await good.start()
            await eventually(lambda: "node5" in r1.nodes)
            assert set(r1.nodes) == {"node1", "node5"}
            await good.stop()
        finally:
            await r1.stop()
            await store.close()

    with caplog.at_level(logging.WARNING, logger="pilus.node.registry"):
        run(main())
    assert "ignoring node entry" in caplog.text


def test_api_lists_the_nodes(tmp_path):
    from pathlib import Path
    from types import SimpleNamespace

    from aiohttp.test_utils import make_mocked_request

    from pilus.api.server import APIServer

    async def main():
        store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        reg = NodeRegistry(store, entry(1))
        try:
            await reg.start()
            api = APIServer(SimpleNamespace(node_registry=reg), Path("/nonexistent.sock"))
            resp = await api.node_list(make_mocked_request("GET", "/v1/node"))
            body = json.loads(resp.body)
            assert [(n["name"], n["node_ip"], n["pod_cidr"], n["local"]) for n in body] == [
                ("node1", "192.168.50.1", "10.200.1.0/24", True)]
            none = APIServer(SimpleNamespace(node_registry=None), Path("/nonexistent.sock"))
            assert (await none.node_list(make_mocked_request("GET", "/v1/node"))).status == 503
        finally:
            await reg.stop(revoke_lease=True)
            await store.close()

    run(main())


def test_a_name_registered_by_another_machine_is_refused_and_a_restart_is_not(tmp_path):
    async def main():
        store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        first = NodeRegistry(store, entry(1))
        twin = NodeRegistry(store, NodeEntry(**{**entry(1).__dict__, "node_ip": IPv4Address("192.168.50.99")}))
        again = NodeRegistry(store, entry(1))  # the same machine restarted: same node IP
        try:
            await first.start()
            with pytest.raises(NodeRegistryError) as err:
                await twin.start()
            assert "'node1' is already registered" in str(err.value) and "192.168.50.1" in str(err.value)
            kv = await store.get(first.key)
            assert json.loads(kv.value)["node_ip"] == "192.168.50.1"  # the twin changed nothing
            await first.stop()
            await again.start()
            assert set(again.nodes) == {"node1"}
        finally:
            for r in (first, twin, again):
                await r.stop()
            await store.close()

    run(main())
