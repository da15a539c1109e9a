"""HTTP/1.1 on the wire, sans I/O: bytes in, events out (httptools = Node's llhttp underneath).

``RequestReader.feed(bytes)`` returns ``Head``/``Body``/``End``/``Upgrade``/``Malformed`` events in
order, several requests per call when the client pipelines. A hostile client can make it:
hold at most ``MAX_HEAD_BYTES`` of request line and headers (more: ``Malformed(431)``), at most
``MAX_HEADERS`` fields (431); a body is passed on chunk by chunk and never buffered here.
Refused with ``Malformed(400)``: anything llhttp rejects, ``Content-Length`` together with
``Transfer-Encoding`` (request smuggling), several different ``Content-Length`` values, and
``Transfer-Encoding`` other than a final ``chunked``. After ``Malformed`` or ``Upgrade`` the reader
is done (the connection is closed or becomes a tunnel).

``ResponseReader`` finds where one upstream response ends (1xx interim answers, HEAD, 204/304,
chunked, length, and close-delimited at EOF) so a response can be relayed byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools

__all__ = [
    "MAX_HEADERS", "MAX_HEAD_BYTES", "Body", "End", "Head", "Malformed", "RequestReader", "ResponseReader",
    "Upgrade", "denied_response", "error_response", "serialize_head",
]

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


@dataclass
class Head:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    keep_alive: bool
    upgrade: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool


@dataclass
class Body:
    data: bytes


@dataclass
class End:
    pass


@dataclass
class Upgrade:
    rest: bytes  # bytes after the head: already the tunnel's


@dataclass
class Malformed:
    status: int  # 400 or 431
    reason: str


class _TooLarge(Exception):
    pass


@dataclass
class _Cur:
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[str, str]] = field(default_factory=list)
    size: int = 0


class RequestReader:
    def __init__(self) -> None:
        self._p = httptools.HttpRequestParser(self)
        self._cur = _Cur()
        self._events: list = []
        self.done = False
        self._in_head = False
        self._head_fed = 0  # bytes fed while a head is incomplete (httptools buffers partial fields)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._cur = _Cur()
        self._in_head = True
        self._head_fed = 0

    def on_url(self, url: bytes) -> None:
        self._cur.url += url
        self._cur.size += len(url)
        if self._cur.size > MAX_HEAD_BYTES:
            raise _TooLarge("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        c = self._cur
        c.size += len(name) + len(value) + 4
        if c.size > MAX_HEAD_BYTES:
            raise _TooLarge("headers too large")
        if len(c.headers) >= MAX_HEADERS:
            raise _TooLarge("too many headers")
        c.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        c = self._cur
        lengths = {v.strip() for n, v in c.headers if n.lower() == "content-length"}
        te = [v for n, v in c.headers if n.lower() == "transfer-encoding"]
        if te and lengths:
            raise ValueError("Content-Length together with Transfer-Encoding")
        if len(lengths) > 1:
            raise ValueError("conflicting Content-Length values")
        codings = [t.strip().lower() for v in te for t in v.split(",")]
        if codings and codings[-1] != "chunked":
            raise ValueError("Transfer-Encoding must end with chunked")
        expect = next((v for n, v in c.headers if n.lower() == "expect"), None)
        upgrade = self._p.should_upgrade()
        self._events.append(Head(
            method=self._p.get_method().decode("latin-1"), target=c.url.decode("latin-1"),
            version=self._p.get_http_version(), headers=c.headers, keep_alive=self._p.should_keep_alive(),
            upgrade=upgrade, chunked=bool(codings), content_length=int(lengths.pop()) if lengths else None,
            expect_continue=expect is not None and expect.strip().lower() == "100-continue",
        ))

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(bytes(body)))

    def on_message_complete(self) -> None:
        self._events.append(End())

    def feed(self, data: bytes) -> list:
        if self.done:
            return []
        self._events = []
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.done = True
            self._events.append(Upgrade(bytes(data[e.args[0]:])))
        except httptools.HttpParserCallbackError as e:
            self.done = True
            cause = e.__context__ or e.__cause__
            if isinstance(cause, _TooLarge):
                self._events.append(Malformed(431, str(cause)))
            else:
                self._events.append(Malformed(400, str(cause or e)))
        except httptools.HttpParserError as e:
            self.done = True
            self._events.append(Malformed(400, str(e) or type(e).__name__))
        else:
            if self._in_head:
                self._head_fed += len(data)
                if self._head_fed > MAX_HEAD_BYTES:
                    self.done = True
                    self._events.append(Malformed(431, "headers too large"))
        return self._events


class ResponseReader:
    """Feed upstream bytes; ``complete`` once the final response of one request has ended."""

    def __init__(self, *, head_request: bool = False) -> None:
        self._p = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.status = 0
        self.keep_alive = True
        self.complete = False
        self.close_delimited = False
        self._has_length = False
        self._final = False

    def on_message_begin(self) -> None:
        self._has_length = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._has_length = True

    def on_headers_complete(self) -> None:
        self.status = self._p.get_status_code()
        self._final = self.status >= 200
        self.keep_alive = self._p.should_keep_alive()
        if self._final and self.head_request:
            self.complete = True
        elif self._final and not self._has_length and self.status not in (204, 304):
            self.close_delimited = True

    def on_message_complete(self) -> None:
        if self._final:
            self.complete = True

    def feed(self, data: bytes) -> None:
        """Raises ValueError on a response llhttp cannot parse."""
        if self.complete:
            return
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.complete = True  # 101 Switching Protocols: the rest is the tunnel's
        except httptools.HttpParserError as e:
            if not self.complete:
                raise ValueError(f"bad response from upstream: {e}") from None


def serialize_head(head: Head, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{head.method} {head.target} HTTP/{head.version}"]
    lines += [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reply(status: int, reason: str, body: bytes, *, close: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\ncontent-type: text/plain\r\n"
            + ("connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


def denied_response(*, close: bool) -> bytes:
    """Cilium's answer to a request the L7 rules deny."""
    return _reply(403, "Forbidden", b"Access denied\r\n", close=close)


_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
            408: "Request Timeout"}


def error_response(status: int, body: str) -> bytes:
    return _reply(status, _REASONS.get(status, "Error"), body.encode() + b"\r\n", close=True)
