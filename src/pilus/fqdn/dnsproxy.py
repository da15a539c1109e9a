"""The transparent DNS proxy (Cilium's in-agent dnsproxy): UDP and TCP on one port (15053).

The datapath (socket assign) or a TPROXY rule delivers a pod's queries for <server>:53 to
the listener; the original destination comes from ``IP_ORIGDSTADDR`` (UDP) or
``getsockname()`` (TCP). Every query is judged by its name against the ``DNSPolicy`` for
(client IP, original port, identity of the server):

- denied: the proxy answers ``reject_rcode`` (REFUSED, or NXDOMAIN as Cilium's
  ``--tofqdns-dns-reject-response-code``) itself;
- allowed: the same bytes (same id) go to the original server from the client's own IP
  (``IP_TRANSPARENT``, source port 51000-60999, ``SO_MARK`` 0x0B00 so the datapath leaves
  them alone); the answer is parsed and ``await on_answer(DNSAnswer)`` runs BEFORE the
  client gets it, so policy knows the IPs before the pod can connect; a failing on_answer
  is logged and counted, and the answer still goes out (as in Cilium);
- the upstream failed (timeout, refused, malformed or mismatched answer): SERVFAIL.

Replies leave from the original destination (server:53): a TCP connection's own socket, or
for UDP a short-lived transparent socket bound to it (as Cilium's ``udpOnce``). Bad input is
counted in ``parse_errors`` and answered FORMERR when its header was readable; it never
stops the proxy. One L7 record (``l7: "dns"``) per query goes to ``sink`` once the client
has its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import dns.rcode

from pilus.proxy.context import IP_TRANSPARENT, MARK_PROXY_EGRESS, SO_MARK, UPSTREAM_PORTS

from .dnswire import BadMessage, DNSAnswer, DNSQuery, parse_query, read_answer, reply_with_rcode
from .rules import DNSPolicy

__all__ = ["DNS_PROXY_PORT", "DNSAnswer", "DNSProxy", "DNSProxyCounters"]

log = logging.getLogger("pilus.fqdn")

DNS_PROXY_PORT = 15053
WORLD = 2  # the identity of an address nobody knows
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR  # the cmsg type has the same number
MAX_UDP = 65535
TCP_IDLE_TIMEOUT = 30.0  # a client's TCP connection may idle this long between queries
MAX_DATAGRAMS_PER_WAKEUP = 256  # so a flood cannot starve the rest of the agent's loop
MAX_INFLIGHT = 4096  # UDP queries being handled at once (Cilium: --dnsproxy-concurrency-limit)
MAX_REPLY_SOCKETS = 64  # transparent answer sockets kept, one per server address answered as
REJECT_RCODES = {"REFUSED": dns.rcode.REFUSED, "NXDOMAIN": dns.rcode.NXDOMAIN}

Exchange = Callable[[bytes], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


@dataclass
class DNSProxyCounters:
    queries: int = 0
    forwarded: int = 0
    denied: int = 0
    upstream_errors: int = 0
    parse_errors: int = 0
    on_answer_errors: int = 0
    send_errors: int = 0
    dropped_overload: int = 0  # UDP queries dropped because max_inflight were in flight
    tcp_connections: int = 0
    answers_pending: int = 0  # answers waiting for on_answer right now
    answers_held_ns: int = 0  # total time answers waited for on_answer


class DNSProxy:
    """See the module docstring. ``upstream`` (only with ``transparent=False``, for tests and
    debugging): forward every query there and judge it as if it was its destination."""

    def __init__(self, policy: DNSPolicy, resolve_identity: Callable[[str], int], *, port: int = DNS_PROXY_PORT,
                 address: str = "0.0.0.0", on_answer: Callable[[DNSAnswer], Awaitable[None]] | None = None,
                 sink: Callable[[dict], None] | None = None, reject_rcode: str = "REFUSED",
                 mark: int = MARK_PROXY_EGRESS, upstream_timeout: float = 2.0, transparent: bool = True,
                 upstream: tuple[str, int] | None = None, name: str = "dns-egress",
                 max_inflight: int = MAX_INFLIGHT):
        if reject_rcode.upper() not in REJECT_RCODES:
            raise ValueError(f"reject_rcode: {reject_rcode!r} is neither REFUSED nor NXDOMAIN")
        ipaddress.IPv4Address(address)
        if transparent == (upstream is not None):
            raise ValueError("upstream: needed without transparent, and only then")
        self.policy = policy
        self.port = port
        self.address = address
        self.name = name
        self.counters = DNSProxyCounters()
        self._resolve_identity = resolve_identity
        self._on_answer = on_answer
        self._sink = sink
        self._reject = REJECT_RCODES[reject_rcode.upper()]
        self._mark = mark
        self._timeout = upstream_timeout
        self._transparent = transparent
        self._upstream = upstream
        self._max_inflight = max_inflight
        self._inflight = 0
        self._udp: socket.socket | None = None
        # server (ip, port) -> the transparent socket answers are sent from, newest last
        self._reply_socks: OrderedDict[tuple[str, int], socket.socket] = OrderedDict()
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        udp = self._udp_listener()
        try:
            tcp_sock = self._tcp_listener(udp.getsockname()[1])
            self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp_sock, limit=MAX_UDP + 2)
        except BaseException:
            udp.close()
            raise
        self._udp = udp
        self.port = udp.getsockname()[1]
        self._loop.add_reader(udp.fileno(), self._udp_readable)
        log.info("DNS proxy listening on %s:%d (udp, tcp)", self.address, self.port)

    async def stop(self) -> None:
        if self._udp is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        while self._reply_socks:
            self._reply_socks.popitem()[1].close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def set_policy(self, policy: DNSPolicy) -> None:
        """Queries from now on are judged by ``policy`` (one already forwarded keeps its verdict)."""
        self.policy = policy

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "port": self.port, "transparent": self._transparent,
                "rule_sets": len(self.policy), "running": self._udp is not None, **asdict(self.counters)}

    # --- sockets -----------------------------------------------------------------------------

    def _udp_listener(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            sock.bind((self.address, self.port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _tcp_listener(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._transparent:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((self.address, port))
            sock.listen(256)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def _upstream_socket(self, kind: int, client_ip: str) -> socket.socket:
        """Transparent: bound to the client's IP and a port in UPSTREAM_PORTS (pods use the
        range below, so the 4-tuple never collides with one of the pod's own flows)."""
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.setblocking(False)
            if not self._transparent:
                return sock
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
            for attempt in range(64):
                try:
                    sock.bind((client_ip, random.randint(*UPSTREAM_PORTS)))
                    return sock
                except OSError as e:
                    if e.errno != 98 or attempt == 63:  # EADDRINUSE: try another port
                        raise
        except BaseException:
            sock.close()
            raise
        raise AssertionError("unreachable")

    def _udp_send(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        if not self._transparent:
            assert self._udp is not None
            self._udp.sendto(data, dst)
            return
        s = self._reply_socket(src)
        try:
            s.sendto(data, dst)
        except OSError:
            self._reply_socks.pop(src, None)
            s.close()
            raise

    def _reply_socket(self, src: tuple[str, int]) -> socket.socket:
        """The answer must come from server:53: a transparent socket bound there, kept for
        the next answers as that server (making one per answer cost a fifth of a query).
        It takes no query: the datapath hands queries to the listener by its port, and
        answers to upstream sockets only to a socket connected to their exact tuple
        (lib/proxy.h). Nothing reads it, so its receive buffer is the smallest."""
        s = self._reply_socks.get(src)
        if s is not None:
            self._reply_socks.move_to_end(src)
            return s
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self._mark)
            s.bind(src)
        except BaseException:
            s.close()
            raise
        self._reply_socks[src] = s
        if len(self._reply_socks) > MAX_REPLY_SOCKETS:
            self._reply_socks.popitem(last=False)[1].close()
        return s

    # --- UDP ---------------------------------------------------------------------------------

    def _udp_readable(self) -> None:
        sock = self._udp
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            if sock is None:
                return
            try:
                data, anc, _flags, client = sock.recvmsg(MAX_UDP, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. a queued ICMP error: nothing to read for it
                log.debug("DNS proxy recvmsg: %s", e)
                continue
            if self._inflight >= self._max_inflight:  # a flood: drop rather than grow without bound
                self.counters.dropped_overload += 1
                continue
            orig = self._upstream or _orig_dst(anc) or sock.getsockname()[:2]
            self._spawn(self._udp_query(data, client[:2], orig))

    async def _udp_query(self, data: bytes, client: tuple[str, int], orig: tuple[str, int]) -> None:
        self._inflight += 1
        try:
            await self._udp_query_counted(data, client, orig)
        finally:
            self._inflight -= 1

    async def _udp_query_counted(self, data: bytes, client: tuple[str, int], orig: tuple[str, int]) -> None:
        async def send(reply: bytes) -> None:
            try:
                self._udp_send(reply, orig, client)
            except OSError as e:
                self.counters.send_errors += 1
                log.warning("DNS answer to %s:%d from %s:%d failed: %s", *client, *orig, e)

        async def exchange(query: bytes) -> bytes:
            loop = asyncio.get_running_loop()
            sock = self._upstream_socket(socket.SOCK_DGRAM, client[0])
            try:
                await loop.sock_connect(sock, orig)
                await loop.sock_sendall(sock, query)
                while True:  # a stray datagram with another id is no answer
                    data = await loop.sock_recv(sock, MAX_UDP)
                    if data[:2] == query[:2]:
                        return data
            finally:
                sock.close()

        await self._handle(data, client, orig, exchange, send, "udp")

    # --- TCP ---------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counters.tcp_connections += 1
        client = writer.get_extra_info("peername")[:2]
        orig = self._upstream or writer.get_extra_info("sockname")[:2]
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def send(reply: bytes) -> None:
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await writer.drain()

        async def exchange(query: bytes) -> bytes:
            try:
                if not upstream:  # one upstream connection per client connection, opened lazily
                    sock = self._upstream_socket(socket.SOCK_STREAM, client[0])
                    try:
                        await asyncio.get_running_loop().sock_connect(sock, orig)
                    except BaseException:
                        sock.close()
                        raise
                    upstream.append(await asyncio.open_connection(sock=sock, limit=MAX_UDP + 2))
                ur, uw = upstream[0]
                uw.write(len(query).to_bytes(2, "big") + query)
                await uw.drain()
                n = int.from_bytes(await ur.readexactly(2), "big")
                return await ur.readexactly(n)
            except BaseException:
                _reset(upstream)  # its framing is unknown now: a later query opens a new one
                raise

        try:
            while True:
                try:
                    n = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT), "big")
                    data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                await self._handle(data, client, orig, exchange, send, "tcp")
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("DNS proxy TCP connection from %s:%d failed", *client)
        finally:
            _reset(upstream)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._tasks.discard(task)

    # --- one query ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _identity(self, ip: str) -> int:
        try:
            return int(self._resolve_identity(ip))
        except Exception:
            log.exception("identity of %s: resolver failed, using world", ip)
            return WORLD

    async def _handle(self, data: bytes, client: tuple[str, int], orig: tuple[str, int], exchange: Exchange,
                      send: Send, transport: str) -> None:
        c = self.counters
        c.queries += 1
        started = time.monotonic()
        try:
            query = parse_query(data)
        except BadMessage as e:
            c.parse_errors += 1
            log.debug("bad DNS query from %s:%d: %s", *client, e.reason)
            if e.reply is not None:
                await send(e.reply)
            return
        except Exception:  # parse_query promises BadMessage only; never let a query kill the proxy
            c.parse_errors += 1
            log.exception("DNS query from %s:%d could not be parsed", *client)
            return
        ids = (self._identity(client[0]), self._identity(orig[0]))
        rec = _Record(self, transport, client, orig, ids, query, started)
        matcher, rec.endpoint = self.policy.select(client[0], orig[1], ids[1])
        looped = self._transparent and orig[1] == self.port  # sent to the proxy port itself: never forward
        if matcher is None or looped or not matcher.matches(query.qname):
            c.denied += 1
            await send(reply_with_rcode(query, self._reject))
            rec.emit("DENIED", self._reject)
            return
        try:
            wire = await asyncio.wait_for(exchange(query.wire), self._timeout)
            answer = read_answer(query, wire, endpoint=rec.endpoint, client_ip=client[0])
        except Exception as e:  # timeout, refused, reset, malformed or mismatched answer
            c.upstream_errors += 1
            log.info("DNS %s for %s from %s:%d via %s:%d: upstream failed: %s", transport, query.qname, *client,
                     *orig, e or type(e).__name__)
            await send(reply_with_rcode(query, dns.rcode.SERVFAIL))
            rec.emit("ERROR", dns.rcode.SERVFAIL)
            return
        if self._on_answer is not None:
            c.answers_pending += 1
            held = time.monotonic_ns()
            try:
                await self._on_answer(answer)
            except Exception:
                c.on_answer_errors += 1
                log.exception("on_answer for %s (%s) failed; the answer goes out anyway", query.qname, client[0])
            finally:
                c.answers_pending -= 1
                c.answers_held_ns += time.monotonic_ns() - held
        await send(wire)
        c.forwarded += 1
        rec.emit("FORWARDED", answer.rcode, answer)


