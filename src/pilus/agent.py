"""`pilus agent`: the composition root of one node.

The agent is a table of components (``Agent.rows``): each row names a component,
says its job in one line, builds it without I/O (``make``), and starts and stops
it. Rows are built and started in table order, so a row's constructor gets the
components above it as arguments; they stop in reverse order, also when a start
fails half-way. ``status()`` and ``describe()`` are derived from the table.
A test replaces rows by name (``Agent(cfg, replace={"node": ...})``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from prometheus_client import CollectorRegistry

from pilus import __version__, protocols
from pilus.agent_flags import AgentConfig, build_parser, config_from_args
from pilus.agent_fqdn import AgentFQDN
from pilus.agent_hubble import AgentEndpointLookup, NodePeers
from pilus.agent_proxy import AgentProxy
from pilus.api.server import APIServer
from pilus.components import (
    EventsPart,
    KVStoreConnection,
    MapRetrier,
    NodeAddresses,
    NodeIpcacheEntries,
    NodeNetwork,
    StateDirLock,
    TunnelDevice,
    stop_deadline,
)
from pilus.datapath import Datapath, DatapathConfig
from pilus.datapath.lb import LbConfig
from pilus.datapath.socklb import NetnsCookies
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.manager import EndpointManager, EndpointNotFound, NodeInfo
from pilus.endpoint.model import EndpointStore
from pilus.endpoint.policy_sync import PolicySync
from pilus.errors import TraceInputError, user_message
from pilus.hubble.metrics import HubbleMetrics
from pilus.hubble.part import HubblePart
from pilus.identity import reserved
from pilus.identity.allocator import IdentityAllocator
from pilus.identity.labels import Label, Labels, endpoint_labels, parse_labels
from pilus.ipam.hostscope import HostScopeIPAM
from pilus.ipcache import IPCache
from pilus.ipcache.kvsync import IPCacheSync, IPIdentityPair
from pilus.kvstore import KVStoreError
from pilus.loadbalancer.distribution import ServiceDistribution
from pilus.loadbalancer.endpoints import endpoints_for_services
from pilus.loadbalancer.manager import ServiceManager
from pilus.metrics.collector import AgentCollector, Sample, datapath_samples
from pilus.metrics.server import PrometheusServer
from pilus.node import setup as node_setup
from pilus.node.registry import NodeEntry, NodeRegistry
from pilus.node.routes import VXLAN_OVERHEAD, NodeRoutes
from pilus.observer.monitor import EventHub
from pilus.policy.distribution import PolicyDistribution
from pilus.policy.engine import PolicyEngine
from pilus.secrets import SecretSync

log = logging.getLogger("pilus.agent")


def _call(method: str) -> Callable[[Any], Awaitable[None] | None]:
    return lambda part: getattr(part, method)()


def _call_if(method: str) -> Callable[[Any], Awaitable[None] | None]:
    return lambda part: getattr(part, method)() if hasattr(part, method) else None


@dataclass(frozen=True)
class Row:
    """One component: ``make`` builds it (no I/O) once the rows above it started."""

    name: str
    job: str
    make: Callable[[], Any]
    start: Callable[[Any], Awaitable[None] | None] = _call("start")
    stop: Callable[[Any], Awaitable[None] | None] | None = _call("stop")
    #: the status of the reconcilers of the maps this component owns
    maps: Callable[[Any], list[dict]] | None = None
    enabled: bool = True


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


class Agent:
    def __init__(self, cfg: AgentConfig, *, replace: Mapping[str, Callable[[], Any]] | None = None) -> None:
        self.cfg = cfg
        self.started = time.monotonic()
        self.router_ip = node_setup.router_ip_for(cfg.pod_cidr)
        self.policy_engine = PolicyEngine(mode=cfg.policy_enforcement, cluster=cfg.cluster_name)
        self.registry = CollectorRegistry()
        self.registry.register(AgentCollector(self.samples))
        self._netns_cookies = NetnsCookies()
        self._endpoints_restored = False
        self._backends_task: asyncio.Task | None = None
        self.hubble_lookup: AgentEndpointLookup | None = None  # invalidated when the endpoints change
        self.parts: dict[str, Any] = {}  # built components by row name
        self.state: dict[str, str] = {}  # row name -> Pending / Ok / Failed: ... / Stopped
        self._started: list[Row] = []
        self.rows = self._table(dict(replace or {}))
        unknown = set(replace or {}) - {r.name for r in self.rows}
        if unknown:
            raise ValueError(f"no component named {', '.join(sorted(unknown))}")
        for row in self.rows:
            self.state[row.name] = "Pending" if row.enabled else "Disabled"

    def _table(self, replace: dict[str, Callable[[], Any]]) -> list[Row]:
        cfg = self.cfg
        rows = [
            Row("lock", "one agent per state dir (flock on <state-dir>/agent.lock)",
                lambda: StateDirLock(cfg.state_dir), _call("acquire"), _call("release")),
            Row("kvstore", "cluster state (identities, policies); embedded SQLite shared by the cluster, or etcd",
                lambda: KVStoreConnection(cfg.kvstore, cfg.kvstore_path or cfg.state_dir / "kvstore.db",
                                          dict(cfg.kvstore_opts)),
                _call("open"), _call("close")),
            Row("addresses", "node IP and native device from the routing table",
                lambda: NodeAddresses(cfg.native_device, self.router_ip), _call("detect"), None),
            Row("tunnel", "tunnel mode: the VXLAN device pilus_vxlan (collect-metadata, --tunnel-port); "
                "native routing: none",
                lambda: TunnelDevice(cfg.routing_mode, cfg.tunnel_port, cfg.mtu - VXLAN_OVERHEAD), stop=None),
            Row("datapath", "compile (cached) + load bpf_lxc.o, bpf_host.o on the native device, "
                "bpf_overlay.o on the tunnel device, bpf_sock.o "
                "(--socket-lb; else its old links go); maps pinned under <bpffs-root>/<node>/",
                lambda: Datapath(self._datapath_config(), cfg.state_dir, bpffs_root=cfg.bpffs_root),
                lambda dp: asyncio.to_thread(dp.load), _call("close"),
                maps=lambda dp: [dp.socket_lb.netns_sync.status()] if dp.socket_lb else []),
            Row("node", "pilus_host router device, sysctls, masquerade (netlink, nft)",
                lambda: NodeNetwork(node_setup.NodeAddressing(
                    cfg.pod_cidr, self.router_ip, self.node_ip, self.parts["addresses"].device,
                    cfg.cluster_cidr, cfg.tunnel_port)),
                stop=None),
            Row("ipcache", "one owner of pilus_ipcache: claims by source, merged by precedence",
                lambda: IPCache(self.datapath.ipcache), lambda _: None, None,
                maps=lambda ipcache: [ipcache.status()]),
            Row("endpoint-map", "one owner of pilus_lxc / pilus_lxc_if (endpoint entries)",
                lambda: EndpointEntries(self.datapath.endpoints), lambda _: None, None,
                maps=lambda entries: [entries.status()]),
            Row("node-ipcache", "ipcache claims: router and node IP -> host, 0.0.0.0/0 -> world",
                lambda: NodeIpcacheEntries(self.ipcache, self.router_ip, self.node_ip),
                _call("write"), None),
            Row("services", "Services -> LB maps; restored from the maps, written once endpoints are known",
                self._make_services, lambda s: asyncio.to_thread(s.restore), None,
                maps=lambda s: s.reconcilers_status()),
            Row("service-sync", "services cluster-wide: published to and followed from the kvstore "
                "(pilus/state/services/v1)",
                lambda: ServiceDistribution(self.store, self.services)),
            Row("identities", "label set -> numeric identity through the kvstore",
                lambda: IdentityAllocator(self.store, cfg.node_name)),
            Row("node-registry", "this node in the kvstore under a lease; watches every node of the cluster",
                self._make_nodes),
            Row("node-routes", "other nodes' pod CIDRs: tunnel map + routes into pilus_vxlan (tunnel), "
                "or routes via their node IPs (native); node IPs kept out of the masquerade",
                self._make_node_routes, maps=lambda r: r.reconcilers_status()),
            Row("ipcache-sync", "endpoints of every node in the kvstore (cilium/state/ip/v1) -> KVSTORE ipcache "
                "claims; other nodes' IPs -> remote-node",
                lambda: IPCacheSync(self.store, self.ipcache, self.node_registry, cluster=cfg.cluster_name,
                                    node_name=cfg.node_name, node_ip=self.node_ip,
                                    on_remote_change=self._remote_endpoints_changed)),
            Row("ipam", "host-scope allocator over the node's pod CIDR",
                lambda: HostScopeIPAM(cfg.pod_cidr, reserved=[self.router_ip]), lambda _: None, None),
            Row("policy", "policies + namespaces from the kvstore -> engine -> per-endpoint policy maps",
                self._make_policy, self._start_policy, maps=lambda p: p.reconcilers_status()),
            Row("secrets", "headerMatches secrets cluster-wide (pilus/state/secrets/v1) -> the proxy's secrets file",
                lambda: SecretSync(self.store)),
            Row("proxy", "L7 proxy: config from policy, supervised process, records -> events "
                "(listeners --proxy-ingress-port / --proxy-egress-port; the process outlives the agent)",
                lambda: AgentProxy.for_agent(self)),
            Row("fqdn", "DNS proxy on --tofqdns-proxy-port (rules.dns) -> DNS cache -> toFQDNs identities "
                "in the ipcache and policy maps before the answer goes out", lambda: AgentFQDN.for_agent(self)),
            Row("endpoints", "restore saved endpoints, then serve create/delete; feeds service backends",
                self._make_endpoints, self._start_endpoints, None),
            Row("retries", "writes again map entries whose write failed, after their backoff",
                lambda: MapRetrier([self.ipcache, self.parts["endpoint-map"], self.services,
                                    self.parts["node-routes"]])),
            Row("events", "ring buffer -> monitor subscribers", lambda: EventsPart(self.datapath)),
            Row("hubble", "events -> flows (ring of --hubble-event-buffer-capacity); Hubble's Observer gRPC "
                "API on <state-dir>/hubble.sock and --hubble-listen-address",
                self._make_hubble, enabled=cfg.enable_hubble),
            Row("api", "REST on <state-dir>/pilus.sock", lambda: APIServer(self, cfg.socket_path)),
            Row("metrics", "Prometheus /metrics on --prometheus-serve-addr",
                lambda: PrometheusServer(self.registry, *cfg.prometheus_addr),
                enabled=cfg.prometheus_addr is not None),
        ]
        # a replacement (a test's fake) has start() and stop() when it needs them
        return [Row(r.name, r.job, replace[r.name], _call_if("start"), _call_if("stop"), r.maps, r.enabled)
                if r.name in replace else r for r in rows]

    # -- components (built in table order: each may use the ones above) --------

    @property
    def node_ip(self) -> IPv4Address:
        addresses = self.parts.get("addresses")
        return addresses.node_ip if addresses is not None else self.router_ip

    @property
    def store(self):
        conn = self.parts.get("kvstore")
        return conn.store if conn is not None else None

    @property
    def datapath(self) -> Datapath | None:
        return self.parts.get("datapath")

    @property
    def ipcache(self) -> IPCache | None:
        return self.parts.get("ipcache")

    @property
    def services(self) -> ServiceManager | None:
        return self.parts.get("services")

    @property
    def service_sync(self) -> ServiceDistribution | None:
        return self.parts.get("service-sync")

    @property
    def identities(self) -> IdentityAllocator | None:
        return self.parts.get("identities")

    @property
    def node_registry(self) -> NodeRegistry | None:
        return self.parts.get("node-registry")

    @property
    def ipam(self) -> HostScopeIPAM | None:
        return self.parts.get("ipam")

    @property
    def policy(self) -> PolicySync | None:
        return self.parts.get("policy")

    @property
    def distribution(self) -> PolicyDistribution | None:
        return self.policy.distribution if self.policy else None

    @property
    def proxy(self) -> AgentProxy | None:
        return self.parts.get("proxy")

    @property
    def fqdn(self) -> AgentFQDN | None:
        return self.parts.get("fqdn")

    @property
    def endpoints(self) -> EndpointManager | None:
        return self.parts.get("endpoints")

    @property
    def events(self) -> EventHub | None:
        part = self.parts.get("events")
        return part.hub if part is not None else None

    @property
    def api(self) -> APIServer | None:
        return self.parts.get("api")

    @property
    def hubble(self) -> HubblePart | None:
        return self.parts.get("hubble")

    @property
    def prometheus(self) -> PrometheusServer | None:
        return self.parts.get("metrics")

    def _datapath_config(self) -> DatapathConfig:
        cfg = self.cfg
        return DatapathConfig(
            node_name=cfg.node_name, router_ip=self.router_ip, node_ip=self.node_ip, pod_cidr=cfg.pod_cidr,
            lb=LbConfig(maglev_table_size=cfg.maglev_table_size),
            socket_lb=cfg.socket_lb, native_device=self.parts["addresses"].device,
            tunnel_device=self.parts["tunnel"].name, tunnel_ifindex=self.parts["tunnel"].ifindex,
            tunnel_port=cfg.tunnel_port,
            lb_mode=cfg.bpf_lb_mode, monitor_aggregation=cfg.monitor_aggregation,
            monitor_aggregation_interval=cfg.monitor_aggregation_interval,
            events_rate=cfg.bpf_events_rate_limit, events_burst=cfg.bpf_events_burst_limit,
        )

    def _make_services(self) -> ServiceManager:
        cfg = self.cfg
        return ServiceManager(
            self.datapath,
            default_algorithm=cfg.lb_algorithm,
            node_ips=[self.node_ip],
            known_networks=[cfg.cluster_cidr or cfg.pod_cidr],
            local_networks=[cfg.pod_cidr],
            state_path=cfg.state_dir / "services.json",
        )

    def _make_hubble(self) -> HubblePart:
        cfg = self.cfg
        addr = cfg.hubble_listen_address
        self.hubble_lookup = AgentEndpointLookup(self)
        # Hubble names a node <cluster>/<node> (its node-name filter reads it so)
        return HubblePart(self.events, self.hubble_lookup, node_name=f"{cfg.cluster_name}/{cfg.node_name}",
                          socket_path=cfg.state_dir / "hubble.sock",
                          tcp_address=f"{addr[0]}:{addr[1]}" if addr else None,
                          capacity=cfg.hubble_event_buffer_capacity, cluster_name=cfg.cluster_name,
                          peer_address=f"{self.node_ip}:{addr[1]}" if addr else None,
                          event_types=cfg.hubble_monitor_events,
                          metrics=HubbleMetrics(cfg.hubble_metrics) if cfg.hubble_metrics else None,
                          metrics_address=cfg.hubble_metrics_server,
                          peers=NodePeers(self.node_registry, cfg.cluster_name, addr[1])
                          if addr and self.node_registry is not None else None)

    def _make_nodes(self) -> NodeRegistry:
        cfg = self.cfg
        return NodeRegistry(self.store, NodeEntry(cfg.node_name, cfg.cluster_name, self.node_ip,
                                                  cfg.pod_cidr, self.router_ip))

    def _make_node_routes(self) -> NodeRoutes:
        cfg = self.cfg
        return NodeRoutes(self.node_registry, cfg.routing_mode, self.node_registry.local,
                          tunnel_map=self.datapath.tunnel if cfg.routing_mode == "tunnel" else None,
                          native_device=self.parts["addresses"].device, mtu=cfg.mtu)

    def _make_policy(self) -> PolicySync:
        return PolicySync(self.policy_engine, self.datapath, self.identities, PolicyDistribution(self.store),
                          ipcache=self.ipcache, entries=self.parts["endpoint-map"],
                          on_namespace_change=self._namespace_changed)

    async def _start_policy(self, policy: PolicySync) -> None:
        await policy.start()
        await policy.watch_services(self.services)  # toServices follows service changes

    def _make_endpoints(self) -> EndpointManager:
        cfg = self.cfg
        policy = self.policy
        return EndpointManager(
            NodeInfo(cfg.node_name, cfg.cluster_name, self.router_ip, cfg.pod_cidr, cfg.mtu,
                     cfg.mtu - VXLAN_OVERHEAD if cfg.routing_mode == "tunnel" else None),
            self.datapath,
            self.identities,
            self.ipam,
            EndpointStore(cfg.state_dir),
            ipcache=self.ipcache,
            entries=self.parts["endpoint-map"],
            policy=policy,
            namespace_labels=lambda ns: policy.namespace_labels.get(ns, {}),
            on_change=self.endpoints_changed,  # after create/delete/relabel; restore() calls nothing
        )

    async def _start_endpoints(self, endpoints: EndpointManager) -> None:
        restored = await endpoints.restore()
        self._restored = len(restored)
        # every source has claimed its ipcache entries again: what nobody claims goes
        await asyncio.to_thread(self.ipcache.resync)
        # services see the endpoints only once all are restored: a partial set taken as
        # truth would drop backends (and refuse new connections) until the next change
        self._endpoints_restored = True
        await self.endpoints_changed()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Build and start every enabled row in table order; on a failure, stop the
        rows already started (in reverse) and raise."""
        self._restored = 0
        for row in self.rows:
            if not row.enabled:
                continue
            self.state[row.name] = "Starting"
            try:
                part = self.parts[row.name] = row.make()
                self._started.append(row)
                await _maybe_await(row.start(part))
            except BaseException as exc:
                self.state[row.name] = f"Failed: {exc}"
                await self.stop()
                raise
            self.state[row.name] = "Ok"
        log.info(
            "agent %s ready: pod CIDR %s, router %s, node IP %s, %d endpoints restored",
            self.cfg.node_name, self.cfg.pod_cidr, self.router_ip, self.node_ip, self._restored,
        )

    async def stop(self) -> None:
        """Stop serving, in reverse table order; the datapath (pinned maps, attached
        programs) keeps running."""
        while self._started:
            row = self._started.pop()
            try:
                if row.stop is not None:
                    await _maybe_await(row.stop(self.parts[row.name]))
                if not self.state[row.name].startswith("Failed"):
                    self.state[row.name] = "Stopped"
            except Exception as exc:
                self.state[row.name] = f"Failed: stopping: {exc}"
                log.exception("stopping %s failed", row.name)

    async def endpoints_changed(self) -> None:
        """Service backends follow the endpoints (like Kubernetes Endpoints); the other
        nodes learn them through the kvstore."""
        if self.hubble_lookup is not None:
            self.hubble_lookup.invalidate()
        sync = self.parts.get("ipcache-sync")
        if sync is not None and self.endpoints is not None:
            await sync.publish(self.endpoints.list())
        await self._feed_service_backends()
        if self.endpoints is not None and self.datapath is not None and self.datapath.socket_lb:
            # the socket LB translates only sockets of these namespaces
            eps = self.endpoints.list()
            sock = self.datapath.socket_lb
            await asyncio.to_thread(lambda: sock.sync_netns(self._netns_cookies.pods(eps)))

    async def _feed_service_backends(self) -> None:
        """Service backends: this node's endpoints and, for selectors, the other nodes'
        (their labels from their identities, their named ports as published). Egress
        rules' named ports resolve to the other nodes' ones too."""
        if self.services is None or self.endpoints is None or not self._endpoints_restored:
            return
        views = endpoints_for_services(self.endpoints.list())
        sync = self.parts.get("ipcache-sync")
        remote = sync.remote_endpoints() if sync is not None else []
        for pair in remote:
            ident = await self.identities.get(pair.identity)
            if ident is not None:
                views.append({"ip": str(pair.ip), "labels": [str(label) for label in ident.labels],
                              "named_ports": pair.named_port_specs(), "node_local": False,
                              "state": "active"})
        if self.policy is not None:
            await self.policy.set_remote_named_ports(p.named_port_specs() for p in remote)
        await asyncio.to_thread(self.services.set_endpoints, views)

    def _remote_endpoints_changed(self) -> None:
        """IPCacheSync's callback: feed the services again, once per burst of changes."""
        if self._backends_task is None or self._backends_task.done():
            self._backends_task = asyncio.get_running_loop().create_task(self._feed_after_burst())

    async def _feed_after_burst(self) -> None:
        await asyncio.sleep(0.05)
        try:
            await self._feed_service_backends()
        except Exception:
            log.exception("feeding remote service backends failed")

    async def _namespace_changed(self, namespace: str, labels: dict[str, str]) -> None:
        if self.endpoints is not None:
            for ep in await self.endpoints.namespace_changed(namespace):
                log.info("endpoint %d %s now has identity %d", ep.id, ep.name, ep.identity)

    def components(self) -> list[dict]:
        """Every row of the table: name, job, state, and the reconcilers of its maps."""
        out = []
        for row in self.rows:
            entry: dict[str, Any] = {"name": row.name, "job": row.job, "state": self.state[row.name]}
            part = self.parts.get(row.name)
            if row.maps is not None and part is not None:
                try:
                    entry["maps"] = row.maps(part)
                except Exception as exc:  # noqa: BLE001 - status must answer
                    entry["maps"] = [{"state": "Failure", "error": str(exc)}]
            out.append(entry)
        return out

    # -- views for the API ---------------------------------------------------

    async def _identity_of_ip(self, text: str) -> tuple[int, Labels]:
        """What the datapath would see for this address: the ipcache's longest prefix."""
        try:
            addr = IPv4Address(text)
        except ValueError:
            raise TraceInputError(f"{text!r} is not an IPv4 address") from None
        entry = self.ipcache.lookup(addr)
        ident = entry.identity if entry is not None else reserved.WORLD
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
            return (await self._trace_endpoint(str(ref)))[0], True
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
        if not port.isdigit() or int(port) > 65535 or proto_name not in protocols.NUMBERS:
            raise TraceInputError(f"dport {port_text!r}: expected PORT[/TCP|UDP|ICMP] with PORT 0-65535")
        result = await self.policy.trace(
            src, dst, int(port), protocols.NUMBERS[proto_name], src_is_local=src_local, dst_is_local=dst_local,
            src_ip=self._trace_ip(body, "src"), dst_ip=self._trace_ip(body, "dst"),
        )
        return result.to_dict()

    def _trace_ip(self, body: dict, side: str) -> IPv4Address | None:
        """The address of one side of a trace, when known (ipBlock rules match addresses)."""
        ref = body.get(f"{side}_endpoint")
        if ref is not None:
            return self._trace_endpoint_ip(str(ref))
        ip = body.get(f"{side}_ip")
        return IPv4Address(str(ip)) if ip is not None else None

    async def _trace_endpoint(self, ref: str) -> tuple[Labels, IPv4Address]:
        """A local endpoint, else another node's (by namespace/pod, through the kvstore)."""
        try:
            ep = self.endpoints.lookup(ref)
            return parse_labels(ep.labels), ep.ipv4
        except EndpointNotFound:
            pair = self._remote_endpoint(ref)
            found = await self.identities.get(pair.identity) if pair is not None else None
            if found is None:
                raise
            return found.labels, pair.ip

    def _trace_endpoint_ip(self, ref: str) -> IPv4Address | None:
        try:
            return self.endpoints.lookup(ref).ipv4
        except EndpointNotFound:
            pair = self._remote_endpoint(ref)
            return pair.ip if pair is not None else None

    def _remote_endpoint(self, ref: str) -> IPIdentityPair | None:
        sync = self.parts.get("ipcache-sync")
        return sync.remote_endpoint(ref) if sync is not None and "/" in ref else None

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
        try:
            allocated: int | None = sum(1 for i in await self.identity_rows() if not i["reserved"])
        except KVStoreError:
            allocated = None  # the kvstore outage is reported above; status still answers
        return {
            "node": self.cfg.node_name,
            "cluster": self.cfg.cluster_name,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "router_ip": str(self.router_ip),
            "node_ip": str(self.node_ip),
            "pod_cidr": str(self.cfg.pod_cidr),
            "agent": {"state": "Ok", "pid": os.getpid()},
            "components": self.components(),
            "kvstore": kv,
            "datapath": {
                "state": "Ok" if dp else "Failure",
                "programs": dp.programs() if dp else [],
                # in a thread: counting walks every map (60k keys with 20k services)
                "maps": await asyncio.to_thread(dp.map_stats) if dp else [],
            },
            "ipam": self.ipam.stats() if self.ipam else {},
            "endpoints": {"total": sum(by_state.values()), "by_state": by_state},
            "identities": {"allocated": allocated},
            "nodes": self.node_registry.status() if self.node_registry else {},
            "routing": routes.status() if (routes := self.parts.get("node-routes")) and hasattr(routes, "status")
            else {"mode": self.cfg.routing_mode},
            "hubble": self.hubble.status() if self.hubble is not None and hasattr(self.hubble, "status")
            else {"ok": False, "disabled": True},
            "proxy": self.proxy.summary() if self.proxy is not None and hasattr(self.proxy, "summary")
            else {"state": "Disabled"},
            "dns_proxy": self.fqdn.status() if self.fqdn is not None and hasattr(self.fqdn, "status")
            else {"state": "Disabled"},
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
    """The table (start order; stop runs in reverse) and the settings."""
    lines = [f"pilus agent {__version__} for node {cfg.node_name}", "components (start order):"]
    for row in Agent(cfg).rows:
        lines.append(f"  {row.name:<15}{row.job}" + ("" if row.enabled else " (off)"))
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
    await agent.start()  # stops what it started when a component fails
    await stop.wait()
    log.info("stopping (the datapath keeps forwarding)")
    with stop_deadline():
        await agent.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except KVStoreError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.describe:
        print(describe(cfg))
        return 0
    try:
        return asyncio.run(_run(cfg))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        print(f"pilus agent: {message}", file=sys.stderr)
        return 1
