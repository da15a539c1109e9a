"""Cluster-wide identity allocation through the kvstore (Cilium's kvstore mode).

Layout under ``pilus/state/identities/v1``:

* ``id/<ID>`` -> sorted label key (``k8s:a=b;k8s:c=d;``): the *master* key,
  created only if absent; it owns the number;
* ``value/<sorted key>/<node>`` -> ``<ID>``: one *slave* key per node using the
  identity, attached to the node's lease, so a dead node's uses disappear;
* ``locks/<sorted key>`` -> holder: serializes, per label set, "find or create
  the master + write my slave key" against other allocators and against GC
  ("delete the master if no slave key is left"). Held with the node lease so a
  dead holder's lock expires.

Same labels give the same number on every node: under the lock an allocator
first looks for slave keys of other nodes (the number in use), then for a master
it already knows of, and only then creates a new master at a free number
(random in 256..65535, retried on conflict).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

from pilus.identity.labels import RESERVED, LabelError, Labels, parse_labels
from pilus.identity.reserved import (
    MAX_GLOBAL_IDENTITY,
    MIN_GLOBAL_IDENTITY,
    RESERVED_IDENTITIES,
    is_reserved,
    reserved_by_id,
    reserved_by_labels,
)
from pilus.kvstore.base import KeyValue, KVStoreError, LeaseNotFound, Store, WatchEvent
from pilus.kvstore.follow import follow_prefix, keep_lease, stop_loops

__all__ = ["DEFAULT_PREFIX", "Identity", "IdentityAllocator", "IdentityError"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "pilus/state/identities/v1"


class IdentityError(Exception):
    """Identity allocation failed; the message is one line meant for a user."""


@dataclass(frozen=True)
class Identity:
    id: int
    labels: Labels

    @property
    def reserved(self) -> bool:
        return is_reserved(self.id)

    def __str__(self) -> str:
        return f"{self.id} ({self.labels})"


Listener = Callable[[str, Identity], None]


class IdentityAllocator:
    """Allocates global identities for label sets, shared by all nodes of a store.

    ``allocate``/``release`` keep a local reference count per identity; the
    node's slave key exists while the count is above zero. ``list``/``get``
    see every node's identities (from a watched cache, falling back to the store).
    """

    def __init__(
        self,
        store: Store,
        node_name: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_ttl: float = 30.0,
        gc_interval: float = 60.0,
        min_id: int = MIN_GLOBAL_IDENTITY,
        max_id: int = MAX_GLOBAL_IDENTITY,
        lock_timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not node_name or "/" in node_name:
            raise IdentityError(f"node name {node_name!r} must be non-empty and without '/'")
        if not MIN_GLOBAL_IDENTITY <= min_id <= max_id <= MAX_GLOBAL_IDENTITY:
            raise IdentityError(
                f"identity range {min_id}..{max_id} must lie within {MIN_GLOBAL_IDENTITY}..{MAX_GLOBAL_IDENTITY}"
            )
        self.store = store
        self.node_name = node_name
        self.prefix = prefix.rstrip("/")
        self.lease_ttl = lease_ttl
        self.gc_interval = gc_interval
        self.min_id, self.max_id = min_id, max_id
        self.lock_timeout = lock_timeout if lock_timeout is not None else 2 * lease_ttl
        self._rng = rng or random.Random()
        self._id_prefix = f"{self.prefix}/id/"
        self._value_prefix = f"{self.prefix}/value/"
        self._lock_prefix = f"{self.prefix}/locks/"
        # local use
        self._refs: dict[int, int] = {}
        self._held: dict[int, Labels] = {}
        self._held_by_key: dict[str, int] = {}
        # cluster-wide cache of master keys
        self._by_id: dict[int, Labels] = {}
        self._by_key: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self._mutex = asyncio.Lock()
        self._lease: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._lease = await self.store.grant_lease(self.lease_ttl)
        rev = await self._resync()
        self._started = True
        self._tasks = [
            asyncio.create_task(follow_prefix(self.store, self._id_prefix, rev, self._on_id_event, self._resync,
                                              "identity"), name=f"identity-watch-{self.node_name}"),
            asyncio.create_task(keep_lease(self.store, lambda: self._lease, self.lease_ttl, self._recover,
                                           f"identity (node {self.node_name})"),
                                name=f"identity-lease-{self.node_name}"),
            asyncio.create_task(self._gc_loop(), name=f"identity-gc-{self.node_name}"),
        ]

    async def stop(self, *, revoke_lease: bool = False) -> None:
        """Stop background work. With ``revoke_lease`` this node's slave keys go
        at once; otherwise they live until the lease expires, so an agent that
        restarts within the TTL keeps its identities without churn."""
        self._started = False
        await stop_loops(self._tasks)
        if revoke_lease and self._lease is not None:
            with contextlib.suppress(KVStoreError):
                await self.store.revoke_lease(self._lease)
        self._lease = None
        self._refs.clear()
        self._held.clear()
        self._held_by_key.clear()

    def _require_started(self) -> None:
        if not self._started:
            raise IdentityError("identity allocator is not started")

    # ------------------------------------------------------------------ keys

    def _master_key(self, id_: int) -> str:
        return f"{self._id_prefix}{id_}"

    def _slave_key(self, key: str) -> str:
        return f"{self._value_prefix}{key}/{self.node_name}"

    @contextlib.asynccontextmanager
    async def _kv_lock(self, key: str) -> AsyncIterator[None]:
        lock_key = self._lock_prefix + key
        token = f"{self.node_name}/{secrets.token_hex(4)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_timeout
        delay = 0.005
        while not await self.store.create(lock_key, token, lease=self._lease):
            if loop.time() > deadline:
                holder = await self.store.get(lock_key)
                raise IdentityError(
                    f"timed out after {self.lock_timeout:.0f}s waiting for the allocation lock "
                    f"of {key!r} (held by {holder.value if holder else 'nobody now'})"
                )
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, 0.2)
        try:
            yield
        finally:
            held = await self.store.get(lock_key)
            if held is not None and held.value == token:
                await self.store.delete(lock_key)

    # ------------------------------------------------------------------ allocation

    async def allocate(self, labels: Labels | str | Mapping[str, str] | Iterable[str]) -> Identity:
        """The identity for ``labels``: reserved ones by table, others cluster-wide."""
        try:
            labels = parse_labels(labels)
        except LabelError as e:
            raise IdentityError(str(e)) from None
        reserved = reserved_by_labels(labels)
        if reserved is not None:
            return Identity(reserved.id, reserved.labels)
        if not labels:
            raise IdentityError("cannot allocate an identity for an empty label set")
        if labels.has_source(RESERVED):
            bad = ", ".join(str(lbl) for lbl in labels.with_source(RESERVED))
            raise IdentityError(
                f"labels {labels}: reserved label(s) {bad} only form reserved identities "
                "(alone, as in the reserved identity table)"
            )
        self._require_started()
        key = labels.sorted_key()
        async with self._mutex:
            id_ = self._held_by_key.get(key)
            if id_ is not None:
                self._refs[id_] += 1
                return Identity(id_, labels)
            try:
                id_ = await self._allocate_global(key, labels)
            except LeaseNotFound:
                await self._recover_locked()
                id_ = await self._allocate_global(key, labels)
            self._refs[id_] = 1
            self._held[id_] = labels
            self._held_by_key[key] = id_
            return Identity(id_, labels)

    async def _allocate_global(self, key: str, labels: Labels) -> int:
        async with self._kv_lock(key):
            id_ = await self._find_existing(key)
            if id_ is None:
                id_ = await self._create_master(key, labels)
            await self.store.put(self._slave_key(key), str(id_), lease=self._lease)
            return id_

    async def _find_existing(self, key: str) -> int | None:
        """Number already used for ``key`` (call with the key's lock held)."""
        candidates: list[int] = []
        for kv in await self.store.list_prefix(f"{self._value_prefix}{key}/"):
            with contextlib.suppress(ValueError):
                candidates.append(int(kv.value))
        cached = self._by_key.get(key)
        if cached is not None:
            candidates.append(cached)
        for id_ in dict.fromkeys(candidates):
            if not self.min_id <= id_ <= self.max_id:
                continue
            master = await self.store.get(self._master_key(id_))
            if master is not None and master.value == key:
                self._cache_put(id_, key)
                return id_
            if master is None and await self.store.create(self._master_key(id_), key):
                # slaves survived a lost master (GC race or manual delete): restore it
                self._cache_put(id_, key)
                return id_
        return None

    async def _create_master(self, key: str, labels: Labels) -> int:
        taken: set[int] = set()
        for _ in range(64):
            id_ = self._pick_free(taken)
            if id_ is None:
                # the cache may be stale: look at the store before giving up
                fresh = {self._id_of(kv.key) for kv in await self.store.list_prefix(self._id_prefix)}
                taken = {i for i in fresh if i is not None}
                id_ = self._pick_free(taken, use_cache=False)
                if id_ is None:
                    total = self.max_id - self.min_id + 1
                    raise IdentityError(
                        f"no free identity for {labels}: all {total} identities in "
                        f"{self.min_id}..{self.max_id} are in use"
                    )
            if await self.store.create(self._master_key(id_), key):
                self._cache_put(id_, key)
                return id_
            taken.add(id_)
        raise IdentityError(f"could not allocate an identity for {labels}: 64 attempts conflicted")

    def _pick_free(self, taken: set[int], *, use_cache: bool = True) -> int | None:
        used = taken | set(self._by_id) if use_cache else taken
        in_range = sum(1 for i in used if self.min_id <= i <= self.max_id)
        if in_range >= self.max_id - self.min_id + 1:
            return None
        for _ in range(32):
            cand = self._rng.randint(self.min_id, self.max_id)
            if cand not in used:
                return cand
        free = [i for i in range(self.min_id, self.max_id + 1) if i not in used]
        return self._rng.choice(free)

    async def release(self, id_: int, *, collect: bool = False) -> bool:
        """Drop one local reference; True when it was the last (slave key deleted).

        With ``collect``, an identity that no node uses any more is deleted at once
        (what GC would do at its next round), so it leaves ``identity list`` and
        every node's policy now rather than up to ``gc_interval`` later.
        """
        if is_reserved(id_):
            return False
        async with self._mutex:
            refs = self._refs.get(id_)
            if refs is None:
                raise IdentityError(f"identity {id_} is not in use on node {self.node_name}")
            if refs > 1:
                self._refs[id_] = refs - 1
                return False
            labels = self._held.pop(id_)
            del self._refs[id_]
            key = labels.sorted_key()
            self._held_by_key.pop(key, None)
            await self.store.delete(self._slave_key(key))
        if collect:
            master = await self.store.get(self._master_key(id_))
            if master is not None and master.value == key:
                await self._delete_if_unused(master)
        return True

    def refcount(self, id_: int) -> int:
        return self._refs.get(id_, 0)

    # ------------------------------------------------------------------ lookups

    async def get(self, id_: int) -> Identity | None:
        reserved = reserved_by_id(id_)
        if reserved is not None:
            return Identity(reserved.id, reserved.labels)
        labels = self._by_id.get(id_)
        if labels is not None:
            return Identity(id_, labels)
        if not self.min_id <= id_ <= self.max_id:
            return None
        kv = await self.store.get(self._master_key(id_))
        if kv is None:
            return None
        try:
            return Identity(id_, Labels.from_sorted_key(kv.value))
        except LabelError:
            return None

    def cached(self, id_: int) -> Labels | None:
        """The labels of ``id_`` if known without the store (reserved, or in the cache)."""
        reserved = reserved_by_id(id_)
        return reserved.labels if reserved is not None else self._by_id.get(id_)

    def lookup(self, labels: Labels) -> Identity | None:
        """The identity of ``labels`` if known (reserved, or in the cache); no store access."""
        reserved = reserved_by_labels(labels)
        if reserved is not None:
            return Identity(reserved.id, reserved.labels)
        id_ = self._by_key.get(labels.sorted_key())
        return None if id_ is None else Identity(id_, labels)

    async def list(self) -> list[Identity]:
        """Reserved identities and every allocated identity in the store, by id."""
        out = [Identity(r.id, r.labels) for r in RESERVED_IDENTITIES]
        for kv in await self.store.list_prefix(self._id_prefix):
            id_ = self._id_of(kv.key)
            if id_ is None:
                continue
            try:
                out.append(Identity(id_, Labels.from_sorted_key(kv.value)))
            except LabelError:
                log.warning("identity %s: ignoring master key with bad labels %r", id_, kv.value)
        return sorted(out, key=lambda i: i.id)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener("add"|"delete", identity)`` on cluster-wide changes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    # ------------------------------------------------------------------ GC

    async def gc(self) -> int:
        """Delete master keys no node uses (no slave key); returns how many."""
        in_use: set[str] = set()
        for kv in await self.store.list_prefix(self._value_prefix):
            in_use.add(kv.key[len(self._value_prefix) :].rsplit("/", 1)[0])
        deleted = 0
        for master in await self.store.list_prefix(self._id_prefix):
            if master.value not in in_use and await self._delete_if_unused(master):
                deleted += 1
        return deleted

    async def _delete_if_unused(self, master: KeyValue) -> bool:
        """Delete a master key unless this node holds it or any node has a slave key."""
        key = master.value
        if key in self._held_by_key:
            return False
        try:
            async with self._kv_lock(key):
                if await self.store.list_prefix(f"{self._value_prefix}{key}/"):
                    return False
                cur = await self.store.get(master.key)
                if cur is None or cur.mod_revision != master.mod_revision:
                    return False
                if await self.store.delete(master.key):
                    log.info("deleted unused identity %s", master.key)
                    return True
        except IdentityError as e:  # lock held by a stuck node: GC tries again next round
            log.warning("identity GC: %s", e)
        return False

    # ------------------------------------------------------------------ cache

    def _id_of(self, master_key: str) -> int | None:
        try:
            return int(master_key[len(self._id_prefix) :])
        except ValueError:
            return None

    def _notify(self, kind: str, ident: Identity) -> None:
        for cb in list(self._listeners):
            try:
                cb(kind, ident)
            except Exception:
                log.exception("identity listener failed")

    def _cache_put(self, id_: int, key: str) -> None:
        if self._by_id.get(id_) is not None and self._by_key.get(key) == id_:
            return
        try:
            labels = Labels.from_sorted_key(key)
        except LabelError:
            log.warning("identity %s: ignoring master key with bad labels %r", id_, key)
            return
        old = self._by_id.get(id_)
        if old is not None:
            self._by_key.pop(old.sorted_key(), None)
        self._by_id[id_] = labels
        self._by_key[key] = id_
        self._notify("add", Identity(id_, labels))

    def _cache_delete(self, id_: int) -> None:
        labels = self._by_id.pop(id_, None)
        if labels is None:
            return
        if self._by_key.get(labels.sorted_key()) == id_:
            del self._by_key[labels.sorted_key()]
        self._notify("delete", Identity(id_, labels))

    async def _resync(self) -> int:
        rev, kvs = await self.store.snapshot(self._id_prefix)
        seen = set()
        for kv in kvs:
            id_ = self._id_of(kv.key)
            if id_ is not None:
                seen.add(id_)
                self._cache_put(id_, kv.value)
        for id_ in set(self._by_id) - seen:
            self._cache_delete(id_)
        return rev

    def _on_id_event(self, ev: WatchEvent) -> None:
        id_ = self._id_of(ev.key)
        if id_ is not None:
            if ev.type == "put" and ev.value is not None:
                self._cache_put(id_, ev.value)
            else:
                self._cache_delete(id_)

    # ------------------------------------------------------------------ lease

    async def _recover(self) -> None:
        async with self._mutex:
            await self._recover_locked()

    async def _recover_locked(self) -> None:
        """New lease, and rewrite this node's slave keys (and masters GC took meanwhile)."""
        self._lease = await self.store.grant_lease(self.lease_ttl)
        for id_, labels in list(self._held.items()):
            key = labels.sorted_key()
            async with self._kv_lock(key):
                if not await self.store.create(self._master_key(id_), key):
                    cur = await self.store.get(self._master_key(id_))
                    if cur is not None and cur.value != key:
                        log.error(
                            "identity %s of %s was reused for %s while node %s was away",
                            id_,
                            labels,
                            cur.value,
                            self.node_name,
                        )
                await self.store.put(self._slave_key(key), str(id_), lease=self._lease)

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.gc_interval * (0.75 + 0.5 * self._rng.random()))
            try:
                await self.gc()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("identity GC failed: %s", e)
