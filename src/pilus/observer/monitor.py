"""Fan-out of datapath events from the ring buffer to `pilus monitor` clients.

The ring buffer is drained whenever its epoll fd is readable. Each subscriber has a
bounded queue: a slow client loses events (counted and reported to it as a "lost"
record) instead of stalling the agent or other clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 4096


@dataclass(eq=False)  # identity-hashed: kept in a set
class Subscriber:
    types: frozenset[str] | None
    endpoint: int | None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_QUEUE))
    lost: int = 0

    def wants(self, event: dict) -> bool:
        if self.types is not None and event["type"] not in self.types:
            return False
        return self.endpoint is None or self.endpoint in (event.get("source_ep"), event.get("dst_ep"))

    def offer(self, event: dict) -> None:
        if self.lost:
            try:
                self.queue.put_nowait({"type": "lost", "count": self.lost})
                self.lost = 0
            except asyncio.QueueFull:
                self.lost += 1
                return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lost += 1


class EventHub:
    def __init__(self, reader) -> None:
        self.reader = reader
        self.subscribers: set[Subscriber] = set()
        self.received = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.reader.fileno(), self._drain)

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.reader.fileno())
        self.reader.close()

    def lost(self) -> int:
        return self.reader.lost()

    def subscribe(self, types: frozenset[str] | None, endpoint: int | None) -> Subscriber:
        sub = Subscriber(types, endpoint)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _drain(self) -> None:
        try:
            events = self.reader.poll()
        except Exception:  # a decoding bug must not kill the agent's loop
            log.exception("reading datapath events failed")
            return
        now = time.time()
        for event in events:
            self.received += 1
            record = event.to_dict()
            record.setdefault("time", now)
            for sub in self.subscribers:
                if sub.wants(record):
                    sub.offer(record)
