"""``pilus observe``: flows of the cluster (through its Hubble Relay) or of one node
(``--node``, that node's ``hubble.sock``), with ``hubble observe``'s flags and formats.

Requests (as hubble's): ``--last N`` (20 when neither --last, --first, --all, --follow,
--since nor --until is given), ``--first N``, ``--all``, ``-f``, ``--since``/``--until``
(a duration such as ``5m`` or ``1h30m`` ago, or an RFC 3339 time). Filters build
FlowFilters as hubble's do: flags of one kind OR their values; flags of different kinds
AND; a flag of both directions (``--pod``, ``--ip``, ``--label``, ``--port`` ...) makes
two filters (source side, destination side) that the others' conditions join; ``--not``
sends the next filter flag to the deny-list instead.

Output (hubble's printer): ``compact`` (default) ``<Mon _2 15:04:05.000>[ [node]]: <src>
(<identity>) <arrow> <dst> (<identity>) <type> <verdict> (<summary>)``; ``dict``;
``table`` (not with --follow); ``json``/``jsonpb``: each GetFlowsResponse as one line of
protobuf JSON with the proto field names. Node status (unavailable nodes) and lost
events go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pilus.cli import common

__all__ = ["OUTPUTS", "FilterSpec", "build_request", "cmd_observe", "flow_type", "format_flow", "register"]

OUTPUTS = ("compact", "dict", "json", "jsonpb", "table")
DEFAULT_LAST = 20
CONNECT_TIMEOUT = 3.0

#: hubble's event type names (Cilium monitor API MessageType*) -> number
EVENT_TYPES = {"drop": 1, "debug": 2, "capture": 3, "trace": 4, "policy-verdict": 5, "recorder": 6,
               "trace-sock": 7, "l7": 129, "agent": 130}

#: filter flag -> (kind, side): side "from"/"to" sets one end, "both" makes two filters
FILTER_FLAGS: dict[str, tuple[str, str]] = {}
for _kind in ("pod", "label", "ip", "identity", "namespace", "port", "service", "fqdn"):
    FILTER_FLAGS[f"from-{_kind}"] = (_kind, "from")
    FILTER_FLAGS[f"to-{_kind}"] = (_kind, "to")
    FILTER_FLAGS[_kind] = (_kind, "both")
for _kind in ("verdict", "drop-reason-desc", "type", "protocol", "tcp-flags", "node-name", "traffic-direction",
              "http-method", "http-path", "http-status", "uuid"):
    FILTER_FLAGS[_kind] = (_kind, "one")
#: kind -> (source field, destination field) of flow.FlowFilter
SIDED_FIELDS = {"pod": ("source_pod", "destination_pod"), "label": ("source_label", "destination_label"),
                "ip": ("source_ip", "destination_ip"), "identity": ("source_identity", "destination_identity"),
                "namespace": ("source_pod", "destination_pod"), "port": ("source_port", "destination_port"),
                "service": ("source_service", "destination_service"),
                "fqdn": ("source_fqdn", "destination_fqdn")}
SHORT_FLAGS = {"pod": [], "label": ["-l"], "namespace": ["-n"], "type": ["-t"]}


# -- filters ----------------------------------------------------------------------------

class FilterSpec:
    """The filter flags in command-line order -> whitelist and blacklist FlowFilters."""

    def __init__(self) -> None:
        self.items: list[tuple[bool, str, str]] = []  # (negated, flag, value)
        self.negate_next = False

    def add(self, flag: str, value: str) -> None:
        self.items.append((self.negate_next, flag, value))
        self.negate_next = False

    def build(self) -> tuple[list, list]:
        if self.negate_next:
            raise common.CLIError("--not must be followed by a filter flag")
        allow, deny = _Tracker(), _Tracker()
        for negated, flag, value in self.items:
            (deny if negated else allow).add(flag, value)
        return allow.filters(), deny.filters()


class _Tracker:
    """hubble's filterTracker: a left (source side) and a right (destination side) filter."""

    def __init__(self) -> None:
        from pilus.hubble.protos import flow_pb2

        self.pb = flow_pb2
        self.left: Any = None
        self.right: Any = None
        self.sides: dict[str, set[str]] = {}

    def _side(self, which: str) -> Any:
        if which == "left":
            if self.left is None:
                self.left = self.pb.FlowFilter()
            return self.left
        if self.right is None:
            self.right = self.pb.FlowFilter()
        return self.right

    def add(self, flag: str, value: str) -> None:
        kind, side = FILTER_FLAGS[flag]
        seen = self.sides.setdefault(kind, set())
        seen.add(side)
        if "both" in seen and len(seen) > 1:
            other = next(s for s in seen if s != "both")
            raise common.CLIError(f"filters --{other}-{kind} and --{kind} cannot be combined")
        if side == "one":
            for which in ("left", "right"):
                _set_field(self._side(which), kind, value, self.pb)
            return
        src, dst = SIDED_FIELDS[kind]
        value = _sided_value(kind, value)
        if side == "from":
            for which in ("left", "right"):
                getattr(self._side(which), src).append(value)
        elif side == "to":
            for which in ("left", "right"):
                getattr(self._side(which), dst).append(value)
        else:
            getattr(self._side("left"), src).append(value)
            getattr(self._side("right"), dst).append(value)

    def filters(self) -> list:
        out = [f for f in (self.left, self.right) if f is not None]
        if len(out) == 2 and out[0] == out[1]:
            return out[:1]
        return out


