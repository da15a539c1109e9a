"""One accepted connection as the protocol handlers see it: addresses, identities, the rules
of its listener (read per request), the upstream connect and the L7 record. Marks and timeouts
are documented in ``server.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from .config import ListenerConfig
from .http_rules import CompiledHttpRules, SecretStore
from .identity import IdentityResolver
from .records import RecordSink

__all__ = ["CLOSE_LINGER", "CONNECT_TIMEOUT", "H2_PREFACE", "HEAD_TIMEOUT", "IDLE_TIMEOUT", "MARK_PROXY_EGRESS",
           "MARK_PROXY_INGRESS", "ConnectionContext", "ListenerCounters", "ListenerState", "ProxyParts"]

log = logging.getLogger("pilus.proxy")

MARK_PROXY_INGRESS = 0x0A00
MARK_PROXY_EGRESS = 0x0B00
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SO_MARK = getattr(socket, "SO_MARK", 36)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
IP_LOCAL_PORT_RANGE = getattr(socket, "IP_LOCAL_PORT_RANGE", 51)  # Linux 6.3
#: the source ports of upstream connections (which carry the client's address): pods get an
#: ephemeral range below these (endpoint/plumbing.py), so that an upstream connection never
#: takes the 4-tuple of one of the client's own connections (conntrack would mix the two up).
#: The kernel applies a per-socket range only inside the netns's (default 32768-60999).
UPSTREAM_PORTS = (51000, 60999)
_UPSTREAM_RANGE = struct.pack("I", UPSTREAM_PORTS[1] << 16 | UPSTREAM_PORTS[0])  # max << 16 | min
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEAD_TIMEOUT = 10.0  # a client gets this long to send a request head (a slow one stalls only itself)
IDLE_TIMEOUT = 120.0  # idle keep-alive connections are closed after this
CONNECT_TIMEOUT = 5.0
CLOSE_LINGER = 2.0  # how long a connection we end waits for the client to close first


@dataclass
class ListenerCounters:
    forwarded: int = 0
    denied: int = 0
    parse_errors: int = 0
    upstream_errors: int = 0
    connections: int = 0
    active: int = 0


class ConnectionContext:
    """What a protocol handler needs about one accepted connection."""

    def __init__(self, proxy: ProxyParts, listener: ListenerState, client: tuple[str, int], orig_dst: tuple[str, int]):
        self.proxy = proxy
        self.listener = listener
        self.client = client
        self.orig_dst = orig_dst
        self.client_identity = proxy.resolver.resolve(client[0])
        self.dst_identity = proxy.resolver.resolve(orig_dst[0])
        self.counters = listener.counters
        self._rules_for: ListenerConfig | None = None
        self._rules: tuple[CompiledHttpRules, int | None] = (CompiledHttpRules(), None)

    @property
    def secrets(self) -> SecretStore:
        return self.proxy.secrets

    def rules(self) -> tuple[CompiledHttpRules, int | None]:
        """Read per request, so a reload applies to open connections from their next request."""
        cfg = self.listener.config
        if cfg is not self._rules_for:  # a connection's addresses never change: select once per config
            if cfg.direction == "ingress":
                self._rules = cfg.select(self.orig_dst[0], self.orig_dst[1], self.client_identity)
            else:
                self._rules = cfg.select(self.client[0], self.orig_dst[1], self.dst_identity)
            self._rules_for = cfg
        return self._rules

    async def open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cfg = self.listener.config
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if cfg.transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK,
                                MARK_PROXY_INGRESS if cfg.direction == "ingress" else MARK_PROXY_EGRESS)
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                with contextlib.suppress(OSError):  # older kernels: the node's range
                    sock.setsockopt(socket.SOL_IP, IP_LOCAL_PORT_RANGE, _UPSTREAM_RANGE)
                sock.bind((self.client[0], 0))
                dst = self.orig_dst
            else:
                assert cfg.upstream is not None
                dst = cfg.upstream
            await asyncio.wait_for(loop.sock_connect(sock, dst), CONNECT_TIMEOUT)
            return await asyncio.open_connection(sock=sock, limit=2**20)
        except BaseException:
            sock.close()
            raise

    def record(self, *, protocol: str, method: str, host: str, path: str, status: int, verdict: str,
               started: float, endpoint: int | None, mismatches: tuple[tuple[str, str], ...] = (),
               grpc_status: int | None = None) -> None:
        if verdict == "FORWARDED":
            self.counters.forwarded += 1
        elif verdict == "DENIED":
            self.counters.denied += 1
        else:
            self.counters.upstream_errors += 1
        cfg = self.listener.config
        rec: dict[str, Any] = {
            "time": time.time(), "listener": cfg.name, "direction": cfg.direction, "endpoint": endpoint,
            "source": {"ip": self.client[0], "port": self.client[1], "identity": self.client_identity},
            "destination": {"ip": self.orig_dst[0], "port": self.orig_dst[1], "identity": self.dst_identity},
            "protocol": protocol, "method": method, "url": f"http://{host}{path}", "host": host, "path": path,
            "status": status, "grpc_status": grpc_status, "verdict": verdict,
            "latency_ns": int((time.monotonic() - started) * 1e9),
            "header_mismatches": [{"name": n, "action": a} for n, a in mismatches],
        }
        try:
            self.proxy.sink.emit(rec)
        except Exception:  # a broken sink must not break the proxy
            log.exception("L7 record sink failed")




class ListenerState:
    """A listener's current config (replaced on reload), counters and server."""

    def __init__(self, config: ListenerConfig):
        self.config = config
        self.counters = ListenerCounters()
        self.server: asyncio.AbstractServer | None = None


@dataclass
class ProxyParts:
    """The pluggable parts every connection shares."""

    resolver: IdentityResolver
    secrets: SecretStore
    sink: RecordSink
