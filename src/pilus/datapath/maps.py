"""Typed wrappers over the pilus maps (ctypes structs from abi.py)."""

from __future__ import annotations

import ctypes
import errno
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pilus import protocols

from . import abi
from ._libbpf import check, lib, num_possible_cpus
from .reasons import DIRECTIONS, drop_reason_desc

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

FdSource = int | Callable[[], int]


@dataclass(frozen=True)
class EndpointInfo:
    ipv4: IPv4Address
    ifindex: int  # host-side veth (lxc…) ifindex in the node netns
    ep_id: int
    identity: int
    mac: str  # pod eth0 MAC "aa:bb:cc:dd:ee:ff"
    host_mac: str  # lxc MAC
    flags: int = 0


class BpfMap:
    """A map fd with fixed key/value ctypes types.

    ``percpu``: values are arrays of ``value_type`` (one per possible CPU,
    each rounded up to 8 bytes), returned as lists.
    """

    def __init__(self, fd: FdSource, key_type, value_type, name: str = "", percpu: bool = False):
        self._fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        self.percpu = percpu
        self._ncpus = num_possible_cpus() if percpu else 1
        vs = ctypes.sizeof(value_type)
        self._slot = (vs + 7) & ~7 if percpu else vs

    @property
    def fd(self) -> int:
        return self._fd() if callable(self._fd) else self._fd

    def _vbuf(self):
        return ctypes.create_string_buffer(self._slot * self._ncpus)

    def _decode(self, buf) -> Any:
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf.raw[: self._slot])
        raw = buf.raw
        return [
            self.value_type.from_buffer_copy(
                raw[i * self._slot : i * self._slot + ctypes.sizeof(self.value_type)]
            )
            for i in range(self._ncpus)
        ]

    def lookup(self, key) -> Any | None:
        buf = self._vbuf()
        ret = lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if ret < 0:
            err = -ret if ret != -1 else ctypes.get_errno()
            if err == errno.ENOENT:
                return None
            check(ret, "bpf_map_lookup_elem", self.name)
        return self._decode(buf)

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        if self.percpu:
            if not isinstance(value, list | tuple):
                value = [value] * self._ncpus
            buf = self._vbuf()
            for i, v in enumerate(value):
                ctypes.memmove(
                    ctypes.addressof(buf) + i * self._slot, ctypes.byref(v), ctypes.sizeof(v)
                )
            ptr = buf
        else:
            ptr = ctypes.byref(value)
        check(
            lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ptr, flags),
            "bpf_map_update_elem",
            self.name,
        )

    def delete(self, key) -> bool:
        ret = lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if ret < 0:
            err = -ret if ret != -1 else ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            check(ret, "bpf_map_delete_elem", self.name)
        return True

    def keys(self) -> Iterator[Any]:
        fd = self.fd
        cur = None
        nxt = self.key_type()
        while True:
            ret = lib.bpf_map_get_next_key(
                fd, ctypes.byref(cur) if cur is not None else None, ctypes.byref(nxt)
            )
            if ret < 0:
                err = -ret if ret != -1 else ctypes.get_errno()
                if err == errno.ENOENT:
                    return
                check(ret, "bpf_map_get_next_key", self.name)
            yield nxt
            cur = nxt
            nxt = self.key_type()

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k in list(self.keys()):
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def count(self) -> int:
        return sum(1 for _ in self.keys())


def _ep_key(ip: IPv4Address) -> abi.EndpointKey:
    k = abi.EndpointKey()
    k.addr.ip4 = abi.ip4_to_raw(ip)
    k.family = abi.ENDPOINT_KEY_IPV4
    return k


def _ep_value(ep: EndpointInfo) -> abi.EndpointInfoC:
    v = abi.EndpointInfoC()
    v.ifindex = ep.ifindex
    v.ep_id = ep.ep_id
    v.flags = ep.flags
    v.identity = ep.identity
    v.ipv4 = abi.ip4_to_raw(ep.ipv4)
    ctypes.memmove(v.mac, abi.mac_to_bytes(ep.mac), 6)
    ctypes.memmove(v.host_mac, abi.mac_to_bytes(ep.host_mac), 6)
    return v


