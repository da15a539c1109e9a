"""L7 events: one per HTTP request the L7 proxy judged (its JSON record, see docs/l7.md
"L7 records"), as the agent publishes them on the EventHub for `pilus monitor --type l7`
and Hubble. The record comes from another process, so every field is checked here and a
record that is not an object with the documented shape raises ValueError."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

VERDICTS = ("FORWARDED", "DENIED", "ERROR")


@dataclass(frozen=True)
class L7Peer:
    ip: str
    port: int
    identity: int


@dataclass
class L7Event:
    kind: ClassVar[str] = "l7"  # the `pilus monitor --type` name

    direction: str  # "ingress" | "egress" (which listener)
    endpoint: int  # the local endpoint's id (0: unknown)
    source: L7Peer
    destination: L7Peer
    protocol: str  # "HTTP/1.1" | "HTTP/2"
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
        direction = _str(rec, "direction")
        if direction not in ("ingress", "egress"):
            raise ValueError(f"direction: {direction!r} is neither ingress nor egress")
        verdict = _str(rec, "verdict")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}")
        grpc = rec.get("grpc_status")
        mismatches = rec.get("header_mismatches") or []
        if not isinstance(mismatches, list) or not all(isinstance(m, dict) for m in mismatches):
            raise ValueError("header_mismatches: must be a list of objects")
        t = rec.get("time")
        return cls(
            direction=direction,
            endpoint=_int(rec, "endpoint", default=0),
            source=_peer(rec, "source"),
            destination=_peer(rec, "destination"),
            protocol=_str(rec, "protocol", ""),
            method=_str(rec, "method", ""),
            url=_str(rec, "url", ""),
            host=_str(rec, "host", ""),
            path=_str(rec, "path", ""),
            status=_int(rec, "status", default=0),
            verdict=verdict,
            latency_ns=_int(rec, "latency_ns", default=0),
            grpc_status=None if grpc is None else _int(rec, "grpc_status"),
            listener=_str(rec, "listener", ""),
            header_mismatches=tuple((str(m.get("name", "")), str(m.get("action", ""))) for m in mismatches),
            record_time=float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None,
        )


def _str(rec: dict, key: str, default: str | None = None) -> str:
    v = rec.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, str):
        raise ValueError(f"{key}: must be a string")
    return v


def _int(rec: dict, key: str, default: int | None = None) -> int:
    v = rec.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key}: must be an integer")
    return v


def _peer(rec: dict, key: str) -> L7Peer:
    p = rec.get(key)
    if not isinstance(p, dict):
        raise ValueError(f"{key}: must be an object")
    ip = p.get("ip")
    if not isinstance(ip, str):
        raise ValueError(f"{key}.ip: must be a string")
    return L7Peer(ip, _int(p, "port", default=0), _int(p, "identity", default=0))
