"""The agent's flags (``pilus agent --help``) and the configuration they make."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from pilus.datapath.config import LB_MODES, MONITOR_AGGREGATION
from pilus.datapath.lb import MAGLEV_PRIMES
from pilus.hubble.metrics import parse_handlers
from pilus.kvstore import BACKENDS, store_options
from pilus.metrics.server import parse_addr
from pilus.node.routes import ROUTING_MODES, TUNNEL_PORT

HUBBLE_EVENT_TYPES = frozenset({"drop", "policy-verdict", "trace"})  # the hub's type names

@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: Path
    pod_cidr: IPv4Network
    cluster_name: str = "default"
    kvstore: str = "embedded"
    kvstore_path: Path | None = None
    kvstore_opts: tuple[tuple[str, str], ...] = ()  # open_store keyword arguments, e.g. ("address", URL)
    native_device: str | None = None
    bpffs_root: Path = Path("/sys/fs/bpf/pilus")
    mtu: int = 1500
    policy_enforcement: str = "default"
    cluster_cidr: IPv4Network | None = None
    lb_algorithm: str = "random"
    maglev_table_size: int = 16381
    prometheus_addr: tuple[str, int] | None = None
    socket_lb: bool = False  # also translate services at connect()/sendmsg() (bpf_sock.c)
    routing_mode: str = "tunnel"  # tunnel (VXLAN, identity in the VNI) or native
    tunnel_port: int = TUNNEL_PORT
    #: NodePort to a backend on another node: snat (Cilium's default) or dsr (native routing only)
    bpf_lb_mode: str = "snat"
    enable_hubble: bool = True  # flows of this node's events on <state-dir>/hubble.sock
    hubble_listen_address: tuple[str, int] | None = None  # also Hubble's gRPC on TCP, e.g. :4244
    hubble_event_buffer_capacity: int = 4095
    #: event types Hubble turns into flows; trace events cost the agent CPU per new connection
    hubble_monitor_events: frozenset[str] = frozenset({"drop", "policy-verdict"})
    hubble_metrics: tuple[str, ...] = ()  # Hubble metrics handlers (hubble.metrics.HANDLERS); () = off
    hubble_metrics_server: tuple[str, int] = ("0.0.0.0", 9965)
    monitor_aggregation: str = "medium"  # traces: none = every packet, medium = per connection
    monitor_aggregation_interval: int = 5  # seconds: a live connection is traced again after this long
    #: datapath events per second per CPU, and the burst (0: no limit; docs/hubble.md "Which events")
    bpf_events_rate_limit: int = 1000
    bpf_events_burst_limit: int = 200
    proxy_ingress_port: int = 15001  # the L7 proxy's listeners (docs/l7.md); policy entries carry them
    proxy_egress_port: int = 15002
    proxy_kafka_ingress_port: int = 15003
    proxy_kafka_egress_port: int = 15004
    tofqdns_proxy_port: int = 15053  # the agent's DNS proxy, UDP and TCP (docs/fqdn.md)
    tofqdns_min_ttl: int = 0  # 0: the answers' TTLs
    tofqdns_endpoint_max_ip_per_hostname: int = 1000
    tofqdns_dns_reject_response_code: str = "refused"  # or nameError (Cilium's values)

    def __post_init__(self) -> None:
        problem = lb_mode_problem(self.bpf_lb_mode, self.routing_mode) or proxy_ports_problem(
            self.proxy_ingress_port, self.proxy_egress_port, self.proxy_kafka_ingress_port,
            self.proxy_kafka_egress_port, self.tofqdns_proxy_port)
        if problem:
            raise ValueError(problem)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "pilus.sock"


PROXY_PORT_FLAGS = ("--proxy-ingress-port", "--proxy-egress-port", "--proxy-kafka-ingress-port",
                    "--proxy-kafka-egress-port", "--tofqdns-proxy-port")


def proxy_ports_problem(*ports: int) -> str | None:
    """Why the proxies' ports (in PROXY_PORT_FLAGS order) cannot run together, or None."""
    seen: dict[int, str] = {}
    for flag, port in zip(PROXY_PORT_FLAGS, ports, strict=True):
        if port in seen:
            return f"{seen[port]} and {flag} must differ (both {port})"
        seen[port] = flag
    return None


