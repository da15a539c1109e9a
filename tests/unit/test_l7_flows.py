"""L7 events (the proxy's records) as `pilus monitor` lines and as Hubble flows: the
L7Event -> Flow conversion (Cilium's seven parser: request/response, event type 129,
DENIED -> DROPPED + POLICY_DENIED, both ends' labels), Hubble's http filters and
metrics on them, the hub -> HubblePart -> GetFlows path, and the monitor's format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from pilus.cli.monitor import TYPE_CHOICES, IdentityNames
from pilus.cli.observe import format_flow
from pilus.hubble.filters import FlowMatcher, compile_filter
from pilus.hubble.flows import MESSAGE_TYPE_ACCESS_LOG, FlowParser
from pilus.hubble.lookup import EndpointDetails, StaticLookup
from pilus.hubble.metrics import HubbleMetrics
from pilus.hubble.part import HubblePart
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc
from pilus.observer.format import event_record, format_event
from pilus.observer.l7 import L7Event
from pilus.observer.monitor import EventHub

XWING, DEATHSTAR = "10.200.1.2", "10.200.1.3"
ALLIANCE, EMPIRE = 1234, 5678
LOOKUP = StaticLookup(
    [EndpointDetails(567, EMPIRE, "default", "deathstar", ("k8s:class=deathstar", "k8s:org=empire"), DEATHSTAR)],
    {ALLIANCE: ["k8s:org=alliance", "k8s:class=xwing"]})
T0 = 1_700_000_000.0


def record(verdict="FORWARDED", method="GET", path="/v1/", status=200, direction="ingress", **kw) -> dict:
    r = {"time": T0, "listener": "ingress", "direction": direction, "endpoint": 567,
         "source": {"ip": XWING, "port": 40000, "identity": ALLIANCE},
         "destination": {"ip": DEATHSTAR, "port": 80, "identity": EMPIRE},
         "protocol": "HTTP/1.1", "method": method, "url": f"http://deathstar{path}", "host": "deathstar",
         "path": path, "status": status, "grpc_status": None, "verdict": verdict, "latency_ns": 2_500_000,
         "header_mismatches": []}
    r.update(kw)
    return r


def event(**kw) -> L7Event:
    return L7Event.from_record(record(**kw))


def parser() -> FlowParser:
    return FlowParser(LOOKUP, node_name="default/node1")


# -- L7Event -> Flow ----------------------------------------------------------------------


def test_forwarded_request_is_a_request_and_a_response():
    req, resp = parser().flows(event())
    for f in (req, resp):
        assert f.Type == flow_pb2.L7 and f.event_type.type == MESSAGE_TYPE_ACCESS_LOG == 129
        assert f.verdict == flow_pb2.FORWARDED and f.traffic_direction == flow_pb2.INGRESS
        assert (f.l7.http.method, f.l7.http.url, f.l7.http.protocol) == ("GET", "http://deathstar/v1/", "HTTP/1.1")
        assert not f.l7.http.headers  # headers may carry secrets: never in a flow
        assert f.node_name == "default/node1"
    assert req.l7.type == flow_pb2.REQUEST and req.l7.http.code == 0 and req.l7.latency_ns == 0
    assert req.is_reply.value is False
    assert (req.IP.source, req.l4.TCP.source_port, req.IP.destination, req.l4.TCP.destination_port) == (
        XWING, 40000, DEATHSTAR, 80)
    assert (req.source.identity, list(req.source.labels)) == (ALLIANCE, ["k8s:class=xwing", "k8s:org=alliance"])
    assert (req.destination.ID, req.destination.pod_name, req.destination.namespace) == (567, "deathstar", "default")
    assert list(req.destination.labels) == ["k8s:class=deathstar", "k8s:org=empire"]
    assert req.Summary == "HTTP/1.1 GET http://deathstar/v1/"
    # the response goes back: ends swapped, the code and latency
    assert resp.l7.type == flow_pb2.RESPONSE and resp.is_reply.value is True
    assert (resp.l7.http.code, resp.l7.latency_ns) == (200, 2_500_000)
    assert (resp.IP.source, resp.source.ID, resp.IP.destination, resp.destination.identity) == (
        DEATHSTAR, 567, XWING, ALLIANCE)
    assert resp.Summary == "HTTP/1.1 200 2ms (GET http://deathstar/v1/)"
    # the request came latency_ns before the record was written
    assert resp.time.seconds == int(T0) and req.time.ToNanoseconds() == int(T0 * 1e9) - 2_500_000


def test_denied_request_is_dropped_policy_denied():
    (f,) = parser().flows(event(verdict="DENIED", method="PUT", path="/v1/exhaust-port", status=403))
    assert f.l7.type == flow_pb2.REQUEST and f.verdict == flow_pb2.DROPPED
    assert f.drop_reason_desc == flow_pb2.POLICY_DENIED
    assert (f.l7.http.code, f.l7.http.method) == (403, "PUT")
    assert f.Summary == "HTTP/1.1 PUT http://deathstar/v1/exhaust-port"


def test_error_and_egress():
    flows = parser().flows(event(verdict="ERROR", status=502, direction="egress"))
    assert [f.verdict for f in flows] == [flow_pb2.ERROR, flow_pb2.ERROR]
    assert {f.traffic_direction for f in flows} == {flow_pb2.EGRESS}
    # an error before any answer (status 0): the request only
    assert len(parser().flows(event(verdict="ERROR", status=0))) == 1


def test_field_numbers_on_the_wire_are_hubbles():
    assert flow_pb2.Flow.DESCRIPTOR.fields_by_name["l7"].number == 15
    layer7 = flow_pb2.Layer7.DESCRIPTOR.fields_by_name
    assert (layer7["type"].number, layer7["latency_ns"].number, layer7["http"].number) == (1, 2, 101)
    http = flow_pb2.HTTP.DESCRIPTOR.fields_by_name
    assert [http[n].number for n in ("code", "method", "url", "protocol", "headers")] == [1, 2, 3, 4, 5]
    _, resp = parser().flows(event())
    again = flow_pb2.Flow.FromString(resp.SerializeToString())
    assert again.l7.http.code == 200 and again.Type == flow_pb2.L7


# -- filters, metrics, hubble observe's line ------------------------------------------------


def test_http_filters_select_l7_flows():
    flows = (parser().flows(event()) + parser().flows(event(verdict="DENIED", method="PUT",
                                                           path="/v1/exhaust-port", status=403)))

    def pick(**ff):
        pred = compile_filter(flow_pb2.FlowFilter(**ff))
        return [(f.l7.http.method, flow_pb2.L7FlowType.Name(f.l7.type)) for f in flows if pred(f)]

    assert pick(http_method=["put"]) == [("PUT", "REQUEST")]
    assert pick(http_path=["^/v1/$"]) == [("GET", "REQUEST"), ("GET", "RESPONSE")]
    assert pick(http_status_code=["4+"]) == [("PUT", "REQUEST")]
    assert pick(http_status_code=["200"]) == [("GET", "RESPONSE")]
    assert pick(event_type=[flow_pb2.EventTypeFilter(type=129)], verdict=[flow_pb2.DROPPED]) == [("PUT", "REQUEST")]
    assert pick(protocol=["http"], source_label=["k8s:org=empire"]) == [("GET", "RESPONSE")]
    assert len(pick(destination_pod=["default/deathstar"])) == 2
    assert FlowMatcher([flow_pb2.FlowFilter(http_method=["GET"])], [flow_pb2.FlowFilter(reply=[True])])(flows[0])


def test_observe_compact_line():
    req, resp = parser().flows(event())
    (denied,) = parser().flows(event(verdict="DENIED", method="PUT", path="/v1/exhaust-port", status=403))
    line = format_flow(observer_pb2.GetFlowsResponse(flow=denied))
    assert ("10.200.1.2:40000 (ID:1234) -> default/deathstar:80 (ID:5678) http-request DROPPED "
            "(HTTP/1.1 PUT http://deathstar/v1/exhaust-port)") in line
    line = format_flow(observer_pb2.GetFlowsResponse(flow=resp))
    # a reply is printed client first, arrow back, as hubble does
    assert "10.200.1.2:40000 (ID:1234) <- default/deathstar:80 (ID:5678) http-response FORWARDED" in line


def test_http_metrics():
    m = HubbleMetrics(["flow", "http"])
    for f in parser().flows(event()) + parser().flows(event(verdict="DENIED", method="PUT", status=403)):
        m.observe(f)

    def value(name, **labels):
        return m.registry.get_sample_value(name, labels) or 0.0

    assert value("hubble_http_requests_total", method="GET", protocol="HTTP/1.1", reporter="server") == 1
    assert value("hubble_http_requests_total", method="PUT", protocol="HTTP/1.1", reporter="server") == 1
    assert value("hubble_http_responses_total", method="GET", protocol="HTTP/1.1", status="200",
                 reporter="server") == 1
    assert value("hubble_http_responses_total", method="PUT", protocol="HTTP/1.1", status="403",
                 reporter="server") == 1
    assert value("hubble_http_request_duration_seconds_count", method="GET", reporter="server") == 1
    assert value("hubble_flows_processed_total", type="L7", subtype="", verdict="DROPPED") == 1
    assert HubbleMetrics(["flow"]).http_requests is None


# -- the agent's path: EventHub.publish -> HubblePart -> GetFlows --------------------------


class QuietReader:
    """A ring buffer that never has datapath events (L7 events come by publish)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.records, self.records_by_type, self.masks = 0, {}, []

    def fileno(self) -> int:
        return self._r

    def poll(self, timeout_ms: int = 0, want=None) -> list:
        return []

    def set_listen_mask(self, mask: int) -> None:
        self.masks.append(mask)

    def lost(self) -> int:
        return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._r)
            os.close(self._w)


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="l7fl-", dir="/tmp"))  # short: sun_path holds 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_published_l7_events_become_flows_with_datapath_types_only(sockdir):
    async def run():
        reader = QuietReader()
        hub = EventHub(reader)
        # the agent's default --hubble-monitor-events has no l7: the part takes L7 anyway
        part = HubblePart(hub, LOOKUP, node_name="default/node1", socket_path=sockdir / "hubble.sock",
                          event_types=frozenset({"drop", "policy-verdict"}))
        await hub.start()
        await part.start()
        channel = grpc.aio.insecure_channel(f"unix:{part.server.socket_path}")
        try:
            hub.publish(event())
            hub.publish(event(verdict="DENIED", method="PUT", path="/v1/exhaust-port", status=403))
            for _ in range(1000):  # the reader task runs on this loop: let it take the events
                if part.ring.seen_flows >= 3:
                    break
                await asyncio.sleep(0.01)
            assert part.ring.seen_flows == 3
            stub = observer_pb2_grpc.ObserverStub(channel)
            req = observer_pb2.GetFlowsRequest(number=10, whitelist=[flow_pb2.FlowFilter(http_method=["PUT"])])
            got = [r.flow async for r in stub.GetFlows(req) if r.HasField("flow")]
            assert [(f.l7.http.method, f.verdict, f.drop_reason_desc) for f in got] == [
                ("PUT", flow_pb2.DROPPED, flow_pb2.POLICY_DENIED)]
            assert part.status()["parse_errors"] == 0
        finally:
            await channel.close()
            await part.stop()
            await hub.stop()

    asyncio.run(run())


