"""Service load-balancing maps (src/pilus/bpf/lib/lb.h): ctypes mirrors and typed wrappers.

The control plane (pilus.loadbalancer) decides *what* a service is; this module
only knows how one frontend and its backends are laid out in the maps:

  pilus_lb4_svc     {vip, port, slot, proto, scope} -> master (slot 0) / backend slots
  pilus_lb4_be      backend id -> {addr, port, proto, state}
  pilus_lb4_revnat  service id (rev_nat_index) -> frontend
  pilus_lb4_maglev  service id | scope << 31 -> u32[M] backend ids
  pilus_lb4_affinity_match {backend id, service id} (affinity services)

Writes are ordered so that a packet never sees a slot or table pointing at a
backend that is not in the backend map, nor a master whose count exceeds the
slots written: backends -> slots -> Maglev table -> reverse NAT -> master,
then stale slots are removed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pilus import protocols

from . import abi
from .maps import BpfMap, FdSource

# ---- constants (keep in sync with lb.h) ----
DROP_NO_SERVICE = 158

LB_SELECTION_RANDOM = 1
LB_SELECTION_MAGLEV = 2
ALGORITHMS = {"random": LB_SELECTION_RANDOM, "maglev": LB_SELECTION_MAGLEV}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}

LB_SCOPE_EXT = 0
LB_SCOPE_INT = 1

SVC_FLAG_EXTERNAL_IP = 0x01
SVC_FLAG_NODEPORT = 0x02
SVC_FLAG_EXT_LOCAL_SCOPE = 0x04
SVC_FLAG_HOSTPORT = 0x08
SVC_FLAG_AFFINITY = 0x10
SVC_FLAG_LOADBALANCER = 0x20
SVC_FLAG_ROUTABLE = 0x40
SVC_FLAG_SOURCE_RANGE = 0x80
SVC_FLAG2_INT_LOCAL_SCOPE = 0x10
SVC_FLAG2_TWO_SCOPES = 0x20

BE_STATE_ACTIVE = 0
BE_STATE_TERMINATING = 1
BE_STATE_QUARANTINED = 2
BE_STATE_MAINTENANCE = 3
BACKEND_STATES = {
    "active": BE_STATE_ACTIVE,
    "terminating": BE_STATE_TERMINATING,
    "quarantined": BE_STATE_QUARANTINED,
    "maintenance": BE_STATE_MAINTENANCE,
}
BACKEND_STATE_NAMES = {v: k for k, v in BACKEND_STATES.items()}

TUPLE_F_SERVICE = 4
LB_TUPLE_F_REVNAT = 0x10
LB_MAGLEV_SCOPE_BIT = 31
LB_CT_F_SEEN_NON_SYN = 1
LB_CT_F_CLOSING = 2
LB_CT_F_LOOPBACK = 4
LB_CT_F_SNAT = 8  # NodePort to another node's backend, SNATed to the node IP
LB_CFG_F_NO_SERVICE_REPLY = 1

PILUS_LB_SVC_MAX = 262144
PILUS_LB_BE_MAX = 131072
PILUS_LB_REVNAT_MAX = 131072
PILUS_LB_MAGLEV_MAX = 65536
PILUS_LB_CT_MAX = 524288
#: service ids are u32 in the maps; the manager allocates below this
MAX_SERVICE_ID = (1 << LB_MAGLEV_SCOPE_BIT) - 1
PILUS_LB_AFFINITY_MAX = 65536
LB_MAGLEV_DEFAULT_M = 16381

#: table sizes Cilium accepts for Maglev (primes)
MAGLEV_PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)

#: the protocols a frontend / backend may have (the datapath translates TCP and UDP)
LB_PROTOCOLS = frozenset({protocols.TCP, protocols.UDP})

LB_MAP_NAMES = (
    "pilus_lb4_svc",
    "pilus_lb4_be",
    "pilus_lb4_revnat",
    "pilus_lb4_maglev",
    "pilus_lb4_ct",
    "pilus_lb4_affinity",
    "pilus_lb4_affinity_match",
)
LB_CONFIG_SECTION = ".rodata.lb"


# ---- ctypes mirrors of lb.h ----
class _Base(abi._Base):
    pass


class Lb4Key(_Base):
    C_NAME = "lb4_key"
    _fields_ = [
        ("address", c_uint32),
        ("dport", c_uint16),
        ("backend_slot", c_uint16),
        ("proto", c_uint8),
        ("scope", c_uint8),
        ("pad", c_uint16),
    ]


class Lb4Service(_Base):
    C_NAME = "lb4_service"
    _fields_ = [
        ("backend_id", c_uint32),
        ("affinity_timeout", c_uint32),
        ("rev_nat_index", c_uint32),
        ("count", c_uint16),
        ("flags", c_uint8),
        ("flags2", c_uint8),
        ("algorithm", c_uint8),
        ("pad1", c_uint8),
        ("pad2", c_uint16),
    ]


class Lb4Backend(_Base):
    C_NAME = "lb4_backend"
    _fields_ = [
        ("address", c_uint32),
        ("port", c_uint16),
        ("proto", c_uint8),
        ("flags", c_uint8),
    ]


class Lb4ReverseNat(_Base):
    C_NAME = "lb4_reverse_nat"
    _fields_ = [("address", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class Lb4CtEntry(_Base):
    C_NAME = "lb4_ct_entry"
    _fields_ = [
        ("backend_id", c_uint32),
        ("lifetime", c_uint32),
        ("rev_nat_index", c_uint32),
        ("nat_addr", c_uint32),
        ("client_addr", c_uint32),
        ("nat_port", c_uint16),
        ("flags", c_uint8),
        ("pad", c_uint8),
        ("client_port", c_uint16),
        ("pad2", c_uint8 * 2),
    ]


class Lb4AffinityKey(_Base):
    C_NAME = "lb4_affinity_key"
    _fields_ = [("client_ip", c_uint32), ("rev_nat_index", c_uint32)]


class Lb4AffinityVal(_Base):
    C_NAME = "lb4_affinity_val"
    _fields_ = [("last_used", c_uint64), ("backend_id", c_uint32), ("pad", c_uint32)]


class Lb4AffinityMatch(_Base):
    C_NAME = "lb4_affinity_match"
    _fields_ = [("backend_id", c_uint32), ("rev_nat_index", c_uint32)]


class LbConfigC(_Base):
    C_NAME = "lb_config"
    _fields_ = [
        ("maglev_size", c_uint32),
        ("maglev_seed", c_uint32),
        ("loopback_ip", c_uint32),
        ("flags", c_uint32),
    ]


LB_MIRRORS = [
    Lb4Key,
    Lb4Service,
    Lb4Backend,
    Lb4ReverseNat,
    Lb4CtEntry,
    Lb4AffinityKey,
    Lb4AffinityVal,
    Lb4AffinityMatch,
    LbConfigC,
]


# ---- configuration (set before load) ----
@dataclass(frozen=True)
class LbConfig:
    maglev_table_size: int = LB_MAGLEV_DEFAULT_M
    maglev_seed: int = 0x4A4C6676
    loopback_ip: IPv4Address = IPv4Address("169.254.42.1")
    no_service_reply: bool = True  # RST / ICMP unreachable for services without backends

    def __post_init__(self) -> None:
        if self.maglev_table_size not in MAGLEV_PRIMES:
            raise ValueError(
                f"maglev table size {self.maglev_table_size} is not one of "
                f"{', '.join(map(str, MAGLEV_PRIMES))}"
            )

    def to_c(self) -> LbConfigC:
        c = LbConfigC()
        c.maglev_size = self.maglev_table_size
        c.maglev_seed = self.maglev_seed & 0xFFFFFFFF
        c.loopback_ip = abi.ip4_to_raw(self.loopback_ip)
        c.flags = LB_CFG_F_NO_SERVICE_REPLY if self.no_service_reply else 0
        return c


def configure_object(obj, cfg: LbConfig) -> None:
    """`before_load` hook for loader.BpfObject: LB settings and the Maglev value size."""
    obj.set_rodata(LB_CONFIG_SECTION, cfg.to_c())
    obj.set_value_size("pilus_lb4_maglev", 4 * cfg.maglev_table_size)


# ---- typed model of what is in the maps ----
@dataclass(frozen=True)
class Frontend:
    address: IPv4Address
    port: int
    proto: str = "TCP"  # TCP / UDP
    scope: int = LB_SCOPE_EXT

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.proto}" + ("/i" if self.scope else "")


@dataclass(frozen=True)
class BackendEntry:
    id: int
    address: IPv4Address
    port: int
    proto: str = "TCP"
    state: str = "active"

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.proto}"


@dataclass
class ServiceEntry:
    id: int
    frontend: Frontend
    backend_ids: list[int] = field(default_factory=list)  # slots 1..count
    flags: int = 0
    flags2: int = 0
    algorithm: str = "random"
    affinity_timeout: int = 0


def _proto_number(name: str) -> int:
    num = protocols.number(name)
    if num not in LB_PROTOCOLS:
        raise ValueError(f"service protocol {name!r}: TCP or UDP")
    return num


def _raw_port(port: int) -> int:
    return abi.port_to_raw(port)


def _raw4(addr: IPv4Address | str) -> int:
    """abi.ip4_to_raw without re-parsing an IPv4Address (hot with 100k services)."""
    if not isinstance(addr, IPv4Address):
        addr = IPv4Address(addr)
    return struct.unpack("=I", addr.packed)[0]


def _svc_key(fe: Frontend, slot: int = 0) -> Lb4Key:
    k = Lb4Key()
    k.address = _raw4(fe.address)
    k.dport = _raw_port(fe.port)
    k.backend_slot = slot
    k.proto = _proto_number(fe.proto)
    k.scope = fe.scope
    return k


def _maglev_key(svc_id: int, scope: int) -> c_uint32:
    return c_uint32(svc_id | (scope << LB_MAGLEV_SCOPE_BIT))


def _key_frontend(k: Lb4Key) -> Frontend:
    return Frontend(
        abi.raw_to_ip4(k.address),
        abi.raw_to_port(k.dport),
        protocols.name(k.proto),
        k.scope,
    )


def _check_service(svc_id: int, algorithm: str) -> None:
    if not 1 <= svc_id <= MAX_SERVICE_ID:
        raise ValueError(f"service id {svc_id} out of range 1-{MAX_SERVICE_ID}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: random or maglev")


class LbMaps:
    """The LB maps of one loaded datapath (``Datapath.lb``)."""

    def __init__(
        self,
        svc_fd: FdSource,
        be_fd: FdSource,
        revnat_fd: FdSource,
        maglev_fd: FdSource,
        ct_fd: FdSource,
        affinity_fd: FdSource,
        affinity_match_fd: FdSource,
        maglev_table_size: int = LB_MAGLEV_DEFAULT_M,
    ) -> None:
        self.maglev_table_size = maglev_table_size
        self.svc = BpfMap(svc_fd, Lb4Key, Lb4Service, "pilus_lb4_svc")
        self.be = BpfMap(be_fd, c_uint32, Lb4Backend, "pilus_lb4_be")
        self.revnat = BpfMap(revnat_fd, c_uint32, Lb4ReverseNat, "pilus_lb4_revnat")
        self.maglev = BpfMap(
            maglev_fd, c_uint32, c_uint32 * maglev_table_size, "pilus_lb4_maglev"
        )
        self.ct = BpfMap(ct_fd, abi.Ipv4CtTuple, Lb4CtEntry, "pilus_lb4_ct")
        self.affinity = BpfMap(affinity_fd, Lb4AffinityKey, Lb4AffinityVal, "pilus_lb4_affinity")
        self.affinity_match = BpfMap(
            affinity_match_fd, Lb4AffinityMatch, c_uint8, "pilus_lb4_affinity_match"
        )
        # Reconciler targets; write backends before the frontends that use them
        self.backend_table = BackendTable(self)
        self.service_table = ServiceTable(self)

    @classmethod
    def from_object(cls, map_fd, maglev_table_size: int) -> LbMaps:
        """``map_fd``: name -> fd (BpfObject.map_fd)."""
        return cls(*(map_fd(n) for n in LB_MAP_NAMES), maglev_table_size=maglev_table_size)

    # -- backends ------------------------------------------------------------

    def upsert_backend(self, be: BackendEntry) -> None:
        v = Lb4Backend()
        v.address = _raw4(be.address)
        v.port = _raw_port(be.port)
        v.proto = _proto_number(be.proto)
        v.flags = BACKEND_STATES[be.state]
        self.be.update(c_uint32(be.id), v)

    def delete_backend(self, backend_id: int) -> bool:
        return self.be.delete(c_uint32(backend_id))

    def backends(self) -> dict[int, BackendEntry]:
        out = {}
        for k, v in self.be.items():
            out[k.value] = BackendEntry(
                k.value,
                abi.raw_to_ip4(v.address),
                abi.raw_to_port(v.port),
                protocols.name(v.proto),
                BACKEND_STATE_NAMES.get(v.flags, str(v.flags)),
            )
        return out

    # -- services ------------------------------------------------------------

    def upsert_service(
        self,
        svc_id: int,
        frontend: Frontend,
        backends: Iterable[BackendEntry],
        algorithm: str = "random",
        affinity_timeout: int = 0,
        flags: int = 0,
        flags2: int = 0,
        maglev_table: list[int] | None = None,
        write_backends: bool = True,
    ) -> None:
        """Write one frontend. ``backends``: all of the frontend's backends (any
        state; only active ones get a slot). ``maglev_table``: M backend ids
        (required for ``algorithm="maglev"``; see pilus.loadbalancer.maglev)."""
        _check_service(svc_id, algorithm)
        backends = list(backends)
        if write_backends:
            for b in backends:
                self.upsert_backend(b)
        active = [b.id for b in backends if b.state == "active"]
        self.write_frontend(svc_id, frontend, active, algorithm, affinity_timeout, flags, flags2,
                            maglev_table)

    def write_frontend(
        self,
        svc_id: int,
        frontend: Frontend,
        active: list[int],
        algorithm: str = "random",
        affinity_timeout: int = 0,
        flags: int = 0,
        flags2: int = 0,
        maglev_table: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        """Write one frontend whose selectable backends are ``active`` (ids, slot
        order; already in the backend map)."""
        _check_service(svc_id, algorithm)
        if affinity_timeout:
            flags |= SVC_FLAG_AFFINITY
        old = self.svc.lookup(_svc_key(frontend))
        old_count = old.count if old is not None else 0
        for slot, backend_id in enumerate(active, start=1):
            v = Lb4Service()
            v.backend_id = backend_id
            v.rev_nat_index = svc_id
            self.svc.update(_svc_key(frontend, slot), v)
        mkey = _maglev_key(svc_id, frontend.scope)
        if algorithm == "maglev" and active:
            if maglev_table is None:
                raise ValueError("algorithm maglev needs the Maglev table")
            if len(maglev_table) != self.maglev_table_size:
                raise ValueError(
                    f"Maglev table has {len(maglev_table)} entries, the datapath uses "
                    f"{self.maglev_table_size}"
                )
            self.maglev.update(mkey, (c_uint32 * self.maglev_table_size)(*maglev_table))
        elif old is not None and old.algorithm == LB_SELECTION_MAGLEV:
            self.maglev.delete(mkey)
        if flags & SVC_FLAG_AFFINITY:
            for backend_id in active:
                m = Lb4AffinityMatch()
                m.backend_id = backend_id
                m.rev_nat_index = svc_id
                self.affinity_match.update(m, c_uint8(1))
        nat = Lb4ReverseNat()
        nat.address = _raw4(frontend.address)
        nat.port = _raw_port(frontend.port)
        if frontend.scope == LB_SCOPE_EXT:
            self.revnat.update(c_uint32(svc_id), nat)
        master = Lb4Service()
        master.count = len(active)
        master.rev_nat_index = svc_id
        master.flags = flags
        master.flags2 = flags2
        master.algorithm = ALGORITHMS[algorithm]
        master.affinity_timeout = affinity_timeout
        self.svc.update(_svc_key(frontend), master)
        for slot in range(len(active) + 1, old_count + 1):
            self.svc.delete(_svc_key(frontend, slot))
        # affinity matches of backends that left the service
        had_affinity = old is not None and old.flags & SVC_FLAG_AFFINITY
        if had_affinity:
            keep = set(active) if flags & SVC_FLAG_AFFINITY else set()
            for m in [m for m in self.affinity_match.keys() if m.rev_nat_index == svc_id]:  # noqa: SIM118
                if m.backend_id not in keep:
                    self.affinity_match.delete(m)

    def delete_service(self, svc_id: int, frontend: Frontend) -> bool:
        """Remove one frontend (master first, so packets stop matching at once)."""
        old = self.svc.lookup(_svc_key(frontend))
        if old is None:
            return False
        self.svc.delete(_svc_key(frontend))
        for slot in range(1, old.count + 1):
            self.svc.delete(_svc_key(frontend, slot))
        self.maglev.delete(_maglev_key(svc_id, frontend.scope))
        if frontend.scope == LB_SCOPE_EXT:
            self.revnat.delete(c_uint32(svc_id))
        if old.flags & SVC_FLAG_AFFINITY:
            for m in [m for m in self.affinity_match.keys() if m.rev_nat_index == svc_id]:  # noqa: SIM118
                self.affinity_match.delete(m)
        return True

    def items(self) -> list[ServiceEntry]:
        """Every frontend as the datapath sees it, with its slots in order."""
        masters: dict[tuple, ServiceEntry] = {}
        slots: dict[tuple, dict[int, int]] = {}
        for k, v in self.svc.items():
            fe = _key_frontend(k)
            if k.backend_slot == 0:
                masters[(fe,)] = ServiceEntry(
                    id=v.rev_nat_index,
                    frontend=fe,
                    flags=v.flags,
                    flags2=v.flags2,
                    algorithm=ALGORITHM_NAMES.get(v.algorithm, str(v.algorithm)),
                    affinity_timeout=v.affinity_timeout,
                )
                masters[(fe,)].backend_ids = [0] * v.count
            else:
                slots.setdefault((fe,), {})[k.backend_slot] = v.backend_id
        for key, entry in masters.items():
            got = slots.get(key, {})
            entry.backend_ids = [got.get(i, 0) for i in range(1, len(entry.backend_ids) + 1)]
        return sorted(masters.values(), key=lambda e: (e.id, e.frontend.scope))

    def dump(self) -> list[dict]:
        """JSON view for `pilus bpf lb list`."""
        backends = self.backends()
        out = []
        for e in self.items():
            out.append(
                {
                    "id": e.id,
                    "frontend": str(e.frontend),
                    "address": str(e.frontend.address),
                    "port": e.frontend.port,
                    "protocol": e.frontend.proto,
                    "scope": "internal" if e.frontend.scope else "external",
                    "flags": e.flags,
                    "flags2": e.flags2,
                    "algorithm": e.algorithm,
                    "affinity_timeout": e.affinity_timeout,
                    "count": len(e.backend_ids),
                    "backends": [
                        {
                            "slot": i,
                            "id": bid,
                            "address": str(backends[bid]) if bid in backends else None,
                            "state": backends[bid].state if bid in backends else "missing",
                        }
                        for i, bid in enumerate(e.backend_ids, start=1)
                    ],
                }
            )
        return out

    def maglev_get(self, svc_id: int, scope: int = LB_SCOPE_EXT) -> list[int] | None:
        v = self.maglev.lookup(_maglev_key(svc_id, scope))
        return list(v) if v is not None else None

    def ct_flush(self) -> int:
        n = 0
        for k in list(self.ct.keys()):
            if self.ct.delete(k):
                n += 1
        return n

    def ct_items(self) -> list[dict]:
        from .maps import monotonic_seconds

        now = monotonic_seconds()
        out = []
        for k, v in self.ct.items():
            src = f"{abi.raw_to_ip4(k.saddr)}:{abi.raw_to_port(k.sport)}"
            dst = f"{abi.raw_to_ip4(k.daddr)}:{abi.raw_to_port(k.dport)}"
            row = {
                "kind": "revnat" if k.flags & LB_TUPLE_F_REVNAT else "service",
                "proto": protocols.name(k.nexthdr),
                "backend_id": v.backend_id,
                "service_id": v.rev_nat_index,
                "expires_in_s": int(v.lifetime) - now,
                "flags": v.flags,
            }
            if k.flags & LB_TUPLE_F_REVNAT:
                row.update(backend=src, client=dst,
                           frontend=f"{abi.raw_to_ip4(v.nat_addr)}:{abi.raw_to_port(v.nat_port)}")
            else:
                row.update(client=src, frontend=dst)
            out.append(row)
        return out


# ---- Reconciler targets (dump / update / delete; values equal when in sync) ----
@dataclass(frozen=True)
class ServiceValue:
    """One frontend as the maps hold it (ServiceTable's value)."""

    id: int
    backend_ids: tuple[int, ...] = ()  # the selectable (active) backends, in slot order
    algorithm: str = "random"
    affinity_timeout: int = 0
    flags: int = 0  # SVC_FLAG_*; SVC_FLAG_AFFINITY follows from affinity_timeout
    flags2: int = 0
    maglev_table: tuple[int, ...] | None = None  # Maglev services with backends: M ids

    def __post_init__(self) -> None:
        if self.affinity_timeout:
            object.__setattr__(self, "flags", self.flags | SVC_FLAG_AFFINITY)


class BackendTable:
    """pilus_lb4_be as a Reconciler target: backend id -> BackendEntry."""

    def __init__(self, maps: LbMaps) -> None:
        self.maps = maps

    def dump(self) -> list[tuple[int, BackendEntry]]:
        return list(self.maps.backends().items())

    def update(self, backend_id: int, be: BackendEntry) -> None:
        if backend_id != be.id:
            raise ValueError(f"backend {be}: key {backend_id} is not its id {be.id}")
        self.maps.upsert_backend(be)

    def delete(self, backend_id: int) -> bool:
        return self.maps.delete_backend(backend_id)


class ServiceTable:
    """The frontends (master, slots, Maglev table, reverse NAT, affinity matches)
    as a Reconciler target: Frontend -> ServiceValue."""

    def __init__(self, maps: LbMaps) -> None:
        self.maps = maps

    def dump(self) -> list[tuple[Frontend, ServiceValue]]:
        out = []
        for e in self.maps.items():
            table = None
            if e.algorithm == "maglev" and e.backend_ids:
                got = self.maps.maglev_get(e.id, e.frontend.scope)
                table = tuple(got) if got is not None else None
            value = ServiceValue(e.id, tuple(e.backend_ids), e.algorithm, e.affinity_timeout,
                                 e.flags, e.flags2, table)
            out.append((e.frontend, value))
        return out

    def update(self, frontend: Frontend, value: ServiceValue) -> None:
        self.maps.write_frontend(value.id, frontend, list(value.backend_ids), value.algorithm,
                                 value.affinity_timeout, value.flags, value.flags2,
                                 value.maglev_table)

    def delete(self, frontend: Frontend) -> bool:
        master = self.maps.svc.lookup(_svc_key(frontend))
        if master is None:
            return False
        return self.maps.delete_service(master.rev_nat_index, frontend)
