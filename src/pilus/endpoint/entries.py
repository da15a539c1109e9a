"""The endpoint map's one owner: pilus_lxc (and pilus_lxc_if with it) through a Reconciler.

The endpoint manager writes an endpoint's entry when it is programmed and removes it
when it goes; the policy sync rewrites it when the endpoint's enforcement flags change.
Both go through this owner, from the event loop and the policy worker thread: one lock
serialises them. Nothing is pruned until ``resync()``, which the manager calls once the
endpoints an earlier run saved are restored: the entries of the others go then.
"""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

from pilus.datapath import EndpointInfo
from pilus.reconcile import MapTarget, ReconcileError, Reconciler


class EndpointEntries:
    def __init__(self, endpoint_map: MapTarget[IPv4Address, EndpointInfo]) -> None:
        # the datapath's EndpointMap: endpoint IP -> EndpointInfo
        self._reconciler: Reconciler[IPv4Address, EndpointInfo] = Reconciler("endpoints", endpoint_map)
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
