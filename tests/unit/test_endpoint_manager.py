"""EndpointManager without root: a real allocator on the embedded kvstore, real IPAM and
state dir, the datapath's maps and the netlink work as fakes (pilus.testing.fake_datapath, tests/unit/dp_fakes.py)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from dp_fakes import FakePlumbing

from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.manager import EndpointExists, EndpointManager, NodeInfo
from pilus.endpoint.model import EndpointStore
from pilus.endpoint.state import State
from pilus.identity import IdentityAllocator
from pilus.identity.reserved import HOST, LOCAL_IDENTITY_FLAG, MIN_GLOBAL_IDENTITY
from pilus.ipam.hostscope import HostScopeIPAM
from pilus.ipcache import IPCache, Source
from pilus.kvstore import open_store
from pilus.reconcile import ReconcileError
from pilus.testing.fake_datapath import FakeDatapath

ROUTER = IPv4Address("10.200.1.1")
POD_CIDR = IPv4Network("10.200.1.0/24")


class FakePolicy:
    """The PolicySync side the manager calls: it writes the endpoint's policy map."""

    def __init__(self, datapath: FakeDatapath) -> None:
        self.datapath = datapath

    async def endpoint_upserted(self, ep) -> int:
        self.datapath.policy.sync(ep.id, {})
        return 0

    async def endpoint_removed(self, ep) -> None:
        self.datapath.policy.delete(ep.id)


