"""The table of kvstore backends: a name (``--kvstore``) -> how to open it.

It sits above the contract (:mod:`pilus.kvstore.base`) and the backends, so that base
never imports a backend; a new backend (etcd) is one more row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from pilus.kvstore.base import KVStoreError, Store
from pilus.kvstore.embedded import EmbeddedStore
from pilus.kvstore.etcd import EtcdStore


def _open_embedded(path: Path | str | None, **opts) -> Store:
    if path is None:
        raise KVStoreError("kvstore backend 'embedded' needs a path to its database file")
    return EmbeddedStore(Path(path), **opts)


def _open_etcd(path: Path | str | None, *, address: str = "http://127.0.0.1:2379", **opts) -> Store:
    del path  # etcd keeps its own data; the agent's default file path does not apply
    return EtcdStore(address, **opts)


#: backend name -> opener(path, **options)
BACKENDS: dict[str, Callable[..., Store]] = {
    "embedded": _open_embedded,
    "etcd": _open_etcd,
}

#: backend name -> the options ``--kvstore-opt BACKEND.NAME=VALUE`` may set (Cilium's shape)
OPTIONS: dict[str, tuple[str, ...]] = {
    "embedded": (),
    "etcd": ("address",),
}


def store_options(backend: str, pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``[("etcd.address", URL)]`` -> ``{"address": URL}`` for ``open_store``; unknown keys fail."""
    known = OPTIONS.get(backend, ())
    opts: dict[str, str] = {}
    for key, value in pairs:
        name = key.removeprefix(f"{backend}.")
        if name == key or name not in known:
            choices = ", ".join(f"{backend}.{n}" for n in known) or "none"
            raise KVStoreError(f"unknown kvstore option {key!r} for backend {backend!r} (known: {choices})")
        opts[name] = value
    return opts


def open_store(backend: str = "embedded", *, path: Path | str | None = None, **opts) -> Store:
    """Open a kvstore backend. ``embedded`` needs ``path`` (the SQLite file); ``etcd`` takes ``address``."""
    opener = BACKENDS.get(backend)
    if opener is None:
        raise KVStoreError(f"unknown kvstore backend {backend!r} (choices: {', '.join(BACKENDS)})")
    return opener(path, **opts)
