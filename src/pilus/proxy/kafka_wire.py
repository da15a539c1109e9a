"""Kafka wire format, sans-I/O: frames, request / response headers and schema-driven bodies.

``FrameReader.feed(bytes) -> [frame body]`` splits a byte stream on the 4-byte size prefix
(a frame over ``MAX_FRAME`` bytes, or under a header's fixed part, is an error). ``decode_request`` reads the
request header (v1, or v2 = with tagged fields for a flexible API version) and, for an API and
version ``kafka_schema.API`` covers, the body as a dict; ``encode_request`` /
``decode_response`` / ``encode_response`` are the other directions. Tagged fields are kept raw
(``"_tags": [(tag, bytes)]`` in each struct) so a decoded frame encodes back byte for byte.
Every malformed input raises ``KafkaCodecError``, nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from .kafka_schema import API, API_VERSIONS_KEY, F

__all__ = ["MAX_FRAME", "MIN_REQUEST", "MIN_RESPONSE", "FrameReader", "KafkaCodecError", "Request", "Response",
           "decode_request", "decode_response", "default_body", "encode_request", "encode_response", "frame"]

MAX_FRAME = 100 * 1024 * 1024  # Kafka's default socket.request.max.bytes is 100 MiB
MIN_REQUEST = 8  # api key, version, correlation id
MIN_RESPONSE = 4  # correlation id (a Heartbeat v0 answer is 6 bytes)
MAX_ARRAY = 1 << 20  # an array can never be longer than the frame anyway; this bounds a bogus count early


class KafkaCodecError(ValueError):
    """Bytes that are not a Kafka frame the codec understands."""


class FrameReader:
    """Size-prefixed frames out of a byte stream."""

    def __init__(self, max_frame: int = MAX_FRAME, min_frame: int = MIN_REQUEST):
        self.max_frame = max_frame
        self.min_frame = min_frame
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (non-zero at EOF: the peer sent a truncated frame)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (size,) = struct.unpack_from(">i", self._buf)
            if size < self.min_frame or size > self.max_frame:  # at least a header's fixed part
                raise KafkaCodecError(f"frame size {size} outside {self.min_frame}..{self.max_frame}")
            if len(self._buf) < 4 + size:
                break
            out.append(bytes(self._buf[4:4 + size]))
            del self._buf[:4 + size]
        return out


def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


class _R:
    """A cursor over one frame body."""

    __slots__ = ("b", "o")

    def __init__(self, b: bytes, o: int = 0):
        self.b, self.o = b, o

    def take(self, n: int) -> bytes:
        if n < 0 or self.o + n > len(self.b):
            raise KafkaCodecError(f"truncated at byte {self.o} (need {n})")
        v = self.b[self.o:self.o + n]
        self.o += n
        return v

    def fixed(self, fmt: str, n: int) -> Any:
        return struct.unpack(fmt, self.take(n))[0]

    def uvarint(self) -> int:
        v = shift = 0
        while True:
            byte = self.take(1)[0]
            v |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return v
            shift += 7
            if shift > 28:
                raise KafkaCodecError("unsigned varint longer than 5 bytes")

    def length(self, compact: bool, wide: bool = False) -> int | None:
        """A string / bytes / array length; None for null."""
        n = self.uvarint() - 1 if compact else self.fixed(">i", 4) if wide else self.fixed(">h", 2)
        if n < -1:
            raise KafkaCodecError(f"negative length {n} at byte {self.o}")
        return None if n == -1 else n

    def tags(self) -> list[tuple[int, bytes]]:
        out = []
        for _ in range(self._count(self.uvarint())):
            tag = self.uvarint()
            out.append((tag, self.take(self.uvarint())))
        return out

    def _count(self, n: int) -> int:
        if n > MAX_ARRAY or n > len(self.b) - self.o:
            raise KafkaCodecError(f"count {n} larger than the frame")
        return n


class _W:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def fixed(self, fmt: str, v: Any) -> None:
        try:
            self.parts.append(struct.pack(fmt, v))
        except struct.error as e:
            raise KafkaCodecError(f"value {v!r}: {e}") from None

    def uvarint(self, v: int) -> None:
        if v < 0:
            raise KafkaCodecError(f"negative unsigned varint {v}")
        out = bytearray()
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
        self.parts.append(bytes(out))

    def length(self, n: int | None, compact: bool, wide: bool = False) -> None:
        if compact:
            self.uvarint(0 if n is None else n + 1)
        else:
            self.fixed(">i" if wide else ">h", -1 if n is None else n)

    def tags(self, tags: list[tuple[int, bytes]]) -> None:
        self.uvarint(len(tags))
        for tag, data in tags:
            self.uvarint(tag)
            self.uvarint(len(data))
            self.parts.append(bytes(data))

    def data(self) -> bytes:
        return b"".join(self.parts)


_FIXED = {"int8": (">b", 1), "int16": (">h", 2), "int32": (">i", 4), "int64": (">q", 8), "bool": (">?", 1)}


_NUMBERS = {t: struct.Struct(fmt) for t, (fmt, _) in _FIXED.items() if t != "bool"}
_PLANS: dict[tuple[int, int], tuple[tuple[str, Any], ...]] = {}


def _plan(fields: list[F] | tuple[F, ...], version: int) -> tuple[tuple[str, Any], ...]:
    """The (name, type) of the fields one version carries, worked out once: the schemas are
    module constants, so their ids are stable (this is the proxy's hottest loop)."""
    key = (id(fields), version)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = tuple((f.name, f.type) for f in fields if f.present(version))
    return plan


def _read(r: _R, t: Any, flex: bool, version: int) -> Any:
    if type(t) is list:
        n = r.length(flex, wide=True)
        return None if n is None else [_read_struct(r, t, flex, version) for _ in range(r._count(n))]
    num = _NUMBERS.get(t)
    if num is not None:
        o = r.o
        if o + num.size > len(r.b):
            raise KafkaCodecError(f"truncated at byte {o} (need {num.size})")
        r.o = o + num.size
        return num.unpack_from(r.b, o)[0]
    if t == "bool":
        return _bool(r)
    if t == "string":
        n = r.length(flex)
        if n is None:
            return None
        raw = r.take(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise KafkaCodecError(f"string at byte {r.o - n} is not UTF-8") from None
    if t == "bytes":
        n = r.length(flex, wide=True)
        return None if n is None else r.take(n)
    if t == "uuid":
        return r.take(16)
    if t.startswith("["):
        n = r.length(flex, wide=True)
        return None if n is None else [_read(r, t[1:-1], flex, version) for _ in range(r._count(n))]
    raise AssertionError(f"schema type {t!r}")


def _bool(r: _R) -> bool:
    b = r.take(1)[0]
    if b > 1:  # only 0 and 1 re-encode byte for byte
        raise KafkaCodecError(f"bool byte {b} at {r.o - 1}")
    return b == 1


def _read_struct(r: _R, fields: list[F] | tuple[F, ...], flex: bool, version: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, t in _plan(fields, version):
        out[name] = _read(r, t, flex, version)
    if flex:
        out["_tags"] = r.tags()
    return out


def _write(w: _W, t: Any, v: Any, flex: bool, version: int, where: str) -> None:
    if isinstance(t, list) or (isinstance(t, str) and t.startswith("[")):
        if v is None:
            w.length(None, flex, wide=True)
            return
        if not isinstance(v, list):
            raise KafkaCodecError(f"{where}: not a list")
        w.length(len(v), flex, wide=True)
        for i, item in enumerate(v):
            if isinstance(t, list):
                _write_struct(w, t, item, flex, version, f"{where}[{i}]")
            else:
                _write(w, t[1:-1], item, flex, version, f"{where}[{i}]")
        return
    if t in _FIXED:
        if t == "bool":
            w.parts.append(b"\x01" if v else b"\x00")
        else:
            w.fixed(_FIXED[t][0], v)
    elif t in ("string", "bytes"):
        if v is None:
            w.length(None, flex, wide=t == "bytes")
            return
        data = v.encode() if isinstance(v, str) else bytes(v)
        w.length(len(data), flex, wide=t == "bytes")
        w.parts.append(data)
    elif t == "uuid":
        if len(v) != 16:
            raise KafkaCodecError(f"{where}: uuid of {len(v)} bytes")
        w.parts.append(bytes(v))
    else:
        raise AssertionError(f"schema type {t!r}")


def _write_struct(w: _W, fields: list[F] | tuple[F, ...], v: dict[str, Any], flex: bool, version: int,
                  where: str) -> None:
    if not isinstance(v, dict):
        raise KafkaCodecError(f"{where}: not a struct")
    for f in fields:
        if f.present(version):
            _write(w, f.type, v.get(f.name, _default(f)), flex, version, f"{where}.{f.name}")
    if flex:
        w.tags(v.get("_tags", []))


def _default(f: F) -> Any:
    if f.default is not None:
        return f.default
    if isinstance(f.type, list) or f.type.startswith("["):
        return []
    if f.type in _FIXED:
        return False if f.type == "bool" else 0
    return {"string": "", "bytes": b"", "uuid": bytes(16)}[f.type]


def default_body(fields: list[F] | tuple[F, ...], version: int, flex: bool, **values: Any) -> dict[str, Any]:
    """A struct with every field of ``version`` at its default (then ``values``)."""
    out = {f.name: _default(f) for f in fields if f.present(version)}
    if flex:
        out["_tags"] = []
    out.update(values)
    return out


@dataclass
class Request:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    header_tags: list[tuple[int, bytes]] = field(default_factory=list)
    body: dict[str, Any] | None = None  # None: an API or version the schemas do not cover
    raw: bytes = b""  # the frame body as received

    @property
    def known(self) -> bool:
        return self.body is not None


@dataclass
class Response:
    correlation_id: int
    body: dict[str, Any]
    header_tags: list[tuple[int, bytes]] = field(default_factory=list)


def _covered(api_key: int, version: int):
    api = API.get(api_key)
    return api if api is not None and api.min <= version <= api.max else None


def decode_request(body: bytes) -> Request:
    r = _R(body)
    api_key, version, corr = r.fixed(">h", 2), r.fixed(">h", 2), r.fixed(">i", 4)
    n = r.length(False)  # the header's client_id is never compact
    try:
        client_id = None if n is None else r.take(n).decode()
    except UnicodeDecodeError:
        raise KafkaCodecError("client_id is not UTF-8") from None
    req = Request(api_key, version, corr, client_id, raw=body)
    api = _covered(api_key, version)
    if api is None:
        return req
    flex = api.is_flexible(version)
    if flex:
        req.header_tags = r.tags()
    req.body = _read_struct(r, api.request, flex, version)
    if r.o != len(body):
        raise KafkaCodecError(f"{len(body) - r.o} bytes after the {api.name} v{version} request")
    return req


def encode_request(req: Request) -> bytes:
    """The whole frame (size prefix included)."""
    api = _covered(req.api_key, req.api_version)
    if api is None or req.body is None:
        return frame(req.raw)
    w = _W()
    w.fixed(">h", req.api_key)
    w.fixed(">h", req.api_version)
    w.fixed(">i", req.correlation_id)
    _write(w, "string", req.client_id, False, req.api_version, "client_id")
    flex = api.is_flexible(req.api_version)
    if flex:
        w.tags(req.header_tags)
    _write_struct(w, api.request, req.body, flex, req.api_version, api.name)
    return frame(w.data())


def _response_header_flexible(api_key: int, version: int) -> bool:
    # ApiVersions answers with header v0 in every version, so a client that does not know the
    # broker's versions yet can read it
    api = API[api_key]
    return api.is_flexible(version) and api_key != API_VERSIONS_KEY


def decode_response(api_key: int, version: int, body: bytes) -> Response:
    api = _covered(api_key, version)
    if api is None:
        raise KafkaCodecError(f"no schema for API {api_key} v{version}")
    r = _R(body)
    corr = r.fixed(">i", 4)
    tags = r.tags() if _response_header_flexible(api_key, version) else []
    out = _read_struct(r, api.response, api.is_flexible(version), version)
    if r.o != len(body):
        raise KafkaCodecError(f"{len(body) - r.o} bytes after the {api.name} v{version} response")
    return Response(corr, out, tags)


def encode_response(api_key: int, version: int, resp: Response) -> bytes:
    api = _covered(api_key, version)
    if api is None:
        raise KafkaCodecError(f"no schema for API {api_key} v{version}")
    w = _W()
    w.fixed(">i", resp.correlation_id)
    if _response_header_flexible(api_key, version):
        w.tags(resp.header_tags)
    _write_struct(w, api.response, resp.body, api.is_flexible(version), version, api.name)
    return frame(w.data())
