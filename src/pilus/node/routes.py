"""How this node reaches the pods of the other nodes (row ``node-routes``).

Driven by the node registry (``NodeRegistry.on_change``), for every other node:

- tunnel mode (Cilium's default): its pod CIDR -> its node IP in ``pilus_tunnel_map``
  (where bpf_lxc.c and bpf_overlay.c encapsulate to when the ipcache has no tunnel
  endpoint), and a kernel route ``<pod CIDR> dev pilus_vxlan src <router IP> mtu
  <mtu - 50>`` for the node's own traffic (cil_to_overlay sets its tunnel key; pods'
  traffic is redirected by BPF and never takes the route);
- native routing: ``<pod CIDR> via <node IP> dev <native device>`` (Cilium's
  auto-direct-node-routes: the nodes share one L2 segment).

Both kinds of writes go through a ``Reconciler`` (the map, and the kernel routes
marked with protocol ``ROUTE_PROTO``, so routes of nodes that left, also during a
restart, are found and removed). The cluster's node IPs are kept in the nft set the
masquerade rule leaves alone (node/setup.py): a pod talking to another node keeps its
address, as in Cilium's overlay, and a backend's reply to a NodePort SNAT reaches the
node that translated it. A node whose pod CIDR overlaps this node's or another's is
left out and reported (``status()['conflicts']``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pilus.datapath import links
from pilus.reconcile import Reconciler

from . import setup as node_setup
from .registry import NodeEntry, NodeRegistry

log = logging.getLogger("pilus.node.routes")

ROUTE_PROTO = 0x50  # marks pilus's node routes in the main table ("proto 80")
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
TUNNEL_DEV = node_setup.TUNNEL_DEV
TUNNEL_PORT = 8472  # the Linux VXLAN default, as Cilium's --tunnel-port
ROUTING_MODES = ("tunnel", "native")


@dataclass(frozen=True)
class RouteSpec:
    dev: str
    gateway: IPv4Address | None = None  # native routing: the other node's IP
    src: IPv4Address | None = None
    mtu: int | None = None


class KernelRoutes:
    """The main table's routes marked ROUTE_PROTO, as a Reconciler target: CIDR -> RouteSpec.
    ``dump`` reads back the gateway, what tells the two modes' routes apart."""

    def __init__(self, spec_for_dump: RouteSpec, netns: str | None = None) -> None:
        self._like = spec_for_dump
        self.netns = netns

    def dump(self) -> list[tuple[IPv4Network, RouteSpec]]:
        out = []
        for dst, gateway in links.list_routes(ROUTE_PROTO, self.netns).items():
            gw = IPv4Address(gateway) if gateway else None
            out.append((IPv4Network(dst), RouteSpec(self._like.dev, gw, self._like.src, self._like.mtu)))
        return out

    def update(self, dst: IPv4Network, spec: RouteSpec) -> None:
        links.add_route(str(dst), dev=spec.dev, gateway=str(spec.gateway) if spec.gateway else None,
                        src=str(spec.src) if spec.src else None, mtu=spec.mtu, proto=ROUTE_PROTO,
                        onlink=spec.gateway is not None, netns=self.netns)

    def delete(self, dst: IPv4Network) -> None:
        links.del_route(str(dst), self.netns)


class NodeRoutes:
    def __init__(
        self,
        registry: NodeRegistry,
        mode: str,
        local: NodeEntry,
        *,
        tunnel_map=None,  # the datapath's TunnelMap (tunnel mode)
        native_device: str | None = None,
        mtu: int = 1500,
        routes: KernelRoutes | None = None,
        node_ips=node_setup.set_cluster_node_ips,
    ) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"unknown routing mode {mode!r} (use {' or '.join(ROUTING_MODES)})")
        if mode == "native" and not native_device:
            raise ValueError("native routing needs the node's native device (--native-device)")
        self.registry, self.mode, self.local = registry, mode, local
        if mode == "tunnel":
            self._like = RouteSpec(TUNNEL_DEV, None, local.router_ip, mtu - VXLAN_OVERHEAD)
        else:
            self._like = RouteSpec(native_device or "", None)
        self.routes = Reconciler("node-routes", routes or KernelRoutes(self._like))
        self.tunnels = Reconciler("pilus_tunnel_map", tunnel_map) if tunnel_map is not None else None
        self._node_ips = node_ips
        self._written_ips: frozenset[IPv4Address] | None = None
        self.conflicts: dict[str, str] = {}
        self._unsubscribe = lambda: None

    async def start(self) -> None:
        # what an earlier run wrote is read back, so routes of nodes that left go
        self.routes.resync()
        if self.tunnels is not None:
            self.tunnels.resync()
        self._unsubscribe = self.registry.on_change(self.nodes_changed)
        self.nodes_changed(self.registry.nodes)

    async def stop(self) -> None:
        """Routes and the tunnel map stay: the datapath keeps forwarding without the agent."""
        self._unsubscribe()
        self._unsubscribe = lambda: None

    def nodes_changed(self, nodes: dict[str, NodeEntry]) -> None:
        remote, self.conflicts = self._remote_cidrs(nodes)
        if self.mode == "tunnel":
            want = {cidr: self._like for cidr in remote}
        else:
            want = {cidr: RouteSpec(self._like.dev, node_ip) for cidr, node_ip in remote.items()}
        self.routes.set(want)
        if self.tunnels is not None:
            self.tunnels.set(remote)
        ips = frozenset(n.node_ip for n in nodes.values()) | {self.local.node_ip}
        if ips != self._written_ips:
            try:
                self._node_ips(sorted(ips))
                self._written_ips = ips
            except node_setup.NodeSetupError as exc:
                log.warning("%s", exc)

    def _remote_cidrs(self, nodes: dict[str, NodeEntry]) -> tuple[dict[IPv4Network, IPv4Address], dict[str, str]]:
        """Other nodes' pod CIDRs -> node IP; overlapping ones left out (node -> why)."""
        taken: list[tuple[IPv4Network, str]] = [(self.local.pod_cidr, self.local.name)]
        out: dict[IPv4Network, IPv4Address] = {}
        conflicts: dict[str, str] = {}
        for node in sorted(nodes.values(), key=lambda n: (n.started, n.name)):
            if node.name == self.local.name:
                continue
            clash = next((name for cidr, name in taken if cidr.overlaps(node.pod_cidr)), None)
            if clash is not None:
                conflicts[node.name] = f"pod CIDR {node.pod_cidr} overlaps node {clash}'s"
                continue
            taken.append((node.pod_cidr, node.name))
            out[node.pod_cidr] = node.node_ip
        for name, why in conflicts.items():
            log.error("node %s is left out: %s", name, why)
        return out, conflicts

    def retry_due(self) -> bool:
        return any(r.retry_due() for r in self._reconcilers())

    def retry(self) -> None:
        for r in self._reconcilers():
            if r.retry_due():
                r.retry()

    def _reconcilers(self) -> list[Reconciler]:
        return [self.routes] + ([self.tunnels] if self.tunnels is not None else [])

    def status(self) -> dict:
        return {"mode": self.mode, "routes": len(self.routes.desired), "conflicts": dict(self.conflicts)}

    def reconcilers_status(self) -> list[dict]:
        return [r.status() for r in self._reconcilers()]
