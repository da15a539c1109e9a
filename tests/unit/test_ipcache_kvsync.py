"""The cluster-wide ipcache on the real embedded store: two nodes' syncs see each
other's endpoints and node IPs as KVSTORE claims of a real IPCache over FakeIpcache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from aio_helpers import eventually, run

from pilus.identity import reserved
from pilus.ipcache import IPCache, Source
from pilus.ipcache.kvsync import IP_PREFIX, IPCacheSync, IPIdentityPair
from pilus.kvstore import open_store
from pilus.node.registry import NodeEntry, NodeRegistry
from pilus.testing.fake_datapath import FakeIpcache


@dataclass
class Ep:
    ipv4: IPv4Address
    identity: int
    name: str
    named_ports: dict | None = None


def node_ip(n: int) -> IPv4Address:
    return IPv4Address(f"192.168.50.{n}")


def pod(n: int, i: int) -> IPv4Address:
    return IPv4Address(f"10.200.{n}.{i}")


def net(ip) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


class Node:
    """One agent's part: its own store handle, registry, ipcache and sync."""

    def __init__(self, tmp_path, n: int, lease_ttl: float = 20.0) -> None:
        self.store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        self.map = FakeIpcache()
        self.ipcache = IPCache(self.map)
        self.registry = NodeRegistry(self.store, NodeEntry(f"node{n}", "c1", node_ip(n),
                                                           IPv4Network(f"10.200.{n}.0/24"), pod(n, 1)),
                                     lease_ttl=lease_ttl)
        self.sync = IPCacheSync(self.store, self.ipcache, self.registry, cluster="c1", node_name=f"node{n}",
                                node_ip=node_ip(n), lease_ttl=lease_ttl)

    async def start(self) -> None:
        await self.registry.start()
        await self.sync.start()

    async def stop(self) -> None:
        await self.sync.stop()
        await self.registry.stop()
        await self.store.close()


def test_pair_json_round_trip():
    pair = IPIdentityPair(pod(1, 5), 1234, node_ip(1), "node1", "default/a")
    assert IPIdentityPair.from_json(pair.to_json()) == pair
    assert pair.to_json()["HostIP"] == "192.168.50.1" and pair.to_json()["ID"] == 1234


def test_named_ports_travel_with_the_pair_and_bad_ones_are_refused():
    pair = IPIdentityPair(pod(1, 5), 1234, node_ip(1), "node1", "default/a",
                          (("dns", 53, "UDP"), ("http", 8080, "TCP")))
    raw = pair.to_json()
    assert raw["NamedPorts"] == [{"Name": "dns", "Port": 53, "Protocol": "UDP"},
                                 {"Name": "http", "Port": 8080, "Protocol": "TCP"}]
    assert IPIdentityPair.from_json(raw) == pair
    assert pair.named_port_specs() == {"dns": "53/UDP", "http": "8080/TCP"}
    assert "NamedPorts" not in IPIdentityPair(pod(1, 5), 1234, node_ip(1), "n", "d/a").to_json()
    raw["NamedPorts"][0]["Port"] = 70000
    try:
        IPIdentityPair.from_json(raw)
    except ValueError as exc:
        assert "70000" in str(exc)
    else:
        raise AssertionError("a port above 65535 was accepted")


