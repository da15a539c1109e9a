"""Presentation of datapath events: a typed event (pilus.datapath.events) -> the monitor
API's JSON record, and a record -> `pilus monitor`'s line in cilium-dbg monitor's formats.

The agent turns events into records (``event_record``) when it streams them; the CLI
prints records it reads from the stream (``format_event``); ``event_line`` does both.
Record fields may come as names or as the datapath's numbers: both print the same.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pilus import protocols
from pilus.datapath.events import (
    DropEvent,
    PacketSummary,
    PolicyVerdictEvent,
    TraceEvent,
    UnknownEvent,
)
from pilus.datapath.reasons import (
    CT_STATES,
    POLICY_DIRECTIONS,
    POLICY_MATCH_TYPES,
    TRACE_POINTS,
    drop_reason_desc,
)
from pilus.observer.l7 import L7Event

if TYPE_CHECKING:
    from pilus.observer.monitor import LostEvents

ETH_P_ARP = 0x0806
ICMP_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest",
              11: "TimeExceeded"}


# -- typed event -> record --------------------------------------------------------------

def packet_summary(p: PacketSummary) -> str:
    """``10.0.0.1:1234 -> 10.0.0.2:80 tcp SYN`` (what the captured bytes say)."""
    if p.ethertype == ETH_P_ARP:
        op = {1: "request", 2: "reply"}.get(p.arp_op or 0, str(p.arp_op))
        return f"ARP {op} {p.src_ip} -> {p.dst_ip}"
    if p.src_ip is None:
        et = f"0x{p.ethertype:04x}" if p.ethertype is not None else "?"
        return f"ethertype {et}"
    proto = p.proto
    if proto in ("TCP", "UDP"):
        s = f"{p.src_ip}:{p.sport} -> {p.dst_ip}:{p.dport} {str(proto).lower()}"
        if proto == "TCP" and p.tcp_flags:
            s += " " + ",".join(p.tcp_flags)
        return s
    if proto == "ICMP":
        return f"{p.src_ip} -> {p.dst_ip} icmp {ICMP_TYPES.get(p.icmp_type or 0, f'type {p.icmp_type}')}"
    return f"{p.src_ip} -> {p.dst_ip} proto {proto}"


def _common(ev: DropEvent | TraceEvent | PolicyVerdictEvent) -> dict[str, Any]:
    p = ev.packet
    return {
        "source_ep": ev.source_ep,
        "dst_ep": ev.dst_ep,
        "src_identity": ev.src_identity,
        "dst_identity": ev.dst_identity,
        "ifindex": ev.ifindex,
        "hash": ev.hash,
        "orig_len": ev.orig_len,
        "cap_len": ev.cap_len,
        "src_ip": p.src_ip,
        "dst_ip": p.dst_ip,
        "proto": p.proto,
        "sport": p.sport,
        "dport": p.dport,
        "tcp_flags": list(p.tcp_flags),
        "icmp_type": p.icmp_type,
        "icmp_code": p.icmp_code,
        "src_mac": p.src_mac,
        "dst_mac": p.dst_mac,
        "summary": packet_summary(p),
    }


def _drop_record(ev: DropEvent) -> dict[str, Any]:
    d = {"type": ev.kind, "reason": ev.reason, "reason_desc": ev.reason_desc}
    d.update(_common(ev))
    d["line"] = ev.line
    return d


def _trace_record(ev: TraceEvent) -> dict[str, Any]:
    d = {
        "type": ev.kind,
        "observation_point": ev.observation_point,
        "obs_point": ev.obs_point,
        "ct_state": ev.ct_state,
    }
    d.update(_common(ev))
    return d


def _verdict_record(ev: PolicyVerdictEvent) -> dict[str, Any]:
    d = {
        "type": ev.kind,
        "direction": ev.direction_name,
        "action": ev.action,
        "match_type": ev.match_name,
        "remote_identity": ev.remote_identity,
        "local_identity": ev.local_identity,
        "verdict": ev.verdict,
        "drop_reason": ev.drop_reason,
        "drop_reason_desc": drop_reason_desc(ev.drop_reason) if ev.verdict < 0 else None,
        "proxy_port": ev.proxy_port,
        "audited": ev.audited,
    }
    d.update(_common(ev))
    # the policy's view of L4 (the ICMP type for ICMP) wins over the capture's
    d["proto"] = _policy_proto(ev.policy_proto)
    d["dport"] = ev.policy_dport
    return d


def _policy_proto(proto: int) -> str | int:
    # as PacketSummary.proto: a name for the protocols the capture names, else the number
    return protocols.NAMES[proto] if proto in (protocols.TCP, protocols.UDP, protocols.ICMP) else proto


def _l7_record(ev: L7Event) -> dict[str, Any]:
    # the proxy's record (docs/l7.md "L7 records"), flattened as the datapath events are;
    # the Kafka and DNS details stay one object each, as the proxies wrote them
    d: dict[str, Any] = {
        "type": ev.kind,
        "direction": ev.direction,
        "endpoint": ev.endpoint,
        "source_ep": ev.source_ep,
        "dst_ep": ev.dst_ep,
        "src_ip": ev.source.ip,
        "sport": ev.source.port,
        "src_identity": ev.source.identity,
        "dst_ip": ev.destination.ip,
        "dport": ev.destination.port,
        "dst_identity": ev.destination.identity,
        "l7_protocol": ev.l7,
        "transport": ev.transport,
        "protocol": ev.protocol,
        "method": ev.method,
        "url": ev.url,
        "host": ev.host,
        "path": ev.path,
        "status": ev.status,
        "grpc_status": ev.grpc_status,
        "verdict": ev.verdict,
        "latency_ns": ev.latency_ns,
        "listener": ev.listener,
        "header_mismatches": [{"name": n, "action": a} for n, a in ev.header_mismatches],
        "record_time": ev.record_time,
    }
    if ev.kafka is not None:
        d["kafka"] = dataclasses.asdict(ev.kafka)
    if ev.dns is not None:
        d["dns"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ev.dns).items()}
    return d


def event_record(ev: DropEvent | TraceEvent | PolicyVerdictEvent | UnknownEvent | L7Event | LostEvents) -> dict:
    """The JSON object `GET /v1/monitor` streams for one event (openapi.yaml MonitorEvent)."""
    if isinstance(ev, L7Event):
        d = _l7_record(ev)
    elif isinstance(ev, DropEvent):
        d = _drop_record(ev)
    elif isinstance(ev, TraceEvent):
        d = _trace_record(ev)
    elif isinstance(ev, PolicyVerdictEvent):
        d = _verdict_record(ev)
    elif isinstance(ev, UnknownEvent):
        d = {"type": ev.kind, "len": len(ev.raw)}
    else:  # the hub's note that a slow subscriber missed events
        return {"type": "lost", "count": ev.count}
    if ev.time is not None:
        d["time"] = ev.time
    return d


# -- record -> text line ------------------------------------------------------------------

def _obs_name(point) -> str:
    if isinstance(point, int):
        return TRACE_POINTS.get(point, "unknown")
    name = str(point or "unknown").lower().replace("_", "-")
    if name == "to-lxc":
        return "to-endpoint"
    if name == "from-lxc":
        return "from-endpoint"
    return name


def trace_summary(ev: dict) -> str:
    name = _obs_name(ev.get("observation_point"))
    if name == "to-endpoint":
        return f"-> endpoint {ev.get('dst_ep', 0)}"
    if name == "from-endpoint":
        return f"<- endpoint {ev.get('source_ep', 0)}"
    if name.startswith("to-"):
        return "-> " + name[3:]
    if name.startswith("from-"):
        return "<- " + name[5:]
    return "unknown trace"


def ct_state(state) -> str:
    if isinstance(state, int):
        return CT_STATES.get(state, str(state))
    return str(state or "unknown").lower()


def flow_hash(value) -> str:
    if isinstance(value, int):
        return hex(value)
    return str(value if value not in (None, "") else "0x0")


def _hostport(ip, port) -> str:
    if ip is None:
        return "?"
    if port in (None, 0) and port is not None:
        return f"{ip}:0"
    return str(ip) if port is None else f"{ip}:{port}"


def connection_summary(ev: dict) -> str:
    """``10.0.0.1:1234 -> 10.0.0.2:80 tcp SYN`` (the agent's ``summary`` when it sent one)."""
    if ev.get("summary"):
        return str(ev["summary"])
    proto = ev.get("proto")
    if isinstance(proto, int):  # an IP protocol number (policy-verdict events may send one)
        proto = protocols.name(proto)
    proto = str(proto or "").lower()
    src, dst = ev.get("src_ip"), ev.get("dst_ip")
    if src is None and dst is None:
        return f"{ev.get('cap_len', ev.get('orig_len', 0))} bytes"
    if proto in ("tcp", "udp", "sctp"):
        text = f"{_hostport(src, ev.get('sport'))} -> {_hostport(dst, ev.get('dport'))} {proto}"
        if proto == "tcp" and ev.get("tcp_flags"):
            text += " " + ", ".join(ev["tcp_flags"])
        return text
    if proto in ("icmp", "icmpv4"):
        code = ev.get("icmp_type")
        return f"{src} -> {dst} icmp " + (
            ICMP_TYPES.get(code, f"type {code} code {ev.get('icmp_code', 0)}")
            if code is not None else "")
    return f"{src} -> {dst} {proto or 'ip'}".rstrip()


def format_drop(ev: dict) -> str:
    reason = ev.get("reason_desc") or f"reason {ev.get('reason')}"
    return (f"xx drop ({reason}) flow {flow_hash(ev.get('hash'))} "
            f"to endpoint {ev.get('dst_ep', 0)}, ifindex {ev.get('ifindex', 0)}, "
            f"identity {ev.get('src_identity', 0)}->{ev.get('dst_identity', 0)}: "
            f"{connection_summary(ev)}")


def format_trace(ev: dict, ifnames: dict[int, str] | None = None) -> str:
    ifindex = ev.get("ifindex", 0)
    ifname = (ifnames or {}).get(ifindex) or str(ifindex)
    orig_ip = ev.get("orig_ip") or "0.0.0.0"
    return (f"{trace_summary(ev)} flow {flow_hash(ev.get('hash'))} , "
            f"identity {ev.get('src_identity', 0)}->{ev.get('dst_identity', 0)} "
            f"state {ct_state(ev.get('ct_state'))} ifindex {ifname} orig-ip {orig_ip}: "
            f"{connection_summary(ev)}")


def hexdump(data_hex: str) -> list[str]:
    """``hexdump -C``-like lines of the captured bytes."""
    try:
        data = bytes.fromhex(data_hex or "")
    except ValueError:
        return [f"(undecodable packet_hex: {data_hex[:32]}...)"]
    out = []
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hx = " ".join(f"{b:02x}" for b in chunk[:8])
        if len(chunk) > 8:
            hx += "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        out.append(f"{off:08x}  {hx.ljust(49)} |{text}|")
    return out


def proto_number(proto) -> str:
    if isinstance(proto, int):
        return str(proto)
    text = str(proto or "").lower()
    if text.isdigit():
        return text
    return str(protocols.NUMBERS.get(text.upper(), 0))


def match_type(value) -> str:
    if isinstance(value, int):
        return POLICY_MATCH_TYPES.get(value, str(value))
    return str(value) if value not in (None, "") else "none"


def _direction(value) -> str:
    if isinstance(value, int):  # the datapath's traffic direction: 1 ingress, 2 egress
        return POLICY_DIRECTIONS.get(value, "unknown")
    return str(value or "unknown").lower()


def format_policy_verdict(ev: dict) -> str:
    """``Policy verdict log: flow 0x.. local EP ID 3, remote ID 12345, proto 6, ingress,
    action allow, match L3-L4, 10.200.1.2:40000 -> 10.200.1.3:80 tcp SYN``."""
    action = ev.get("action")
    if isinstance(action, bool):  # tolerate {"allowed": true}-like encodings
        action = "allow" if action else "deny"
    if ev.get("audited"):  # audit mode let a denied connection through
        action = "audit"
    return (f"Policy verdict log: flow {flow_hash(ev.get('hash'))} "
            f"local EP ID {ev.get('source_ep', 0)}, "
            f"remote ID {ev.get('remote_identity', 0)}, proto {proto_number(ev.get('proto'))}, "
            f"{_direction(ev.get('direction'))}, action {str(action or 'unknown').lower()}, "
            f"match {match_type(ev.get('match_type'))}, {connection_summary(ev)}")


#: the proxy's verdicts as cilium-dbg monitor prints them (accesslog.FlowVerdict)
L7_VERDICTS = {"FORWARDED": "Forwarded", "DENIED": "Denied", "ERROR": "Error"}


def _label_list(labels) -> str:
    # Go's fmt of a []string, as cilium-dbg prints an endpoint's labels
    return "[" + " ".join(str(x) for x in labels or ()) + "]"


#: DNS rcodes by their number (RFC 1035, 6895), as dig and Cilium's logs name them
DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
              6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 16: "BADVERS"}


