"""Links: veth pairs, addresses, routes, neighbours, sysctls, bridges.

The only module of pilus that talks netlink (through pyroute2). Each call runs
on the worker thread of netns.py inside the namespace it names (``netns=None``:
the calling thread's), with a fresh IPRoute socket there; netlink errors come
back as DatapathError with a one-line message. The namespace functions
(create_netns, run_in_netns, ...) are netns.py's, importable from here too.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import DatapathError
from .netns import (
    NETNS_RUN_DIR,
    create_netns,
    delete_netns,
    list_netns,
    netns_exists,
    netns_path,
    run_in_netns,
)

__all__ = [
    "NETNS_RUN_DIR",
    "VethInfo",
    "netns_exists",
    "create_netns",
    "delete_netns",
    "list_netns",
    "netns_path",
    "create_veth",
    "delete_link",
    "link_info",
    "set_link_up",
    "set_link_down",
    "set_mtu",
    "add_address",
    "del_address",
    "addresses",
    "default_route_device",
    "add_route",
    "del_route",
    "add_neigh",
    "del_neigh",
    "add_fwmark_rule",
    "del_fwmark_rule",
    "add_local_default_route",
    "set_sysctl",
    "get_sysctl",
    "create_bridge",
    "set_master",
    "run_in_netns",
]


@dataclass(frozen=True)
class VethInfo:
    host_ifindex: int
    host_mac: str
    peer_ifindex: int
    peer_mac: str


def _nl_msg(e: NetlinkError) -> str:
    code = e.code if hasattr(e, "code") else 0
    try:
        return os.strerror(code) if code else str(e)
    except ValueError:
        return str(e)


def _nl(netns: str | None, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(ipr, *args) in netns with a fresh IPRoute; NetlinkError -> DatapathError."""

    def body() -> Any:
        with IPRoute() as ipr:
            return fn(ipr, *args)

    try:
        return run_in_netns(netns, body)
    except NetlinkError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise DatapathError(f"{what}{where}: {_nl_msg(e)}") from None
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise DatapathError(f"{what}{where}: {e.strerror or e}") from None


def _idx(ipr: IPRoute, ifname: str) -> int | None:
    r = ipr.link_lookup(ifname=ifname)
    return r[0] if r else None


def _need_idx(ipr: IPRoute, ifname: str) -> int:
    i = _idx(ipr, ifname)
    if i is None:
        raise DatapathError(f"no such device {ifname!r}")
    return i


def _link_dict(ipr: IPRoute, index: int) -> dict[str, Any]:
    msg = ipr.link("get", index=index)[0]
    return {
        "ifindex": msg["index"],
        "ifname": msg.get_attr("IFLA_IFNAME"),
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "mtu": msg.get_attr("IFLA_MTU"),
        "up": bool(msg["flags"] & 1),
        "master": msg.get_attr("IFLA_MASTER"),
    }


# -------------------------------------------------------------------- links API


