"""An in-memory Datapath for tests without root.

``FakeDatapath`` offers the surface the agent's components use (ipcache, endpoint
map, policy maps, ipBlock map, LB maps, conntrack, metrics, events, programs,
map_stats, attach/detach) with the real semantics on what
:func:`pilus.testing.check_datapath.check_datapath` checks; the same check runs
against the real :class:`pilus.datapath.Datapath` (tests/bpf), so a difference
between the two is a test failure, not a surprise in production.

Events: ``emit(record)`` queues a raw ring-buffer record; readers decode it with
the datapath's own decoder. Writes: every map part appends (map, op, key) to the
datapath's ``journal`` and counts them in ``writes``; a key in a part's ``fail`` set
makes its writes raise OSError as a full or refused BPF map does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pilus.datapath import lb as lbmaps
from pilus.datapath.events import decode_records
from pilus.datapath.maps import EndpointInfo
from pilus.policy.mapstate import PolicyEntry, normalize
from pilus.reconcile import writers_status

#: names as the real datapath reports them (programs(), map_stats())
PROGRAM_HOOKS = {"cil_from_container": "tc-ingress", "cil_to_container": "tc-egress"}
MAP_KINDS = {
    "pilus_lxc": ("hash", 65536),
    "pilus_lxc_if": ("hash", 65536),
    "pilus_ipcache": ("lpm_trie", 512000),
    "pilus_tunnel_map": ("lpm_trie", 65536),
    "pilus_ipblock": ("lpm_trie", 16384),
    "pilus_ct4": ("lru_hash", 262144),
    "pilus_metrics": ("percpu_hash", 1024),
    "pilus_policy": ("hash_of_maps", 65536),
    "pilus_lb4_svc": ("hash", lbmaps.PILUS_LB_SVC_MAX),
    "pilus_lb4_be": ("hash", lbmaps.PILUS_LB_BE_MAX),
    "pilus_lb4_revnat": ("hash", lbmaps.PILUS_LB_REVNAT_MAX),
    "pilus_lb4_maglev": ("hash", lbmaps.PILUS_LB_MAGLEV_MAX),
}


def _net(prefix) -> IPv4Network:
    return IPv4Network(prefix, strict=False)


class _Journaled:
    """Writes of one map: counted, appended to the datapath's shared ``journal`` as
    (map, op, key), and refused for keys in ``fail`` as a full or refused BPF map does."""

    map_name = ""  # as the real map's errors name it
    part = ""  # the Datapath attribute, as the journal names it

    def __init__(self, journal: list | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.fail: set = set()
        self.writes = 0

    def _write(self, op: str, key) -> None:
        if key in self.fail:
            if op == "upsert":
                raise OSError(28, f"{self.map_name} update {key}: no space left on device")
            raise OSError(1, f"{self.map_name} delete {key}: operation not permitted")
        self.writes += 1
        self.journal.append((self.part, op, key))


class FakeIpcache(_Journaled):
    """pilus_ipcache, as IpcacheMap: ``rows`` prefix -> identity, ``tunnels`` prefix ->
    tunnel endpoint (only for the prefixes that have one)."""

    map_name, part = "pilus_ipcache", "ipcache"

    def __init__(self, journal: list | None = None) -> None:
        super().__init__(journal)
        self.rows: dict[IPv4Network, int] = {}
        self.tunnels: dict[IPv4Network, IPv4Address] = {}

    def upsert(self, prefix, identity: int, tunnel_endpoint: IPv4Address | None = None) -> None:
        prefix = _net(prefix)
        self._write("upsert", prefix)
        self.rows[prefix] = identity
        if tunnel_endpoint is None:
            self.tunnels.pop(prefix, None)
        else:
            self.tunnels[prefix] = IPv4Address(tunnel_endpoint)

    def delete(self, prefix) -> bool:
        prefix = _net(prefix)
        self._write("delete", prefix)
        self.tunnels.pop(prefix, None)
        return self.rows.pop(prefix, None) is not None

    def items(self) -> list[tuple[IPv4Network, int, IPv4Address | None]]:
        rows = [(p, ident, self.tunnels.get(p)) for p, ident in self.rows.items()]
        return sorted(rows, key=lambda t: (t[0].network_address, t[0].prefixlen))

    # Reconciler target: prefix -> (identity, tunnel endpoint or None)
    def dump(self) -> list[tuple[IPv4Network, tuple[int, IPv4Address | None]]]:
        return [(p, (ident, tunnel)) for p, ident, tunnel in self.items()]

    def update(self, prefix, value: tuple[int, IPv4Address | None]) -> None:
        identity, tunnel_endpoint = value
        self.upsert(prefix, identity, tunnel_endpoint)


class FakeTunnelMap(_Journaled):
    """pilus_tunnel_map, as TunnelMap: ``rows`` pod CIDR -> node IP."""

    map_name, part = "pilus_tunnel_map", "tunnel"

    def __init__(self, journal: list | None = None) -> None:
        super().__init__(journal)
        self.rows: dict[IPv4Network, IPv4Address] = {}

    def dump(self) -> list[tuple[IPv4Network, IPv4Address]]:
        return sorted(self.rows.items(), key=lambda t: (t[0].network_address, t[0].prefixlen))

    def update(self, prefix, endpoint) -> None:
        prefix = _net(prefix)
        self._write("upsert", prefix)
        self.rows[prefix] = IPv4Address(endpoint)

    def delete(self, prefix) -> bool:
        prefix = _net(prefix)
        self._write("delete", prefix)
        return self.rows.pop(prefix, None) is not None


class FakeEndpointMap(_Journaled):
    """pilus_lxc (+ pilus_lxc_if), as EndpointMap: ``rows`` IP -> EndpointInfo."""

    map_name, part = "pilus_lxc", "endpoints"

    def __init__(self, journal: list | None = None) -> None:
        super().__init__(journal)
        self.rows: dict[IPv4Address, EndpointInfo] = {}

    def upsert(self, ep: EndpointInfo) -> None:
        key = IPv4Address(ep.ipv4)
        self._write("upsert", key)
        self.rows[key] = ep

    def get(self, ipv4) -> EndpointInfo | None:
        return self.rows.get(IPv4Address(ipv4))

    def delete(self, ipv4) -> bool:
        key = IPv4Address(ipv4)
        self._write("delete", key)
        return self.rows.pop(key, None) is not None

    def items(self) -> list[EndpointInfo]:
        return sorted(self.rows.values(), key=lambda e: e.ipv4)

    # Reconciler target: endpoint IP -> EndpointInfo
    def dump(self) -> list[tuple[IPv4Address, EndpointInfo]]:
        return [(IPv4Address(ep.ipv4), ep) for ep in self.items()]

    def update(self, ipv4, ep: EndpointInfo) -> None:
        if IPv4Address(ipv4) != IPv4Address(ep.ipv4):
            raise ValueError(f"endpoint {ep.ep_id}: key {ipv4} is not its address {ep.ipv4}")
        self.upsert(ep)


class FakePolicyMaps:
    """Per-endpoint policy maps, as PolicyMaps: ``maps`` endpoint id -> {PolicyKey: PolicyEntry}."""

    def __init__(self, journal: list | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.maps: dict[int, dict[Any, PolicyEntry]] = {}

    def sync(self, ep_id: int, entries: Mapping[Any, Any]) -> dict:
        self.journal.append(("policy", "sync", ep_id))
        old = self.maps.get(ep_id, {})
        new = normalize({k: PolicyEntry(bool(v.deny), int(getattr(v, "proxy_port", 0)))
                         for k, v in entries.items()})
        self.maps[ep_id] = new
        return {
            "added": sum(1 for k in new if k not in old),
            "updated": sum(1 for k in new if k in old and old[k] != new[k]),
            "deleted": sum(1 for k in old if k not in new),
        }

    def delete(self, ep_id: int) -> None:
        self.journal.append(("policy", "delete", ep_id))
        self.maps.pop(ep_id, None)

    def endpoints(self) -> list[int]:
        return sorted(self.maps)

    def state(self, ep_id: int) -> dict[Any, PolicyEntry]:
        return dict(self.maps.get(ep_id, {}))

    def items(self, ep_id: int) -> list[dict]:
        rows = [
            {"identity": k.identity, "direction": "egress" if k.egress else "ingress", "proto": k.proto,
             "dport": k.dport, "prefix_len": k.prefix_len, "port": k.text(), "deny": v.deny,
             "proxy_port": v.proxy_port, "packets": 0, "bytes": 0}
            for k, v in self.maps.get(ep_id, {}).items()
        ]
        rows.sort(key=lambda r: (r["direction"], r["identity"], r["proto"], r["dport"], r["prefix_len"]))
        return rows

    def status(self) -> dict:
        return writers_status("policy maps", [])

    def close(self) -> None:
        pass


class FakeIPBlockMap(_Journaled):
    """pilus_ipblock, as IPBlockMap: ``rows`` prefix -> identity."""

    map_name, part = "pilus_ipblock", "ipblock"

    def __init__(self, journal: list | None = None) -> None:
        super().__init__(journal)
        self.rows: dict[IPv4Network, int] = {}

    def upsert(self, prefix, identity: int) -> None:
        prefix = _net(prefix)
        self._write("upsert", prefix)
        self.rows[prefix] = identity

    def delete(self, prefix) -> bool:
        prefix = _net(prefix)
        self._write("delete", prefix)
        return self.rows.pop(prefix, None) is not None

    def items(self) -> list[tuple[IPv4Network, int]]:
        return sorted(self.rows.items(), key=lambda t: (t[0].network_address, t[0].prefixlen))

    # Reconciler target: prefix -> identity
    def dump(self) -> list[tuple[IPv4Network, int]]:
        return self.items()

    def update(self, prefix: IPv4Network, identity: int) -> None:
        self.upsert(prefix, identity)


class FakeLbMaps:
    """pilus_lb4_*: frontends with their active slots, backends, Maglev tables, revnat."""

    def __init__(self, maglev_table_size: int = lbmaps.LB_MAGLEV_DEFAULT_M) -> None:
        self.maglev_table_size = maglev_table_size
        self.services: dict[lbmaps.Frontend, lbmaps.ServiceEntry] = {}
        self.be: dict[int, lbmaps.BackendEntry] = {}
        self.maglev: dict[tuple[int, int], list[int]] = {}
        self.revnat: dict[int, lbmaps.Frontend] = {}

    def upsert_backend(self, be: lbmaps.BackendEntry) -> None:
        self.be[be.id] = be

    def delete_backend(self, backend_id: int) -> bool:
        return self.be.pop(backend_id, None) is not None

    def backends(self) -> dict[int, lbmaps.BackendEntry]:
        return dict(self.be)

    def upsert_service(self, svc_id, frontend, backends, algorithm="random", affinity_timeout=0,
                       flags=0, flags2=0, maglev_table=None, write_backends=True) -> None:
        if not 1 <= svc_id <= lbmaps.MAX_SERVICE_ID:
            raise ValueError(f"service id {svc_id} out of range 1-{lbmaps.MAX_SERVICE_ID}")
        if algorithm not in lbmaps.ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}: random or maglev")
        backends = list(backends)
        active = [b for b in backends if b.state == "active"]
        if affinity_timeout:
            flags |= lbmaps.SVC_FLAG_AFFINITY
        if write_backends:
            for b in backends:
                self.upsert_backend(b)
        if algorithm == "maglev" and active:
            if maglev_table is None or len(maglev_table) != self.maglev_table_size:
                raise ValueError("algorithm maglev needs a Maglev table of the datapath's size")
            self.maglev[(svc_id, frontend.scope)] = list(maglev_table)
        else:
            self.maglev.pop((svc_id, frontend.scope), None)
        if frontend.scope == lbmaps.LB_SCOPE_EXT:
            self.revnat[svc_id] = frontend
        self.services[frontend] = lbmaps.ServiceEntry(
            svc_id, frontend, [b.id for b in active], flags, flags2, algorithm, affinity_timeout)

    def delete_service(self, svc_id: int, frontend: lbmaps.Frontend) -> bool:
        if self.services.pop(frontend, None) is None:
            return False
        self.maglev.pop((svc_id, frontend.scope), None)
        if frontend.scope == lbmaps.LB_SCOPE_EXT:
            self.revnat.pop(svc_id, None)
        return True

    def items(self) -> list[lbmaps.ServiceEntry]:
        return sorted((lbmaps.ServiceEntry(e.id, e.frontend, list(e.backend_ids), e.flags, e.flags2,
                                           e.algorithm, e.affinity_timeout) for e in self.services.values()),
                      key=lambda e: (e.id, e.frontend.scope))

    def maglev_get(self, svc_id: int, scope: int = lbmaps.LB_SCOPE_EXT) -> list[int] | None:
        table = self.maglev.get((svc_id, scope))
        return list(table) if table is not None else None

    def dump(self) -> list[dict]:
        out = []
        for e in self.items():
            out.append({
                "id": e.id, "frontend": str(e.frontend), "address": str(e.frontend.address),
                "port": e.frontend.port, "protocol": e.frontend.proto,
                "scope": "internal" if e.frontend.scope else "external", "flags": e.flags,
                "flags2": e.flags2, "algorithm": e.algorithm, "affinity_timeout": e.affinity_timeout,
                "count": len(e.backend_ids),
                "backends": [{"slot": i, "id": bid,
                              "address": str(self.be[bid]) if bid in self.be else None,
                              "state": self.be[bid].state if bid in self.be else "missing"}
                             for i, bid in enumerate(e.backend_ids, start=1)],
            })
        return out

    def ct_items(self) -> list[dict]:
        return []

    def ct_flush(self) -> int:
        return 0


class FakeCt:
    def items(self) -> list[dict]:
        return []

    def flush(self) -> int:
        return 0

    def gc(self, now: int | None = None) -> int:
        return 0


class FakeMetrics:
    def items(self) -> list[dict]:
        return []

    def get(self, reason: int, direction: str) -> tuple[int, int]:
        return 0, 0


class FakeEventsLost:
    def counts(self) -> dict[str, int]:
        return {"rate_limited": 0, "ringbuf_full": 0}

    def total(self) -> int:
        return 0


class FakeEventReader:
    """A ring buffer reader over records the test emits; readable through a pipe."""

    def __init__(self, source: FakeDatapath) -> None:
        self._source = source
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._queue: list[bytes] = []
        self.records = 0
        self.records_by_type: dict[int, int] = {}
        self.mask = 0

    def push(self, record: bytes) -> None:
        self._queue.append(bytes(record))
        os.write(self._wfd, b"x")

    def fileno(self) -> int:
        return self._rfd

    def poll(self, timeout_ms: int = 0, want: Callable[[int], bool] | None = None) -> list:
        with contextlib.suppress(BlockingIOError):
            os.read(self._rfd, 4096)
        raw, self._queue = self._queue, []
        self.records += len(raw)
        for rec in raw:
            t = rec[0] if rec else 0
            self.records_by_type[t] = self.records_by_type.get(t, 0) + 1
        events, _errors = decode_records(raw, want)
        return events

    def set_listen_mask(self, mask: int) -> None:
        self.mask = mask

    def lost(self) -> int:
        return self._source.events_lost.total()

    def close(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            os.close(self._wfd)
            self._rfd = self._wfd = -1
            self._source.readers.discard(self)


class FakeDatapath:
    """The fake datapath. Its maps append their writes to one ``journal`` (map, op, key),
    so tests can check the order of writes across maps; ``fail_attach`` makes
    attach_endpoint fail as a vanished device does."""

    def __init__(self, cfg: Any = None, *, maglev_table_size: int | None = None) -> None:
        self.cfg = cfg
        size = maglev_table_size or (cfg.lb.maglev_table_size if cfg is not None else lbmaps.LB_MAGLEV_DEFAULT_M)
        self.loaded = False
        self.journal: list[tuple[str, str, object]] = []
        self.endpoints = FakeEndpointMap(self.journal)
        self.ipcache = FakeIpcache(self.journal)
        self.tunnel = FakeTunnelMap(self.journal)
        self.policy = FakePolicyMaps(self.journal)
        self.ipblock = FakeIPBlockMap(self.journal)
        self.lb = FakeLbMaps(size)
        self.ct = FakeCt()
        self.metrics = FakeMetrics()
        self.events_lost = FakeEventsLost()
        self.socket_lb = None
        self.attached: set[int] = set()
        self.fail_attach = False
        self.netdevs: set[int] = set()
        self.readers: set[FakeEventReader] = set()

    def load(self) -> None:
        self.loaded = True

    def close(self) -> None:
        for reader in list(self.readers):
            reader.close()
        self.loaded = False

    def attach_endpoint(self, ifindex: int) -> None:
        if self.fail_attach:
            raise OSError(19, f"attaching to ifindex {ifindex}: no such device")
        self.journal.append(("programs", "attach", ifindex))
        self.attached.add(ifindex)

    def detach_endpoint(self, ifindex: int) -> None:
        self.journal.append(("programs", "detach", ifindex))
        self.attached.discard(ifindex)

    def attach_netdev(self, ifindex: int) -> None:
        self.netdevs.add(ifindex)

    def detach_netdev(self, ifindex: int) -> None:
        self.netdevs.discard(ifindex)

    def load_socket_lb(self, attach: bool = True, cgroup=None):
        raise NotImplementedError("the fake datapath has no socket LB")

    def unload_socket_lb(self) -> list[str]:
        return []

    def events(self) -> FakeEventReader:
        reader = FakeEventReader(self)
        self.readers.add(reader)
        return reader

    def emit(self, record: bytes) -> None:
        """A datapath event (raw ring-buffer record) for every open reader."""
        for reader in self.readers:
            reader.push(record)

    def programs(self) -> list[dict]:
        return [{"name": name, "hook": hook, "attached": len(self.attached), "prog_id": i}
                for i, (name, hook) in enumerate(PROGRAM_HOOKS.items(), start=1)]

    def map_stats(self) -> list[dict]:
        services = self.lb.items()
        counts = {
            "pilus_lxc": len(self.endpoints.rows),
            "pilus_lxc_if": len(self.endpoints.rows),
            "pilus_ipcache": len(self.ipcache.rows),
            "pilus_tunnel_map": len(self.tunnel.rows),
            "pilus_ipblock": len(self.ipblock.rows),
            "pilus_ct4": 0,
            "pilus_metrics": 0,
            "pilus_policy": len(self.policy.maps),
            # through the LbMaps surface: a test may put other LB maps in
            "pilus_lb4_svc": sum(1 + len(e.backend_ids) for e in services),
            "pilus_lb4_be": len(self.lb.backends()),
            "pilus_lb4_revnat": sum(1 for e in services if e.frontend.scope == lbmaps.LB_SCOPE_EXT),
            "pilus_lb4_maglev": sum(1 for e in services if self.lb.maglev_get(e.id, e.frontend.scope)),
        }
        return [{"name": name, "type": kind, "max_entries": size, "entries": counts[name]}
                for name, (kind, size) in MAP_KINDS.items()]


def endpoint_info(ip: str, ep_id: int, identity: int, ifindex: int = 0) -> EndpointInfo:
    """An endpoint map entry with made-up MACs (tests)."""
    return EndpointInfo(IPv4Address(ip), ifindex or 100 + ep_id, ep_id, identity,
                        "02:00:00:00:00:%02x" % (ep_id & 0xFF), "02:00:00:00:01:%02x" % (ep_id & 0xFF))


__all__ = ["FakeDatapath", "endpoint_info"]
