"""Kafka and DNS L7 records (the proxies' JSON, common design "L7 records") through the
observer: L7Event.from_record checks every field (a bad one names its path; random input
only ever raises ValueError), `pilus monitor --type l7` prints cilium-dbg's access-log
lines and -o json carries the details, Hubble makes l7.kafka / l7.dns REQUEST and
RESPONSE flows with Hubble's summaries, source/destination_names from the FQDN cache,
the dns / kafka metrics count them with Hubble's label names, and record lines the agent
receives reach GetFlows through the hub and the Hubble part, names and filters included."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hubble_flows import packet, trace
from test_l7_flows import T0, QuietReader, record

from pilus.agent_hubble import AgentEndpointLookup
from pilus.agent_proxy import parse_record
from pilus.cli.observe import format_flow
from pilus.fqdn.cache import DNSCache
from pilus.hubble.filters import compile_filter
from pilus.hubble.flows import MESSAGE_TYPE_ACCESS_LOG, FlowParser
from pilus.hubble.lookup import EndpointDetails, StaticLookup
from pilus.hubble.metrics import HubbleMetrics
from pilus.hubble.part import HubblePart
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc
from pilus.observer.format import event_record, format_event
from pilus.observer.l7 import DNSInfo, KafkaInfo, L7Event
from pilus.observer.monitor import EventHub

HQ, BROKER, POD, COREDNS, GITHUB = "10.200.1.7", "10.200.1.8", "10.200.1.9", "10.200.2.53", "140.82.121.6"
EMPIRE_HQ, KAFKA_ID, POD_ID, DNS_ID, WORLD = 4001, 4002, 4003, 4004, 2
LOOKUP = StaticLookup(
    [EndpointDetails(12, EMPIRE_HQ, "default", "empire-hq", ("k8s:app=empire-hq",), HQ),
     EndpointDetails(13, KAFKA_ID, "default", "kafka", ("k8s:app=kafka",), BROKER),
     EndpointDetails(14, POD_ID, "default", "client", ("k8s:app=client",), POD)],
    {DNS_ID: ["k8s:k8s-app=kube-dns"], WORLD: ["reserved:world"]})


def kafka_record(verdict="FORWARDED", api_key="produce", topic="deathstar-plans", error_code=0,
                 direction="ingress", **kw) -> dict:
    r = {"time": T0, "l7": "kafka", "listener": "kafka-ingress", "direction": direction, "endpoint": 13,
         "source": {"ip": HQ, "port": 40100, "identity": EMPIRE_HQ},
         "destination": {"ip": BROKER, "port": 9092, "identity": KAFKA_ID},
         "protocol": "Kafka", "verdict": verdict, "latency_ns": 3_000_000,
         "kafka": {"api_key": api_key, "api_version": 9, "correlation_id": 7, "client_id": "rdkafka",
                   "topic": topic, "error_code": error_code}}
    r.update(kw)
    return r


def dns_record(verdict="FORWARDED", query="api.github.com.", rcode=0, ips=(GITHUB,), **kw) -> dict:
    r = {"time": T0, "l7": "dns", "listener": "dns-egress", "direction": "egress", "endpoint": 14,
         "transport": "udp", "source": {"ip": POD, "port": 41000, "identity": POD_ID},
         "destination": {"ip": COREDNS, "port": 53, "identity": DNS_ID},
         "protocol": "DNS", "verdict": verdict, "latency_ns": 1_000_000,
         "dns": {"query": query, "qtypes": ["A"], "rrtypes": ["A"] * len(ips), "rcode": rcode, "ips": list(ips),
                 "ttl": 300 if ips else 0, "cnames": [], "observation_source": "proxy"}}
    r.update(kw)
    return r


def parser(**kw) -> FlowParser:
    return FlowParser(LOOKUP, node_name="default/node1", **kw)


# -- L7Event.from_record ---------------------------------------------------------------


def test_kafka_and_dns_records_parse_every_field():
    k = L7Event.from_record(kafka_record(verdict="DENIED", error_code=29))
    assert (k.l7, k.protocol, k.transport, k.verdict, k.dns) == ("kafka", "Kafka", "tcp", "DENIED", None)
    assert k.kafka == KafkaInfo("produce", 9, 7, "rdkafka", "deathstar-plans", 29)
    assert L7Event.from_record(kafka_record(error_code=None)).kafka.error_code is None  # no answer
    d = L7Event.from_record(dns_record())
    assert (d.l7, d.protocol, d.transport, d.kafka, d.endpoint, d.source_ep) == ("dns", "DNS", "udp", None, 14, 14)
    assert d.dns == DNSInfo("api.github.com.", ("A",), ("A",), 0, (GITHUB,), 300, (), "proxy")
    # optional parts: a null client id (Kafka allows it), DNS without answers, transport's default
    rec = kafka_record()
    rec["kafka"]["client_id"] = None
    assert L7Event.from_record(rec).kafka.client_id == ""
    rec = dns_record(ips=())
    del rec["transport"], rec["dns"]["cnames"], rec["dns"]["rrtypes"]
    assert (L7Event.from_record(rec).transport, L7Event.from_record(rec).dns.ips) == ("udp", ())


def test_http_records_are_unchanged():
    ev = L7Event.from_record(record())
    assert (ev.l7, ev.kafka, ev.dns, ev.transport, ev.method, ev.status) == ("http", None, None, "tcp", "GET", 200)
    assert L7Event.from_record({**record(), "l7": "http"}).l7 == "http"


def _set(rec: dict, path: str, value) -> dict:
    rec = copy.deepcopy(rec)
    *parents, last = path.split(".")
    node = rec
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return rec


@pytest.mark.parametrize(("base", "path", "value", "message"), [
    ("kafka", "l7", "smtp", "l7: 'smtp' is not one of http, kafka, dns"),
    ("kafka", "kafka", KeyError, "kafka: must be an object"),
    ("kafka", "kafka", [1], "kafka: must be an object"),
    ("kafka", "kafka.api_key", KeyError, "kafka.api_key: must be a string"),
    ("kafka", "kafka.api_version", "9", "kafka.api_version: must be an integer"),
    ("kafka", "kafka.api_version", -1, "kafka.api_version: -1 is not in 0..32767"),
    ("kafka", "kafka.correlation_id", 1 << 31, "kafka.correlation_id: 2147483648 is not in"),
    ("kafka", "kafka.error_code", True, "kafka.error_code: must be an integer"),
    ("kafka", "kafka.topic", 5, "kafka.topic: must be a string"),
    ("kafka", "kafka.topic", "t" * 2000, "kafka.topic: longer than 1024 characters"),
    ("kafka", "dns", {"query": "x."}, "dns: only in an l7 'dns' record (this one is 'kafka')"),
    ("kafka", "source.port", "9092", "source.port: must be an integer"),
    ("dns", "dns", "api.github.com", "dns: must be an object"),
    ("dns", "dns.query", None, "dns.query: must be a string"),
    ("dns", "dns.qtypes", "A", "dns.qtypes: must be a list of strings"),
    ("dns", "dns.rrtypes", ["A", 1], "dns.rrtypes[1]: must be a string"),
    ("dns", "dns.ips", ["1.2.3.4", "not-an-ip"], "dns.ips[1]: 'not-an-ip' is not an IP address"),
    ("dns", "dns.ttl", -5, "dns.ttl: -5 is not in 0..4294967295"),
    ("dns", "dns.rcode", 70000, "dns.rcode: 70000 is not in 0..4095"),
    ("dns", "dns.cnames", [None], "dns.cnames[0]: must be a string"),
    ("dns", "transport", "sctp", "transport: 'sctp' is neither tcp nor udp"),
    ("dns", "kafka", {"api_key": "fetch"}, "kafka: only in an l7 'kafka' record (this one is 'dns')"),
    ("dns", "latency_ns", -1, "latency_ns: -1 is not in 0..9223372036854775807"),
    ("dns", "endpoint", 1 << 16, "endpoint: 65536 is not in 0..65535"),
    ("dns", "source.port", 70000, "source.port: 70000 is not in 0..65535"),
    ("dns", "destination.identity", -2, "destination.identity: -2 is not in 0..4294967295"),
    ("dns", "source.ip", "pod", "source.ip: 'pod' is not an IP address"),
    ("dns", "dns.query", "api\ud800.", "dns.query: not valid Unicode text"),
    ("kafka", "listener", "\udfff", "listener: not valid Unicode text"),
    ("kafka", "time", float("nan"), "time: nan is not seconds since the epoch"),
    ("kafka", "time", float("inf"), "time: inf is not seconds since the epoch"),
    ("kafka", "time", -1.5, "time: -1.5 is not seconds since the epoch"),
    ("kafka", "kafka.client_id", "\ud83d", "kafka.client_id: not valid Unicode text"),
])
def test_bad_records_name_the_field(base, path, value, message):
    rec = _set(kafka_record() if base == "kafka" else dns_record(), path, value)
    with pytest.raises(ValueError) as exc:
        L7Event.from_record(rec)
    assert str(exc.value).startswith(message)


TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)  # lone surrogates too, as JSON allows
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
PATHS = ["l7", "verdict", "direction", "transport", "source", "source.ip", "kafka", "kafka.api_key",
         "kafka.api_version", "kafka.correlation_id", "kafka.client_id", "kafka.topic", "kafka.error_code",
         "dns", "dns.query", "dns.qtypes", "dns.rrtypes", "dns.rcode", "dns.ips", "dns.ttl", "dns.cnames",
         "dns.observation_source", "latency_ns", "endpoint", "source.port", "destination.identity",
         "destination.ip", "listener", "status", "grpc_status", "method", "url", "protocol", "time"]


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from(["kafka", "dns"]), edits=st.lists(st.tuples(st.sampled_from(PATHS), JSON), max_size=4))
def test_mutated_records_raise_only_value_error(base, edits):
    rec = kafka_record() if base == "kafka" else dns_record()
    for path, value in edits:
        try:
            rec = _set(rec, path, value)
        except (TypeError, KeyError):  # the parent was replaced by a non-object: a record anyway
            continue
    try:
        ev = L7Event.from_record(rec)
    except ValueError:
        return
    json.dumps(event_record(ev))  # what it accepted, the monitor stream can send
    assert format_event(json.loads(json.dumps(event_record(ev))))
    parser().flows(ev)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_random_json_raises_only_value_error(value):
    with contextlib.suppress(ValueError):
        L7Event.from_record(value)


# -- pilus monitor --type l7 ---------------------------------------------------------------


def monitor(rec: dict, **kw) -> str:
    return format_event(json.loads(json.dumps(event_record(L7Event.from_record(rec)))), **kw)


def test_monitor_kafka_lines():
    names = {EMPIRE_HQ: ["k8s:app=empire-hq"], KAFKA_ID: ["k8s:app=kafka"]}.get
    assert monitor(kafka_record(), labels=names) == (
        "<- Request kafka from 0 ([k8s:app=empire-hq]) to 13 ([k8s:app=kafka]), identity 4001->4002, "
        "verdict Forwarded produce topic deathstar-plans => 0 api-version 9 correlation-id 7 client-id rdkafka")
    assert monitor(kafka_record(verdict="DENIED", api_key="fetch", error_code=29, direction="egress",
                                endpoint=12)).startswith(
        "-> Request kafka from 12 ([]) to 0 ([]), identity 4001->4002, verdict Denied fetch topic "
        "deathstar-plans => 29 api-version 9")
    assert "(Kafka, 10.200.1.7:40100 -> 10.200.1.8:9092, latency 3000000 ns" in monitor(kafka_record(), verbose=1)
    assert "verdict Forwarded produce topic deathstar-plans => - api-version 9" in monitor(
        kafka_record(error_code=None))


def test_monitor_dns_lines():
    assert monitor(dns_record()) == (
        "-> Request dns from 14 ([]) to 0 ([]), identity 4003->4004, verdict Forwarded "
        "DNS proxy: api.github.com. A TTL: 300 Answer: '140.82.121.6' => NOERROR")
    assert monitor(dns_record(verdict="DENIED", query="evil.example.", rcode=5, ips=())).endswith(
        "verdict Denied DNS proxy: evil.example. A => REFUSED")
    assert monitor(dns_record(verdict="ERROR", rcode=2, ips=())).endswith(
        "verdict Error DNS proxy: api.github.com. A => SERVFAIL")
    cname = dns_record(ips=(GITHUB, "140.82.121.7"))
    cname["dns"]["cnames"] = ["github.map.fastly.net."]
    assert monitor(cname).endswith("Answer: '140.82.121.6,140.82.121.7' CNAMEs: github.map.fastly.net. => NOERROR")
    assert "(DNS udp, 10.200.1.9:41000 -> 10.200.2.53:53" in monitor(dns_record(), verbose=1)


def test_monitor_json_carries_the_details():
    k = json.loads(json.dumps(event_record(L7Event.from_record(kafka_record(verdict="DENIED", error_code=29)))))
    assert (k["type"], k["l7_protocol"], k["transport"], k["protocol"], k["verdict"]) == (
        "l7", "kafka", "tcp", "Kafka", "DENIED")
    assert k["kafka"] == {"api_key": "produce", "api_version": 9, "correlation_id": 7, "client_id": "rdkafka",
                          "topic": "deathstar-plans", "error_code": 29} and "dns" not in k
    d = json.loads(json.dumps(event_record(L7Event.from_record(dns_record()))))
    assert (d["l7_protocol"], d["transport"], d["src_ip"], d["dport"]) == ("dns", "udp", POD, 53)
    assert d["dns"] == {"query": "api.github.com.", "qtypes": ["A"], "rrtypes": ["A"], "rcode": 0,
                        "ips": [GITHUB], "ttl": 300, "cnames": [], "observation_source": "proxy"}
    assert "kafka" not in d and "kafka" not in event_record(L7Event.from_record(record()))


# -- Hubble flows ----------------------------------------------------------------------------


def test_kafka_forwarded_is_a_request_and_a_response():
    req, resp = parser().flows(L7Event.from_record(kafka_record()))
    for f in (req, resp):
        assert f.Type == flow_pb2.L7 and f.event_type.type == MESSAGE_TYPE_ACCESS_LOG
        assert f.verdict == flow_pb2.FORWARDED and f.traffic_direction == flow_pb2.INGRESS
        assert f.l7.WhichOneof("record") == "kafka" and f.l4.WhichOneof("protocol") == "TCP"
        assert (f.l7.kafka.api_key, f.l7.kafka.api_version, f.l7.kafka.correlation_id, f.l7.kafka.topic) == (
            "produce", 9, 7, "deathstar-plans")
    assert (req.l7.type, req.IP.source, req.l4.TCP.destination_port, req.source.pod_name) == (
        flow_pb2.REQUEST, HQ, 9092, "empire-hq")
    assert req.Summary == "Kafka request produce correlation id 7 topic 'deathstar-plans'"
    assert (resp.l7.type, resp.is_reply.value, resp.IP.source, resp.l7.latency_ns) == (
        flow_pb2.RESPONSE, True, BROKER, 3_000_000)
    assert resp.Summary == "Kafka response produce correlation id 7 topic 'deathstar-plans' return code 0"
    broker_error = parser().flows(L7Event.from_record(kafka_record(error_code=3)))
    assert [f.l7.kafka.error_code for f in broker_error] == [3, 3]  # the code the client got, on both
    # a Produce with acks=0 gets no answer (error_code null): its request only
    (f,) = parser().flows(L7Event.from_record(kafka_record(error_code=None)))
    assert (f.l7.type, f.verdict, f.l7.kafka.error_code) == (flow_pb2.REQUEST, flow_pb2.FORWARDED, 0)


def test_kafka_denied_is_its_request_dropped_with_the_code():
    (f,) = parser().flows(L7Event.from_record(kafka_record(verdict="DENIED", error_code=29)))
    assert (f.verdict, f.drop_reason_desc, f.l7.type, f.l7.kafka.error_code) == (
        flow_pb2.DROPPED, flow_pb2.POLICY_DENIED, flow_pb2.REQUEST, 29)
    (err,) = parser().flows(L7Event.from_record(kafka_record(verdict="ERROR", error_code=-1)))
    assert (err.verdict, err.l7.kafka.error_code) == (flow_pb2.ERROR, -1)


def test_dns_forwarded_over_udp():
    req, resp = parser().flows(L7Event.from_record(dns_record()))
    assert req.l4.WhichOneof("protocol") == "UDP" and (req.l4.UDP.source_port, req.l4.UDP.destination_port) == (
        41000, 53)
    assert (req.traffic_direction, req.source.ID, req.destination.identity) == (flow_pb2.EGRESS, 14, DNS_ID)
    # the request carries the question only, as Hubble's decodeDNS
    assert (req.l7.dns.query, list(req.l7.dns.qtypes), req.l7.dns.observation_source) == (
        "api.github.com.", ["A"], "proxy")
    assert (list(req.l7.dns.ips), req.l7.dns.ttl, list(req.l7.dns.rrtypes)) == ([], 0, [])
    assert req.Summary == "DNS Query api.github.com. A"
    assert (list(resp.l7.dns.ips), resp.l7.dns.ttl, resp.l7.dns.rcode, list(resp.l7.dns.rrtypes)) == (
        [GITHUB], 300, 0, ["A"])
    assert (resp.IP.source, resp.l4.UDP.source_port, resp.is_reply.value) == (COREDNS, 53, True)
    assert resp.Summary == 'DNS Answer "140.82.121.6" TTL: 300 (Proxy api.github.com. A)'
    tcp = parser().flows(L7Event.from_record(dns_record(transport="tcp")))
    assert {f.l4.WhichOneof("protocol") for f in tcp} == {"TCP"}


def test_dns_denied_and_error():
    (denied,) = parser().flows(L7Event.from_record(dns_record(verdict="DENIED", rcode=5, ips=())))
    assert (denied.verdict, denied.drop_reason_desc, denied.l7.type, denied.l7.dns.rcode) == (
        flow_pb2.DROPPED, flow_pb2.POLICY_DENIED, flow_pb2.REQUEST, 5)
    req, resp = parser().flows(L7Event.from_record(dns_record(verdict="ERROR", rcode=2, ips=())))
    assert {req.verdict, resp.verdict} == {flow_pb2.ERROR}
    assert resp.Summary == "DNS Answer RCode: Server Failure TTL: 0 (Proxy api.github.com. A)"
    nx = parser().flows(L7Event.from_record(dns_record(rcode=3, ips=())))[1]
    assert nx.Summary == "DNS Answer RCode: Non-Existent Domain TTL: 0 (Proxy api.github.com. A)"
    rec = dns_record(ips=())
    rec["dns"].update(cnames=["a.example.", "b.example."], ttl=60)
    assert parser().flows(L7Event.from_record(rec))[1].Summary == (
        'DNS Answer CNAMEs: "a.example.,b.example." TTL: 60 (Proxy api.github.com. A)')


class FQDNNames:
    """The agent's ``fqdn`` attribute as the flow builder asks it: ip -> names."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table, self.asked = table, []

    def names_for_ip(self, ip: str) -> list[str]:
        self.asked.append(ip)
        return list(self.table.get(ip, []))


