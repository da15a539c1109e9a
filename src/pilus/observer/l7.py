"""L7 events: one per request the L7 proxies judged (their JSON records, see docs/l7.md
"L7 records"), as the agent publishes them on the EventHub for `pilus monitor --type l7`
and Hubble. ``l7`` says which parser wrote it: ``http`` (absent: http; HTTP/1.1, HTTP/2,
gRPC), ``kafka`` (one record per (request, topic), ``kafka {...}``) or ``dns`` (one per
query, ``dns {...}``). The record comes from another process, so every field is checked
here and a record that is not an object with the documented shape raises ValueError
naming the field."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, ClassVar

VERDICTS = ("FORWARDED", "DENIED", "ERROR")
L7_TYPES = ("http", "kafka", "dns")
DEFAULT_L7 = L7_TYPES[0]  # a record without "l7" is the HTTP proxy's
TRANSPORTS = ("tcp", "udp")

INT16 = (-(1 << 15), (1 << 15) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
UINT16 = (0, (1 << 16) - 1)
UINT32 = (0, (1 << 32) - 1)
MAX_NAME = 1024  # longer than any DNS name or Kafka topic the proxies accept: a bad record
MAX_ITEMS = 4096  # answers per DNS record; far above what fits in one DNS message


@dataclass(frozen=True)
class L7Peer:
    ip: str
    port: int
    identity: int


@dataclass(frozen=True)
class KafkaInfo:
    """One (request, topic) the Kafka proxy judged; fields as Hubble's flow.Kafka."""

    api_key: str  # Cilium's name: produce, fetch, metadata, ...
    api_version: int
    correlation_id: int
    client_id: str
    topic: str  # "" for a request without topics
    # what the client got for this topic (29 TOPIC_AUTHORIZATION_FAILED when denied); None: no
    # response (a Produce with acks=0, or the broker failed)
    error_code: int | None


@dataclass(frozen=True)
class DNSInfo:
    """One DNS query the DNS proxy judged and its answer; fields as Hubble's flow.DNS."""

    query: str  # the FQDN, with its trailing dot
    qtypes: tuple[str, ...]
    rrtypes: tuple[str, ...]  # the answer's record types
    rcode: int  # the rcode the pod got (REFUSED when denied, SERVFAIL when the upstream failed)
    ips: tuple[str, ...]
    ttl: int
    cnames: tuple[str, ...]
    observation_source: str  # "proxy"


@dataclass
class L7Event:
    kind: ClassVar[str] = "l7"  # the `pilus monitor --type` name

    direction: str  # "ingress" | "egress" (which listener)
    endpoint: int  # the local endpoint's id (0: unknown)
    source: L7Peer
    destination: L7Peer
    protocol: str  # "HTTP/1.1" | "HTTP/2" | "Kafka" | "DNS"
    method: str
    url: str
    host: str
    path: str
    status: int  # the HTTP status sent to the client (0: none)
    verdict: str  # VERDICTS
    latency_ns: int
    grpc_status: int | None = None
    listener: str = ""
    header_mismatches: tuple[tuple[str, str], ...] = ()  # (header name, action); never values
    record_time: float | None = None  # when the proxy wrote it (seconds since the epoch)
    time: float | None = None  # when the agent received it
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    l7: str = DEFAULT_L7  # L7_TYPES
    kafka: KafkaInfo | None = None  # l7 == "kafka"
    dns: DNSInfo | None = None  # l7 == "dns"
    transport: str = "tcp"  # TRANSPORTS (DNS may come over UDP)

    def related_to(self, endpoint: int) -> bool:
        return endpoint == self.endpoint

    @property
    def source_ep(self) -> int:
        return self.endpoint if self.direction == "egress" else 0

    @property
    def dst_ep(self) -> int:
        return self.endpoint if self.direction == "ingress" else 0

    @classmethod
    def from_record(cls, rec: Any) -> L7Event:
        if not isinstance(rec, dict):
            raise ValueError("an L7 record must be a JSON object")
        l7 = _str(rec, "l7", DEFAULT_L7)
        if l7 not in L7_TYPES:
            raise ValueError(f"l7: {l7!r} is not one of {', '.join(L7_TYPES)}")
        for other in L7_TYPES[1:]:
            if other != l7 and rec.get(other) is not None:
                raise ValueError(f"{other}: only in an l7 {other!r} record (this one is {l7!r})")
        direction = _str(rec, "direction")
        if direction not in ("ingress", "egress"):
            raise ValueError(f"direction: {direction!r} is neither ingress nor egress")
        verdict = _str(rec, "verdict")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}")
        transport = _str(rec, "transport", "udp" if l7 == "dns" else "tcp").lower()
        if transport not in TRANSPORTS:
            raise ValueError(f"transport: {transport!r} is neither tcp nor udp")
        grpc = rec.get("grpc_status")
        mismatches = rec.get("header_mismatches") or []
        if not isinstance(mismatches, list) or not all(isinstance(m, dict) for m in mismatches):
            raise ValueError("header_mismatches: must be a list of objects")
        t = rec.get("time")
        return cls(
            direction=direction,
            endpoint=_int(rec, "endpoint", default=0, bounds=UINT16),
            source=_peer(rec, "source"),
            destination=_peer(rec, "destination"),
            protocol=_str(rec, "protocol", {"kafka": "Kafka", "dns": "DNS"}.get(l7, "")),
            method=_str(rec, "method", ""),
            url=_str(rec, "url", ""),
            host=_str(rec, "host", ""),
            path=_str(rec, "path", ""),
            status=_int(rec, "status", default=0, bounds=(0, 999)),
            verdict=verdict,
            latency_ns=_int(rec, "latency_ns", default=0, bounds=(0, (1 << 63) - 1)),
            grpc_status=None if grpc is None else _int(rec, "grpc_status", bounds=INT32),
            listener=_str(rec, "listener", ""),
            header_mismatches=tuple((str(m.get("name", "")), str(m.get("action", ""))) for m in mismatches),
            record_time=_time(t),
            l7=l7,
            kafka=_kafka(rec.get("kafka")) if l7 == "kafka" else None,
            dns=_dns(rec.get("dns")) if l7 == "dns" else None,
            transport=transport,
        )


