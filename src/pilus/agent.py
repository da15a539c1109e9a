"""`pilus agent`: the composition root of one node.

Components, in start order (stop runs in reverse):
  lock        one agent per state dir (flock on <state-dir>/agent.lock)
  kvstore     cluster state (identities); embedded SQLite shared by the cluster's agents
  datapath    compile (cached) + load bpf_lxc.o, maps pinned under /sys/fs/bpf/pilus/<node>/
  node        pilus_host router device, sysctls, masquerade; host/world ipcache entries
  identities  label set -> numeric identity through the kvstore
  ipam        host-scope allocator over the node's pod CIDR
  policy      policies + namespaces from the kvstore -> engine -> per-endpoint policy maps
  services    service load balancing: Services -> LB maps, backends from endpoint labels
              (restored from the maps; nothing written until the endpoints are restored)
  endpoints   restore saved endpoints, then serve create/delete
  events      ring buffer -> monitor subscribers
  api         REST on <state-dir>/pilus.sock
  prometheus  optional /metrics on --prometheus-serve-addr
Constructors do no I/O; `start()` does.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from prometheus_client import CollectorRegistry

from pilus import __version__
from pilus.api.server import APIServer
from pilus.datapath import Datapath, DatapathConfig
from pilus.datapath.lb import MAGLEV_PRIMES, LbConfig
from pilus.datapath.socklb import NetnsCookies
from pilus.endpoint.manager import EndpointManager, NodeInfo
from pilus.endpoint.model import EndpointStore
from pilus.endpoint.policy_sync import PolicySync
from pilus.errors import TraceInputError
from pilus.identity import reserved
from pilus.identity.allocator import IdentityAllocator
from pilus.identity.labels import Label, Labels, endpoint_labels, parse_labels
from pilus.ipam.hostscope import HostScopeIPAM
from pilus.kvstore import open_store
from pilus.loadbalancer.manager import ServiceManager, endpoints_for_services
from pilus.metrics.collector import AgentCollector, Sample, datapath_samples
from pilus.metrics.server import PrometheusServer, parse_addr
from pilus.node import setup as node_setup
from pilus.observer.monitor import EventHub
from pilus.policy.distribution import PolicyDistribution
from pilus.policy.engine import PolicyEngine

log = logging.getLogger("pilus.agent")


class AgentError(RuntimeError):
    """A start-up problem the user can fix; printed as one line."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: Path
    pod_cidr: IPv4Network
    cluster_name: str = "default"
    kvstore: str = "embedded"
    kvstore_path: Path | None = None
    native_device: str | None = None
    bpffs_root: Path = Path("/sys/fs/bpf/pilus")
    mtu: int = 1500
    policy_enforcement: str = "default"
    cluster_cidr: IPv4Network | None = None
    lb_algorithm: str = "random"
    maglev_table_size: int = 16381
    prometheus_addr: tuple[str, int] | None = None
    socket_lb: bool = False  # also translate services at connect()/sendmsg() (bpf_sock.c)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "pilus.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--kvstore", default="embedded", choices=["embedded"], help="kvstore backend")
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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    p.add_argument("--describe", action="store_true", help="print the components and settings, then exit")
    return p


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


