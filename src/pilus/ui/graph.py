"""The service map's model, pure: Hubble flows -> rows of the flow table and a graph of
workloads and the edges between them. No I/O; ``server.py`` feeds it and serves it.

Rules (Hubble UI's, where it has one):

- **Node (box) of a pod**: ``<namespace>/<app>``, the app being the first of the labels
  ``app``, ``k8s-app``, ``app.kubernetes.io/name`` (of any source), else the pod name; so
  the replicas of one app are one box.
- **Node of anything else**: the reserved entity of its labels or identity (``world``,
  ``host``, ``remote-node`` ...), no namespace; an unknown peer with an IP is ``world``,
  one with only an identity ``identity-<n>``.
- **Edge**: (source node, destination node, destination port, protocol). A reply
  (``is_reply``) counts for the connection it answers: ends swapped, its source port is
  the port.
- **Counts**: each flow adds one to ``forwarded`` (FORWARDED, REDIRECTED, TRANSLATED,
  TRACED), ``dropped`` (DROPPED, ERROR) or ``audit`` (AUDIT). A denied packet usually
  gives two flows (its policy verdict and its drop): both count, as Hubble UI counts flows.
- **Drop reason**: the edge keeps the last (``drop_reason_desc``, e.g. POLICY_DENIED) and
  every reason seen with its count.
- **Namespace view**: the edges with an end in the namespace, and their nodes (Hubble UI
  shows the peers of a namespace's workloads too).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["APP_LABELS", "Edge", "FlowRow", "MapNode", "ServiceMap", "flow_row"]

#: label keys naming an app, in Hubble UI's order
APP_LABELS = ("app", "k8s-app", "app.kubernetes.io/name")
FORWARDED = {"FORWARDED", "REDIRECTED", "TRANSLATED", "TRACED"}
DROPPED = {"DROPPED", "ERROR"}
#: reserved identity numbers -> entity names (Cilium's numbers, pilus.identity.reserved)
ENTITIES = {1: "host", 2: "world", 3: "unmanaged", 4: "health", 5: "init", 6: "remote-node",
            7: "kube-apiserver", 8: "ingress", 9: "world", 10: "world"}


@dataclass(frozen=True)
class MapNode:
    """One box: a workload of a namespace or a reserved entity."""

    id: str
    name: str
    namespace: str = ""
    kind: str = "workload"  # or "entity"
    labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "namespace": self.namespace, "kind": self.kind,
                "labels": list(self.labels)}


@dataclass(frozen=True)
class FlowRow:
    """One flow as the page shows it: a row of the table and the edge it counts for."""

    time: str
    source: MapNode
    destination: MapNode
    port: int
    protocol: str
    verdict: str
    reason: str
    summary: str
    node_name: str
    source_pod: str
    destination_pod: str

    @property
    def edge_key(self) -> tuple[str, str, int, str]:
        return (self.source.id, self.destination.id, self.port, self.protocol)

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "source": self.source.id, "destination": self.destination.id,
                "source_pod": self.source_pod, "destination_pod": self.destination_pod,
                "port": self.port, "protocol": self.protocol, "verdict": self.verdict, "reason": self.reason,
                "summary": self.summary, "node_name": self.node_name, "edge": edge_id(self.edge_key)}


@dataclass
class Edge:
    """Flows from one node to another on one port."""

    source: str
    destination: str
    port: int
    protocol: str
    forwarded: int = 0
    dropped: int = 0
    audit: int = 0
    last_reason: str = ""
    reasons: dict[str, int] = field(default_factory=dict)
    last_seen: str = ""

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.source, self.destination, self.port, self.protocol)

    def add(self, row: FlowRow) -> None:
        if row.verdict in DROPPED:
            self.dropped += 1
            if row.reason:
                self.last_reason = row.reason
                self.reasons[row.reason] = self.reasons.get(row.reason, 0) + 1
        elif row.verdict == "AUDIT":
            self.audit += 1
        else:
            self.forwarded += 1
        self.last_seen = max(self.last_seen, row.time)

    def to_json(self) -> dict[str, Any]:
        return {"id": edge_id(self.key), "source": self.source, "destination": self.destination,
                "port": self.port, "protocol": self.protocol, "forwarded": self.forwarded,
                "dropped": self.dropped, "audit": self.audit, "last_reason": self.last_reason,
                "reasons": dict(self.reasons), "last_seen": self.last_seen,
                "state": "dropped" if self.dropped else "forwarded"}


def edge_id(key: tuple[str, str, int, str]) -> str:
    src, dst, port, proto = key
    return f"{src}->{dst}:{port}/{proto}"


# -- flows -> rows -------------------------------------------------------------------------

def _label_map(labels: Iterable[str]) -> dict[str, str]:
    """``k8s:app=web`` -> {"app": "web"} (the source dropped; the first value of a key wins)."""
    out: dict[str, str] = {}
    for label in labels:
        source, _, rest = label.partition(":")
        key, _, value = (rest if rest else source).partition("=")
        out.setdefault(key, value)
    return out


def _entity(labels: Iterable[str], identity: int, ip: str) -> str:
    names = [x.removeprefix("reserved:").partition("=")[0] for x in labels if x.startswith("reserved:")]
    if "host" in names:
        return "host"
    if "kube-apiserver" in names:
        return "kube-apiserver"
    for name in names:
        return "world" if name.startswith("world") else name
    if identity in ENTITIES:
        return ENTITIES[identity]
    return f"identity-{identity}" if identity else ("world" if ip else "unknown")


def map_node(endpoint: Any, ip: str = "") -> MapNode:
    """The box a flow.Endpoint belongs to."""
    labels = tuple(endpoint.labels)
    if endpoint.pod_name:
        by_key = _label_map(labels)
        app = next((by_key[k] for k in APP_LABELS if by_key.get(k)), "") or endpoint.pod_name
        ns = endpoint.namespace
        return MapNode(id=f"{ns}/{app}", name=app, namespace=ns, labels=labels)
    name = _entity(labels, endpoint.identity, ip)
    return MapNode(id=name, name=name, kind="entity", labels=labels)


def _l4(flow: Any) -> tuple[str, int, int]:
    """(protocol, source port, destination port) of the flow's layer 4."""
    l4 = flow.l4
    for proto in ("TCP", "UDP", "SCTP"):
        if l4.HasField(proto):
            part = getattr(l4, proto)
            return proto, part.source_port, part.destination_port
    for proto in ("ICMPv4", "ICMPv6"):
        if l4.HasField(proto):
            return proto, 0, 0
    return "", 0, 0