def _sided_value(kind: str, value: str):
    if kind == "namespace":
        return value.rstrip("/") + "/"  # hubble: every pod of the namespace
    if kind == "identity":
        return _identity(value)
    return value


def _identity(value: str) -> int:
    from pilus.identity.reserved import reserved_by_name

    if value.isdigit():
        return int(value)
    reserved = reserved_by_name(value)
    if reserved is None:
        raise common.CLIError(f"invalid identity {value!r}: expected a number or a reserved name such as world")
    return reserved.id


def _enum(enum, value: str, what: str) -> int:
    name = value.strip().upper().replace("-", "_")
    try:
        return enum.Value(name)
    except ValueError:
        names = ", ".join(n for n in enum.DESCRIPTOR.values_by_name if not n.endswith("UNKNOWN"))
        raise common.CLIError(f"invalid {what} {value!r}: expected one of {names}") from None


def _set_field(f, kind: str, value: str, pb) -> None:
    if kind == "verdict":
        f.verdict.append(_enum(pb.Verdict, value, "verdict"))
    elif kind == "drop-reason-desc":
        f.drop_reason_desc.append(_enum(pb.DropReason, value, "drop reason"))
    elif kind == "traffic-direction":
        f.traffic_direction.append(_enum(pb.TrafficDirection, value, "traffic direction"))
    elif kind == "type":
        f.event_type.append(_event_type(value, pb))
    elif kind == "tcp-flags":
        f.tcp_flags.append(_tcp_flags(value, pb))
    else:
        field = {"protocol": "protocol", "node-name": "node_name", "http-method": "http_method",
                 "http-path": "http_path", "http-status": "http_status_code", "uuid": "uuid"}[kind]
        getattr(f, field).append(value)


def _event_type(value: str, pb):
    name, _, sub = value.partition(":")
    if name.isdigit():
        number = int(name)
    elif name in EVENT_TYPES:
        number = EVENT_TYPES[name]
    else:
        raise common.CLIError(f"invalid event type {value!r}: expected one of {', '.join(EVENT_TYPES)} "
                              "(optionally TYPE:SUBTYPE, e.g. trace:to-endpoint)")
    out = pb.EventTypeFilter(type=number)
    if sub:
        out.match_sub_type = True
        if sub.isdigit():
            out.sub_type = int(sub)
        else:
            from pilus.datapath.reasons import TRACE_POINTS

            points = {n: p for p, n in TRACE_POINTS.items()}
            if number != EVENT_TYPES["trace"] or sub not in points:
                raise common.CLIError(f"invalid event sub type {sub!r} of {name}: use a number"
                                      + (f" or one of {', '.join(points)}" if number == EVENT_TYPES["trace"] else ""))
            out.sub_type = points[sub]
    return out


def _tcp_flags(value: str, pb):
    names = [n.strip().upper() for n in value.split(",") if n.strip()]
    known = set(pb.TCPFlags.DESCRIPTOR.fields_by_name)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise common.CLIError(f"invalid TCP flags {value!r}: expected a comma-separated list of "
                              f"{', '.join(sorted(known))}")
    return pb.TCPFlags(**{n: True for n in names})


