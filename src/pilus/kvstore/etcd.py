"""etcd kvstore: etcd v3 through its JSON gRPC gateway (``/v3/...``), spoken with aiohttp.

Why the gateway and not a gRPC client: aiohttp is already a dependency, the gateway is
part of every etcd v3 server (Debian's 3.4 included) and maps one-to-one onto the gRPC
API, so the backend needs no grpcio/protobuf wheels and no generated stubs. Keys and
values travel base64-encoded; proto3 JSON omits fields at their default (``false``,
``0``, a ``PUT`` event type), so every read below has a default.

Mapping onto the contract of :mod:`pilus.kvstore.base`: etcd's revision is the store
revision; ``create`` is a transaction comparing the key's create revision with 0; a
watch asks for ``start_revision + 1`` (etcd's start is inclusive) and comes back after
a lost connection from the revision after the last event it delivered; TTLs are whole
seconds (rounded up; etcd also enforces its own minimum).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping

import aiohttp

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

__all__ = ["EtcdStore"]

#: etcd's range_end "\0": every key >= key (with key "\0": every key)
_ALL = base64.b64encode(b"\0").decode()
#: etcd's default --max-txn-ops: put_many sends bigger batches as several transactions
ETCD_MAX_TXN_OPS = 128


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | None) -> str:
    return base64.b64decode(data or "").decode()


def _range(prefix: str) -> dict:
    """The etcd range selecting the keys that start with ``prefix``."""
    if not prefix:
        return {"key": _ALL, "range_end": _ALL}
    end = prefix_end(prefix)
    return {"key": _b64(prefix), "range_end": _ALL if end is None else _b64(end)}



def _kv(raw: dict) -> KeyValue:
    lease = int(raw.get("lease", 0))
    return KeyValue(
        key=_unb64(raw.get("key")),
        value=_unb64(raw.get("value")),
        mod_revision=int(raw.get("mod_revision", 0)),
        lease=lease or None,
    )


class EtcdStore:
    """The ``etcd`` backend. Construct with :func:`pilus.kvstore.open_store`."""

    backend = "etcd"

    def __init__(
        self, address: str = "http://127.0.0.1:2379", *, timeout: float = 5.0, retry_interval: float = 0.5
    ) -> None:
        if "://" not in address:
            address = "http://" + address
        self.address = address.rstrip("/")
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._revision = 0  # the newest revision a reply carried (the start of "watch from now")
        self._error: str | None = None  # the last failure to reach etcd, until a call succeeds

    # ------------------------------------------------------------------ plumbing

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise KVStoreError("kvstore is closed")
        if self._session is None:  # created lazily: a session belongs to the running loop
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    def _unreachable(self, exc: BaseException) -> KVStoreError:
        self._error = f"etcd at {self.address} is unreachable: {exc or type(exc).__name__}"
        return KVStoreError(self._error)

    def _seen(self, header: dict | None) -> None:
        rev = int((header or {}).get("revision", 0))
        self._revision = max(self._revision, rev)

    @staticmethod
    def _failure(message: str) -> KVStoreError:
        if "lease not found" in message:
            return LeaseNotFound(message.removeprefix("etcdserver: "))
        return KVStoreError(message)

    async def _call(self, path: str, body: dict) -> dict:
        try:
            async with self._http().post(
                f"{self.address}/v3/{path}", json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._unreachable(e) from e
        try:
            reply = json.loads(text)
        except ValueError:
            raise KVStoreError(f"etcd at {self.address}: HTTP {resp.status}: {text[:200]}") from None
        if resp.status != 200 or "error" in reply:
            err = reply.get("error")
            message = reply.get("message") or (err.get("message") if isinstance(err, dict) else err) or text
            raise self._failure(f"etcd at {self.address}: {message}")
        self._error = None
        result = reply.get("result", reply)  # streaming endpoints wrap their reply
        self._seen(result.get("header"))
        return result

    # ------------------------------------------------------------------ key/value

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        kvs = (await self._call("kv/range", {"key": _b64(key)})).get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    @staticmethod
    def _put_body(key: str, value: str, lease: int | None) -> dict:
        check_key(key)
        check_value(value)
        body = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = str(lease)
        return body

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        reply = await self._call("kv/put", self._put_body(key, value, lease))
        return int(reply["header"]["revision"])

    async def create(self, key: str, value: str, lease: int | None = None) -> bool:
        put = self._put_body(key, value, lease)
        reply = await self._call("kv/txn", {
            "compare": [{"key": put["key"], "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"request_put": put}],
        })
        if reply.get("succeeded", False):
            return True
        if lease is not None:  # the put did not run, so etcd did not check the lease: as embedded, say so
            ttl = await self._call("lease/timetolive", {"ID": str(lease)})
            if int(ttl.get("TTL", -1)) <= 0:
                raise LeaseNotFound(f"lease {lease} not found (expired or revoked)")
        return False

    async def put_many(self, puts: Mapping[str, str], deletes: Iterable[str] = ()) -> int:
        ops = [{"request_delete_range": {"key": _b64(k)}} for k in sorted(set(deletes) - set(puts))]
        ops += [{"request_put": self._put_body(k, v, None)} for k, v in sorted(puts.items())]
        rev = await self.revision() if not ops else 0
        for i in range(0, len(ops), ETCD_MAX_TXN_OPS):
            reply = await self._call("kv/txn", {"success": ops[i:i + ETCD_MAX_TXN_OPS]})
            rev = int(reply["header"]["revision"])
        return rev

    async def delete(self, key: str) -> bool:
        check_key(key)
        return int((await self._call("kv/deleterange", {"key": _b64(key)})).get("deleted", 0)) > 0

    async def delete_prefix(self, prefix: str) -> int:
        return int((await self._call("kv/deleterange", _range(prefix))).get("deleted", 0))

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        reply = await self._call("kv/range", _range(prefix))  # one read: keys and revision agree
        return int(reply["header"]["revision"]), [_kv(kv) for kv in reply.get("kvs") or []]

    async def list_prefix(self, prefix: str) -> list[KeyValue]:
        # etcd sorts by key bytes; UTF-8 byte order is code-point order, as str sorts
        return (await self.snapshot(prefix))[1]

    async def _count(self) -> tuple[int, int]:
        reply = await self._call("kv/range", {**_range(""), "count_only": True})
        return int(reply["header"]["revision"]), int(reply.get("count", 0))

    async def revision(self) -> int:
        return (await self._count())[0]

    # ------------------------------------------------------------------ watch

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> AsyncIterator[WatchEvent]:
        if self._closed:
            raise KVStoreError("kvstore is closed")
        # "from now" is the newest revision this client has seen: reading etcd here would
        # block the loop, and a watch created later could miss writes made meanwhile
        if start_revision is None:
            start_revision = self._revision or None  # None: nothing seen yet, etcd's "now"
        return self._watch(prefix, start_revision)

    async def _watch(self, prefix: str, after: int | None) -> AsyncIterator[WatchEvent]:
        """Events with revision > ``after``; reconnects (from the last event) while etcd is away."""
        while not self._closed:
            request = {"create_request": _range(prefix)}
            if after is not None:
                request["create_request"]["start_revision"] = str(after + 1)
            try:
                async with self._http().post(f"{self.address}/v3/watch", json=request) as resp:
                    if resp.status != 200:  # e.g. 503 while a restarted etcd elects itself: retry
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                    self._error = None
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            events, header_rev = self._watch_events(line, after)
                            if after is None:  # the created reply: "now" is its revision
                                after = header_rev
                            for ev in events:
                                after = ev.revision
                                yield ev
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self._unreachable(e)  # remembered for status(); the watch goes on
            if not self._closed:
                await asyncio.sleep(self.retry_interval)

    def _watch_events(self, line: bytes, after: int | None) -> tuple[list[WatchEvent], int | None]:
        """The events of one watch reply, and the revision in its header."""
        if not line.strip():
            return [], after
        msg = json.loads(line)
        if "error" in msg:
            err = msg["error"]
            raise self._failure(f"etcd at {self.address}: watch: {err.get('message', err)}")
        result = msg.get("result", {})
        header_rev = int(result.get("header", {}).get("revision", 0))
        self._seen(result.get("header"))
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            raise Compacted(
                f"watch from revision {after} is no longer possible: history before revision "
                f"{compacted} was compacted (etcd at {self.address})"
            )
        if result.get("canceled"):
            raise KVStoreError(f"etcd at {self.address}: watch canceled: {result.get('cancel_reason', '')}")
        out = []
        for ev in result.get("events") or []:
            kv = ev.get("kv", {})
            typ = "delete" if ev.get("type") == "DELETE" else "put"
            out.append(WatchEvent(
                type=typ,
                key=_unb64(kv.get("key")),
                value=None if typ == "delete" else _unb64(kv.get("value")),
                revision=int(kv.get("mod_revision", 0)),
            ))
        return out, header_rev

    # ------------------------------------------------------------------ leases

    async def grant_lease(self, ttl: float) -> int:
        if not ttl > 0:
            raise KVStoreError(f"lease TTL must be positive, got {ttl!r}")
        return int((await self._call("lease/grant", {"TTL": str(math.ceil(ttl))}))["ID"])

    async def keepalive(self, lease_id: int) -> None:
        reply = await self._call("lease/keepalive", {"ID": str(lease_id)})
        if int(reply.get("TTL", 0)) <= 0:  # etcd answers an expired lease with TTL 0, not an error
            raise LeaseNotFound(f"lease {lease_id} not found (expired or revoked)")

    async def revoke_lease(self, lease_id: int) -> None:
        await self._call("lease/revoke", {"ID": str(lease_id)})

    # ------------------------------------------------------------------ admin

    async def status(self) -> dict:
        base = {"backend": self.backend, "path": self.address, "endpoint": self.address}
        try:
            rev, keys = await self._count()
            server = await self._call("maintenance/status", {})
        except KVStoreError as e:
            return {**base, "ok": False, "error": str(e)}
        return {**base, "revision": rev, "keys": keys, "version": server.get("version", ""), "ok": True}

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"EtcdStore({self.address!r})"
