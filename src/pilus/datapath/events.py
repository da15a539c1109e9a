"""Decode datapath notifications from the ring buffer into typed events; read them
without blocking.

Decoding only: bytes -> DropEvent / TraceEvent / PolicyVerdictEvent with every field
the record carries. Their text and JSON presentation is pilus.observer.format."""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from . import abi
from ._libbpf import check, check_ptr, lib, ring_buffer_sample_fn
from .maps import BpfMap, proto_name, tcp_flag_names
from .reasons import (
    POLICY_DIRECTIONS,
    ct_state_desc,
    drop_reason_desc,
    policy_match_desc,
    trace_point_desc,
)

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806

#: record type (NOTIFY_*) -> the `pilus monitor --type` name of its events
MONITOR_TYPES = {
    abi.NOTIFY_DROP: "drop",
    abi.NOTIFY_TRACE: "trace",
    abi.NOTIFY_POLICY_VERDICT: "policy-verdict",
}
#: the writable section holding the datapath's pilus_monitor_mask (lib/events.h)
MONITOR_MASK_SECTION = ".data.monitor"


def listen_mask(wanted: Iterable[frozenset[str] | None]) -> int:
    """pilus_monitor_mask for subscribers that each want a set of type names
    (None: every type); 0 when there is nobody, so the datapath emits nothing."""
    mask = 0
    for types in wanted:
        for notify, name in MONITOR_TYPES.items():
            if types is None or name in types:
                mask |= 1 << notify
    return mask


@dataclass
class PacketSummary:
    """What the captured bytes say (Ethernet + IPv4 + L4)."""

    ethertype: int | None = None
    src_mac: str | None = None
    dst_mac: str | None = None
    src_ip: str | None = None
    dst_ip: str | None = None
    proto: str | int | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: list[str] = field(default_factory=list)
    icmp_type: int | None = None
    icmp_code: int | None = None
    ttl: int | None = None
    arp_op: int | None = None


def _mac(b: bytes) -> str:
    return b.hex(":")  # as abi.bytes_to_mac, without a Python loop per byte


_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BxxxxxHBBxx4s4s")  # version/IHL, fragment field, TTL, protocol, addresses
_PORTS = struct.Struct("!HH")
_ARP_OP = struct.Struct("!H")


def parse_packet(data: bytes) -> PacketSummary:
    # runs for every event the agent decodes: precompiled structs and C-level helpers
    # (inet_ntoa, hex) instead of IPv4Address and per-byte formatting
    s = PacketSummary()
    if len(data) < 14:
        return s
    dst_mac, src_mac, s.ethertype = _ETH.unpack_from(data)
    s.dst_mac, s.src_mac = _mac(dst_mac), _mac(src_mac)
    off = 14
    if s.ethertype == ETH_P_ARP and len(data) >= off + 28:
        s.arp_op = _ARP_OP.unpack_from(data, off + 6)[0]
        s.src_ip = socket.inet_ntoa(data[off + 14 : off + 18])
        s.dst_ip = socket.inet_ntoa(data[off + 24 : off + 28])
        return s
    if s.ethertype != ETH_P_IP or len(data) < off + 20:
        return s
    vihl, frag, ttl, proto, src, dst = _IPV4.unpack_from(data, off)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20:
        return s
    s.ttl = ttl
    s.src_ip, s.dst_ip = socket.inet_ntoa(src), socket.inet_ntoa(dst)
    s.proto = proto_name(proto)
    l4 = off + ihl
    if frag & 0x1FFF:
        return s
    if proto in (6, 17) and len(data) >= l4 + 4:
        s.sport, s.dport = _PORTS.unpack_from(data, l4)
        if proto == 6 and len(data) >= l4 + 14:
            s.tcp_flags = tcp_flag_names(data[l4 + 13])
    elif proto == 1 and len(data) >= l4 + 2:
        s.icmp_type, s.icmp_code = data[l4], data[l4 + 1]
    return s


@dataclass
class _EventBase:
    """Fields every packet notification carries (lib/events.h's common header)."""

    kind: ClassVar[str]  # the `pilus monitor --type` name (MONITOR_TYPES)

    source_ep: int
    src_identity: int
    dst_identity: int
    dst_ep: int
    ifindex: int
    hash: int
    orig_len: int
    cap_len: int
    data: bytes
    packet: PacketSummary
    version: int = 0  # of the capture header (NOTIFY_CAPTURE_VER)
    time: float | None = None  # when the agent read it (seconds since the epoch)

    def related_to(self, endpoint: int) -> bool:
        """The event is to or from this endpoint id."""
        return endpoint in (self.source_ep, self.dst_ep)