def create_veth(
    host_ifname: str,
    peer_ifname: str,
    *,
    peer_netns: str | None,
    mtu: int = 1500,
    host_netns: str | None = None,
) -> VethInfo:
    """Create a veth pair. The host end stays in ``host_netns`` (None: the calling
    thread's namespace); the peer end is created directly inside ``peer_netns``
    under ``peer_ifname`` (so "eth0" is fine even if the host namespace has one).
    Both ends are set up, and lo in peer_netns."""
    for n in (host_ifname, peer_ifname):
        if not n or len(n) > 15:
            raise DatapathError(f"invalid interface name {n!r} (1-15 characters)")
    peer_fd = None
    if peer_netns is not None:
        if not netns_exists(peer_netns):
            raise DatapathError(f"network namespace {peer_netns!r} does not exist")
        peer_fd = os.open(netns_path(peer_netns), os.O_RDONLY | os.O_CLOEXEC)

    def make(ipr: IPRoute) -> dict[str, Any]:
        if _idx(ipr, host_ifname) is not None:
            raise DatapathError(f"device {host_ifname!r} already exists")
        peer: dict[str, Any] = {"ifname": peer_ifname, "mtu": mtu}
        if peer_fd is not None:
            peer["net_ns_fd"] = peer_fd
        ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer)
        idx = _need_idx(ipr, host_ifname)
        ipr.link("set", index=idx, state="up")
        return _link_dict(ipr, idx)

    try:
        host = _nl(host_netns, f"create veth {host_ifname}/{peer_ifname}", make)
    finally:
        if peer_fd is not None:
            os.close(peer_fd)

    def peer_up(ipr: IPRoute) -> dict[str, Any]:
        idx = _need_idx(ipr, peer_ifname)
        ipr.link("set", index=idx, state="up")
        lo = _idx(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        return _link_dict(ipr, idx)

    try:
        peer = _nl(
            peer_netns if peer_netns is not None else host_netns, "set veth peer up", peer_up
        )
    except DatapathError:
        delete_link(host_ifname, host_netns)
        raise
    return VethInfo(host["ifindex"], host["mac"], peer["ifindex"], peer["mac"])


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete a link; absent link (or absent namespace) is fine."""

    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, ifname)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    if netns is not None and not netns_exists(netns):
        return
    _nl(netns, f"delete link {ifname}", rm)


def link_info(ifname: str, netns: str | None = None) -> dict | None:
    """{'ifindex', 'ifname', 'mac', 'mtu', 'up', 'master'} or None if absent."""

    def get(ipr: IPRoute) -> dict | None:
        idx = _idx(ipr, ifname)
        return None if idx is None else _link_dict(ipr, idx)

    if netns is not None and not netns_exists(netns):
        return None
    return _nl(netns, f"get link {ifname}", get)


def set_link_up(ifname: str, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} up",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), state="up"),
    )


def set_link_down(ifname: str, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} down",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), state="down"),
    )


def set_mtu(ifname: str, mtu: int, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} mtu",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), mtu=mtu),
    )


def add_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    """Add an IPv4/IPv6 address ("10.0.0.1/24"); already present is fine."""
    iface = ipaddress.ip_interface(cidr)

    def add(ipr: IPRoute) -> None:
        idx = _need_idx(ipr, ifname)
        try:
            ipr.addr(
                "add",
                index=idx,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    _nl(netns, f"add address {cidr} to {ifname}", add)


def addresses(ifname: str, netns: str | None = None, family: int = 4) -> list[str]:
    """Addresses of a device as CIDRs ("172.30.0.11/24"), in kernel order; [] if absent."""
    fam = 2 if family == 4 else 10

    def get(ipr: IPRoute) -> list[str]:
        idx = _idx(ipr, ifname)
        if idx is None:
            return []
        return [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.addr("dump", index=idx, family=fam)
            if a["index"] == idx
        ]

    if netns is not None and not netns_exists(netns):
        return []
    return _nl(netns, f"list addresses of {ifname}", get)


def default_route_device(netns: str | None = None) -> str | None:
    """Name of the device of the IPv4 default route (main table), or None."""

    def get(ipr: IPRoute) -> str | None:
        for r in ipr.route("dump", family=2, table=254):
            if r["dst_len"] != 0:
                continue
            oif = r.get_attr("RTA_OIF")
            if oif is None:
                mp = r.get_attr("RTA_MULTIPATH")
                oif = mp[0]["oif"] if mp else None
            if oif:
                return ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")
        return None

    return _nl(netns, "find the default route", get)


def del_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    iface = ipaddress.ip_interface(cidr)

    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, ifname)
        if idx is None:
            return
        try:
            ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise

    _nl(netns, f"delete address {cidr} from {ifname}", rm)


_SCOPES = {"universe": 0, "global": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}


def _route_dst(dst: str) -> dict[str, Any]:
    if dst == "default":
        return {"dst": "0.0.0.0/0"}
    net = ipaddress.ip_network(dst, strict=False)
    return {"dst": str(net)}


def add_route(
    dst: str,
    *,
    gateway: str | None = None,
    dev: str | None = None,
    netns: str | None = None,
    scope: str | None = None,
    src: str | None = None,
    mtu: int | None = None,
    proto: int | None = None,
    onlink: bool = False,
) -> None:
    """Add or replace a route in the main table. dst is a CIDR, an address, or "default";
    ``proto`` marks the routes an owner lists again (``list_routes``)."""
    if gateway is None and dev is None:
        raise DatapathError(f"route {dst}: needs a gateway or a device")

    def add(ipr: IPRoute) -> None:
        spec: dict[str, Any] = _route_dst(dst)
        if dev is not None:
            spec["oif"] = _need_idx(ipr, dev)
        if gateway is not None:
            spec["gateway"] = gateway
        if scope is not None:
            spec["scope"] = _SCOPES[scope] if isinstance(scope, str) else int(scope)
        elif gateway is None:
            spec["scope"] = _SCOPES["link"]
        if src is not None:
            spec["prefsrc"] = src
        if mtu is not None:
            spec["metrics"] = {"mtu": mtu}
        if proto is not None:
            spec["proto"] = proto
        if onlink:
            spec["flags"] = 4  # RTNH_F_ONLINK
        ipr.route("replace", **spec)

    _nl(netns, f"add route {dst}", add)


def list_routes(proto: int, netns: str | None = None) -> dict[str, str | None]:
    """The main table's IPv4 routes marked with ``proto``: destination CIDR -> gateway
    (None for a device route)."""

    def get(ipr: IPRoute) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            if r["proto"] == proto:
                out[f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}"] = r.get_attr("RTA_GATEWAY")
        return out

    return _nl(netns, "list routes", get)


def create_vxlan(ifname: str, port: int, mtu: int, netns: str | None = None) -> int:
    """A VXLAN device in collect-metadata ("external") mode on UDP ``port``, no
    learning, no ARP (BPF sets each packet's tunnel key); kept if it exists with
    that port. Returns its ifindex."""

    def make(ipr: IPRoute) -> int:
        idx = _idx(ipr, ifname)
        if idx is not None:
            info = _link_info_data(ipr, idx)
            if info.get("IFLA_VXLAN_PORT") == port and info.get("IFLA_VXLAN_COLLECT_METADATA"):
                ipr.link("set", index=idx, state="up", mtu=mtu)
                return idx
            ipr.link("del", index=idx)
        ipr.link("add", ifname=ifname, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=port,
                 vxlan_learning=0, mtu=mtu)
        idx = _need_idx(ipr, ifname)
        ipr.link("set", index=idx, flags=0x80, change=0x80)  # IFF_NOARP
        ipr.link("set", index=idx, state="up")
        return idx

    return _nl(netns, f"create vxlan device {ifname}", make)


def _link_info_data(ipr: IPRoute, index: int) -> dict[str, Any]:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return dict(data["attrs"]) if data is not None else {}


def del_route(dst: str, netns: str | None = None) -> None:
    """Delete the route to dst from the main table; absent is fine."""

    def rm(ipr: IPRoute) -> None:
        try:
            ipr.route("del", **_route_dst(dst))
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    if netns is not None and not netns_exists(netns):
        return
    _nl(netns, f"delete route {dst}", rm)


def add_neigh(ip: str, mac: str, dev: str, netns: str | None = None) -> None:
    """Permanent neighbour entry (replace)."""

    def add(ipr: IPRoute) -> None:
        ipr.neigh(
            "replace",
            dst=ip,
            lladdr=mac,
            ifindex=_need_idx(ipr, dev),
            state="permanent",
        )

    _nl(netns, f"add neighbour {ip} on {dev}", add)


def del_neigh(ip: str, dev: str, netns: str | None = None) -> None:
    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, dev)
        if idx is None:
            return
        try:
            ipr.neigh("del", dst=ip, ifindex=idx)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    _nl(netns, f"delete neighbour {ip} on {dev}", rm)


def _fwmark_rule(fwmark: int, mask: int, table: int, priority: int) -> dict[str, Any]:
    return {"family": socket.AF_INET, "fwmark": fwmark, "fwmask": mask, "table": table,
            "priority": priority, "action": "FR_ACT_TO_TBL"}


def add_fwmark_rule(fwmark: int, mask: int, table: int, priority: int,
                    netns: str | None = None) -> None:
    """``ip rule add fwmark FWMARK/MASK lookup TABLE pref PRIORITY`` (kept if present)."""

    def add(ipr: IPRoute) -> None:
        for r in ipr.get_rules(family=socket.AF_INET):
            if (r.get_attr("FRA_PRIORITY") == priority and r.get_attr("FRA_FWMARK") == fwmark
                    and r.get_attr("FRA_FWMASK") == mask
                    and (r.get_attr("FRA_TABLE") or r["table"]) == table):
                return
        try:
            ipr.rule("add", **_fwmark_rule(fwmark, mask, table, priority))
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    _nl(netns, f"add rule fwmark {fwmark:#x}/{mask:#x} lookup {table}", add)


def del_fwmark_rule(fwmark: int, mask: int, table: int, priority: int,
                    netns: str | None = None) -> None:
    """Remove that rule; absent is fine."""

    def rm(ipr: IPRoute) -> None:
        try:
            ipr.rule("del", **_fwmark_rule(fwmark, mask, table, priority))
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    _nl(netns, f"delete rule fwmark {fwmark:#x}/{mask:#x} lookup {table}", rm)


def add_local_default_route(table: int, dev: str = "lo", netns: str | None = None) -> None:
    """``ip route replace local 0.0.0.0/0 dev DEV table TABLE``: everything that looks
    up ``table`` is delivered to this host (sockets assigned by BPF, TPROXY)."""

    def add(ipr: IPRoute) -> None:
        ipr.route("replace", dst="0.0.0.0/0", table=table, type=2,  # RTN_LOCAL
                  scope=_SCOPES["host"], oif=_need_idx(ipr, dev))

    _nl(netns, f"add local route table {table}", add)


def _sysctl_path(key: str) -> str:
    if not key or ".." in key or key.startswith((".", "/")):
        raise DatapathError(f"invalid sysctl key {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def set_sysctl(key: str, value: str | int, netns: str | None = None) -> None:
    """Write a sysctl ("net.ipv4.ip_forward", "net.ipv4.conf.eth0.rp_filter") in netns."""
    path = _sysctl_path(key)

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    try:
        run_in_netns(netns, write)
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise DatapathError(f"set sysctl {key}={value}{where}: {e.strerror or e}") from None


def get_sysctl(key: str, netns: str | None = None) -> str:
    path = _sysctl_path(key)

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    try:
        return run_in_netns(netns, read)
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise DatapathError(f"read sysctl {key}{where}: {e.strerror or e}") from None


def create_bridge(name: str, cidr: str | None = None, netns: str | None = None) -> None:
    """Create a Linux bridge (up, optional address) in the caller's namespace."""

    def make(ipr: IPRoute) -> None:
        if _idx(ipr, name) is None:
            ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=_need_idx(ipr, name), state="up")

    _nl(netns, f"create bridge {name}", make)
    if cidr is not None:
        add_address(name, cidr, netns)


def set_master(ifname: str, bridge: str, netns: str | None = None) -> None:
    def setm(ipr: IPRoute) -> None:
        ipr.link("set", index=_need_idx(ipr, ifname), master=_need_idx(ipr, bridge))

    _nl(netns, f"attach {ifname} to {bridge}", setm)
