"""Keeps every local endpoint's policy map equal to what the policy engine computes.

Inputs flow into the (pure) engine: the cluster's identities (allocator watch),
the policy set and namespace labels (kvstore watch), the local endpoints, the
services (for ``toServices``, from the ServiceManager's change hook) and CIDR
identities for prefixes that policies name (ipcache), plus ipBlock identities for
the prefixes Kubernetes ipBlocks name (``pilus_ipblock``, the second lookup). After each input change only the
endpoints the engine reports as changed are re-synced, so a new pod matching an
existing selector costs one identity's entries, not a recompute of every map.

The engine is pure and CPU-bound (a 10k-rule import takes seconds), so every call
into it runs on one dedicated worker thread: calls are serialized and the agent's
event loop, and with it the API, stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network

from pilus import protocols
from pilus.datapath import (
    ENDPOINT_F_IPBLOCK_EGRESS,
    ENDPOINT_F_IPBLOCK_INGRESS,
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
)
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.fqdn_identities import FQDNIdentities
from pilus.endpoint.model import Endpoint, endpoint_info, parse_port_spec
from pilus.identity.allocator import Identity, IdentityAllocator
from pilus.identity.labels import Label, Labels, parse_labels
from pilus.identity.reserved import LOCAL_IDENTITY_FLAG, RESERVED_IDENTITIES
from pilus.ipcache import IPCache, Source
from pilus.policy.distribution import NAMESPACE_PREFIX, POLICY_KEY, PolicyDistribution
from pilus.policy.engine import EndpointPolicy, PolicyEngine, ServiceRef
from pilus.policy.selector import ipblock_identity_labels
from pilus.reconcile import Reconciler

log = logging.getLogger(__name__)

CT_GC_INTERVAL_S = 30.0
#: ipBlock identities are local identities numbered apart from the CIDR ones (which start
#: at LOCAL_IDENTITY_FLAG | 1), so that neither numbering shifts the other across restarts
IPBLOCK_IDENTITY_BASE = LOCAL_IDENTITY_FLAG | 1 << 23


def endpoint_flags(policy: EndpointPolicy) -> int:
    """The endpoint's ENDPOINT_F_POLICY_* and ENDPOINT_F_IPBLOCK_* bits."""
    flags = 0
    for on, bit in (
        (policy.ingress_enforced, ENDPOINT_F_POLICY_INGRESS),
        (policy.egress_enforced, ENDPOINT_F_POLICY_EGRESS),
        (policy.ingress_enforced and policy.ingress_ipblock, ENDPOINT_F_IPBLOCK_INGRESS),
        (policy.egress_enforced and policy.egress_ipblock, ENDPOINT_F_IPBLOCK_EGRESS),
    ):
        if on:
            flags |= bit
    return flags


