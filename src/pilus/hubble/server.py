"""The gRPC edge of Hubble on one node: ``observer.Observer``, ``peer.Peer`` and the
standard health service (SERVING for "" and "hubble.server.Observer"), on a UNIX socket
and optionally on TCP, with grpc.aio on the agent's event loop.

GetFlows follows Hubble's observer (Cilium pkg/hubble/observer):
- where reading starts: ``first`` (without ``since``): the oldest flow; ``follow``
  without ``number`` and ``since``: the next flow to come; otherwise the ring is walked
  back from the newest flow to the first one at or after ``since``, or until
  ``number`` flows that pass the filters were seen (``number`` 0: the whole ring);
- without ``follow`` the stream ends at the newest flow, or after ``number`` flows;
  with ``follow`` it waits for new flows until the client goes away (``number`` then
  only says how far back to start); a flow later than ``until`` ends it either way;
- LostEvent entries of the ring pass every filter; a client that falls so far behind
  that the ring overwrote its next flows gets a LostEvent (HUBBLE_RING_BUFFER) with
  their count and goes on with the oldest flow there is, so a slow client never holds
  up the agent or other clients (the writer never waits for a reader);
- a bad filter or field mask, or ``first`` with ``follow``, is INVALID_ARGUMENT with
  the reason; a field mask keeps only the named Flow fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import pilus
from pilus.hubble.filters import FilterError, FlowMatcher
from pilus.hubble.flows import timestamp
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2
from pilus.hubble.ring import FlowRing

log = logging.getLogger(__name__)

VERSION = f"pilus-{pilus.__version__}"
HEALTH_SERVICES = ("", "hubble.server.Observer")
UNSPECIFIED_HOSTS = ("", "0.0.0.0", "[::]", "::")
STOP_GRACE = 0.5  # seconds that open streams get to finish when the server stops


class ObserverService(observer_pb2_grpc.ObserverServicer):
    """observer.Observer over one node's ring."""

    def __init__(self, ring: FlowRing, *, node_name: str, address: str = "", version: str = VERSION) -> None:
        self.ring = ring
        self.node_name = node_name
        self.address = address
        self.version = version
        self.started = time.monotonic_ns()
        self.closing = asyncio.Event()

    def uptime_ns(self) -> int:
        return time.monotonic_ns() - self.started

    async def ServerStatus(self, request, context) -> observer_pb2.ServerStatusResponse:
        return observer_pb2.ServerStatusResponse(
            num_flows=self.ring.num_flows(), max_flows=self.ring.capacity, seen_flows=self.ring.seen_flows,
            uptime_ns=self.uptime_ns(), version=self.version, flows_rate=self.ring.flows_rate())

    async def GetNodes(self, request, context) -> observer_pb2.GetNodesResponse:
        node = observer_pb2.Node(
            name=self.node_name, version=self.version, address=self.address,
            state=relay_pb2.NODE_CONNECTED, tls=observer_pb2.TLS(enabled=False), uptime_ns=self.uptime_ns(),
            num_flows=self.ring.num_flows(), max_flows=self.ring.capacity, seen_flows=self.ring.seen_flows)
        return observer_pb2.GetNodesResponse(nodes=[node])

    async def GetNamespaces(self, request, context) -> observer_pb2.GetNamespacesResponse:
        seen: set[tuple[str, str]] = set()
        for entry in self.ring.entries():
            if (f := entry.flow) is not None:
                for ep in (f.source, f.destination):
                    if ep.namespace:
                        seen.add((ep.cluster_name, ep.namespace))
        return observer_pb2.GetNamespacesResponse(
            namespaces=[observer_pb2.Namespace(cluster=c, namespace=n) for c, n in sorted(seen)])

    async def GetAgentEvents(self, request, context) -> None:
        # pilus records no agent events yet: an empty stream, kept open while following
        await _validate(request, context)
        if request.follow:
            await self.closing.wait()

    async def GetDebugEvents(self, request, context) -> None:
        # the datapath emits no debug events: an empty stream, kept open while following
        await _validate(request, context)
        if request.follow:
            await self.closing.wait()

    async def GetFlows(self, request, context) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        await _validate(request, context)
        try:
            matcher = FlowMatcher(request.whitelist, request.blacklist)
        except FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        mask = request.field_mask if request.HasField("field_mask") and request.field_mask.paths else None
        if mask is not None and not mask.IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"invalid field mask {list(mask.paths)}: not all paths are fields of flow.Flow")
        async for response in self.flows(request, matcher, mask):
            yield response

    async def flows(self, request, matcher: FlowMatcher,
                    mask: FieldMask | None = None) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        """The responses of one GetFlows request (validated filters and mask)."""
        since = request.since.ToNanoseconds() if request.HasField("since") else None
        until = request.until.ToNanoseconds() if request.HasField("until") else None
        follow, limit = request.follow, request.number
        seq, sent = self.start_seq(request, matcher, since), 0
        while True:
            if not follow and limit and sent >= limit:
                return
            entry, gap = self.ring.read(seq)
            if gap:
                yield self._lost(gap)
                seq += gap
                continue
            if entry is None:  # caught up with the writer
                if not follow or self.closing.is_set():
                    return
                await self.ring.wait(seq)
                continue
            seq += 1
            f = entry.flow
            if f is None:
                yield observer_pb2.GetFlowsResponse(lost_events=entry.message, node_name=self.node_name,
                                                    time=timestamp(entry.time_ns / 1e9))
                continue
            if until is not None and entry.time_ns > until:
                return
            if (since is not None and entry.time_ns < since) or not matcher(f):
                continue
            sent += 1
            yield observer_pb2.GetFlowsResponse(flow=_masked(f, mask), node_name=f.node_name, time=f.time)

    def start_seq(self, request, matcher: FlowMatcher, since: int | None) -> int:
        ring = self.ring
        if request.first and since is None:
            return ring.oldest_seq
        if request.follow and not request.number and since is None:
            return ring.next_seq
        start, count = ring.next_seq, 0
        for entry in ring.newest_first():
            if entry.flow is None or not matcher(entry.flow):
                start = entry.seq
                continue
            if since is not None:
                if entry.time_ns < since:
                    break
            else:
                count += 1
            start = entry.seq
            if since is None and count == request.number:
                break
        return start

    def _lost(self, count: int) -> observer_pb2.GetFlowsResponse:
        now = time.time()
        ev = flow_pb2.LostEvent(source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=count)
        return observer_pb2.GetFlowsResponse(lost_events=ev, node_name=self.node_name, time=timestamp(now))