MAX_TIME = 253_402_300_800  # 10000-01-01: the end of a protobuf Timestamp's range


def _time(t: Any) -> float | None:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return None  # no usable time: the agent's receive time stands in
    if not 0 <= t < MAX_TIME:  # NaN fails this too
        raise ValueError(f"time: {t!r} is not seconds since the epoch before year 10000")
    return float(t)


def _kafka(k: Any) -> KafkaInfo:
    if not isinstance(k, dict):
        raise ValueError("kafka: must be an object (an l7 'kafka' record)")
    return KafkaInfo(
        api_key=_name(k, "kafka.api_key", "api_key", required=True),
        api_version=_int(k, "api_version", default=0, where="kafka.", bounds=(0, INT16[1])),
        correlation_id=_int(k, "correlation_id", default=0, where="kafka.", bounds=INT32),
        client_id=_name(k, "kafka.client_id", "client_id"),
        topic=_name(k, "kafka.topic", "topic"),
        error_code=None if k.get("error_code") is None else _int(k, "error_code", where="kafka.", bounds=INT16),
    )


def _dns(d: Any) -> DNSInfo:
    if not isinstance(d, dict):
        raise ValueError("dns: must be an object (an l7 'dns' record)")
    ips = _names(d, "ips")
    for i, ip in enumerate(ips):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"dns.ips[{i}]: {ip[:64]!r} is not an IP address") from None
    return DNSInfo(
        query=_name(d, "dns.query", "query", required=True),
        qtypes=_names(d, "qtypes"),
        rrtypes=_names(d, "rrtypes"),
        rcode=_int(d, "rcode", default=0, where="dns.", bounds=(0, 4095)),
        ips=ips,
        ttl=_int(d, "ttl", default=0, where="dns.", bounds=UINT32),
        cnames=_names(d, "cnames"),
        observation_source=_name(d, "dns.observation_source", "observation_source") or "proxy",
    )


def _name(rec: dict, path: str, key: str, *, required: bool = False) -> str:
    v = rec.get(key)
    if v is None and not required:
        return ""  # Kafka's client id is nullable
    if not isinstance(v, str):
        raise ValueError(f"{path}: must be a string")
    if len(v) > MAX_NAME:
        raise ValueError(f"{path}: longer than {MAX_NAME} characters")
    _utf8(v, path)
    return v


def _names(rec: dict, key: str) -> tuple[str, ...]:
    v = rec.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ValueError(f"dns.{key}: must be a list of strings")
    if len(v) > MAX_ITEMS:
        raise ValueError(f"dns.{key}: more than {MAX_ITEMS} items")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or len(item) > MAX_NAME:
            raise ValueError(f"dns.{key}[{i}]: must be a string of at most {MAX_NAME} characters")
        _utf8(item, f"dns.{key}[{i}]")
        out.append(item)
    return tuple(out)


def _str(rec: dict, key: str, default: str | None = None) -> str:
    v = rec.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, str):
        raise ValueError(f"{key}: must be a string")
    _utf8(v, key)
    return v


def _utf8(v: str, path: str) -> None:
    # JSON may carry lone surrogates ("\ud800"); a flow's strings must be UTF-8
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{path}: not valid Unicode text") from None


def _int(rec: dict, key: str, default: int | None = None, *, where: str = "",
         bounds: tuple[int, int] | None = None) -> int:
    v = rec.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{where}{key}: must be an integer")
    if bounds is not None and not bounds[0] <= v <= bounds[1]:
        raise ValueError(f"{where}{key}: {v} is not in {bounds[0]}..{bounds[1]}")
    return v


def _peer(rec: dict, key: str) -> L7Peer:
    p = rec.get(key)
    if not isinstance(p, dict):
        raise ValueError(f"{key}: must be an object")
    ip = p.get("ip")
    if not isinstance(ip, str):
        raise ValueError(f"{key}.ip: must be a string")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"{key}.ip: {ip[:64]!r} is not an IP address") from None
    # bounded as the flow's fields (uint32 identity): a record out of range is a bad record
    return L7Peer(ip, _int(p, "port", default=0, where=f"{key}.", bounds=UINT16),
                  _int(p, "identity", default=0, where=f"{key}.", bounds=UINT32))
