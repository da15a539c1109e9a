"""The flow ring (pilus.hubble.ring): bounded, overwriting, readers by sequence number
that learn what they missed, lost events kept as entries, the flow rate."""

from __future__ import annotations

import asyncio

import pytest
from aio_helpers import run
from test_hubble_flows import T0, drop, parse

from pilus.hubble.flows import timestamp
from pilus.hubble.protos import flow_pb2
from pilus.hubble.ring import DEFAULT_CAPACITY, FlowRing


def flow_at(t: float) -> flow_pb2.Flow:
    return parse(drop(t=t))


def test_default_capacity_is_hubbles():
    assert DEFAULT_CAPACITY == 4095 and FlowRing().capacity == 4095


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        FlowRing(0)


def test_a_full_ring_overwrites_the_oldest():
    ring = FlowRing(3)
    for i in range(5):
        ring.push(flow_at(T0 + i))
    assert len(ring) == ring.num_flows() == 3 and ring.seen_flows == 5
    assert (ring.oldest_seq, ring.next_seq) == (2, 5)
    assert [e.time_ns for e in ring.entries()] == [int(T0 + i) * 10**9 + 250_000_000 for i in (2, 3, 4)]
    assert [e.seq for e in ring.newest_first()] == [4, 3, 2]


def test_a_reader_behind_the_writer_learns_how_many_it_missed():
    ring = FlowRing(3)
    for i in range(7):
        ring.push(flow_at(T0 + i))
    entry, gap = ring.read(1)
    assert entry is None and gap == 3  # 1, 2, 3 were overwritten; 4 is the oldest there is
    entry, gap = ring.read(4)
    assert gap == 0 and entry is not None and entry.seq == 4
    assert ring.read(7) == (None, 0)  # not written yet


def test_lost_events_are_counted_and_kept_in_the_ring():
    ring = FlowRing(8)
    ring.push(flow_at(T0))
    entry = ring.record_lost(flow_pb2.OBSERVER_EVENTS_QUEUE, 12, T0, T0 + 1)
    assert entry is not None and entry.flow is None
    assert entry.message.num_events_lost == 12 and entry.message.source == flow_pb2.OBSERVER_EVENTS_QUEUE
    assert entry.message.first == timestamp(T0)
    ring.record_lost(flow_pb2.PERF_EVENT_RING_BUFFER, 3)
    assert ring.record_lost(flow_pb2.PERF_EVENT_RING_BUFFER, 0) is None
    assert ring.lost == 15
    assert ring.lost_by_source == {flow_pb2.OBSERVER_EVENTS_QUEUE: 12, flow_pb2.PERF_EVENT_RING_BUFFER: 3}
    assert len(ring) == 3 and ring.num_flows() == 1 and ring.seen_flows == 1
    small = FlowRing(2)
    small.push(flow_at(T0))
    small.record_lost(flow_pb2.OBSERVER_EVENTS_QUEUE, 1)
    small.push(flow_at(T0 + 1))  # overwrites the first flow
    assert small.num_flows() == 1
    small.push(flow_at(T0 + 2))  # overwrites the lost event
    assert small.num_flows() == 2


def test_flows_rate_over_the_last_minute():
    ring = FlowRing(100)
    for i in range(30):  # 30 flows in the last 30 s, 10 more before the window
        ring.push(flow_at(T0 - 30 + i))
    assert ring.flows_rate(now=T0) == pytest.approx(30 / 60)
    old = FlowRing(100)
    for i in range(10):
        old.push(flow_at(T0 - 600 + i))
    assert old.flows_rate(now=T0) == 0.0


def test_flows_rate_of_a_wrapped_ring_uses_the_time_it_covers():
    ring = FlowRing(10)
    for i in range(50):  # 5 flows per second; the ring holds the last 2 s
        ring.push(flow_at(T0 - 10 + i * 0.2))
    now = T0 - 10 + 49 * 0.2
    # 10 flows between the oldest kept (1.8 s before now) and now
    assert ring.flows_rate(now=now) == pytest.approx(10 / 1.8)


def test_wait_returns_on_a_write_or_a_wake():
    async def main():
        ring = FlowRing(4)
        waiter = asyncio.create_task(ring.wait(0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        ring.push(flow_at(T0))
        await asyncio.wait_for(waiter, 1)
        await asyncio.wait_for(ring.wait(0), 1)  # already written: returns at once
        waiter = asyncio.create_task(ring.wait(1))
        await asyncio.sleep(0.01)
        ring.wake()
        await asyncio.wait_for(waiter, 1)
        assert ring.next_seq == 1
    run(main())
