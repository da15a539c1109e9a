"""Identity allocation through the embedded kvstore: reserved, shared, released, collected."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

import pytest

from pilus.identity import (
    LOCAL_IDENTITY_FLAG,
    MAX_GLOBAL_IDENTITY,
    MIN_GLOBAL_IDENTITY,
    RESERVED_IDENTITIES,
    Identity,
    IdentityAllocator,
    IdentityError,
    Labels,
    endpoint_labels,
    is_local,
    is_reserved,
    parse_labels,
    reserved_by_id,
    reserved_by_labels,
    reserved_by_name,
)
from pilus.kvstore import open_store

PREFIX = "pilus/state/identities/v1"


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(pred, timeout=3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


class Cluster:
    """N allocators, each with its own store client on one database file."""

    def __init__(self, path: Path, n: int, **kw):
        self.path = path
        self.stores = [open_store(path=path, poll_interval=0.02) for _ in range(n)]
        self.allocs = [IdentityAllocator(s, f"node{i + 1}", **kw) for i, s in enumerate(self.stores)]

    async def __aenter__(self):
        for a in self.allocs:
            await a.start()
        return self

    async def __aexit__(self, *exc):
        for a in self.allocs:
            await a.stop(revoke_lease=True)
        for s in self.stores:
            await s.close()


# --------------------------------------------------------------------- reserved data


def test_reserved_table():
    expected = {
        0: "unknown",
        1: "host",
        2: "world",
        3: "unmanaged",
        4: "health",
        5: "init",
        6: "remote-node",
        7: "kube-apiserver",
        8: "ingress",
        9: "world-ipv4",
        10: "world-ipv6",
    }
    assert {r.id: r.name for r in RESERVED_IDENTITIES} == expected
    for id_, name in expected.items():
        r = reserved_by_id(id_)
        assert reserved_by_name(name) is r and reserved_by_name(f"reserved:{name}") is r
        assert reserved_by_labels(r.labels) is r
        assert is_reserved(id_)
        assert f"reserved:{name}" in r.labels
    assert reserved_by_id(7).labels.to_list() == ["reserved:kube-apiserver", "reserved:remote-node"]
    assert reserved_by_labels(parse_labels("reserved:remote-node")).id == 6
    assert reserved_by_labels(parse_labels("reserved:host,node:kubernetes.io/hostname=n1")).id == 1
    assert reserved_by_labels(parse_labels("app=web")) is None
    assert reserved_by_id(11) is None and reserved_by_name("nope") is None
    assert LOCAL_IDENTITY_FLAG == 1 << 24 and is_local(LOCAL_IDENTITY_FLAG | 5) and not is_local(300)
    assert (MIN_GLOBAL_IDENTITY, MAX_GLOBAL_IDENTITY) == (256, 65535)


def test_reserved_allocation(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 1) as c:
            a = c.allocs[0]
            assert await a.allocate("reserved:host") == Identity(1, parse_labels("reserved:host"))
            assert (await a.allocate("reserved:kube-apiserver,reserved:remote-node")).id == 7
            assert (await a.allocate("reserved:world")).id == 2
            assert (await a.get(4)).labels.to_list() == ["reserved:health"]
            assert (await a.get(0)).reserved
            assert await a.release(1) is False
            with pytest.raises(IdentityError, match="reserved label"):
                await a.allocate("reserved:world,app=web")
            with pytest.raises(IdentityError, match="empty label set"):
                await a.allocate("")
            with pytest.raises(IdentityError, match="value must be"):
                await a.allocate("app=bad value")
            ids = [i.id for i in await a.list()]
            assert ids == list(range(11))  # nothing allocated yet
            assert await c.stores[0].list_prefix(PREFIX + "/id/") == []

    run(main())


# --------------------------------------------------------------------- allocation


def test_same_labels_same_id_and_refcount(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 1) as c:
            a, store = c.allocs[0], c.stores[0]
            web = endpoint_labels("default", {"app": "web"})
            i1 = await a.allocate(web)
            assert MIN_GLOBAL_IDENTITY <= i1.id <= MAX_GLOBAL_IDENTITY
            assert await a.allocate(Labels(reversed(list(web)))) == i1
            db = await a.allocate(endpoint_labels("default", {"app": "db"}))
            assert db.id != i1.id
            assert a.refcount(i1.id) == 2
            # kvstore layout as in Cilium's kvstore mode
            master = await store.get(f"{PREFIX}/id/{i1.id}")
            assert master.value == web.sorted_key() and master.lease is None
            slave = await store.get(f"{PREFIX}/value/{web.sorted_key()}/node1")
            assert slave.value == str(i1.id) and slave.lease is not None
            assert await store.list_prefix(f"{PREFIX}/locks/") == []
            assert await a.get(i1.id) == i1
            assert a.lookup(web) == i1
            assert [i.id for i in await a.list()] == sorted([*range(11), i1.id, db.id])

            assert await a.release(i1.id) is False  # one reference left
            assert await store.get(slave.key) is not None
            assert await a.release(i1.id) is True
            assert await store.get(slave.key) is None
            with pytest.raises(IdentityError, match="not in use"):
                await a.release(i1.id)
            # master stays until GC; allocating again reuses the number
            assert (await a.allocate(web)).id == i1.id

    run(main())


def test_two_allocators_agree(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2) as c:
            a1, a2 = c.allocs
            sets = [endpoint_labels("ns", {"app": f"app{i}"}) for i in range(12)]
            first = [await a1.allocate(s) for s in sets[:4]]
            second = [await a2.allocate(s) for s in sets[:4]]
            assert [i.id for i in first] == [i.id for i in second]
            # concurrent allocation of the same new labels from both nodes: one number
            for s in sets[4:]:
                x, y = await asyncio.gather(a1.allocate(s), a2.allocate(s))
                assert x.id == y.id, s
            # and a big concurrent burst in both directions
            r1, r2 = await asyncio.gather(
                asyncio.gather(*(a1.allocate(s) for s in sets)),
                asyncio.gather(*(a2.allocate(s) for s in reversed(sets))),
            )
            assert [i.id for i in r1] == [i.id for i in reversed(r2)]
            assert len({i.id for i in r1}) == len(sets)
            masters = await c.stores[0].list_prefix(f"{PREFIX}/id/")
            assert len(masters) == len(sets)  # no duplicate masters for one label set
            # both caches converge on the cluster-wide view
            want = sorted((i.id, i.labels.sorted_key()) for i in r1)

            async def caches_agree():
                views = [sorted((i, lbls.sorted_key()) for i, lbls in a._by_id.items()) for a in c.allocs]
                return views[0] == views[1] == want

            await eventually(caches_agree)
            assert await a1.list() == await a2.list()

    run(main())


def _child_allocate(path: str, q) -> None:
    async def main():
        store = open_store(path=Path(path))
        a = IdentityAllocator(store, "child-node")
        await a.start()
        ident = await a.allocate(endpoint_labels("default", {"app": "shared"}))
        await a.stop()  # keep the lease: the slave key stays for its TTL
        await store.close()
        return ident.id

    q.put(asyncio.run(main()))


def test_other_process_gets_same_id(tmp_path):
    path = tmp_path / "kv.db"

    async def main():
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=_child_allocate, args=(str(path), q))
        child.start()
        child_id = await asyncio.to_thread(q.get, True, 15)
        await asyncio.to_thread(child.join, 10)
        assert child.exitcode == 0
        async with Cluster(path, 1) as c:
            ident = await c.allocs[0].allocate(endpoint_labels("default", {"app": "shared"}))
            assert ident.id == child_id
            assert (await c.allocs[0].get(child_id)).labels == ident.labels
            users = await c.stores[0].list_prefix(f"{PREFIX}/value/{ident.labels.sorted_key()}/")
            assert sorted(kv.key.rsplit("/", 1)[1] for kv in users) == ["child-node", "node1"]

    run(main(), 30)


# --------------------------------------------------------------------- release and GC


def test_release_and_gc(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2) as c:
            a1, a2 = c.allocs
            labels = parse_labels("app=web")
            ident = await a1.allocate(labels)
            assert (await a2.allocate(labels)).id == ident.id
            await a1.release(ident.id)
            assert await a1.gc() == 0 and await a2.gc() == 0  # node2 still uses it
            assert (await a1.get(ident.id)) is not None
            await a2.release(ident.id)
            assert await a1.gc() == 1
            assert await c.stores[0].get(f"{PREFIX}/id/{ident.id}") is None

            async def gone():
                return await a2.get(ident.id) is None

            await eventually(gone)
            assert a2.lookup(labels) is None
            assert await a1.gc() == 0

    run(main())


def test_release_with_collect_deletes_only_what_nobody_uses(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2) as c:
            a1, a2 = c.allocs
            shared, mine = parse_labels("app=shared"), parse_labels("app=mine")
            s = await a1.allocate(shared)
            await a2.allocate(shared)
            m = await a1.allocate(mine)
            await a1.allocate(mine)
            assert await a1.release(m.id, collect=True) is False  # one local reference left
            assert await a1.release(s.id, collect=True) is True
            assert await c.stores[0].get(f"{PREFIX}/id/{s.id}") is not None  # node2 still uses it
            assert await a1.release(m.id, collect=True) is True
            assert await c.stores[0].get(f"{PREFIX}/id/{m.id}") is None  # deleted now, not at GC
            assert m.id not in {i.id for i in await a2.list()}
            assert (await a1.allocate(mine)).labels == mine  # and can be allocated again

    run(main())


def test_dead_node_identities_are_collected(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2, lease_ttl=0.8) as c:
            a1, a2 = c.allocs
            ident = await a1.allocate(parse_labels("app=lonely"))
            kept = await a2.allocate(parse_labels("app=kept"))
            await a1.stop()  # "crash": no revoke, no more keepalives
            assert await a2.gc() == 0  # node1's slave key is still leased
            await asyncio.sleep(1.0)
            assert await a2.gc() == 1
            assert await c.stores[1].get(f"{PREFIX}/id/{ident.id}") is None
            assert (await a2.get(kept.id)) == kept  # kept alive by node2's keepalive

    run(main())


def test_lease_loss_is_recovered(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2, lease_ttl=0.6) as c:
            (a, other), store = c.allocs, c.stores[0]
            labels = parse_labels("app=phoenix")
            ident = await a.allocate(labels)
            slave = f"{PREFIX}/value/{labels.sorted_key()}/node1"
            await store.revoke_lease(a._lease)  # lost behind the allocator's back
            assert await store.get(slave) is None
            assert await a.gc() == 0  # never collects what this node holds
            assert await other.gc() == 1  # another node collects the master meanwhile

            async def restored():
                kv = await store.get(slave)
                return kv is not None and kv.value == str(ident.id)

            await eventually(restored)
            master = await store.get(f"{PREFIX}/id/{ident.id}")
            assert master is not None and master.value == labels.sorted_key()
            assert (await a.allocate(labels)).id == ident.id

    run(main())


def test_exhaustion_and_listeners(tmp_path):
    async def main():
        async with Cluster(tmp_path / "kv.db", 2, min_id=300, max_id=302) as c:
            a1, a2 = c.allocs
            seen: list[tuple[str, int]] = []
            unsubscribe = a2.subscribe(lambda kind, ident: seen.append((kind, ident.id)))
            ids = [(await a1.allocate(parse_labels(f"n={i}"))).id for i in range(3)]
            assert sorted(ids) == [300, 301, 302]
            with pytest.raises(IdentityError, match=r"all 3 identities in 300\.\.302 are in use"):
                await a2.allocate(parse_labels("n=3"))

            async def all_seen():
                return sorted(i for k, i in seen if k == "add") == [300, 301, 302]

            await eventually(all_seen)
            await a1.release(ids[0])
            assert await a2.gc() == 1

            async def deleted():
                return ("delete", ids[0]) in seen

            await eventually(deleted)
            unsubscribe()
            assert (await a2.allocate(parse_labels("n=3"))).id == ids[0]

    run(main())


def test_allocator_arguments(tmp_path):
    store = open_store(path=tmp_path / "kv.db")
    with pytest.raises(IdentityError, match="node name"):
        IdentityAllocator(store, "a/b")
    with pytest.raises(IdentityError, match="range"):
        IdentityAllocator(store, "n", min_id=10)

    async def main():
        a = IdentityAllocator(store, "n")
        with pytest.raises(IdentityError, match="not started"):
            await a.allocate("app=x")
        await store.close()

    run(main())
