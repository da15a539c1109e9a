"""Typed datapath events -> Hubble flows (pilus.hubble.flows): every field the parser
fills, for drops, traces and policy verdicts, with both ends from a StaticLookup.

The builders here (``drop``, ``trace``, ``verdict``, ``LOOKUP``) make real dataclass
instances of pilus.datapath.events from scapy packets; the other test_hubble_* modules
use them too."""

from __future__ import annotations

import uuid

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import raw

from pilus.datapath import abi
from pilus.datapath.events import DropEvent, PolicyVerdictEvent, TraceEvent, UnknownEvent, parse_packet
from pilus.hubble.flows import FlowParser, summary
from pilus.hubble.lookup import EndpointDetails, StaticLookup
from pilus.hubble.protos import flow_pb2

XWING_IP, DEATHSTAR_IP, COREDNS_IP, WORLD_IP = "10.200.1.5", "10.200.1.6", "10.200.2.7", "1.1.1.1"
XWING = EndpointDetails(5, 1000, "default", "xwing", (
    "k8s:org=alliance", "k8s:class=xwing", "k8s:io.kubernetes.pod.namespace=default"), ip=XWING_IP)
DEATHSTAR = EndpointDetails(6, 1001, "default", "deathstar-6c94d", (
    "k8s:org=empire", "k8s:class=deathstar", "k8s:io.kubernetes.pod.namespace=default"), ip=DEATHSTAR_IP)
COREDNS = EndpointDetails(0, 1002, "kube-system", "coredns-abc", (
    "k8s:k8s-app=kube-dns", "k8s:io.kubernetes.pod.namespace=kube-system"), ip=COREDNS_IP)
CIDR_IDENTITY = 16777217
LOOKUP = StaticLookup([XWING, DEATHSTAR, COREDNS], {CIDR_IDENTITY: ["cidr:1.1.1.0/24", "reserved:world"]})
NODE = "default/default-node1"
T0 = 1_750_000_000.25


def packet(src=XWING_IP, dst=DEATHSTAR_IP, l4=None) -> bytes:
    return raw(Ether(src="02:00:00:00:00:05", dst="02:00:00:00:01:05") / IP(src=src, dst=dst)
               / (l4 if l4 is not None else TCP(sport=43512, dport=80, flags="S")))


def _common(pkt: bytes, source_ep: int, src_id: int, dst_id: int, t: float) -> dict:
    return dict(source_ep=source_ep, src_identity=src_id, dst_identity=dst_id, dst_ep=0, ifindex=101,
                hash=0xDEADBEEF, orig_len=len(pkt), cap_len=len(pkt), data=pkt, packet=parse_packet(pkt),
                version=abi.NOTIFY_CAPTURE_VER, time=t)


def drop(reason=133, *, pkt=None, source_ep=6, src_id=1000, dst_id=1001, t=T0) -> DropEvent:
    pkt = pkt if pkt is not None else packet()
    return DropEvent(reason=reason, line=812, file=1, **_common(pkt, source_ep, src_id, dst_id, t))


def trace(point=abi.TRACE_TO_LXC, ct=0, *, pkt=None, source_ep=6, src_id=1000, dst_id=0, t=T0) -> TraceEvent:
    pkt = pkt if pkt is not None else packet()
    return TraceEvent(obs_point=point, ct_reason=ct, **_common(pkt, source_ep, src_id, dst_id, t))


def verdict(v=0, *, direction=abi.POLICY_INGRESS, pkt=None, source_ep=6, local=1001, remote=1000, match=2,
            proxy_port=0, audited=False, t=T0) -> PolicyVerdictEvent:
    """The verdict of endpoint ``source_ep`` (identity ``local``) on a packet from (ingress)
    or to (egress) identity ``remote``."""
    pkt = pkt if pkt is not None else packet()
    src_id, dst_id = (local, remote) if direction == abi.POLICY_EGRESS else (remote, local)
    return PolicyVerdictEvent(direction=direction, remote_identity=remote, local_identity=local, verdict=v,
                              match_type=match, policy_proto=6, policy_dport=80, proxy_port=proxy_port,
                              audited=audited, **_common(pkt, source_ep, src_id, dst_id, t))


PARSER = FlowParser(LOOKUP, node_name=NODE, cluster_name="default")


def parse(ev) -> flow_pb2.Flow:
    f = PARSER.parse(ev)
    assert f is not None
    return f


# -- drops ------------------------------------------------------------------------------

def test_policy_drop_has_both_ends_with_names_and_labels():
    f = parse(drop(133))
    assert f.verdict == flow_pb2.DROPPED
    assert f.drop_reason == 133 and f.drop_reason_desc == flow_pb2.POLICY_DENIED
    assert (f.event_type.type, f.event_type.sub_type) == (1, 133)
    assert f.Type == flow_pb2.L3_L4 and f.node_name == NODE
    assert (f.time.seconds, f.time.nanos) == (1_750_000_000, 250_000_000)
    assert uuid.UUID(f.uuid).version == 4 and f.uuid != parse(drop(133)).uuid
    assert (f.source.ID, f.source.identity, f.source.namespace, f.source.pod_name) == (5, 1000, "default", "xwing")
    assert list(f.source.labels) == sorted(XWING.labels)  # sorted, as Hubble sends them
    assert f.source.cluster_name == "default"
    assert (f.destination.ID, f.destination.identity, f.destination.pod_name) == (6, 1001, "deathstar-6c94d")
    assert "k8s:class=deathstar" in f.destination.labels
    # the dropping endpoint (6) is the destination: an ingress drop; a drop is no reply or non-reply
    assert f.traffic_direction == flow_pb2.INGRESS
    assert not f.HasField("is_reply")
    assert f.file.line == 812
    assert f.interface.index == 101


