"""One HTTP/1.1 client connection: requests in order (pipelined ones wait their turn), each
judged by the listener's rules; allowed ones go to one keep-alive upstream connection, the
response comes back byte for byte. Denied: 403 ``Access denied`` and the connection stays
usable (closed only when the client asked for it, or sent ``Expect: 100-continue`` or an upgrade,
where the bytes that follow cannot be told apart). Malformed: 400/431, a parse error counted,
the connection closed. An allowed upgrade that the server answers with 101 becomes a tunnel.
Request bodies are re-framed (Content-Length as is, chunked re-chunked without trailers)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from urllib.parse import urlsplit

from .context import IDLE_TIMEOUT, ConnectionContext
from .h1wire import (
    Body,
    End,
    Head,
    Malformed,
    RequestReader,
    ResponseReader,
    Upgrade,
    denied_response,
    error_response,
    serialize_head,
)
from .http_rules import RequestHead

__all__ = ["serve_h1"]

READ_SIZE = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


class _StaleUpstream(ConnectionError):
    """The upstream connection closed before sending a byte of the response."""


async def serve_h1(ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   first: bytes) -> None:
    conn = _H1Connection(ctx, reader, writer)
    try:
        await conn.run(first)
    finally:
        conn.close_upstream()


def _target(head: Head) -> tuple[str, str]:
    """(host, path) as Envoy sees them: Host header and origin-form target, absolute-form split."""
    host = next((v.strip() for n, v in head.headers if n.lower() == "host"), "")
    path = head.target
    if path.lower().startswith(("http://", "https://")):
        u = urlsplit(path)
        host = u.netloc or host
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return host, path


class _H1Connection:
    def __init__(self, ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.parser = RequestReader()
        self.events: deque = deque()
        self.eof = False
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        self.up_used = False  # the upstream connection has served a request (it may have gone idle since)
        self.tunneled = False  # an upgrade made the upstream connection a byte tunnel

    async def _event(self):
        while not self.events:
            if self.eof:
                return None
            async with asyncio.timeout(IDLE_TIMEOUT):
                data = await self.reader.read(READ_SIZE)
            if not data:
                self.eof = True
                return None
            self.events.extend(self.parser.feed(data))
        return self.events.popleft()

    def close_upstream(self) -> None:
        if self.up_w is not None:
            # reset, not FIN: a TIME_WAIT here would hold one of the node's upstream ports
            # (UPSTREAM_PORTS) for a minute per connection; between requests nothing is in
            # flight (a tunnel's last bytes may still be, so a tunnel ends with a FIN)
            sock = self.up_w.get_extra_info("socket")
            if sock is not None and not self.tunneled:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.up_w.close()
        self.up_r = self.up_w = None
        self.up_used = False

    async def run(self, first: bytes) -> None:
        self.events.extend(self.parser.feed(first))
        while True:
            ev = await self._event()
            if ev is None:
                return
            if isinstance(ev, Malformed):
                self.ctx.counters.parse_errors += 1
                self.writer.write(error_response(ev.status, "Bad Request" if ev.status == 400 else ev.reason))
                await self.writer.drain()
                return
            if not isinstance(ev, Head) or not await self._request(ev):
                return

    async def _skip_body(self) -> bool:
        while True:
            ev = await self._event()
            if ev is None or isinstance(ev, Malformed | Upgrade):
                return False
            if isinstance(ev, End):
                return True

    async def _request(self, head: Head) -> bool:
        """Serve one request; True when the connection goes on."""
        started = time.monotonic()
        host, path = _target(head)
        req = RequestHead(head.method, path, host, list(head.headers))
        rules, endpoint = self.ctx.rules()
        verdict = rules.evaluate(req, self.ctx.secrets)
        rec = {"protocol": f"HTTP/{head.version}", "method": head.method, "host": host, "path": path,
               "started": started, "endpoint": endpoint, "mismatches": verdict.mismatches}
        if not verdict.allowed:
            close = not head.keep_alive or head.upgrade or head.expect_continue
            self.writer.write(denied_response(close=close))
            await self.writer.drain()
            self.ctx.record(status=403, verdict="DENIED", **rec)
            return not close and await self._skip_body()
        try:
            if self.up_w is None:
                self.up_r, self.up_w = await self.ctx.open_upstream()
            self.up_w.write(serialize_head(head, req.headers))
        except (OSError, TimeoutError) as e:
            self.writer.write(error_response(503, f"upstream connect error: {e.__class__.__name__}"))
            await self.writer.drain()
            self.ctx.record(status=503, verdict="ERROR", **rec)
            return False
        if head.upgrade:
            return await self._tunnel(rec)
        relay = None
        try:
            if head.content_length or head.chunked or head.expect_continue:
                # the response may start before the body ends (100 Continue, early answers)
                relay = asyncio.ensure_future(self._relay_response(head.method == "HEAD"))
                body_ok = await self._forward_body(head.chunked)
                status, keep, complete = await relay
            else:
                body_ok = await self._forward_body(False)
                reused = self.up_used
                try:
                    status, keep, complete = await self._relay_response(head.method == "HEAD")
                except _StaleUpstream:
                    if not reused:
                        raise
                    # the server closed its idle keep-alive connection: once more on a fresh one
                    self.close_upstream()
                    self.up_r, self.up_w = await self.ctx.open_upstream()
                    self.up_w.write(serialize_head(head, req.headers))
                    status, keep, complete = await self._relay_response(head.method == "HEAD")
            self.up_used = True
        except (OSError, ValueError, TimeoutError):
            if relay is not None:
                relay.cancel()
                with contextlib.suppress(BaseException):
                    await relay
            self.close_upstream()
            self.ctx.record(status=502, verdict="ERROR", **rec)
            return False
        self.ctx.record(status=status, verdict="FORWARDED", **rec)
        if not keep or not complete:
            self.close_upstream()
        return body_ok and complete and head.keep_alive

    async def _forward_body(self, chunked: bool) -> bool:
        assert self.up_w is not None
        while True:
            ev = await self._event()
            if ev is None or isinstance(ev, Malformed):
                if isinstance(ev, Malformed):
                    self.ctx.counters.parse_errors += 1
                raise ConnectionError("client went away in the middle of a request body")
            if isinstance(ev, End):
                if chunked:
                    self.up_w.write(b"0\r\n\r\n")
                await self.up_w.drain()
                return True
            if isinstance(ev, Body) and ev.data:
                self.up_w.write(b"%x\r\n%s\r\n" % (len(ev.data), ev.data) if chunked else ev.data)
                await self.up_w.drain()

    async def _relay_response(self, head_request: bool) -> tuple[int, bool, bool]:
        """Copy one response to the client; (status, upstream keep-alive, complete)."""
        assert self.up_r is not None
        rr = ResponseReader(head_request=head_request)
        got = False
        while not rr.complete:
            try:
                data = await self.up_r.read(READ_SIZE)
            except ConnectionResetError:
                if got:
                    raise
                data = b""
            if not data:
                if rr.close_delimited:
                    return rr.status, False, False
                if not got:
                    raise _StaleUpstream("upstream closed before answering")
                raise ConnectionError("upstream closed before the response ended")
            got = True
            rr.feed(data)
            self.writer.write(data)
            await self.writer.drain()
        return rr.status, rr.keep_alive, True

    async def _tunnel(self, rec: dict) -> bool:
        """An allowed upgrade (WebSocket): on 101, copy bytes both ways until one side closes."""
        assert self.up_r is not None and self.up_w is not None
        rest = b""
        while True:
            ev = await self._event()
            if ev is None or isinstance(ev, Malformed):
                return False
            if isinstance(ev, Upgrade):
                rest = ev.rest
                break
        await self.up_w.drain()
        try:
            status, _, _ = await self._relay_response(False)
        except (OSError, ValueError):
            self.ctx.record(status=502, verdict="ERROR", **rec)
            return False
        self.ctx.record(status=status, verdict="FORWARDED", **rec)
        if status != 101:
            return False
        self.tunneled = True
        if rest:
            self.up_w.write(rest)
        await asyncio.gather(_pipe(self.reader, self.up_w), _pipe(self.up_r, self.writer), return_exceptions=True)
        return False


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(READ_SIZE):
            w.write(data)
            await w.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if w.can_write_eof():
                w.write_eof()