def test_a_published_endpoints_named_ports_reach_the_other_node(tmp_path):
    async def main():
        a, b = Node(tmp_path, 1), Node(tmp_path, 2)
        try:
            await a.start()
            await b.start()
            await b.sync.publish([Ep(pod(2, 7), 1002, "default/b", {"http": "8080/TCP", "dns": "53/udp"})])
            await eventually(lambda: a.sync.remote_endpoint("default/b") is not None)
            assert a.sync.remote_endpoint("default/b").named_port_specs() == {"http": "8080/TCP", "dns": "53/UDP"}
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_two_nodes_see_each_others_endpoints_and_node_ips(tmp_path):
    async def main():
        a, b = Node(tmp_path, 1), Node(tmp_path, 2)
        try:
            await a.start()
            await b.start()
            await a.sync.publish([Ep(pod(1, 5), 1001, "default/a")])
            await b.sync.publish([Ep(pod(2, 7), 1002, "default/b"), Ep(pod(2, 8), 0, "default/new")])
            assert await a.store.get(f"{IP_PREFIX}/c1/{pod(1, 5)}") is not None
            await eventually(lambda: net(pod(2, 7)) in a.map.rows and net(pod(1, 5)) in b.map.rows)
            assert a.map.rows[net(pod(2, 7))] == 1002 and a.map.tunnels[net(pod(2, 7))] == node_ip(2)
            assert b.map.rows[net(pod(1, 5))] == 1001 and b.map.tunnels[net(pod(1, 5))] == node_ip(1)
            assert net(pod(2, 8)) not in a.map.rows  # no identity yet: not published
            assert net(pod(1, 5)) not in a.map.rows  # its own endpoint is the endpoint manager's claim
            # node IPs: the other node's is remote-node, without a tunnel
            await eventually(lambda: net(node_ip(2)) in a.map.rows and net(node_ip(1)) in b.map.rows)
            assert a.map.rows[net(node_ip(2))] == reserved.REMOTE_NODE == 6
            assert net(node_ip(2)) not in a.map.tunnels
            assert net(node_ip(1)) not in a.map.rows  # this node's IP: the LOCAL host claim's
            # the other node's router IP (cilium_host) too, reached through its node IP
            await eventually(lambda: net(pod(2, 1)) in a.map.rows)
            assert a.map.rows[net(pod(2, 1))] == reserved.REMOTE_NODE and a.map.tunnels[net(pod(2, 1))] == node_ip(2)
            assert net(pod(1, 1)) not in a.map.rows
            entry = a.ipcache.lookup(pod(2, 7))
            assert entry.source is Source.KVSTORE and entry.tunnel_endpoint == node_ip(2)

            await b.sync.publish([])  # b's endpoint is deleted
            await eventually(lambda: net(pod(2, 7)) not in a.map.rows)
            assert a.sync.status() == {"published": 1, "remote_endpoints": 0, "remote_nodes": 1}

            await b.registry.stop(revoke_lease=True)  # node2 leaves
            await eventually(lambda: net(node_ip(2)) not in a.map.rows and net(pod(2, 1)) not in a.map.rows)
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_a_remote_entry_never_overrides_a_local_claim(tmp_path):
    async def main():
        a, b = Node(tmp_path, 1), Node(tmp_path, 2)
        a.ipcache.upsert(net(pod(1, 9)), 4321, Source.LOCAL)
        try:
            await a.start()
            await b.start()
            # node2 claims an address node1 owns (a stale key, a conflict): node1 keeps its own
            await b.store.put(f"{IP_PREFIX}/c1/{pod(1, 9)}",
                              json.dumps(IPIdentityPair(pod(1, 9), 999, node_ip(2), "node2", "x/y").to_json()))
            await b.sync.publish([Ep(pod(2, 3), 1003, "default/c")])
            await eventually(lambda: net(pod(2, 3)) in a.map.rows)
            assert a.map.rows[net(pod(1, 9))] == 4321 and net(pod(1, 9)) not in a.map.tunnels
            await b.store.delete(f"{IP_PREFIX}/c1/{pod(1, 9)}")  # the key goes: the LOCAL claim stays
            await b.store.delete(f"{IP_PREFIX}/c1/{pod(2, 3)}")
            await eventually(lambda: net(pod(2, 3)) not in a.map.rows)
            assert a.map.rows[net(pod(1, 9))] == 4321
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_a_dead_agents_keys_go_with_its_lease(tmp_path):
    async def main():
        a, b = Node(tmp_path, 1), Node(tmp_path, 2, lease_ttl=0.6)
        try:
            await a.start()
            await b.start()
            await b.sync.publish([Ep(pod(2, 4), 1004, "default/d")])
            await eventually(lambda: net(pod(2, 4)) in a.map.rows)
            for t in b.sync._tasks + b.registry._tasks:  # the agent dies: nobody keeps its leases
                t.cancel()
            await eventually(lambda: net(pod(2, 4)) not in a.map.rows and net(node_ip(2)) not in a.map.rows,
                             timeout=5)
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_a_restart_republishes_and_deletes_keys_of_gone_endpoints(tmp_path):
    async def main():
        a, b = Node(tmp_path, 1), Node(tmp_path, 2)
        try:
            await a.start()
            await b.start()
            await b.sync.publish([Ep(pod(2, 5), 1005, "default/e"), Ep(pod(2, 6), 1006, "default/f")])
            await eventually(lambda: net(pod(2, 6)) in a.map.rows)
            await b.stop()
            b = Node(tmp_path, 2)  # the restarted agent, with a fresh ipcache
            await b.start()
            assert net(pod(2, 6)) in a.map.rows  # kept until the first publish decides
            await b.sync.publish([Ep(pod(2, 5), 1005, "default/e")])  # default/f went meanwhile
            await eventually(lambda: net(pod(2, 6)) not in a.map.rows)
            kv = await b.store.get(f"{IP_PREFIX}/c1/{pod(2, 5)}")
            assert kv is not None and kv.lease == b.sync._lease  # under the new lease
            assert a.map.rows[net(pod(2, 5))] == 1005
        finally:
            await a.stop()
            await b.stop()

    run(main())
