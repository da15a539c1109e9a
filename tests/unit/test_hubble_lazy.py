"""Flows made on first read (pilus.hubble.part, ring, flows.capture/build, metrics facts).

What a datapath event's flow needs from the agent is captured when the event comes; the
Flow itself is made only when a reader asks for it. These tests hold the lazy path to the
eager one: the same Flow, the same metrics, the endpoint as it was when the event came, a
flow that cannot be made reaching readers as a lost event, and nothing made that nobody
reads. Fuzzing: parse_packet and decode on arbitrary bytes."""

from __future__ import annotations

import ctypes

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, TCP, UDP
from test_hubble_flows import (
    CIDR_IDENTITY,
    COREDNS,
    DEATHSTAR,
    DEATHSTAR_IP,
    LOOKUP,
    NODE,
    PARSER,
    T0,
    WORLD_IP,
    XWING,
    XWING_IP,
    drop,
    packet,
    trace,
    verdict,
)
from test_l7_flows import event, record
from test_l7_kafka_dns_events import dns_record, kafka_record

from pilus.datapath import abi
from pilus.datapath.events import decode, parse_packet
from pilus.hubble.flows import FlowParser
from pilus.hubble.lookup import StaticLookup
from pilus.hubble.metrics import HubbleMetrics
from pilus.hubble.part import HubblePart
from pilus.hubble.protos import flow_pb2
from pilus.hubble.ring import FlowRing
from pilus.observer.l7 import L7Event

HANDLERS = ["flow", "drop", "tcp", "policy"]


def events():
    """One of each shape the parser handles differently."""
    syn_ack = packet(src=DEATHSTAR_IP, dst=XWING_IP, l4=TCP(sport=80, dport=43512, flags="SA"))
    return [
        drop(133),
        drop(181, source_ep=5),  # the source endpoint drops: egress
        drop(999),  # a reason without an enum name
        trace(abi.TRACE_TO_LXC, ct=0),
        trace(abi.TRACE_FROM_LXC, ct=2, source_ep=6, src_id=1001, pkt=syn_ack),
        trace(abi.TRACE_TO_LXC, ct=5),  # unknown CT state: no direction, no reply
        trace(abi.TRACE_TO_LXC, ct=0x80 | 1),  # encrypted
        verdict(0),
        verdict(-133, match=0),
        verdict(1, proxy_port=15001),
        verdict(0, audited=True),
        verdict(0, direction=abi.POLICY_EGRESS, source_ep=5, local=1000, remote=2,
                pkt=packet(src=XWING_IP, dst=WORLD_IP, l4=UDP(sport=5353, dport=53))),
        verdict(0, pkt=packet(src=WORLD_IP, dst=XWING_IP, l4=ICMP(type=8)), source_ep=5, local=1000,
                remote=CIDR_IDENTITY),
        verdict(0, pkt=b"\x00" * 10),  # no usable capture: the policy's protocol and port
    ]


def without_uuid(f: flow_pb2.Flow) -> flow_pb2.Flow:
    g = flow_pb2.Flow()
    g.CopyFrom(f)
    g.uuid = ""
    return g


def test_the_lazy_flow_is_the_eager_flow():
    for ev in events():
        cap = PARSER.capture(ev)
        assert cap is not None
        assert without_uuid(PARSER.build(cap)) == without_uuid(PARSER.parse(ev)), ev


def test_facts_count_what_the_flows_count():
    by_facts, by_flows = HubbleMetrics(HANDLERS), HubbleMetrics(HANDLERS)
    for ev in events():
        by_facts.observe_facts(PARSER.capture(ev).facts)
        by_flows.observe(PARSER.parse(ev))
    samples = [sorted((s.name, tuple(sorted(s.labels.items())), s.value) for m in metrics.registry.collect()
                      for s in m.samples if not s.name.endswith("_created")) for metrics in (by_facts, by_flows)]
    assert samples[0] == samples[1]
    assert by_facts.registry.get_sample_value("hubble_drop_total", {"reason": "999", "protocol": "TCP"}) == 1
    assert by_facts.registry.get_sample_value(
        "hubble_policy_verdicts_total", {"direction": "ingress", "match": "none", "action": "dropped"}) == 1


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["drop", "trace", "verdict"]), st.integers(-200, 200), st.integers(0, 0xFF),
       st.sampled_from([abi.POLICY_INGRESS, abi.POLICY_EGRESS, 7]), st.integers(0, 6),
       st.sampled_from([0, 5, 6]), st.sampled_from(["S", "SA", "F", "R", "PA", ""]))