def _maglev_size(text: str) -> int:
    if not text.isdigit() or int(text) not in MAGLEV_PRIMES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, MAGLEV_PRIMES))}")
    return int(text)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.router_ip = node_setup.router_ip_for(cfg.pod_cidr)
        self.node_ip: IPv4Address = self.router_ip
        self.store = open_store(cfg.kvstore, path=cfg.kvstore_path or cfg.state_dir / "kvstore.db")
        self.datapath: Datapath | None = None
        self.identities = IdentityAllocator(self.store, cfg.node_name)
        self.ipam = HostScopeIPAM(cfg.pod_cidr, reserved=[self.router_ip])
        self.endpoints: EndpointManager | None = None
        self.distribution = PolicyDistribution(self.store)
        self.policy_engine = PolicyEngine(mode=cfg.policy_enforcement, cluster=cfg.cluster_name)
        self.policy: PolicySync | None = None
        self.services: ServiceManager | None = None
        self.prometheus: PrometheusServer | None = None
        self.events: EventHub | None = None
        self.api = APIServer(self, cfg.socket_path)
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(self.samples))
        self._lock_fd: int | None = None
        self._netns_cookies = NetnsCookies()
        self._started: list[str] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        # blocking work (netlink, nft, clang, libbpf) runs in threads: the loop stays free
        node_ip, device = await asyncio.to_thread(node_setup.detect_node_ip, cfg.native_device)
        self.node_ip = node_ip or self.router_ip
        self.datapath = Datapath(
            DatapathConfig(
                node_name=cfg.node_name, router_ip=self.router_ip, node_ip=self.node_ip, pod_cidr=cfg.pod_cidr,
                lb=LbConfig(maglev_table_size=cfg.maglev_table_size),
            ),
            cfg.state_dir,
            bpffs_root=cfg.bpffs_root,
        )
        await asyncio.to_thread(self.datapath.load)
        self._started.append("datapath")
        await asyncio.to_thread(
            node_setup.setup_node,
            node_setup.NodeAddressing(cfg.pod_cidr, self.router_ip, self.node_ip, device),
        )
        self._program_node_ipcache()
        self.services = ServiceManager(
            self.datapath,
            default_algorithm=cfg.lb_algorithm,
            node_ips=[self.node_ip],
            known_networks=[cfg.cluster_cidr or cfg.pod_cidr],
            local_networks=[cfg.pod_cidr],
            state_path=cfg.state_dir / "services.json",
        )
        await asyncio.to_thread(self.services.restore)
        await asyncio.to_thread(self._setup_socket_lb)
        if device:
            self.datapath.attach_netdev(socket.if_nametoindex(device))
        await self.identities.start()
        self._started.append("identities")
        self.endpoints = EndpointManager(
            NodeInfo(cfg.node_name, cfg.cluster_name, self.router_ip, cfg.pod_cidr, cfg.mtu),
            self.datapath,
            self.identities,
            self.ipam,
            EndpointStore(cfg.state_dir),
        )
        self.policy = PolicySync(self.policy_engine, self.datapath, self.identities, self.distribution)
        await self.policy.start()
        self._started.append("policy")
        self.endpoints.policy = self.policy
        self.endpoints.namespace_labels = lambda ns: self.policy.namespace_labels.get(ns, {})
        self.policy.on_namespace_change = self._namespace_changed
        await self.policy.watch_services(self.services)  # toServices follows service changes
        restored = await self.endpoints.restore()
        # services see the endpoints only once all are restored: a partial set taken as
        # truth would drop backends (and refuse new connections) until the next change
        self.endpoints.on_change = self.endpoints_changed
        await self.endpoints_changed()
        self.events = EventHub(self.datapath.events())
        await self.events.start()
        self._started.append("events")
        await self.api.start()
        self._started.append("api")
        if cfg.prometheus_addr is not None:
            self.prometheus = PrometheusServer(self.registry, *cfg.prometheus_addr)
            await self.prometheus.start()
            self._started.append("prometheus")
        log.info(
            "agent %s ready: pod CIDR %s, router %s, node IP %s, %d endpoints restored",
            cfg.node_name, cfg.pod_cidr, self.router_ip, self.node_ip, len(restored),
        )

    async def stop(self) -> None:
        """Stop serving; the datapath (pinned maps, attached programs) keeps running."""
        for name in reversed(self._started):
            try:
                if name == "api":
                    await self.api.stop()
                elif name == "prometheus" and self.prometheus:
                    await self.prometheus.stop()
                elif name == "events" and self.events:
                    await self.events.stop()
                elif name == "identities":
                    await self.identities.stop()
                elif name == "policy" and self.policy:
                    await self.policy.stop()
                elif name == "datapath" and self.datapath:
                    self.datapath.close()
            except Exception:
                log.exception("stopping %s failed", name)
        self._started.clear()
        await self.store.close()

    def _take_lock(self) -> None:
        path = self.cfg.state_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AgentError(
                f"another pilus agent (pid {holder}) is running on state dir {self.cfg.state_dir}: "
                "stop it first or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _program_node_ipcache(self) -> None:
        assert self.datapath is not None
        host = reserved.HOST
        self.datapath.ipcache.upsert(IPv4Network(f"{self.router_ip}/32"), host)
        self.datapath.ipcache.upsert(IPv4Network(f"{self.node_ip}/32"), host)
        self.datapath.ipcache.upsert(IPv4Network("0.0.0.0/0"), reserved.WORLD)

    async def endpoints_changed(self) -> None:
        """Service backends follow the endpoints (like Kubernetes Endpoints)."""
        if self.services is not None and self.endpoints is not None:
            views = endpoints_for_services(self.endpoints.list())
            await asyncio.to_thread(self.services.set_endpoints, views)
        if self.endpoints is not None and self.datapath is not None and self.datapath.socket_lb:
            # the socket LB translates only sockets of these namespaces
            eps = self.endpoints.list()
            sock = self.datapath.socket_lb
            await asyncio.to_thread(lambda: sock.sync_netns(self._netns_cookies.pods(eps)))

    def _setup_socket_lb(self) -> None:
        """--socket-lb: load bpf_sock.o and attach it (pinned links on the cgroup v2
        root, kept when the agent stops); without it, remove links an earlier run left."""
        assert self.datapath is not None
        if self.cfg.socket_lb:
            self.datapath.load_socket_lb()
            log.info("socket LB attached to cgroup %s", self.datapath.socket_lb.cgroup)
        elif removed := self.datapath.unload_socket_lb():
            log.info("socket LB off: removed the links of an earlier run (%s)", ", ".join(removed))

    async def _namespace_changed(self, namespace: str, labels: dict[str, str]) -> None:
        if self.endpoints is not None:
            for ep in await self.endpoints.namespace_changed(namespace):
                log.info("endpoint %d %s now has identity %d", ep.id, ep.name, ep.identity)

    # -- views for the API ---------------------------------------------------

    async def _identity_of_ip(self, text: str) -> tuple[int, Labels]:
        """What the datapath would see for this address: the ipcache's longest prefix."""
        try:
            addr = IPv4Address(text)
        except ValueError:
            raise TraceInputError(f"{text!r} is not an IPv4 address") from None
        matches = [(p, ident) for p, ident, _tep in self.datapath.ipcache.items() if addr in p]
        ident = max(matches, key=lambda m: m[0].prefixlen)[1] if matches else reserved.WORLD
        if reserved.is_reserved(ident):
            return ident, reserved.reserved_by_id(ident).labels
        for prefix, local_id in self.policy.cidr_identities.items():
            if local_id == ident:
                return ident, Labels([Label("cidr", str(prefix)), Label("reserved", "world")])
        found = await self.identities.get(ident)
        if found is None:
            raise TraceInputError(f"{text} maps to identity {ident}, which is not known (yet)")
        return ident, found.labels

    async def _trace_labels(self, body: dict, side: str) -> tuple[Labels, bool]:
        """Labels of one side of a trace: a local endpoint, an IP address (resolved as the
        datapath does, through the ipcache), or labels as a pod would carry them."""
        ref = body.get(f"{side}_endpoint")
        if ref is not None:
            return parse_labels(self.endpoints.lookup(str(ref)).labels), True
        ip = body.get(f"{side}_ip")
        if ip is not None:
            ident, labels = await self._identity_of_ip(str(ip))
            return labels, not reserved.is_reserved(ident) and not reserved.is_local(ident)
        raw = body.get(f"{side}_labels")
        if raw is None:
            raise TraceInputError(f"give {side}_endpoint, {side}_ip or {side}_labels")
        parsed = parse_labels(raw)
        if any(label.source == "reserved" for label in parsed):
            return parsed, False
        namespace = body.get(f"{side}_namespace") or "default"
        ns_labels = self.policy.namespace_labels.get(namespace, {}) if self.policy else {}
        pod = {label.key: label.value for label in parsed}
        labels = endpoint_labels(namespace, pod, cluster=self.cfg.cluster_name, namespace_labels=ns_labels)
        return labels, True

    async def trace(self, body: dict) -> dict:
        src, src_local = await self._trace_labels(body, "src")
        dst, dst_local = await self._trace_labels(body, "dst")
        port_text = str(body.get("dport", "0"))
        port, _, proto_name = port_text.partition("/")
        proto_name = (proto_name or body.get("protocol") or "TCP").upper()
        protos = {"TCP": 6, "UDP": 17, "ICMP": 1, "ANY": 0, "SCTP": 132}
        if not port.isdigit() or int(port) > 65535 or proto_name not in protos:
            raise TraceInputError(f"dport {port_text!r}: expected PORT[/TCP|UDP|ICMP] with PORT 0-65535")
        result = await self.policy.trace(
            src, dst, int(port), protos[proto_name], src_is_local=src_local, dst_is_local=dst_local,
            src_ip=self._trace_ip(body, "src"), dst_ip=self._trace_ip(body, "dst"),
        )
        return result.to_dict()

    def _trace_ip(self, body: dict, side: str) -> IPv4Address | None:
        """The address of one side of a trace, when known (ipBlock rules match addresses)."""
        ref = body.get(f"{side}_endpoint")
        if ref is not None:
            return self.endpoints.lookup(str(ref)).ipv4
        ip = body.get(f"{side}_ip")
        return IPv4Address(str(ip)) if ip is not None else None

    async def identity_rows(self) -> list[dict]:
        in_use: dict[int, int] = {}
        for ep in self.endpoints.list() if self.endpoints else []:
            in_use[ep.identity] = in_use.get(ep.identity, 0) + 1
        rows = []
        for ident in await self.identities.list():
            rows.append({
                "id": ident.id,
                "labels": [str(label) for label in ident.labels],
                "reserved": ident.id < reserved.MIN_GLOBAL_IDENTITY,
                "endpoints": in_use.get(ident.id, 0),
            })
        return sorted(rows, key=lambda r: r["id"])

    def _endpoints_by_state(self) -> dict[str, int]:
        return dict(Counter(ep.state.value for ep in (self.endpoints.list() if self.endpoints else [])))

    def samples(self) -> list[Sample]:
        out = datapath_samples(self.datapath.metrics.items()) if self.datapath else []
        for state, count in sorted(self._endpoints_by_state().items()):
            out.append(Sample("pilus_endpoint_state", {"endpoint_state": state}, count, "gauge",
                              "Endpoints on this node by state"))
        if self.events:
            out.append(Sample("pilus_events_received_total", {}, self.events.received, "counter",
                              "Datapath events read by the agent"))
            out.append(Sample("pilus_events_lost_total", {}, self.events.lost(), "counter",
                              "Datapath events suppressed by the rate limit or a full ring"))
        return out

    async def status(self) -> dict:
        dp = self.datapath
        by_state = self._endpoints_by_state()
        try:
            kv = await self.store.status()
            kv["state"] = "Ok" if kv.get("ok", True) else "Failure"
        except Exception as exc:
            kv = {"state": "Failure", "error": str(exc)}
        identities = [i for i in await self.identity_rows() if not i["reserved"]]
        return {
            "node": self.cfg.node_name,
            "cluster": self.cfg.cluster_name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "router_ip": str(self.router_ip),
            "node_ip": str(self.node_ip),
            "pod_cidr": str(self.cfg.pod_cidr),
            "agent": {"state": "Ok", "pid": os.getpid()},
            "kvstore": kv,
            "datapath": {
                "state": "Ok" if dp else "Failure",
                "programs": dp.programs() if dp else [],
                # in a thread: counting walks every map (60k keys with 20k services)
                "maps": await asyncio.to_thread(dp.map_stats) if dp else [],
            },
            "ipam": self.ipam.stats(),
            "endpoints": {"total": sum(by_state.values()), "by_state": by_state},
            "identities": {"allocated": len(identities)},
            "policy": {
                "mode": self.cfg.policy_enforcement,
                "revision": self.policy.revision if self.policy else 0,
            },
            "events": {
                "received": self.events.received if self.events else 0,
                "lost": self.events.lost() if self.events else 0,
                "received_by_type": self.events.received_by_type() if self.events else {},
                # event types the datapath emits: those some monitor subscriber wants
                "listening": self.events.listening() if self.events else [],
            },
        }


def describe(cfg: AgentConfig) -> str:
    lines = [f"pilus agent {__version__} for node {cfg.node_name}", "components (start order):"]
    for line in (__doc__ or "").splitlines():
        if line.startswith("  ") and line.strip():
            lines.append(line)
    lines.append("settings:")
    for key, value in vars(cfg).items():
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


async def _run(cfg: AgentConfig) -> int:
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except BaseException:
        await agent.stop()
        raise
    await stop.wait()
    log.info("stopping (the datapath keeps forwarding)")
    await agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = AgentConfig(
        node_name=args.node_name,
        state_dir=args.state_dir,
        pod_cidr=args.pod_cidr,
        cluster_name=args.cluster_name,
        kvstore=args.kvstore,
        kvstore_path=args.kvstore_path,
        native_device=args.native_device,
        bpffs_root=args.bpffs_root,
        mtu=args.mtu,
        policy_enforcement=args.policy_enforcement,
        cluster_cidr=args.cluster_cidr,
        lb_algorithm=args.lb_algorithm,
        socket_lb=args.socket_lb,
        maglev_table_size=args.bpf_lb_maglev_table_size,
        prometheus_addr=args.prometheus_serve_addr,
    )
    if args.describe:
        print(describe(cfg))
        return 0
    try:
        return asyncio.run(_run(cfg))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        from pilus.errors import user_message

        message = user_message(exc)
        if message is None:
            raise
        print(f"pilus agent: {message}", file=sys.stderr)
        return 1
