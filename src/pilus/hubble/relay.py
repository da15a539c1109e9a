"""Hubble Relay: one ``observer.Observer`` for a whole cluster, over the nodes' own.

    python -m pilus.hubble.relay --listen-address 172.30.0.1:4245 \\
        --peer-target 172.30.0.11:4244 [--peer-target ...]

Rules (Hubble Relay's, Cilium pkg/hubble/relay):
- Nodes are found through ``peer.Peer/Notify`` of every peer target: PEER_ADDED and
  PEER_UPDATED add or move a node (name -> address), PEER_DELETED removes it. A target
  whose stream ends or fails is asked again after a pause; the nodes it announced stay
  known (their own connection says whether they are there).
- Every known node has its own channel to its address and a health check every
  ``HEALTH_INTERVAL``: a node answers SERVING (connected) or it is unavailable.
- GetFlows starts with a ``node_status`` NODE_CONNECTED naming the nodes it reads and,
  when some are unavailable, a NODE_UNAVAILABLE naming those. Without ``follow`` every
  connected node gets the request (so each returns up to ``number`` flows), the
  answers are merged by time and the newest ``number`` kept (the oldest with
  ``first``); a node that fails on the way is reported NODE_UNAVAILABLE and the others'
  flows are still sent. With ``follow`` the nodes' streams are passed on as they come,
  put in time order by a sort buffer (up to ``SORT_BUFFER`` responses, none held longer
  than ``SORT_DRAIN``); a node that goes away is reported NODE_UNAVAILABLE, the others keep streaming, and when
  it is back its stream resumes after the last flow seen (NODE_CONNECTED again); a node
  announced meanwhile joins the stream; a deleted one is reported NODE_GONE.
- GetNodes lists every known node (NODE_CONNECTED with its flow counts, or
  NODE_UNAVAILABLE); ServerStatus adds up the connected nodes' counts (uptime: the
  longest) with num_connected_nodes, num_unavailable_nodes and unavailable_nodes;
  GetNamespaces is the union of the nodes' answers. GetAgentEvents and GetDebugEvents
  are UNIMPLEMENTED, as in Hubble Relay.
- The gRPC health service answers SERVING for "" and "observer.Observer".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf.wrappers_pb2 import UInt32Value
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import pilus
from pilus.hubble.filters import FilterError, FlowMatcher
from pilus.hubble.flows import timestamp
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2

log = logging.getLogger("pilus.hubble.relay")

VERSION = f"pilus-relay-{pilus.__version__}"
RELAY_NAME = "hubble-relay"  # node_name of the relay's own node_status responses
DEFAULT_LISTEN = ":4245"
HEALTH_SERVICES = ("", "observer.Observer")
HEALTH_INTERVAL = 1.0  # seconds between two health checks of a node
CALL_TIMEOUT = 2.0  # seconds a node gets for a unary call (health, status, nodes, namespaces)
COLLECT_TIMEOUT = 30.0  # seconds a node gets to send its flows of a request without follow
NOTIFY_RETRY_MIN, NOTIFY_RETRY_MAX = 0.5, 2.0  # seconds before asking a peer target again
SORT_BUFFER = 100  # follow: responses held to put the nodes' streams in time order (Hubble Relay's)
SORT_DRAIN = 0.25  # follow: seconds a response waits at most in that buffer
FOLLOW_QUEUE = 1024  # responses buffered per follow client (node streams wait when it is full)
STOP_GRACE = 0.5
CHANNEL_OPTIONS = [
    # reconnect quickly when a node comes back (grpc's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def grpc_target(address: str) -> str:
    """``host:port`` or ``unix:/path`` as grpc wants it (an empty host: this machine)."""
    if address.startswith("unix:"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or unix:PATH, got {address!r}")
    return f"{host or '127.0.0.1'}:{port}"


def _time_ns(response: observer_pb2.GetFlowsResponse) -> int:
    t = response.time if response.HasField("time") else response.flow.time
    return t.seconds * 1_000_000_000 + t.nanos


def node_status(state: int, names: Iterable[str], message: str = "") -> observer_pb2.GetFlowsResponse:
    return observer_pb2.GetFlowsResponse(
        node_status=relay_pb2.NodeStatusEvent(state_change=state, node_names=sorted(names), message=message),
        node_name=RELAY_NAME, time=timestamp(time.time()))


def merge_flows(per_node: list[list[observer_pb2.GetFlowsResponse]], number: int,
                *, first: bool = False) -> list[observer_pb2.GetFlowsResponse]:
    """The nodes' answers (each in time order) as one list in time order; with ``number``
    only the newest ``number`` flows (the oldest with ``first``) and the lost events
    among them."""
    merged = list(heapq.merge(*per_node, key=_time_ns))
    if not number:
        return merged
    flows = [i for i, r in enumerate(merged) if r.WhichOneof("response_types") == "flow"]
    if len(flows) <= number:
        return merged
    if first:
        return merged[:flows[number - 1] + 1]
    return merged[flows[-number]:]


_CLOSING: set[asyncio.Task] = set()  # channels of deleted nodes being closed


@dataclass
class RelayPeer:
    """One node of the cluster as the relay sees it."""

    name: str
    address: str
    channel: grpc.aio.Channel | None = None
    connected: bool = False
    last_error: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every state change
    task: asyncio.Task | None = None

    def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(grpc_target(self.address), options=CHANNEL_OPTIONS)

    @property
    def observer(self) -> observer_pb2_grpc.ObserverStub:
        assert self.channel is not None
        return observer_pb2_grpc.ObserverStub(self.channel)

    def set_state(self, connected: bool, error: str = "") -> None:
        was = self.connected
        self.connected, self.last_error = connected, error
        if connected != was:
            log.info("relay: node %s at %s is %s%s", self.name, self.address,
                     "connected" if connected else "unavailable", f" ({error})" if error else "")
            self.changed.set()
            self.changed = asyncio.Event()


class PeerManager:
    """The known nodes: discovered through Notify of the targets, health-checked."""

    def __init__(self, targets: list[str], *, health_interval: float = HEALTH_INTERVAL) -> None:
        if not targets:
            raise ValueError("the relay needs at least one peer target")
        self.targets = list(targets)
        self.health_interval = health_interval
        self.peers: dict[str, RelayPeer] = {}
        self.changed = asyncio.Event()  # set whenever a node is added, moved or deleted
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for target in self.targets:
            grpc_target(target)  # a bad address fails the start
            self._tasks.append(asyncio.create_task(self.run_notify(target), name=f"relay-notify-{target}"))

    async def stop(self) -> None:
        tasks = self._tasks + [p.task for p in self.peers.values() if p.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for p in self.peers.values():
            if p.channel is not None:
                await p.channel.close()
        self._tasks.clear()

    def snapshot(self) -> list[RelayPeer]:
        return sorted(self.peers.values(), key=lambda p: p.name)

    def _announce(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def apply(self, note: peer_pb2.ChangeNotification) -> None:
        """One Notify message."""
        name, address = note.name, note.address
        if not name:
            return
        if note.type == peer_pb2.PEER_DELETED:
            peer = self.peers.pop(name, None)
            if peer is not None:
                log.info("relay: node %s was deleted", name)
                self._close(peer)
                self._announce()
            return
        if note.type not in (peer_pb2.PEER_ADDED, peer_pb2.PEER_UPDATED) or not address:
            return
        peer = self.peers.get(name)
        if peer is not None and peer.address == address:
            return
        if peer is not None:
            self._close(peer)
        log.info("relay: node %s at %s", name, address)
        peer = RelayPeer(name, address)
        peer.open()
        peer.task = asyncio.create_task(self.run_health(peer), name=f"relay-health-{name}")
        self.peers[name] = peer
        self._announce()

    @staticmethod
    def _close(peer: RelayPeer) -> None:
        if peer.task is not None:
            peer.task.cancel()
        peer.set_state(False, "deleted")
        if peer.channel is not None:
            task = asyncio.get_running_loop().create_task(peer.channel.close())
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    async def run_notify(self, target: str) -> None:
        """Follow one target's Notify stream, asking again after it ends or fails."""
        delay = NOTIFY_RETRY_MIN
        while True:
            try:
                async with grpc.aio.insecure_channel(grpc_target(target), options=CHANNEL_OPTIONS) as ch:
                    async for note in peer_pb2_grpc.PeerStub(ch).Notify(peer_pb2.NotifyRequest()):
                        delay = NOTIFY_RETRY_MIN
                        self.apply(note)
            except grpc.aio.AioRpcError as exc:
                log.debug("relay: Notify of %s: %s", target, exc.details())
            await asyncio.sleep(delay)
            delay = min(delay * 2, NOTIFY_RETRY_MAX)

    async def run_health(self, peer: RelayPeer) -> None:
        assert peer.channel is not None
        stub = health_pb2_grpc.HealthStub(peer.channel)
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=min(CALL_TIMEOUT,
                                                                                     self.health_interval * 2))
                ok = resp.status == health_pb2.HealthCheckResponse.SERVING
                peer.set_state(ok, "" if ok else health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
            except grpc.aio.AioRpcError as exc:
                peer.set_state(False, f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(self.health_interval)


async def _unary(call, request, timeout: float = CALL_TIMEOUT):
    """A node's answer, or the error's text."""
    try:
        return await call(request, timeout=timeout), ""
    except grpc.aio.AioRpcError as exc:
        return None, f"{exc.code().name}: {exc.details()}"


class RelayObserver(observer_pb2_grpc.ObserverServicer):
    """observer.Observer over the nodes of a PeerManager."""

    def __init__(self, peers: PeerManager, *, version: str = VERSION) -> None:
        self.peers = peers
        self.version = version
        self.started = time.monotonic_ns()
        self.closing = asyncio.Event()

    # -- unary ----------------------------------------------------------------------------

    async def ServerStatus(self, request, context) -> observer_pb2.ServerStatusResponse:
        peers = self.peers.snapshot()
        answers = await asyncio.gather(*(_unary(p.observer.ServerStatus, request) if p.connected
                                         else _none(p.last_error) for p in peers))
        out = observer_pb2.ServerStatusResponse(version=self.version)
        unavailable = []
        for p, (status, _err) in zip(peers, answers, strict=True):
            if status is None:
                unavailable.append(p.name)
                continue
            out.num_flows += status.num_flows
            out.max_flows += status.max_flows
            out.seen_flows += status.seen_flows
            out.flows_rate += status.flows_rate
            out.uptime_ns = max(out.uptime_ns, status.uptime_ns)
        out.num_connected_nodes.CopyFrom(UInt32Value(value=len(peers) - len(unavailable)))
        out.num_unavailable_nodes.CopyFrom(UInt32Value(value=len(unavailable)))
        out.unavailable_nodes.extend(unavailable)
        return out

    async def GetNodes(self, request, context) -> observer_pb2.GetNodesResponse:
        peers = self.peers.snapshot()
        answers = await asyncio.gather(*(_unary(p.observer.GetNodes, request) if p.connected
                                         else _none(p.last_error) for p in peers))
        nodes = []
        for p, (resp, _err) in zip(peers, answers, strict=True):
            known = next((n for n in resp.nodes if n.name == p.name), None) if resp is not None else None
            if known is None:
                nodes.append(observer_pb2.Node(name=p.name, address=p.address, state=relay_pb2.NODE_UNAVAILABLE,
                                               tls=observer_pb2.TLS(enabled=False)))
                continue
            node = observer_pb2.Node()
            node.CopyFrom(known)
            node.address, node.state = p.address, relay_pb2.NODE_CONNECTED
            nodes.append(node)
        return observer_pb2.GetNodesResponse(nodes=nodes)

    async def GetNamespaces(self, request, context) -> observer_pb2.GetNamespacesResponse:
        peers = [p for p in self.peers.snapshot() if p.connected]
        answers = await asyncio.gather(*(_unary(p.observer.GetNamespaces, request) for p in peers))
        seen = {(ns.cluster, ns.namespace) for resp, _ in answers if resp is not None for ns in resp.namespaces}
        return observer_pb2.GetNamespacesResponse(
            namespaces=[observer_pb2.Namespace(cluster=c, namespace=n) for c, n in sorted(seen)])

    # -- flows ----------------------------------------------------------------------------

    async def GetFlows(self, request, context) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        if request.first and request.follow:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first cannot be specified with follow")
        try:  # what every node would refuse is refused once, before any node is asked
            FlowMatcher(request.whitelist, request.blacklist)
        except FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        mask = request.field_mask if request.HasField("field_mask") and request.field_mask.paths else None
        if mask is not None and not mask.IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"invalid field mask {list(mask.paths)}: not all paths are fields of flow.Flow")
        peers = self.peers.snapshot()
        if not peers:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no node is known yet (peer targets: {', '.join(self.peers.targets)})")
        connected = [p for p in peers if p.connected]
        yield node_status(relay_pb2.NODE_CONNECTED, [p.name for p in connected])
        unavailable = [p for p in peers if not p.connected]
        if unavailable:
            yield node_status(relay_pb2.NODE_UNAVAILABLE, [p.name for p in unavailable],
                              "; ".join(f"{p.name}: {p.last_error}" for p in unavailable if p.last_error))
        if request.follow:
            async for response in self.follow(request):
                yield response
            return
        results = await asyncio.gather(*(self._collect(p, request, context) for p in connected))
        failed = [(p, err) for p, (_, err) in zip(connected, results, strict=True) if err is not None]
        if failed:
            if any(e.code() == grpc.StatusCode.INVALID_ARGUMENT for _, e in failed):
                # the same request fails on every node: the client's mistake, said once
                err = next(e for _, e in failed if e.code() == grpc.StatusCode.INVALID_ARGUMENT)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.details())
            yield node_status(relay_pb2.NODE_UNAVAILABLE, [p.name for p, _ in failed],
                              "; ".join(f"{p.name}: {e.code().name}: {e.details()}" for p, e in failed))
        for response in merge_flows([got for got, _ in results], request.number, first=request.first):
            yield response

    @staticmethod
    async def _collect(peer: RelayPeer, request, context) -> tuple[list, grpc.aio.AioRpcError | None]:
        remaining = context.time_remaining()
        timeout = COLLECT_TIMEOUT if remaining is None else max(min(remaining, COLLECT_TIMEOUT), 0.1)
        got: list[observer_pb2.GetFlowsResponse] = []
        try:
            async for response in peer.observer.GetFlows(request, timeout=timeout):
                if response.WhichOneof("response_types") is not None:
                    got.append(response)
        except grpc.aio.AioRpcError as exc:
            return got, exc
        return got, None

    async def follow(self, request) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        """Every node's stream as it comes, nodes joining and leaving on the way."""
        queue: asyncio.Queue[observer_pb2.GetFlowsResponse | None] = asyncio.Queue(FOLLOW_QUEUE)
        tasks: dict[str, tuple[RelayPeer, asyncio.Task]] = {}

        def spawn(peer: RelayPeer, *, announced: bool) -> None:
            task = asyncio.create_task(self._follow_node(peer, request, queue, announced=announced),
                                       name=f"relay-follow-{peer.name}")
            tasks[peer.name] = (peer, task)

        for p in self.peers.snapshot():
            spawn(p, announced=True)  # the opening node_status named it
        closing = asyncio.create_task(self.closing.wait())
        getter: asyncio.Task | None = None
        order = _SortBuffer()
        try:
            while True:
                if getter is None:
                    getter = asyncio.create_task(queue.get())
                changed = asyncio.create_task(self.peers.changed.wait())
                done, _ = await asyncio.wait({getter, changed, closing}, timeout=order.timeout(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if changed not in done:
                    changed.cancel()
                if closing in done:
                    return
                if not done:  # the oldest buffered response waited long enough: all out, in order
                    for response in order.drain():
                        yield response
                if getter in done:
                    item, getter = getter.result(), None
                    if item is None:
                        if all(t.done() for _, t in tasks.values()):  # every node reached `until`
                            for response in order.drain():
                                yield response
                            return
                    elif item.WhichOneof("response_types") == "node_status":
                        yield item
                    else:
                        for response in order.push(item):
                            yield response
                if changed in done:
                    current = {p.name: p for p in self.peers.snapshot()}
                    for name in [n for n in tasks if n not in current]:
                        tasks.pop(name)[1].cancel()
                        yield node_status(relay_pb2.NODE_GONE, [name])
                    for name, p in current.items():
                        if name in tasks and tasks[name][0] is p:
                            continue
                        if name in tasks:  # the node moved to another address
                            tasks[name][1].cancel()
                        spawn(p, announced=False)
        finally:
            closing.cancel()
            if getter is not None:
                getter.cancel()
            for _, t in tasks.values():
                t.cancel()

    async def _follow_node(self, peer: RelayPeer, request, queue: asyncio.Queue, *, announced: bool) -> None:
        """One node's part of a follow stream: streams, reports it unavailable when it goes,
        and resumes after the last flow seen when it is back."""
        req = observer_pb2.GetFlowsRequest()
        req.CopyFrom(request)
        sent = _Sent()
        reported = ("connected" if peer.connected else "unavailable") if announced else ""
        while True:
            while not peer.connected:
                await peer.changed.wait()
            if reported != "connected":
                await queue.put(node_status(relay_pb2.NODE_CONNECTED, [peer.name]))
                reported = "connected"
            if sent.last_ns is not None:  # resume: from the last flow sent on (those sent are skipped)
                req.number = 0
                since = max(sent.last_ns, request.since.ToNanoseconds() if request.HasField("since") else 0)
                req.since.FromNanoseconds(since)
            reason, until_reached = await self._stream_node(peer, req, queue, sent)
            if until_reached:
                await queue.put(None)
                return
            await queue.put(node_status(relay_pb2.NODE_UNAVAILABLE, [peer.name], reason))
            reported = "unavailable"
            if peer.connected:  # its health check has not noticed yet: give it the time to
                await asyncio.sleep(HEALTH_INTERVAL)

    @staticmethod
    async def _stream_node(peer: RelayPeer, req, queue: asyncio.Queue, sent: _Sent) -> tuple[str, bool]:
        """Pass one stream of a node on until it ends; (why, ended by until)."""
        call = peer.observer.GetFlows(req)
        down = asyncio.create_task(_wait_down(peer))
        try:
            reader = asyncio.create_task(_pump(call, queue, sent))
            done, _ = await asyncio.wait({reader, down}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                call.cancel()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader
                return peer.last_error or "health check failed", False
            try:
                reader.result()
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}", False
            if req.HasField("until"):
                return "", True
            return "the node ended its stream", False
        finally:
            down.cancel()
            call.cancel()


class _Sent:
    """What one node's follow has passed on: the newest flow time and the uuids of the
    flows of that time, so that a resumed stream (since = that time) skips them."""

    def __init__(self) -> None:
        self.last_ns: int | None = None
        self.uuids: set[str] = set()

    def fresh(self, response: observer_pb2.GetFlowsResponse) -> bool:
        """False for a flow sent before; records the others."""
        t = _time_ns(response)
        if self.last_ns is not None and (t < self.last_ns or t == self.last_ns and response.flow.uuid in self.uuids):
            return False
        if t != self.last_ns:
            self.last_ns, self.uuids = t, set()
        self.uuids.add(response.flow.uuid)
        return True


class _SortBuffer:
    """Follow responses of several nodes back in time order: each response waits until
    ``SORT_BUFFER`` others are buffered (the oldest goes out) or the first one buffered
    has waited ``SORT_DRAIN`` seconds (all go out, in order), as Hubble Relay's sort
    buffer with a latency bound instead of an idle timeout."""

    def __init__(self, size: int | None = None, drain: float | None = None) -> None:
        self.size = SORT_BUFFER if size is None else size
        self.drain_after = SORT_DRAIN if drain is None else drain
        self._heap: list[tuple[int, int, observer_pb2.GetFlowsResponse]] = []
        self._seq = 0
        self._since: float | None = None  # when the oldest buffered response arrived

    def push(self, response: observer_pb2.GetFlowsResponse) -> list[observer_pb2.GetFlowsResponse]:
        self._seq += 1
        heapq.heappush(self._heap, (_time_ns(response), self._seq, response))
        if self._since is None:
            self._since = time.monotonic()
        out = []
        while len(self._heap) > self.size:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def timeout(self) -> float | None:
        if self._since is None:
            return None
        return max(self._since + self.drain_after - time.monotonic(), 0.0)

    def drain(self) -> list[observer_pb2.GetFlowsResponse]:
        out = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        self._since = None
        return out


async def _pump(call, queue: asyncio.Queue, sent: _Sent) -> None:
    async for response in call:
        kind = response.WhichOneof("response_types")
        if kind is None or kind == "flow" and not sent.fresh(response):
            continue
        await queue.put(response)


async def _wait_down(peer: RelayPeer) -> None:
    while peer.connected:
        await peer.changed.wait()


async def _none(error: str) -> tuple[None, str]:
    return None, error


class Relay:
    """The relay's gRPC server (observer + health) on ``listen_address``."""

    def __init__(self, listen_address: str, targets: list[str], *,
                 health_interval: float = HEALTH_INTERVAL) -> None:
        self.listen_address = listen_address
        self.peers = PeerManager(targets, health_interval=health_interval)
        self.observer = RelayObserver(self.peers)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        observer_pb2_grpc.add_ObserverServicer_to_server(self.observer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = self.listen_address
        if not address.startswith("unix:"):
            host, _, port = address.rpartition(":")
            address = f"{host or '0.0.0.0'}:{port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"relay: cannot listen on {self.listen_address}: {exc}") from None
        if self.port == 0 and not address.startswith("unix:"):
            raise OSError(f"relay: cannot listen on {self.listen_address}")
        await self.peers.start()
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server = server
        log.info("relay: serving on %s, peer targets %s", self.listen_address, ", ".join(self.peers.targets))

    async def stop(self) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.observer.closing.set()
        await self._server.stop(STOP_GRACE)
        self._server = None
        await self.peers.stop()


async def _serve(args: argparse.Namespace) -> int:
    relay = Relay(args.listen_address, args.peer_target)
    try:
        await relay.start()
    except (OSError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay: stopping")
    await relay.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pilus.hubble.relay",
                                description="Hubble Relay: one Observer API for the nodes of a cluster.")
    p.add_argument("--listen-address", default=DEFAULT_LISTEN, metavar="[HOST]:PORT",
                   help=f"where to serve observer.Observer (default {DEFAULT_LISTEN})")
    p.add_argument("--peer-target", action="append", required=True, metavar="HOST:PORT",
                   help="a node's Hubble server whose peer.Peer/Notify names the nodes (repeatable)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(_serve(args))


__all__ = ["RelayPeer", "PeerManager", "Relay", "RelayObserver", "grpc_target", "main", "merge_flows", "node_status"]

if __name__ == "__main__":
    sys.exit(main())
