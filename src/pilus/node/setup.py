"""Node-level plumbing the datapath relies on, done once at agent start (idempotent).

- `pilus_host`/`pilus_net`: a veth pair carrying the router (gateway) IP that every
  pod routes through, like Cilium's cilium_host/cilium_net.
- forwarding on, reverse-path filtering off (pods use /32s and per-endpoint routes).
- masquerade for pod traffic leaving the node (nftables table `pilus`), except to the
  cluster's pods (the native-routing CIDR) and to the cluster's nodes (set
  `cluster_nodes`, kept by node/routes.py).
- L7 proxy delivery (docs/l7.md "Datapath redirect"): packets the datapath marks
  MARK_MAGIC_TO_PROXY (0x200/0xf00) are delivered locally, to the proxy's
  transparent sockets, whatever their destination: `ip rule fwmark 0x200/0xf00
  lookup 2004 pref 9` and `local 0.0.0.0/0 dev lo table 2004`; replies that come
  back through netfilter (egress L7 to the world: de-masqueraded in prerouting)
  get that mark from `socket transparent 1` (table `pilus`, chain `proxy`).
- tunnel mode: the VXLAN device `pilus_vxlan` (collect-metadata, UDP 8472); native
  routing: no such device (one left by a tunnel-mode run is removed).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from pilus.datapath import links

HOST_DEV = "pilus_host"
NET_DEV = "pilus_net"
NFT_TABLE = "pilus"
TUNNEL_DEV = "pilus_vxlan"
# Cilium's: MARK_MAGIC_TO_PROXY under MARK_MAGIC_HOST_MASK, its table and preference
PROXY_MARK = 0x0200
PROXY_MARK_MASK = 0x0F00
PROXY_ROUTE_TABLE = 2004
PROXY_RULE_PRIORITY = 9


class NodeSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeAddressing:
    pod_cidr: IPv4Network
    router_ip: IPv4Address
    node_ip: IPv4Address
    native_device: str | None
    cluster_cidr: IPv4Network | None = None  # pods routable without masquerade (default: pod_cidr)
    tunnel_port: int = 8472  # the VXLAN port (its packets are not tracked)


def router_ip_for(pod_cidr: IPv4Network) -> IPv4Address:
    """The first usable address of the node's pod CIDR is its gateway."""
    if pod_cidr.num_addresses < 4:
        raise NodeSetupError(f"pod CIDR {pod_cidr} is too small: use a /30 or larger (e.g. /24)")
    return pod_cidr.network_address + 1


def detect_node_ip(native_device: str | None) -> tuple[IPv4Address | None, str | None]:
    """The first IPv4 address of the native device (or of the default route's device)."""
    if native_device is None:
        native_device = links.default_route_device()
        if native_device is None:
            return None, None
    if links.link_info(native_device) is None:
        raise NodeSetupError(f"native device {native_device!r} does not exist in this network namespace")
    addrs = links.addresses(native_device)
    return (IPv4Interface(addrs[0]).ip if addrs else None), native_device


def setup_node(addressing: NodeAddressing) -> None:
    if links.link_info(HOST_DEV) is None:
        links.create_veth(HOST_DEV, NET_DEV, peer_netns=None)
    links.set_link_up(HOST_DEV)
    links.set_link_up(NET_DEV)
    links.add_address(HOST_DEV, f"{addressing.router_ip}/32")
    for key, value in (
        ("net.ipv4.ip_forward", 1),
        ("net.ipv4.conf.all.rp_filter", 0),
        ("net.ipv4.conf.default.rp_filter", 0),
    ):
        links.set_sysctl(key, value)
    install_masquerade(addressing.pod_cidr, addressing.cluster_cidr or addressing.pod_cidr, addressing.tunnel_port)
    install_proxy_routing()


def install_proxy_routing(netns: str | None = None) -> None:
    """The policy routing that delivers MARK_MAGIC_TO_PROXY packets locally (idempotent)."""
    links.add_local_default_route(PROXY_ROUTE_TABLE, "lo", netns=netns)
    links.add_fwmark_rule(PROXY_MARK, PROXY_MARK_MASK, PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY,
                          netns=netns)


def remove_proxy_routing(netns: str | None = None) -> None:
    links.del_fwmark_rule(PROXY_MARK, PROXY_MARK_MASK, PROXY_ROUTE_TABLE, PROXY_RULE_PRIORITY,
                          netns=netns)


def install_masquerade(pod_cidr: IPv4Network, cluster_cidr: IPv4Network, tunnel_port: int = 8472) -> None:
    _nft(f"""
table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  set cluster_nodes {{ type ipv4_addr; }}
  chain prerouting {{
    # pod to pod and the tunnel's own packets need no NAT: keep netfilter's
    # connection tracking off those paths
    type filter hook prerouting priority raw; policy accept;
    ip saddr {cluster_cidr} ip daddr {cluster_cidr} notrack
    udp dport {tunnel_port} notrack
  }}
  chain output {{
    type filter hook output priority raw; policy accept;
    udp dport {tunnel_port} notrack
  }}
  chain proxy {{
    # a reply for a proxy's transparent upstream socket (found through the
    # connection's NAT: the socket has the pod's address) is delivered locally;
    # udp: the DNS proxy's upstream queries to the world
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto {{ tcp, udp }} socket transparent 1 socket wildcard 0 meta mark set {PROXY_MARK:#x}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pod_cidr} ip daddr != {cluster_cidr} ip daddr != @cluster_nodes oifname != "lxc*" \
      oifname != "{HOST_DEV}" oifname != "{TUNNEL_DEV}" masquerade
  }}
}}
""", "installing the masquerade rule")


def set_cluster_node_ips(ips: list[IPv4Address]) -> None:
    """The node IPs the masquerade leaves alone (one transaction)."""
    elements = f"add element ip {NFT_TABLE} cluster_nodes {{ {', '.join(map(str, ips))} }}\n" if ips else ""
    _nft(f"flush set ip {NFT_TABLE} cluster_nodes\n{elements}", "updating the cluster's node IPs")


def _nft(ruleset: str, what: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise NodeSetupError("nft not found: install nftables (run `make setup`)")
    done = subprocess.run([nft, "-f", "-"], input=ruleset, text=True, capture_output=True)
    if done.returncode != 0:
        raise NodeSetupError(f"{what} failed: {done.stderr.strip()}")


def setup_tunnel_device(mode: str, port: int, mtu: int) -> tuple[str | None, int]:
    """Tunnel mode: the VXLAN device (created or kept), as (name, ifindex); native
    routing: (None, 0), and a device of an earlier tunnel-mode run is removed."""
    if mode != "tunnel":
        links.delete_link(TUNNEL_DEV)
        return None, 0
    ifindex = links.create_vxlan(TUNNEL_DEV, port, mtu)
    links.set_sysctl(f"net.ipv4.conf.{TUNNEL_DEV}.rp_filter", 0)
    return TUNNEL_DEV, ifindex