def test_egress_drop_by_the_source_endpoint():
    f = parse(drop(181, source_ep=5))
    assert f.traffic_direction == flow_pb2.EGRESS
    assert f.drop_reason_desc == flow_pb2.POLICY_DENY


def test_drop_reason_without_an_enum_name_keeps_its_number():
    f = parse(drop(2))  # "Invalid packet" (2) has no name in flow.DropReason
    assert f.drop_reason == 2 and f.drop_reason_desc == 2
    assert flow_pb2.Flow.FromString(f.SerializeToString()).drop_reason_desc == 2


def test_ethernet_ip_and_tcp_flags():
    pkt = packet(l4=TCP(sport=1234, dport=8080, flags="SA"))
    f = parse(drop(pkt=pkt))
    assert (f.ethernet.source, f.ethernet.destination) == ("02:00:00:00:00:05", "02:00:00:00:01:05")
    assert (f.IP.source, f.IP.destination, f.IP.ipVersion) == (XWING_IP, DEATHSTAR_IP, flow_pb2.IPv4)
    assert f.l4.WhichOneof("protocol") == "TCP"
    assert (f.l4.TCP.source_port, f.l4.TCP.destination_port) == (1234, 8080)
    assert f.l4.TCP.flags.SYN and f.l4.TCP.flags.ACK and not f.l4.TCP.flags.FIN
    assert f.Summary == "TCP Flags: SYN, ACK"


def test_udp_and_icmp_layer4_and_summaries():
    f = parse(drop(pkt=packet(l4=UDP(sport=5353, dport=53))))
    assert f.l4.WhichOneof("protocol") == "UDP" and f.l4.UDP.destination_port == 53
    assert f.Summary == "UDP"
    f = parse(drop(pkt=packet(l4=ICMP(type=8, code=0))))
    assert f.l4.WhichOneof("protocol") == "ICMPv4"
    assert (f.l4.ICMPv4.type, f.l4.ICMPv4.code) == (8, 0)
    assert f.Summary == "ICMPv4 EchoRequest"


def test_world_and_cidr_identities_get_their_labels():
    f = parse(drop(pkt=packet(src=WORLD_IP), src_id=2))
    assert (f.source.ID, f.source.identity, f.source.pod_name) == (0, 2, "")
    assert list(f.source.labels) == ["reserved:world"]
    assert f.source.cluster_name == ""
    f = parse(drop(pkt=packet(src=WORLD_IP), src_id=CIDR_IDENTITY))
    assert list(f.source.labels) == ["cidr:1.1.1.0/24", "reserved:world"]


def test_remote_pod_from_the_lookup_has_no_local_id():
    f = parse(drop(pkt=packet(src=COREDNS_IP), src_id=1002))
    assert (f.source.ID, f.source.namespace, f.source.pod_name) == (0, "kube-system", "coredns-abc")
    assert "k8s:k8s-app=kube-dns" in f.source.labels


def test_datapath_identity_wins_over_the_lookups():
    # the endpoint was relabelled: the packet carried another identity than the lookup has
    LOOKUP.set_identity(1234, ["k8s:class=tiefighter"])
    f = parse(drop(src_id=1234))
    assert f.source.identity == 1234 and f.source.pod_name == "xwing"
    assert list(f.source.labels) == ["k8s:class=tiefighter"]


def test_arp_and_truncated_captures():
    arp = raw(Ether(src="02:00:00:00:00:05", dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc=XWING_IP, pdst="10.200.1.1"))
    f = parse(drop(172, pkt=arp))
    assert f.Summary == "ARP" and not f.HasField("IP") and not f.HasField("l4")
    assert f.ethernet.destination == "ff:ff:ff:ff:ff:ff"
    f = parse(drop(134, pkt=packet()[:20]))  # stops inside the IP header
    assert not f.HasField("IP") and f.source.identity == 1000 and f.source.pod_name == ""


# -- traces -----------------------------------------------------------------------------

def test_trace_to_endpoint_new_connection():
    f = parse(trace(abi.TRACE_TO_LXC, ct=0, source_ep=6))
    assert f.verdict == flow_pb2.FORWARDED
    assert f.trace_observation_point == flow_pb2.TO_ENDPOINT  # 101, not 0
    assert (f.event_type.type, f.event_type.sub_type) == (4, 0)
    assert f.trace_reason == flow_pb2.NEW
    assert f.HasField("is_reply") and f.is_reply.value is False
    # reported by the destination endpoint, not a reply: ingress
    assert f.traffic_direction == flow_pb2.INGRESS
    # the trace carries no destination identity: the lookup's
    assert f.destination.identity == 1001


