"""Node-level plumbing the datapath relies on, done once at agent start (idempotent).

- `pilus_host`/`pilus_net`: a veth pair carrying the router (gateway) IP that every
  pod routes through, like Cilium's cilium_host/cilium_net.
- forwarding on, reverse-path filtering off (pods use /32s and per-endpoint routes).
- masquerade for pod traffic leaving the node (nftables table `pilus`).
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


class NodeSetupError(RuntimeError):
    pass


@dataclass(frozen=True)
class NodeAddressing:
    pod_cidr: IPv4Network
    router_ip: IPv4Address
    node_ip: IPv4Address
    native_device: str | None


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
    install_masquerade(addressing.pod_cidr)


def install_masquerade(pod_cidr: IPv4Network) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise NodeSetupError("nft not found: install nftables (run `make setup`)")
    ruleset = f"""
table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pod_cidr} ip daddr != {pod_cidr} oifname != "lxc*" oifname != "{HOST_DEV}" masquerade
  }}
}}
"""
    done = subprocess.run([nft, "-f", "-"], input=ruleset, text=True, capture_output=True)
    if done.returncode != 0:
        raise NodeSetupError(f"installing the masquerade rule failed: {done.stderr.strip()}")

