"""Hubble on one node, as an agent component: the event hub's typed events -> flows in
the node's ring -> the gRPC server (pilus.hubble.server).

The part subscribes to the hub's event types (pilus.observer.monitor; ``event_types``,
default all: the datapath then emits them for as long as Hubble runs; the L7 proxy's
records always) and turns each drop, trace, policy verdict and L7 record into flows
(pilus.hubble.flows) as the hub queues them. Each flow is captured then (its endpoints,
names and metric facts) and made on its first read: most flows of a busy node are
never read, and making one costs more than anything else here. What is lost on the
way is counted and kept in the ring as LostEvents, which GetFlows clients receive as
Hubble's do: events the hub could not queue for us
(OBSERVER_EVENTS_QUEUE) and, sampled once per LOST_POLL_INTERVAL, events the datapath
could not emit since the part started (PERF_EVENT_RING_BUFFER).

Construction does no I/O; ``start()`` binds the sockets first (a port that is taken
fails the start before anything is subscribed), then subscribes; ``stop()`` ends the
reader task, unsubscribes (the datapath stops emitting what nobody else wants) and
stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

from pilus.hubble.flows import Capture, FlowParser, lost_event
from pilus.hubble.lookup import EndpointLookup
from pilus.hubble.metrics import HubbleMetrics
from pilus.hubble.protos import flow_pb2
from pilus.hubble.ring import DEFAULT_CAPACITY, FlowRing
from pilus.hubble.server import HubbleServer, PeerSource
from pilus.metrics.server import PrometheusServer
from pilus.observer.l7 import L7Event
from pilus.observer.monitor import LostEvents, Subscriber

log = logging.getLogger(__name__)

LOST_POLL_INTERVAL = 1.0  # seconds between two reads of the datapath's lost counter


class HubblePart:
    def __init__(self, events_hub: Any, lookup: EndpointLookup, *, node_name: str, socket_path: Path | str,
                 tcp_address: str | None = None, capacity: int = DEFAULT_CAPACITY,
                 cluster_name: str = "default", peer_address: str | None = None,
                 event_types: frozenset[str] | None = None, metrics: HubbleMetrics | None = None,
                 metrics_address: tuple[str, int] | None = None, peers: PeerSource | None = None) -> None:
        self.hub = events_hub
        self.metrics = metrics  # counters of the flows (--hubble-metrics), served on metrics_address
        self._metrics_server = (PrometheusServer(metrics.registry, *metrics_address)
                                if metrics is not None and metrics_address is not None else None)
        self.event_types = event_types  # the hub's type names to subscribe to (None: all)
        self.ring = FlowRing(capacity)
        self.parser = FlowParser(lookup, node_name=node_name, cluster_name=cluster_name)
        self.server = HubbleServer(self.ring, node_name=node_name, socket_path=socket_path,
                                   tcp_address=tcp_address, peer_address=peer_address, peers=peers)
        self.parse_errors = 0
        self._sub: Subscriber | None = None
        self._task: asyncio.Task | None = None
        self._datapath_lost: int | None = None
        self._lost_checked = 0.0

    async def start(self) -> None:
        await self.server.start()
        try:
            if self._metrics_server is not None:
                await self._metrics_server.start()
            self._datapath_lost = self._read_datapath_lost()
            # L7 records always: they cost the datapath nothing (the proxy sends them)
            types = self.event_types | {L7Event.kind} if self.event_types is not None else None
            self._sub = self.hub.subscribe(types, None)
            self._task = asyncio.create_task(self.run_reader(self._sub), name="hubble-flows")
        except BaseException:
            await self.server.stop()
            if self._metrics_server is not None:
                await self._metrics_server.stop()
            raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            self.hub.unsubscribe(self._sub)
            self._sub = None
        await self.server.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()

    async def run_reader(self, sub: Subscriber) -> None:
        """Queued events -> ring, batch by batch, until cancelled."""
        while True:
            batch = [await sub.queue.get()]
            while not sub.queue.empty():
                batch.append(sub.queue.get_nowait())
            self.ingest(batch)

    def ingest(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, LostEvents):
                self._lost(flow_pb2.OBSERVER_EVENTS_QUEUE, ev.count)
                continue
            try:
                caps = self.parser.capture_l7(ev) if isinstance(ev, L7Event) else [self.parser.capture(ev)]
            except Exception:  # noqa: BLE001 - one event the parser trips on must not stop the flow log
                self.parse_errors += 1
                log.exception("hubble: cannot make a flow of %r", type(ev).__name__)
                continue
            for cap in caps:
                if cap is None:  # a record that is no flow
                    continue
                # the Flow is made when someone reads it; the metrics count its facts now
                self.ring.push_lazy(cap.time_ns, partial(self._build, cap))
                if self.metrics is None:
                    continue
                if cap.l7 is not None:
                    self.metrics.observe_l7(cap.facts, cap.l7)
                else:
                    self.metrics.observe_facts(cap.facts)
        now = time.monotonic()
        if now - self._lost_checked >= LOST_POLL_INTERVAL:
            self._lost_checked = now
            self._note_datapath_lost()

    def _build(self, cap: Capture) -> flow_pb2.Flow | flow_pb2.LostEvent:
        try:
            return self.parser.build(cap)
        except Exception:  # noqa: BLE001 - a reader gets the event as lost, not a broken stream
            self.parse_errors += 1
            log.exception("hubble: cannot make a flow of %r", type(cap.event).__name__)
            return lost_event(flow_pb2.UNKNOWN_LOST_EVENT_SOURCE, 1, cap.time_ns / 1e9, cap.time_ns / 1e9)

    def _lost(self, source: int, count: int) -> None:
        self.ring.record_lost(source, count)
        if self.metrics is not None:
            self.metrics.record_lost(source, count)

    def _read_datapath_lost(self) -> int | None:
        try:
            return int(self.hub.lost())
        except Exception:  # noqa: BLE001 - a datapath without the counter: nothing to report
            return None

    def _note_datapath_lost(self) -> None:
        current = self._read_datapath_lost()
        if current is None:
            return
        if self._datapath_lost is not None and current > self._datapath_lost:
            self._lost(flow_pb2.PERF_EVENT_RING_BUFFER, current - self._datapath_lost)
        self._datapath_lost = current

    def status(self) -> dict:
        ring = self.ring
        by_source = {flow_pb2.LostEventSource.Name(k): v for k, v in sorted(ring.lost_by_source.items())}
        return {
            "ok": self._task is not None and not self._task.done(),
            "current_flows": ring.num_flows(),
            "max_flows": ring.capacity,
            "seen_flows": ring.seen_flows,
            "flows_per_second": round(ring.flows_rate(), 3),
            "lost": ring.lost,
            "lost_by_source": by_source,
            "parse_errors": self.parse_errors,
            "socket": str(self.server.socket_path),
            "address": self.server.peer_address if self.server.tcp_address is not None else None,
        }


__all__ = ["LOST_POLL_INTERVAL", "HubblePart"]