def test_destination_names_from_the_agents_fqdn_cache():
    fqdn = FQDNNames({GITHUB: ["www.github.com.", "api.github.com."]})
    agent = SimpleNamespace(endpoints=None, parts={}, identities=None, fqdn=fqdn)
    p = FlowParser(AgentEndpointLookup(agent), node_name="default/node1")  # dns_names from the lookup
    http = record(direction="egress", endpoint=14, source={"ip": POD, "port": 42000, "identity": POD_ID},
                  destination={"ip": GITHUB, "port": 443, "identity": WORLD})
    req, resp = p.flows(L7Event.from_record(http))
    assert list(req.destination_names) == ["api.github.com.", "www.github.com."] and not req.source_names
    assert list(resp.source_names) == ["api.github.com.", "www.github.com."] and not resp.destination_names
    # L3/L4 flows too (Hubble's threefour parser names both ends the same way)
    (f,) = p.flows(trace(pkt=packet(src=POD, dst=GITHUB)))
    assert (f.Type, list(f.destination_names)) == (flow_pb2.L3_L4, ["api.github.com.", "www.github.com."])
    assert GITHUB in fqdn.asked and POD in fqdn.asked
    # hubble observe prints the names for an end that is no pod
    line = format_flow(observer_pb2.GetFlowsResponse(flow=req))
    assert "-> api.github.com.,www.github.com.:443 (world) http-request FORWARDED" in line
    # an agent without an FQDN cache (yet): no names, no error
    bare = FlowParser(AgentEndpointLookup(SimpleNamespace(endpoints=None, parts={}, identities=None)),
                      node_name="n")
    assert not bare.flows(L7Event.from_record(http))[0].destination_names
    # an explicit callable wins over the lookup's
    assert list(parser(dns_names=lambda ip: ["x."]).flows(L7Event.from_record(http))[0].destination_names) == ["x."]


