"""Hubble's FlowFilter semantics over flow.Flow messages (Cilium pkg/hubble/filters).

Rules:
- A FlowFilter matches a flow when every field it sets matches (AND); a repeated
  field matches when any of its values does (OR).
- GetFlows keeps a flow when it matches any whitelist filter (or there is none) and no
  blacklist filter (``hubble observe --not`` puts a filter in the blacklist).
- Filters are compiled once per request; a value that cannot be used (a bad IP, port,
  regular expression, selector, pattern or protocol) raises FilterError, which the
  server answers with INVALID_ARGUMENT and the reason. A field this module does not
  implement is an error too (test_hubble_filters checks that every field is covered),
  never silently ignored.

Field by field, where Hubble's meaning is not just "equals":
- ``source_pod`` / ``destination_pod``: ``namespace/prefix``: the namespace must be
  equal and the pod name must start with the prefix, so ``default/`` is every pod of
  namespace default; a value without ``/`` is a pod prefix in namespace ``default``;
  an end with neither namespace nor pod name (world) matches none. ``*_service`` likewise.
- ``event_type``: type 0 is any type; the sub type counts only with ``match_sub_type``.
- ``*_label`` and ``node_labels``: Kubernetes label selectors (``app=x``,
  ``app!=x``, ``app in (a,b)``, ``app notin (a)``, ``app``, ``!app``, comma = AND)
  whose keys may carry a Cilium source (``k8s:app``, ``reserved:world``); no source
  matches any (the policy engine's Requirement does the matching).
- ``*_ip``: addresses or CIDRs. ``*_port``: 0-65535, on TCP/UDP/SCTP.
- ``protocol``: tcp, udp, sctp, icmp (= icmpv4), icmpv6, vrrp, igmp, or the L7
  protocols http, dns, kafka.
- ``tcp_flags``: the flow has every flag that one of the filters sets.
- ``reply``: a flow whose direction of reply is unknown matches neither value.
- ``http_status_code``: ``404`` exactly, or ``4+`` / ``40+`` for a prefix of the code.
- ``http_path`` (the URL's path), ``http_url`` and ``dns_query``: regular
  expressions, matched anywhere (Go's MatchString).
- ``node_name``: ``[cluster/]node`` patterns of ``[-0-9a-z.*]`` where ``*`` matches
  ``[-0-9a-z]*``; the cluster defaults to ``default``, and so does the cluster of a
  flow whose node name carries none.
- ``*_fqdn``: DNS name patterns where ``*`` matches within one label.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from urllib.parse import urlsplit

from pilus.hubble.protos import flow_pb2
from pilus.identity.labels import LabelError, Labels, parse_label
from pilus.policy.selector import EndpointSelector, Requirement, SelectorError, split_key

Flow = flow_pb2.Flow
Predicate = Callable[[Flow], bool]
DEFAULT_NAMESPACE = "default"
DEFAULT_CLUSTER = "default"
L7_EVENT_TYPE = 129  # Cilium's MessageTypeAccessLog


class FilterError(ValueError):
    """A filter that cannot be applied; the message names the field and the value."""


# -- helpers ----------------------------------------------------------------------------

def _any(values: Iterable, test: Callable) -> Predicate:
    vals = list(values)
    return lambda f: any(test(f, v) for v in vals)


def _regexes(field: str, patterns: Sequence[str]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise FilterError(f"{field}: invalid regular expression {p!r}: {exc}") from None
    return out


def _networks(field: str, values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise FilterError(f"{field}: {v!r} is neither an IP address nor a CIDR") from None
    return out


def _ip_matcher(field: str, values: Sequence[str], get: Callable[[Flow], str]) -> Predicate:
    nets = _networks(field, values)

    def match(f: Flow) -> bool:
        text = get(f)
        if not text:
            return False
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in nets)
    return match


def _namespaced(field: str, values: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if not v:
            raise FilterError(f"{field}: must be [namespace/]<name prefix>, got an empty string")
        ns, sep, prefix = v.partition("/")
        if sep and not ns and not prefix:
            raise FilterError(f"{field}: must be [namespace/]<name prefix>, got {v!r}")
        out.append((ns, prefix.split("/")[0]) if sep else (DEFAULT_NAMESPACE, v))
    return out


def _pod_matcher(field: str, values: Sequence[str], get: Callable[[Flow], flow_pb2.Endpoint]) -> Predicate:
    pairs = _namespaced(field, values)

    def match(f: Flow) -> bool:
        ep = get(f)
        if not ep.namespace and not ep.pod_name:
            return False
        return any(ep.namespace == ns and ep.pod_name.startswith(prefix) for ns, prefix in pairs)
    return match


def _service_matcher(field: str, values: Sequence[str], get: Callable[[Flow], flow_pb2.Service]) -> Predicate:
    pairs = _namespaced(field, values)

    def match(f: Flow) -> bool:
        svc = get(f)
        if not svc.namespace and not svc.name:
            return False
        return any(svc.namespace == ns and svc.name.startswith(p) for ns, p in pairs)
    return match


# -- label selectors ------------------------------------------------------------------------

_SET_OP = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_OP = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")
_KEY = re.compile(r"^(?P<neg>!?)\s*(?P<key>[^\s!=(),]+)$")


def _split_requirements(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_selector(text: str) -> EndpointSelector:
    """A Kubernetes label selector string with Cilium sources in the keys."""
    reqs: list[Requirement] = []
    try:
        for part in _split_requirements(text.strip()):
            if not part:
                raise SelectorError("empty requirement")
            if m := _SET_OP.match(part):
                src, key = split_key(m["key"])
                values = tuple(v.strip() for v in m["values"].split(",") if v.strip())
                reqs.append(Requirement(key, src, "In" if m["op"] == "in" else "NotIn", values))
            elif m := _EQ_OP.match(part):
                src, key = split_key(m["key"])
                reqs.append(Requirement(key, src, "NotIn" if m["op"] == "!=" else "In", (m["value"],)))
            elif m := _KEY.match(part):
                src, key = split_key(m["key"])
                reqs.append(Requirement(key, src, "DoesNotExist" if m["neg"] else "Exists"))
            else:
                raise SelectorError(f"cannot parse {part!r}")
    except SelectorError as exc:
        raise FilterError(f"invalid label selector {text!r}: {exc}") from None
    return EndpointSelector(tuple(reqs))


@lru_cache(maxsize=4096)
def _labels(strings: tuple[str, ...]) -> Labels:
    out = []
    for s in strings:
        try:
            out.append(parse_label(s))
        except LabelError:
            continue  # a label pilus would not write; it cannot be selected on
    return Labels(out)


def _label_matcher(field: str, values: Sequence[str], get: Callable[[Flow], Sequence[str]]) -> Predicate:
    selectors = [parse_selector(v) for v in values]
    return lambda f: any(s.matches(_labels(tuple(get(f)))) for s in selectors)


# -- patterns ---------------------------------------------------------------------------------

_NODE_PATTERN = re.compile(r"^[-0-9a-z.*]+$")


def _node_regex(pattern: str) -> re.Pattern[str]:
    cluster, sep, node = pattern.partition("/")
    if not sep:
        cluster, node = DEFAULT_CLUSTER, pattern
    for part in (cluster, node):
        if not _NODE_PATTERN.match(part):
            raise FilterError(f"node_name: invalid pattern {pattern!r}: use [cluster/]node of [-0-9a-z.*]")
    def rx(p: str) -> str:
        return "".join("[-0-9a-z]*" if c == "*" else re.escape(c) for c in p)
    return re.compile(rf"\A{rx(cluster)}/{rx(node)}\Z")


def _node_name(f: Flow) -> str:
    return f.node_name if "/" in f.node_name else f"{DEFAULT_CLUSTER}/{f.node_name}"


def _fqdn_regex(pattern: str) -> re.Pattern[str]:
    p = pattern.strip().lower().rstrip(".")
    if not p or not re.match(r"^[-a-z0-9_.*]+$", p):
        raise FilterError(f"fqdn: invalid pattern {pattern!r}")
    return re.compile(r"\A" + "".join("[-a-z0-9_]*" if c == "*" else re.escape(c) for c in p) + r"\Z")


def _fqdn_matcher(values: Sequence[str], get: Callable[[Flow], Sequence[str]]) -> Predicate:
    rxs = [_fqdn_regex(v) for v in values]
    return lambda f: any(r.match(n.lower().rstrip(".")) for n in get(f) for r in rxs)


# -- L4 / L7 ----------------------------------------------------------------------------

L4_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmp": "ICMPv4", "icmpv4": "ICMPv4",
                "icmpv6": "ICMPv6", "vrrp": "VRRP", "igmp": "IGMP"}
L7_PROTOCOLS = {"http": "http", "dns": "dns", "kafka": "kafka"}


def _protocol_matcher(values: Sequence[str]) -> Predicate:
    l4, l7 = set(), set()
    for v in values:
        name = v.strip().lower()
        if name in L4_PROTOCOLS:
            l4.add(L4_PROTOCOLS[name])
        elif name in L7_PROTOCOLS:
            l7.add(L7_PROTOCOLS[name])
        else:
            known = ", ".join([*L4_PROTOCOLS, *L7_PROTOCOLS])
            raise FilterError(f"protocol: unknown protocol {v!r} (one of {known})")
    return lambda f: (f.l4.WhichOneof("protocol") in l4) or (f.l7.WhichOneof("record") in l7)


def _ports(field: str, values: Sequence[str]) -> set[int]:
    out = set()
    for v in values:
        if not v.strip().isdigit() or int(v) > 65535:
            raise FilterError(f"{field}: invalid port {v!r} (0-65535)")
        out.add(int(v))
    return out


def _port_of(f: Flow, which: str) -> int | None:
    kind = f.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        return getattr(getattr(f.l4, kind), which)
    return None


def _tcp_flags_matcher(values: Sequence[flow_pb2.TCPFlags]) -> Predicate:
    names = [n for n in flow_pb2.TCPFlags.DESCRIPTOR.fields_by_name]
    wanted = [[n for n in names if getattr(v, n)] for v in values]

    def match(f: Flow) -> bool:
        if f.l4.WhichOneof("protocol") != "TCP":
            return False
        flags = f.l4.TCP.flags
        return any(all(getattr(flags, n) for n in want) for want in wanted)
    return match


def _status_matcher(values: Sequence[str]) -> Predicate:
    exact, prefixes = set(), []
    for v in values:
        if re.fullmatch(r"[1-5][0-9]{2}", v):
            exact.add(int(v))
        elif re.fullmatch(r"[1-5][0-9]?\+", v):
            prefixes.append(v[:-1])
        else:
            raise FilterError(f"http_status_code: invalid status code {v!r} (e.g. 404, 4+, 40+)")

    def match(f: Flow) -> bool:
        if f.l7.WhichOneof("record") != "http" or not f.l7.http.code:
            return False
        code = f.l7.http.code
        return code in exact or any(str(code).startswith(p) for p in prefixes)
    return match


def _http_path(f: Flow) -> str:
    try:
        return urlsplit(f.l7.http.url).path
    except ValueError:
        return ""


def _is_http(f: Flow) -> bool:
    return f.l7.WhichOneof("record") == "http"


def _cel(values) -> Predicate:
    if values.cel_expression:
        raise FilterError("experimental.cel_expression: CEL expressions are not supported")
    return lambda f: True


# -- the table --------------------------------------------------------------------------

def _src(f: Flow) -> flow_pb2.Endpoint:
    return f.source


def _dst(f: Flow) -> flow_pb2.Endpoint:
    return f.destination


def _in(get: Callable[[Flow], object], values: Iterable) -> Predicate:
    allowed = set(values)
    return lambda f: get(f) in allowed


#: FlowFilter field -> (its values -> predicate); every field of FlowFilter has a row
FIELDS: dict[str, Callable[[object], Predicate]] = {
    "uuid": lambda v: _in(lambda f: f.uuid, v),
    "source_ip": lambda v: _ip_matcher("source_ip", v, lambda f: f.IP.source),
    "source_ip_xlated": lambda v: _ip_matcher("source_ip_xlated", v, lambda f: f.IP.source_xlated),
    "destination_ip": lambda v: _ip_matcher("destination_ip", v, lambda f: f.IP.destination),
    "source_pod": lambda v: _pod_matcher("source_pod", v, _src),
    "destination_pod": lambda v: _pod_matcher("destination_pod", v, _dst),
    "source_fqdn": lambda v: _fqdn_matcher(v, lambda f: f.source_names),
    "destination_fqdn": lambda v: _fqdn_matcher(v, lambda f: f.destination_names),
    "source_label": lambda v: _label_matcher("source_label", v, lambda f: f.source.labels),
    "destination_label": lambda v: _label_matcher("destination_label", v, lambda f: f.destination.labels),
    "node_labels": lambda v: _label_matcher("node_labels", v, lambda f: f.node_labels),
    "source_service": lambda v: _service_matcher("source_service", v, lambda f: f.source_service),
    "destination_service": lambda v: _service_matcher("destination_service", v, lambda f: f.destination_service),
    "source_workload": lambda v: _any(v, lambda f, w: any(
        (not w.name or w.name == x.name) and (not w.kind or w.kind == x.kind) for x in f.source.workloads)),
    "destination_workload": lambda v: _any(v, lambda f, w: any(
        (not w.name or w.name == x.name) and (not w.kind or w.kind == x.kind) for x in f.destination.workloads)),
    "source_cluster_name": lambda v: _in(lambda f: f.source.cluster_name, v),
    "destination_cluster_name": lambda v: _in(lambda f: f.destination.cluster_name, v),
    "source_identity": lambda v: _in(lambda f: f.source.identity, v),
    "destination_identity": lambda v: _in(lambda f: f.destination.identity, v),
    "traffic_direction": lambda v: _in(lambda f: f.traffic_direction, v),
    "verdict": lambda v: _in(lambda f: f.verdict, v),
    "drop_reason_desc": lambda v: _in(lambda f: f.drop_reason_desc, v),
    "interface": lambda v: _any(v, lambda f, i: f.HasField("interface")
                                and (not i.index or i.index == f.interface.index)
                                and (not i.name or i.name == f.interface.name)),
    "event_type": lambda v: _any(v, lambda f, t: f.HasField("event_type")
                                 and (not t.type or f.event_type.type == t.type)
                                 and (not t.match_sub_type or f.event_type.sub_type == t.sub_type)),
    "protocol": _protocol_matcher,
    "source_port": lambda v: (lambda ports: lambda f: _port_of(f, "source_port") in ports)(
        _ports("source_port", v)),
    "destination_port": lambda v: (lambda ports: lambda f: _port_of(f, "destination_port") in ports)(
        _ports("destination_port", v)),
    "reply": lambda v: _in(lambda f: f.is_reply.value if f.HasField("is_reply") else None, v),
    "tcp_flags": _tcp_flags_matcher,
    "node_name": lambda v: (lambda rxs: lambda f: any(r.match(_node_name(f)) for r in rxs))(
        [_node_regex(p) for p in v]),
    "ip_version": lambda v: _in(lambda f: f.IP.ipVersion, v),
    "encrypted": lambda v: _in(lambda f: f.IP.encrypted, v),
    "trace_id": lambda v: _in(lambda f: f.trace_context.parent.trace_id or None, v),
    "ip_trace_id": lambda v: _in(lambda f: f.ip_trace_id.trace_id if f.HasField("ip_trace_id") else None, v),
    "http_status_code": _status_matcher,
    "http_method": lambda v: (lambda methods: lambda f: _is_http(f) and f.l7.http.method.upper() in methods)(
        {m.upper() for m in v}),
    "http_path": lambda v: (lambda rxs: lambda f: _is_http(f) and any(r.search(_http_path(f)) for r in rxs))(
        _regexes("http_path", v)),
    "http_url": lambda v: (lambda rxs: lambda f: _is_http(f) and any(r.search(f.l7.http.url) for r in rxs))(
        _regexes("http_url", v)),
    "http_header": lambda v: _any(v, lambda f, h: _is_http(f) and any(
        x.key == h.key and x.value == h.value for x in f.l7.http.headers)),
    "dns_query": lambda v: (lambda rxs: lambda f: f.l7.WhichOneof("record") == "dns"
                            and any(r.search(f.l7.dns.query) for r in rxs))(_regexes("dns_query", v)),
    "experimental": _cel,
}


def compile_filter(ff: flow_pb2.FlowFilter) -> Predicate:
    """One FlowFilter -> a predicate: the AND of the fields it sets."""
    if ff.http_status_code and ff.event_type and not any(t.type == L7_EVENT_TYPE for t in ff.event_type):
        raise FilterError("http_status_code: filtering by HTTP status code needs an event type filter "
                          "that matches L7 events (type 129) or none")
    preds: list[Predicate] = []
    for field, value in ff.ListFields():
        build = FIELDS.get(field.name)
        if build is None:
            raise FilterError(f"{field.name}: this filter is not supported")
        preds.append(build(value))
    return lambda f: all(p(f) for p in preds)


class FlowMatcher:
    """Whitelist (any) minus blacklist (any), compiled."""

    def __init__(self, whitelist: Sequence[flow_pb2.FlowFilter] = (),
                 blacklist: Sequence[flow_pb2.FlowFilter] = ()) -> None:
        self._white = [compile_filter(ff) for ff in whitelist]
        self._black = [compile_filter(ff) for ff in blacklist]

    def __call__(self, flow: Flow) -> bool:
        if any(p(flow) for p in self._black):
            return False
        return not self._white or any(p(flow) for p in self._white)


__all__ = ["FIELDS", "FilterError", "FlowMatcher", "compile_filter", "parse_selector"]