def test_facts_and_flows_agree_on_any_event(kind, code, ct, direction, match, source_ep, flags):
    pkt = packet(l4=TCP(sport=43512, dport=80, flags=flags))
    if kind == "drop":
        ev = drop(abs(code), source_ep=source_ep, pkt=pkt)
    elif kind == "trace":
        ev = trace(abi.TRACE_TO_LXC if code % 2 else abi.TRACE_FROM_LXC, ct=ct, source_ep=source_ep, pkt=pkt)
    else:
        ev = verdict(code, direction=direction, match=match, source_ep=source_ep, pkt=pkt,
                     proxy_port=15001 if ct == 1 else 0, audited=ct == 2)
    a, b = HubbleMetrics(HANDLERS), HubbleMetrics(HANDLERS)
    a.observe_facts(PARSER.capture(ev).facts)
    b.observe(PARSER.parse(ev))

    def values(m):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for fam in m.registry.collect()
                      for s in fam.samples if not s.name.endswith("_created"))
    assert values(a) == values(b)


def test_the_endpoint_is_the_one_of_when_the_event_came():
    lookup = StaticLookup([XWING, DEATHSTAR, COREDNS])
    parser = FlowParser(lookup, node_name=NODE)
    cap = parser.capture(drop(133))
    lookup.remove(DEATHSTAR_IP)  # the pod is gone before anyone reads the flow
    f = parser.build(cap)
    assert (f.destination.pod_name, f.destination.ID) == ("deathstar-6c94d", 6)
    assert "k8s:class=deathstar" in f.destination.labels
    assert parser.parse(drop(133)).destination.pod_name == ""  # made now, it would not know


class _Hub:
    """HubblePart's hub for ingest() alone (no subscription, no datapath)."""

    def lost(self) -> int:
        return 0


def _part(tmp_path, metrics=None) -> HubblePart:
    return HubblePart(_Hub(), LOOKUP, node_name=NODE, socket_path=tmp_path / "hubble.sock", metrics=metrics)


def test_ingest_makes_no_flow_until_one_is_read(tmp_path):
    part = _part(tmp_path, HubbleMetrics(HANDLERS))
    part.ingest(events())
    entries = list(part.ring.entries())
    assert len(entries) == part.ring.num_flows() == part.ring.seen_flows == len(events())
    assert all(e._message is None for e in entries)  # noqa: SLF001 - nothing made yet
    assert part.ring.flows_rate(now=T0 + 1) > 0 and all(e._message is None for e in entries)  # noqa: SLF001
    # the metrics counted them already
    assert part.metrics.registry.get_sample_value(
        "hubble_flows_processed_total", {"type": "Drop", "subtype": "", "verdict": "DROPPED"}) == 3
    first = entries[0].flow
    assert first is entries[0].flow  # made once, then kept
    assert (first.verdict, first.source.pod_name, first.time.ToNanoseconds()) == (
        flow_pb2.DROPPED, "xwing", entries[0].time_ns)


def test_a_flow_that_cannot_be_made_reaches_readers_as_lost(tmp_path, monkeypatch):
    part = _part(tmp_path)
    part.ingest([drop(133)])

    def broken(_cap):
        raise ValueError("no flow")
    monkeypatch.setattr(part.parser, "build", broken)
    entry = next(part.ring.entries())
    assert entry.flow is None
    assert entry.message.source == flow_pb2.UNKNOWN_LOST_EVENT_SOURCE and entry.message.num_events_lost == 1
    assert part.parse_errors == 1


