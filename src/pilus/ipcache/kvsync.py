"""The cluster-wide ipcache: endpoints and nodes of the other agents, through the kvstore.

Every agent publishes its endpoints under ``cilium/state/ip/v1/<cluster>/<ip>``
(Cilium's key shape), value JSON :meth:`IPIdentityPair.to_json` (IP, security
identity ID, HostIP = the publishing node's IP, node and endpoint name, NamedPorts:
the container ports' names, so that other nodes resolve named ports of services and
egress rules to this pod), attached to
a lease the sync keeps alive, so a dead agent's keys go when its lease expires.
Every agent watches the prefix and claims the entries of OTHER nodes (HostIP is not
this node's IP) in the ipcache as ``Source.KVSTORE`` /32s with the HostIP as tunnel
endpoint; a LOCAL claim for the same address still wins (the ipcache's precedence).
Other nodes' IPs, from the node registry's table, are KVSTORE claims of identity
``remote-node``; this node's own IP stays a LOCAL ``host`` claim.

Restart: ``start()`` claims what the store holds before the agent's endpoint restore
ends with ``ipcache.resync()``, so remote entries survive the restart window. The
first ``publish()`` writes this node's keys again under the new lease and deletes its
keys of endpoints that are gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pilus.identity.reserved import REMOTE_NODE
from pilus.ipcache.cache import IPCache, Source
from pilus.kvstore.base import KVStoreError, Store, WatchEvent
from pilus.kvstore.follow import follow_prefix, keep_lease, stop_loops
from pilus.node.registry import NODE_LEASE_TTL, NodeEntry, NodeRegistry
from pilus.reconcile import ReconcileError

__all__ = ["IP_PREFIX", "IPCacheSync", "IPIdentityPair"]

log = logging.getLogger(__name__)

IP_PREFIX = "cilium/state/ip/v1"


@dataclass(frozen=True)
class IPIdentityPair:
    """One endpoint address as the kvstore holds it (Cilium's ``identity.IPIdentityPair``)."""

    ip: IPv4Address
    identity: int
    host_ip: IPv4Address  # the node the endpoint lives on: the tunnel endpoint for the others
    node: str
    endpoint: str  # namespace/pod
    named_ports: tuple[tuple[str, int, str], ...] = ()  # sorted (name, port, "TCP"/"UDP")

    def to_json(self) -> dict:
        out = {"IP": str(self.ip), "ID": self.identity, "HostIP": str(self.host_ip),
               "Node": self.node, "Endpoint": self.endpoint}
        if self.named_ports:
            out["NamedPorts"] = [{"Name": n, "Port": p, "Protocol": pr} for n, p, pr in self.named_ports]
        return out

    @classmethod
    def from_json(cls, data: dict) -> IPIdentityPair:
        """Raises ValueError/KeyError/TypeError on a malformed value."""
        ports = []
        for np in data.get("NamedPorts") or ():
            port = int(np["Port"])
            if not 1 <= port <= 65535:
                raise ValueError(f"named port {np.get('Name')!r}: port {port} out of range")
            ports.append((str(np["Name"]), port, str(np.get("Protocol") or "TCP").upper()))
        return cls(IPv4Address(data["IP"]), int(data["ID"]), IPv4Address(data["HostIP"]),
                   str(data.get("Node", "")), str(data.get("Endpoint", "")), tuple(sorted(ports)))

    def named_port_specs(self) -> dict[str, str]:
        """The endpoint model's shape: name -> "8080/TCP"."""
        return {n: f"{p}/{pr}" for n, p, pr in self.named_ports}


def _prefix(ip: IPv4Address) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


class IPCacheSync:
    """Publishes this node's endpoints and claims the other nodes' ones and node IPs."""

    def __init__(self, store: Store, ipcache: IPCache, nodes: NodeRegistry | None, *, cluster: str,
                 node_name: str, node_ip: IPv4Address, lease_ttl: float = NODE_LEASE_TTL,
                 on_remote_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.ipcache = ipcache
        self.nodes = nodes  # its table gives the other nodes' IPs
        self._unsubscribe = lambda: None
        self.node_name = node_name
        self.node_ip = IPv4Address(node_ip)
        self.lease_ttl = lease_ttl
        self.prefix = f"{IP_PREFIX}/{cluster}/"
        self._remote: dict[str, IPIdentityPair] = {}  # key -> the entry claimed for it
        #: other nodes' IPs and router IPs claimed as remote-node -> tunnel endpoint (router IPs)
        self._remote_nodes: dict[IPv4Address, IPv4Address | None] = {}
        self._published: dict[str, str] = {}  # own key -> value, written under the current lease
        self._stale: set[str] = set()  # own keys an earlier run left: the first publish decides
        self._desired: dict[str, str] | None = None  # None: nothing published yet
        self._lease: int | None = None
        self._dirty = False  # a publish failed: written again after the next keepalive
        self._publish_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._on_remote_change = on_remote_change or (lambda: None)  # the remote endpoints changed

    async def start(self) -> None:
        self._lease = await self.store.grant_lease(self.lease_ttl)
        rev = await self._resync()
        if self.nodes is not None:
            self.nodes_changed(self.nodes.nodes)
            self._unsubscribe = self.nodes.on_change(self.nodes_changed)
        self._tasks = [
            asyncio.create_task(follow_prefix(self.store, self.prefix, rev, self._on_event, self._resync, "ipcache"),
                                name=f"ipcache-watch-{self.node_name}"),
            asyncio.create_task(keep_lease(self.store, lambda: self._lease, self.lease_ttl, self._republish,
                                           f"ipcache (node {self.node_name})", after_renewal=self._write_dirty),
                                name=f"ipcache-lease-{self.node_name}"),
        ]

    async def stop(self) -> None:
        """Stop watching; this node's keys stay until its lease expires (a restart keeps them)."""
        self._unsubscribe()
        self._unsubscribe = lambda: None
        await stop_loops(self._tasks)

    # -- this node's endpoints ---------------------------------------------------

    async def publish(self, endpoints: Iterable) -> None:
        """Make this node's keys say exactly ``endpoints`` (objects with ``ipv4``,
        ``identity``, ``name``, ``named_ports``); endpoints without an identity yet are left out."""
        desired = {}
        for ep in endpoints:
            if ep.identity:
                ports = tuple(sorted((name, int(spec.partition("/")[0]), (spec.partition("/")[2] or "TCP").upper())
                                     for name, spec in (getattr(ep, "named_ports", None) or {}).items()))
                pair = IPIdentityPair(IPv4Address(ep.ipv4), ep.identity, self.node_ip, self.node_name, ep.name,
                                      ports)
                desired[self.prefix + str(pair.ip)] = json.dumps(pair.to_json(), sort_keys=True)
        async with self._publish_lock:
            self._desired = desired
            try:
                await self._write_own()
            except KVStoreError as exc:  # the keepalive loop writes them again
                log.warning("publishing endpoints of %s failed: %s", self.node_name, exc)
                self._dirty = True

    async def _write_own(self) -> None:
        self._dirty = False
        desired = self._desired or {}
        for key, value in desired.items():
            if self._published.get(key) != value:
                await self.store.put(key, value, lease=self._lease)
                self._published[key] = value
        for key in (set(self._published) | self._stale) - set(desired):
            await self.store.delete(key)
            self._published.pop(key, None)
        self._stale = set()

    # -- the other nodes ---------------------------------------------------------

    def nodes_changed(self, nodes: Mapping[str, NodeEntry]) -> None:
        """The node registry's table (a NodeRegistry.on_change callback): other nodes' IPs
        and router IPs (Cilium's cilium_host) -> remote-node; a router IP is reached
        through its node's IP."""
        want: dict[IPv4Address, IPv4Address | None] = {}
        for n in nodes.values():
            if n.node_ip != self.node_ip:
                want[n.node_ip] = None
                want.setdefault(n.router_ip, n.node_ip)
        changed = {ip for ip, tunnel in want.items() if self._remote_nodes.get(ip, ...) != tunnel}
        gone = self._remote_nodes.keys() - want.keys()
        self._remote_nodes = want
        for ip in sorted(changed | gone):
            try:
                if ip in want:
                    self.ipcache.upsert(_prefix(ip), REMOTE_NODE, Source.KVSTORE, tunnel_endpoint=want[ip])
                else:
                    self.ipcache.delete(_prefix(ip), Source.KVSTORE)
            except ReconcileError as exc:  # the claim stays pending: the retries row writes it again
                log.warning("ipcache entry of node IP %s: %s", ip, exc)

    def status(self) -> dict:
        return {"published": len(self._published), "remote_endpoints": len(self._remote),
                "remote_nodes": sum(1 for tunnel in self._remote_nodes.values() if tunnel is None)}

    def remote_endpoints(self) -> list[IPIdentityPair]:
        """Other nodes' endpoints as the kvstore holds them."""
        return sorted(self._remote.values(), key=lambda p: p.ip)

    def remote_by_ip(self, ip: str) -> IPIdentityPair | None:
        """Another node's endpoint by its address."""
        return self._remote.get(self.prefix + ip)

    def remote_endpoint(self, name: str) -> IPIdentityPair | None:
        """Another node's endpoint by ``namespace/pod``."""
        return next((p for p in self._remote.values() if p.endpoint == name), None)

    # -- internals -----------------------------------------------------------------

    def _parse(self, key: str, value: str | None) -> IPIdentityPair | None:
        try:
            pair = IPIdentityPair.from_json(json.loads(value or ""))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring ipcache entry %s: bad value (%s)", key, exc)
            return None
        if key != self.prefix + str(pair.ip):
            log.warning("ignoring ipcache entry %s: it names %s", key, pair.ip)
            return None
        return pair

    def _apply(self, key: str, pair: IPIdentityPair | None) -> None:
        """``key`` now holds ``pair`` (None: deleted): claim it when another node's."""
        if pair is not None and pair.host_ip == self.node_ip:
            pair = None  # this node's own endpoint: its LOCAL claim is the endpoint manager's
        old = self._remote.pop(key, None)
        if pair is not None:
            self._remote[key] = pair
        if pair != old:
            self._on_remote_change()
        if pair is not None and pair != old:
            self.ipcache.upsert(_prefix(pair.ip), pair.identity, Source.KVSTORE, tunnel_endpoint=pair.host_ip)
        elif pair is None and old is not None:
            self.ipcache.delete(_prefix(old.ip), Source.KVSTORE)

    def _apply_logged(self, key: str, pair: IPIdentityPair | None) -> None:
        try:
            self._apply(key, pair)
        except ReconcileError as exc:  # the claim stays pending: the retries row writes it again
            log.warning("ipcache entry %s: %s", key, exc)

    async def _resync(self) -> int:
        rev, kvs = await self.store.snapshot(self.prefix)
        seen = {}
        for kv in kvs:
            pair = self._parse(kv.key, kv.value)
            if pair is None:
                continue
            seen[kv.key] = pair
            if pair.node == self.node_name and self._desired is None:
                self._stale.add(kv.key)
        for key in set(self._remote) - set(seen):
            self._apply_logged(key, None)
        for key, pair in seen.items():
            self._apply_logged(key, pair)
        return rev

    def _on_event(self, ev: WatchEvent) -> None:
        self._apply_logged(ev.key, self._parse(ev.key, ev.value) if ev.type == "put" else None)

    async def _write_dirty(self) -> None:
        """After a renewal: write again what an earlier publish could not."""
        if self._dirty:
            async with self._publish_lock:
                await self._write_own()

    async def _republish(self) -> None:
        """The lease expired: a new one, and every own key written again under it."""
        async with self._publish_lock:
            self._lease = await self.store.grant_lease(self.lease_ttl)
            self._published = {}
            await self._write_own()