class Node:
    """One node's endpoint manager and the fakes under it; `restart()` builds a new
    manager on the same maps, netns and state dir, as an agent restart does."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.store = open_store(path=tmp / "kv.db", poll_interval=0.02)
        self.identities = IdentityAllocator(self.store, "node1")
        self.datapath = FakeDatapath()
        self.plumbing = FakePlumbing()
        self.manager = self._manager()

    def _manager(self) -> EndpointManager:
        self.ipcache = IPCache(self.datapath.ipcache)
        self.ipcache.upsert(IPv4Network(f"{ROUTER}/32"), HOST, Source.LOCAL)
        return EndpointManager(
            NodeInfo("node1", "default", ROUTER, POD_CIDR),
            self.datapath,
            self.identities,
            HostScopeIPAM(POD_CIDR, reserved=[ROUTER]),
            EndpointStore(self.tmp),
            ipcache=self.ipcache,
            entries=EndpointEntries(self.datapath.endpoints),
            plumbing=self.plumbing,
            policy=FakePolicy(self.datapath),
        )

    async def allocated(self) -> set[int]:
        """Identities allocated in the cluster (the reserved ones aside)."""
        return {i.id for i in await self.identities.list() if i.id >= MIN_GLOBAL_IDENTITY}

    def restart(self) -> EndpointManager:
        self.manager = self._manager()
        return self.manager


def run_node(tmp_path, body):
    async def main():
        node = Node(tmp_path)
        await node.identities.start()
        try:
            await body(node)
        finally:
            await node.identities.stop(revoke_lease=True)
            await node.store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_create_writes_policy_then_entry_then_attaches(tmp_path):
    async def body(n: Node):
        n.datapath.journal.clear()  # the router's entry
        ep = await n.manager.create("default/web", ["app=web"], named_ports={"http": "80"})
        assert ep.state is State.READY and ep.ipv4 in POD_CIDR and ep.named_ports == {"http": "80/TCP"}
        assert ep.netns in n.plumbing.netns and n.plumbing.veths[ep.interface_name] == ep.interface_index
        assert n.datapath.journal == [
            ("policy", "sync", ep.id),  # no pod ever runs without its policy
            ("endpoints", "upsert", ep.ipv4),
            ("ipcache", "upsert", IPv4Network(f"{ep.ipv4}/32")),
            ("programs", "attach", ep.interface_index),
        ]
        assert n.datapath.endpoints.rows[ep.ipv4].identity == ep.identity
        assert n.ipcache.lookup(ep.ipv4).source is Source.LOCAL
        assert [e.id for e in EndpointStore(n.tmp).load_all()] == [ep.id]
        with pytest.raises(EndpointExists):
            await n.manager.create("default/web", [])

    run_node(tmp_path, body)


def test_delete_removes_every_trace(tmp_path):
    async def body(n: Node):
        ep = await n.manager.create("default/web", ["app=web"])
        await n.manager.delete("default/web")
        assert ep.state is State.DISCONNECTED and n.manager.list() == []
        assert n.datapath.endpoints.rows == {} and n.datapath.policy.maps == {}
        assert n.datapath.ipcache.rows == {IPv4Network(f"{ROUTER}/32"): HOST}
        assert n.plumbing.netns == set() and n.plumbing.veths == {} and n.datapath.attached == set()
        assert n.manager.ipam.allocations() == {} and await n.allocated() == set()

    run_node(tmp_path, body)


def test_failed_create_undoes_every_step(tmp_path):
    async def body(n: Node):
        n.datapath.fail_attach = True
        with pytest.raises(OSError, match="no such device"):
            await n.manager.create("default/web", ["app=web"])
        assert n.manager.list() == [] and EndpointStore(n.tmp).load_all() == []
        assert n.datapath.endpoints.rows == {} and n.datapath.policy.maps == {}
        assert n.datapath.ipcache.rows == {IPv4Network(f"{ROUTER}/32"): HOST}
        assert n.plumbing.netns == set() and n.plumbing.veths == {}
        assert n.manager.ipam.allocations() == {} and await n.allocated() == set()

    run_node(tmp_path, body)


def test_a_failed_map_write_fails_the_create_and_stays_visible(tmp_path):
    async def body(n: Node):
        n.datapath.ipcache.fail.add(IPv4Network("10.200.1.2/32"))  # the first pod's address
        with pytest.raises(ReconcileError, match="10.200.1.2/32"):
            await n.manager.create("default/web", ["app=web"])
        assert n.manager.list() == [] and n.datapath.endpoints.rows == {}
        assert n.ipcache.status()["errors"] >= 1

    run_node(tmp_path, body)


def test_a_policy_cidr_never_takes_a_pods_entry_and_comes_back_after_it(tmp_path):
    async def body(n: Node):
        ep = await n.manager.create("default/web", ["app=web"])
        prefix = IPv4Network(f"{ep.ipv4}/32")
        n.ipcache.upsert(prefix, LOCAL_IDENTITY_FLAG | 1, Source.GENERATED)  # as the policy sync does
        assert n.datapath.ipcache.rows[prefix] == ep.identity
        await n.manager.delete("web")
        assert n.datapath.ipcache.rows[prefix] == LOCAL_IDENTITY_FLAG | 1

    run_node(tmp_path, body)


def test_restore_takes_back_live_endpoints_and_prunes_the_rest(tmp_path):
    async def body(n: Node):
        kept = await n.manager.create("default/kept", ["app=web"])
        lost = await n.manager.create("default/lost", ["app=db"])
        n.plumbing.remove_netns(lost)  # its netns went away while the agent was down
        stale = IPv4Address("10.200.1.99")
        n.datapath.ipcache.rows[IPv4Network(f"{stale}/32")] = 4242  # an earlier run's leftover
        restarted = n.restart()
        restored = await restarted.restore()
        assert [ep.name for ep in restored] == ["default/kept"]
        assert restored[0].identity == kept.identity and restored[0].interface_index == kept.interface_index
        assert set(n.datapath.endpoints.rows) == {kept.ipv4}  # the lost one's entry is pruned
        assert lost.interface_name not in n.plumbing.veths
        # ipcache leftovers go when the agent resyncs, once every source has claimed again
        assert IPv4Network(f"{stale}/32") in n.datapath.ipcache.rows
        n.ipcache.resync()
        router, pod = IPv4Network(f"{ROUTER}/32"), IPv4Network(f"{kept.ipv4}/32")
        assert n.datapath.ipcache.rows == {router: HOST, pod: kept.identity}
        assert [e.name for e in EndpointStore(n.tmp).load_all()] == ["default/kept"]

    run_node(tmp_path, body)