@dataclass
class DropEvent(_EventBase):
    kind: ClassVar[str] = "drop"

    reason: int = 0
    line: int = 0  # source line of the drop in the datapath
    file: int = 0  # source file id of the drop
    ext_error: int = 0  # extended error code (e.g. the FIB lookup's)

    @property
    def reason_desc(self) -> str:
        return drop_reason_desc(self.reason)


@dataclass
class TraceEvent(_EventBase):
    kind: ClassVar[str] = "trace"

    obs_point: int = 0
    ct_reason: int = 0
    flags: int = 0  # TRACE_* flags of the record

    @property
    def observation_point(self) -> str:
        return trace_point_desc(self.obs_point)

    @property
    def ct_state(self) -> str:
        return ct_state_desc(self.ct_reason)


@dataclass
class PolicyVerdictEvent(_EventBase):
    """A policy decision on the first packet of a connection (or a policy drop).

    ``source_ep`` is the endpoint whose policy decided; for ingress the remote
    is the source, for egress the destination (``src_identity`` /
    ``dst_identity`` are oriented like the packet).
    """

    kind: ClassVar[str] = "policy-verdict"

    direction: int = 0  # POLICY_INGRESS / POLICY_EGRESS
    remote_identity: int = 0
    local_identity: int = 0
    verdict: int = 0  # 0 allowed, -133 / -181 dropped
    match_type: int = 0
    policy_proto: int = 0
    policy_dport: int = 0  # host order; ICMP type for ICMP
    proxy_port: int = 0
    audited: bool = False

    @property
    def action(self) -> str:
        return "allow" if self.verdict >= 0 else "deny"

    @property
    def drop_reason(self) -> int:
        return -self.verdict if self.verdict < 0 else 0

    @property
    def direction_name(self) -> str:
        return POLICY_DIRECTIONS.get(self.direction, str(self.direction))

    @property
    def match_name(self) -> str:
        return policy_match_desc(self.match_type)


@dataclass
class UnknownEvent:
    """A record of a type this agent does not decode (a newer datapath's)."""

    type: int
    raw: bytes
    time: float | None = None

    @property
    def kind(self) -> str:
        return f"unknown-{self.type}"

    def related_to(self, endpoint: int) -> bool:
        return False


Event = DropEvent | TraceEvent | PolicyVerdictEvent | UnknownEvent


def decode(raw: bytes) -> Event:
    """Decode one ring buffer record."""
    if len(raw) < ctypes.sizeof(abi.NotifyCommonHdr):
        raise ValueError(f"event record too short ({len(raw)} bytes)")
    etype = raw[0]
    if etype == abi.NOTIFY_DROP:
        n = abi.DropNotify.from_raw(raw)
    elif etype == abi.NOTIFY_TRACE:
        n = abi.TraceNotify.from_raw(raw)
    elif etype == abi.NOTIFY_POLICY_VERDICT:
        return _decode_policy_verdict(abi.PolicyVerdictNotify.from_raw(raw))
    else:
        return UnknownEvent(type=etype, raw=bytes(raw))
    cap = min(n.hdr.len_cap, abi.TRACE_PAYLOAD_LEN)
    data = bytes(n.data)[:cap]
    common = dict(
        source_ep=n.hdr.common.source,
        src_identity=n.src_label,
        dst_identity=n.dst_label,
        dst_ep=n.dst_id,
        ifindex=n.ifindex,
        hash=n.hdr.common.hash,
        orig_len=n.hdr.len_orig,
        cap_len=cap,
        data=data,
        packet=parse_packet(data),
        version=n.hdr.version,
    )
    if etype == abi.NOTIFY_DROP:
        return DropEvent(reason=n.hdr.common.subtype, line=n.line, file=n.file,
                         ext_error=n.ext_error, **common)
    return TraceEvent(obs_point=n.hdr.common.subtype, ct_reason=n.reason, flags=n.flags,
                      **common)


