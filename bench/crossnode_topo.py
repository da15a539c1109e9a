"""Two-node baselines for bench.crossnode: kernel VXLAN or kernel routing, no BPF.

    underlay ns (bridge br0) --veth-- node1 ns (eth0) --veth-- pod ns (eth0)
                             --veth-- node2 ns (eth0) --veth-- pod ns (eth0)

Each pod has a /32, a link route to its node's router address and a default
route through it (static neighbours, as bench.run's A). A node forwards to its
own pod by a /32 route and to the peer's pod /24 either over a plain kernel
VXLAN (`vx0`, VNI 42, UDP 8472, fixed remote; pod routes MTU 1450) or
`via <peer node IP> dev eth0` on the underlay (MTU 1500). Built with `ip`
only: nothing here loads BPF or touches netfilter.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network

PREFIX = "bx-"  # every namespace made here (and only here) starts with it
VNI, VXLAN_PORT, VXLAN_MTU = 42, 8472, 1450


class TopoError(Exception):
    pass


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise TopoError(f"{' '.join(argv)}: {r.stderr.strip()[:300]}")
    return r.stdout


def sysctl(ns: str, key: str, value: int) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise TopoError(f"{ns}: sysctl {key}: {r.stderr.strip()[:200]}")


def mac(ifname: str, ns: str) -> str:
    return json.loads(ip("-j", "link", "show", "dev", ifname, ns=ns))[0]["address"]


def link_packets(ifname: str, ns: str) -> tuple[int, int]:
    """(rx, tx) packets of a link; (-1, -1) when it does not exist."""
    r = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "dev", ifname], capture_output=True, text=True)
    if r.returncode != 0:
        return -1, -1
    st = json.loads(r.stdout)[0]["stats64"]
    return int(st["rx"]["packets"]), int(st["tx"]["packets"])


@dataclass
class Baseline:
    client_ns: str
    server_ns: str
    client_ip: str
    server_ip: str
    node_ns: tuple[str, str]
    overlay_dev: str  # the device cross-node packets leave through: "vx0" or "eth0"


def _pod(node: str, pod: str, pod_ip: str, router: str, route_mtu: int) -> None:
    ip("netns", "add", pod)
    ip("link", "set", "lo", "up", ns=pod)
    ip("link", "add", "lxc0", "type", "veth", "peer", "name", "eth0", "netns", pod, ns=node)
    ip("addr", "add", f"{router}/32", "dev", "lxc0", ns=node)
    ip("link", "set", "lxc0", "up", ns=node)
    ip("addr", "add", f"{pod_ip}/32", "dev", "eth0", ns=pod)
    ip("link", "set", "eth0", "up", ns=pod)
    ip("route", "add", f"{router}/32", "dev", "eth0", "scope", "link", ns=pod)
    ip("route", "add", "default", "via", router, "dev", "eth0", "mtu", str(route_mtu), ns=pod)
    ip("neigh", "replace", router, "lladdr", mac("lxc0", node), "dev", "eth0", "nud", "permanent", ns=pod)
    ip("route", "add", f"{pod_ip}/32", "dev", "lxc0", ns=node)
    ip("neigh", "replace", pod_ip, "lladdr", mac("eth0", pod), "dev", "lxc0", "nud", "permanent", ns=node)


def build(tag: str, underlay: str, pod_cidr: str, vxlan: bool, nat: bool = False) -> Baseline:
    """Two nodes, one pod each; tag names the namespaces (bx-<tag>-u, -n1, -n2, -p1, -p2).
    nat: each node also gets the masquerade table a pilus node has (nft, postrouting,
    pod traffic to outside the cluster only): it never matches here, but a nat hook
    makes conntrack track every packet through the node."""
    und, pods = IPv4Network(underlay), IPv4Network(pod_cidr)
    node_ip = [str(und.network_address + 1 + i) for i in (1, 2)]
    node_pods = [IPv4Network((int(pods.network_address) + (i << 8), 24)) for i in (1, 2)]
    transit = [str(pods.network_address + i) for i in (1, 2)]  # vx0 addresses, in the pod CIDR's /24 #0
    u = f"{PREFIX}{tag}-u"
    nodes = (f"{PREFIX}{tag}-n1", f"{PREFIX}{tag}-n2")
    ip("netns", "add", u)
    ip("link", "add", "br0", "type", "bridge", ns=u)
    ip("link", "set", "br0", "up", ns=u)
    for i, node in enumerate(nodes):
        ip("netns", "add", node)
        ip("link", "set", "lo", "up", ns=node)
        for key in ("net.ipv4.ip_forward",):
            sysctl(node, key, 1)
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            sysctl(node, key, 0)
        ip("link", "add", f"n{i + 1}", "type", "veth", "peer", "name", "eth0", "netns", node, ns=u)
        ip("link", "set", f"n{i + 1}", "master", "br0", "up", ns=u)
        ip("addr", "add", f"{node_ip[i]}/{und.prefixlen}", "dev", "eth0", ns=node)
        ip("link", "set", "eth0", "up", ns=node)
        router = str(node_pods[i].network_address + 1)
        _pod(node, f"{PREFIX}{tag}-p{i + 1}", str(node_pods[i].network_address + 10), router,
             VXLAN_MTU if vxlan else 1500)
    for i, node in enumerate(nodes):
        peer = 1 - i
        if vxlan:
            ip("link", "add", "vx0", "type", "vxlan", "id", str(VNI), "dstport", str(VXLAN_PORT),
               "remote", node_ip[peer], "local", node_ip[i], "dev", "eth0", ns=node)
            ip("addr", "add", f"{transit[i]}/24", "dev", "vx0", ns=node)
            ip("link", "set", "vx0", "up", ns=node)
    for i, node in enumerate(nodes):
        peer = 1 - i
        if vxlan:
            ip("neigh", "replace", transit[peer], "lladdr", mac("vx0", nodes[peer]), "dev", "vx0",
               "nud", "permanent", ns=node)
            ip("route", "add", str(node_pods[peer]), "via", transit[peer], "dev", "vx0", "mtu", str(VXLAN_MTU),
               ns=node)
        else:
            ip("route", "add", str(node_pods[peer]), "via", node_ip[peer], "dev", "eth0", ns=node)
        if nat:
            add_masquerade(node, str(node_pods[i]), str(pods), node_ip)
    return Baseline(
        f"{PREFIX}{tag}-p1",
        f"{PREFIX}{tag}-p2",
        str(node_pods[0].network_address + 10),
        str(node_pods[1].network_address + 10),
        nodes,
        "vx0" if vxlan else "eth0",
    )


def add_masquerade(node: str, node_pods: str, cluster_pods: str, node_ips: list[str]) -> None:
    """The same nft table as a pilus node's (src/pilus/node: table ip pilus, postrouting)."""
    rules = (
        "table ip bxnat {\n"
        f"  set cluster_nodes {{ type ipv4_addr; elements = {{ {', '.join(node_ips)} }} }}\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {node_pods} ip daddr != {cluster_pods} ip daddr != @cluster_nodes "
        'oifname != "lxc*" oifname != "vx0" masquerade\n'
        "  }\n}\n"
    )
    r = subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], input=rules, capture_output=True, text=True)
    if r.returncode != 0:
        raise TopoError(f"{node}: nft: {r.stderr.strip()[:300]}")


def destroy_all() -> list[str]:
    """Delete every bx-* namespace (their veths and vxlan devices go with them)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.startswith(PREFIX)]
    for ns in names:
        ip("netns", "del", ns, check=False)
    return names
