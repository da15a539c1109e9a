"""The transparent L7 proxy: listeners, accepted connections, upstream sockets, counters.

Each accepted connection knows its original destination (``getsockname()`` of a socket that a
TPROXY rule or the datapath delivered to a listener with ``IP_TRANSPARENT``), the client's and
the destination's security identity (``IdentityResolver``) and so the rules that apply
(``ListenerConfig.select``). A ``protocol: kafka`` listener's connections go to ``kafkaconn``;
on an HTTP listener the first bytes decide: the HTTP/2 preface (prior-knowledge h2c, gRPC)
goes to ``h2conn``, anything else to ``h1conn``.

Upstream connections keep the client's address: ``IP_TRANSPARENT`` and a bind to the client's
IP before the connect (on a plain listener, ``transparent: false``, the proxy's own address),
and carry ``SO_MARK`` = ``MARK_PROXY_INGRESS`` (0x0A00) or ``MARK_PROXY_EGRESS`` (0x0B00),
Cilium's magic proxy marks, so the datapath can tell them apart and not redirect them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import asdict
from typing import Any

from .config import ListenerConfig, ProxyConfig
from .context import (
    CLOSE_LINGER,
    H2_PREFACE,
    HEAD_TIMEOUT,
    IP_TRANSPARENT,
    ConnectionContext,
    ListenerState,
    ProxyParts,
)
from .h1conn import serve_h1
from .h2conn import serve_h2
from .http_rules import SecretStore
from .identity import IdentityResolver
from .kafkaconn import serve_kafka
from .records import RecordSink

__all__ = ["ProxyServer"]

log = logging.getLogger("pilus.proxy")

class ProxyServer:
    """All listeners of one ProxyConfig; ``reload`` swaps the config without closing connections."""

    def __init__(self, config: ProxyConfig, resolver: IdentityResolver, secrets: SecretStore, sink: RecordSink):
        self.config = config
        self.parts = ProxyParts(resolver, secrets, sink)
        self.generation = 0
        self._listeners: dict[tuple[str, int], ListenerState] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.reload(self.config)

    def _socket(self, cfg: ListenerConfig) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if cfg.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((cfg.address, cfg.port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def reload(self, config: ProxyConfig) -> None:
        """New listeners open, kept ones get the new rules, gone ones stop accepting (their open
        connections run on with the rules they had)."""
        wanted = {(c.address, c.port): c for c in config.listeners}
        opened: list[ListenerState] = []
        try:
            for key, cfg in wanted.items():
                if key in self._listeners:
                    continue
                lst = ListenerState(cfg)
                sock = self._socket(cfg)
                lst.server = await asyncio.start_server(lambda r, w, lst=lst: self._accept(lst, r, w), sock=sock)
                opened.append(lst)
        except BaseException:
            for lst in opened:
                assert lst.server is not None
                lst.server.close()
            raise
        for lst in opened:
            self._listeners[(lst.config.address, lst.config.port)] = lst
        for key in list(self._listeners):
            if key not in wanted:
                lst = self._listeners.pop(key)
                if lst.server is not None:
                    lst.server.close()
            else:
                self._listeners[key].config = wanted[key]
        self.config = config
        self.generation += 1

    def status(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "listeners": [
                {"name": lst.config.name, "address": lst.config.address, "port": lst.config.port,
                 "direction": lst.config.direction, "protocol": lst.config.protocol,
                 "transparent": lst.config.transparent,
                 "rule_sets": len(lst.config.rules), **asdict(lst.counters)}
                for lst in self._listeners.values()
            ],
            "records_dropped": getattr(self.parts.sink, "dropped", 0),
        }

    async def stop(self) -> None:
        for lst in self._listeners.values():
            if lst.server is not None:
                lst.server.close()
        self._listeners.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, lst: ListenerState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        lst.counters.connections += 1
        lst.counters.active += 1
        sock = writer.get_extra_info("socket")
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = writer.get_extra_info("peername")[:2]
            orig_dst = writer.get_extra_info("sockname")[:2]
            if not lst.config.transparent and lst.config.upstream:
                orig_dst = lst.config.upstream
            ctx = ConnectionContext(self.parts, lst, client, orig_dst)
            if lst.config.protocol == "kafka":
                await serve_kafka(ctx, reader, writer)
                return
            first = b""
            while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
                chunk = await asyncio.wait_for(reader.read(len(H2_PREFACE) - len(first)), HEAD_TIMEOUT)
                if not chunk:
                    break
                first += chunk
            if not first:
                return
            if first == H2_PREFACE:
                await serve_h2(ctx, reader, writer, first)
            else:
                await serve_h1(ctx, reader, writer, first)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # the proxy is stopping: the connection just ends
        except Exception:
            log.exception("connection from %s failed", writer.get_extra_info("peername"))
        finally:
            lst.counters.active -= 1
            if not writer.is_closing() and not task.cancelling():
                with contextlib.suppress(Exception):
                    await _client_closes_first(reader)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)


async def _client_closes_first(reader: asyncio.StreamReader) -> None:
    """Wait a moment for the client's FIN before closing: the side that closes first keeps
    the 4-tuple in TIME_WAIT, and here that would be the node's side, where the client's
    next connection from the same port (the datapath hands SYNs straight to the listener)
    would be refused as a duplicate. Clients close first after `Connection: close`."""
    deadline = asyncio.get_running_loop().time() + CLOSE_LINGER
    drained = 0
    while drained < 1 << 20:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return
        data = await asyncio.wait_for(reader.read(65536), left)
        if not data:
            return
        drained += len(data)