class _FilterAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        spec = getattr(namespace, "filter_spec", None)
        if spec is None:
            spec = FilterSpec()
            namespace.filter_spec = spec
        spec.add(self.dest.removeprefix("filter_").replace("_", "-"), values)


class _NotAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        spec = getattr(namespace, "filter_spec", None)
        if spec is None:
            spec = FilterSpec()
            namespace.filter_spec = spec
        spec.negate_next = True


# -- times --------------------------------------------------------------------------------

_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)"
_DURATION = re.compile(rf"(?:{_DURATION_PART})+")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """A Go duration (``5m``, ``1h30m``, ``90s``) before ``now``, or an RFC 3339 time (no
    zone: UTC)."""
    text = text.strip()
    now = now or datetime.now(UTC)
    if _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in re.findall(_DURATION_PART, text))
        return now - timedelta(seconds=seconds)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise common.CLIError(f"invalid time {text!r}: expected a duration such as 5m or 1h30m, or an RFC 3339 "
                              "time such as 2026-12-03T10:00:00Z") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# -- the request ----------------------------------------------------------------------------

def build_request(args: argparse.Namespace, now: datetime | None = None):
    """The GetFlowsRequest of the parsed flags (hubble's rules for number/first/follow)."""
    from pilus.hubble.protos import observer_pb2

    if args.first is not None and (args.last is not None or args.all or args.follow):
        raise common.CLIError("--first cannot be combined with --last, --all or --follow")
    if args.output == "table" and args.follow:
        raise common.CLIError("output format table is not compatible with --follow")
    spec: FilterSpec = getattr(args, "filter_spec", None) or FilterSpec()
    allow, deny = spec.build()
    req = observer_pb2.GetFlowsRequest(follow=args.follow, whitelist=allow, blacklist=deny)
    if args.since:
        req.since.FromDatetime(parse_time(args.since, now))
    if args.until:
        req.until.FromDatetime(parse_time(args.until, now))
    if args.all:
        req.number = 0
    elif args.first is not None:
        req.number, req.first = args.first, True
    elif args.last is not None:
        req.number = args.last
    elif not (args.follow or args.since or args.until):
        req.number = DEFAULT_LAST
    return req


# -- output ---------------------------------------------------------------------------------

