"""The event hub (pilus.observer.monitor) without root: raw ring-buffer records built with
the datapath/abi.py structs, read through a stand-in for EventReader, fanned out to
subscribers as typed events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_events import MASK_DROP, MASK_TRACE, MASK_VERDICT, record, tcp_syn, verdict_record

from pilus.api.server import APIServer
from pilus.datapath import abi
from pilus.datapath.events import DropEvent, PolicyVerdictEvent, TraceEvent, decode_records
from pilus.observer import monitor
from pilus.observer.format import event_line, event_record
from pilus.observer.monitor import EventHub, LostEvents

EVERYTHING = MASK_DROP | MASK_TRACE | MASK_VERDICT


class RingStandIn:
    """EventReader's interface over a list of records (the ring buffer itself is
    tested in tests/bpf); decoding is the real decode_records. ``fileno()`` is a pipe
    that becomes readable when records are pushed, as the ring's epoll fd does."""

    def __init__(self) -> None:
        self.ring: list[bytes] = []
        self.records = 0
        self.records_by_type: dict[int, int] = {}
        self.masks: list[int] = []
        self.dropped_by_datapath = 0
        self.decoded_types: list[int] = []
        self.closed = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)

    def push(self, *recs: bytes) -> None:
        self.ring.extend(recs)
        os.write(self._wfd, b"x")

    def fileno(self) -> int:
        return self._rfd

    def poll(self, timeout_ms: int = 0, want=None):
        with contextlib.suppress(BlockingIOError):  # nothing pushed since the last poll
            os.read(self._rfd, 4096)
        raw, self.ring = self.ring, []
        self.records += len(raw)
        for rec in raw:
            self.records_by_type[rec[0]] = self.records_by_type.get(rec[0], 0) + 1
        events = decode_records(raw, want)[0]
        self.decoded_types.extend(rec[0] for rec in raw if want is None or want(rec[0]))
        return events

    def set_listen_mask(self, mask: int) -> None:
        self.masks.append(mask)

    def lost(self) -> int:
        return self.dropped_by_datapath

    def close(self) -> None:
        if not self.closed:
            os.close(self._rfd)
            os.close(self._wfd)
            self.closed = True


def drop(reason=133, **kw) -> bytes:
    return record(abi.NOTIFY_DROP, reason, tcp_syn(), **kw)


def trace(**kw) -> bytes:
    return record(abi.NOTIFY_TRACE, abi.TRACE_TO_LXC, tcp_syn(), **kw)


def verdict(source=5) -> bytes:
    return verdict_record(tcp_syn(), direction=abi.POLICY_INGRESS, verdict=0,
                          match_type=abi.POLICY_MATCH_L3_L4, proto=6, dport=80, source=source)


def queued(sub) -> list:
    return [sub.queue.get_nowait() for _ in range(sub.queue.qsize())]


@pytest.fixture
def reader():
    r = RingStandIn()
    yield r
    r.close()


# -- the listen mask: the datapath emits what some subscriber wants -----------------------


def test_hub_keeps_the_datapath_mask_to_its_subscribers(reader):
    hub = EventHub(reader)
    drops = hub.subscribe(frozenset({"drop"}), None)
    everything = hub.subscribe(None, None)
    hub.unsubscribe(everything)
    hub.unsubscribe(drops)
    assert reader.masks == [MASK_DROP, MASK_DROP | MASK_TRACE | MASK_VERDICT, MASK_DROP, 0]


def test_listening_names_the_types_of_the_mask(reader):
    hub = EventHub(reader)
    assert hub.listening() == []
    hub.subscribe(frozenset({"policy-verdict"}), 3)
    hub.subscribe(frozenset({"drop"}), None)
    assert hub.listening() == ["drop", "policy-verdict"]
    assert reader.masks[-1] == MASK_DROP | MASK_VERDICT


# -- fan-out by type and endpoint -----------------------------------------------------------


def test_hub_offers_only_wanted_events_and_counts_every_record(reader):
    hub = EventHub(reader)
    sub = hub.subscribe(frozenset({"drop"}), None)
    reader.ring = [record(abi.NOTIFY_TRACE, 0, tcp_syn()), record(abi.NOTIFY_DROP, 133, tcp_syn())]
    hub._drain()
    got = [event_record(sub.queue.get_nowait()) for _ in range(sub.queue.qsize())]
    assert [(e["type"], e["reason"]) for e in got] == [("drop", 133)]
    hub.unsubscribe(sub)
    reader.ring = [record(abi.NOTIFY_DROP, 133, tcp_syn())]  # emitted before the mask changed
    hub._drain()
    assert hub.received == 3 and sub.queue.empty()
    assert hub.received_by_type() == {"drop": 2, "trace": 1, "policy-verdict": 0}
    assert hub.listening() == []


def test_fan_out_by_type_and_endpoint(reader):
    hub = EventHub(reader)
    everything = hub.subscribe(None, None)
    drops = hub.subscribe(frozenset({"drop"}), None)
    ep6 = hub.subscribe(None, 6)  # to or from endpoint 6
    ep5_verdicts = hub.subscribe(frozenset({"policy-verdict"}), 5)
    reader.ring = [
        drop(source=5, dst_id=6),
        trace(source=7, dst_id=8),
        verdict(source=5),
        drop(reason=132, source=6, dst_id=0),
    ]
    hub._drain()
    kinds = lambda sub: [(type(e), e.source_ep) for e in queued(sub)]  # noqa: E731
    assert kinds(everything) == [(DropEvent, 5), (TraceEvent, 7), (PolicyVerdictEvent, 5),
                                 (DropEvent, 6)]
    assert kinds(drops) == [(DropEvent, 5), (DropEvent, 6)]
    # the ingress verdict of endpoint 5 is to endpoint 5 (dst_ep), not to 6
    assert kinds(ep6) == [(DropEvent, 5), (DropEvent, 6)]
    assert kinds(ep5_verdicts) == [(PolicyVerdictEvent, 5)]


