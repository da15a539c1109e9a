"""One HTTP/2 prior-knowledge (h2c) client connection, gRPC included (hyper-h2 on both sides).

Every client stream is judged on its HEADERS (``:method``, ``:path``, ``:authority``, the other
fields); an allowed one is opened on one upstream h2 connection and both directions are copied
frame content by frame content, with flow control end to end: received DATA is acknowledged
(the window given back) only once it has been sent on the other side, so a slow reader holds
back its writer instead of filling the proxy's memory. A denied stream gets 403 ``Access
denied``, or for gRPC (``content-type: application/grpc...``) the trailers-only answer
``:status 200`` + ``grpc-status: 7`` (PERMISSION_DENIED), as Cilium's Envoy does. A protocol
error from the client is a parse error: GOAWAY and close."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from .context import IDLE_TIMEOUT, ConnectionContext
from .http_rules import RequestHead

__all__ = ["serve_h2"]

READ_SIZE = 65536
MAX_HEADER_LIST = 64 * 1024
GRPC_PERMISSION_DENIED = 7
GRPC_UNAVAILABLE = 14

Hdrs = list[tuple[str, str]]


async def serve_h2(ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   first: bytes) -> None:
    await _H2Proxy(ctx, reader, writer).run(first)


class _Side:
    """One h2 connection and its writer; sends queued per stream within the peer's windows."""

    def __init__(self, client_side: bool, writer: asyncio.StreamWriter):
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding="latin-1")
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=client_side, initial_values={h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
        self.writer = writer
        self.queues: dict[int, deque] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def headers(self, sid: int, headers: Hdrs, end: bool = False) -> None:
        self._queue(sid).append(("h", headers, end, None))
        self.pump(sid)

    def data(self, sid: int, data: bytes, end: bool, sent: Callable[[], None] | None = None) -> None:
        self._queue(sid).append(("d", data, end, sent))
        self.pump(sid)

    def _queue(self, sid: int) -> deque:
        return self.queues.setdefault(sid, deque())

    def pump(self, sid: int) -> None:
        q = self.queues.get(sid)
        try:
            while q:
                kind, payload, end, sent = q[0]
                if kind == "h":
                    self.conn.send_headers(sid, payload, end_stream=end)
                    q.popleft()
                    continue
                if not payload:
                    if end:
                        self.conn.end_stream(sid)
                    q.popleft()
                    if sent:
                        sent()
                    continue
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if window <= 0:
                    break
                n = min(window, len(payload))
                self.conn.send_data(sid, payload[:n], end_stream=end and n == len(payload))
                if n == len(payload):
                    q.popleft()
                    if sent:
                        sent()
                else:
                    q[0] = (kind, payload[n:], end, sent)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.queues.pop(sid, None)
        if q is not None and not q:
            self.queues.pop(sid, None)
        self.flush()

    def pump_all(self) -> None:
        for sid in list(self.queues):
            self.pump(sid)

    def reset(self, sid: int, code: int = 8) -> None:  # 8 = CANCEL
        self.queues.pop(sid, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(sid, code)
        self.flush()


@dataclass
class _Stream:
    down: int
    method: str
    host: str
    path: str
    grpc: bool
    endpoint: int | None
    mismatches: tuple
    started: float = field(default_factory=time.monotonic)
    up: int | None = None
    status: int = 0
    grpc_status: int | None = None
    recorded: bool = False
    client_trailers: bool = False


class _H2Proxy:
    def __init__(self, ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.ctx = ctx
        self.reader = reader
        self.down = _Side(False, writer)
        self.up: _Side | None = None
        self.up_task: asyncio.Task | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.by_down: dict[int, _Stream] = {}
        self.by_up: dict[int, _Stream] = {}
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def run(self, first: bytes) -> None:
        self.down.conn.initiate_connection()
        self.down.flush()
        data = first
        try:
            while data:
                try:
                    events = self.down.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.ctx.counters.parse_errors += 1
                    self.down.flush()  # the GOAWAY h2 queued
                    return
                for ev in events:
                    await self._down_event(ev)
                self.down.flush()
                await self.down.writer.drain()
                if self.up_writer is not None:
                    await self.up_writer.drain()
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), IDLE_TIMEOUT)
        finally:
            for st in list(self.by_down.values()):
                self._record(st, "ERROR" if not st.status else "FORWARDED")
            if self.up_task is not None:
                self.up_task.cancel()
                with contextlib.suppress(BaseException):
                    await self.up_task
            if self.up_writer is not None:
                self.up_writer.close()

    # -- client side ---------------------------------------------------------------------

    async def _down_event(self, ev) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            await self._request(ev.stream_id, ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            st = self.by_down.get(ev.stream_id)
            n, sid = ev.flow_controlled_length, ev.stream_id
            if st is None or st.up is None or self.up is None:
                self._ack(self.down, sid, n)
            else:
                self.up.data(st.up, ev.data, False, lambda n=n, sid=sid: self._ack(self.down, sid, n))
        elif isinstance(ev, h2.events.StreamEnded | h2.events.TrailersReceived):
            st = self.by_down.get(ev.stream_id)
            if st is not None and st.up is not None and self.up is not None:
                if isinstance(ev, h2.events.TrailersReceived):
                    self.up.headers(st.up, list(ev.headers), end=True)
                elif not st.client_trailers:
                    self.up.data(st.up, b"", True)
                if isinstance(ev, h2.events.TrailersReceived):
                    st.client_trailers = True
        elif isinstance(ev, h2.events.StreamReset):
            st = self.by_down.pop(ev.stream_id, None)
            if st is not None and st.up is not None and self.up is not None:
                self.by_up.pop(st.up, None)
                self.up.reset(st.up)
                self._record(st, "ERROR")
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                self.down.pump_all()
            else:
                self.down.pump(ev.stream_id)

    async def _request(self, sid: int, headers: Hdrs) -> None:
        pseudo = {n: v for n, v in headers if n.startswith(":")}
        regular = [(n, v) for n, v in headers if not n.startswith(":")]
        host = pseudo.get(":authority") or next((v for n, v in regular if n == "host"), "")
        req = RequestHead(pseudo.get(":method", ""), pseudo.get(":path", ""), host, regular)
        rules, endpoint = self.ctx.rules()
        verdict = rules.evaluate(req, self.ctx.secrets)
        grpc = next((v for n, v in regular if n == "content-type"), "").startswith("application/grpc")
        st = _Stream(sid, req.method, host, req.path, grpc, endpoint, verdict.mismatches)
        if not verdict.allowed:
            self._local_reply(st, 403, GRPC_PERMISSION_DENIED, "Access denied")
            self._record(st, "DENIED")
            return
        try:
            await self._ensure_upstream()
        except (OSError, TimeoutError):
            self._local_reply(st, 503, GRPC_UNAVAILABLE, "upstream connect error")
            self._record(st, "ERROR")
            return
        assert self.up is not None
        st.up = self.up.conn.get_next_available_stream_id()
        self.by_down[sid] = st
        self.by_up[st.up] = st
        out = [(n, v) for n, v in headers if n.startswith(":")] + [(n.lower(), v) for n, v in req.headers]
        self.up.headers(st.up, out)

    def _local_reply(self, st: _Stream, status: int, grpc_status: int, message: str) -> None:
        if st.grpc:
            st.status, st.grpc_status = 200, grpc_status
            self.down.headers(st.down, [(":status", "200"), ("content-type", "application/grpc"),
                                        ("grpc-status", str(grpc_status)), ("grpc-message", message)], end=True)
        else:
            body = message.encode() + b"\r\n"
            st.status = status
            self.down.headers(st.down, [(":status", str(status)), ("content-type", "text/plain"),
                                        ("content-length", str(len(body)))])
            self.down.data(st.down, body, True)

    @staticmethod
    def _ack(side: _Side, sid: int, n: int) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            side.conn.acknowledge_received_data(n, sid)
        side.flush()

    def _record(self, st: _Stream, verdict: str) -> None:
        if st.recorded:
            return
        st.recorded = True
        self.ctx.record(protocol="HTTP/2", method=st.method, host=st.host, path=st.path, status=st.status,
                        verdict=verdict, started=st.started, endpoint=st.endpoint, mismatches=st.mismatches,
                        grpc_status=st.grpc_status)

    # -- upstream side -------------------------------------------------------------------

    async def _ensure_upstream(self) -> None:
        async with self._connecting:
            if self.up is not None:
                return
            r, w = await self.ctx.open_upstream()
            side = _Side(True, w)
            side.conn.initiate_connection()
            side.flush()
            self.up, self.up_writer = side, w
            self.up_task = asyncio.ensure_future(self._run_upstream(r, side))

    async def _run_upstream(self, reader: asyncio.StreamReader, side: _Side) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                try:
                    events = side.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for ev in events:
                    self._up_event(side, ev)
                side.flush()
                await self.down.writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.up is side:
                self.up = None
                self.up_writer = None
                side.writer.close()
                for st in list(self.by_up.values()):  # streams the upstream dropped
                    self.by_up.pop(st.up, None)  # type: ignore[arg-type]
                    self.by_down.pop(st.down, None)
                    self.down.reset(st.down, 2)  # INTERNAL_ERROR
                    self._record(st, "ERROR")
                self.down.flush()

    def _up_event(self, side: _Side, ev) -> None:
        st = self.by_up.get(getattr(ev, "stream_id", 0) or 0)
        if isinstance(ev, h2.events.ResponseReceived) and st is not None:
            hdrs = dict(ev.headers)
            st.status = int(hdrs.get(":status", "0") or 0)
            gs = hdrs.get("grpc-status")  # a trailers-only answer carries it in the headers
            st.grpc_status = int(gs) if gs and gs.isdigit() else st.grpc_status
            if ev.stream_ended is not None:  # HEADERS with END_STREAM (gRPC trailers-only): keep it one frame
                self.down.headers(st.down, list(ev.headers), end=True)
                self._finish(st)
            else:
                self.down.headers(st.down, list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            n, sid = ev.flow_controlled_length, ev.stream_id
            if st is None:
                self._ack(side, sid, n)
            else:
                self.down.data(st.down, ev.data, False, lambda n=n, sid=sid: self._ack(side, sid, n))
        elif isinstance(ev, h2.events.TrailersReceived) and st is not None:
            gs = dict(ev.headers).get("grpc-status")
            st.grpc_status = int(gs) if gs and gs.isdigit() else st.grpc_status
            self.down.headers(st.down, list(ev.headers), end=True)
            self._finish(st)
        elif isinstance(ev, h2.events.StreamEnded) and st is not None:
            self.down.data(st.down, b"", True)
            self._finish(st)
        elif isinstance(ev, h2.events.StreamReset) and st is not None:
            self.by_up.pop(ev.stream_id, None)
            self.by_down.pop(st.down, None)
            self.down.reset(st.down, ev.error_code)
            self._record(st, "ERROR")
        elif isinstance(ev, h2.events.WindowUpdated):
            if ev.stream_id == 0:
                side.pump_all()
            else:
                side.pump(ev.stream_id)

    def _finish(self, st: _Stream) -> None:
        if st.up is not None:
            self.by_up.pop(st.up, None)
        self.by_down.pop(st.down, None)
        self._record(st, "FORWARDED")