def _fmt_time(ts) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "N/A"
    t = datetime.fromtimestamp(ts.seconds, UTC) + timedelta(microseconds=ts.nanos // 1000)
    return f"{t:%b} {t.day:2d} {t:%H:%M:%S}.{ts.nanos // 1_000_000:03d}"  # Go's StampMilli


def _fmt_identity(identity: int) -> str:
    from pilus.identity.reserved import reserved_by_id

    reserved = reserved_by_id(identity)
    return f"({reserved.name})" if reserved is not None else f"(ID:{identity})"


def _ports(f) -> tuple[str, str]:
    which = f.l4.WhichOneof("protocol") if f.HasField("l4") else None
    if which in ("TCP", "UDP", "SCTP"):
        l4 = getattr(f.l4, which)
        return str(l4.source_port), str(l4.destination_port)
    return "", ""


def _host(ip: str, port: str, ns: str, pod: str, svc: str, names, *, translate: bool) -> str:
    host = ip
    if translate:
        if pod:
            host = f"{ns}/{pod}" if ns else pod
        elif svc:
            host = f"{ns}/{svc}" if ns else svc
        elif names:
            host = ",".join(names)
    if port and port != "0":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host


def host_names(f, *, translate: bool = True) -> tuple[str, str]:
    """Both ends as hubble prints them: ``ns/pod:port``, a service, DNS names or the IP."""
    if not f.HasField("IP"):
        if f.HasField("ethernet"):
            return f.ethernet.source, f.ethernet.destination
        return "", ""
    sport, dport = _ports(f)
    src_ns, dst_ns = f.source.namespace, f.destination.namespace
    src_svc = dst_svc = ""
    if f.HasField("source_service"):
        src_ns, src_svc = f.source_service.namespace, f.source_service.name
    if f.HasField("destination_service"):
        dst_ns, dst_svc = f.destination_service.namespace, f.destination_service.name
    return (_host(f.IP.source, sport, src_ns, f.source.pod_name, src_svc, f.source_names, translate=translate),
            _host(f.IP.destination, dport, dst_ns, f.destination.pod_name, dst_svc, f.destination_names,
                  translate=translate))


def flow_type(f) -> str:
    """hubble's GetFlowType: ``to-endpoint``, ``Policy denied``, ``policy-verdict:L3-L4 INGRESS``,
    ``http-request`` ..."""
    from pilus.datapath.reasons import drop_reason_desc, policy_match_desc, trace_point_desc
    from pilus.hubble.protos import flow_pb2

    if f.HasField("l7"):
        record = f.l7.WhichOneof("record")
        kind = flow_pb2.L7FlowType.Name(f.l7.type).lower()
        return {"http": "http", "dns": "dns", "kafka": "kafka"}.get(record or "", "l7") + "-" + kind
    etype, sub = f.event_type.type, f.event_type.sub_type
    if etype == EVENT_TYPES["trace"]:
        return trace_point_desc(sub)
    if etype == EVENT_TYPES["drop"]:
        return drop_reason_desc(sub)
    if etype == EVENT_TYPES["policy-verdict"]:
        return (f"policy-verdict:{policy_match_desc(f.policy_match_type)} "
                f"{flow_pb2.TrafficDirection.Name(f.traffic_direction)}")
    return "UNKNOWN"


def verdict_text(f) -> str:
    from pilus.hubble.protos import flow_pb2

    name = flow_pb2.Verdict.Name(f.verdict)
    if f.event_type.type == EVENT_TYPES["policy-verdict"]:
        return {flow_pb2.FORWARDED: "ALLOWED", flow_pb2.REDIRECTED: "ALLOWED", flow_pb2.DROPPED: "DENIED",
                flow_pb2.ERROR: "DENIED", flow_pb2.AUDIT: "AUDITED"}.get(f.verdict, name)
    return name


def format_flow(response, output: str = "compact", *, node_name: bool = False, translate: bool = True) -> str:
    """One flow response as compact or dict text (``table`` rows: ``table_row``)."""
    f = response.flow
    src, dst = host_names(f, translate=translate)
    if output == "dict":
        lines = [f"  TIMESTAMP: {_fmt_time(f.time)}"]
        if node_name:
            lines.append(f"       NODE: {f.node_name}")
        lines += [f"     SOURCE: {src}", f"DESTINATION: {dst}", f"       TYPE: {flow_type(f)}",
                  f"    VERDICT: {verdict_text(f)}", f"    SUMMARY: {f.Summary}"]
        return "\n".join(lines)
    src_id, dst_id = _fmt_identity(f.source.identity), _fmt_identity(f.destination.identity)
    arrow = "->"
    if not f.HasField("is_reply"):
        arrow = "<>"  # direction unknown
    elif f.is_reply.value:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    node = f" [{f.node_name}]" if node_name else ""
    return (f"{_fmt_time(f.time)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
            f"{flow_type(f)} {verdict_text(f)} ({f.Summary})")


TABLE_HEADER = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(response, *, node_name: bool = False, translate: bool = True) -> list[str]:
    f = response.flow
    src, dst = host_names(f, translate=translate)
    row = [_fmt_time(f.time), src, dst, flow_type(f), verdict_text(f), f.Summary]
    if node_name:
        row.insert(1, f.node_name)
    return row


def format_table(rows: list[list[str]], *, node_name: bool = False) -> str:
    """Go's tabwriter (min width 2, padding 3): every column but the last padded."""
    header = list(TABLE_HEADER)
    if node_name:
        header.insert(1, "NODE")
    rows = [header, *rows]
    widths = [max(max(len(r[i]) for r in rows) + 3, 2) for i in range(len(header) - 1)]
    return "\n".join("".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + r[-1] for r in rows)


def to_json(message) -> str:
    from google.protobuf.json_format import MessageToDict

    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), separators=(",", ":"))


def format_node_status(response) -> str | None:
    """hubble's text for a node_status response; None for the informational ones."""
    from pilus.hubble.protos import relay_pb2

    s = response.node_status
    names = list(s.node_names)
    joined = ", ".join(names)
    prefix = f"{_fmt_time(response.time)} [{response.node_name}]"
    if s.state_change == relay_pb2.NODE_UNAVAILABLE:
        return f"{prefix}: {len(names)} nodes are unavailable: {joined}"
    if s.state_change == relay_pb2.NODE_ERROR:
        return f"{prefix}: Error {json.dumps(s.message)} on {len(names)} nodes: {joined}"
    return None