def dns_rcode(code: Any) -> str:
    return DNS_RCODES.get(code, f"RCODE{code}") if isinstance(code, int) else str(code or "?")


def _l7_detail(ev: dict) -> str:
    """What follows ``verdict X`` in cilium-dbg's access-log line, per L7 parser."""
    proto = ev.get("l7_protocol") or "http"
    if proto == "kafka":
        k = ev.get("kafka") or {}
        # cilium-dbg: `<api key> topic <topic> => <error code>`; the rest says which request
        code = k.get("error_code")
        line = f"{k.get('api_key') or '?'} topic {k.get('topic') or ''} => {'-' if code is None else code}"
        line += f" api-version {k.get('api_version', 0)} correlation-id {k.get('correlation_id', 0)}"
        if k.get("client_id"):
            line += f" client-id {k['client_id']}"
        return line
    if proto == "dns":
        d = ev.get("dns") or {}
        # cilium-dbg: `DNS <source>: <query> <qtypes>`, for an answer `TTL: n Answer: 'ips'`
        line = (f"DNS {d.get('observation_source') or 'proxy'}: {d.get('query') or '?'} "
                f"{','.join(d.get('qtypes') or [])}")
        if ev.get("verdict") == "FORWARDED":
            line += f" TTL: {d.get('ttl', 0)} Answer: '{','.join(d.get('ips') or [])}'"
            if d.get("cnames"):
                line += f" CNAMEs: {','.join(d['cnames'])}"
        return line + f" => {dns_rcode(d.get('rcode'))}"
    line = f"{ev.get('method') or '?'} {ev.get('url') or ev.get('path') or ''} => {ev.get('status', 0)}"
    if ev.get("grpc_status") is not None:
        line += f" grpc-status {ev['grpc_status']}"
    mism = ev.get("header_mismatches") or []
    if mism:  # names and actions only: values may be secrets
        line += " header-mismatch " + ",".join(f"{m.get('name')}:{m.get('action') or 'FAIL'}" for m in mism)
    return line


