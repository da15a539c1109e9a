"""``pilus monitor``: live datapath events in cilium-dbg monitor's one-line formats."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pilus.cli import common

# observation point -> (monitor name); numbers as the datapath's TRACE_* values
OBS_POINTS = {
    0: "to-endpoint", 1: "to-proxy", 2: "to-host", 3: "to-stack", 4: "to-overlay",
    5: "from-endpoint", 6: "from-proxy", 7: "from-host", 8: "from-stack",
    9: "from-overlay", 10: "from-network", 11: "to-network", 12: "to-crypto",
    13: "from-crypto",
}
CT_STATES = {0: "new", 1: "established", 2: "reply", 3: "related", 5: "unknown"}
EVENT_TYPES = ("drop", "trace", "policy-verdict")
IP_PROTOCOLS = {"icmp": 1, "icmpv4": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132}
# policy match types as the datapath numbers them (cilium's POLICY_MATCH_*)
MATCH_TYPES = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto",
               6: "Proto-Only"}


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("monitor", parents=[parent], help="show live datapath events",
                       description="Print drop, trace and policy-verdict events as the "
                                   "datapath reports them, one line each, until Ctrl-C.")
    p.add_argument("-t", "--type", choices=EVENT_TYPES, default=None,
                   help="only events of this type (default: all)")
    p.add_argument("--endpoint", "--related-to", metavar="ID", type=common.positive_int,
                   default=None, help="only events to or from this endpoint ID")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also print the captured packet bytes (hex)")
    p.add_argument("-o", "--output", choices=("json",), default=None,
                   help="print each event as one JSON object per line")
    p.add_argument("-j", "--json", dest="output", action="store_const", const="json",
                   help="same as -o json")
    p.set_defaults(func=cmd_monitor)


# -- formatting ---------------------------------------------------------------------

def _obs_name(point) -> str:
    if isinstance(point, int):
        return OBS_POINTS.get(point, "unknown")
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
        proto = {n: name for name, n in IP_PROTOCOLS.items()}.get(proto, str(proto))
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


ICMP_TYPES = {0: "EchoReply", 3: "DestinationUnreachable", 5: "Redirect", 8: "EchoRequest",
              11: "TimeExceeded"}


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
    return str(IP_PROTOCOLS.get(text, 0))


def match_type(value) -> str:
    if isinstance(value, int):
        return MATCH_TYPES.get(value, str(value))
    return str(value) if value not in (None, "") else "none"


def _direction(value) -> str:
    if isinstance(value, int):  # the datapath's traffic direction: 1 ingress, 2 egress
        return {1: "ingress", 2: "egress"}.get(value, "unknown")
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


def format_event(ev: dict, verbose: int = 0, ifnames: dict[int, str] | None = None) -> str:
    """One event -> text (one line, plus the packet bytes with -v)."""
    kind = ev.get("type")
    if kind == "lost":
        return f"EVENTS LOST: {ev.get('count', 0)}"
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


class IfNames:
    """Host-side interface names by ifindex, learned from the endpoint list; refreshed
    at most every few seconds when an unknown ifindex shows up."""

    def __init__(self, client, min_refresh_s: float = 5.0):
        self.client = client
        self.names: dict[int, str] = {}
        self.min_refresh_s = min_refresh_s
        self.last = 0.0
        self.refresh()

    def refresh(self) -> None:
        self.last = time.monotonic()
        try:
            eps = self.client.list_endpoints()
        except Exception:  # names are a nicety; numbers will do
            return
        for ep in eps:
            if ep.get("interface_index") is not None and ep.get("interface_name"):
                self.names[int(ep["interface_index"])] = str(ep["interface_name"])

    def lookup(self, ev: dict) -> dict[int, str]:
        idx = ev.get("ifindex")
        if (ev.get("type") == "trace" and isinstance(idx, int) and idx not in self.names
                and time.monotonic() - self.last > self.min_refresh_s):
            self.refresh()
        return self.names


# -- command --------------------------------------------------------------------------

def cmd_monitor(args: argparse.Namespace) -> int:
    client = common.client(args)
    stream = client.stream_monitor(type=args.type, endpoint=args.endpoint)
    try:
        print("Listening for events... Press Ctrl-C to quit", file=sys.stderr, flush=True)
        ifnames = IfNames(client) if args.output != "json" else None
        for ev in stream:
            if args.output == "json":
                text = json.dumps(ev, separators=(",", ":"))
            else:
                text = format_event(ev, args.verbose, ifnames.lookup(ev) if ifnames else None)
            print(text, flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        stream.close()
    print("Error: the agent closed the event stream", file=sys.stderr)
    return 1
