"""The endpoint map's one owner: pilus_lxc (and pilus_lxc_if with it) through a Reconciler.

The endpoint manager writes an endpoint's entry when it is programmed and removes it
when it goes; the policy sync rewrites it when the endpoint's enforcement flags change.
Both go through this owner, from the event loop and the policy worker thread: one lock
serialises them. Nothing is pruned until ``resync()``, which the manager calls once the
endpoints an earlier run saved are restored: the entries of the others go then.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from ipaddress import IPv4Address
from typing import Protocol

from pilus.datapath import EndpointInfo
from pilus.reconcile import ReconcileError, Reconciler


class EndpointMapLike(Protocol):
    """The datapath's endpoint map wrapper (datapath.maps.EndpointMap) as used here."""

    def upsert(self, ep: EndpointInfo) -> None: ...
    def delete(self, ipv4: IPv4Address) -> object: ...
    def items(self) -> Iterable[EndpointInfo]: ...


class EndpointMapTarget:
    """The endpoint map as a Reconciler target: IP -> EndpointInfo, for wrappers that
    offer only upsert/delete/items (EndpointMap has dump/update itself)."""

    def __init__(self, endpoint_map: EndpointMapLike) -> None:
        self.map = endpoint_map

    def dump(self) -> list[tuple[IPv4Address, EndpointInfo]]:
        return [(IPv4Address(info.ipv4), info) for info in self.map.items()]

    def update(self, key: IPv4Address, value: EndpointInfo) -> None:
        self.map.upsert(value)

    def delete(self, key: IPv4Address) -> None:
        self.map.delete(key)


class EndpointEntries:
    def __init__(self, endpoint_map: EndpointMapLike) -> None:
        self._reconciler: Reconciler[IPv4Address, EndpointInfo] = Reconciler(
            "endpoints", endpoint_map if hasattr(endpoint_map, "dump") else EndpointMapTarget(endpoint_map)
        )
        self._lock = threading.Lock()

    def upsert(self, info: EndpointInfo) -> None:
        key = IPv4Address(info.ipv4)
        with self._lock:
            _raise_for(key, self._reconciler.upsert(key, info).errors)

    def delete(self, ipv4: IPv4Address) -> None:
        key = IPv4Address(ipv4)
        with self._lock:
            _raise_for(key, self._reconciler.delete(key).errors)

    def resync(self) -> None:
        """Read the map back: repair drift, remove entries of endpoints that are gone."""
        with self._lock:
            self._reconciler.resync().raise_for_errors("endpoint map resync")

    def retry_due(self) -> bool:
        with self._lock:
            return self._reconciler.retry_due()

    def retry(self) -> None:
        with self._lock:
            self._reconciler.retry()

    def status(self) -> dict:
        with self._lock:
            return self._reconciler.status()


def _raise_for(key: IPv4Address, errors: list[tuple[object, BaseException]]) -> None:
    """A failed write stays pending (retried); the caller whose key failed hears of it."""
    for failed, exc in errors:
        if failed == key:
            raise ReconcileError(f"endpoint map {key}: writing failed: {exc}") from exc