def format_lost(response) -> str:
    from pilus.hubble.protos import flow_pb2

    lost = response.lost_events
    cpu = lost.cpu.value if lost.HasField("cpu") else 0
    return f"EVENTS LOST: {flow_pb2.LostEventSource.Name(lost.source)} CPU({cpu}) {lost.num_events_lost}"


class Printer:
    """Writes responses in one output format; ``close()`` ends a table."""

    def __init__(self, output: str, *, node_name: bool = False, translate: bool = True,
                 out=None, err=None) -> None:
        self.output, self.node_name, self.translate = output, node_name, translate
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.lines = 0
        self.rows: list[list[str]] = []

    def write(self, response) -> None:
        kind = response.WhichOneof("response_types")
        if self.output in ("json", "jsonpb"):
            if kind == "node_status":
                if format_node_status(response) is not None:
                    print(to_json(response), file=self.err, flush=True)
            elif kind is not None:
                print(to_json(response), file=self.out, flush=True)
            return
        if kind == "node_status":
            text = format_node_status(response)
            if text is not None:
                print(text, file=self.err, flush=True)
        elif kind == "lost_events":
            print(format_lost(response), file=self.err, flush=True)
        elif kind == "flow":
            if self.output == "table":
                self.rows.append(table_row(response, node_name=self.node_name, translate=self.translate))
                return
            if self.output == "dict" and self.lines:
                print("------------", file=self.out)
            print(format_flow(response, self.output, node_name=self.node_name, translate=self.translate),
                  file=self.out, flush=True)
            self.lines += 1

    def close(self) -> None:
        if self.output == "table" and self.rows:
            print(format_table(self.rows, node_name=self.node_name), file=self.out, flush=True)
            self.rows.clear()


# -- where to ask -------------------------------------------------------------------------

def server_address(args: argparse.Namespace) -> tuple[str, str]:
    """(grpc target, what to call it in errors): --server, else --node's / --socket's
    hubble.sock, else the cluster's relay."""
    if getattr(args, "server", None):
        server = args.server
        target = server if server.startswith("unix:") else server.removeprefix("http://")
        return target, f"the Hubble server at {server}"
    sock = getattr(args, "socket", None) or os.environ.get("PILUS_SOCK")
    if sock or getattr(args, "node", None):
        if not sock:
            name = common.cluster_name(args)
            info = common.read_cluster_file(name)
            if info is None:
                raise common.CLIError(common.no_cluster_message(name))
            node = common.pick_node(info, name, args.node)
            sock = common.node_socket(node)
            what = f"node {node.get('name')}"
        else:
            what = f"the agent of {sock}"
        hubble = Path(sock).parent / "hubble.sock"
        if not hubble.exists():
            raise common.CLIError(f"{what} has no Hubble socket ({hubble} is missing): is its agent running "
                                  "with --enable-hubble?")
        return f"unix:{hubble}", f"{what}'s Hubble server ({hubble})"
    name = common.cluster_name(args)
    info = common.read_cluster_file(name)
    if info is None:
        raise common.CLIError(common.no_cluster_message(name))
    address = info.get("relay_address")
    if not address:
        raise common.CLIError(f"cluster '{name}' runs no Hubble Relay (it was made before pilus had one): "
                              "ask one node with --node NODE")
    return address, f"the Hubble Relay of cluster '{name}' at {address}"


def connect(args: argparse.Namespace):
    import grpc

    target, what = server_address(args)
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
    except grpc.FutureTimeoutError:
        channel.close()
        hint = " (is the cluster's supervisor running? see relay.log in its state directory)" \
            if "Relay" in what else ""
        raise common.CLIError(f"{what} does not answer{hint}") from None
    return channel, what


# -- the command ---------------------------------------------------------------------------