def test_subscribers_share_one_typed_event_stamped_with_the_time_read(reader):
    hub = EventHub(reader)
    a, b = hub.subscribe(None, None), hub.subscribe(frozenset({"trace"}), None)
    reader.ring = [trace()]
    hub._drain()
    (ev_a,), (ev_b,) = queued(a), queued(b)
    assert ev_a is ev_b and isinstance(ev_a, TraceEvent) and ev_a.time is not None
    rec = event_record(ev_a)
    assert rec["type"] == "trace" and rec["time"] == ev_a.time
    assert event_line(ev_a).startswith("-> endpoint 6 flow 0xdeadbeef , identity 1000->1001 "
                                       "state new ifindex 101 orig-ip 0.0.0.0: ")


def test_only_wanted_record_types_are_decoded(reader):
    hub = EventHub(reader)
    hub.subscribe(frozenset({"drop"}), 6)
    reader.ring = [trace(), drop(), verdict(), b"\x01\x00"]  # the last: a drop cut short
    hub._drain()
    assert reader.decoded_types == [abi.NOTIFY_DROP, abi.NOTIFY_DROP]
    assert hub.received == 4


def test_unknown_records_reach_only_unfiltered_subscribers(reader):
    hub = EventHub(reader)
    everything, ep5 = hub.subscribe(None, None), hub.subscribe(None, 5)
    reader.ring = [bytes([9]) + bytes(40)]
    hub._drain()
    (ev,) = queued(everything)
    assert event_record(ev) == {"type": "unknown-9", "len": 41, "time": ev.time}
    assert ep5.queue.empty()


# -- counters and slow subscribers -------------------------------------------------------------


def test_lost_is_what_the_datapath_could_not_emit(reader):
    hub = EventHub(reader)
    reader.dropped_by_datapath = 17
    assert hub.lost() == 17


def test_a_slow_subscriber_loses_events_and_others_do_not(reader, monkeypatch):
    monkeypatch.setattr(monitor, "SUBSCRIBER_QUEUE", 2)
    hub = EventHub(reader)
    slow = hub.subscribe(None, None)
    monkeypatch.setattr(monitor, "SUBSCRIBER_QUEUE", 100)
    fast = hub.subscribe(None, None)
    reader.ring = [drop(reason=130 + i) for i in range(5)]
    hub._drain()
    assert [e.reason for e in queued(fast)] == [130, 131, 132, 133, 134]
    assert [e.reason for e in queued(slow)] == [130, 131] and slow.lost == 3
    # once it has room again, it first learns how many it missed
    reader.ring = [drop(reason=140)]
    hub._drain()
    got = queued(slow)
    assert got[0] == LostEvents(3) and [e.reason for e in got[1:]] == [140]
    assert event_record(got[0]) == {"type": "lost", "count": 3}
    assert event_line(got[0]) == "EVENTS LOST: 3"
    assert slow.lost == 0 and [e.reason for e in queued(fast)] == [140]


def test_the_hub_reads_when_the_ring_is_readable_and_closes_it_on_stop(reader):
    async def main():
        hub = EventHub(reader)
        await hub.start()
        assert reader.masks == [0]  # nobody listens yet
        sub = hub.subscribe(frozenset({"drop"}), None)
        reader.push(trace(), drop(reason=132))
        ev = await asyncio.wait_for(sub.queue.get(), 5)
        assert isinstance(ev, DropEvent) and ev.reason_desc == "Invalid source ip"
        reader.push(drop(reason=133))  # read again after the drain interval
        ev = await asyncio.wait_for(sub.queue.get(), 5)
        assert ev.reason == 133
        await hub.stop()
        assert reader.closed and hub.received == 3

    asyncio.run(main())


# -- the API streams what the hub offers, as records -------------------------------------


def test_the_monitor_route_streams_records_of_the_typed_events(reader):
    async def main():
        hub = EventHub(reader)
        api = APIServer(SimpleNamespace(events=hub), None)
        async with TestClient(TestServer(api.app())) as client:
            resp = await client.get("/v1/monitor?type=drop&endpoint=6")
            assert resp.status == 200
            for _ in range(100):  # until the route has subscribed
                if hub.subscribers:
                    break
                await asyncio.sleep(0.01)
            reader.ring = [trace(), drop(reason=132, source=7, dst_id=6)]
            hub._drain()
            line = await asyncio.wait_for(resp.content.readline(), 5)
            got = json.loads(line)
            assert (got["type"], got["reason_desc"], got["dst_ep"]) == ("drop", "Invalid source ip", 6)
            assert got["summary"] == "10.200.1.5:43512 -> 10.200.1.6:80 tcp SYN" and got["time"]
            resp.close()
            bad = await client.get("/v1/monitor?type=flows")
            assert bad.status == 400 and "unknown event type 'flows'" in (await bad.json())["error"]

    asyncio.run(main())
