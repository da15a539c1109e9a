"""Typed datapath events (pilus.datapath.events) -> Hubble ``flow.Flow`` messages.

Pure: an event, the lookup for both ends (pilus.hubble.lookup) and the node's name in,
a Flow out; no I/O. In two steps: ``capture`` (``capture_l7``) asks the lookup, when the
event comes, and derives the facts the metrics count (``FlowFacts``, ``L7Facts``);
``build`` makes the Flow from that capture alone, when a reader first asks for it.
The mapping follows Hubble's L3/L4 parser (Cilium pkg/hubble/parser/threefour):

| flow field | drop | trace | policy verdict |
| --- | --- | --- | --- |
| verdict | DROPPED | FORWARDED | DROPPED (verdict < 0), REDIRECTED (proxy port), AUDIT, else FORWARDED |
| drop_reason, drop_reason_desc | the reason | - | -verdict when denied |
| event_type (type, sub_type) | 1, reason | 4, observation point | 5, 0 |
| trace_observation_point | - | the point (to-endpoint is TO_ENDPOINT = 101) | - |
| trace_reason, is_reply | - | the CT state; reply when it is REPLY (unset when unknown) | -, false |
| traffic_direction | EGRESS when the dropping endpoint is the source, else INGRESS | (1) | the verdict's |
| policy_match_type, proxy_port | - | - | the verdict's |

(1) EGRESS when the reporting endpoint is the packet's source XOR the packet is a reply,
else INGRESS; unknown when the CT state is.

L7 events (the proxies' records, pilus.observer.l7) follow Hubble's L7 parser (Cilium
pkg/hubble/parser/seven): Type L7, event_type 129 (MessageTypeAccessLog), verdict
FORWARDED, DROPPED (DENIED, with drop_reason_desc POLICY_DENIED) or ERROR; a record is a
REQUEST flow (client -> server) and, once answered, a RESPONSE flow (server -> client,
is_reply, latency_ns), as Cilium's access log makes them:

- http: l7.http {code, method, url, protocol}, no headers (they may carry secrets). The
  REQUEST has no code (a denial: the 403 sent); a RESPONSE when a status was sent.
  Summary ``HTTP/1.1 GET url`` / ``HTTP/1.1 200 2ms (GET url)``.
- kafka (one record per (request, topic)): l7.kafka {error_code, api_version, api_key,
  correlation_id, topic}; both flows carry the code the client got (Hubble's parser
  leaves a request's 0: its metrics then count every request as error 0); a RESPONSE
  when FORWARDED and answered (not a Produce with acks=0). Summary ``Kafka request produce correlation id 7
  topic 'deathstar-plans'`` / ``Kafka response ... return code 0``.
- dns: l7.dns {query, ips, ttl, cnames, observation_source, rcode, qtypes, rrtypes}. The
  REQUEST has query, qtypes and source (denied: the REFUSED rcode too); a RESPONSE unless
  DENIED (ERROR: the SERVFAIL the pod got). Summary ``DNS Query api.github.com. A`` /
  ``DNS Answer "1.2.3.4" TTL: 300 (Proxy api.github.com. A)`` (an rcode: ``RCode: Query
  Refused``).

A DNS record over UDP has l4.UDP, the others l4.TCP. ``source_names`` /
``destination_names`` (every flow) are the DNS names of the address that ``dns_names(ip)``
returns (the agent: its FQDN cache), sorted.

Endpoints: the datapath's identity wins (it is what policy saw); the endpoint behind
the IP (lookup) gives ID, namespace, pod name and labels; an address that is no known
endpoint gets its identity's labels (``reserved:world``, a CIDR identity's labels).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue

import pilus
from pilus.datapath import abi
from pilus.datapath.events import DropEvent, Event, PacketSummary, PolicyVerdictEvent, TraceEvent
from pilus.datapath.reasons import TRACE_POINTS
from pilus.hubble.lookup import EndpointDetails, EndpointLookup, labels_of
from pilus.hubble.protos import flow_pb2
from pilus.observer.l7 import DNSInfo, KafkaInfo, L7Event

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806

#: Cilium's monitor message types, as Flow.event_type.type carries them
MESSAGE_TYPE_DROP = abi.NOTIFY_DROP  # 1
MESSAGE_TYPE_TRACE = abi.NOTIFY_TRACE  # 4
MESSAGE_TYPE_POLICY_VERDICT = abi.NOTIFY_POLICY_VERDICT  # 5
MESSAGE_TYPE_ACCESS_LOG = 129  # L7 records

#: DNS rcodes as Hubble names them (its summaries and dns metrics)
RCODE_NAMES = {0: "No Error", 1: "Format Error", 2: "Server Failure", 3: "Non-Existent Domain",
               4: "Not Implemented", 5: "Query Refused", 6: "Name Exists when it should not",
               7: "RR Set Exists when it should not", 8: "RR Set that should exist does not",
               9: "Not Authorized", 10: "Name not contained in zone", 11: "DSO-TYPE Not Implemented",
               16: "Bad OPT Version", 17: "Key not recognized", 18: "Signature out of time window",
               19: "Bad TKEY Mode", 20: "Duplicate key name", 21: "Algorithm not supported",
               22: "Bad Truncation", 23: "Bad/missing Server Cookie"}

#: the datapath's observation point -> TraceObservationPoint (by the point's name, so
#: "to-endpoint" (0) becomes TO_ENDPOINT (101))
OBSERVATION_POINTS: dict[int, int] = {
    point: flow_pb2.TraceObservationPoint.Value(name.upper().replace("-", "_"))
    for point, name in TRACE_POINTS.items()
}

#: the datapath's CT state (trace reason without the encryption bit) -> TraceReason
TRACE_REASONS: dict[int, int] = {
    0: flow_pb2.NEW,
    1: flow_pb2.ESTABLISHED,
    2: flow_pb2.REPLY,
    3: flow_pb2.RELATED,
    4: flow_pb2.REOPENED,
    # 5: unknown
    6: flow_pb2.SRV6_ENCAP,
    7: flow_pb2.SRV6_DECAP,
    8: flow_pb2.ENCRYPT_OVERLAY,
}
TRACE_REASON_ENCRYPT_MASK = 0x80

#: gopacket's ICMPv4 type names, as Hubble's summaries print them
ICMPV4_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 4: "SourceQuench", 5: "Redirect",
                8: "EchoRequest", 9: "RouterAdvertisement", 10: "RouterSolicitation",
                11: "TimeExceeded", 12: "ParameterProblem", 13: "TimestampRequest",
                14: "TimestampReply"}
#: TCPFlags field names in the order Hubble's summary lists them
TCP_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")


def _to_ns(seconds: float) -> int:
    # split first: seconds * 1e9 as a float would lose the nanoseconds' last digits
    whole = int(seconds // 1)
    return whole * 1_000_000_000 + min(round((seconds - whole) * 1e9), 999_999_999)


def timestamp(seconds: float) -> Timestamp:
    # split first: seconds * 1e9 as a float would lose the nanoseconds' last digits
    whole = int(seconds // 1)
    nanos = min(round((seconds - whole) * 1e9), 999_999_999)
    return Timestamp(seconds=whole, nanos=nanos)


def lost_event(source: int, count: int, first: float, last: float) -> flow_pb2.LostEvent:
    """A LostEvent: ``count`` events of ``source`` (LostEventSource) lost between the two times."""
    return flow_pb2.LostEvent(source=source, num_events_lost=count,
                              first=timestamp(first), last=timestamp(last))


_TCP_FLAG_FIELDS = frozenset(flow_pb2.TCPFlags.DESCRIPTOR.fields_by_name)


def tcp_flags(names: Iterable[str]) -> flow_pb2.TCPFlags:
    return flow_pb2.TCPFlags(**{n: True for n in names if n in _TCP_FLAG_FIELDS})


def new_uuid() -> str:
    """A random (version 4) UUID as text; uuid.uuid4() without its object (per flow)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def summary(p: PacketSummary) -> str:
    """Hubble's Summary of an L3/L4 flow: ``TCP Flags: SYN, ACK``, ``UDP``, ``ICMPv4 EchoRequest``."""
    if p.ethertype == ETH_P_ARP:
        return "ARP"
    if p.src_ip is None:
        return "Ethernet" if p.ethertype is not None else "unknown"
    if p.proto == "TCP":
        names = set(p.tcp_flags)
        return "TCP Flags: " + ", ".join(n for n in TCP_FLAG_ORDER if n in names)
    if p.proto == "UDP":
        return "UDP"
    if p.proto == "ICMP":
        return "ICMPv4 " + ICMPV4_TYPES.get(p.icmp_type or 0, f"Type{p.icmp_type}")
    if p.proto == "SCTP":
        return "SCTP"
    return "IPv4"