def format_l7(ev: dict, labels: Any = None) -> str:
    """cilium-dbg monitor's access-log line: ``<- Request http from 0 ([k8s:org=alliance])
    to 1753 ([k8s:org=empire]), identity 46765->8283, verdict Denied PUT http://deathstar/v1/exhaust-port => 403``;
    Kafka: ``... verdict Denied produce topic deathstar-plans => 29 api-version 9 correlation-id 7``;
    DNS: ``... verdict Forwarded DNS proxy: api.github.com. A TTL: 300 Answer: '1.2.3.4' => NOERROR``.

    ``labels(identity) -> list[str]`` names the identities (the CLI asks the agent)."""
    def named(identity) -> str:
        return _label_list(labels(identity) if labels is not None and identity else [])

    arrow = "->" if ev.get("direction") == "egress" else "<-"
    sid, did = ev.get("src_identity", 0), ev.get("dst_identity", 0)
    verdict = L7_VERDICTS.get(str(ev.get("verdict")), str(ev.get("verdict") or "unknown").capitalize())
    return (f"{arrow} Request {ev.get('l7_protocol') or 'http'} from {ev.get('source_ep', 0)} ({named(sid)}) "
            f"to {ev.get('dst_ep', 0)} ({named(did)}), identity {sid}->{did}, verdict {verdict} "
            f"{_l7_detail(ev)}")