class _Record:
    """The L7 record of one query, written once the client has its answer."""

    def __init__(self, proxy: DNSProxy, transport: str, client: tuple[str, int], orig: tuple[str, int],
                 ids: tuple[int, int], query: DNSQuery, started: float):
        self.proxy, self.transport, self.client, self.orig, self.ids = proxy, transport, client, orig, ids
        self.query, self.started = query, started
        self.endpoint: int | None = None

    def emit(self, verdict: str, rcode: int, answer: DNSAnswer | None = None) -> None:
        sink = self.proxy._sink
        if sink is None:
            return
        rec = {
            "time": time.time(), "l7": "dns", "listener": self.proxy.name, "direction": "egress",
            "endpoint": self.endpoint, "transport": self.transport,
            "source": {"ip": self.client[0], "port": self.client[1], "identity": self.ids[0]},
            "destination": {"ip": self.orig[0], "port": self.orig[1], "identity": self.ids[1]},
            "protocol": "DNS", "verdict": verdict, "latency_ns": int((time.monotonic() - self.started) * 1e9),
            "dns": {"query": self.query.qname, "qtypes": list(self.query.qtypes),
                    "rrtypes": list(answer.rrtypes) if answer else [], "rcode": rcode,
                    "ips": list(answer.ips) if answer else [], "ttl": answer.ttl if answer else 0,
                    "cnames": list(answer.cnames) if answer else [], "observation_source": "proxy"},
        }
        try:
            sink(rec)
        except Exception:  # a broken sink must not break the proxy
            log.exception("DNS record sink failed")


def _orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntoa(data[4:8]), port
    return None


def _reset(upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    """Abort (RST) an upstream connection: closing first would leave its client-IP 4-tuple
    in TIME_WAIT on the node."""
    while upstream:
        _, w = upstream.pop()
        sock = w.get_extra_info("socket")
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()
