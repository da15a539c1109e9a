"""What a flow needs to know about its two ends, and where it asks: the seam between
Hubble and the agent's endpoints and identities.

The flow parser asks an ``EndpointLookup`` for the endpoint behind an IP (a local
endpoint, or a pod of another node that the agent learnt from the kvstore) and for the
labels of a numeric identity. ``StaticLookup`` answers from tables (tests, and any
caller that keeps such tables); ``AgentLookup`` adapts the agent's parts (its endpoints,
the other nodes' endpoints from the kvstore, the identity cache), given as callables so
that this room imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pilus.identity.reserved import reserved_by_id


@dataclass(frozen=True)
class EndpointDetails:
    """One end of a flow as the agent knows it. ``id`` is the endpoint id on this node
    (0 for a pod of another node); ``labels`` are ``source:key=value`` strings
    (``k8s:app=xwing``); ``cluster_name`` empty means the local cluster."""

    id: int
    identity: int
    namespace: str = ""
    pod_name: str = ""
    labels: tuple[str, ...] = ()
    ip: str = ""
    cluster_name: str = ""


@runtime_checkable
class EndpointLookup(Protocol):
    def endpoint_by_ip(self, ip: str) -> EndpointDetails | None:
        """The endpoint (local, or a remote pod) with this address, if any."""
        ...

    def endpoint_by_id(self, endpoint_id: int) -> EndpointDetails | None:
        """The local endpoint with this id, if any."""
        ...

    def identity_labels(self, identity: int) -> Sequence[str]:
        """The labels of a numeric identity (empty when unknown)."""
        ...


def labels_of(lookup: EndpointLookup, identity: int) -> list[str]:
    """``lookup.identity_labels``, falling back to the reserved identities' labels
    (``reserved:world`` for 2, ...) when the lookup does not know the identity."""
    labels = list(lookup.identity_labels(identity)) if identity else []
    if not labels and (reserved := reserved_by_id(identity)) is not None:
        labels = reserved.labels.to_list()
    return sorted(labels)


class StaticLookup:
    """An EndpointLookup over tables: endpoints (their ``ip`` is the key) and
    identity -> labels. ``add`` and ``remove`` keep the tables current."""

    def __init__(self, endpoints: Iterable[EndpointDetails] = (),
                 identities: Mapping[int, Sequence[str]] | None = None) -> None:
        self._by_ip: dict[str, EndpointDetails] = {}
        self._by_id: dict[int, EndpointDetails] = {}
        self._identities: dict[int, tuple[str, ...]] = {
            k: tuple(v) for k, v in (identities or {}).items()}
        for ep in endpoints:
            self.add(ep)

    def add(self, ep: EndpointDetails) -> None:
        if not ep.ip:
            raise ValueError(f"endpoint {ep.namespace}/{ep.pod_name} has no ip")
        self.remove(ep.ip)
        self._by_ip[ep.ip] = ep
        if ep.id:
            self._by_id[ep.id] = ep
        self._identities.setdefault(ep.identity, ep.labels)

    def remove(self, ip: str) -> None:
        old = self._by_ip.pop(ip, None)
        if old is not None and self._by_id.get(old.id) is old:
            del self._by_id[old.id]

    def set_identity(self, identity: int, labels: Sequence[str]) -> None:
        self._identities[identity] = tuple(labels)

    def endpoint_by_ip(self, ip: str) -> EndpointDetails | None:
        return self._by_ip.get(ip)

    def endpoint_by_id(self, endpoint_id: int) -> EndpointDetails | None:
        return self._by_id.get(endpoint_id)

    def identity_labels(self, identity: int) -> Sequence[str]:
        return self._identities.get(identity, ())


class AgentLookup:
    """An EndpointLookup over the agent's parts:

    - ``local_endpoints()``: this node's endpoints (pilus.endpoint.model.Endpoint: ``id``,
      ``identity``, ``namespace``, ``pod_name``, ``labels``, ``ipv4``);
    - ``remote_by_ip(ip)``: another node's endpoint (pilus.ipcache.kvsync.IPIdentityPair:
      ``identity``, ``endpoint`` = ``namespace/pod``) or None;
    - ``identity_labels(identity)``: the labels of an identity (label strings or a
      pilus Labels), None or empty when unknown; must not block (a cache).

    Local endpoints are found by a scan per call (a node has tens to hundreds).
    """

    def __init__(self, local_endpoints: Callable[[], Iterable[Any]],
                 remote_by_ip: Callable[[str], Any | None] | None = None,
                 identity_labels: Callable[[int], Iterable[Any] | None] | None = None) -> None:
        self._local = local_endpoints
        self._remote = remote_by_ip
        self._identity_labels = identity_labels

    @staticmethod
    def _details(ep: Any) -> EndpointDetails:
        return EndpointDetails(ep.id, ep.identity, ep.namespace, ep.pod_name,
                               tuple(str(lbl) for lbl in ep.labels), ip=str(ep.ipv4))

    def endpoint_by_ip(self, ip: str) -> EndpointDetails | None:
        for ep in self._local():
            if str(ep.ipv4) == ip:
                return self._details(ep)
        pair = self._remote(ip) if self._remote is not None else None
        if pair is None:
            return None
        namespace, _, pod = str(pair.endpoint).rpartition("/")
        return EndpointDetails(0, pair.identity, namespace, pod, tuple(self.identity_labels(pair.identity)), ip=ip)

    def endpoint_by_id(self, endpoint_id: int) -> EndpointDetails | None:
        return next((self._details(ep) for ep in self._local() if ep.id == endpoint_id), None)

    def identity_labels(self, identity: int) -> Sequence[str]:
        labels = self._identity_labels(identity) if self._identity_labels is not None else None
        if labels:
            return tuple(str(lbl) for lbl in labels)
        # an identity only a local endpoint has told us about
        return next((tuple(str(lbl) for lbl in ep.labels) for ep in self._local() if ep.identity == identity), ())