class PolicySync:
    def __init__(
        self,
        engine: PolicyEngine,
        datapath: Datapath,
        identities: IdentityAllocator,
        distribution: PolicyDistribution,
        *,
        ipcache: IPCache,
        entries: EndpointEntries,
        on_namespace_change=None,
    ) -> None:
        self.engine = engine
        self.datapath = datapath  # its policy, ipblock and ct maps
        self.ipcache = ipcache  # GENERATED claims: local CIDR identities of policy prefixes
        self.entries = entries  # enforcement flags of the endpoint entries
        self.identities = identities
        self.distribution = distribution
        self.revision = 0
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.endpoints: dict[int, Endpoint] = {}
        #: named ports of the other nodes' endpoints: name -> {(port, proto number)}
        self._remote_named_ports: dict[str, set[tuple[int, int]]] = {}
        self.cidr_identities: dict[IPv4Network, int] = {}
        self.fqdn = FQDNIdentities()  # toFQDNs: learned IPs -> local identities (FQDN ipcache claims)
        self.ipblock_identities: dict[IPv4Network, int] = {}
        self._ipblock_restored = False
        self._ipblock_writer: Reconciler | None = None
        # new pilus_ipblock entries, written once the policy maps know their identities
        self._ipblock_pending: dict[IPv4Network, int] = {}
        self._dirty = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._tasks: list[asyncio.Task] = []
        self._unsubscribe = None
        self._unsubscribe_services = None
        self.on_namespace_change = on_namespace_change  # async fn(namespace, labels)
        #: fn() called on the policy worker after a sync (the L7 proxy's config follows)
        self.change_callbacks: list = []

    # -- lifecycle -------------------------------------------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def start(self) -> None:
        idents = [(r.id, r.labels) for r in RESERVED_IDENTITIES]
        idents += [(i.id, i.labels) for i in await self.identities.list()]
        await self._run(lambda: [self.engine.upsert_identity(i, labels) for i, labels in idents])
        self._unsubscribe = self.identities.subscribe(self._identity_event)
        self.namespace_labels = await self.distribution.namespaces()
        await self.reload_policies()
        self._tasks = [
            asyncio.create_task(self._run_watch(POLICY_KEY, self._on_policy_revision), name="policy-watch"),
            asyncio.create_task(self._run_watch(NAMESPACE_PREFIX, self._on_namespace), name="namespace-watch"),
            asyncio.create_task(self._run_sync(), name="policy-sync"),
            asyncio.create_task(self._run_ct_gc(), name="ct-gc"),
        ]

    async def stop(self) -> None:
        for unsubscribe in (self._unsubscribe, self._unsubscribe_services):
            if unsubscribe:
                unsubscribe()
        self._unsubscribe = self._unsubscribe_services = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._worker.shutdown(wait=True)

    # -- inputs ----------------------------------------------------------------

    async def reload_policies(self) -> int:
        """Apply the kvstore's policy set to every local endpoint; returns its revision."""
        revision, docs = await self.distribution.load()
        if revision != self.revision:
            self.revision = revision
            await self._run(self._apply_policies, docs)
        return self.revision

    def _apply_policies(self, docs) -> None:
        self.engine.set_policies(docs)
        self._refresh_cidr_identities()
        self._refresh_fqdn_identities()
        self._sync_changed()

    async def set_fqdn_names(self, names: Mapping[str, Iterable[str]]) -> None:
        """The DNS cache's names and IPs (``pilus.fqdn``): when this returns, the IPs that
        toFQDNs selectors name have identities in the ipcache and the policy maps allow
        them, so a DNS answer may be released to the pod."""

        def apply() -> None:
            self.fqdn.set_names(names)
            self._refresh_fqdn_identities()
            self._sync_changed()

        await self._run(apply)

    def _refresh_fqdn_identities(self) -> None:
        """New identities reach the policy maps before the ipcache hands them to packets;
        gone ones leave the ipcache first (their IPs fall back to world or a CIDR)."""
        change = self.fqdn.refresh(self.engine.fqdn_selectors())
        if not change:
            return
        for ip, ident in change.removes.items():
            self.ipcache.delete(IPv4Network(f"{ip}/32"), Source.FQDN)
            self.engine.remove_identity(ident)
        for ident, labels in change.upserts.values():
            self.engine.upsert_identity(ident, labels)
        self._sync_changed()
        for ip, (ident, _labels) in change.upserts.items():
            self.ipcache.upsert(IPv4Network(f"{ip}/32"), ident, Source.FQDN)

    def _identity_event(self, kind: str, ident: Identity) -> None:
        def apply() -> None:
            if kind == "add":
                self.engine.upsert_identity(ident.id, ident.labels)
            else:
                self.engine.remove_identity(ident.id)

        self._worker.submit(apply)
        self._dirty.set()

    async def _on_policy_revision(self) -> None:
        await self.reload_policies()

    async def selectors(self) -> list[dict]:
        return await self._run(self.engine.selectors)

    async def trace(self, *args, **kwargs):
        return await self._run(lambda: self.engine.trace(*args, **kwargs))

    async def refresh_namespaces(self) -> None:
        await self._on_namespace()

    async def _on_namespace(self) -> None:
        current = await self.distribution.namespaces()
        changed = {ns for ns in set(current) | set(self.namespace_labels)
                   if current.get(ns) != self.namespace_labels.get(ns)}
        self.namespace_labels = current
        for ns in sorted(changed):
            if self.on_namespace_change is not None:
                await self.on_namespace_change(ns, current.get(ns, {}))

    async def endpoint_upserted(self, ep: Endpoint) -> int:
        """Register an endpoint and sync its policy map now; returns its enforcement flags."""

        def apply() -> int:
            self.endpoints[ep.id] = ep
            self.engine.upsert_endpoint(ep.id, parse_labels(ep.labels), _named_ports(ep.named_ports))
            self._set_cluster_named_ports()
            flags = self._sync_endpoint(ep.id)
            self._sync_changed()  # peers whose policy names this endpoint's new identity
            return flags

        return await self._run(apply)

    async def endpoint_removed(self, ep: Endpoint) -> None:
        def apply() -> None:
            self.endpoints.pop(ep.id, None)
            self.engine.remove_endpoint(ep.id)
            self._set_cluster_named_ports()
            with contextlib.suppress(Exception):
                self.datapath.policy.delete(ep.id)
            self._changed()

        await self._run(apply)

    async def watch_services(self, manager) -> None:
        """Follow a ServiceManager's services (``toServices``): every change feeds the
        engine from now on; the current services are applied before this returns."""
        self._unsubscribe_services = manager.subscribe(self.services_changed)
        fut = self.services_changed(manager.services())
        if fut is not None:
            await asyncio.wrap_future(fut)

    def services_changed(self, services: Iterable) -> Future | None:
        """Thread-safe, non-blocking (the ServiceManager calls it under its lock): queue
        the new service set on the policy worker, which re-syncs the affected endpoints."""
        refs = service_refs(services)

        def apply() -> None:
            try:
                self.engine.set_services(refs)
                self._refresh_cidr_identities()
                self._sync_changed()
            except Exception:
                log.exception("applying the services to policy failed")

        try:
            return self._worker.submit(apply)
        except RuntimeError:  # the worker is shut down: the agent is stopping
            return None

    async def set_remote_named_ports(self, specs: Iterable[Mapping[str, str]]) -> None:
        """The other nodes' endpoints' named ports ("http" -> "8080/TCP", one mapping per
        endpoint): egress rules naming a port resolve to these too."""
        ports: dict[str, set[tuple[int, int]]] = {}
        for spec in specs:
            for name, pp in _named_ports(spec).items():
                ports.setdefault(name, set()).add(pp)

        def apply() -> None:
            if ports != self._remote_named_ports:
                self._remote_named_ports = ports
                self._set_cluster_named_ports()
                self._sync_changed()

        await self._run(apply)

    def _set_cluster_named_ports(self) -> None:
        ports: dict[str, set[tuple[int, int]]] = {k: set(v) for k, v in self._remote_named_ports.items()}
        for ep in self.endpoints.values():
            for name, (port, proto) in _named_ports(ep.named_ports).items():
                ports.setdefault(name, set()).add((port, proto))
        self.engine.set_cluster_named_ports(ports)

    def _refresh_cidr_identities(self) -> None:
        """One local identity per CIDR that policies name; the ipcache maps the prefix to
        it as a GENERATED claim. A pod's /32 or a host address that a CIDR rule (or a
        toServices backend IP) names keeps its own entry: in-cluster peers are matched by
        identity, never by CIDR, and the ipcache's precedence lets the LOCAL claim win."""
        wanted = self.engine.cidr_prefixes()
        for prefix in [p for p in self.cidr_identities if p not in wanted]:
            self.engine.remove_identity(self.cidr_identities.pop(prefix))
            if prefix.prefixlen:
                self.ipcache.delete(prefix, Source.GENERATED)
        used = set(self.cidr_identities.values()) | set(self.ipblock_identities.values())
        next_id = LOCAL_IDENTITY_FLAG | 1
        for prefix in sorted(wanted - set(self.cidr_identities), key=lambda p: (p.prefixlen, p)):
            if prefix.prefixlen == 0:
                continue  # 0.0.0.0/0 is reserved:world, the agent's LOCAL entry
            while next_id in used:
                next_id += 1
            used.add(next_id)
            self.cidr_identities[prefix] = next_id
            labels = Labels([Label("cidr", str(prefix)), Label("reserved", "world")])
            self.engine.upsert_identity(next_id, labels)
            self.ipcache.upsert(prefix, next_id, Source.GENERATED)
        self._refresh_ipblock_identities()

    def _refresh_ipblock_identities(self) -> None:
        """One local identity per prefix that Kubernetes ipBlocks name, selected only by
        ipBlock selectors; pilus_ipblock maps the prefix to it (this is its only writer).
        Unlike the ipcache, pods' addresses are no obstacle: the datapath looks these up
        besides the peer's own identity, for endpoints whose policy uses an ipBlock."""
        wanted = self.engine.ipblock_prefixes()
        current = self.ipblock_identities
        # the first time, the pinned map holds what an earlier run chose: keep its numbers,
        # so that a restart rewrites neither this map nor the policy maps
        pinned = {} if self._ipblock_restored else dict(self.ipblock_writer.target.dump())
        for prefix in [p for p in current if p not in wanted]:
            self.engine.remove_identity(current.pop(prefix))
            self._ipblock_pending.pop(prefix, None)
        taken = set(self.cidr_identities.values()) | set(current.values())
        used = taken | set(pinned.values())  # fresh numbers avoid the pinned ones still to come
        next_id = IPBLOCK_IDENTITY_BASE
        for prefix in sorted(wanted - set(current), key=lambda p: (p.prefixlen, p)):
            ident = pinned.get(prefix)
            if ident is None or ident in taken:
                while next_id in used:
                    next_id += 1
                ident = next_id
            taken.add(ident)
            used.add(ident)
            current[prefix] = ident
            self.engine.upsert_identity(ident, ipblock_identity_labels(prefix))
            if pinned.get(prefix) != ident:
                self._ipblock_pending[prefix] = ident
        # deletes now (addresses fall back to shorter prefixes), also of an earlier run's
        # prefixes that no policy names now; new numbers wait for the policy maps
        # (_sync_changed), a renumbered prefix keeps its old one until then
        settled = {p: i for p, i in current.items() if p not in self._ipblock_pending}
        keep = {p: pinned[p] for p in self._ipblock_pending if p in pinned}
        self.ipblock_writer.set(settled | keep).raise_for_errors("pilus_ipblock")
        self._ipblock_restored = True

    @property
    def ipblock_writer(self) -> Reconciler:
        """pilus_ipblock's reconciler (built on first use: the map exists once loaded)."""
        if self._ipblock_writer is None:
            self._ipblock_writer = Reconciler("ipblock", self.datapath.ipblock)
        return self._ipblock_writer

    def reconcilers_status(self) -> list[dict]:
        """The maps this component writes itself (the ipcache and endpoint map have owners)."""
        return [self.datapath.policy.status(), self.ipblock_writer.status()]

    # -- output ----------------------------------------------------------------

    def _sync_changed(self) -> None:
        for ep_id in sorted(self.engine.changed_endpoints()):
            if ep_id in self.endpoints:
                self._sync_endpoint(ep_id)
        while self._ipblock_pending:
            prefix, ident = self._ipblock_pending.popitem()
            self.ipblock_writer.upsert(prefix, ident).raise_for_errors("pilus_ipblock")
        self._changed()

    def _changed(self) -> None:
        for callback in list(self.change_callbacks):
            try:
                callback()
            except Exception:
                log.exception("a policy change callback failed")

    def _sync_endpoint(self, ep_id: int) -> int:
        policy = self.engine.policy_for(ep_id)
        self.datapath.policy.sync(ep_id, policy.entries)
        flags = endpoint_flags(policy)
        ep = self.endpoints[ep_id]
        changed = ep.policy_flags != flags
        ep.policy_flags = flags
        if changed and ep.interface_index:  # already programmed: flip enforcement in place
            self.entries.upsert(endpoint_info(ep))
        self._changed()
        return flags

    async def _run_sync(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._run(self._sync_changed)
            except Exception:
                log.exception("policy sync failed; retrying")
                await asyncio.sleep(1)
                self._dirty.set()

    async def _run_watch(self, prefix: str, on_change) -> None:
        while True:
            try:
                async for _event in self.distribution.store.watch_prefix(prefix):
                    await on_change()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("watching %s failed; restarting the watch", prefix)
                await asyncio.sleep(1)
                await on_change()

    async def _run_ct_gc(self) -> None:
        while True:
            await asyncio.sleep(CT_GC_INTERVAL_S)
            try:
                removed = await asyncio.to_thread(self.datapath.ct.gc)
                log.debug("conntrack GC removed %d entries", removed)
            except Exception:
                log.exception("conntrack GC failed")


def service_refs(services: Iterable) -> dict[tuple[str, str], ServiceRef]:
    """ServiceManager services (pilus.loadbalancer.model.Service) -> the engine's input:
    metadata labels, pod selector, and explicit backend IPs (every state)."""
    out: dict[tuple[str, str], ServiceRef] = {}
    for svc in services:
        ips = [IPv4Address(str(e.ip)) for e in svc.endpoints or ()]
        out[(svc.namespace, svc.name)] = ServiceRef(
            dict(getattr(svc, "labels", None) or {}), dict(svc.selector) if svc.selector else None, ips
        )
    return out


def _named_ports(raw: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, spec in raw.items():
        port, proto = parse_port_spec(spec)
        out[name] = (port, protocols.number(proto))
    return out

