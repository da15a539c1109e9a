"""The table of kvstore backends: a name (``--kvstore``) -> how to open it.

It sits above the contract (:mod:`pilus.kvstore.base`) and the backends, so that base
never imports a backend; a new backend (etcd) is one more row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pilus.kvstore.base import KVStoreError, Store
from pilus.kvstore.embedded import EmbeddedStore


def _open_embedded(path: Path | str | None, **opts) -> Store:
    if path is None:
        raise KVStoreError("kvstore backend 'embedded' needs a path to its database file")
    return EmbeddedStore(Path(path), **opts)


#: backend name -> opener(path, **options)
BACKENDS: dict[str, Callable[..., Store]] = {
    "embedded": _open_embedded,
}


def open_store(backend: str = "embedded", *, path: Path | str | None = None, **opts) -> Store:
    """Open a kvstore backend. ``embedded`` needs ``path`` (the SQLite file)."""
    opener = BACKENDS.get(backend)
    if opener is None:
        raise KVStoreError(f"unknown kvstore backend {backend!r} (choices: {', '.join(BACKENDS)})")
    return opener(path, **opts)
