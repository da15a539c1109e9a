"""Fan-out of datapath events from the ring buffer to `pilus monitor` clients.

The datapath emits only the event types some subscriber wants (the hub keeps its
listen mask up to date, as Cilium reads events only while a monitor listener
exists), and the hub decodes only records a subscriber wants: with nobody
listening, new connections cost neither ring-buffer records nor agent CPU.
The ring buffer is drained when its epoll fd is readable, then left alone for
DRAIN_INTERVAL so that a busy ring is read in batches (the first event of a quiet
ring is read at once; a wake-up costs the agent more than the events it brings, see
docs/hubble.md). Each subscriber has a
bounded queue: a slow client loses events (counted and reported to it as a
LostEvents note) instead of stalling the agent or other clients.

Subscribers receive the typed events of pilus.datapath.events (stamped with the time
the agent read them) and filter on their fields; pilus.observer.format presents them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from pilus.datapath.events import MONITOR_TYPES, Event, listen_mask

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 4096
DRAIN_INTERVAL = 0.05  # seconds between two drains of a busy ring (measured: docs/hubble.md)


@dataclass(frozen=True)
class LostEvents:
    """In a subscriber's queue: this many events were not queued for it (it was full)."""

    count: int

    kind = "lost"


@dataclass(eq=False)  # identity-hashed: kept in a set
class Subscriber:
    """One listener: the event types it wants (None: all) and the endpoint id the events
    must be to or from (None: any); its queue holds typed events and LostEvents notes."""

    types: frozenset[str] | None
    endpoint: int | None
    queue: asyncio.Queue[Event | LostEvents] = field(
        default_factory=lambda: asyncio.Queue(SUBSCRIBER_QUEUE))
    lost: int = 0

    def wants_type(self, notify_type: int) -> bool:
        return self.types is None or MONITOR_TYPES.get(notify_type) in self.types

    def wants(self, event: Event) -> bool:
        if self.types is not None and event.kind not in self.types:
            return False
        return self.endpoint is None or event.related_to(self.endpoint)

    def offer(self, event: Event) -> None:
        if self.lost:
            try:
                self.queue.put_nowait(LostEvents(self.lost))
                self.lost = 0
            except asyncio.QueueFull:
                self.lost += 1
                return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost += 1


class EventHub:
    def __init__(self, reader, drain_interval: float = DRAIN_INTERVAL) -> None:
        self.reader = reader
        self.drain_interval = drain_interval
        self.subscribers: set[Subscriber] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None

    @property
    def received(self) -> int:
        """Records read from the ring buffer (decoded or not)."""
        return self.reader.records

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._set_mask()  # nobody listens yet (a restarted agent starts from zero)
        self._loop.add_reader(self.reader.fileno(), self._drain)

    async def stop(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._loop is not None:
            self._loop.remove_reader(self.reader.fileno())
        self.reader.close()

    def lost(self) -> int:
        return self.reader.lost()

    def subscribe(self, types: frozenset[str] | None, endpoint: int | None) -> Subscriber:
        sub = Subscriber(types, endpoint)
        self.subscribers.add(sub)
        self._set_mask()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        self._set_mask()

    def received_by_type(self) -> dict[str, int]:
        """Records read from the ring buffer per event type."""
        counts = self.reader.records_by_type
        return {name: counts.get(notify, 0) for notify, name in sorted(MONITOR_TYPES.items())}

    def listening(self) -> list[str]:
        """The event types the datapath emits now (some subscriber wants them)."""
        mask = listen_mask(sub.types for sub in self.subscribers)
        return [name for notify, name in sorted(MONITOR_TYPES.items()) if mask & (1 << notify)]

    def _set_mask(self) -> None:
        self.reader.set_listen_mask(listen_mask(sub.types for sub in self.subscribers))

    def _wanted(self, notify_type: int) -> bool:
        return any(sub.wants_type(notify_type) for sub in self.subscribers)

    def _drain(self) -> None:
        read0 = self.reader.records
        try:
            events = self.reader.poll(want=self._wanted)
        except Exception:  # a decoding bug must not kill the agent's loop
            log.exception("reading datapath events failed")
            return
        if self.reader.records > read0 and self._loop is not None:
            # more will follow: read them in one batch a little later
            self._loop.remove_reader(self.reader.fileno())
            self._resume = self._loop.call_later(self.drain_interval, self._resume_reading)
        now = time.time()
        for event in events:
            if event.time is None:
                event.time = now
            for sub in self.subscribers:
                if sub.wants(event):
                    sub.offer(event)

    def publish(self, event) -> None:
        """Offer an event that does not come from the ring buffer (an L7 record from the
        proxy, pilus.observer.l7.L7Event) to every subscriber that wants it."""
        if event.time is None:
            event.time = time.time()
        for sub in self.subscribers:
            if sub.wants(event):
                sub.offer(event)

    def _resume_reading(self) -> None:
        self._resume = None
        if self._loop is not None:
            self._loop.add_reader(self.reader.fileno(), self._drain)
            self._drain()