def _ep_from_c(v: abi.EndpointInfoC) -> EndpointInfo:
    return EndpointInfo(
        ipv4=abi.raw_to_ip4(v.ipv4),
        ifindex=v.ifindex,
        ep_id=v.ep_id,
        identity=v.identity,
        mac=abi.bytes_to_mac(bytes(v.mac)),
        host_mac=abi.bytes_to_mac(bytes(v.host_mac)),
        flags=v.flags,
    )


class EndpointMap:
    """pilus_lxc (IP -> endpoint) and pilus_lxc_if (ifindex -> endpoint), kept together."""

    def __init__(self, lxc_fd: FdSource, lxc_if_fd: FdSource):
        self.lxc = BpfMap(lxc_fd, abi.EndpointKey, abi.EndpointInfoC, "pilus_lxc")
        self.lxc_if = BpfMap(lxc_if_fd, ctypes.c_uint32, abi.EndpointInfoC, "pilus_lxc_if")

    def upsert(self, ep: EndpointInfo) -> None:
        key = _ep_key(IPv4Address(ep.ipv4))
        old = self.lxc.lookup(key)
        val = _ep_value(ep)
        # ifindex entry first: a packet from the new device must find its sender
        self.lxc_if.update(ctypes.c_uint32(ep.ifindex), val)
        self.lxc.update(key, val)
        if old is not None and old.ifindex != ep.ifindex:
            cur = self.lxc_if.lookup(ctypes.c_uint32(old.ifindex))
            if cur is not None and cur.ipv4 == old.ipv4:
                self.lxc_if.delete(ctypes.c_uint32(old.ifindex))

    def get(self, ipv4: IPv4Address) -> EndpointInfo | None:
        v = self.lxc.lookup(_ep_key(IPv4Address(ipv4)))
        return _ep_from_c(v) if v is not None else None

    def delete(self, ipv4: IPv4Address) -> bool:
        key = _ep_key(IPv4Address(ipv4))
        old = self.lxc.lookup(key)
        found = self.lxc.delete(key)
        if old is not None:
            cur = self.lxc_if.lookup(ctypes.c_uint32(old.ifindex))
            if cur is not None and cur.ipv4 == old.ipv4:
                self.lxc_if.delete(ctypes.c_uint32(old.ifindex))
        return found

    def items(self) -> list[EndpointInfo]:
        return sorted((_ep_from_c(v) for _, v in self.lxc.items()), key=lambda e: e.ipv4)

    # Reconciler target: endpoint IP -> EndpointInfo
    def dump(self) -> list[tuple[IPv4Address, EndpointInfo]]:
        return [(ep.ipv4, ep) for ep in self.items()]

    def update(self, ipv4: IPv4Address, ep: EndpointInfo) -> None:
        if IPv4Address(ipv4) != IPv4Address(ep.ipv4):
            raise ValueError(f"endpoint {ep.ep_id}: key {ipv4} is not its address {ep.ipv4}")
        self.upsert(ep)


def _ipc_key(prefix: IPv4Network) -> abi.IpcacheKey:
    k = abi.IpcacheKey()
    k.prefixlen = abi.IPCACHE_STATIC_PREFIX + prefix.prefixlen
    k.family = abi.ENDPOINT_KEY_IPV4
    k.addr.ip4 = abi.ip4_to_raw(prefix.network_address)
    return k


