"""Embedded kvstore: one SQLite file (WAL mode) shared by every agent on a machine.

Layout:

* ``meta(name, value)``: ``revision`` (global, bumped once per write transaction)
  and ``compacted`` (events with ``rev <= compacted`` have been trimmed);
* ``kv(key, value, create_rev, mod_rev, lease)``;
* ``events(id, rev, type, key, value)``: the change log watches poll by revision;
* ``leases(id, ttl, expires_at)``: ``expires_at`` is wall-clock seconds, so that
  every process on the machine agrees on it.

Every write runs in one ``BEGIN IMMEDIATE`` transaction. Before its own change it
sweeps expired leases (their keys are deleted and logged as delete events under
their own revision), so expiry is enforced by whichever client touches the store
first; reads sweep too when an expired lease exists, and watches sweep while
polling, so keys disappear even when nobody writes.

All SQLite calls run on one worker thread per store object (a single-thread
executor owning the connection), so the event loop never waits on a file lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pilus.kvstore.base import (
    Compacted,
    KeyValue,
    KVStoreError,
    LeaseNotFound,
    WatchEvent,
    check_key,
    check_value,
    prefix_end,
)

__all__ = ["EmbeddedStore"]

T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('compacted', 0);
CREATE TABLE IF NOT EXISTS kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev    INTEGER NOT NULL,
    lease      INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    rev   INTEGER NOT NULL,
    type  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT
);
CREATE INDEX IF NOT EXISTS events_rev ON events (rev);
CREATE TABLE IF NOT EXISTS leases (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    ttl        REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires_at);
"""


def _range_sql(prefix: str) -> tuple[str, tuple[str, ...]]:
    """SQL condition on ``key`` selecting keys that start with ``prefix``."""
    if not prefix:
        return "1", ()
    end = prefix_end(prefix)
    if end is None:
        return "key >= ?", (prefix,)
    return "key >= ? AND key < ?", (prefix, end)



