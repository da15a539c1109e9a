"""The netlink side of an endpoint: network namespace, veth pair, addresses, routes,
neighbours. Blocking calls (the manager runs them in a thread); the manager takes this
as a seam, so its unit tests replace it with an in-memory one."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from pilus.datapath import links
from pilus.endpoint.model import Endpoint
from pilus.proxy.context import UPSTREAM_PORTS

log = logging.getLogger(__name__)

POD_IFNAME = "eth0"
#: the pods' ephemeral ports: below the L7 proxy's upstream ports (proxy/context.py)
POD_EPHEMERAL_PORTS = (32768, UPSTREAM_PORTS[0] - 1)


class VethPlumbing:
    def plumb(self, ep: Endpoint, router_ip: IPv4Address, mtu: int, route_mtu: int | None = None) -> None:
        """Build the pod's netns and veth; sets ep.interface_index, ep.host_mac, ep.mac.
        ``route_mtu``: the MTU of the pod's default route (tunnel mode: room for the
        VXLAN header), else the device's."""
        router = str(router_ip)
        links.create_netns(ep.netns)
        for key in ("all", "default"):
            links.set_sysctl(f"net.ipv6.conf.{key}.disable_ipv6", 1, netns=ep.netns)
        links.set_sysctl("net.ipv4.ip_local_port_range", "{} {}".format(*POD_EPHEMERAL_PORTS), netns=ep.netns)
        veth = links.create_veth(ep.interface_name, POD_IFNAME, peer_netns=ep.netns, mtu=mtu)
        ep.interface_index, ep.host_mac, ep.mac = veth.host_ifindex, veth.host_mac, veth.peer_mac
        links.set_sysctl(f"net.ipv6.conf.{ep.interface_name}.disable_ipv6", 1)
        links.set_sysctl(f"net.ipv4.conf.{ep.interface_name}.rp_filter", 0)
        # the L7 hairpin (bpf_lxc.c) hands the stack, on this device, packets
        # whose source may be a node address (the node as client)
        links.set_sysctl(f"net.ipv4.conf.{ep.interface_name}.accept_local", 1)
        # pod side: /32, the router on-link, default via the router, router's MAC pinned
        links.add_address(POD_IFNAME, f"{ep.ipv4}/32", netns=ep.netns)
        links.add_route(f"{router}/32", dev=POD_IFNAME, scope="link", netns=ep.netns)
        links.add_route("default", gateway=router, dev=POD_IFNAME, netns=ep.netns, mtu=route_mtu)
        links.add_neigh(router, ep.host_mac, POD_IFNAME, netns=ep.netns)
        # node side: a /32 route to the pod through its lxc device, its MAC pinned
        links.add_route(f"{ep.ipv4}/32", dev=ep.interface_name, scope="link", src=router)
        links.add_neigh(str(ep.ipv4), ep.mac, ep.interface_name)

    def remove_netns(self, ep: Endpoint) -> None:
        links.delete_netns(ep.netns)

    def remove_veth(self, ep: Endpoint) -> None:
        links.delete_link(ep.interface_name)

    def teardown(self, ep: Endpoint) -> None:
        """Route, veth and netns of the endpoint; each step best effort."""
        for step in (
            lambda: links.del_route(f"{ep.ipv4}/32"),
            lambda: self.remove_veth(ep),
            lambda: self.remove_netns(ep),
        ):
            try:
                step()
            except Exception as exc:  # a half-gone endpoint is still deleted
                log.warning("deleting endpoint %d: %s", ep.id, exc)

    def find(self, ep: Endpoint) -> int | None:
        """The host-side veth's ifindex if the veth and the netns are still there."""
        link = links.link_info(ep.interface_name)
        if link is None or not links.netns_exists(ep.netns):
            return None
        return link["ifindex"]
