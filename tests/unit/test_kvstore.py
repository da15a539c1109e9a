"""Embedded kvstore: conformance, watches across processes, leases with short TTLs."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from pilus.kvstore import (
    Compacted,
    KVStoreError,
    LeaseNotFound,
    Store,
    WatchEvent,
    open_store,
    prefix_end,
)
from pilus.testing.check_kvstore import check_kvstore


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def take(it, n, timeout=5.0) -> list[WatchEvent]:
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            out.append(await it.__anext__())
    return out


def test_conformance_embedded(tmp_path: Path):
    async def main():
        store = open_store("embedded", path=tmp_path / "kv.db")
        assert isinstance(store, Store)
        try:
            await check_kvstore(store, lease_ttl=0.4)
        finally:
            await store.close()

    run(main())


def test_open_store_errors(tmp_path: Path):
    with pytest.raises(KVStoreError, match=r"unknown kvstore backend 'etcd3' \(choices: embedded, etcd\)"):
        open_store("etcd3", path=tmp_path / "x")
    with pytest.raises(KVStoreError, match="needs a path"):
        open_store("embedded")


def test_file_is_wal_and_schema_shared(tmp_path: Path):
    async def main():
        a = open_store(path=tmp_path / "kv.db")
        b = open_store(path=tmp_path / "kv.db")  # second client, same file
        await a.put("k", "v")
        assert (await b.get("k")).value == "v"
        assert await b.revision() == await a.revision() == 1
        st = await b.status()
        assert st["backend"] == "embedded" and st["keys"] == 1 and st["ok"] is True
        await a.close()
        await b.close()
        with pytest.raises(KVStoreError, match="closed"):
            await a.get("k")

    run(main())
    conn = sqlite3.connect(tmp_path / "kv.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_watch_ends_when_store_closes(tmp_path: Path):
    async def main():
        store = open_store(path=tmp_path / "kv.db")
        w = store.watch_prefix("a/")

        async def consume():
            return [ev async for ev in w]

        task = asyncio.create_task(consume())
        await store.put("a/1", "x")
        await asyncio.sleep(0.3)
        await store.close()
        events = await asyncio.wait_for(task, 2)
        assert [(e.type, e.key) for e in events] == [("put", "a/1")]

    run(main())


def test_watch_compacted_history(tmp_path: Path):
    async def main():
        store = open_store(path=tmp_path / "kv.db", event_retention=10)
        for i in range(130):
            await store.put(f"k/{i % 3}", str(i))
        assert (await store.status())["compacted"] > 0
        w = store.watch_prefix("k/", start_revision=1)
        with pytest.raises(Compacted, match="compacted"):
            await w.__anext__()
        # recent history is still there
        rev = await store.revision()
        recent = store.watch_prefix("k/", start_revision=rev - 5)
        evs = await take(recent, 5)
        assert [e.revision for e in evs] == list(range(rev - 4, rev + 1))
        await recent.aclose()
        await store.close()

    run(main())


def test_watch_does_not_block_the_loop(tmp_path: Path):
    async def main():
        store = open_store(path=tmp_path / "kv.db", poll_interval=0.05)
        w = store.watch_prefix("x/")
        task = asyncio.create_task(take(w, 1, timeout=3))
        ticks = 0
        t_end = time.monotonic() + 0.5
        while time.monotonic() < t_end:
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 10  # the loop kept running while the watch polled
        await store.put("x/1", "1")
        assert [e.key for e in await task] == ["x/1"]
        await w.aclose()
        await store.close()

    run(main())


# --------------------------------------------------------------------- leases


def test_lease_expiry_timing(tmp_path: Path):
    async def main():
        store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        lease = await store.grant_lease(0.3)
        await store.put("l/a", "1", lease=lease)
        await store.put("l/b", "2", lease=lease)
        await store.put("l/c", "3")
        w = store.watch_prefix("l/")
        t0 = time.monotonic()
        evs = await take(w, 2, timeout=3)
        elapsed = time.monotonic() - t0
        assert [(e.type, e.key) for e in evs] == [("delete", "l/a"), ("delete", "l/b")]
        assert evs[0].revision == evs[1].revision  # one expiry, one revision
        assert 0.25 <= elapsed < 2.0, elapsed
        assert [kv.key for kv in await store.list_prefix("l/")] == ["l/c"]
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)
        await w.aclose()
        await store.close()

    run(main())


def test_expired_lease_invisible_to_reads_without_writes(tmp_path: Path):
    """A read sweeps: an expired key is never returned, even if nobody wrote since."""

    async def main():
        a = open_store(path=tmp_path / "kv.db")
        b = open_store(path=tmp_path / "kv.db")
        lease = await a.grant_lease(0.2)
        await a.put("k", "v", lease=lease)
        assert (await b.get("k")).lease == lease
        await asyncio.sleep(0.3)
        assert await b.get("k") is None
        assert await b.list_prefix("") == []
        await a.close()
        await b.close()

    run(main())


def test_keepalive_from_another_client(tmp_path: Path):
    async def main():
        a = open_store(path=tmp_path / "kv.db")
        b = open_store(path=tmp_path / "kv.db")
        lease = await a.grant_lease(0.3)
        await a.put("k", "v", lease=lease)
        for _ in range(5):
            await asyncio.sleep(0.1)
            await b.keepalive(lease)
        assert await a.get("k") is not None
        await b.revoke_lease(lease)
        assert await a.get("k") is None
        with pytest.raises(LeaseNotFound):
            await a.revoke_lease(lease)
        with pytest.raises(KVStoreError, match="positive"):
            await a.grant_lease(0)
        await a.close()
        await b.close()

    run(main())


# --------------------------------------------------------------------- processes


def _child_writer(path: str, n: int) -> None:
    async def main():
        store = open_store(path=Path(path))
        lease = await store.grant_lease(30)
        for i in range(n):
            await store.put(f"proc/{i}", f"child-{i}")
        await store.put("proc/leased", "x", lease=lease)
        await store.delete("proc/0")
        await store.close()

    asyncio.run(main())


def _child_racer(path: str, key: str, q) -> None:
    async def main():
        store = open_store(path=Path(path))
        won = [await store.create(f"{key}/{i}", "child") for i in range(50)]
        await store.close()
        q.put(won)

    asyncio.run(main())


def test_two_processes_watch(tmp_path: Path):
    path = tmp_path / "kv.db"

    async def main():
        store = open_store(path=path)
        await store.put("other", "1")
        w = store.watch_prefix("proc/")
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_child_writer, args=(str(path), 3))
        child.start()
        try:
            evs = await take(w, 5, timeout=15)
        finally:
            await asyncio.to_thread(child.join, 10)
        assert child.exitcode == 0
        assert [(e.type, e.key, e.value) for e in evs] == [
            ("put", "proc/0", "child-0"),
            ("put", "proc/1", "child-1"),
            ("put", "proc/2", "child-2"),
            ("put", "proc/leased", "x"),
            ("delete", "proc/0", None),
        ]
        revs = [e.revision for e in evs]
        assert revs == sorted(revs) and len(set(revs)) == 5
        assert [kv.key for kv in await store.list_prefix("proc/")] == [
            "proc/1",
            "proc/2",
            "proc/leased",
        ]
        await w.aclose()
        await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_two_processes_create_is_atomic(tmp_path: Path):
    path = tmp_path / "kv.db"

    async def main():
        store = open_store(path=path)
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        child = ctx.Process(target=_child_racer, args=(str(path), "race", q))
        child.start()
        mine = [await store.create(f"race/{i}", "parent") for i in range(50)]
        theirs = await asyncio.to_thread(q.get, True, 15)
        await asyncio.to_thread(child.join, 10)
        assert child.exitcode == 0
        for i, (m, t) in enumerate(zip(mine, theirs, strict=True)):
            assert m != t, f"key race/{i}: parent {m}, child {t}"
            owner = (await store.get(f"race/{i}")).value
            assert owner == ("parent" if m else "child")
        await store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_prefix_end():
    assert prefix_end("a/") == "a0"
    assert prefix_end("") is None
    assert prefix_end("a\U0010ffff") == "b"
    assert prefix_end("\ud7ff") == "\ue000"


def test_etcd_row_takes_its_options():
    from pilus.kvstore import store_options
    from pilus.kvstore.etcd import EtcdStore

    opts = store_options("etcd", [("etcd.address", "http://10.0.0.1:2379")])
    assert opts == {"address": "http://10.0.0.1:2379"}
    store = open_store("etcd", path="/ignored/kvstore.db", **opts)
    assert isinstance(store, EtcdStore) and store.address == "http://10.0.0.1:2379"
    assert open_store("etcd", address="10.0.0.2:2379").address == "http://10.0.0.2:2379"
    for bad in [("foo", "1"), ("embedded.address", "x"), ("etcd.nope", "x")]:
        with pytest.raises(KVStoreError, match="unknown kvstore option"):
            store_options("etcd", [bad])
    with pytest.raises(KVStoreError, match="unknown kvstore option"):
        store_options("embedded", [("etcd.address", "x")])


def test_etcd_unreachable_is_one_line_naming_the_address():
    import socket

    with socket.socket() as s:  # a port nobody listens on (bound, not listening)
        s.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{s.getsockname()[1]}"

        async def main():
            store = open_store("etcd", address=address, timeout=2)
            try:
                with pytest.raises(KVStoreError) as err:
                    await store.put("k", "v")
                status = await store.status()
            finally:
                await store.close()
            return str(err.value), status

        message, status = asyncio.run(main())
    assert message.startswith(f"etcd at {address} is unreachable") and "\n" not in message
    assert status["ok"] is False and status["backend"] == "etcd" and address in status["error"]