def lb_mode_problem(lb_mode: str, routing_mode: str) -> str | None:
    """Why ``--bpf-lb-mode`` cannot run with ``--routing-mode`` (one line), or None."""
    if lb_mode not in LB_MODES:
        return f"unknown --bpf-lb-mode {lb_mode!r}: use one of {', '.join(LB_MODES)}"
    if lb_mode == "dsr" and routing_mode == "tunnel":
        return ("--bpf-lb-mode dsr needs --routing-mode native: in tunnel mode DSR needs Geneve "
                "dispatch, which pilus does not have (VXLAN only)")
    return None


class _AgentParser(argparse.ArgumentParser):
    """Refuses flag combinations that cannot run, with the parser's one-line error."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        problem = lb_mode_problem(ns.bpf_lb_mode, ns.routing_mode) or proxy_ports_problem(
            ns.proxy_ingress_port, ns.proxy_egress_port, ns.proxy_kafka_ingress_port,
            ns.proxy_kafka_egress_port, ns.tofqdns_proxy_port)
        if problem:
            self.error(problem)
        return ns, rest


def build_parser() -> argparse.ArgumentParser:
    p = _AgentParser(
        prog="pilus agent", description="Run the pilus node agent in this network namespace."
    )
    p.add_argument("--node-name", required=True, help="this node's name (unique on the machine)")
    p.add_argument(
        "--state-dir", required=True, type=Path, help="directory for endpoints, compiled BPF and the API socket"
    )
    p.add_argument("--pod-cidr", required=True, type=_cidr, help="this node's pod CIDR, e.g. 10.200.1.0/24")
    p.add_argument(
        "--cluster-name", default="default", help="cluster name (identity label io.cilium.k8s.policy.cluster)"
    )
    p.add_argument("--kvstore", default="embedded", choices=sorted(BACKENDS), help="kvstore backend")
    p.add_argument("--kvstore-opt", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="kvstore option, repeatable, e.g. etcd.address=http://HOST:2379")
    p.add_argument("--kvstore-path", type=Path, help="embedded kvstore file (default <state-dir>/kvstore.db)")
    p.add_argument(
        "--native-device", help="underlay device whose address is the node IP (default: the default route's)"
    )
    p.add_argument("--bpffs-root", type=Path, default=Path("/sys/fs/bpf/pilus"), help="where maps are pinned")
    p.add_argument("--mtu", type=int, default=1500, help="endpoint MTU")
    p.add_argument(
        "--policy-enforcement", default="default", choices=["default", "always", "never"],
        help="default: deny only in directions that policies select; always: deny unless allowed; never: allow all",
    )
    p.add_argument(
        "--cluster-cidr", type=_cidr,
        help="all pods of the cluster (service backends must lie inside it; default: this node's pod CIDR)",
    )
    p.add_argument("--lb-algorithm", default="random", choices=["random", "maglev"],
                   help="default backend selection of services (annotation service.cilium.io/lb-algorithm)")
    p.add_argument("--socket-lb", action="store_true",
                   help="also load-balance services at the socket (cgroup connect4/sendmsg4/recvmsg4/"
                        "getpeername4 on the cgroup v2 root, only for this node's pods); "
                        "off: per-packet translation only")
    p.add_argument("--bpf-lb-maglev-table-size", type=_maglev_size, default=16381, metavar="M",
                   help="Maglev lookup table size per service, a prime (Cilium's flag; default 16381)")
    p.add_argument("--prometheus-serve-addr", type=_listen_addr, metavar="[HOST]:PORT",
                   help="serve Prometheus metrics on this TCP address, e.g. :9962 (off by default)")
    p.add_argument("--routing-mode", default="tunnel", choices=ROUTING_MODES,
                   help="how pods reach other nodes' pods: tunnel (VXLAN with the source identity in the "
                        "VNI, Cilium's default) or native (routes <pod CIDR> via <node IP>, no encapsulation)")
    p.add_argument("--tunnel-port", type=int, default=TUNNEL_PORT, metavar="PORT",
                   help=f"VXLAN UDP port in tunnel mode (default {TUNNEL_PORT})")
    p.add_argument("--bpf-lb-mode", default="snat", choices=LB_MODES,
                   help="NodePort/ExternalIP/LoadBalancer traffic to a backend on another node: snat "
                        "(source becomes this node's IP, replies come back through it; default) or dsr "
                        "(the frontend travels in an IPv4 option, the backend's node answers the client "
                        "directly; needs --routing-mode native and the same mode on every node)")
    p.add_argument("--enable-hubble", action=argparse.BooleanOptionalAction, default=True,
                   help="keep flows of this node's events and serve Hubble's Observer gRPC API on "
                        "<state-dir>/hubble.sock (default on)")
    p.add_argument("--hubble-listen-address", type=_listen_addr, metavar="[HOST]:PORT",
                   help="also serve it on TCP, e.g. :4244 (Cilium's port; off by default)")
    p.add_argument("--hubble-event-buffer-capacity", type=_flow_capacity, default=4095, metavar="N",
                   help="flows kept per node, 2^k - 1 between 1 and 65535 (default 4095)")
    p.add_argument("--hubble-monitor-events", type=_event_types, default=frozenset({"drop", "policy-verdict"}),
                   metavar="TYPE[,TYPE]",
                   help="datapath events Hubble turns into flows: drop, policy-verdict, trace (default "
                        "drop,policy-verdict; trace adds forwarded packets of every new connection, at a "
                        "measured cost of half the new connections per second: docs/hubble.md)")
    p.add_argument("--hubble-metrics", type=_hubble_metrics, default=(), metavar="NAME[,NAME]",
                   help="Hubble metrics to keep: flow, drop, tcp, policy, http, dns, kafka (off by default), served on "
                        "--hubble-metrics-server")
    p.add_argument("--hubble-metrics-server", type=_listen_addr, default=("0.0.0.0", 9965), metavar="[HOST]:PORT",
                   help="where Hubble metrics are served (default :9965, Cilium's)")
    p.add_argument("--monitor-aggregation", default="medium", choices=list(MONITOR_AGGREGATION),
                   help="trace events, Cilium's levels: none (every packet; lowest and low are the same, "
                        "pilus has no receive-side traces for them to hide) or medium (default; maximum "
                        "is the same): the first packet of each direction of a connection, its TCP "
                        "SYN/FIN/RST, and a live connection again every --monitor-aggregation-interval")
    p.add_argument("--bpf-events-default-rate-limit", type=_u32, default=1000, metavar="N",
                   dest="bpf_events_rate_limit",
                   help="datapath events (drops, verdicts, traces) each CPU may send per second; the rest "
                        "are counted as lost (default 1000; 0: no limit, as Cilium's default)")
    p.add_argument("--bpf-events-default-burst-limit", type=_u32, default=200, metavar="N",
                   dest="bpf_events_burst_limit",
                   help="events a CPU may send at once above the rate (default 200)")
    p.add_argument("--monitor-aggregation-interval", type=_seconds, default=5, metavar="DURATION",
                   help="how often a live connection is traced again under medium aggregation "
                        "(default 5s; whole seconds: 30, 30s, 2m, 1h)")
    p.add_argument("--proxy-ingress-port", type=_port, default=15001, metavar="PORT",
                   help="the L7 proxy's ingress listener (rules.http of ingress rules; default 15001)")
    p.add_argument("--proxy-egress-port", type=_port, default=15002, metavar="PORT",
                   help="the L7 proxy's egress listener (rules.http of egress rules; default 15002)")
    p.add_argument("--proxy-kafka-ingress-port", type=_port, default=15003, metavar="PORT",
                   help="the L7 proxy's Kafka listener for ingress rules.kafka (default 15003)")
    p.add_argument("--proxy-kafka-egress-port", type=_port, default=15004, metavar="PORT",
                   help="the L7 proxy's Kafka listener for egress rules.kafka (default 15004)")
    p.add_argument("--tofqdns-proxy-port", type=_port, default=15053, metavar="PORT",
                   help="the agent's DNS proxy, UDP and TCP (egress rules.dns; default 15053)")
    p.add_argument("--tofqdns-min-ttl", type=_nonneg, default=0, metavar="SECONDS",
                   help="the shortest time an IP learned from DNS stays selected by toFQDNs (default 0: the TTL)")
    p.add_argument("--tofqdns-endpoint-max-ip-per-hostname", type=_positive, default=1000, metavar="N",
                   help="IPs kept per name per endpoint; the ones expiring first go beyond it (default 1000)")
    p.add_argument("--tofqdns-dns-reject-response-code", choices=["refused", "nameError"], default="refused",
                   help="the answer to a denied DNS query: refused (REFUSED, default) or nameError (NXDOMAIN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    p.add_argument("--describe", action="store_true", help="print the components and settings, then exit")
    return p


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
    return int(text)


def _nonneg(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}")
    return int(text)


def _u32(text: str) -> int:
    """A count as the datapath holds it (u32); _nonneg is for seconds."""
    if not text.isdigit() or int(text) > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"expected a whole number 0-4294967295, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return int(text)


_SECONDS_PER = {"": 1, "s": 1, "m": 60, "h": 3600}


def _seconds(text: str) -> int:
    """A duration in whole seconds, as Go prints them: ``30``, ``30s``, ``2m``, ``1h``."""
    number, unit = text.rstrip("smh"), text[len(text.rstrip("smh")):]
    if not number.isdigit() or unit not in _SECONDS_PER or not 1 <= int(number) * _SECONDS_PER[unit] <= 86400:
        raise argparse.ArgumentTypeError(f"expected a duration of 1s to 24h in whole seconds (5s, 2m), got {text!r}")
    return int(number) * _SECONDS_PER[unit]


def _cidr(text: str) -> IPv4Network:
    try:
        return IPv4Network(text, strict=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an IPv4 CIDR like 10.200.1.0/24 ({exc})") from None


def _listen_addr(text: str) -> tuple[str, int]:
    try:
        return parse_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _event_types(text: str) -> frozenset[str]:
    types = frozenset(t.strip() for t in text.split(",") if t.strip())
    unknown = types - HUBBLE_EVENT_TYPES
    if not types or unknown:
        raise argparse.ArgumentTypeError(f"expected a list of {', '.join(sorted(HUBBLE_EVENT_TYPES))}, "
                                         f"got {text!r}")
    return types


def _hubble_metrics(text: str) -> tuple[str, ...]:
    try:
        return parse_handlers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flow_capacity(text: str) -> int:
    n = int(text) if text.isdigit() else 0
    if not 1 <= n <= 65535 or n & (n + 1):
        raise argparse.ArgumentTypeError(f"expected 2^k - 1 between 1 and 65535 (as Cilium), got {text!r}")
    return n


def _maglev_size(text: str) -> int:
    if not text.isdigit() or int(text) not in MAGLEV_PRIMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, MAGLEV_PRIMES))}")
    return int(text)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The parsed flags as an AgentConfig; a bad ``--kvstore-opt`` raises KVStoreError."""
    return AgentConfig(
        node_name=args.node_name,
        state_dir=args.state_dir,
        pod_cidr=args.pod_cidr,
        cluster_name=args.cluster_name,
        kvstore=args.kvstore,
        kvstore_path=args.kvstore_path,
        kvstore_opts=tuple(store_options(args.kvstore, args.kvstore_opt).items()),
        native_device=args.native_device,
        bpffs_root=args.bpffs_root,
        mtu=args.mtu,
        policy_enforcement=args.policy_enforcement,
        cluster_cidr=args.cluster_cidr,
        lb_algorithm=args.lb_algorithm,
        socket_lb=args.socket_lb,
        maglev_table_size=args.bpf_lb_maglev_table_size,
        prometheus_addr=args.prometheus_serve_addr,
        routing_mode=args.routing_mode,
        tunnel_port=args.tunnel_port,
        bpf_lb_mode=args.bpf_lb_mode,
        enable_hubble=args.enable_hubble,
        hubble_listen_address=args.hubble_listen_address,
        hubble_event_buffer_capacity=args.hubble_event_buffer_capacity,
        hubble_monitor_events=args.hubble_monitor_events,
        hubble_metrics=args.hubble_metrics,
        hubble_metrics_server=args.hubble_metrics_server,
        monitor_aggregation=args.monitor_aggregation,
        monitor_aggregation_interval=args.monitor_aggregation_interval,
        bpf_events_rate_limit=args.bpf_events_rate_limit,
        bpf_events_burst_limit=args.bpf_events_burst_limit,
        proxy_ingress_port=args.proxy_ingress_port,
        proxy_egress_port=args.proxy_egress_port,
        proxy_kafka_ingress_port=args.proxy_kafka_ingress_port,
        proxy_kafka_egress_port=args.proxy_kafka_egress_port,
        tofqdns_proxy_port=args.tofqdns_proxy_port,
        tofqdns_min_ttl=args.tofqdns_min_ttl,
        tofqdns_endpoint_max_ip_per_hostname=args.tofqdns_endpoint_max_ip_per_hostname,
        tofqdns_dns_reject_response_code=args.tofqdns_dns_reject_response_code,
    )
