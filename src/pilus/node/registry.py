"""The node registry: every agent's node in the kvstore, and the table of all nodes.

Key ``cilium/state/nodes/v1/<cluster>/<node>`` (Cilium's shape), value JSON
(:meth:`NodeEntry.to_json`), attached to a lease of :data:`NODE_LEASE_TTL`
seconds that the registry keeps alive; a dead agent's entry goes when its lease
expires. Every registry watches the cluster's prefix and keeps ``nodes`` (name ->
entry); ``on_change(callback)`` is the seam multi-node routing/tunnels use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network

from pilus.kvstore.base import KVStoreError, Store, WatchEvent
from pilus.kvstore.follow import follow_prefix, keep_lease, stop_loops

__all__ = ["NODE_LEASE_TTL", "NODES_PREFIX", "NodeEntry", "NodeRegistry", "NodeRegistryError"]

log = logging.getLogger(__name__)

NODES_PREFIX = "cilium/state/nodes/v1"
#: seconds a dead node stays listed (Cilium's 15 minutes is far too long for local clusters)
NODE_LEASE_TTL = 20.0


class NodeRegistryError(Exception):
    """A node entry cannot be registered; the message is one line meant for a user."""


@dataclass(frozen=True)
class NodeEntry:
    name: str
    cluster: str
    node_ip: IPv4Address
    pod_cidr: IPv4Network
    router_ip: IPv4Address
    health: str = "Ok"
    boot_id: str = ""
    started: float = 0.0  # unix time the agent registered

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("node_ip", "pod_cidr", "router_ip"):
            out[key] = str(out[key])
        return out

    @classmethod
    def from_json(cls, data: dict) -> NodeEntry:
        """Raises ValueError/KeyError/TypeError on a malformed value."""
        return cls(
            name=str(data["name"]),
            cluster=str(data["cluster"]),
            node_ip=IPv4Address(data["node_ip"]),
            pod_cidr=IPv4Network(data["pod_cidr"]),
            router_ip=IPv4Address(data["router_ip"]),
            health=str(data.get("health", "Ok")),
            boot_id=str(data.get("boot_id", "")),
            started=float(data.get("started", 0.0)),
        )


Subscriber = Callable[[dict[str, NodeEntry]], None]


class NodeRegistry:
    """Registers ``local`` under a lease and mirrors every node of its cluster."""

    def __init__(self, store: Store, local: NodeEntry, *, lease_ttl: float = NODE_LEASE_TTL) -> None:
        if not local.name or "/" in local.name or not local.cluster or "/" in local.cluster:
            raise NodeRegistryError(f"node {local.name!r} / cluster {local.cluster!r} must be non-empty, without '/'")
        if not local.boot_id:
            local = NodeEntry(**{**local.__dict__, "boot_id": uuid.uuid4().hex, "started": time.time()})
        self.store = store
        self.local = local
        self.lease_ttl = lease_ttl
        self.prefix = f"{NODES_PREFIX}/{local.cluster}/"
        self.nodes: dict[str, NodeEntry] = {}
        self._subscribers: list[Subscriber] = []
        self._lease: int | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def key(self) -> str:
        return self.prefix + self.local.name

    async def start(self) -> None:
        kv = await self.store.get(self.key)
        other = self._parse(kv.key, kv.value) if kv is not None else None
        if other is not None and other.node_ip != self.local.node_ip:
            # a live entry (it is under a lease) of another machine: two agents, one name
            raise NodeRegistryError(
                f"node name {self.local.name!r} is already registered in cluster {self.local.cluster!r} "
                f"by node IP {other.node_ip} (pod CIDR {other.pod_cidr}): another agent runs with this "
                f"name; choose another --node-name, or wait until its entry expires "
                f"({self.lease_ttl:.0f} s after that agent stopped)")
        await self._register()
        rev = await self._resync()
        self._tasks = [
            asyncio.create_task(follow_prefix(self.store, self.prefix, rev, self._on_event, self._resync,
                                              "node registry"), name=f"node-watch-{self.local.name}"),
            asyncio.create_task(keep_lease(self.store, lambda: self._lease, self.lease_ttl, self._register,
                                           f"node {self.local.name}"), name=f"node-lease-{self.local.name}"),
        ]

    async def stop(self, *, revoke_lease: bool = False) -> None:
        """Stop watching; the entry stays until its lease expires unless ``revoke_lease``."""
        await stop_loops(self._tasks)
        if revoke_lease and self._lease is not None:
            with contextlib.suppress(KVStoreError):
                await self.store.revoke_lease(self._lease)
        self._lease = None

    def on_change(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(nodes)`` after every change of the table; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def list(self) -> list[NodeEntry]:
        return sorted(self.nodes.values(), key=lambda n: n.name)

    def rows(self) -> list[dict]:
        """The table for the API: every node, the local one marked."""
        return [{**n.to_json(), "local": n.name == self.local.name} for n in self.list()]

    def status(self) -> dict:
        healthy = sum(1 for n in self.nodes.values() if n.health == "Ok")
        return {"nodes": len(self.nodes), "reachable": healthy}

    # -- internals -----------------------------------------------------------

    async def _register(self) -> None:
        self._lease = await self.store.grant_lease(self.lease_ttl)
        await self.store.put(self.key, json.dumps(self.local.to_json(), sort_keys=True), lease=self._lease)

    def _parse(self, key: str, value: str | None) -> NodeEntry | None:
        name = key[len(self.prefix):]
        try:
            entry = NodeEntry.from_json(json.loads(value or ""))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring node entry %s: bad value (%s)", key, exc)
            return None
        if entry.name != name:
            log.warning("ignoring node entry %s: it names node %r", key, entry.name)
            return None
        return entry

    def _set(self, nodes: dict[str, NodeEntry]) -> None:
        if nodes == self.nodes:
            return
        self.nodes = nodes
        for callback in list(self._subscribers):
            try:
                callback(dict(nodes))
            except Exception:  # noqa: BLE001 - one subscriber must not stop the others
                log.exception("node registry subscriber failed")

    async def _resync(self) -> int:
        rev, kvs = await self.store.snapshot(self.prefix)
        nodes = {}
        for kv in kvs:
            entry = self._parse(kv.key, kv.value)
            if entry is not None:
                nodes[entry.name] = entry
        self._set(nodes)
        return rev

    def _on_event(self, ev: WatchEvent) -> None:
        name = ev.key[len(self.prefix):]
        nodes = dict(self.nodes)
        entry = self._parse(ev.key, ev.value) if ev.type == "put" else None
        if entry is not None:
            nodes[name] = entry
        else:
            nodes.pop(name, None)
        self._set(nodes)
