"""Endpoint lifecycle: create, delete and restore pods on this node.

Creating an endpoint walks the state table in `state.py`: allocate an IP and an
identity, build the netns + veth + routes, then write the datapath maps and attach
the programs. Any failure undoes every step already done, so a failed create
leaves no namespace, link, map entry, IP or identity behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

from pilus.datapath import Datapath
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.model import Endpoint, EndpointStore, check_named_ports, endpoint_info, split_name
from pilus.endpoint.plumbing import VethPlumbing
from pilus.endpoint.state import State
from pilus.identity.allocator import IdentityAllocator
from pilus.identity.labels import (
    K8S,
    LABEL_CLUSTER,
    LABEL_NAMESPACE,
    LABEL_NAMESPACE_LABELS,
    LABEL_SERVICE_ACCOUNT,
    Label,
    LabelError,
    Labels,
    endpoint_labels,
    parse_label,
)
from pilus.ipam.hostscope import HostScopeIPAM
from pilus.ipcache import IPCache, Source

if TYPE_CHECKING:
    from pilus.endpoint.policy_sync import PolicySync

log = logging.getLogger(__name__)

MAX_ENDPOINT_ID = 4095


# Label keys pilus derives from the endpoint (what they come from): a pod label can
# neither set nor remove them, as Cilium refuses changes to reserved labels.
DERIVED_KEYS = {
    LABEL_NAMESPACE: "its namespace",
    LABEL_SERVICE_ACCOUNT: "its service account",
    LABEL_CLUSTER: "the cluster",
}


def pod_label(text: str) -> Label:
    """One user-given pod label: `key=value` or `k8s:key=value`; other sources are the agent's."""
    label = parse_label(text)
    if label.source != K8S:
        raise LabelError(
            f"label {text!r}: endpoint labels are pod labels (source k8s), "
            f"source {label.source!r} is set by pilus itself"
        )
    origin = DERIVED_KEYS.get(label.key)
    if origin is None and label.key.startswith(LABEL_NAMESPACE_LABELS):
        origin = "its namespace's labels (pilus namespace set)"
    if origin is not None:
        raise LabelError(
            f"label {text!r}: key {label.key!r} is set by pilus from {origin}; "
            "it cannot be set or removed as a pod label"
        )
    return label


def pod_labels(raw: list[str]) -> list[Label]:
    return [pod_label(text) for text in raw]


def relabeled(current: list[str], add: list[str], delete: list[str]) -> list[str]:
    """The pod labels after `endpoint labels --delete KEY --add KEY=VALUE` (sorted).

    As cilium-dbg: deletes apply first, by key (a value given is ignored), and a key
    the pod does not carry is an error; an add replaces the value of its key.
    """
    labels = {label.key: label for label in map(parse_label, current)}
    for text in delete:
        label = pod_label(text)
        if label.key not in labels:
            have = ", ".join(sorted(labels)) or "none"
            raise LabelError(f"label {text!r}: not found on the endpoint (its pod label keys: {have})")
    for text in delete:
        labels.pop(parse_label(text).key, None)
    for label in Labels(pod_labels(add)):  # LabelError when one request sets a key twice
        labels[label.key] = label
    return [str(labels[key]) for key in sorted(labels)]


class EndpointExists(Exception):
    pass


class EndpointNotFound(Exception):
    pass


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cluster: str
    router_ip: IPv4Address
    pod_cidr: IPv4Network
    mtu: int = 1500
    route_mtu: int | None = None  # the pods' default route (tunnel mode: mtu - VXLAN overhead)


def lxc_name(node: str, namespace: str, pod: str) -> str:
    """Host-side veth name: 'lxc' + 11 hex chars (15-char kernel limit)."""
    return "lxc" + hashlib.sha1(f"{node}/{namespace}/{pod}".encode()).hexdigest()[:11]


