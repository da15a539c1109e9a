"""Decoding raw ring buffer records into DropEvent / TraceEvent / PolicyVerdictEvent, and
their JSON records (pilus.observer.format). The hub: tests/unit/test_event_hub.py."""

from __future__ import annotations

import ctypes

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import raw

from pilus.datapath import abi
from pilus.datapath.events import (
    DropEvent,
    PolicyVerdictEvent,
    TraceEvent,
    UnknownEvent,
    decode,
    decode_records,
    listen_mask,
    parse_packet,
)
from pilus.datapath.reasons import DROP_REASONS, drop_reason_desc
from pilus.observer.format import event_record


def record(
    kind,
    subtype,
    pkt: bytes,
    *,
    source=5,
    src=1000,
    dst=1001,
    dst_id=6,
    ifindex=101,
    ct=0,
    orig_len=None,
    cap=None,
):
    cls = abi.DropNotify if kind == abi.NOTIFY_DROP else abi.TraceNotify
    n = cls()
    n.hdr.common.type = kind
    n.hdr.common.subtype = subtype
    n.hdr.common.source = source
    n.hdr.common.hash = 0xDEADBEEF
    n.hdr.len_orig = orig_len if orig_len is not None else len(pkt)
    cap = min(len(pkt), abi.TRACE_PAYLOAD_LEN) if cap is None else cap
    n.hdr.len_cap = cap
    n.hdr.version = abi.NOTIFY_CAPTURE_VER
    n.src_label, n.dst_label, n.dst_id, n.ifindex = src, dst, dst_id, ifindex
    if kind == abi.NOTIFY_TRACE:
        n.reason = ct
    ctypes.memmove(n.data, pkt[:cap], cap)
    return n.to_bytes()


def tcp_syn():
    return raw(
        Ether(src="02:00:00:00:00:05", dst="02:00:00:00:01:05")
        / IP(src="10.200.1.5", dst="10.200.1.6")
        / TCP(sport=43512, dport=80, flags="S")
    )


def test_trace_record():
    ev = decode(record(abi.NOTIFY_TRACE, abi.TRACE_TO_LXC, tcp_syn(), ct=abi.CT_NEW))
    assert isinstance(ev, TraceEvent)
    d = event_record(ev)
    assert d["type"] == "trace"
    assert d["observation_point"] == "to-endpoint"
    assert d["ct_state"] == "new"
    assert (d["source_ep"], d["dst_ep"], d["src_identity"], d["dst_identity"], d["ifindex"]) == (
        5,
        6,
        1000,
        1001,
        101,
    )
    assert d["hash"] == 0xDEADBEEF
    assert d["src_ip"] == "10.200.1.5" and d["dst_ip"] == "10.200.1.6"
    assert d["proto"] == "TCP" and d["sport"] == 43512 and d["dport"] == 80
    assert d["tcp_flags"] == ["SYN"]
    assert d["summary"] == "10.200.1.5:43512 -> 10.200.1.6:80 tcp SYN"
    assert d["orig_len"] == d["cap_len"] == len(tcp_syn())


def test_drop_record():
    pkt = raw(Ether() / IP(src="10.200.1.99", dst="10.200.1.6") / UDP(sport=1, dport=53))
    ev = decode(record(abi.NOTIFY_DROP, 132, pkt, dst_id=0))
    assert isinstance(ev, DropEvent)
    d = event_record(ev)
    assert d["type"] == "drop" and d["reason"] == 132
    assert d["reason_desc"] == "Invalid source ip"
    assert d["proto"] == "UDP" and d["summary"] == "10.200.1.99:1 -> 10.200.1.6:53 udp"
    assert d["tcp_flags"] == [] and d["icmp_type"] is None


def test_trace_points_and_states():
    ev = decode(record(abi.NOTIFY_TRACE, abi.TRACE_TO_STACK, tcp_syn(), ct=abi.CT_REPLY))
    assert ev.observation_point == "to-stack" and ev.ct_state == "reply"
    ev = decode(record(abi.NOTIFY_TRACE, abi.TRACE_TO_LXC, tcp_syn(), ct=abi.CT_ESTABLISHED))
    assert ev.ct_state == "established"


