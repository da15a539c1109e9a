"""pilus.datapath.links against real namespaces (root)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from pilus.datapath import links as L
from pilus.datapath.errors import DatapathError

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=check)


@pytest.fixture
def names():
    """Unique name prefix; removes every netns and host link starting with it."""
    tag = "plt" + uuid.uuid4().hex[:6]
    yield tag
    for ns in L.list_netns(tag):
        L.delete_netns(ns)
    for line in _sh("ip -o link show", check=False).stdout.splitlines():
        ifname = line.split(":")[1].strip().split("@")[0]
        if ifname.startswith(tag):
            _sh(f"ip link del {ifname}", check=False)
    # stale files too
    for f in Path(L.NETNS_RUN_DIR).glob(f"{tag}*"):
        subprocess.run(["umount", "-l", str(f)], capture_output=True)
        f.unlink(missing_ok=True)


def test_netns_lifecycle(names):
    ns = f"{names}-a"
    assert not L.netns_exists(ns)
    L.create_netns(ns)
    assert L.netns_exists(ns)
    assert ns in L.list_netns(names)
    assert ns in _sh("ip netns list").stdout
    with pytest.raises(DatapathError, match="already exists"):
        L.create_netns(ns)
    L.delete_netns(ns)
    assert not L.netns_exists(ns)
    assert not os.path.exists(L.netns_path(ns))
    L.delete_netns(ns)  # tolerant


def test_veth_addresses_routes_ping(names):
    ns = f"{names}-p"
    host = f"{names}h"
    L.create_netns(ns)
    info = L.create_veth(host, "eth0", peer_netns=ns, mtu=1400)
    h = L.link_info(host)
    p = L.link_info("eth0", ns)
    assert h and p
    assert (h["ifindex"], h["mac"], h["mtu"], h["up"]) == (
        info.host_ifindex,
        info.host_mac,
        1400,
        True,
    )
    assert (p["ifindex"], p["mac"], p["up"]) == (info.peer_ifindex, info.peer_mac, True)
    assert L.link_info("lo", ns)["up"]
    assert L.link_info("nope0") is None

    L.add_address(host, "10.251.0.1/32")
    L.add_address(host, "10.251.0.1/32")  # idempotent
    L.add_address("eth0", "10.251.1.5/32", ns)
    # host: /32 route to the pod via the veth; pod: link route to the router, default via it
    L.add_route("10.251.1.5/32", dev=host)
    L.add_route("10.251.0.1/32", dev="eth0", netns=ns, scope="link")
    L.add_route("default", gateway="10.251.0.1", dev="eth0", netns=ns)
    L.add_route("default", gateway="10.251.0.1", dev="eth0", netns=ns)  # replace
    L.add_neigh("10.251.0.1", info.host_mac, "eth0", ns)
    routes = _sh(f"ip netns exec {ns} ip route").stdout
    assert "default via 10.251.0.1 dev eth0" in routes
    assert "PERMANENT" in _sh(f"ip netns exec {ns} ip neigh show 10.251.0.1").stdout
    r = _sh(f"ip netns exec {ns} ping -c1 -W2 10.251.0.1", check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    assert L.addresses("eth0", ns) == ["10.251.1.5/32"]
    assert L.default_route_device(ns) == "eth0"
    L.del_route("default", ns)
    L.del_route("default", ns)  # tolerant
    assert L.default_route_device(ns) is None
    assert "default" not in _sh(f"ip netns exec {ns} ip route").stdout

    L.set_sysctl("net.ipv4.conf.eth0.rp_filter", 2, ns)
    assert L.get_sysctl("net.ipv4.conf.eth0.rp_filter", ns) == "2"
    L.set_sysctl("net.ipv4.ip_forward", 1, ns)
    assert _sh(f"ip netns exec {ns} sysctl -n net.ipv4.ip_forward").stdout.strip() == "1"

    L.delete_link(host)
    L.delete_link(host)  # tolerant
    assert L.link_info(host) is None
    assert L.link_info("eth0", ns) is None  # peer went with it


def test_bridge_and_master(names):
    ns = f"{names}-b"
    br = f"{names}br"
    host = f"{names}v"
    L.create_netns(ns)
    try:
        L.create_bridge(br, "10.252.0.1/24")
        L.create_veth(host, "eth0", peer_netns=ns)
        L.set_master(host, br)
        assert L.link_info(host)["master"] == L.link_info(br)["ifindex"]
        L.add_address("eth0", "10.252.0.11/24", ns)
        L.add_route("default", gateway="10.252.0.1", netns=ns)
        r = _sh(f"ip netns exec {ns} ping -c1 -W2 10.252.0.1", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        L.delete_link(br)


def test_works_from_an_event_loop(names):
    ns = f"{names}-e"

    async def main():
        L.create_netns(ns)  # directly in a coroutine: links must not touch the loop
        L.create_veth(f"{names}e", "eth0", peer_netns=ns)
        return await asyncio.to_thread(L.link_info, "eth0", ns)

    assert asyncio.run(main())["up"]


def test_errors_are_linkerrors(names):
    with pytest.raises(DatapathError, match="does not exist"):
        L.set_link_up("eth0", f"{names}-missing")
    assert L.link_info("eth0", f"{names}-missing") is None  # lookups are tolerant
    with pytest.raises(DatapathError, match="no such device"):
        L.set_link_up(f"{names}zz")
    with pytest.raises(DatapathError):
        L.add_route("10.9.9.0/24", gateway="10.250.250.1")  # unreachable gateway


def test_from_inside_another_netns(names):
    """The agent's case: a process started by `ip netns exec <node>` creates endpoint
    namespaces and veths; they must be visible machine-wide."""
    node, ep = f"{names}-node", f"{names}-ep1"
    L.create_netns(node)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from pilus.datapath import links as L
        L.create_netns({ep!r})
        v = L.create_veth({names + "l"!r}, "eth0", peer_netns={ep!r})
        L.add_address("eth0", "10.253.0.2/32", {ep!r})
        L.add_address({names + "l"!r}, "10.253.0.1/32")
        L.add_route("10.253.0.2/32", dev={names + "l"!r})
        L.add_route("10.253.0.1/32", dev="eth0", netns={ep!r})
        L.set_sysctl("net.ipv4.ip_forward", 1)
        print(v.host_ifindex)
        """
    )
    r = subprocess.run(
        ["ip", "netns", "exec", node, sys.executable, "-c", code], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    # visible from here (the machine's mount namespace) and usable by `ip netns exec`
    assert L.netns_exists(ep)
    assert L.link_info("eth0", ep)["up"]
    assert L.link_info(names + "l", node)["ifindex"] == int(r.stdout.strip())
    assert L.link_info(names + "l") is None  # not in the machine namespace
    assert _sh(f"ip netns exec {node} sysctl -n net.ipv4.ip_forward").stdout.strip() == "1"
    p = _sh(f"ip netns exec {ep} ping -c1 -W2 10.253.0.1", check=False)
    assert p.returncode == 0, p.stdout + p.stderr

    # and deletion from inside works machine-wide too
    code = (
        f"import sys; sys.path.insert(0, {SRC!r}); "
        f"from pilus.datapath import links as L; L.delete_netns({ep!r})"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", node, sys.executable, "-c", code], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert not L.netns_exists(ep)
    assert not os.path.exists(L.netns_path(ep))
    assert ep not in _sh("ip netns list").stdout
