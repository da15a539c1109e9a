"""Hubble metrics from flows: the counters Cilium's handlers keep, labels from fixed
sets only (1,000 flows between random addresses and ports make no new series), the
handlers a user did not ask for absent, an unknown handler refused by name."""

from __future__ import annotations

import random

import pytest

from pilus.hubble.flows import MESSAGE_TYPE_DROP, MESSAGE_TYPE_POLICY_VERDICT, MESSAGE_TYPE_TRACE
from pilus.hubble.metrics import HubbleMetrics, parse_handlers
from pilus.hubble.protos import flow_pb2


def _flow(etype, verdict, *, src="10.0.0.1", dst="10.0.0.2", sport=40000, dport=80, syn=True, **fields):
    f = flow_pb2.Flow(verdict=verdict, **fields)
    f.event_type.type = etype
    f.IP.source, f.IP.destination = src, dst
    f.l4.TCP.source_port, f.l4.TCP.destination_port = sport, dport
    f.l4.TCP.flags.SYN = syn
    return f


def _value(m: HubbleMetrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_counters_follow_the_flows():
    m = HubbleMetrics(["flow", "drop", "tcp", "policy"])
    m.observe(_flow(MESSAGE_TYPE_DROP, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED))
    m.observe(_flow(MESSAGE_TYPE_TRACE, flow_pb2.FORWARDED, trace_observation_point=flow_pb2.TO_ENDPOINT))
    m.observe(_flow(MESSAGE_TYPE_POLICY_VERDICT, flow_pb2.FORWARDED, traffic_direction=flow_pb2.INGRESS,
                    policy_match_type=2))
    # the same denied packet as a policy verdict: no second drop
    m.observe(_flow(MESSAGE_TYPE_POLICY_VERDICT, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED,
                    traffic_direction=flow_pb2.INGRESS, policy_match_type=0))
    m.record_lost(flow_pb2.PERF_EVENT_RING_BUFFER, 7)
    assert _value(m, "hubble_flows_processed_total", type="Drop", subtype="", verdict="DROPPED") == 1
    assert _value(m, "hubble_flows_processed_total", type="Trace", subtype="to-endpoint", verdict="FORWARDED") == 1
    assert _value(m, "hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 1
    assert _value(m, "hubble_tcp_flags_total", flag="SYN", family="IPv4") == 4
    assert _value(m, "hubble_policy_verdicts_total", direction="ingress", match="none", action="dropped") == 1
    assert _value(m, "hubble_policy_verdicts_total", direction="ingress", match="l3-l4", action="forwarded") == 1
    assert _value(m, "hubble_lost_events_total", source="PERF_EVENT_RING_BUFFER") == 7


def test_label_cardinality_is_bounded_by_the_enums_not_the_traffic():
    m = HubbleMetrics(["flow", "drop", "tcp", "policy"])
    rnd = random.Random(1)

    def series() -> int:
        return sum(len(metric.samples) for metric in m.registry.collect())

    m.observe(_flow(MESSAGE_TYPE_DROP, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED))
    before = series()
    for _ in range(1000):
        m.observe(_flow(MESSAGE_TYPE_DROP, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED,
                        src=f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(256)}",
                        sport=rnd.randrange(1, 65536), dport=rnd.randrange(1, 65536)))
    assert series() == before


def test_only_the_asked_handlers_and_unknown_ones_refused():
    m = HubbleMetrics(["drop"])
    m.observe(_flow(MESSAGE_TYPE_DROP, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED))
    names = {metric.name for metric in m.registry.collect()}
    assert names == {"hubble_drop", "hubble_lost_events"}
    assert parse_handlers("flow, drop") == ("flow", "drop")
    with pytest.raises(ValueError, match="unknown Hubble metric 'httpV2'"):
        parse_handlers("flow,httpV2")


def test_a_flow_no_label_names_does_not_break_the_scrape():
    m = HubbleMetrics(["flow", "policy"])
    m.observe(_flow(MESSAGE_TYPE_POLICY_VERDICT, 99))  # a verdict number the enum does not name
    m.observe(_flow(MESSAGE_TYPE_DROP, flow_pb2.DROPPED, drop_reason_desc=flow_pb2.POLICY_DENIED))
    assert _value(m, "hubble_flows_processed_total", type="Drop", subtype="", verdict="DROPPED") == 1