class IpcacheMap:
    """pilus_ipcache: prefix -> identity (+ tunnel endpoint)."""

    def __init__(self, fd: FdSource):
        self.map = BpfMap(fd, abi.IpcacheKey, abi.RemoteEndpointInfo, "pilus_ipcache")

    def upsert(
        self, prefix: IPv4Network, identity: int, tunnel_endpoint: IPv4Address | None = None
    ) -> None:
        prefix = IPv4Network(prefix, strict=False)
        v = abi.RemoteEndpointInfo()
        v.sec_identity = identity
        if tunnel_endpoint is not None:
            v.tunnel_endpoint = abi.ip4_to_raw(tunnel_endpoint)
            v.flags = abi.IPCACHE_F_HAS_TUNNEL_EP
        self.map.update(_ipc_key(prefix), v)

    def delete(self, prefix: IPv4Network) -> bool:
        return self.map.delete(_ipc_key(IPv4Network(prefix, strict=False)))

    def items(self) -> list[tuple[IPv4Network, int, IPv4Address | None]]:
        out = []
        for k, v in self.map.items():
            if k.family != abi.ENDPOINT_KEY_IPV4:
                continue
            plen = k.prefixlen - abi.IPCACHE_STATIC_PREFIX
            net = IPv4Network((abi.raw_to_ip4(k.addr.ip4), plen), strict=False)
            tun = (
                abi.raw_to_ip4(v.tunnel_endpoint) if v.flags & abi.IPCACHE_F_HAS_TUNNEL_EP else None
            )
            out.append((net, v.sec_identity, tun))
        return sorted(out, key=lambda t: (t[0].network_address, t[0].prefixlen))

    # Reconciler target: prefix -> (identity, tunnel endpoint or None)
    def dump(self) -> list[tuple[IPv4Network, tuple[int, IPv4Address | None]]]:
        return [(net, (identity, tun)) for net, identity, tun in self.items()]

    def update(self, prefix: IPv4Network, value: tuple[int, IPv4Address | None]) -> None:
        identity, tunnel_endpoint = value
        self.upsert(prefix, identity, tunnel_endpoint)


class TunnelMap:
    """pilus_tunnel_map: a remote node's pod CIDR -> its node IP (tunnel mode).
    A Reconciler target: prefix -> node IP."""

    def __init__(self, fd: FdSource):
        self.map = BpfMap(fd, abi.IpcacheKey, abi.TunnelValue, "pilus_tunnel_map")

    def dump(self) -> list[tuple[IPv4Network, IPv4Address]]:
        out = []
        for k, v in self.map.items():
            plen = k.prefixlen - abi.IPCACHE_STATIC_PREFIX
            net = IPv4Network((abi.raw_to_ip4(k.addr.ip4), plen), strict=False)
            out.append((net, abi.raw_to_ip4(v.endpoint)))
        return sorted(out, key=lambda t: (t[0].network_address, t[0].prefixlen))

    def update(self, prefix: IPv4Network, endpoint: IPv4Address) -> None:
        v = abi.TunnelValue()
        v.endpoint = abi.ip4_to_raw(endpoint)
        self.map.update(_ipc_key(IPv4Network(prefix, strict=False)), v)

    def delete(self, prefix: IPv4Network) -> bool:
        return self.map.delete(_ipc_key(IPv4Network(prefix, strict=False)))


_TCP_FLAG_NAMES = [
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
]


def tcp_flag_names(flags: int) -> list[str]:
    return [n for bit, n in _TCP_FLAG_NAMES if flags & bit]


def proto_name(proto: int) -> str | int:
    """A packet's protocol by name (pilus.protocols); a number without a name stays
    a number, and so does 0 (in a packet it is no L4, not the policy's "ANY")."""
    return protocols.NAMES.get(proto, proto) if proto else proto


