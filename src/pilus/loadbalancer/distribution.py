"""Services through the kvstore: every agent of the cluster serves the same services.

Layout (JSON, one key per service):
  pilus/state/services/v1/<namespace>/<name>   {"documents": [Service, EndpointSlice...]}

As in Kubernetes, a service is cluster-wide: created through any agent, it exists
on every node, and each node derives its own frontends from it (NodePort on its own
addresses, externalTrafficPolicy: Local with its own backends). The agent that takes
a request validates and applies it first (ServiceManager.upsert: conflicts and
capacity, all-or-nothing), then writes the keys in one batch (``put_many``); when the
write fails, the local change is undone and the request fails. Every agent, the
writer too, follows the prefix; values already applied are skipped, others are
applied in bursts (one upsert per burst). A service another agent wrote that
conflicts with one here (two requests racing) is left out and reported in status.

Administrative backend states (``PATCH /v1/service/backend-state``) stay per node,
as Cilium's ``cilium-dbg service update`` does.

Restart: the manager restores its state file first (the datapath keeps serving);
``start()`` then takes the kvstore's set as the truth: services that were added
meanwhile are applied, those that were deleted are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from pilus.kvstore.base import KVStoreError, Store, WatchEvent
from pilus.kvstore.follow import follow_prefix, stop_loops
from pilus.loadbalancer.manager import ServiceConflict, ServiceManager, ServiceNotFound
from pilus.loadbalancer.model import Service, ServiceValidationError, parse_objects, service_documents

log = logging.getLogger(__name__)

SERVICE_PREFIX = "pilus/state/services/v1/"
BURST = 0.02  # seconds the watch collects changes before applying them at once


def service_key(namespace: str, name: str) -> str:
    return f"{SERVICE_PREFIX}{namespace}/{name}"


def encode(svc: Service) -> str:
    return json.dumps({"documents": service_documents(svc)}, sort_keys=True)


def _key_of(key: str) -> tuple[str, str] | None:
    ns, _, name = key[len(SERVICE_PREFIX):].partition("/")
    return (ns, name) if ns and name and "/" not in name else None


class ServiceDistribution:
    def __init__(self, store: Store, manager: ServiceManager) -> None:
        self.store = store
        self.manager = manager
        self._write = asyncio.Lock()
        #: key -> the value this agent applied for it (its own writes included)
        self._applied: dict[str, str] = {}
        self._pending: dict[str, str | None] = {}  # key -> value seen (None: deleted), not applied yet
        self._flush: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        #: key -> why another agent's service is not applied here
        self.errors: dict[str, str] = {}

    async def start(self) -> None:
        self._applied = {service_key(*s.key): encode(s) for s in self.manager.services()}
        rev = await self._resync()
        await self._apply_pending()
        self._tasks = [asyncio.create_task(
            follow_prefix(self.store, SERVICE_PREFIX, rev, self._on_event, self._resync, "services"),
            name="service-watch")]

    async def stop(self) -> None:
        if self._flush is not None:
            self._tasks.append(self._flush)
        await stop_loops(self._tasks)

    def status(self) -> dict:
        return {"services": len(self._applied), "pending": len(self._pending),
                "errors": [f"{k[len(SERVICE_PREFIX):]}: {v}" for k, v in sorted(self.errors.items())]}

    # -- requests of this agent's API --------------------------------------------

    async def upsert(self, services: list[Service]) -> list[Service]:
        """Apply here (validation: nothing changes on error), then publish to every node."""
        async with self._write:
            before = {s.key: self._get(s.key) for s in services}
            applied = await asyncio.to_thread(self.manager.upsert, services)
            values = {service_key(*s.key): encode(s) for s in services}
            old = {k: self._applied.get(k) for k in values}
            self._applied.update(values)  # before the write: the watch may report it first
            try:
                await self.store.put_many(values)
            except KVStoreError:
                self._forget(old)
                await asyncio.to_thread(self._undo, before)
                raise
            for k in values:
                self.errors.pop(k, None)
            return applied

    async def delete(self, namespace: str, name: str) -> Service:
        async with self._write:
            svc = self.manager.get(namespace, name)  # ServiceNotFound: nothing changes
            key = service_key(namespace, name)
            await self.store.put_many({}, deletes=[key])  # a failure changes nothing here either
            self._applied.pop(key, None)
            await asyncio.to_thread(self._delete_local, svc.key)
            return svc

    async def delete_all(self, namespace: str | None = None) -> int:
        async with self._write:
            keys = [s.key for s in self.manager.services() if namespace is None or s.namespace == namespace]
            await self.store.put_many({}, deletes=[service_key(*k) for k in keys])
            for k in keys:
                self._applied.pop(service_key(*k), None)
            return await asyncio.to_thread(self.manager.delete_all, namespace)

    # -- the watch ---------------------------------------------------------------

    def _on_event(self, ev: WatchEvent) -> None:
        value = ev.value if ev.type == "put" else None
        if self._applied.get(ev.key) == value:
            self._pending.pop(ev.key, None)
            return  # this agent's own write, or already applied
        self._pending[ev.key] = value
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._flush_after_burst())

    async def _flush_after_burst(self) -> None:
        await asyncio.sleep(BURST)
        try:
            await self._apply_pending()
        except Exception:
            log.exception("applying services from the kvstore failed")

    async def _resync(self) -> int:
        """The kvstore's services are the truth: queue what differs from what is applied."""
        rev, kvs = await self.store.snapshot(SERVICE_PREFIX)
        stored = {kv.key: kv.value for kv in kvs}
        self._pending = {k: v for k, v in stored.items() if self._applied.get(k) != v}
        self._pending.update({k: None for k in self._applied if k not in stored})
        return rev

    async def _apply_pending(self) -> None:
        async with self._write:
            pending, self._pending = self._pending, {}
            if pending:
                await asyncio.to_thread(self._apply, pending)

    def _apply(self, pending: dict[str, str | None]) -> None:
        upserts: dict[str, Service] = {}
        for key, value in sorted(pending.items()):
            name = _key_of(key)
            if name is None:
                log.warning("ignoring kvstore key %s: not <namespace>/<name>", key)
                continue
            if value is None:
                self._delete_local(name)
                self._applied.pop(key, None)
                self.errors.pop(key, None)
                continue
            try:
                svc = parse_objects(json.loads(value)["documents"])[0]
            except (ValueError, KeyError, TypeError, IndexError, ServiceValidationError) as exc:
                self._reject(key, value, f"bad value: {exc}")
                continue
            if svc.key != name:
                self._reject(key, value, f"it names {svc.full_name}")
                continue
            upserts[key] = svc
        if not upserts:
            return
        try:
            self.manager.upsert(list(upserts.values()))
            done = list(upserts)
        except (ServiceConflict, ServiceValidationError):
            done = []  # one by one: the others still apply
            for key, svc in upserts.items():
                try:
                    self.manager.upsert([svc])
                    done.append(key)
                except (ServiceConflict, ServiceValidationError) as exc:
                    self._reject(key, pending[key], str(exc))
        for key in done:
            self._applied[key] = pending[key]
            self.errors.pop(key, None)

    def _reject(self, key: str, value: str | None, why: str) -> None:
        log.error("service %s from the kvstore is not applied on this node: %s", key, why)
        self.errors[key] = why
        self._applied[key] = value  # not retried until the key changes

    # -- local helpers -----------------------------------------------------------

    def _get(self, key: tuple[str, str]) -> Service | None:
        try:
            return self.manager.get(*key)
        except ServiceNotFound:
            return None

    def _delete_local(self, key: tuple[str, str]) -> None:
        with contextlib.suppress(ServiceNotFound):
            self.manager.delete(*key)

    def _forget(self, old: dict[str, str | None]) -> None:
        for k, v in old.items():
            if v is None:
                self._applied.pop(k, None)
            else:
                self._applied[k] = v

    def _undo(self, before: dict[tuple[str, str], Service | None]) -> None:
        """The kvstore write failed: the services of the request as they were."""
        restore = [s for s in before.values() if s is not None]
        for key, svc in before.items():
            if svc is None:
                self._delete_local(key)
        if restore:
            self.manager.upsert(restore)