def test_protocol_dns_query_and_fqdn_filters():
    p = parser(dns_names={GITHUB: ["api.github.com."]}.get)
    flows = (p.flows(L7Event.from_record(kafka_record())) + p.flows(L7Event.from_record(dns_record()))
             + p.flows(L7Event.from_record(dns_record(verdict="DENIED", query="evil.example.", rcode=5, ips=())))
             + p.flows(L7Event.from_record(record(direction="egress", url="https://api.github.com/", destination={
                 "ip": GITHUB, "port": 443, "identity": WORLD}))))

    def pick(**ff):
        pred = compile_filter(flow_pb2.FlowFilter(**ff))
        return [f.Summary for f in flows if pred(f)]

    assert pick(protocol=["kafka"]) == [
        "Kafka request produce correlation id 7 topic 'deathstar-plans'",
        "Kafka response produce correlation id 7 topic 'deathstar-plans' return code 0"]
    assert len(pick(protocol=["dns"])) == 3 and len(pick(protocol=["dns", "kafka"])) == 5
    assert pick(dns_query=["^evil\\."]) == ["DNS Query evil.example. A"]
    assert pick(dns_query=["github"], reply=[True]) == [
        'DNS Answer "140.82.121.6" TTL: 300 (Proxy api.github.com. A)']
    assert pick(protocol=["dns"], verdict=[flow_pb2.DROPPED]) == ["DNS Query evil.example. A"]
    assert pick(destination_fqdn=["*.github.com"]) == ["HTTP/1.1 GET https://api.github.com/"]
    assert pick(source_fqdn=["api.github.com"]) == ["HTTP/1.1 200 2ms (GET https://api.github.com/)"]
    assert pick(protocol=["udp"]) == pick(protocol=["dns"])  # DNS over UDP is UDP at L4 too