def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("observe", parents=[parent], help="show flows (hubble observe)",
                       description="Print the flows of the cluster (through its Hubble Relay) or of one node "
                                   "(--node), filtered as hubble observe filters them.",
                       epilog="examples:\n  pilus observe -f --verdict DROPPED\n"
                              "  pilus observe --from-pod default/xwing --to-label class=deathstar --port 80 -o json\n"
                              "  pilus observe --type policy-verdict --last 100 --since 5m\n"
                              "  pilus observe --node default-node2 --not --namespace kube-system",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sel = p.add_argument_group("selection")
    sel.add_argument("--last", type=common.positive_int, metavar="N", help=f"the last N flows (default {DEFAULT_LAST})")
    sel.add_argument("--first", type=common.positive_int, metavar="N", help="the first N flows in the buffers")
    sel.add_argument("--all", action="store_true", help="every flow in the buffers")
    sel.add_argument("-f", "--follow", action="store_true", help="follow new flows until Ctrl-C")
    sel.add_argument("--since", metavar="TIME", help="flows since TIME (5m, 1h30m, or RFC 3339)")
    sel.add_argument("--until", metavar="TIME", help="flows until TIME (5m, 1h30m, or RFC 3339)")
    filt = p.add_argument_group("filters (each may be repeated; --not negates the next one)")
    filt.add_argument("--not", nargs=0, action=_NotAction, help="negate the next filter flag")
    helps = {"pod": "[NAMESPACE/]POD-PREFIX", "label": "SELECTOR (e.g. class=deathstar, reserved:world)",
             "ip": "IP or CIDR", "identity": "NUMBER or reserved name", "namespace": "NAMESPACE",
             "port": "PORT", "service": "[NAMESPACE/]SERVICE", "fqdn": "DNS name pattern"}
    for flag, (kind, side) in FILTER_FLAGS.items():
        names = [f"--{flag}"] + (SHORT_FLAGS.get(kind, []) if side == "both" or kind == "type" else [])
        what = {"from": "source", "to": "destination", "both": "either end"}.get(side)
        text = f"{what}: {helps[kind]}" if what else {
            "verdict": "FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED",
            "drop-reason-desc": "a drop reason, e.g. POLICY_DENIED",
            "type": f"TYPE[:SUBTYPE], TYPE one of {', '.join(EVENT_TYPES)}",
            "protocol": "tcp, udp, icmp, icmpv6, sctp, http, dns, kafka",
            "tcp-flags": "comma-separated flags that must all be set, e.g. SYN,ACK",
            "node-name": "[CLUSTER/]NODE pattern (* matches within a name)",
            "traffic-direction": "ingress or egress", "http-method": "e.g. GET",
            "http-path": "regular expression", "http-status": "code or prefix, e.g. 404, 5+",
            "uuid": "a flow's UUID"}[kind]
        filt.add_argument(*names, dest="filter_" + flag.replace("-", "_"), action=_FilterAction,
                          metavar="VALUE", help=text, default=argparse.SUPPRESS)
    out = p.add_argument_group("output")
    out.add_argument("-o", "--output", choices=OUTPUTS, default="compact", help="output format (default compact)")
    out.add_argument("--print-node-name", action="store_true", help="print each flow's node name")
    out.add_argument("--numeric", action="store_true", help="IP addresses instead of pod and service names")
    out.add_argument("--print-raw-filters", action="store_true",
                     help="print the request's allow-list and deny-list as JSON and exit")
    out.add_argument("--server", metavar="ADDRESS",
                     help="a Hubble server or relay (HOST:PORT or unix:PATH) instead of the cluster's relay")
    p.set_defaults(func=cmd_observe)


def cmd_observe(args: argparse.Namespace) -> int:
    req = build_request(args)
    if args.print_raw_filters:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps({
            "allowlist": [MessageToDict(f, preserving_proto_field_name=True) for f in req.whitelist],
            "denylist": [MessageToDict(f, preserving_proto_field_name=True) for f in req.blacklist]}, indent=2))
        return 0
    import grpc

    from pilus.hubble.protos import observer_pb2_grpc

    channel, what = connect(args)
    printer = Printer(args.output, node_name=args.print_node_name, translate=not args.numeric)
    stream = observer_pb2_grpc.ObserverStub(channel).GetFlows(req)
    try:
        for response in stream:
            printer.write(response)
    except KeyboardInterrupt:
        stream.cancel()
        return 0
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise common.CLIError(f"invalid request: {details}") from None
        raise common.CLIError(f"{what}: {code.name}: {details}") from None
    finally:
        printer.close()
        channel.close()
    return 0
