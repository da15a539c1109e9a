"""What a flow needs to know about its two ends, and where it asks: the seam between
Hubble and the agent's endpoints and identities.

The flow parser asks an ``EndpointLookup`` for the endpoint behind an IP (a local
endpoint, or a pod of another node that the agent learnt from the kvstore) and for the
labels of a numeric identity; it is called for every event, so it must answer from
memory, never wait. A lookup may also answer ``service_at(ip, port, proto)`` (the
service behind a frontend) and ``dns_names(ip)``; flows then carry them.
``StaticLookup`` answers from tables (tests, and any caller that keeps such tables);
the agent passes its own adapter over its endpoints, the other
nodes' endpoints and its identity cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
    if not identity:
        return []  # no identity known (e.g. a trace's destination): no labels either
    labels = list(lookup.identity_labels(identity))
    if not labels and (reserved := reserved_by_id(identity)) is not None:
        labels = reserved.labels.to_list()
    return sorted(labels)


class StaticLookup:
    """An EndpointLookup over tables: endpoints (their ``ip`` is the key) and
    identity -> labels. ``add`` and ``remove`` keep the tables current."""

    def __init__(self, endpoints: Iterable[EndpointDetails] = (),
                 identities: Mapping[int, Sequence[str]] | None = None,
                 services: Mapping[tuple[str, int, str], tuple[str, str]] | None = None) -> None:
        self._services = dict(services or {})  # (ip, port, proto) -> (namespace, name)
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

    def service_at(self, ip: str, port: int, proto: str) -> tuple[str, str] | None:
        return self._services.get((ip, port, proto))