def test_trace_from_endpoint_and_reply_directions():
    f = parse(trace(abi.TRACE_FROM_LXC, ct=0, source_ep=5))
    assert f.trace_observation_point == flow_pb2.FROM_ENDPOINT
    assert f.traffic_direction == flow_pb2.EGRESS
    # the reply of xwing's connection, leaving deathstar: still the connection's ingress at deathstar
    reply = packet(src=DEATHSTAR_IP, dst=XWING_IP, l4=TCP(sport=80, dport=43512, flags="SA"))
    f = parse(trace(abi.TRACE_FROM_LXC, ct=2, pkt=reply, source_ep=6, src_id=1001))
    assert f.trace_reason == flow_pb2.REPLY and f.is_reply.value is True and f.reply is True
    assert f.traffic_direction == flow_pb2.INGRESS


def test_trace_with_unknown_ct_state_has_no_reply_or_direction():
    f = parse(trace(abi.TRACE_TO_STACK, ct=5))
    assert f.trace_observation_point == flow_pb2.TO_STACK
    assert f.trace_reason == flow_pb2.TRACE_REASON_UNKNOWN
    assert not f.HasField("is_reply") and f.traffic_direction == flow_pb2.TRAFFIC_DIRECTION_UNKNOWN


def test_every_datapath_observation_point_has_a_flow_point():
    from pilus.datapath.reasons import TRACE_POINTS
    names = {p: flow_pb2.TraceObservationPoint.Name(parse(trace(p)).trace_observation_point) for p in TRACE_POINTS}
    assert names[abi.TRACE_TO_OVERLAY] == "TO_OVERLAY" and names[abi.TRACE_FROM_OVERLAY] == "FROM_OVERLAY"
    assert "UNKNOWN_POINT" not in names.values()


# -- policy verdicts ----------------------------------------------------------------------

def test_allowed_ingress_verdict():
    f = parse(verdict(0, match=2))
    assert f.verdict == flow_pb2.FORWARDED
    assert (f.event_type.type, f.event_type.sub_type) == (5, 0)
    assert f.traffic_direction == flow_pb2.INGRESS
    assert f.policy_match_type == 2
    assert (f.source.identity, f.destination.identity) == (1000, 1001)
    assert f.is_reply.value is False and f.drop_reason_desc == 0


def test_denied_redirected_and_audited_verdicts():
    f = parse(verdict(-181, direction=abi.POLICY_EGRESS, source_ep=5, local=1000, remote=1001))
    assert f.verdict == flow_pb2.DROPPED and f.drop_reason_desc == flow_pb2.POLICY_DENY
    assert f.traffic_direction == flow_pb2.EGRESS
    f = parse(verdict(0, proxy_port=15001))
    assert f.verdict == flow_pb2.REDIRECTED and f.proxy_port == 15001
    f = parse(verdict(0, audited=True))
    assert f.verdict == flow_pb2.AUDIT


def test_verdict_without_capture_takes_the_policys_port():
    ev = verdict(0, pkt=b"")
    f = parse(ev)
    assert f.l4.WhichOneof("protocol") == "TCP" and f.l4.TCP.destination_port == 80


def test_unknown_records_are_no_flows():
    assert PARSER.parse(UnknownEvent(type=9, raw=b"\x09")) is None


def test_summary_of_non_ip():
    assert summary(parse_packet(b"")) == "unknown"


# -- services ----------------------------------------------------------------------------

def test_frontend_addresses_name_their_service():
    vip = "10.96.0.10"
    lookup = StaticLookup([XWING, DEATHSTAR], services={(vip, 80, "TCP"): ("default", "deathstar"),
                                                         (vip, 53, "UDP"): ("kube-system", "kube-dns")})
    parser = FlowParser(lookup, node_name=NODE)
    # no backend: the drop carries the frontend the pod asked for (Hubble's GetServiceByAddr)
    f = parser.parse(drop(158, source_ep=5, pkt=packet(dst=vip)))
    assert (f.destination_service.namespace, f.destination_service.name) == ("default", "deathstar")
    assert not f.HasField("source_service")
    # the reverse-translated reply comes from the frontend
    reply = packet(src=vip, dst=XWING_IP, l4=TCP(sport=80, dport=43512, flags="SA"))
    f = parser.parse(trace(abi.TRACE_TO_LXC, ct=2, source_ep=5, src_id=1001, pkt=reply))
    assert (f.source_service.namespace, f.source_service.name) == ("default", "deathstar")
    # the same address on another port or protocol, ICMP, and a backend address: no service
    assert not parser.parse(drop(158, pkt=packet(dst=vip, l4=TCP(sport=1, dport=81)))).HasField(
        "destination_service")
    f = parser.parse(drop(158, pkt=packet(dst=vip, l4=UDP(sport=5000, dport=53))))
    assert f.destination_service.name == "kube-dns"
    assert not parser.parse(drop(158, pkt=packet(dst=vip, l4=ICMP()))).HasField("destination_service")
    assert not parser.parse(drop(133)).HasField("destination_service")