class EmbeddedStore:
    """The ``embedded`` backend. Construct with :func:`pilus.kvstore.open_store`."""

    backend = "embedded"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout: float = 10.0,
        poll_interval: float = 0.1,
        event_retention: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self.event_retention = max(1, int(event_retention))
        self._busy_ms = int(busy_timeout * 1000)
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pilus-kvstore")
        self._read_lock = threading.Lock()
        self._read_conn: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
            self._init_schema()
        except sqlite3.Error as e:
            self._executor.shutdown(wait=False)
            raise KVStoreError(f"cannot open kvstore database {self.path}: {e}") from e

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path),
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # created here, used only by the worker thread
            timeout=self._busy_ms / 1000,
        )
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        return conn

    def _init_schema(self) -> None:
        c = self._conn
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:  # switching to WAL needs a moment without other writers
            try:
                mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if str(mode).lower() != "wal":
            raise KVStoreError(f"kvstore database {self.path}: cannot enable WAL (mode {mode})")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("BEGIN IMMEDIATE")
        try:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise KVStoreError(
                    f"kvstore database {self.path} has schema version {version}, "
                    f"this pilus understands {SCHEMA_VERSION}"
                )
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise KVStoreError("kvstore is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise KVStoreError(f"kvstore {self.path}: {e}") from e
        except RuntimeError as e:  # executor shut down under us
            if self._closed:
                raise KVStoreError("kvstore is closed") from e
            raise

    @staticmethod
    def _log(c: sqlite3.Connection, rev: int, typ: str, key: str, value: str | None) -> None:
        c.execute(
            "INSERT INTO events (rev, type, key, value) VALUES (?, ?, ?, ?)",
            (rev, typ, key, value),
        )

    def _sweep_locked(self, c: sqlite3.Connection, rev: int, now: float) -> int:
        """Delete expired leases and their keys (inside a write transaction)."""
        expired = [r[0] for r in c.execute("SELECT id FROM leases WHERE expires_at <= ?", (now,))]
        if not expired:
            return rev
        return self._drop_leases_locked(c, rev, expired)

    def _drop_leases_locked(self, c: sqlite3.Connection, rev: int, lease_ids: list[int]) -> int:
        marks = ",".join("?" * len(lease_ids))
        keys = [r[0] for r in c.execute(f"SELECT key FROM kv WHERE lease IN ({marks}) ORDER BY key", lease_ids)]
        c.execute(f"DELETE FROM leases WHERE id IN ({marks})", lease_ids)
        if not keys:
            return rev
        rev += 1
        c.execute(f"DELETE FROM kv WHERE lease IN ({marks})", lease_ids)
        for k in keys:
            self._log(c, rev, "delete", k, None)
        return rev

    def _tx(self, op: Callable[[sqlite3.Connection, int, float], tuple[Any, int]]) -> Any:
        """Run ``op(conn, rev, now) -> (result, new_rev)`` in one write transaction.

        ``new_rev`` is ``rev`` (nothing changed) or ``rev + 1``. A result that is
        an exception is raised after the commit (so that the sweep is kept).
        """
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            now = time.time()
            rev0 = c.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            rev = self._sweep_locked(c, rev0, now)
            result, rev = op(c, rev, now)
            if rev != rev0:
                c.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
                self._trim_locked(c, rev)
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    def _trim_locked(self, c: sqlite3.Connection, rev: int) -> None:
        floor = rev - self.event_retention
        if floor <= 0 or rev % 64:
            return
        compacted = c.execute("SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0]
        if floor > compacted:
            c.execute("DELETE FROM events WHERE rev <= ?", (floor,))
            c.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (floor,))

    def _maybe_sweep(self) -> None:
        """Sweep if some lease has expired (a cheap indexed read otherwise)."""
        row = self._conn.execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (time.time(),)).fetchone()
        if row is not None:
            self._tx(lambda c, rev, now: (None, rev))

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._maybe_sweep()
        c = self._conn
        c.execute("BEGIN")
        try:
            return fn(c)
        finally:
            c.execute("COMMIT")

    @staticmethod
    def _row_kv(row: tuple) -> KeyValue:
        return KeyValue(key=row[0], value=row[1], mod_revision=row[2], lease=row[3])

    # ------------------------------------------------------------------ key/value

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)

        def fn(c: sqlite3.Connection) -> KeyValue | None:
            row = c.execute("SELECT key, value, mod_rev, lease FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else self._row_kv(row)

        return await self._run(self._read, fn)

    @staticmethod
    def _lease_alive(c: sqlite3.Connection, lease: int, now: float) -> bool:
        row = c.execute("SELECT expires_at FROM leases WHERE id = ?", (lease,)).fetchone()
        return row is not None and row[0] > now

    def _set_locked(self, c: sqlite3.Connection, rev: int, key: str, value: str, lease: int | None) -> int:
        rev += 1
        c.execute(
            "INSERT INTO kv (key, value, create_rev, mod_rev, lease) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "mod_rev = excluded.mod_rev, lease = excluded.lease",
            (key, value, rev, rev, lease),
        )
        self._log(c, rev, "put", key, value)
        return rev

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        check_key(key)
        check_value(value)

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            if lease is not None and not self._lease_alive(c, lease, now):
                return LeaseNotFound(f"lease {lease} not found (expired or revoked)"), rev
            rev = self._set_locked(c, rev, key, value, lease)
            return rev, rev

        return await self._run(self._tx, op)

    async def create(self, key: str, value: str, lease: int | None = None) -> bool:
        check_key(key)
        check_value(value)

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            if lease is not None and not self._lease_alive(c, lease, now):
                return LeaseNotFound(f"lease {lease} not found (expired or revoked)"), rev
            if c.execute("SELECT 1 FROM kv WHERE key = ?", (key,)).fetchone() is not None:
                return False, rev
            return True, self._set_locked(c, rev, key, value, lease)

        return await self._run(self._tx, op)

    async def delete(self, key: str) -> bool:
        check_key(key)

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            if c.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount == 0:
                return False, rev
            rev += 1
            self._log(c, rev, "delete", key, None)
            return True, rev

        return await self._run(self._tx, op)

    async def put_many(self, puts: Mapping[str, str], deletes: Iterable[str] = ()) -> int:
        items = dict(puts)
        gone = [k for k in deletes if k not in items]
        for key, value in items.items():
            check_key(key)
            check_value(value)
        for key in gone:
            check_key(key)

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            new = rev + 1  # one revision for the batch, as etcd's transaction
            changed = False
            for key in gone:
                if c.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount:
                    self._log(c, new, "delete", key, None)
                    changed = True
            for key, value in items.items():
                self._set_locked(c, rev, key, value, None)  # writes revision rev + 1
                changed = True
            return (new, new) if changed else (rev, rev)

        return await self._run(self._tx, op)

    async def delete_prefix(self, prefix: str) -> int:
        cond, args = _range_sql(prefix)

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            keys = [r[0] for r in c.execute(f"SELECT key FROM kv WHERE {cond} ORDER BY key", args)]
            if not keys:
                return 0, rev
            rev += 1
            c.execute(f"DELETE FROM kv WHERE {cond}", args)
            for k in keys:
                self._log(c, rev, "delete", k, None)
            return len(keys), rev

        return await self._run(self._tx, op)

    def _list(self, c: sqlite3.Connection, prefix: str) -> list[KeyValue]:
        cond, args = _range_sql(prefix)
        return [
            self._row_kv(r)
            for r in c.execute(f"SELECT key, value, mod_rev, lease FROM kv WHERE {cond} ORDER BY key", args)
        ]

    async def list_prefix(self, prefix: str) -> list[KeyValue]:
        return await self._run(self._read, lambda c: self._list(c, prefix))

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        def fn(c: sqlite3.Connection) -> tuple[int, list[KeyValue]]:
            rev = c.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]
            return rev, self._list(c, prefix)

        return await self._run(self._read, fn)

    async def revision(self) -> int:
        return await self._run(
            self._read,
            lambda c: c.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0],
        )

    # ------------------------------------------------------------------ watch

    def _revision_now(self) -> int:
        """Current revision, read synchronously on a separate read connection.

        WAL readers never wait for writers, so this is safe on the event loop.
        """
        with self._read_lock:
            if self._read_conn is None:
                self._read_conn = self._connect()
            row = self._read_conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            return row[0]

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        if self._closed:
            raise KVStoreError("kvstore is closed")
        if start_revision is None:
            try:
                start_revision = self._revision_now()
            except sqlite3.Error as e:
                raise KVStoreError(f"kvstore {self.path}: {e}") from e
        return self._watch(prefix, start_revision)

    def _poll(self, prefix: str, after: int) -> tuple[int, list[WatchEvent]]:
        self._maybe_sweep()
        cond, args = _range_sql(prefix)
        c = self._conn
        c.execute("BEGIN")
        try:
            rev, compacted = c.execute(
                "SELECT (SELECT value FROM meta WHERE name = 'revision'), "
                "(SELECT value FROM meta WHERE name = 'compacted')"
            ).fetchone()
            if after >= rev:
                return after, []
            if after < compacted:
                raise Compacted(
                    f"watch from revision {after} is no longer possible: history before "
                    f"revision {compacted + 1} was compacted (current {rev})"
                )
            rows = c.execute(
                f"SELECT rev, type, key, value FROM events WHERE rev > ? AND rev <= ? AND {cond} ORDER BY id",
                (after, rev, *args),
            ).fetchall()
        finally:
            c.execute("COMMIT")
        return rev, [WatchEvent(type=t, key=k, value=v, revision=r) for r, t, k, v in rows]

    async def _watch(self, prefix: str, after: int) -> AsyncIterator[WatchEvent]:
        while not self._closed:
            try:
                after, events = await self._run(self._poll, prefix, after)
            except KVStoreError:
                if self._closed:
                    return
                raise
            for ev in events:
                yield ev
            if not events:
                await asyncio.sleep(self.poll_interval)

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise KVStoreError(f"lease TTL must be positive, got {ttl!r}")

        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            cur = c.execute("INSERT INTO leases (ttl, expires_at) VALUES (?, ?)", (float(ttl), now + ttl))
            return cur.lastrowid, rev

        return await self._run(self._tx, op)

    async def keepalive(self, lease_id: int) -> None:
        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            # the sweep at the start of the transaction removed it if it had expired
            cur = c.execute("UPDATE leases SET expires_at = ? + ttl WHERE id = ?", (now, lease_id))
            if cur.rowcount == 0:
                return LeaseNotFound(f"lease {lease_id} not found (expired or revoked)"), rev
            return None, rev

        await self._run(self._tx, op)

    async def revoke_lease(self, lease_id: int) -> None:
        def op(c: sqlite3.Connection, rev: int, now: float) -> tuple[Any, int]:
            if c.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                return LeaseNotFound(f"lease {lease_id} not found (expired or revoked)"), rev
            return None, self._drop_leases_locked(c, rev, [lease_id])

        await self._run(self._tx, op)

    # ------------------------------------------------------------------ admin

    async def status(self) -> dict:
        def fn(c: sqlite3.Connection) -> dict:
            rev, compacted, keys, leases = c.execute(
                "SELECT (SELECT value FROM meta WHERE name = 'revision'), "
                "(SELECT value FROM meta WHERE name = 'compacted'), "
                "(SELECT count(*) FROM kv), (SELECT count(*) FROM leases)"
            ).fetchone()
            return {
                "backend": self.backend,
                "path": str(self.path),
                "revision": rev,
                "compacted": compacted,
                "keys": keys,
                "leases": leases,
                "sqlite_version": sqlite3.sqlite_version,
                "ok": True,
            }

        try:
            return await self._run(self._read, fn)
        except KVStoreError as e:
            return {"backend": self.backend, "path": str(self.path), "ok": False, "error": str(e)}

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)
        with self._read_lock:
            if self._read_conn is not None:
                self._read_conn.close()
                self._read_conn = None

    def __repr__(self) -> str:
        return f"EmbeddedStore({str(self.path)!r})"