def format_event(ev: dict, verbose: int = 0, ifnames: dict[int, str] | None = None, labels: Any = None) -> str:
    """One monitor record -> text (one line, plus the packet bytes with -v)."""
    kind = ev.get("type")
    if kind == "lost":
        return f"EVENTS LOST: {ev.get('count', 0)}"
    if kind == "l7":
        line = format_l7(ev, labels)
        if verbose:
            udp = " udp" if ev.get("transport") == "udp" else ""  # TCP unless said (DNS may be UDP)
            line += (f" ({ev.get('protocol') or '?'}{udp}, {ev.get('src_ip')}:{ev.get('sport')} -> "
                     f"{ev.get('dst_ip')}:{ev.get('dport')}, latency {ev.get('latency_ns', 0)} ns, "
                     f"listener {ev.get('listener') or '?'})")
        return line
    if kind == "drop":
        line = format_drop(ev)
    elif kind == "trace":
        line = format_trace(ev, ifnames)
    elif kind == "policy-verdict":
        line = format_policy_verdict(ev)
    else:
        line = f"{kind or 'unknown'} event: {connection_summary(ev)}"
    if not verbose:
        return line
    lines = ["-" * 78, line]
    orig, cap = ev.get("orig_len"), ev.get("cap_len")
    if orig is not None:
        lines.append(f"  {orig} bytes on the wire, {cap if cap is not None else orig} captured"
                     + (f", at {ev['time']}" if ev.get("time") else ""))
    if ev.get("packet_hex"):
        lines.extend("  " + h for h in hexdump(ev["packet_hex"]))
    return "\n".join(lines)


def event_line(ev: DropEvent | TraceEvent | PolicyVerdictEvent | UnknownEvent | L7Event, verbose: int = 0,
               ifnames: dict[int, str] | None = None, labels: Any = None) -> str:
    """A typed event as `pilus monitor` prints it."""
    return format_event(event_record(ev), verbose, ifnames, labels)