def test_icmp_summary():
    pkt = raw(Ether() / IP(src="10.200.1.5", dst="10.200.1.1") / ICMP(type=8, code=0, id=3))
    d = event_record(decode(record(abi.NOTIFY_TRACE, abi.TRACE_TO_STACK, pkt)))
    assert d["proto"] == "ICMP" and d["icmp_type"] == 8 and d["icmp_code"] == 0
    assert d["sport"] is None
    assert d["summary"] == "10.200.1.5 -> 10.200.1.1 icmp EchoRequest"


def test_truncated_capture_and_long_packet():
    big = raw(Ether() / IP(src="1.2.3.4", dst="5.6.7.8") / UDP(sport=9, dport=10) / (b"x" * 1000))
    d = event_record(decode(record(abi.NOTIFY_DROP, 134, big)))
    assert d["orig_len"] == len(big) and d["cap_len"] == abi.TRACE_PAYLOAD_LEN
    assert d["sport"] == 9
    # a capture that stops inside the IP header: no tuple, no crash
    d = event_record(decode(record(abi.NOTIFY_DROP, 134, tcp_syn(), cap=20)))
    assert d["src_ip"] is None and d["summary"].startswith("ethertype 0x0800")


def test_non_ip_capture():
    pkt = raw(Ether() / ARP(op=1, psrc="10.200.1.5", pdst="10.200.1.1"))
    d = event_record(decode(record(abi.NOTIFY_DROP, 172, pkt)))
    assert d["summary"] == "ARP request 10.200.1.5 -> 10.200.1.1"
    assert d["reason_desc"] == "Unknown sender"


def test_unknown_type_and_short_record():
    assert isinstance(decode(bytes([9]) + bytes(40)), UnknownEvent)
    with pytest.raises(ValueError):
        decode(b"\x01\x02")
    with pytest.raises(ValueError):
        decode(bytes([abi.NOTIFY_DROP]) + bytes(20))


def test_reason_table():
    assert DROP_REASONS[133] == "Policy denied"
    assert DROP_REASONS[181] == "Policy denied by denylist"
    assert DROP_REASONS[139] == "Unsupported L3 protocol"
    assert DROP_REASONS[150] == "Unknown L3 target address"
    assert drop_reason_desc(250) == "Unknown reason 250"


def test_parse_packet_tcp_flags_order():
    pkt = raw(Ether() / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(flags="FA"))
    assert parse_packet(pkt).tcp_flags == ["FIN", "ACK"]


def verdict_record(pkt: bytes, *, direction, verdict, match_type, proto, dport, remote=2, source=5):
    n = abi.PolicyVerdictNotify()
    n.hdr.common.type = abi.NOTIFY_POLICY_VERDICT
    n.hdr.common.source = source
    n.hdr.len_orig = len(pkt)
    n.hdr.len_cap = min(len(pkt), abi.TRACE_PAYLOAD_LEN)
    n.hdr.version = abi.NOTIFY_CAPTURE_VER
    n.remote_label, n.local_label = remote, 1000
    n.verdict, n.dir, n.match_type = verdict, direction, match_type
    n.proto, n.dst_port, n.ifindex = proto, dport, 101
    ctypes.memmove(n.data, pkt, n.hdr.len_cap)
    return n.to_bytes()


def test_policy_verdict_record_egress_allow():
    ev = decode(
        verdict_record(
            tcp_syn(),
            direction=abi.POLICY_EGRESS,
            verdict=0,
            match_type=abi.POLICY_MATCH_L3_L4,
            proto=6,
            dport=80,
            remote=1001,
        )
    )
    assert isinstance(ev, PolicyVerdictEvent)
    d = event_record(ev)
    assert d["type"] == "policy-verdict"
    assert (d["direction"], d["action"], d["match_type"]) == ("egress", "allow", "L3-L4")
    assert (d["source_ep"], d["remote_identity"], d["local_identity"]) == (5, 1001, 1000)
    assert (d["src_identity"], d["dst_identity"]) == (1000, 1001)  # oriented like the packet
    assert (d["proto"], d["dport"], d["sport"]) == ("TCP", 80, 43512)
    assert d["drop_reason"] == 0 and d["drop_reason_desc"] is None
    assert d["summary"] == "10.200.1.5:43512 -> 10.200.1.6:80 tcp SYN"


