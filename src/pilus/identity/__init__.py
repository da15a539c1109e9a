"""Security identities: labels, reserved identities, cluster-wide allocation."""

from pilus.identity.allocator import DEFAULT_PREFIX, Identity, IdentityAllocator, IdentityError
from pilus.identity.labels import (
    SOURCES,
    Label,
    LabelError,
    Labels,
    endpoint_labels,
    is_identity_relevant,
    parse_label,
    parse_labels,
    split_identity_labels,
)
from pilus.identity.reserved import (
    LOCAL_IDENTITY_FLAG,
    MAX_GLOBAL_IDENTITY,
    MIN_GLOBAL_IDENTITY,
    RESERVED_IDENTITIES,
    ReservedIdentity,
    is_local,
    is_reserved,
    reserved_by_id,
    reserved_by_labels,
    reserved_by_name,
)

__all__ = [
    "DEFAULT_PREFIX",
    "LOCAL_IDENTITY_FLAG",
    "MAX_GLOBAL_IDENTITY",
    "MIN_GLOBAL_IDENTITY",
    "RESERVED_IDENTITIES",
    "SOURCES",
    "Identity",
    "IdentityAllocator",
    "IdentityError",
    "Label",
    "LabelError",
    "Labels",
    "ReservedIdentity",
    "endpoint_labels",
    "is_identity_relevant",
    "is_local",
    "is_reserved",
    "parse_label",
    "parse_labels",
    "reserved_by_id",
    "reserved_by_labels",
    "reserved_by_name",
    "split_identity_labels",
]