# -- pilus monitor --type l7 ------------------------------------------------------------------


class FakeClient:
    def __init__(self) -> None:
        self.calls = 0

    def list_identities(self):
        self.calls += 1
        return [{"id": ALLIANCE, "labels": ["k8s:org=alliance", "k8s:class=xwing"]},
                {"id": EMPIRE, "labels": ["k8s:org=empire", "k8s:class=deathstar"]}]


def test_monitor_line_is_cilium_dbg_access_log_format():
    names = IdentityNames(FakeClient())
    rec = json.loads(json.dumps(event_record(event(verdict="DENIED", method="PUT", path="/v1/exhaust-port",
                                                    status=403))))
    assert format_event(rec, labels=names) == (
        "<- Request http from 0 ([k8s:class=xwing k8s:org=alliance]) to 567 "
        "([k8s:class=deathstar k8s:org=empire]), identity 1234->5678, verdict Denied "
        "PUT http://deathstar/v1/exhaust-port => 403")
    egress = event_record(event(direction="egress"))
    assert format_event(egress).startswith("-> Request http from 567 ([]) to 0 ([]), identity 1234->5678, "
                                           "verdict Forwarded GET http://deathstar/v1/ => 200")
    assert "latency 2500000 ns" in format_event(egress, verbose=1)
    assert "l7" in TYPE_CHOICES


def test_monitor_record_and_mismatches_carry_no_values():
    rec = event_record(event(header_mismatches=[{"name": "X-Token", "action": "REPLACE"}], time=T0))
    assert rec["type"] == "l7" and rec["header_mismatches"] == [{"name": "X-Token", "action": "REPLACE"}]
    assert (rec["src_ip"], rec["dport"], rec["dst_ep"], rec["record_time"]) == (XWING, 80, 567, T0)
    assert format_event(rec).endswith("=> 200 header-mismatch X-Token:REPLACE")


def test_identity_names_asks_once_per_unknown_identity():
    client = FakeClient()
    names = IdentityNames(client, min_refresh_s=3600)
    assert names(ALLIANCE) == ["k8s:class=xwing", "k8s:org=alliance"]
    assert names(EMPIRE) and names(99) == [] and names(98) == []
    assert client.calls == 1  # unknown identities do not hammer the agent