#: a policy verdict's protocol number -> the Layer4 oneof its flow carries
_POLICY_PROTOS = {6: "TCP", 17: "UDP", 132: "SCTP", 1: "ICMPv4"}


def l4_source(event: Event) -> tuple[str, bool] | None:
    """The Layer4 oneof a flow of the event carries (TCP, UDP, SCTP, ICMPv4) and whether
    the captured packet gives it (else: a policy verdict without a usable capture, whose
    policy says protocol and port); None without one."""
    p = event.packet
    if p.proto in ("TCP", "UDP", "SCTP") and p.sport is not None:
        return p.proto, True
    if p.proto == "ICMP" and p.icmp_type is not None:
        return "ICMPv4", True
    if isinstance(event, PolicyVerdictEvent) and event.policy_proto in _POLICY_PROTOS:
        return _POLICY_PROTOS[event.policy_proto], False
    return None


def layer4(event: Event) -> flow_pb2.Layer4 | None:
    source = l4_source(event)
    if source is None:
        return None
    kind, from_packet = source
    if not from_packet:  # the policy's view: protocol, destination port or ICMP type
        dport = event.policy_dport
        if kind == "ICMPv4":
            return flow_pb2.Layer4(ICMPv4=flow_pb2.ICMPv4(type=dport))
        return flow_pb2.Layer4(**{kind: getattr(flow_pb2, kind)(destination_port=dport)})
    p = event.packet
    if kind == "ICMPv4":
        return flow_pb2.Layer4(ICMPv4=flow_pb2.ICMPv4(type=p.icmp_type, code=p.icmp_code or 0))
    if kind == "TCP":
        return flow_pb2.Layer4(TCP=flow_pb2.TCP(source_port=p.sport, destination_port=p.dport or 0,
                                                flags=tcp_flags(p.tcp_flags)))
    return flow_pb2.Layer4(**{kind: getattr(flow_pb2, kind)(source_port=p.sport, destination_port=p.dport or 0)})