async def _validate(request, context) -> None:
    if request.first and request.follow:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be specified with follow")


def _masked(f: flow_pb2.Flow, mask: FieldMask | None) -> flow_pb2.Flow:
    if mask is None:
        return f
    out = flow_pb2.Flow()
    mask.MergeMessage(f, out)
    return out


class PeerSource(Protocol):
    """The cluster's Hubble servers: name -> address now, and a callback on every change."""

    def current(self) -> dict[str, str]: ...

    def subscribe(self, callback: Callable[[dict[str, str]], None]) -> Callable[[], None]: ...


class PeerService(peer_pb2_grpc.PeerServicer):
    """peer.Peer: every node of ``peers`` (PEER_ADDED, then PEER_ADDED / PEER_UPDATED /
    PEER_DELETED as the cluster changes), or, without a source, this node alone."""

    def __init__(self, *, node_name: str, address: str, closing: asyncio.Event,
                 peers: PeerSource | None = None) -> None:
        self.node_name, self.address, self.closing, self.peers = node_name, address, closing, peers

    async def Notify(self, request, context) -> None:
        if self.peers is None:
            await context.write(peer_pb2.ChangeNotification(
                name=self.node_name, address=self.address, type=peer_pb2.PEER_ADDED))
            await self.closing.wait()
            return
        changes: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        unsubscribe = self.peers.subscribe(changes.put_nowait)
        try:
            known: dict[str, str] = {}
            table = self.peers.current()
            closing = asyncio.ensure_future(self.closing.wait())
            while True:
                for name in sorted(known.keys() - table.keys()):
                    await context.write(peer_pb2.ChangeNotification(name=name, type=peer_pb2.PEER_DELETED))
                for name, address in sorted(table.items()):
                    if known.get(name) != address:
                        kind = peer_pb2.PEER_UPDATED if name in known else peer_pb2.PEER_ADDED
                        await context.write(peer_pb2.ChangeNotification(name=name, address=address, type=kind))
                known = dict(table)
                nxt = asyncio.ensure_future(changes.get())
                done, _ = await asyncio.wait({nxt, closing}, return_when=asyncio.FIRST_COMPLETED)
                if closing in done:
                    nxt.cancel()
                    return
                table = nxt.result()
        finally:
            unsubscribe()


