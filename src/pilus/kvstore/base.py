"""The kvstore interface shared by every backend.

The shape follows etcd v3 so that an etcd backend can implement it without
pretending: a global revision bumped by every write transaction, keys with a
``mod_revision`` and an optional lease, create-if-absent, watches that replay
from a revision, and leases with a TTL whose expiry deletes their keys.

Revision semantics (all backends):

* every successful write (put, create that created, delete that deleted,
  delete_prefix that deleted something, revoke/expiry that deleted keys) is one
  transaction and bumps the store revision by exactly one; writes that change
  nothing (failed create, delete of a missing key) do not bump it;
* ``watch_prefix(prefix, start_revision=R)`` yields every event with revision
  ``> R`` (so ``rev, kvs = await store.snapshot(p)`` followed by
  ``watch_prefix(p, rev)`` loses nothing); ``None`` means "from the revision
  current when ``watch_prefix`` is called";
* events of one transaction come in the order they were made; a watch whose
  start revision has been trimmed from history raises :class:`Compacted`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "Compacted",
    "KVStoreError",
    "KeyValue",
    "LeaseNotFound",
    "Store",
    "WatchEvent",
    "prefix_end",
]


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str
    mod_revision: int
    lease: int | None


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: str
    value: str | None
    revision: int


class KVStoreError(Exception):
    """Any kvstore failure; the message is one line meant for a user."""


class LeaseNotFound(KVStoreError):
    """The lease does not exist (never granted, revoked, or expired)."""


class Compacted(KVStoreError):
    """A watch asked for history that is no longer kept."""


@runtime_checkable
class Store(Protocol):
    async def get(self, key: str) -> KeyValue | None: ...

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        """Set ``key``; returns the new store revision. Raises LeaseNotFound."""
        ...

    async def create(self, key: str, value: str, lease: int | None = None) -> bool:
        """Set ``key`` only if it does not exist (atomic); True if created."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def put_many(self, puts: Mapping[str, str], deletes: Iterable[str] = ()) -> int:
        """Set ``puts`` and delete ``deletes`` (no leases) as one transaction; returns the
        new revision. etcd limits a transaction's operations (``--max-txn-ops``, 128 by
        default): a larger batch is several transactions, in key order."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; returns how many."""
        ...

    async def list_prefix(self, prefix: str) -> list[KeyValue]:
        """Every key starting with ``prefix``, sorted by key."""
        ...

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """``(revision, list_prefix(prefix))`` read atomically, to start a watch from."""
        ...

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> AsyncIterator[WatchEvent]: ...

    async def grant_lease(self, ttl: float) -> int: ...

    async def keepalive(self, lease_id: int) -> None:
        """Renew the lease for another TTL. Raises LeaseNotFound if expired/revoked."""
        ...

    async def revoke_lease(self, lease_id: int) -> None:
        """Delete the lease and its keys. Raises LeaseNotFound if unknown."""
        ...

    async def revision(self) -> int: ...

    async def status(self) -> dict:
        """At least: backend, path, revision, keys, ok."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise KVStoreError(f"kvstore key must be a non-empty string, got {key!r}")


def check_value(value: str) -> None:
    if not isinstance(value, str):
        raise KVStoreError(f"kvstore value must be a string, got {type(value).__name__}")


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``.

    None when there is no such bound (empty prefix, or only U+10FFFF chars).
    Code-point order equals UTF-8 byte order, so this works for SQL ranges too.
    """
    p = prefix
    while p:
        last = ord(p[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # skip surrogates, they are not valid in UTF-8
                nxt = 0xE000
            return p[:-1] + chr(nxt)
        p = p[:-1]
    return None