def test_observe_lines_for_kafka_and_dns():
    req, resp = parser().flows(L7Event.from_record(dns_record()))
    assert ("default/client:41000 (ID:4003) -> 10.200.2.53:53 (ID:4004) dns-request FORWARDED "
            "(DNS Query api.github.com. A)") in format_flow(observer_pb2.GetFlowsResponse(flow=req))
    assert "default/client:41000 (ID:4003) <- 10.200.2.53:53 (ID:4004) dns-response FORWARDED" in format_flow(
        observer_pb2.GetFlowsResponse(flow=resp))
    (denied,) = parser().flows(L7Event.from_record(kafka_record(verdict="DENIED", error_code=29)))
    assert ("default/empire-hq:40100 (ID:4001) -> default/kafka:9092 (ID:4002) kafka-request DROPPED "
            "(Kafka request produce correlation id 7 topic 'deathstar-plans')") in format_flow(
        observer_pb2.GetFlowsResponse(flow=denied))


# -- Hubble metrics -----------------------------------------------------------------------


def test_dns_metrics_as_hubbles_dns_handler():
    m = HubbleMetrics(["flow", "dns"])
    p = parser()
    for rec in (dns_record(), dns_record(ips=(GITHUB, "140.82.121.7")),
                dns_record(verdict="DENIED", query="evil.example.", rcode=5, ips=()),
                dns_record(verdict="ERROR", rcode=2, ips=()), record()):
        for f in p.flows(L7Event.from_record(rec)):
            m.observe(f)

    def value(name, **labels):
        return m.registry.get_sample_value(name, labels) or 0.0

    assert value("hubble_dns_queries_total", rcode="", qtypes="A", ips_returned="0") == 3
    assert value("hubble_dns_queries_total", rcode="Policy denied", qtypes="A", ips_returned="0") == 1
    assert value("hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="1") == 1
    assert value("hubble_dns_responses_total", rcode="No Error", qtypes="A", ips_returned="2") == 1
    assert value("hubble_dns_responses_total", rcode="Server Failure", qtypes="A", ips_returned="0") == 1
    assert value("hubble_dns_response_types_total", type="A", qtypes="A") == 3
    assert value("hubble_flows_processed_total", type="L7", subtype="", verdict="DROPPED") == 1
    assert m.kafka_requests is None and m.http_requests is None


def test_kafka_metrics_count_each_topic_once_with_its_code():
    m = HubbleMetrics(["kafka", "http"])
    p = parser()
    for rec in (kafka_record(), kafka_record(topic="empire-announce"), kafka_record(),
                kafka_record(verdict="DENIED", error_code=29, direction="egress"),
                kafka_record(api_key="apiversions", topic=""), kafka_record(error_code=None),
                kafka_record(topic="empire-announce", error_code=3)):
        for f in p.flows(L7Event.from_record(rec)):
            m.observe(f)

    def value(name, **labels):
        return m.registry.get_sample_value(name, labels) or 0.0

    assert value("hubble_kafka_requests_total", topic="deathstar-plans", api_key="produce", error_code="0",
                 reporter="server") == 3  # acks=0 too: counted, with no duration
    assert value("hubble_kafka_requests_total", topic="empire-announce", api_key="produce", error_code="3",
                 reporter="server") == 1
    assert value("hubble_kafka_requests_total", topic="empire-announce", api_key="produce", error_code="0",
                 reporter="server") == 1
    assert value("hubble_kafka_requests_total", topic="deathstar-plans", api_key="produce", error_code="29",
                 reporter="client") == 1
    assert value("hubble_kafka_requests_total", topic="", api_key="apiversions", error_code="0",
                 reporter="server") == 1
    assert value("hubble_kafka_request_duration_seconds_count", topic="deathstar-plans", api_key="produce",
                 reporter="server") == 2
    assert value("hubble_kafka_request_duration_seconds_sum", topic="deathstar-plans", api_key="produce",
                 reporter="server") == pytest.approx(0.006)
    assert value("hubble_http_requests_total", method="GET", protocol="HTTP/1.1", reporter="server") == 0


# -- the agent's path: a record line -> EventHub -> HubblePart -> GetFlows ------------------


def test_records_reach_getflows_with_names_and_l7_filters():
    cache = DNSCache()
    cache.update(14, "api.github.com", [GITHUB], 300, T0)
    agent = SimpleNamespace(endpoints=None, parts={}, identities=None, fqdn=cache)
    sockdir = Path(tempfile.mkdtemp(prefix="l7kd-", dir="/tmp"))  # sun_path holds 107 bytes
    to_github = record(direction="egress", endpoint=14, url="https://api.github.com/",
                       source={"ip": POD, "port": 42000, "identity": POD_ID},
                       destination={"ip": GITHUB, "port": 443, "identity": WORLD})
    lines = [json.dumps(r).encode() + b"\n" for r in (
        dns_record(), dns_record(verdict="DENIED", query="evil.example.", rcode=5, ips=()),
        kafka_record(verdict="DENIED", error_code=29), to_github)]

    async def run():
        hub = EventHub(QuietReader())
        part = HubblePart(hub, AgentEndpointLookup(agent), node_name="default/node1",
                          socket_path=sockdir / "hubble.sock", event_types=frozenset({"drop"}))
        await hub.start()
        await part.start()
        channel = grpc.aio.insecure_channel(f"unix:{part.server.socket_path}")
        try:
            for line in lines:
                hub.publish(parse_record(line))
            for _ in range(1000):  # the reader task runs on this loop: let it take the events
                if part.ring.seen_flows >= 6:
                    break
                await asyncio.sleep(0.01)
            assert part.ring.seen_flows == 6 and part.status()["parse_errors"] == 0
            stub = observer_pb2_grpc.ObserverStub(channel)

            async def summaries(*filters):
                req = observer_pb2.GetFlowsRequest(number=20, whitelist=list(filters))
                return [r.flow.Summary async for r in stub.GetFlows(req) if r.HasField("flow")]

            assert await summaries(flow_pb2.FlowFilter(protocol=["dns"], verdict=[flow_pb2.DROPPED])) == [
                "DNS Query evil.example. A"]
            assert await summaries(flow_pb2.FlowFilter(dns_query=["github"], reply=[True])) == [
                'DNS Answer "140.82.121.6" TTL: 300 (Proxy api.github.com. A)']
            assert await summaries(flow_pb2.FlowFilter(protocol=["kafka"])) == [
                "Kafka request produce correlation id 7 topic 'deathstar-plans'"]
            # names from the agent's FQDN cache, through the part's own parser
            assert await summaries(flow_pb2.FlowFilter(destination_fqdn=["*.github.com"])) == [
                "HTTP/1.1 GET https://api.github.com/"]
        finally:
            await channel.close()
            await part.stop()
            await hub.stop()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
