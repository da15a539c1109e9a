"""ctypes mirrors of src/pilus/bpf/lib/common.h.

One class per C struct/union, same field names and order; ``C_NAME`` is the C
tag. tests/unit/test_abi.py checks sizes and offsets against the BTF of the
compiled object. Big-endian (``__be32``/``__be16``) fields are plain integers in
host order of the raw bytes: use :func:`ip4_to_raw` / :func:`raw_to_ip4`.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from ctypes import Structure, Union, c_int8, c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from ipaddress import IPv4Address

# ---- constants (keep in sync with common.h) ----
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

ENDPOINT_KEY_IPV4 = 1
ENDPOINT_KEY_IPV6 = 2

IDENTITY_HOST = 1
IDENTITY_WORLD = 2
IDENTITY_REMOTE_NODE = 6

ENDPOINT_F_HOST = 1
ENDPOINT_F_POLICY_INGRESS = 2
ENDPOINT_F_POLICY_EGRESS = 4
ENDPOINT_F_IPBLOCK_INGRESS = 8
ENDPOINT_F_IPBLOCK_EGRESS = 16
IPCACHE_F_HAS_TUNNEL_EP = 1
IPCACHE_STATIC_PREFIX = 32

METRIC_INGRESS = 1
METRIC_EGRESS = 2
METRIC_SERVICE = 3

REASON_FORWARDED = 0
DROP_INVALID_SIP = 132
DROP_POLICY = 133
DROP_INVALID = 134
DROP_CT_INVALID_HDR = 135
DROP_UNKNOWN_L3 = 139
DROP_WRITE_ERROR = 141
DROP_UNKNOWN_L4 = 142
DROP_CSUM_L3 = 153
DROP_CT_CREATE_FAILED = 155
DROP_NO_TUNNEL_KEY = 147
DROP_NO_TUNNEL_ENDPOINT = 160
DROP_INVALID_IDENTITY = 171
DROP_PROXY_LOOKUP_FAILED = 178
DROP_PROXY_SET_FAILED = 179
DROP_INVALID_VNI = 183
DROP_UNKNOWN_SENDER = 172
DROP_POLICY_DENY = 181
DROP_TTL_EXCEEDED = 196

NOTIFY_DROP = 1
NOTIFY_TRACE = 4
NOTIFY_POLICY_VERDICT = 5
NOTIFY_CAPTURE_VER = 1
TRACE_PAYLOAD_LEN = 128

TRACE_TO_LXC = 0
TRACE_TO_PROXY = 1
TRACE_TO_HOST = 2
TRACE_TO_STACK = 3
TRACE_TO_OVERLAY = 4
TRACE_FROM_LXC = 5
TRACE_FROM_OVERLAY = 9

CT_NEW = 0
CT_ESTABLISHED = 1
CT_REPLY = 2
CT_RELATED = 3

CT_EGRESS = 0
CT_INGRESS = 1

CT_F_RX_CLOSING = 1 << 0
CT_F_TX_CLOSING = 1 << 1
CT_F_SEEN_NON_SYN = 1 << 2
CT_F_INGRESS = 1 << 3
CT_F_PROXY_REDIRECT = 1 << 4  # the original direction goes to the proxy at ct_entry.proxy_port
CT_F_FROM_PROXY = 1 << 5  # created from a proxy's upstream packet: replies go to the stack

# skb->mark values of the L7 redirect (lib/proxy.h, Cilium's magic marks)
MARK_MAGIC_TO_PROXY = 0x0200
MARK_MAGIC_PROXY_INGRESS = 0x0A00
MARK_MAGIC_PROXY_EGRESS = 0x0B00
MARK_MAGIC_HOST_MASK = 0x0F00

POLICY_STATIC_PREFIX = 40
POLICY_PROTO_PREFIX = 8
POLICY_FULL_L4_PREFIX = 24
POLICY_FULL_PREFIX = 64
POLICY_INGRESS = 1
POLICY_EGRESS = 2
POLICY_MATCH_NONE = 0
POLICY_MATCH_L3_ONLY = 1
POLICY_MATCH_L3_L4 = 2
POLICY_MATCH_L4_ONLY = 3
POLICY_MATCH_ALL = 4
POLICY_MATCH_L3_PROTO = 5
POLICY_MATCH_PROTO_ONLY = 6

PILUS_POLICY_MAX = 16384
PILUS_POLICY_EPS = 65536
PILUS_IPBLOCK_MAX = 16384

EVENTS_LOST_RATELIMIT = 0
EVENTS_LOST_RINGBUF = 1
EVENTS_LOST_SLOTS = 2


def ip4_to_raw(ip: IPv4Address | str | None) -> int:
    """IPv4 address -> the u32 whose memory holds it in network order."""
    if ip is None:
        return 0
    return struct.unpack("=I", IPv4Address(ip).packed)[0]


def raw_to_ip4(raw: int) -> IPv4Address:
    return IPv4Address(struct.pack("=I", raw))


def port_to_raw(port: int) -> int:
    return socket.htons(port)


def raw_to_port(raw: int) -> int:
    return socket.ntohs(raw)


def mac_to_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def bytes_to_mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in bytes(b))


class _Base(Structure):
    C_NAME = ""

    def to_bytes(self) -> bytes:
        return ctypes.string_at(ctypes.addressof(self), ctypes.sizeof(self))

    @classmethod
    def from_raw(cls, data: bytes):
        if len(data) < ctypes.sizeof(cls):
            raise ValueError(f"{cls.C_NAME}: need {ctypes.sizeof(cls)} bytes, got {len(data)}")
        return cls.from_buffer_copy(data[: ctypes.sizeof(cls)])


class PilusAddr(Union):
    C_NAME = "pilus_addr"
    _fields_ = [("ip4", c_uint32), ("ip6", c_uint8 * 16)]


class EndpointKey(_Base):
    C_NAME = "endpoint_key"
    _fields_ = [
        ("addr", PilusAddr),
        ("family", c_uint8),
        ("key", c_uint8),
        ("cluster_id", c_uint16),
    ]


class EndpointInfoC(_Base):
    C_NAME = "endpoint_info"
    _fields_ = [
        ("ifindex", c_uint32),
        ("ep_id", c_uint16),
        ("flags", c_uint16),
        ("identity", c_uint32),
        ("ipv4", c_uint32),
        ("mac", c_uint8 * 6),
        ("host_mac", c_uint8 * 6),
        ("pad", c_uint32),
    ]


class IpcacheKey(_Base):
    C_NAME = "ipcache_key"
    _fields_ = [
        ("prefixlen", c_uint32),
        ("cluster_id", c_uint16),
        ("pad1", c_uint8),
        ("family", c_uint8),
        ("addr", PilusAddr),
    ]


class RemoteEndpointInfo(_Base):
    C_NAME = "remote_endpoint_info"
    _fields_ = [
        ("sec_identity", c_uint32),
        ("tunnel_endpoint", c_uint32),
        ("node_id", c_uint16),
        ("key", c_uint8),
        ("flags", c_uint8),
    ]


class TunnelValue(_Base):
    C_NAME = "tunnel_value"
    _fields_ = [
        ("endpoint", c_uint32),
        ("pad", c_uint32),
    ]


class Ipv4CtTuple(_Base):
    C_NAME = "ipv4_ct_tuple"
    _fields_ = [
        ("saddr", c_uint32),
        ("daddr", c_uint32),
        ("sport", c_uint16),
        ("dport", c_uint16),
        ("nexthdr", c_uint8),
        ("flags", c_uint8),
        ("pad", c_uint16),
    ]


class CtEntry(_Base):
    C_NAME = "ct_entry"
    _fields_ = [
        ("tx_packets", c_uint64),
        ("tx_bytes", c_uint64),
        ("rx_packets", c_uint64),
        ("rx_bytes", c_uint64),
        ("lifetime", c_uint32),
        ("flags", c_uint16),
        ("tx_flags_seen", c_uint8),
        ("rx_flags_seen", c_uint8),
        ("src_sec_id", c_uint32),
        ("rev_nat_index", c_uint16),
        ("proxy_port", c_uint16),  # network order (raw_to_port)
        ("last_tx_report", c_uint32),
        ("last_rx_report", c_uint32),
    ]


class PolicyKeyC(_Base):
    C_NAME = "policy_key"
    _fields_ = [
        ("lpm_prefixlen", c_uint32),
        ("sec_label", c_uint32),
        ("egress", c_uint8),
        ("protocol", c_uint8),
        ("dport", c_uint16),
    ]


class PolicyEntryC(_Base):
    C_NAME = "policy_entry"
    _fields_ = [
        ("proxy_port", c_uint16),
        ("deny", c_uint8),
        ("lpm_prefix_length", c_uint8),
        ("pad", c_uint32),
        ("packets", c_uint64),
        ("bytes", c_uint64),
    ]


class MetricsKey(_Base):
    C_NAME = "metrics_key"
    _fields_ = [
        ("reason", c_uint8),
        ("dir", c_uint8),
        ("pad1", c_uint16),
        ("pad2", c_uint32),
    ]


class MetricsValue(_Base):
    C_NAME = "metrics_value"
    _fields_ = [("count", c_uint64), ("bytes", c_uint64)]


class EvBucket(_Base):
    C_NAME = "ev_bucket"
    _fields_ = [("tokens", c_uint64), ("last_ns", c_uint64)]


class NotifyCommonHdr(_Base):
    C_NAME = "notify_common_hdr"
    _fields_ = [
        ("type", c_uint8),
        ("subtype", c_uint8),
        ("source", c_uint16),
        ("hash", c_uint32),
    ]


class NotifyCaptureHdr(_Base):
    C_NAME = "notify_capture_hdr"
    _fields_ = [
        ("common", NotifyCommonHdr),
        ("len_orig", c_uint32),
        ("len_cap", c_uint16),
        ("version", c_uint16),
    ]


class DropNotify(_Base):
    C_NAME = "drop_notify"
    _fields_ = [
        ("hdr", NotifyCaptureHdr),
        ("src_label", c_uint32),
        ("dst_label", c_uint32),
        ("dst_id", c_uint32),
        ("ifindex", c_uint32),
        ("line", c_uint16),
        ("file", c_uint8),
        ("ext_error", c_int8),
        ("pad", c_uint32),
        ("data", c_uint8 * TRACE_PAYLOAD_LEN),
    ]


class TraceNotify(_Base):
    C_NAME = "trace_notify"
    _fields_ = [
        ("hdr", NotifyCaptureHdr),
        ("src_label", c_uint32),
        ("dst_label", c_uint32),
        ("dst_id", c_uint32),
        ("ifindex", c_uint32),
        ("reason", c_uint8),
        ("flags", c_uint8),
        ("pad1", c_uint16),
        ("pad2", c_uint32),
        ("data", c_uint8 * TRACE_PAYLOAD_LEN),
    ]


class PolicyVerdictNotify(_Base):
    C_NAME = "policy_verdict_notify"
    _fields_ = [
        ("hdr", NotifyCaptureHdr),
        ("remote_label", c_uint32),
        ("local_label", c_uint32),
        ("verdict", c_int32),
        ("dst_port", c_uint16),
        ("proto", c_uint8),
        ("dir", c_uint8),
        ("match_type", c_uint8),
        ("audited", c_uint8),
        ("proxy_port", c_uint16),
        ("ifindex", c_uint32),
        ("data", c_uint8 * TRACE_PAYLOAD_LEN),
    ]


class PilusConfig(_Base):
    C_NAME = "pilus_config"
    _fields_ = [
        ("router_ip", c_uint32),
        ("node_ip", c_uint32),
        ("pod_cidr", c_uint32),
        ("pod_prefixlen", c_uint32),
        ("events_rate", c_uint32),
        ("events_burst", c_uint32),
        ("ct_lifetime_tcp", c_uint32),
        ("ct_syn_timeout", c_uint32),
        ("ct_close_timeout", c_uint32),
        ("ct_lifetime_nontcp", c_uint32),
        ("trace_aggregate", c_uint32),
        ("tunnel_ifindex", c_uint32),  # 0 = native routing
        ("lb_dsr", c_uint32),  # 1 = --bpf-lb-mode dsr (native routing only)
        ("trace_report_interval", c_uint32),  # seconds (--monitor-aggregation-interval)
        ("tunnel_port", c_uint32),  # tunnel mode: the VXLAN UDP port; 0 = native routing
    ]


#: every mirror, for the ABI test
ALL_MIRRORS = [
    PilusAddr,
    EndpointKey,
    EndpointInfoC,
    IpcacheKey,
    RemoteEndpointInfo,
    TunnelValue,
    Ipv4CtTuple,
    CtEntry,
    PolicyKeyC,
    PolicyEntryC,
    MetricsKey,
    MetricsValue,
    EvBucket,
    NotifyCommonHdr,
    NotifyCaptureHdr,
    DropNotify,
    TraceNotify,
    PolicyVerdictNotify,
    PilusConfig,
]