class FlowParser:
    """Events of one node -> Flows. ``cluster_name`` fills Endpoint.cluster_name of the
    endpoints the lookup knows (unless it names another cluster)."""

    def __init__(self, lookup: EndpointLookup, *, node_name: str, cluster_name: str = "default",
                 dns_names: Callable[[str], Iterable[str]] | None = None) -> None:
        self.lookup = lookup
        # ip -> DNS names (the FQDN cache); default: the lookup's dns_names, if it has one
        self.dns_names = dns_names if dns_names is not None else getattr(lookup, "dns_names", None)
        # (ip, port, proto) -> (namespace, name) of the service with that frontend, if any
        self.service_at = getattr(lookup, "service_at", None)
        self.node_name = node_name
        self.cluster_name = cluster_name
        self.emitter = flow_pb2.Emitter(name="pilus", version=pilus.__version__)

    def flows(self, event: Event | L7Event) -> list[flow_pb2.Flow]:
        """Every Flow of an event: one per datapath event, one or two per L7 record."""
        if isinstance(event, L7Event):
            return self.l7_flows(event)
        f = self.parse(event)
        return [f] if f is not None else []

    def l7_flows(self, ev: L7Event) -> list[flow_pb2.Flow]:
        return [self.build(cap) for cap in self.capture_l7(ev)]

    def capture_l7(self, ev: L7Event) -> list[Capture]:
        """The REQUEST capture of an L7 record and, once answered, its RESPONSE capture."""
        kinds = [flow_pb2.REQUEST] + ([flow_pb2.RESPONSE] if self._has_response(ev) else [])
        record_ns = _to_ns(ev.record_time if ev.record_time is not None else
                           ev.time if ev.time is not None else time.time())
        verdict = {"FORWARDED": flow_pb2.FORWARDED, "DENIED": flow_pb2.DROPPED}.get(ev.verdict, flow_pb2.ERROR)
        direction = flow_pb2.INGRESS if ev.direction == "ingress" else flow_pb2.EGRESS
        facts = FlowFacts(MESSAGE_TYPE_ACCESS_LOG, 0, verdict,
                          flow_pb2.POLICY_DENIED if ev.verdict == "DENIED" else 0,
                          "UDP" if ev.transport == "udp" else "TCP", (), direction, 0)
        client = (self._resolve(ev.source.ip, ev.source.identity), self._names(ev.source.ip))
        server = (self._resolve(ev.destination.ip, ev.destination.identity), self._names(ev.destination.ip))
        out = []
        for kind in kinds:
            response = kind == flow_pb2.RESPONSE
            (src, src_names), (dst, dst_names) = (server, client) if response else (client, server)
            src_peer, dst_peer = (ev.destination, ev.source) if response else (ev.source, ev.destination)
            # the record is written when the response ended: the request came latency_ns earlier
            time_ns = record_ns if response else max(record_ns - ev.latency_ns, 0)
            services = self._services(src_peer.ip, src_peer.port, dst_peer.ip, dst_peer.port, facts.protocol)
            out.append(Capture(ev, time_ns, src, dst, src_names, dst_names, facts, l7_facts(ev, kind), services))
        return out

    @staticmethod
    def _has_response(ev: L7Event) -> bool:
        # a denial is its request only (what the proxy answered is on it); HTTP: a status
        # was sent; Kafka: the broker's answer came back; DNS: an answer (SERVFAIL on error)
        if ev.verdict == "DENIED":
            return False
        if ev.kafka is not None:  # no code: nothing came back (acks=0, a failed broker)
            return ev.verdict == "FORWARDED" and ev.kafka.error_code is not None
        if ev.l7 == "dns":
            return True
        return bool(ev.status)

    def _build_l7(self, cap: Capture) -> flow_pb2.Flow:
        ev, facts, kind = cap.event, cap.facts, cap.l7.kind
        response = kind == flow_pb2.RESPONSE
        src, dst = (ev.destination, ev.source) if response else (ev.source, ev.destination)
        f = flow_pb2.Flow(uuid=new_uuid(), Type=flow_pb2.L7, node_name=self.node_name)
        f.emitter.CopyFrom(self.emitter)
        f.time.seconds, f.time.nanos = divmod(cap.time_ns, 1_000_000_000)
        f.IP.source, f.IP.destination, f.IP.ipVersion = src.ip, dst.ip, flow_pb2.IPv4
        l4 = f.l4.UDP if facts.protocol == "UDP" else f.l4.TCP
        l4.source_port, l4.destination_port = src.port, dst.port
        _write_endpoint(f.source, cap.src)
        _write_endpoint(f.destination, cap.dst)
        f.source_names.extend(cap.src_names)
        f.destination_names.extend(cap.dst_names)
        _write_services(f, cap.services)
        f.l7.type = kind
        if response:
            f.l7.latency_ns = ev.latency_ns
        if ev.kafka is not None:
            f.Summary = self._l7_kafka(f, ev.kafka, ev.verdict, response)
        elif ev.dns is not None:
            f.Summary = self._l7_dns(f, ev.dns, ev.verdict, response)
        else:
            f.Summary = self._l7_http(f, ev, response)
        f.event_type.type = facts.etype
        f.verdict = facts.verdict
        if facts.drop_reason:
            f.drop_reason_desc = facts.drop_reason
        f.traffic_direction = facts.direction
        f.is_reply.CopyFrom(BoolValue(value=response))
        f.reply = response
        return f

    @staticmethod
    def _l7_http(f: flow_pb2.Flow, ev: L7Event, response: bool) -> str:
        http = f.l7.http
        http.method, http.url, http.protocol = ev.method, ev.url or ev.path, ev.protocol
        if response or ev.verdict == "DENIED":
            http.code = ev.status
        request = f"{ev.method} {ev.url or ev.path}"
        return (f"{ev.protocol} {ev.status} {ev.latency_ns // 1_000_000}ms ({request})" if response
                else f"{ev.protocol} {request}")

    @staticmethod
    def _l7_kafka(f: flow_pb2.Flow, k: KafkaInfo, verdict: str, response: bool) -> str:
        pk = f.l7.kafka
        pk.api_version, pk.api_key, pk.correlation_id, pk.topic = k.api_version, k.api_key, k.correlation_id, k.topic
        # Hubble's parser leaves a request's code 0; the record is written once answered, so
        # the request carries the code the client got (its metrics count requests)
        pk.error_code = k.error_code or 0
        if response:
            return (f"Kafka response {k.api_key} correlation id {k.correlation_id} topic '{k.topic}' "
                    f"return code {k.error_code}")
        return f"Kafka request {k.api_key} correlation id {k.correlation_id} topic '{k.topic}'"

    @staticmethod
    def _l7_dns(f: flow_pb2.Flow, d: DNSInfo, verdict: str, response: bool) -> str:
        pd = f.l7.dns
        pd.query, pd.observation_source = d.query, d.observation_source
        pd.qtypes.extend(d.qtypes)
        qtypes = ",".join(d.qtypes)
        if not response:
            if verdict == "DENIED":  # what the pod got instead of an answer (REFUSED)
                pd.rcode = d.rcode
            return f"DNS Query {d.query} {qtypes}"
        pd.ips.extend(d.ips)
        pd.ttl, pd.rcode = d.ttl, d.rcode
        pd.cnames.extend(d.cnames)
        pd.rrtypes.extend(d.rrtypes)
        if d.rcode:
            answer = f"RCode: {RCODE_NAMES.get(d.rcode, 'Unknown')}"
        else:
            parts = [json.dumps(",".join(d.ips))] if d.ips else []
            if d.cnames:
                parts.append("CNAMEs: " + json.dumps(",".join(d.cnames)))
            answer = " ".join(parts)
        source = "Proxy" if d.observation_source == "proxy" else "Query"
        return f"DNS Answer {answer} TTL: {d.ttl} ({source} {d.query} {qtypes})"

    def parse(self, event: Event) -> flow_pb2.Flow | None:
        """The Flow of a drop, trace or policy-verdict event (of an L7 event, its first
        flow); None for other records."""
        if isinstance(event, L7Event):
            return self.l7_flows(event)[0]
        cap = self.capture(event)
        return self.build(cap) if cap is not None else None

    def capture(self, event: Event) -> Capture | None:
        """What the Flow of a datapath event needs from the agent, taken now (the endpoint
        and the names behind an address may be gone when someone reads the flow), and the
        facts the metrics count; None for records that are no flows. ``build`` makes the
        Flow later, when a reader asks for it."""
        if not isinstance(event, DropEvent | TraceEvent | PolicyVerdictEvent):
            return None
        p = event.packet
        src = self._resolve(p.src_ip, event.src_identity)
        dst = self._resolve(p.dst_ip, event.dst_identity)
        time_ns = _to_ns(event.time if event.time is not None else time.time())
        source = l4_source(event)
        kind = source[0] if source is not None else ""
        if isinstance(event, DropEvent):
            etype, point, verdict, reason = MESSAGE_TYPE_DROP, 0, flow_pb2.DROPPED, event.reason
            direction = ((flow_pb2.EGRESS if event.source_ep == src.id else flow_pb2.INGRESS)
                         if event.source_ep else flow_pb2.TRAFFIC_DIRECTION_UNKNOWN)
            match = 0
        elif isinstance(event, TraceEvent):
            etype, verdict, reason = MESSAGE_TYPE_TRACE, flow_pb2.FORWARDED, 0
            point = OBSERVATION_POINTS.get(event.obs_point, flow_pb2.UNKNOWN_POINT)
            direction, match = _trace_direction(event, src.id), 0
        else:
            etype, point, verdict, reason = MESSAGE_TYPE_POLICY_VERDICT, 0, _policy_verdict(event), 0
            if verdict == flow_pb2.DROPPED:
                reason = event.drop_reason
            direction = {abi.POLICY_INGRESS: flow_pb2.INGRESS,
                         abi.POLICY_EGRESS: flow_pb2.EGRESS}.get(event.direction, flow_pb2.TRAFFIC_DIRECTION_UNKNOWN)
            match = event.match_type
        flags = tuple(p.tcp_flags) if source == ("TCP", True) else ()
        facts = FlowFacts(etype, point, verdict, reason, kind, flags, direction, match)
        services = self._services(p.src_ip, p.sport, p.dst_ip, p.dport, kind)  # no ports: none
        return Capture(event, time_ns, src, dst, self._names(p.src_ip), self._names(p.dst_ip), facts,
                       services=services)

    def build(self, cap: Capture) -> flow_pb2.Flow:
        """The Flow of a captured event or L7 record (pure: no lookups)."""
        if cap.l7 is not None:
            return self._build_l7(cap)
        event, facts = cap.event, cap.facts
        p = event.packet
        f = flow_pb2.Flow(uuid=new_uuid(), Type=flow_pb2.L3_L4, node_name=self.node_name, Summary=summary(p))
        f.emitter.CopyFrom(self.emitter)
        f.time.seconds, f.time.nanos = divmod(cap.time_ns, 1_000_000_000)
        if p.src_mac is not None:
            eth = f.ethernet
            eth.source, eth.destination = p.src_mac, p.dst_mac or ""
        if p.ethertype == ETH_P_IP and p.src_ip is not None:
            ip = f.IP
            ip.source, ip.destination, ip.ipVersion = p.src_ip, p.dst_ip or "", flow_pb2.IPv4
        l4 = layer4(event)
        if l4 is not None:
            f.l4.CopyFrom(l4)
        _write_endpoint(f.source, cap.src)
        _write_endpoint(f.destination, cap.dst)
        f.source_names.extend(cap.src_names)
        f.destination_names.extend(cap.dst_names)
        _write_services(f, cap.services)
        if event.ifindex:
            f.interface.index = event.ifindex
        f.verdict = facts.verdict
        f.event_type.type = facts.etype
        if facts.direction:
            f.traffic_direction = facts.direction
        if isinstance(event, DropEvent):
            f.event_type.sub_type = event.reason
            f.drop_reason = f.drop_reason_desc = event.reason  # open enum: a code without a name keeps its number
            if event.line:
                f.file.line = event.line
        elif isinstance(event, TraceEvent):
            f.event_type.sub_type, f.trace_observation_point = event.obs_point, facts.point
            self._trace(f, event)
        else:
            if facts.verdict == flow_pb2.DROPPED:
                f.drop_reason = f.drop_reason_desc = facts.drop_reason
            f.policy_match_type = event.match_type
            f.proxy_port = event.proxy_port
            f.is_reply.CopyFrom(BoolValue(value=False))
        return f

    # -- per event type ---------------------------------------------------------------

    @staticmethod
    def _trace(f: flow_pb2.Flow, ev: TraceEvent) -> None:
        reason = _trace_reason(ev)
        f.trace_reason = reason
        if ev.ct_reason & TRACE_REASON_ENCRYPT_MASK:
            f.IP.encrypted = True
        if reason == flow_pb2.TRACE_REASON_UNKNOWN:
            return  # neither reply nor direction is known
        is_reply = reason == flow_pb2.REPLY
        f.is_reply.CopyFrom(BoolValue(value=is_reply))
        f.reply = is_reply

    # -- endpoints ----------------------------------------------------------------------

    def _services(self, src_ip: str | None, sport: int | None, dst_ip: str | None, dport: int | None,
                  proto: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
        # Hubble's source_service / destination_service: the service whose frontend the address is
        at = self.service_at
        if at is None:
            return (None, None)
        return (at(src_ip, sport, proto) if src_ip and sport is not None else None,
                at(dst_ip, dport, proto) if dst_ip and dport is not None else None)

    def _names(self, ip: str | None) -> tuple[str, ...]:
        # Hubble's source_names / destination_names: what the FQDN cache knows of the address
        names = self.dns_names
        return tuple(sorted(names(ip) or ())) if names is not None and ip else ()

    def _resolve(self, ip: str | None, identity: int) -> Resolved:
        details = self.lookup.endpoint_by_ip(ip) if ip else None
        if details is None:
            return Resolved(identity, labels=tuple(labels_of(self.lookup, identity)))
        if not identity:
            identity = details.identity  # e.g. a trace, which carries the source's identity only
        labels = tuple(labels_of(self.lookup, identity)) if details.identity != identity else ()
        return Resolved(identity, details, labels or tuple(sorted(details.labels)),
                        details.cluster_name or self.cluster_name)


class Resolved(NamedTuple):
    """One end of a flow as the lookup knew it when the event came."""

    identity: int
    details: EndpointDetails | None = None
    labels: tuple[str, ...] = ()
    cluster_name: str = ""

    @property
    def id(self) -> int:
        """The local endpoint id (0: no endpoint, or a pod of another node)."""
        return self.details.id if self.details is not None else 0


class FlowFacts(NamedTuple):
    """What the metrics count of a flow, derived once (pilus.hubble.metrics)."""

    etype: int  # event_type.type (MESSAGE_TYPE_*)
    point: int  # a trace's trace_observation_point (0 for the others)
    verdict: int
    drop_reason: int  # drop_reason_desc (0: none)
    protocol: str  # the l4 oneof: TCP, UDP, ICMPv4, SCTP; "" without one
    tcp_flags: tuple[str, ...]
    direction: int  # traffic_direction (policy verdicts and drops)
    match_type: int  # policy_match_type


class L7Facts(NamedTuple):
    """What the http, dns and kafka metrics count of an L7 flow, derived once."""

    record: str  # http, dns, kafka
    kind: int  # REQUEST, RESPONSE
    latency_ns: int = 0  # a RESPONSE's
    method: str = ""  # http
    protocol: str = ""
    code: int = 0  # the status the client got (a REQUEST has one when denied)
    qtypes: str = ""  # dns: the query types, comma-joined
    rcode: int = 0
    ips: int = 0  # addresses in the answer
    rrtypes: tuple[str, ...] = ()
    topic: str = ""  # kafka
    api_key: str = ""
    error_code: int = 0


def l7_facts(ev: L7Event, kind: int) -> L7Facts:
    """An L7 record's facts as its REQUEST or RESPONSE flow carries them (FlowParser._l7_*)."""
    response = kind == flow_pb2.RESPONSE
    latency = ev.latency_ns if response else 0
    if ev.kafka is not None:
        k = ev.kafka
        return L7Facts("kafka", kind, latency, topic=k.topic, api_key=k.api_key, error_code=k.error_code or 0)
    if ev.dns is not None:
        d = ev.dns
        if not response:
            return L7Facts("dns", kind, latency, qtypes=",".join(d.qtypes),
                           rcode=d.rcode if ev.verdict == "DENIED" else 0)
        return L7Facts("dns", kind, latency, qtypes=",".join(d.qtypes), rcode=d.rcode, ips=len(d.ips),
                       rrtypes=tuple(d.rrtypes))
    code = ev.status if response or ev.verdict == "DENIED" else 0
    return L7Facts("http", kind, latency, method=ev.method, protocol=ev.protocol, code=code)


class Capture(NamedTuple):
    """A datapath event (FlowParser.capture) or one flow of an L7 record (capture_l7)
    with what its Flow needs from the agent."""

    event: Event | L7Event
    time_ns: int
    src: Resolved
    dst: Resolved
    src_names: tuple[str, ...]
    dst_names: tuple[str, ...]
    facts: FlowFacts
    l7: L7Facts | None = None
    services: tuple[tuple[str, str] | None, tuple[str, str] | None] = (None, None)  # (source, destination)


def _write_endpoint(ep: flow_pb2.Endpoint, r: Resolved) -> None:
    ep.identity = r.identity
    if r.details is not None:
        d = r.details
        ep.ID, ep.namespace, ep.pod_name, ep.cluster_name = d.id, d.namespace, d.pod_name, r.cluster_name
    ep.labels.extend(r.labels)


def _write_services(f: flow_pb2.Flow, services: tuple[tuple[str, str] | None, tuple[str, str] | None]) -> None:
    src, dst = services
    if src is not None:
        f.source_service.namespace, f.source_service.name = src
    if dst is not None:
        f.destination_service.namespace, f.destination_service.name = dst


def _trace_reason(ev: TraceEvent) -> int:
    return TRACE_REASONS.get(ev.ct_reason & ~TRACE_REASON_ENCRYPT_MASK, flow_pb2.TRACE_REASON_UNKNOWN)


def _trace_direction(ev: TraceEvent, src_id: int) -> int:
    # EGRESS when the reporting endpoint is the packet's source XOR the packet is a reply
    reason = _trace_reason(ev)
    if reason == flow_pb2.TRACE_REASON_UNKNOWN or not ev.source_ep or reason in (flow_pb2.SRV6_ENCAP,
                                                                              flow_pb2.SRV6_DECAP):
        return flow_pb2.TRAFFIC_DIRECTION_UNKNOWN
    from_source, is_reply = ev.source_ep == src_id, reason == flow_pb2.REPLY
    return flow_pb2.EGRESS if from_source != is_reply else flow_pb2.INGRESS


def _policy_verdict(ev: PolicyVerdictEvent) -> int:
    if ev.verdict < 0:
        return flow_pb2.DROPPED
    if ev.verdict > 0 or ev.proxy_port:
        return flow_pb2.REDIRECTED
    return flow_pb2.AUDIT if ev.audited else flow_pb2.FORWARDED


__all__ = ["Capture", "FlowFacts", "FlowParser", "L7Facts", "l7_facts", "lost_event", "summary", "timestamp"]
