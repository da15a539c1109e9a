"""The ipcache's one owner: prefix -> identity claims from several sources, merged by
precedence, written to the map through one Reconciler.

Sources and precedence (higher wins when two name the same prefix), after Cilium's
ipcache metadata layer, where ``source.AllowOverwrite`` lets local state overwrite
what the kvstore learned, and both overwrite generated entries:

  LOCAL      this node's endpoints, router and node IPs, the world default
  KVSTORE    remote endpoints and nodes (multi-node)
  FQDN       local identities of the IPs DNS answers gave for toFQDNs selectors
  GENERATED  local CIDR identities of the prefixes policies name

A claim hides the lower ones for its prefix without removing them: when a pod's /32
that a CIDR rule also names is deleted, the CIDR identity comes back. ``delete``
removes only the claim of the source given.

Restart: the map outlives the agent. What an earlier run left there is read on the
first write ("restored" entries) and nothing is pruned until the owner calls
``resync()``, which the agent does once every source has claimed again (after the
endpoints are restored). Until then a restored entry whose identity is not a
local-scope (CIDR) one hides GENERATED claims as a live endpoint or node entry
would, so a policy CIDR naming a pod never takes the pod's entry over while the
pod is being restored; restored CIDR entries hide nothing (the policy sync claims
them again, maybe with another number). Cilium's ``source.Restored`` ranks lowest;
ranking it just above GENERATED keeps the old behaviour of pilus (an in-cluster
address keeps its identity) during the restart window.

Calls come from the event loop (endpoints) and the policy worker thread (CIDRs):
one lock serialises them. A failed map write stays pending (``status()``,
``retry()``), and the caller whose write failed gets a ReconcileError.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network

from pilus.identity.reserved import is_local
from pilus.reconcile import MapTarget, ReconcileError, Reconciler, Result

#: the map's value as the reconciler compares it: (identity, tunnel endpoint)
Value = tuple[int, IPv4Address | None]


class Source(IntEnum):
    GENERATED = 1  # policy CIDR / ipBlock prefixes (local CIDR identities)
    FQDN = 2  # IPs the DNS proxy learned for toFQDNs selectors (local FQDN identities)
    KVSTORE = 3  # remote endpoints and nodes (multi-node)
    LOCAL = 4  # this node's endpoints, router and node IPs, world default


@dataclass(frozen=True)
class IPCacheEntry:
    prefix: IPv4Network
    identity: int
    source: Source | None  # None: restored from the map, no source has claimed it yet
    tunnel_endpoint: IPv4Address | None = None


class IPCache:
    def __init__(self, target: MapTarget[IPv4Network, Value]) -> None:
        self._map = target  # the datapath's IpcacheMap: prefix -> (identity, tunnel endpoint)
        self._reconciler: Reconciler[IPv4Network, Value] = Reconciler("ipcache", self._map)
        self._claims: dict[IPv4Network, dict[Source, IPCacheEntry]] = {}
        self._restored: dict[IPv4Network, IPCacheEntry] | None = None  # None: map not read yet
        self._lock = threading.RLock()

    # -- claims ------------------------------------------------------------------

    def upsert(
        self,
        prefix: IPv4Network,
        identity: int,
        source: Source,
        tunnel_endpoint: IPv4Address | None = None,
    ) -> None:
        prefix = IPv4Network(prefix, strict=False)
        entry = IPCacheEntry(prefix, identity, Source(source), tunnel_endpoint)
        with self._lock:
            self._read_restored()
            self._claims.setdefault(prefix, {})[entry.source] = entry
            self._write(prefix)

    def delete(self, prefix: IPv4Network, source: Source) -> None:
        prefix = IPv4Network(prefix, strict=False)
        with self._lock:
            self._read_restored()
            claims = self._claims.get(prefix, {})
            if claims.pop(Source(source), None) is None:
                return
            if not claims:
                del self._claims[prefix]
            self._write(prefix)

    # -- reads ---------------------------------------------------------------------

    def items(self) -> list[IPCacheEntry]:
        """The winning entry per prefix, as the map should hold it."""
        with self._lock:
            prefixes = set(self._claims) | set(self._restored or ())
            winners = [e for e in map(self._winner, prefixes) if e is not None]
        return sorted(winners, key=lambda e: (e.prefix.network_address, e.prefix.prefixlen))

    def lookup(self, addr: IPv4Address) -> IPCacheEntry | None:
        """The longest prefix holding ``addr``, as the datapath's LPM lookup finds it."""
        addr = IPv4Address(addr)
        with self._lock:
            for plen in range(32, -1, -1):
                entry = self._winner(IPv4Network((addr, plen), strict=False))
                if entry is not None:
                    return entry
        return None

    def status(self) -> dict:
        with self._lock:
            entries = {source.name.lower(): 0 for source in Source}
            for claims in self._claims.values():
                for source in claims:
                    entries[source.name.lower()] += 1
            entries["restored"] = len(self._restored or ())
            return self._reconciler.status() | {"entries": entries}

    # -- repair ----------------------------------------------------------------------

    def resync(self) -> None:
        """Read the map back and make it hold exactly the winning claims: drift is repaired,
        and what no source claims (an earlier run's leftovers) goes."""
        with self._lock:
            restored, self._restored = self._restored or {}, {}
            for prefix in restored:
                self._sync_prefix(prefix)
            self._reconciler.resync().raise_for_errors("ipcache resync")

    def retry_due(self) -> bool:
        with self._lock:
            return self._reconciler.retry_due()

    def retry(self) -> Result:
        """Write the entries whose earlier write failed (call when ``retry_due``)."""
        with self._lock:
            return self._reconciler.retry()

    # -- internals ---------------------------------------------------------------------

    def _read_restored(self) -> None:
        if self._restored is None:
            self._restored = {
                prefix: IPCacheEntry(prefix, identity, None, tunnel)
                for prefix, (identity, tunnel) in self._map.dump()
                if not is_local(identity)  # an earlier run's CIDR entries: the policy sync claims them again
            }

    def _winner(self, prefix: IPv4Network) -> IPCacheEntry | None:
        claims = self._claims.get(prefix)
        best = claims[max(claims)] if claims else None
        restored = (self._restored or {}).get(prefix)
        if restored is not None and (best is None or best.source in (Source.GENERATED, Source.FQDN)):
            return restored
        return best

    def _write(self, prefix: IPv4Network) -> None:
        mine = [(key, exc) for key, exc in self._sync_prefix(prefix).errors if key == prefix]
        if mine:
            raise ReconcileError(f"ipcache {prefix}: writing the map failed: {mine[0][1]}") from mine[0][1]

    def _sync_prefix(self, prefix: IPv4Network) -> Result:
        winner = self._winner(prefix)
        if winner is None:
            return self._reconciler.delete(prefix)
        return self._reconciler.upsert(prefix, (winner.identity, winner.tunnel_endpoint))
