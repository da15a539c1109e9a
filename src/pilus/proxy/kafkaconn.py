"""One Kafka client connection: requests judged one by one (``kafka_rules.decide``), allowed
ones (or their allowed topics) sent on one upstream connection, answers to the client in
request order (Kafka clients pipeline: the broker answers in order, and the proxy's own
answers wait their turn behind the ones still due from the broker).

- The broker's ApiVersions answer is clamped to the versions ``kafka_schema`` parses.
- A request the codec cannot parse (unknown API key or version) goes upstream as it is when
  the rules allow it without looking at topics; otherwise the connection is closed (no answer
  can be encoded) and a parse error counted. So are bad frames (size, truncation, garbage).
- One record per (request, topic), written when the answer went to the client (acks=0
  produce: when it went upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from .context import ConnectionContext
from .kafka_rules import (
    API_KEY_NAMES,
    CompiledKafkaRules,
    Decision,
    clamp_api_versions,
    decide,
    merge,
    topic_errors,
)
from .kafka_schema import API, API_VERSIONS_KEY, UNSUPPORTED_VERSION
from .kafka_wire import (
    MIN_RESPONSE,
    FrameReader,
    KafkaCodecError,
    Request,
    Response,
    decode_request,
    decode_response,
    default_body,
    encode_request,
    encode_response,
    frame,
)

__all__ = ["serve_kafka"]

log = logging.getLogger("pilus.proxy")

READ_SIZE = 65536
IDLE_TIMEOUT = 600.0  # Kafka clients keep idle connections for minutes (connections.max.idle.ms 9 min)
DRAIN_TIMEOUT = 30.0  # after the client's EOF, how long answers still due from the broker may take
MAX_IN_FLIGHT = 64  # requests read ahead of their answers (backpressure on a pipelining client)


async def serve_kafka(ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      first: bytes = b"") -> None:
    conn = _KafkaConnection(ctx, reader, writer)
    try:
        await conn.run(first)
    finally:
        conn.close_upstream()


@dataclass
class _Pending:
    req: Request
    started: float
    decision: Decision | None = None  # None: forwarded unparsed (opaque)
    local: bytes | None = None  # the proxy's own answer
    upstream: bool = False  # an answer is due from the broker
    clamp: bool = False  # an ApiVersions answer to clamp
    recorded: bool = True  # False: version negotiation the proxy answers (not a verdict)


class _Closed(Exception):
    """The connection ends (the reason is counted already)."""


class _KafkaConnection:
    def __init__(self, ctx: ConnectionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.ctx = ctx
        self.reader = reader
        self.writer = writer
        self.frames = FrameReader()
        self.up_frames = FrameReader(min_frame=MIN_RESPONSE)
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue(MAX_IN_FLIGHT)
        self._up_ready: list[bytes] = []
        self._rules_for: Any = None
        self._rules: tuple[CompiledKafkaRules, int | None] = (CompiledKafkaRules(), None)

    def rules(self) -> tuple[CompiledKafkaRules, int | None]:
        """Read per request, so a reload applies to open connections from their next request."""
        cfg, ctx = self.ctx.listener.config, self.ctx
        if cfg is not self._rules_for:
            if cfg.direction == "ingress":
                self._rules = cfg.select_kafka(ctx.orig_dst[0], ctx.orig_dst[1], ctx.client_identity)
            else:
                self._rules = cfg.select_kafka(ctx.client[0], ctx.orig_dst[1], ctx.dst_identity)
            self._rules_for = cfg
        return self._rules

    def close_upstream(self) -> None:
        if self.up_w is not None:
            self.up_w.close()
        self.up_r = self.up_w = None

    async def run(self, first: bytes) -> None:
        reading = asyncio.ensure_future(self._read_requests(first))
        responding = asyncio.ensure_future(self._respond())
        try:
            done, _ = await asyncio.wait({reading, responding}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done and reading.exception() is None:
                await self.queue.put(None)  # the client is done: deliver what is still due
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(responding), DRAIN_TIMEOUT)
        finally:
            for t in (reading, responding):
                t.cancel()
            await asyncio.gather(reading, responding, return_exceptions=True)

    # -- client -> proxy -> broker

    async def _read_requests(self, first: bytes) -> None:
        data = first
        while True:
            if not data:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    data = await self.reader.read(READ_SIZE)
                if not data:
                    if self.frames.pending:
                        self.ctx.counters.parse_errors += 1  # a truncated frame
                    return
            try:
                bodies = self.frames.feed(data)
            except KafkaCodecError as e:
                return self._parse_error(e)
            data = b""
            for body in bodies:
                try:
                    req = decode_request(body)
                except KafkaCodecError as e:
                    return self._parse_error(e)
                pending = self._judge(req)
                if pending is None:
                    return
                goes_up = pending.upstream or (pending.decision and pending.decision.forward is not None)
                if goes_up and not await self._send_upstream(pending):
                    return
                await self.queue.put(pending)

    def _parse_error(self, e: Exception) -> None:
        self.ctx.counters.parse_errors += 1
        log.info("kafka connection from %s closed: %s", self.ctx.client, e)

    def _judge(self, req: Request) -> _Pending | None:
        now = time.monotonic()
        rules, _ = self.rules()
        if req.api_key == API_VERSIONS_KEY and not req.known:
            # a newer ApiVersions than the codec knows: answer as a broker does, with the
            # versions it supports, and the client retries with one of them
            api = API[API_VERSIONS_KEY]
            body = default_body(api.response, 0, False, error_code=UNSUPPORTED_VERSION,
                                api_keys=[{"api_key": api.key, "min_version": api.min, "max_version": api.max}])
            return _Pending(req, now, local=encode_response(api.key, 0, Response(req.correlation_id, body)),
                            recorded=False)
        if not req.known:
            if rules.allows_opaque(req.api_key, req.api_version, req.client_id):
                return _Pending(req, now, upstream=True)
            self._parse_error(KafkaCodecError(f"API {req.api_key} v{req.api_version} cannot be parsed, "
                                              "and no rule allows it without topics"))
            return None
        d = decide(req, rules)
        if d.forward is not None:
            return _Pending(req, now, d, upstream=d.expects_response, clamp=req.api_key == API_VERSIONS_KEY)
        local = None if d.local is None else encode_response(req.api_key, req.api_version, d.local)
        return _Pending(req, now, d, local=local)

    async def _send_upstream(self, p: _Pending) -> bool:
        fwd = p.decision.forward if p.decision is not None else p.req
        assert fwd is not None
        data = frame(p.req.raw) if fwd is p.req else encode_request(fwd)
        try:
            if self.up_w is None:
                self.up_r, self.up_w = await self.ctx.open_upstream()
            self.up_w.write(data)
            await self.up_w.drain()
        except (OSError, TimeoutError) as e:
            log.info("kafka upstream for %s failed: %s", self.ctx.client, e)
            self._record(p, None, "ERROR")
            return False
        return True

    # -- broker -> proxy -> client

    async def _upstream_frame(self) -> bytes:
        assert self.up_r is not None
        while not self._up_ready:
            data = await self.up_r.read(READ_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._up_ready.extend(self.up_frames.feed(data))
        return self._up_ready.pop(0)

    async def _respond(self) -> None:
        while (p := await self.queue.get()) is not None:
            resp: Response | None = None
            if p.local is not None:
                out = p.local
                if p.decision is not None:
                    resp = p.decision.local
            elif p.upstream:
                try:
                    body = await self._upstream_frame()
                except (OSError, KafkaCodecError) as e:
                    log.info("kafka upstream for %s failed: %s", self.ctx.client, e)
                    self._record(p, None, "ERROR")
                    return
                if len(body) < 4 or struct.unpack_from(">i", body)[0] != p.req.correlation_id:
                    self.ctx.counters.parse_errors += 1
                    self._record(p, None, "ERROR")
                    return
                try:
                    out, resp = self._answer(p, body)
                except KafkaCodecError as e:
                    self._parse_error(e)
                    self._record(p, None, "ERROR")
                    return
            else:  # acks=0 produce: nothing comes back
                out = b""
            if out:
                self.writer.write(out)
                await self.writer.drain()
            if p.recorded:
                self._record(p, resp, None)

    def _answer(self, p: _Pending, body: bytes) -> tuple[bytes, Response | None]:
        """The bytes for the client and the decoded answer (for the record)."""
        req = p.req
        if p.decision is None:
            return frame(body), None  # opaque
        version = req.api_version
        try:
            resp = decode_response(req.api_key, version, body)
        except KafkaCodecError:
            if not p.clamp:
                if p.decision.denied:
                    raise  # the merge needs the answer's structure
                return frame(body), None  # forwarded as it came; the record has no error code
            version = 0  # a broker that does not speak this ApiVersions version answers in v0
            resp = decode_response(req.api_key, version, body)
        if p.clamp:
            rules, _ = self.rules()
            resp.body = clamp_api_versions(
                resp.body, lambda key: rules.allows_opaque(key, None, req.client_id))
        elif p.decision.denied:
            resp = merge(req, p.decision, resp)
        else:
            return frame(body), resp
        return encode_response(req.api_key, version, resp), resp

    # -- records

    def _record(self, p: _Pending, resp: Response | None, verdict: str | None) -> None:
        req, ctx = p.req, self.ctx
        _, endpoint = self.rules()
        errors = topic_errors(req, resp) if req.known else {}
        topics = p.decision.topics if p.decision is not None else [("", True)]
        cfg = ctx.listener.config
        latency = int((time.monotonic() - p.started) * 1e9)
        for topic, allowed in topics:
            v = verdict or ("FORWARDED" if allowed else "DENIED")
            if v == "FORWARDED":
                ctx.counters.forwarded += 1
            elif v == "DENIED":
                ctx.counters.denied += 1
            else:
                ctx.counters.upstream_errors += 1
            rec = {
                "time": time.time(), "listener": cfg.name, "direction": cfg.direction, "endpoint": endpoint,
                "source": {"ip": ctx.client[0], "port": ctx.client[1], "identity": ctx.client_identity},
                "destination": {"ip": ctx.orig_dst[0], "port": ctx.orig_dst[1], "identity": ctx.dst_identity},
                "l7": "kafka", "protocol": "Kafka", "verdict": v, "latency_ns": latency,
                "kafka": {"api_key": API_KEY_NAMES.get(req.api_key, str(req.api_key)),
                          "api_version": req.api_version, "correlation_id": req.correlation_id,
                          "client_id": req.client_id or "", "topic": topic,
                          "error_code": errors.get(topic, errors.get("", 0)) if resp is not None
                          else None},  # no answer went to the client (acks=0, upstream failure)
            }
            try:
                ctx.proxy.sink.emit(rec)
            except Exception:  # a broken sink must not break the proxy
                log.exception("L7 record sink failed")
