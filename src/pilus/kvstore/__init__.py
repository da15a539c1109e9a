"""Cluster state store: one async interface, an embedded (SQLite) backend.

See :mod:`pilus.kvstore.base` for the contract every backend follows.
"""

from pilus.kvstore.base import (
    BACKENDS,
    Compacted,
    KeyValue,
    KVStoreError,
    LeaseNotFound,
    Store,
    WatchEvent,
    open_store,
    prefix_end,
)

__all__ = [
    "BACKENDS",
    "Compacted",
    "KVStoreError",
    "KeyValue",
    "LeaseNotFound",
    "Store",
    "WatchEvent",
    "open_store",
    "prefix_end",
]