class HubbleServer:
    """The three services on ``socket_path`` (and ``tcp_address``, ``host:port`` or
    ``:port``; port 0 picks a free one, see ``tcp_port``). ``peer_address`` is what
    peer.Peer tells relays (see the property)."""

    def __init__(self, ring: FlowRing, *, node_name: str, socket_path: Path | str,
                 tcp_address: str | None = None, peer_address: str | None = None,
                 version: str = VERSION, peers: PeerSource | None = None) -> None:
        self.ring = ring
        self.peers = peers
        self.node_name = node_name
        self.socket_path = Path(socket_path)
        self.tcp_address = tcp_address
        self.tcp_port: int | None = None
        self._peer_address = peer_address
        self.observer = ObserverService(ring, node_name=node_name, version=version)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    @property
    def peer_address(self) -> str:
        """What peer.Peer announces: the given address, else the TCP one when it names a
        host, else the socket (``unix://...``, reachable from the machine's namespace)."""
        if self._peer_address:
            return self._peer_address
        if self.tcp_address is not None and self.tcp_port is not None:
            host = self.tcp_address.rpartition(":")[0]
            if host not in UNSPECIFIED_HOSTS:
                return f"{host}:{self.tcp_port}"
        return f"unix://{self.socket_path}"

    async def start(self) -> None:
        # no SO_REUSEPORT: a second server on the same port must fail, not share it
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a stale socket of an earlier run
        self._bind(server, f"unix:{self.socket_path}")
        if self.tcp_address is not None:
            self.tcp_port = self._bind_tcp(server, self.tcp_address)
        self.observer.address = self.peer_address
        peer_pb2_grpc.add_PeerServicer_to_server(
            PeerService(node_name=self.node_name, address=self.peer_address, closing=self.observer.closing,
                        peers=self.peers), server)
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server
        log.info("hubble: serving on %s%s", self.socket_path,
                 f" and {self.peer_address}" if self.tcp_address is not None else "")

    @classmethod
    def _bind_tcp(cls, server: grpc.aio.Server, address: str) -> int:
        """``host:port``; an empty host (``:4244``, Hubble's way of saying every
        address) is ``[::]`` (both families), or ``0.0.0.0`` where IPv6 is off."""
        host, _, port = address.rpartition(":")
        if host:
            return cls._bind(server, address)
        try:
            return cls._bind(server, f"[::]:{port}")
        except OSError:
            return cls._bind(server, f"0.0.0.0:{port}")

    @staticmethod
    def _bind(server: grpc.aio.Server, address: str) -> int:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"hubble: cannot listen on {address}: {exc}") from None
        if port == 0 and not address.startswith("unix:"):
            raise OSError(f"hubble: cannot listen on {address}")
        return port

    async def stop(self) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.observer.closing.set()
        self.ring.wake()  # followers see the closing flag and end their streams
        await self._server.stop(STOP_GRACE)
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


__all__ = ["HEALTH_SERVICES", "VERSION", "HubbleServer", "ObserverService", "PeerService"]
