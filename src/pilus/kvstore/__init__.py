"""Cluster state store: one async interface, an embedded (SQLite) and an etcd backend.

See :mod:`pilus.kvstore.base` for the contract every backend follows and
:mod:`pilus.kvstore.backends` for the table of backends.
"""

from pilus.kvstore.backends import BACKENDS, open_store, store_options
from pilus.kvstore.base import (
    Compacted,
    KeyValue,
    KVStoreError,
    LeaseNotFound,
    Store,
    WatchEvent,
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
    "store_options",
]
