"""Cilium's reserved identities and numeric identity ranges, as data.

Numbers and names follow Cilium (pkg/identity/numericidentity.go): the label set
of a reserved identity is ``reserved:<name>``, except kube-apiserver whose set
is ``reserved:kube-apiserver`` + ``reserved:remote-node``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilus.identity.labels import RESERVED, Label, Labels

__all__ = [
    "HEALTH",
    "HOST",
    "IDENTITY_SCOPE_MASK",
    "INGRESS",
    "INIT",
    "KUBE_APISERVER",
    "LOCAL_IDENTITY_FLAG",
    "MAX_GLOBAL_IDENTITY",
    "MIN_GLOBAL_IDENTITY",
    "REMOTE_NODE",
    "RESERVED_IDENTITIES",
    "UNKNOWN",
    "UNMANAGED",
    "WORLD",
    "WORLD_IPV4",
    "WORLD_IPV6",
    "ReservedIdentity",
    "is_global",
    "is_local",
    "is_reserved",
    "reserved_by_id",
    "reserved_by_labels",
    "reserved_by_name",
]

UNKNOWN = 0
HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS = 8
WORLD_IPV4 = 9
WORLD_IPV6 = 10

#: top 8 bits are the scope; local (CIDR/FQDN, node-local) identities have bit 24 set
LOCAL_IDENTITY_FLAG = 1 << 24
IDENTITY_SCOPE_MASK = 0xFF << 24
#: cluster-wide identities allocated through the kvstore (cluster ID 0)
MIN_GLOBAL_IDENTITY = 256
MAX_GLOBAL_IDENTITY = 65535


@dataclass(frozen=True)
class ReservedIdentity:
    id: int
    name: str
    labels: Labels
    description: str


def _r(id_: int, name: str, description: str, *extra: str) -> ReservedIdentity:
    labels = Labels(Label(RESERVED, n) for n in (name, *extra))
    return ReservedIdentity(id_, name, labels, description)


RESERVED_IDENTITIES: tuple[ReservedIdentity, ...] = (
    _r(UNKNOWN, "unknown", "not yet resolved"),
    _r(HOST, "host", "the local node"),
    _r(WORLD, "world", "anything outside the cluster"),
    _r(UNMANAGED, "unmanaged", "endpoints not managed by pilus"),
    _r(HEALTH, "health", "health-check endpoints"),
    _r(INIT, "init", "endpoints whose labels are not known yet"),
    _r(REMOTE_NODE, "remote-node", "the other nodes of the cluster"),
    _r(KUBE_APISERVER, "kube-apiserver", "the Kubernetes API server", "remote-node"),
    _r(INGRESS, "ingress", "the ingress proxy's source address"),
    _r(WORLD_IPV4, "world-ipv4", "IPv4 outside the cluster (dual stack)"),
    _r(WORLD_IPV6, "world-ipv6", "IPv6 outside the cluster (dual stack)"),
)

_BY_ID = {r.id: r for r in RESERVED_IDENTITIES}
_BY_NAME = {r.name: r for r in RESERVED_IDENTITIES}
_BY_LABELS = {r.labels: r for r in RESERVED_IDENTITIES}
_HOST_LABEL = Label(RESERVED, "host")


def reserved_by_id(id_: int) -> ReservedIdentity | None:
    return _BY_ID.get(id_)


def reserved_by_name(name: str) -> ReservedIdentity | None:
    """``"host"`` or ``"reserved:host"``."""
    return _BY_NAME.get(name.removeprefix(RESERVED + ":"))


def reserved_by_labels(labels: Labels) -> ReservedIdentity | None:
    """The reserved identity a label set maps to, if any.

    An exact reserved label set maps to its identity; any set containing
    ``reserved:host`` is the host (the host endpoint also carries node labels).
    """
    hit = _BY_LABELS.get(labels)
    if hit is None and _HOST_LABEL in labels:
        hit = _BY_ID[HOST]
    return hit


def is_reserved(id_: int) -> bool:
    return id_ in _BY_ID


def is_local(id_: int) -> bool:
    return (id_ & IDENTITY_SCOPE_MASK) == LOCAL_IDENTITY_FLAG


def is_global(id_: int) -> bool:
    return MIN_GLOBAL_IDENTITY <= id_ <= MAX_GLOBAL_IDENTITY
