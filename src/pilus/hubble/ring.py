"""One node's bounded ring of flows (Hubble's container.Ring).

Rules:
- The writer never waits: a full ring overwrites its oldest entry. Every entry gets
  the next sequence number; the ring holds the last ``capacity`` of them.
- Readers hold a sequence number, not a position: a reader whose next entry was
  overwritten learns how many it missed (``read`` returns a gap) and reports them to
  its client as a LostEvent (HUBBLE_RING_BUFFER), so a slow client loses flows but
  never slows the agent or another client.
- Events lost before they became flows (the datapath's rate limit or full ring, the
  event hub's full queue) are counted in ``lost`` and kept in the ring as LostEvent
  entries, which GetFlows passes to clients as Hubble does.
- Default capacity 4095 (Hubble's default, 2^12 - 1).

Single-threaded: call it from the event loop that runs the part and the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from pilus.hubble.flows import lost_event
from pilus.hubble.protos import flow_pb2

DEFAULT_CAPACITY = 4095
RATE_WINDOW = 60.0  # seconds over which flows_rate() counts (Hubble's one minute)


class RingEntry:
    """One entry: a Flow, a LostEvent, or a flow not made yet (``build``, called on the
    first read: the agent only pays for the protobuf of the flows someone reads)."""

    __slots__ = ("seq", "time_ns", "is_flow", "_message", "_build")

    def __init__(self, seq: int, time_ns: int, message: flow_pb2.Flow | flow_pb2.LostEvent | None = None,
                 build: Callable[[], flow_pb2.Flow | flow_pb2.LostEvent] | None = None) -> None:
        self.seq, self.time_ns = seq, time_ns
        self._message, self._build = message, build
        self.is_flow = build is not None or isinstance(message, flow_pb2.Flow)

    @property
    def message(self) -> flow_pb2.Flow | flow_pb2.LostEvent:
        if self._message is None:
            self._message = self._build()  # the part's build answers a LostEvent when it fails
            self._build = None
        return self._message

    @property
    def flow(self) -> flow_pb2.Flow | None:
        m = self.message
        return m if isinstance(m, flow_pb2.Flow) else None


class FlowRing:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._buf: list[RingEntry | None] = [None] * capacity
        self._next = 0  # sequence number of the next write
        self.seen_flows = 0  # flows ever written
        self.lost = 0  # events lost before the ring (see record_lost)
        self.lost_by_source: dict[int, int] = {}
        self._flows_held = 0  # entries in the ring that are flows (not LostEvents)
        self._changed: asyncio.Event | None = None

    # -- writing --------------------------------------------------------------------------

    def push(self, flow: flow_pb2.Flow) -> RingEntry:
        self.seen_flows += 1
        return self._write(RingEntry(self._next, flow.time.ToNanoseconds() if flow.HasField("time")
                                     else time.time_ns(), flow))

    def push_lazy(self, time_ns: int, build: Callable[[], flow_pb2.Flow]) -> RingEntry:
        """A flow of ``time_ns`` that ``build()`` makes when it is first read."""
        self.seen_flows += 1
        return self._write(RingEntry(self._next, time_ns, build=build))

    def record_lost(self, source: int, count: int, first: float | None = None,
                    last: float | None = None) -> RingEntry | None:
        """``count`` events of ``source`` (flow.LostEventSource) were lost between
        ``first`` and ``last`` (seconds; default now)."""
        if count <= 0:
            return None
        now = time.time()
        self.lost += count
        self.lost_by_source[source] = self.lost_by_source.get(source, 0) + count
        ev = lost_event(source, count, first if first is not None else now, last if last is not None else now)
        return self._write(RingEntry(self._next, int((last if last is not None else now) * 1e9), ev))

    def _write(self, entry: RingEntry) -> RingEntry:
        slot = self._next % self.capacity
        old = self._buf[slot]
        self._flows_held += entry.is_flow - (old is not None and old.is_flow)
        self._buf[slot] = entry
        self._next += 1
        self.wake()
        return entry

    # -- reading --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The sequence number the next write gets (= entries ever written)."""
        return self._next

    @property
    def oldest_seq(self) -> int:
        return max(0, self._next - self.capacity)

    def __len__(self) -> int:
        return min(self._next, self.capacity)

    def num_flows(self) -> int:
        """Flows the ring holds now (LostEvent entries not counted)."""
        return self._flows_held

    def read(self, seq: int) -> tuple[RingEntry | None, int]:
        """The entry ``seq`` (None once it is overwritten or not yet written) and how
        many entries from ``seq`` on were overwritten (0 when it is still there)."""
        if seq < self.oldest_seq:
            return None, self.oldest_seq - seq
        if seq >= self._next:
            return None, 0
        return self._buf[seq % self.capacity], 0

    def entries(self, start: int | None = None) -> Iterator[RingEntry]:
        """Entries from ``start`` (default: the oldest) to the newest, as the ring holds
        them now (a snapshot: later writes are not seen)."""
        end = self._next
        for seq in range(max(self.oldest_seq, start or 0), end):
            entry = self._buf[seq % self.capacity]
            if entry is not None:
                yield entry

    def newest_first(self) -> Iterator[RingEntry]:
        for seq in range(self._next - 1, self.oldest_seq - 1, -1):
            entry = self._buf[seq % self.capacity]
            if entry is not None:
                yield entry

    async def wait(self, seq: int) -> None:
        """Return once an entry with sequence number ``seq`` or later is written, or
        ``wake()`` is called (a server that stops ends its followers so)."""
        if self._next > seq:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def flows_rate(self, now: float | None = None) -> float:
        """Flows per second over the last minute (over the time the ring covers when it
        has wrapped within the minute), as Hubble's ServerStatus reports it."""
        now_ns = int((now if now is not None else time.time()) * 1e9)
        since_ns = now_ns - int(RATE_WINDOW * 1e9)
        count, last_seen = 0, None
        for entry in self.newest_first():
            if not entry.is_flow:
                continue
            if entry.time_ns < since_ns:
                break
            count, last_seen = count + 1, entry.time_ns
        else:
            if self._next > self.capacity and last_seen is not None:
                since_ns = last_seen  # wrapped: the ring covers less than the window
        span = (now_ns - since_ns) / 1e9
        return count / span if span > 0 else 0.0


__all__ = ["DEFAULT_CAPACITY", "FlowRing", "RingEntry"]
