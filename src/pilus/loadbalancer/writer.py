"""Desired frontends -> the LB maps, through one Reconciler per map the manager owns.

  lb-backends   pilus_lb4_be: backend id -> (address, port, proto, state)
  lb-frontends  pilus_lb4_svc master and slots of one frontend, with its Maglev
                table, reverse NAT and affinity matches (``LbMaps.upsert_service``
                writes them as one unit): (address, port, proto, scope) -> WrittenFrontend

A write goes backends (new or changed) -> frontends -> backends nobody references,
so a slot never points at a backend the map does not hold. Ids: every frontend
(address, port, proto) keeps its service id, every backend (address, port, proto)
its backend id while they exist; ids of entries still in the maps stay taken.

Restore: ``adopt`` takes what the maps hold (read once by the manager) as both
the reconcilers' view of the maps and their desired contents, so the first write
after a restart changes only what differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import NamedTuple

from pilus.datapath import lb as lbmaps
from pilus.loadbalancer import maglev
from pilus.loadbalancer.model import BACKEND_STATES, ServiceValidationError
from pilus.reconcile import Reconciler

#: service ids (rev_nat_index) 1..MAX_SERVICE_ID: u32 in the maps (Cilium's are
#: u16); bounded by how many frontends pilus_lb4_revnat holds
MAX_SERVICE_ID = lbmaps.PILUS_LB_REVNAT_MAX

BackendKey = tuple[IPv4Address, int, str]  # (address, port, proto)
FrontendKey = tuple[IPv4Address, int, str, int]  # (address, port, proto, scope)


@dataclass(frozen=True)
class FrontendSpec:
    """One frontend as it goes into the maps."""

    service: tuple[str, str]
    kind: str  # ClusterIP / NodePort / ExternalIPs / LoadBalancer
    address: IPv4Address
    port: int
    proto: str
    scope: int
    backends: tuple[tuple[IPv4Address, int, str, str], ...]  # (ip, port, proto, state)
    algorithm: str
    affinity_timeout: int
    flags: int
    flags2: int
    port_name: str = ""

    # map keys, looked up for every frontend on every reconcile: computed once
    fkey: BackendKey = field(init=False, repr=False, compare=False)
    mkey: FrontendKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fkey", (self.address, self.port, self.proto))
        object.__setattr__(self, "mkey", (self.address, self.port, self.proto, self.scope))


class WrittenFrontend(NamedTuple):
    """One frontend as ``LbMaps.items`` reads it back: equal means nothing to rewrite
    (a tuple: compared for every frontend on every write)."""

    id: int
    slots: tuple[int, ...]  # active backend ids in slot order
    flags: int
    flags2: int
    algorithm: str
    affinity_timeout: int


class BackendTarget:
    def __init__(self, maps) -> None:
        self.maps = maps
        self.primed: list[tuple[int, tuple]] | None = None  # the next dump, already read

    def read(self) -> list[tuple[int, tuple]]:
        return [(bid, (be.address, be.port, be.proto, be.state)) for bid, be in self.maps.backends().items()]

    def dump(self) -> Iterable[tuple[int, tuple]]:
        rows, self.primed = self.primed, None
        return rows if rows is not None else self.read()

    def update(self, bid: int, value: tuple) -> None:
        self.maps.upsert_backend(lbmaps.BackendEntry(bid, *value))

    def delete(self, bid: int) -> None:
        self.maps.delete_backend(bid)


class FrontendTarget:
    """Writes a frontend from its spec (set by the writer before each write) and the
    backend ids."""

    def __init__(self, maps, be_ids: dict[BackendKey, int]) -> None:
        self.maps = maps
        self.be_ids = be_ids
        self.specs: dict[FrontendKey, FrontendSpec] = {}
        self.ids: dict[FrontendKey, int] = {}  # the id each frontend has in the maps
        self.primed: list[tuple[FrontendKey, WrittenFrontend]] | None = None  # the next dump

    def dump(self) -> Iterable[tuple[FrontendKey, WrittenFrontend]]:
        rows, self.primed = self.primed, None
        if rows is None:
            rows = written_frontends(self.maps, self.maps.items())
        for key, w in rows:
            self.ids[key] = w.id
        return rows

    def update(self, key: FrontendKey, w: WrittenFrontend) -> None:
        fe = lbmaps.Frontend(*key)
        old_id = self.ids.get(key)
        if old_id is not None and old_id != w.id:
            self.maps.delete_service(old_id, fe)
        # every backend with its state: only active ones get a slot
        entries = [lbmaps.BackendEntry(self.be_ids[b[:3]], *b) for b in self.specs[key].backends]
        active = [e for e in entries if e.state == "active"]
        table = None
        if w.algorithm == "maglev" and active:
            table = maglev.build_table([(e.id, f"{e.address}:{e.port}/{e.proto}") for e in active],
                                       self.maps.maglev_table_size)
        self.maps.upsert_service(
            w.id, fe, entries, algorithm=w.algorithm, affinity_timeout=w.affinity_timeout,
            flags=w.flags, flags2=w.flags2, maglev_table=table, write_backends=False,
        )
        self.ids[key] = w.id

    def delete(self, key: FrontendKey) -> None:
        self.maps.delete_service(self.ids.pop(key), lbmaps.Frontend(*key))


def written_frontends(maps, entries: Iterable[lbmaps.ServiceEntry]) -> list[tuple[FrontendKey, WrittenFrontend]]:
    """The frontends ``entries`` (what the maps hold) except Maglev ones whose table is gone
    (e.g. after a new table size): those count as not written, so they are written again."""
    out = []
    for e in entries:
        fe = e.frontend
        if e.algorithm == "maglev" and e.backend_ids and maps.maglev_get(e.id, fe.scope) is None:
            continue
        out.append(((fe.address, fe.port, fe.proto, fe.scope),
                    WrittenFrontend(e.id, tuple(e.backend_ids), e.flags, e.flags2, e.algorithm,
                                    e.affinity_timeout)))
    return out


class LbWriter:
    """The LB maps' one writer: ids, and the two reconcilers."""

    def __init__(self, maps) -> None:
        self.maps = maps
        self.svc_ids: dict[BackendKey, int] = {}  # frontend (address, port, proto) -> service id
        self.be_ids: dict[BackendKey, int] = {}  # backend (address, port, proto) -> backend id
        self._backend_target = BackendTarget(maps)
        self._frontend_target = FrontendTarget(maps, self.be_ids)
        self.backends: Reconciler[int, tuple] = Reconciler("lb-backends", self._backend_target)
        self.frontends: Reconciler[FrontendKey, WrittenFrontend] = Reconciler(
            "lb-frontends", self._frontend_target)
        self._next_svc = 1
        self._next_be = 1

    def adopt(self) -> None:
        """Restart: take the maps' ids and contents as written and desired (each map is
        read once; nothing is written)."""
        entries = self.maps.items()
        for e in entries:
            fe = e.frontend
            self.svc_ids[(fe.address, fe.port, fe.proto)] = e.id
        fronts = self._frontend_target.primed = written_frontends(self.maps, entries)
        self.frontends.set(dict(fronts)).raise_for_errors("adopting pilus_lb4_svc")
        backends = self._backend_target.primed = self._backend_target.read()
        for bid, (address, port, proto, _state) in backends:
            self.be_ids[(address, port, proto)] = bid
        self.backends.set(dict(backends)).raise_for_errors("adopting pilus_lb4_be")

    def status(self) -> list[dict]:
        return [self.backends.status(), self.frontends.status()]

    def retry_due(self) -> bool:
        return self.backends.retry_due() or self.frontends.retry_due()

    def retry(self) -> None:
        for reconciler in (self.backends, self.frontends):
            if reconciler.retry_due():
                reconciler.retry()

    def write(self, desired: list[FrontendSpec]) -> None:
        """Make the maps hold exactly ``desired``; raises ReconcileError for failed writes
        (they stay pending and are written again by the next call)."""
        want_fronts = {s.fkey for s in desired}
        for k in [k for k in self.svc_ids if k not in want_fronts]:
            del self.svc_ids[k]
        # ids of frontends leaving stay taken until they are removed from the maps
        used = set(self.svc_ids.values()) | {w.id for w in self.frontends.desired.values()}
        for s in desired:
            if s.fkey not in self.svc_ids:
                sid = self._alloc_svc_id(used)
                used.add(sid)
                self.svc_ids[s.fkey] = sid
        want_bes: dict[BackendKey, str] = {}
        for s in desired:
            for ip, port, proto, state in s.backends:
                # a backend shared by services: the most available state wins
                cur = want_bes.get((ip, port, proto))
                if cur is None or BACKEND_STATES.index(state) < BACKEND_STATES.index(cur):
                    want_bes[(ip, port, proto)] = state
        used_be = set(self.be_ids.values()) | set(self.backends.desired)
        for k in want_bes:
            if k not in self.be_ids:
                bid = self._alloc_be_id(used_be)
                used_be.add(bid)
                self.be_ids[k] = bid
        backends = {self.be_ids[k]: (*k, state) for k, state in want_bes.items()}

        # 1. backends (new or changed state) before anything points at them
        self.backends.set({**self.backends.desired, **backends}).raise_for_errors("writing pilus_lb4_be")
        # 2. frontends
        fronts = {}
        be_ids, affinity = self.be_ids, lbmaps.SVC_FLAG_AFFINITY
        for s in desired:
            flags = s.flags | (affinity if s.affinity_timeout else 0)
            slots = tuple(be_ids[b[:3]] for b in s.backends if b[3] == "active")
            fronts[s.mkey] = WrittenFrontend(self.svc_ids[s.fkey], slots, flags, s.flags2, s.algorithm,
                                             s.affinity_timeout)
        self._frontend_target.specs = {s.mkey: s for s in desired}
        self.frontends.set(fronts).raise_for_errors("writing pilus_lb4_svc")
        # 3. backends nobody references any more
        self.backends.set(backends).raise_for_errors("removing from pilus_lb4_be")
        live = set(backends)
        for k in [k for k, v in self.be_ids.items() if v not in live]:
            del self.be_ids[k]

    def _alloc_svc_id(self, used: set[int]) -> int:
        for _ in range(MAX_SERVICE_ID):
            cand = self._next_svc
            self._next_svc = self._next_svc % MAX_SERVICE_ID + 1
            if cand not in used:
                return cand
        raise ServiceValidationError([f"no free service id: all {MAX_SERVICE_ID} are in use"])

    def _alloc_be_id(self, used: set[int]) -> int:
        for _ in range(lbmaps.PILUS_LB_BE_MAX * 2):
            cand = self._next_be
            self._next_be = self._next_be % 0xFFFFFFF + 1
            if cand not in used:
                return cand
        raise ServiceValidationError(["no free backend id"])