class _Undo:
    """A stack of compensating actions, run in reverse when a create fails."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._steps.append((what, fn))

    async def run(self) -> None:
        for what, fn in reversed(self._steps):
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # keep undoing the rest
                log.warning("rollback step %s failed: %s", what, exc)


class EndpointManager:
    def __init__(
        self,
        node: NodeInfo,
        datapath: Datapath,
        identities: IdentityAllocator,
        ipam: HostScopeIPAM,
        store: EndpointStore,
        *,
        ipcache: IPCache,
        entries: EndpointEntries,
        plumbing: VethPlumbing | None = None,
        policy: PolicySync | None = None,
        namespace_labels: Callable[[str], dict[str, str]] | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.node = node
        self.datapath = datapath  # programs attach and detach here; its maps have owners
        self.identities = identities
        self.ipam = ipam
        self.store = store
        self.ipcache = ipcache  # LOCAL claims for the endpoints' addresses
        self.entries = entries
        self.plumbing = plumbing if plumbing is not None else VethPlumbing()
        self.endpoints: dict[int, Endpoint] = {}
        self._lock = asyncio.Lock()
        self.policy = policy  # the policy sync, once policy is running
        self.namespace_labels: Callable[[str], dict[str, str]] = namespace_labels or (lambda ns: {})
        self.on_change = on_change  # after any create/delete/relabel

    async def _changed(self) -> None:
        if self.on_change is not None:
            try:
                await self.on_change()
            except Exception:  # a listener's failure must not undo the endpoint change
                log.exception("endpoint change listener failed")

    # -- queries -------------------------------------------------------------

    def list(self) -> list[Endpoint]:
        return sorted(self.endpoints.values(), key=lambda ep: ep.id)

    def lookup(self, ref: str) -> Endpoint:
        if ref.isdigit():
            ep = self.endpoints.get(int(ref))
        else:
            namespace, pod = split_name(ref)
            ep = next(
                (e for e in self.endpoints.values() if (e.namespace, e.pod_name) == (namespace, pod)),
                None,
            )
        if ep is None:
            raise EndpointNotFound(f"endpoint {ref!r} not found on node {self.node.name}")
        return ep

    # -- create ----------------------------------------------------------------

    async def create(
        self,
        name: str,
        labels: list[str],
        service_account: str = "default",
        named_ports: dict[str, str] | None = None,
    ) -> Endpoint:
        namespace, pod = split_name(name)
        user_labels = [str(label) for label in pod_labels(labels)]  # LabelError on bad input
        named_ports = check_named_ports(named_ports or {})
        security = self._security_labels(namespace, user_labels, service_account)
        async with self._lock:
            if any((e.namespace, e.pod_name) == (namespace, pod) for e in self.endpoints.values()):
                raise EndpointExists(
                    f"endpoint {namespace}/{pod} already exists on node {self.node.name}: "
                    "delete it first or choose another name"
                )
            ep_id = self._next_id()
            undo = _Undo()
            try:
                ip = self.ipam.allocate(owner=f"{namespace}/{pod}")
                undo.push("release IP", lambda: self.ipam.release(ip))
                ep = Endpoint(
                    id=ep_id,
                    namespace=namespace,
                    pod_name=pod,
                    user_labels=user_labels,
                    service_account=service_account,
                    ipv4=ip,
                    netns=f"pilus-{self.node.name}-ep{ep_id}",
                    interface_name=lxc_name(self.node.name, namespace, pod),
                    named_ports=named_ports,
                )
                identity = await self.identities.allocate(security)
                undo.push("release identity", lambda: self.identities.release(identity.id, collect=True))
                ep.identity = identity.id
                ep.labels = [str(label) for label in identity.labels]
                ep.set_state(State.REGENERATING)
                undo.push("remove netns", lambda: self.plumbing.remove_netns(ep))
                undo.push("remove veth", lambda: self.plumbing.remove_veth(ep))
                await asyncio.to_thread(self.plumbing.plumb, ep, self.node.router_ip, self.node.mtu,
                                        self.node.route_mtu)
                undo.push("remove map entries", lambda: self._unprogram(ep))  # a coroutine: awaited
                await self._program(ep)
                ep.set_state(State.READY)
                self.store.save(ep)
            except BaseException:
                await undo.run()
                raise
            self.endpoints[ep.id] = ep
            log.info("endpoint %d %s ready: %s identity %d", ep.id, ep.name, ep.ipv4, ep.identity)
        await self._changed()
        return ep

    def _security_labels(self, namespace: str, user_labels: list[str], service_account: str):
        # user labels were checked on the way in; the derived labels win over them here
        pod = {label.key: label.value for label in map(parse_label, user_labels)}
        ns_labels = {k: v for k, v in self.namespace_labels(namespace).items()}
        return endpoint_labels(
            namespace, pod, service_account=service_account, cluster=self.node.cluster, namespace_labels=ns_labels
        )

    def _next_id(self) -> int:
        used = set(self.endpoints)
        for candidate in range(1, MAX_ENDPOINT_ID + 1):
            if candidate not in used:
                return candidate
        raise RuntimeError(f"node {self.node.name} has {MAX_ENDPOINT_ID} endpoints: delete some first")

    async def _program(self, ep: Endpoint) -> None:
        """Datapath state for the endpoint: policy map, endpoint and ipcache entries, then programs."""
        if self.policy is not None:
            ep.policy_flags = await self.policy.endpoint_upserted(ep)
        self.entries.upsert(endpoint_info(ep))
        self.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity, Source.LOCAL)
        self.datapath.attach_endpoint(ep.interface_index)

    async def _unprogram(self, ep: Endpoint) -> None:
        if self.policy is not None:
            await self.policy.endpoint_removed(ep)
        self.datapath.detach_endpoint(ep.interface_index)
        self.ipcache.delete(IPv4Network(f"{ep.ipv4}/32"), Source.LOCAL)
        self.entries.delete(ep.ipv4)

    # -- delete ----------------------------------------------------------------

    async def delete(self, ref: str) -> Endpoint:
        async with self._lock:
            ep = self.lookup(ref)
            ep.set_state(State.DISCONNECTING)
            await self._unprogram_quietly(ep)
            await asyncio.to_thread(self.plumbing.teardown, ep)
            await self.identities.release(ep.identity, collect=True)
            self.ipam.release(ep.ipv4)
            self.store.remove(ep.id)
            ep.set_state(State.DISCONNECTED)
            del self.endpoints[ep.id]
        await self._changed()
        return ep

    async def _unprogram_quietly(self, ep: Endpoint) -> None:
        try:
            await self._unprogram(ep)
        except Exception as exc:  # a half-gone endpoint is still deleted
            log.warning("deleting endpoint %d: %s", ep.id, exc)

    # -- relabel -----------------------------------------------------------------

    async def namespace_changed(self, namespace: str) -> list[Endpoint]:
        """Namespace labels are identity labels: give that namespace's endpoints new identities."""
        changed = []
        async with self._lock:
            for ep in self.list():
                if ep.namespace == namespace and await self._reidentify(ep):
                    changed.append(ep)
        if changed:
            await self._changed()
        return changed

    async def relabel(self, ref: str, add: list[str], delete: list[str]) -> tuple[Endpoint, int]:
        """`endpoint labels`: change a live pod's labels; returns it and its previous identity.

        Bad labels raise LabelError before anything changes. The new labels are saved
        in the state dir, so an agent restart restores them.
        """
        if not add and not delete:
            raise LabelError("no label change given: name labels to add and/or delete")
        async with self._lock:
            ep = self.lookup(ref)
            previous, old_labels = ep.identity, ep.user_labels
            ep.user_labels = relabeled(ep.user_labels, add, delete)
            try:
                if not await self._reidentify(ep):
                    self.store.save(ep)  # same identity (e.g. an info-only label): keep the labels
            except BaseException:
                if ep.identity == previous:  # failed before the switch: nothing changed
                    ep.user_labels = old_labels
                raise
        log.info("endpoint %d %s relabelled: identity %d -> %d", ep.id, ep.name, previous, ep.identity)
        await self._changed()
        return ep, previous

    async def _reidentify(self, ep: Endpoint) -> bool:
        """Give `ep` the identity of its current labels (lock held); False if it keeps its own.

        The new identity is taken before the old one is let go, so a label set that
        stays in use keeps its number; `_program` rewrites the endpoint's policy map,
        the peers' maps that name either identity, and its endpoint and ipcache entries.
        """
        security = self._security_labels(ep.namespace, ep.user_labels, ep.service_account)
        identity = await self.identities.allocate(security)
        if identity.id == ep.identity:
            await self.identities.release(identity.id)  # drop the extra reference
            return False
        old = ep.identity
        ep.set_state(State.REGENERATING)
        ep.identity, ep.labels = identity.id, [str(label) for label in identity.labels]
        await self._program(ep)
        ep.set_state(State.READY)
        self.store.save(ep)
        await self.identities.release(old, collect=True)
        return True

    # -- restore ---------------------------------------------------------------

    async def restore(self) -> list[Endpoint]:
        """Take back the endpoints saved in the state dir after an agent restart.

        The pinned maps and attached programs kept forwarding meanwhile; this
        re-registers IPs and identities, re-attaches the freshly loaded programs
        (atomic replace) and rewrites map entries, so nothing is torn down.
        """
        restored = []
        for ep in self.store.load_all():
            ep.state = State.RESTORING
            ifindex = await asyncio.to_thread(self.plumbing.find, ep)
            if ifindex is None:
                log.warning("endpoint %d %s lost its netns or veth; removing it", ep.id, ep.name)
                self.store.remove(ep.id)
                await self._unprogram_quietly(ep)
                await asyncio.to_thread(self.plumbing.teardown, ep)
                continue
            self.ipam.allocate_specific(ep.ipv4, owner=ep.name)
            security = self._security_labels(ep.namespace, ep.user_labels, ep.service_account)
            identity = await self.identities.allocate(security)
            ep.identity = identity.id
            ep.labels = [str(label) for label in identity.labels]
            ep.interface_index = ifindex
            await self._program(ep)
            ep.set_state(State.READY)
            self.store.save(ep)
            self.endpoints[ep.id] = ep
            restored.append(ep)
        self.entries.resync()  # the entries of endpoints that did not come back go
        return restored

