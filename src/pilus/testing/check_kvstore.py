"""Conformance check for kvstore backends.

``await check_kvstore(store)`` exercises every method of the
:class:`pilus.kvstore.Store` contract under a fresh random prefix (so it can run
against a shared etcd) and raises :class:`ConformanceError` naming the first
broken promise. It cleans up its keys and leases. Lease expiry is checked with
``lease_ttl`` (default 1 s; use more for backends with coarse TTLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator

from pilus.kvstore.base import KVStoreError, LeaseNotFound, Store, WatchEvent

__all__ = ["ConformanceError", "check_kvstore"]


class ConformanceError(AssertionError):
    pass


def _expect(cond: object, what: str) -> None:
    if not cond:
        raise ConformanceError(what)


async def _take(it: AsyncIterator[WatchEvent], n: int, timeout: float) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        try:
            out.append(await asyncio.wait_for(it.__anext__(), max(left, 0.001)))
        except TimeoutError:
            raise ConformanceError(f"watch delivered {len(out)} of {n} events within {timeout}s: {out}") from None
    return out


async def _quiet(it: AsyncIterator[WatchEvent], wait: float) -> list[WatchEvent]:
    """Events arriving within ``wait`` seconds (the iterator is consumed/closed)."""
    out: list[WatchEvent] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for ev in it:
                out.append(ev)
    return out


def _summary(evs: list[WatchEvent]) -> list[tuple[str, str, str | None]]:
    return [(e.type, e.key, e.value) for e in evs]


async def check_kvstore(
    store: Store, *, lease_ttl: float = 1.0, watch_timeout: float = 5.0, root: str = "conformance"
) -> None:
    p = f"{root}/{secrets.token_hex(4)}/"
    leases: list[int] = []
    try:
        await _check_basic(store, p)
        await _check_prefixes(store, p + "pfx/")
        await _check_watch(store, p + "watch/", watch_timeout)
        await _check_leases(store, p + "lease/", leases, watch_timeout)
        await _check_expiry(store, p + "expiry/", lease_ttl, leases, watch_timeout)
        status = await store.status()
        for field in ("backend", "path", "revision", "keys", "ok"):
            _expect(field in status, f"status() lacks {field!r}: {status}")
        _expect(status["ok"] is True, f"status() not ok: {status}")
        _expect(
            status["revision"] == await store.revision(),
            "status()['revision'] differs from revision() with no writes in between",
        )
    finally:
        for lease in leases:
            with contextlib.suppress(KVStoreError):
                await store.revoke_lease(lease)
        with contextlib.suppress(KVStoreError):
            await store.delete_prefix(p)


async def _check_basic(store: Store, p: str) -> None:
    r0 = await store.revision()
    _expect(isinstance(r0, int) and r0 >= 0, f"revision() must be a non-negative int, got {r0!r}")
    _expect(await store.get(p + "missing") is None, "get() of a missing key must be None")

    r1 = await store.put(p + "a", "1")
    _expect(r1 > r0, f"put() must return a revision above {r0}, got {r1}")
    _expect(await store.revision() == r1, "revision() must equal the last put()'s revision")
    kv = await store.get(p + "a")
    _expect(kv is not None and kv.value == "1", f"get() after put() returned {kv}")
    _expect(kv.key == p + "a" and kv.mod_revision == r1 and kv.lease is None, f"bad KeyValue {kv}")

    r2 = await store.put(p + "a", "2")
    _expect(r2 > r1, "overwriting put() must bump the revision")
    kv = await store.get(p + "a")
    _expect(kv.value == "2" and kv.mod_revision == r2, f"overwrite not visible: {kv}")

    _expect(await store.put(p + "empty", "") > r2, "put() of an empty value")
    kv = await store.get(p + "empty")
    _expect(kv is not None and kv.value == "", f"empty value must round-trip, got {kv}")
    uni = "välue ✓ ; = / \n"
    await store.put(p + "ünï/κey", uni)
    kv = await store.get(p + "ünï/κey")
    _expect(kv is not None and kv.value == uni, f"unicode key/value must round-trip, got {kv}")

    # create-if-absent
    _expect(await store.create(p + "c", "first") is True, "create() of an absent key must be True")
    rev = await store.revision()
    _expect(await store.create(p + "c", "second") is False, "create() of a present key must be False")
    _expect((await store.get(p + "c")).value == "first", "failed create() must not overwrite")
    _expect(await store.revision() == rev, "failed create() must not bump the revision")
    results = await asyncio.gather(*(store.create(p + "race", str(i)) for i in range(8)))
    _expect(results.count(True) == 1, f"8 concurrent create()s: exactly one must win, got {results}")

    # delete
    _expect(await store.delete(p + "c") is True, "delete() of a present key must be True")
    rev = await store.revision()
    _expect(await store.delete(p + "c") is False, "delete() of a missing key must be False")
    _expect(await store.revision() == rev, "delete() of a missing key must not bump the revision")
    _expect(await store.get(p + "c") is None, "deleted key still readable")
    _expect(await store.create(p + "c", "again") is True, "create() after delete() must succeed")


async def _check_prefixes(store: Store, p: str) -> None:
    keys = [p + k for k in ("b", "a", "a/x", "ab", "a0", "z", "é")]
    for i, k in enumerate(keys):
        await store.put(k, str(i))
    await store.put(p[:-1] + "-sibling", "x")  # shares the prefix minus its slash
    listed = await store.list_prefix(p)
    _expect([kv.key for kv in listed] == sorted(keys), f"list_prefix() order/contents: {listed}")
    _expect(
        [kv.key for kv in await store.list_prefix(p + "a")] == sorted([p + "a", p + "a/x", p + "ab", p + "a0"]),
        "list_prefix() of a key prefix must include the key and its extensions only",
    )
    _expect(await store.list_prefix(p + "nothing/") == [], "list_prefix() with no match must be []")
    rev, snap = await store.snapshot(p)
    _expect(rev == await store.revision(), "snapshot() revision must be the current revision")
    _expect(snap == listed, "snapshot() must list the same keys as list_prefix()")

    rev = await store.revision()
    _expect(await store.delete_prefix(p + "a") == 4, "delete_prefix() must return the count")
    _expect(await store.revision() == rev + 1, "delete_prefix() must be one revision")
    _expect(await store.delete_prefix(p + "a") == 0, "delete_prefix() with no match must return 0")
    _expect(await store.revision() == rev + 1, "empty delete_prefix() must not bump the revision")
    _expect(
        [kv.key for kv in await store.list_prefix(p)] == sorted([p + "b", p + "z", p + "é"]),
        "delete_prefix() deleted the wrong keys",
    )
    _expect(await store.get(p[:-1] + "-sibling") is not None, "delete_prefix() overreached")
    await store.delete(p[:-1] + "-sibling")

    # a batch: puts and deletes at one revision (below etcd's default 128 operations)
    rev = await store.revision()
    batch = {p + f"m/{i:03d}": str(i) for i in range(100)}
    r = await store.put_many(batch, deletes=[p + "b", p + "missing"])
    _expect(r == rev + 1 == await store.revision(), f"put_many() must be one revision, {rev} -> {r}")
    _expect(await store.get(p + "b") is None, "put_many() did not delete")
    listed = await store.list_prefix(p + "m/")
    _expect([kv.value for kv in listed] == [str(i) for i in range(100)], "put_many() did not put")
    _expect(all(kv.mod_revision == r for kv in listed), "put_many() keys must carry its revision")


async def _check_watch(store: Store, p: str, timeout: float) -> None:
    start = await store.revision()
    live = store.watch_prefix(p)  # from now
    try:
        await store.put(p + "k1", "v1")
        await store.put(p[:-1] + "-outside", "no")  # not under the prefix
        await store.put(p + "k2", "v2")
        await store.put(p + "k1", "v1b")
        await store.create(p + "k1", "ignored")  # fails: no event
        await store.delete(p + "k2")
        await store.delete(p + "never")  # nothing deleted: no event
        await store.put(p + "k3", "v3")
        await store.delete_prefix(p)
        expected = [
            ("put", p + "k1", "v1"),
            ("put", p + "k2", "v2"),
            ("put", p + "k1", "v1b"),
            ("delete", p + "k2", None),
            ("put", p + "k3", "v3"),
            ("delete", p + "k1", None),
            ("delete", p + "k3", None),
        ]
        got = await _take(live, len(expected), timeout)
        _expect(_summary(got) == expected, f"watch events {_summary(got)} != {expected}")
        revs = [e.revision for e in got]
        _expect(
            all(a < b for a, b in zip(revs[:5], revs[1:6], strict=True)) and revs[5] == revs[6],
            f"watch revisions must increase per transaction (delete_prefix is one): {revs}",
        )
        _expect(revs[-1] == await store.revision(), "last event revision must be the store's")
        extra = await _quiet(live, 0.3)
        _expect(extra == [], f"watch delivered unexpected events {extra}")
    finally:
        await live.aclose()
    await store.delete(p[:-1] + "-outside")

    # replay from a revision: everything after `start`, then live events
    replay = store.watch_prefix(p, start_revision=start)
    try:
        got = await _take(replay, 7, timeout)
        _expect(_summary(got) == expected, f"replayed events {_summary(got)} != {expected}")
        await store.put(p + "k4", "v4")
        got = await _take(replay, 1, timeout)
        _expect(_summary(got) == [("put", p + "k4", "v4")], f"live event after replay: {got}")
    finally:
        await replay.aclose()

    # replay from the middle: events strictly after start_revision
    mid = revs[2]
    part = store.watch_prefix(p, start_revision=mid)
    try:
        got = await _take(part, 5, timeout)
        _expect(_summary(got) == expected[3:] + [("put", p + "k4", "v4")], f"replay after {mid}: {got}")
    finally:
        await part.aclose()
    await store.delete_prefix(p)


async def _check_leases(store: Store, p: str, leases: list[int], timeout: float) -> None:
    lease = await store.grant_lease(30)
    leases.append(lease)
    other = await store.grant_lease(30)
    leases.append(other)
    _expect(lease != other, "grant_lease() must return distinct ids")
    await store.put(p + "a", "1", lease=lease)
    _expect(await store.create(p + "b", "2", lease=lease) is True, "create() with a lease")
    await store.put(p + "c", "3", lease=other)
    await store.put(p + "d", "4")
    kv = await store.get(p + "a")
    _expect(kv.lease == lease, f"KeyValue.lease must be the lease id, got {kv}")
    await store.keepalive(lease)

    # a put without a lease detaches the key from its lease (etcd semantics)
    await store.put(p + "b", "2b")
    _expect((await store.get(p + "b")).lease is None, "put() without lease must clear the lease")

    w = store.watch_prefix(p)
    try:
        await store.revoke_lease(lease)
        got = await _take(w, 1, timeout)
        _expect(_summary(got) == [("delete", p + "a", None)], f"revoke must delete its keys: {got}")
    finally:
        await w.aclose()
    leases.remove(lease)
    _expect(await store.get(p + "a") is None, "key of a revoked lease still present")
    _expect(await store.get(p + "b") is not None, "key detached from the lease was deleted")
    _expect(await store.get(p + "c") is not None, "revoke deleted another lease's key")
    for what, call in (
        ("keepalive()", store.keepalive(lease)),
        ("revoke_lease()", store.revoke_lease(lease)),
        ("put()", store.put(p + "x", "x", lease=lease)),
        ("create()", store.create(p + "x", "x", lease=lease)),
        ("put() with a never-granted lease", store.put(p + "x", "x", lease=987654321)),
    ):
        try:
            await call
        except LeaseNotFound:
            pass
        else:
            raise ConformanceError(f"{what} with a revoked lease must raise LeaseNotFound")
    _expect(await store.get(p + "x") is None, "a put() with a dead lease must not write")
    await store.delete_prefix(p)


async def _check_expiry(store: Store, p: str, ttl: float, leases: list[int], timeout: float) -> None:
    lease = await store.grant_lease(ttl)
    leases.append(lease)
    await store.put(p + "k", "v", lease=lease)
    # kept alive for 2 TTLs by renewing every TTL/4
    t_end = time.monotonic() + 2 * ttl
    while time.monotonic() < t_end:
        await asyncio.sleep(ttl / 4)
        await store.keepalive(lease)
    _expect(await store.get(p + "k") is not None, "key of a kept-alive lease expired")

    w = store.watch_prefix(p)
    try:
        t0 = time.monotonic()
        got = await _take(w, 1, ttl + timeout)
        waited = time.monotonic() - t0
        _expect(
            _summary(got) == [("delete", p + "k", None)],
            f"expiry of a lease must delete its keys (watch saw {got})",
        )
        _expect(waited >= ttl * 0.5, f"lease of TTL {ttl}s expired after only {waited:.2f}s")
    finally:
        await w.aclose()
    _expect(await store.get(p + "k") is None, "key of an expired lease still readable")
    try:
        await store.keepalive(lease)
    except LeaseNotFound:
        leases.remove(lease)
    else:
        raise ConformanceError("keepalive() of an expired lease must raise LeaseNotFound")