def _decode_policy_verdict(n: abi.PolicyVerdictNotify) -> PolicyVerdictEvent:
    cap = min(n.hdr.len_cap, abi.TRACE_PAYLOAD_LEN)
    data = bytes(n.data)[:cap]
    egress = n.dir == abi.POLICY_EGRESS
    return PolicyVerdictEvent(
        source_ep=n.hdr.common.source,
        # oriented like the packet: egress = local -> remote
        src_identity=n.local_label if egress else n.remote_label,
        dst_identity=n.remote_label if egress else n.local_label,
        dst_ep=0 if egress else n.hdr.common.source,
        ifindex=n.ifindex,
        hash=n.hdr.common.hash,
        orig_len=n.hdr.len_orig,
        cap_len=cap,
        data=data,
        packet=parse_packet(data),
        version=n.hdr.version,
        direction=n.dir,
        remote_identity=n.remote_label,
        local_identity=n.local_label,
        verdict=n.verdict,
        match_type=n.match_type,
        policy_proto=n.proto,
        policy_dport=n.dst_port,
        proxy_port=abi.raw_to_port(n.proxy_port),
        audited=bool(n.audited),
    )


def decode_records(raw: Iterable[bytes], want: Callable[[int], bool] | None = None) -> tuple[list[Event], int]:
    """Decode the records whose type (NOTIFY_*, the first byte) ``want`` accepts
    (all if None); returns the events and how many records did not decode."""
    out: list[Event] = []
    errors = 0
    for rec in raw:
        if want is not None and not (rec and want(rec[0])):
            continue
        try:
            out.append(decode(rec))
        except Exception:  # noqa: BLE001 - one bad record must not lose the batch
            errors += 1
    return out, errors


class EventReader:
    """Non-blocking reader of pilus_events.

    ``fileno()`` is an epoll fd that becomes readable when records arrive (for
    ``loop.add_reader``); ``poll()`` drains what is there. ``mask_fd`` is the
    datapath's MONITOR_MASK_SECTION map: ``set_listen_mask()`` tells the
    datapath which event types to emit at all.
    """

    def __init__(
        self, ringbuf_fd: int, lost_fn: Callable[[], int] | None = None, mask_fd: int | None = None
    ):
        self._pending: list[bytes] = []
        self._decode_errors = 0
        self.records = 0  # records read from the ring, decoded or not
        self.records_by_type: dict[int, int] = {}  # NOTIFY_* -> records read
        self._mask = (
            BpfMap(mask_fd, ctypes.c_uint32, ctypes.c_uint32, MONITOR_MASK_SECTION)
            if mask_fd is not None
            else None
        )

        def _cb(_ctx, data, size):
            self._pending.append(ctypes.string_at(data, size))
            return 0

        self._cb = ring_buffer_sample_fn(_cb)  # keep a reference
        self._rb = check_ptr(
            lib.ring_buffer__new(ringbuf_fd, self._cb, None, None), "ring_buffer__new"
        )
        self._lost_fn = lost_fn

    def fileno(self) -> int:
        return check(lib.ring_buffer__epoll_fd(self._handle()), "ring_buffer__epoll_fd")

    def _handle(self) -> int:
        if not self._rb:
            raise OSError(9, "event reader is closed")
        return self._rb

    def poll(self, timeout_ms: int = 0, want: Callable[[int], bool] | None = None) -> list[Event]:
        """Drain available records (wait up to ``timeout_ms`` if none; 0 = don't wait).
        ``want(type)`` picks the record types (NOTIFY_*) to decode; the others
        are read and dropped without decoding."""
        h = self._handle()
        if timeout_ms > 0:
            check(lib.ring_buffer__poll(h, timeout_ms), "ring_buffer__poll")
        else:
            check(lib.ring_buffer__consume(h), "ring_buffer__consume")
        raw, self._pending = self._pending, []
        self.records += len(raw)
        for rec in raw:
            t = rec[0] if rec else 0
            self.records_by_type[t] = self.records_by_type.get(t, 0) + 1
        out, errors = decode_records(raw, want)
        self._decode_errors += errors
        return out

    def set_listen_mask(self, mask: int) -> None:
        """Which event types (bits 1 << NOTIFY_*, see listen_mask) the datapath emits."""
        if self._mask is not None:
            self._mask.update(ctypes.c_uint32(0), ctypes.c_uint32(mask))

    def lost(self) -> int:
        """Events the datapath could not emit (rate limited or ring full), all CPUs."""
        return self._lost_fn() if self._lost_fn else 0

    @property
    def decode_errors(self) -> int:
        return self._decode_errors

    def close(self) -> None:
        if self._rb:
            lib.ring_buffer__free(self._rb)
            self._rb = None

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


__all__ = [
    "DropEvent",
    "TraceEvent",
    "PolicyVerdictEvent",
    "UnknownEvent",
    "Event",
    "EventReader",
    "MONITOR_MASK_SECTION",
    "MONITOR_TYPES",
    "decode",
    "PacketSummary",
    "decode_records",
    "listen_mask",
    "parse_packet",
]