def test_ring_counts_lazy_entries_as_flows():
    ring = FlowRing(2)
    ring.push_lazy(int(T0 * 1e9), lambda: flow_pb2.Flow(uuid="a"))
    ring.record_lost(flow_pb2.OBSERVER_EVENTS_QUEUE, 1)
    assert ring.num_flows() == 1
    ring.push_lazy(int(T0 * 1e9), lambda: flow_pb2.Flow(uuid="b"))  # overwrites the lazy flow
    assert ring.num_flows() == 1 and [e.flow is not None for e in ring.entries()] == [False, True]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_packet_takes_any_bytes(data):
    s = parse_packet(data)
    assert s.src_ip is None or s.src_ip.count(".") == 3


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([abi.NOTIFY_DROP, abi.NOTIFY_TRACE, abi.NOTIFY_POLICY_VERDICT, 99]), st.binary(max_size=400))
def test_decode_takes_any_record(kind, tail):
    raw = bytes([kind]) + tail
    try:
        ev = decode(raw)
    except ValueError:
        assert len(raw) < ctypes.sizeof(abi.PolicyVerdictNotify)  # too short for its type
        return
    capture = PARSER.capture(ev) if hasattr(ev, "packet") else None
    if capture is not None:
        PARSER.build(capture)


# -- L7 records --------------------------------------------------------------------------

ALL_HANDLERS = ["flow", "drop", "tcp", "policy", "http", "dns", "kafka"]


def _samples(m: HubbleMetrics) -> list:
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for fam in m.registry.collect()
                  for s in fam.samples if not s.name.endswith("_created"))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["http", "kafka", "dns"]), st.sampled_from(["FORWARDED", "DENIED", "ERROR"]),
       st.sampled_from(["ingress", "egress"]), st.sampled_from([0, 200, 403, 502]), st.integers(0, 40),
       st.sampled_from(["produce", "fetch", "metadata"]), st.lists(st.sampled_from(["1.2.3.4", "5.6.7.8"]),
                                                                   max_size=2),
       st.sampled_from([None, 0, 29]))
def test_l7_captures_count_what_their_flows_count(kind, verdict, direction, status, rcode, api_key, ips,
                                                  error_code):
    if kind == "http":
        rec = record(verdict=verdict, status=status, direction=direction)
    elif kind == "kafka":
        rec = kafka_record(verdict=verdict, api_key=api_key, error_code=error_code, direction=direction)
    else:
        rec = dns_record(verdict=verdict, rcode=rcode % 24, ips=tuple(ips))
    ev = L7Event.from_record(rec)
    by_caps, by_flows = HubbleMetrics(ALL_HANDLERS), HubbleMetrics(ALL_HANDLERS)
    for cap in PARSER.capture_l7(ev):
        by_caps.observe_l7(cap.facts, cap.l7)
        f = PARSER.build(cap)
        by_flows.observe(f)
        assert f.time.ToNanoseconds() == cap.time_ns
    assert _samples(by_caps) == _samples(by_flows)


def test_l7_flows_are_made_on_first_read(tmp_path):
    part = _part(tmp_path, HubbleMetrics(ALL_HANDLERS))
    part.ingest([event(), event(verdict="DENIED", status=403)])
    entries = list(part.ring.entries())
    assert len(entries) == 3 and all(e._message is None for e in entries)  # noqa: SLF001
    assert part.metrics.registry.get_sample_value(
        "hubble_http_requests_total", {"method": "GET", "protocol": "HTTP/1.1", "reporter": "server"}) == 2
    assert part.metrics.registry.get_sample_value(
        "hubble_http_responses_total",
        {"method": "GET", "protocol": "HTTP/1.1", "status": "403", "reporter": "server"}) == 1
    request, response, denied = (e.flow for e in entries)
    assert (request.l7.type, response.l7.type, denied.verdict) == (flow_pb2.REQUEST, flow_pb2.RESPONSE,
                                                                   flow_pb2.DROPPED)
    assert response.l7.latency_ns == 2_500_000 and response.source.identity == request.destination.identity