def monotonic_seconds() -> int:
    """bpf_ktime_get_ns() / 1e9, the clock of ct_entry.lifetime."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC))


_CT_FLAG_NAMES = (
    (abi.CT_F_RX_CLOSING, "RxClosing"),
    (abi.CT_F_TX_CLOSING, "TxClosing"),
    (abi.CT_F_SEEN_NON_SYN, "SeenNonSyn"),
    (abi.CT_F_INGRESS, "Ingress"),
    (abi.CT_F_PROXY_REDIRECT, "ProxyRedirect"),
    (abi.CT_F_FROM_PROXY, "FromProxy"),
)


def ct_flag_names(flags: int) -> list[str]:
    """ct_entry.flags as names (Cilium's `bpf ct list` spelling where it has one)."""
    return [name for bit, name in _CT_FLAG_NAMES if flags & bit]


class CtMap:
    """pilus_ct4 conntrack entries."""

    def __init__(self, fd: FdSource):
        self.map = BpfMap(fd, abi.Ipv4CtTuple, abi.CtEntry, "pilus_ct4")

    def items(self) -> list[dict]:
        now = monotonic_seconds()
        out = []
        for k, v in self.map.items():
            proto = proto_name(k.nexthdr)
            closing = []
            if v.flags & abi.CT_F_TX_CLOSING:
                closing.append("tx")
            if v.flags & abi.CT_F_RX_CLOSING:
                closing.append("rx")
            out.append(
                {
                    "proto": proto,
                    "src": str(abi.raw_to_ip4(k.saddr)),
                    "dst": str(abi.raw_to_ip4(k.daddr)),
                    "sport": abi.raw_to_port(k.sport),
                    "dport": abi.raw_to_port(k.dport),
                    "direction": "ingress" if v.flags & abi.CT_F_INGRESS else "egress",
                    "expires_in_s": int(v.lifetime) - now,
                    "packets": v.tx_packets + v.rx_packets,
                    "bytes": v.tx_bytes + v.rx_bytes,
                    "tx_packets": v.tx_packets,
                    "tx_bytes": v.tx_bytes,
                    "rx_packets": v.rx_packets,
                    "rx_bytes": v.rx_bytes,
                    "tx_flags_seen": tcp_flag_names(v.tx_flags_seen),
                    "rx_flags_seen": tcp_flag_names(v.rx_flags_seen),
                    "seen_non_syn": bool(v.flags & abi.CT_F_SEEN_NON_SYN),
                    "closing": closing,
                    "src_identity": v.src_sec_id,
                    "flags": ct_flag_names(v.flags),
                    "proxy_port": abi.raw_to_port(v.proxy_port) if v.proxy_port else 0,
                }
            )
        return out

    def flush(self) -> int:
        n = 0
        for k in list(self.map.keys()):
            if self.map.delete(k):
                n += 1
        return n

    def gc(self, now: int | None = None) -> int:
        """Delete expired entries (the datapath only refreshes lifetimes and
        ignores expired ones); returns how many were deleted. The agent calls
        this periodically (Cilium: conntrack GC)."""
        now = monotonic_seconds() if now is None else now
        n = 0
        for k in list(self.map.keys()):
            v = self.map.lookup(k)
            # re-check right before deleting: a packet may have refreshed it
            if v is not None and v.lifetime < now and self.map.delete(k):
                n += 1
        return n


class MetricsMap:
    """pilus_metrics: (reason, direction) -> packets, bytes, summed over CPUs."""

    def __init__(self, fd: FdSource):
        self.map = BpfMap(fd, abi.MetricsKey, abi.MetricsValue, "pilus_metrics", percpu=True)

    def items(self) -> list[dict]:
        out = []
        for k, vals in self.map.items():
            out.append(
                {
                    "reason": k.reason,
                    "reason_desc": drop_reason_desc(k.reason),
                    "direction": DIRECTIONS.get(k.dir, str(k.dir)),
                    "packets": sum(v.count for v in vals),
                    "bytes": sum(v.bytes for v in vals),
                }
            )
        return sorted(out, key=lambda d: (d["reason"], d["direction"]))

    def get(self, reason: int, direction: str) -> tuple[int, int]:
        """(packets, bytes) for one key; (0, 0) if absent."""
        for d in self.items():
            if d["reason"] == reason and d["direction"] == direction:
                return d["packets"], d["bytes"]
        return 0, 0


class EventsLostMap:
    """pilus_ev_lost: per-CPU counts of events not emitted (rate limit, ring full)."""

    def __init__(self, fd: FdSource):
        self.map = BpfMap(fd, ctypes.c_uint32, ctypes.c_uint64, "pilus_ev_lost", percpu=True)

    def counts(self) -> dict[str, int]:
        out = {"rate_limited": 0, "ringbuf_full": 0}
        names = {abi.EVENTS_LOST_RATELIMIT: "rate_limited", abi.EVENTS_LOST_RINGBUF: "ringbuf_full"}
        for slot, name in names.items():
            vals = self.map.lookup(ctypes.c_uint32(slot))
            if vals:
                out[name] = sum(v.value for v in vals)
        return out

    def total(self) -> int:
        return sum(self.counts().values())