def test_policy_verdict_record_ingress_deny_and_match_names():
    pkt = raw(Ether() / IP(src="1.1.1.1", dst="10.200.1.6") / ICMP(type=13))
    names = {
        abi.POLICY_MATCH_NONE: "none",
        abi.POLICY_MATCH_L3_ONLY: "L3-Only",
        abi.POLICY_MATCH_L3_L4: "L3-L4",
        abi.POLICY_MATCH_L4_ONLY: "L4-Only",
        abi.POLICY_MATCH_ALL: "all",
        abi.POLICY_MATCH_L3_PROTO: "L3-Proto",
        abi.POLICY_MATCH_PROTO_ONLY: "Proto-Only",
    }
    for mt, name in names.items():
        d = event_record(decode(
            verdict_record(
                pkt,
                direction=abi.POLICY_INGRESS,
                verdict=-abi.DROP_POLICY_DENY,
                match_type=mt,
                proto=1,
                dport=13,
                source=6,
            )
        ))
        assert d["match_type"] == name
    assert (d["direction"], d["action"], d["drop_reason"]) == ("ingress", "deny", 181)
    assert d["drop_reason_desc"] == "Policy denied by denylist"
    assert (d["src_identity"], d["dst_identity"], d["dst_ep"]) == (2, 1000, 6)
    assert (d["proto"], d["dport"], d["icmp_type"]) == ("ICMP", 13, 13)


# -- who listens: the datapath's listen mask and decoding only wanted records

MASK_DROP, MASK_TRACE, MASK_VERDICT = (1 << abi.NOTIFY_DROP, 1 << abi.NOTIFY_TRACE,
                                       1 << abi.NOTIFY_POLICY_VERDICT)


@pytest.mark.parametrize(
    ("subscribers", "mask"),
    [
        ([], 0),  # nobody listens: the datapath emits nothing
        ([None], MASK_DROP | MASK_TRACE | MASK_VERDICT),  # `pilus monitor` without --type
        ([frozenset({"drop"})], MASK_DROP),
        ([frozenset({"drop", "policy-verdict"})], MASK_DROP | MASK_VERDICT),  # e2e EventLog
        ([frozenset({"drop"}), frozenset({"trace"})], MASK_DROP | MASK_TRACE),
        ([frozenset({"trace"}), None], MASK_DROP | MASK_TRACE | MASK_VERDICT),
    ],
)
def test_listen_mask(subscribers, mask):
    assert listen_mask(subscribers) == mask


def test_decode_records_decodes_only_wanted_types():
    recs = [
        record(abi.NOTIFY_TRACE, 0, tcp_syn()),
        record(abi.NOTIFY_DROP, 133, tcp_syn()),
        b"\x01\x00",  # a drop record cut short: counted, not raised
    ]
    events, errors = decode_records(recs, want=lambda t: t == abi.NOTIFY_DROP)
    assert [type(e) for e in events] == [DropEvent] and events[0].reason == 133
    assert errors == 1
    events, errors = decode_records(recs[:2])
    assert [type(e) for e in events] == [TraceEvent, DropEvent] and errors == 0


def test_typed_events_keep_every_decoded_field():
    n = abi.DropNotify.from_raw(record(abi.NOTIFY_DROP, 133, tcp_syn()))
    n.line, n.file, n.ext_error = 42, 3, -2
    ev = decode(n.to_bytes())
    assert (ev.reason, ev.line, ev.file, ev.ext_error) == (133, 42, 3, -2)
    assert ev.version == abi.NOTIFY_CAPTURE_VER and ev.data == tcp_syn()
    n = abi.TraceNotify.from_raw(record(abi.NOTIFY_TRACE, abi.TRACE_TO_LXC, tcp_syn()))
    n.flags = 0x5
    ev = decode(n.to_bytes())
    assert ev.flags == 0x5 and ev.packet.src_mac == "02:00:00:00:00:05"
    assert "flags" not in event_record(ev)  # the record is today's shape