def _time(flow: Any) -> str:
    if not flow.HasField("time"):
        return ""
    t = flow.time.ToDatetime(tzinfo=UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name; a number our protos do not name (a newer peer's) as PREFIX_<n>."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return f"{prefix}_{value}"


def flow_row(flow: Any) -> FlowRow:
    """A flow.Flow as a table row, oriented as its connection (a reply's ends swapped)."""
    from pilus.hubble.protos import flow_pb2

    src = map_node(flow.source, flow.IP.source)
    dst = map_node(flow.destination, flow.IP.destination)
    proto, sport, dport = _l4(flow)
    src_pod = f"{flow.source.namespace}/{flow.source.pod_name}" if flow.source.pod_name else src.name
    dst_pod = f"{flow.destination.namespace}/{flow.destination.pod_name}" if flow.destination.pod_name else dst.name
    if flow.HasField("is_reply") and flow.is_reply.value:
        src, dst, dport, src_pod, dst_pod = dst, src, sport, dst_pod, src_pod
    verdict = _name(flow_pb2.Verdict, flow.verdict, "VERDICT")
    reason = _name(flow_pb2.DropReason, flow.drop_reason_desc, "DROP_REASON") if flow.drop_reason_desc else ""
    if reason == "DROP_REASON_UNKNOWN" or verdict not in DROPPED:
        reason = ""
    return FlowRow(time=_time(flow), source=src, destination=dst, port=dport, protocol=proto, verdict=verdict,
                   reason=reason or "", summary=flow.Summary, node_name=flow.node_name,
                   source_pod=src_pod, destination_pod=dst_pod)


# -- the graph --------------------------------------------------------------------------------

class ServiceMap:
    """Every node and edge seen, and the last ``keep`` rows for the table."""

    def __init__(self, keep: int = 500) -> None:
        self.nodes: dict[str, MapNode] = {}
        self.edges: dict[tuple[str, str, int, str], Edge] = {}
        self.rows: deque[FlowRow] = deque(maxlen=keep)
        self.flows = 0

    def add(self, row: FlowRow) -> Edge:
        for node in (row.source, row.destination):
            self.nodes[node.id] = node
        edge = self.edges.get(row.edge_key)
        if edge is None:
            edge = self.edges[row.edge_key] = Edge(*row.edge_key)
        edge.add(row)
        self.rows.append(row)
        self.flows += 1
        return edge

    def namespaces(self) -> list[str]:
        return sorted({n.namespace for n in self.nodes.values() if n.namespace})

    @staticmethod
    def shows(row_or_edge_ends: tuple[MapNode, MapNode], namespace: str | None) -> bool:
        """Whether a view of ``namespace`` (None: every namespace) shows an edge between these ends."""
        return not namespace or any(n.namespace == namespace for n in row_or_edge_ends)

    def view(self, namespace: str | None = None, rows: int = 200) -> dict[str, Any]:
        """The graph and the newest ``rows`` table rows of one namespace (None: all)."""
        edges = [e for e in self.edges.values()
                 if self.shows((self.nodes[e.source], self.nodes[e.destination]), namespace)]
        ids = {e.source for e in edges} | {e.destination for e in edges}
        table = [r for r in self.rows if self.shows((r.source, r.destination), namespace)][-rows:] if rows else []
        return {"namespace": namespace or "", "namespaces": self.namespaces(), "flows": self.flows,
                "nodes": [self.nodes[i].to_json() for i in sorted(ids)],
                "edges": [e.to_json() for e in sorted(edges, key=lambda e: e.key)],
                "rows": [r.to_json() for r in table],
                "generated": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")}
