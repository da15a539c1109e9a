"""Hubble metrics: counters of the node's flows, Prometheus on --hubble-metrics-server.

Opt-in by handler name as Cilium's ``--hubble-metrics`` (``flow,drop,tcp,policy``);
``hubble_lost_events_total`` is always there. The L3/L4 counters are batched per
distinct flow facts and added to the counters when the registry is read (single-threaded:
the event loop counts and serves). Every label takes its value from a fixed
set (enum names, observation points, TCP flag names), so the cardinality is bounded
whatever the traffic: no addresses, ports or pod names.

  flow    hubble_flows_processed_total{type, subtype, verdict}
  drop    hubble_drop_total{reason, protocol}   (drop events: each dropped packet once)
  tcp     hubble_tcp_flags_total{flag, family}
  policy  hubble_policy_verdicts_total{direction, match, action}
  http    hubble_http_requests_total{method, protocol, reporter} (L7 REQUEST flows),
          hubble_http_responses_total{method, protocol, status, reporter} (RESPONSE flows, and
          the 403 of a denied request), hubble_http_request_duration_seconds{method, reporter}
          (RESPONSE latency); reporter is "server" for ingress, "client" for egress (Cilium's
          http handler). Methods and status codes are what the proxy parsed: bounded sets.
  dns     hubble_dns_queries_total{rcode, qtypes, ips_returned} (REQUEST flows; rcode "" or,
          denied, "Policy denied"), hubble_dns_responses_total{rcode, qtypes, ips_returned}
          (RESPONSE flows; rcode as Hubble names it, "No Error"), and
          hubble_dns_response_types_total{type, qtypes} (per answer record type): Cilium's
          dns handler. No query names (its `query` option): qtypes and counts only.
  kafka   hubble_kafka_requests_total{topic, api_key, error_code, reporter} and
          hubble_kafka_request_duration_seconds{topic, api_key, reporter} (Cilium's kafka
          handler): REQUEST flows, one per (request, topic), with the code the client got
          (pilus flows carry it; Cilium's parser leaves it 0), and the RESPONSE's latency.
          Topics are the broker's: as bounded as its topic list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

from pilus.hubble.flows import (
    MESSAGE_TYPE_ACCESS_LOG,
    MESSAGE_TYPE_DROP,
    MESSAGE_TYPE_POLICY_VERDICT,
    MESSAGE_TYPE_TRACE,
    RCODE_NAMES,
    FlowFacts,
    L7Facts,
)
from pilus.hubble.protos import flow_pb2

log = logging.getLogger(__name__)

HANDLERS = ("flow", "drop", "tcp", "policy", "http", "dns", "kafka")

_TYPES = {MESSAGE_TYPE_DROP: "Drop", MESSAGE_TYPE_TRACE: "Trace", MESSAGE_TYPE_POLICY_VERDICT: "PolicyVerdict",
          MESSAGE_TYPE_ACCESS_LOG: "L7"}
#: Cilium's policy match types (policy_match_type) as its metric labels them
_MATCH = {0: "none", 1: "l3-only", 2: "l3-l4", 3: "l4-only", 4: "all", 5: "l3-proto", 6: "proto-only"}
_TCP_FLAGS = ("SYN", "ACK", "FIN", "RST", "PSH", "URG", "ECE", "CWR", "NS")


def parse_handlers(text: str) -> tuple[str, ...]:
    """``flow,drop`` (Cilium's per-handler options after ``:`` are not supported)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in HANDLERS]
    if bad:
        raise ValueError(f"unknown Hubble metric {bad[0]!r}: choose from {', '.join(HANDLERS)}")
    return names


class _FlushFirst:
    """A collector of nothing that flushes the batched counts when the registry is read
    (it is registered before the counters, and the registry collects in that order)."""

    def __init__(self, metrics: HubbleMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> list:
        self.metrics.flush()
        return []


def facts_of(f: flow_pb2.Flow) -> FlowFacts:
    """A Flow's facts, as FlowParser.capture derives them from an event."""
    etype = f.event_type.type
    proto = (f.l4.WhichOneof("protocol") or "") if f.HasField("l4") else ""
    flags = tuple(n for n in _TCP_FLAGS if getattr(f.l4.TCP.flags, n)) if proto == "TCP" else ()
    point = f.trace_observation_point if etype == MESSAGE_TYPE_TRACE else 0
    return FlowFacts(etype, point, f.verdict, f.drop_reason_desc, proto, flags, f.traffic_direction,
                     f.policy_match_type)


def _drop_reason_name(reason: int) -> str:
    try:
        return flow_pb2.DropReason.Name(reason)
    except ValueError:  # open enum: a code without a name keeps its number
        return str(reason)


#: Cilium's http/kafka handlers: the ingress proxy reports as the server
_REPORTER = {flow_pb2.INGRESS: "server", flow_pb2.EGRESS: "client"}


def l7_facts_of(f: flow_pb2.Flow) -> L7Facts | None:
    """An L7 Flow's L7Facts, as FlowParser.capture_l7 derives them from a record."""
    record, kind, latency = f.l7.WhichOneof("record"), f.l7.type, f.l7.latency_ns
    if record == "http":
        h = f.l7.http
        return L7Facts("http", kind, latency, method=h.method, protocol=h.protocol, code=h.code)
    if record == "dns":
        d = f.l7.dns
        return L7Facts("dns", kind, latency, qtypes=",".join(d.qtypes), rcode=d.rcode, ips=len(d.ips),
                       rrtypes=tuple(d.rrtypes))
    if record == "kafka":
        k = f.l7.kafka
        return L7Facts("kafka", kind, latency, topic=k.topic, api_key=k.api_key, error_code=k.error_code)
    return None


class HubbleMetrics:
    def __init__(self, handlers: Iterable[str]) -> None:
        self.handlers = tuple(handlers)
        self.registry = CollectorRegistry()
        self._children: dict[FlowFacts, tuple] = {}  # facts -> the labelled counters they add to
        self._pending: dict[FlowFacts, int] = {}  # facts -> flows counted since the last flush
        self._l7_children: dict[tuple, object] = {}  # (metric, label values) -> labelled child
        self.registry.register(_FlushFirst(self))  # before the counters: collect() reads in order
        self.lost = Counter("hubble_lost_events_total", "Events lost before they became flows",
                            ["source"], registry=self.registry)
        self.flows = self.drops = self.tcp = self.policy = None
        self.http_requests = self.http_responses = self.http_duration = None
        self.dns_queries = self.dns_responses = self.dns_response_types = None
        self.kafka_requests = self.kafka_duration = None
        if "flow" in self.handlers:
            self.flows = Counter("hubble_flows_processed_total", "Flows processed",
                                 ["type", "subtype", "verdict"], registry=self.registry)
        if "drop" in self.handlers:
            self.drops = Counter("hubble_drop_total", "Dropped packets", ["reason", "protocol"],
                                 registry=self.registry)
        if "tcp" in self.handlers:
            self.tcp = Counter("hubble_tcp_flags_total", "TCP packets by flag", ["flag", "family"],
                               registry=self.registry)
        if "policy" in self.handlers:
            self.policy = Counter("hubble_policy_verdicts_total", "Policy verdicts",
                                  ["direction", "match", "action"], registry=self.registry)
        if "http" in self.handlers:
            self.http_requests = Counter("hubble_http_requests_total", "HTTP requests",
                                         ["method", "protocol", "reporter"], registry=self.registry)
            self.http_responses = Counter("hubble_http_responses_total", "HTTP responses",
                                          ["method", "protocol", "status", "reporter"], registry=self.registry)
            self.http_duration = Histogram("hubble_http_request_duration_seconds", "HTTP request latency",
                                           ["method", "reporter"], registry=self.registry)
        if "dns" in self.handlers:
            self.dns_queries = Counter("hubble_dns_queries_total", "Number of DNS queries observed",
                                       ["rcode", "qtypes", "ips_returned"], registry=self.registry)
            self.dns_responses = Counter("hubble_dns_responses_total", "Number of DNS responses observed",
                                         ["rcode", "qtypes", "ips_returned"], registry=self.registry)
            self.dns_response_types = Counter("hubble_dns_response_types_total", "Number of DNS response types",
                                              ["type", "qtypes"], registry=self.registry)
        if "kafka" in self.handlers:
            self.kafka_requests = Counter("hubble_kafka_requests_total", "Count of Kafka requests",
                                          ["topic", "api_key", "error_code", "reporter"], registry=self.registry)
            self.kafka_duration = Histogram("hubble_kafka_request_duration_seconds",
                                            "Kafka request duration in seconds",
                                            ["topic", "api_key", "reporter"], registry=self.registry)

    def observe(self, f: flow_pb2.Flow) -> None:
        """Count a Flow (one a caller made; the part counts captures: observe_facts/_l7)."""
        l7 = l7_facts_of(f) if f.Type == flow_pb2.L7 else None
        if l7 is None:
            self.observe_facts(facts_of(f))
        else:
            self.observe_l7(facts_of(f), l7)

    def observe_facts(self, facts: FlowFacts) -> None:
        """Count a flow by its facts (FlowParser.capture), before or without its Flow.
        Counted here, published into the counters when they are read (``flush``)."""
        self._pending[facts] = self._pending.get(facts, 0) + 1

    def flush(self) -> None:
        """Add the counts batched by observe_facts to the labelled counters."""
        pending, self._pending = self._pending, {}
        for facts, n in pending.items():
            children = self._children.get(facts)
            if children is None:
                try:
                    children = self._children_of(facts)
                except ValueError:  # a value no label names (a caller's flow): not counted, the scrape goes on
                    log.warning("hubble metrics: cannot label %r", facts)
                    children = ()
                self._children[facts] = children
            for child in children:
                child.inc(n)

    def _children_of(self, facts: FlowFacts) -> tuple:
        """The labelled counters one flow with these facts adds to: made once per distinct
        facts (a bounded set), as looking a child up by label strings costs more than the flow."""
        etype, point, verdict, reason, proto, flags, direction, match = facts
        out = []
        if self.flows is not None:
            subtype = (flow_pb2.TraceObservationPoint.Name(point).lower().replace("_", "-")
                       if etype == MESSAGE_TYPE_TRACE else "")
            out.append(self.flows.labels(_TYPES.get(etype, "Unknown"), subtype, flow_pb2.Verdict.Name(verdict)))
        # drop events only: a denied packet is also a DROPPED policy verdict, counted once here
        if self.drops is not None and etype == MESSAGE_TYPE_DROP:
            out.append(self.drops.labels(_drop_reason_name(reason), proto or "Unknown"))
        if self.tcp is not None and proto == "TCP":
            out.extend(self.tcp.labels(name, "IPv4") for name in _TCP_FLAGS if name in flags)
        if self.policy is not None and etype == MESSAGE_TYPE_POLICY_VERDICT:
            out.append(self.policy.labels(flow_pb2.TrafficDirection.Name(direction).lower(),
                                          _MATCH.get(match, "unknown"), flow_pb2.Verdict.Name(verdict).lower()))
        return tuple(out)

    def observe_l7(self, facts: FlowFacts, l7: L7Facts) -> None:
        """Count an L7 flow: its FlowFacts (observe_facts) and the http/dns/kafka handlers'
        series of its L7Facts."""
        self.observe_facts(facts)
        if l7.record == "http" and self.http_requests is not None:
            self._http(facts, l7)
        elif l7.record == "dns" and self.dns_queries is not None:
            self._dns(facts, l7)
        elif l7.record == "kafka" and self.kafka_requests is not None:
            self._kafka(facts, l7)

    def _series(self, metric, *labels: str):
        """The labelled child (made once per label values: the L7 handlers' sets are bounded)."""
        key = (id(metric), labels)
        child = self._l7_children.get(key)
        if child is None:
            child = self._l7_children[key] = metric.labels(*labels)
        return child

    def _http(self, facts: FlowFacts, h: L7Facts) -> None:
        reporter = _REPORTER.get(facts.direction, "unknown")
        if h.kind == flow_pb2.REQUEST:
            self._series(self.http_requests, h.method, h.protocol, reporter).inc()
        if h.code and (h.kind == flow_pb2.RESPONSE or facts.verdict == flow_pb2.DROPPED):
            self._series(self.http_responses, h.method, h.protocol, str(h.code), reporter).inc()
        if h.kind == flow_pb2.RESPONSE:
            self._series(self.http_duration, h.method, reporter).observe(h.latency_ns / 1e9)

    def _dns(self, facts: FlowFacts, d: L7Facts) -> None:
        if facts.verdict == flow_pb2.DROPPED:
            self._series(self.dns_queries, "Policy denied", d.qtypes, str(d.ips)).inc()
        elif d.kind == flow_pb2.REQUEST:
            self._series(self.dns_queries, "", d.qtypes, str(d.ips)).inc()
        elif d.kind == flow_pb2.RESPONSE:
            self._series(self.dns_responses, RCODE_NAMES.get(d.rcode, ""), d.qtypes, str(d.ips)).inc()
            for rrtype in d.rrtypes:
                self._series(self.dns_response_types, rrtype, d.qtypes).inc()

    def _kafka(self, facts: FlowFacts, k: L7Facts) -> None:
        reporter = _REPORTER.get(facts.direction, "unknown")
        if k.kind == flow_pb2.REQUEST:
            self._series(self.kafka_requests, k.topic, k.api_key, str(k.error_code), reporter).inc()
        elif k.kind == flow_pb2.RESPONSE:
            self._series(self.kafka_duration, k.topic, k.api_key, reporter).observe(k.latency_ns / 1e9)

    def record_lost(self, source: int, count: int) -> None:
        self.lost.labels(flow_pb2.LostEventSource.Name(source)).inc(count)
