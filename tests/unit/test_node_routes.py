"""NodeRoutes: the node registry's table -> the tunnel map, kernel routes and the
masquerade's node set, per routing mode; overlapping pod CIDRs are left out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from aio_helpers import run

from pilus.node.registry import NodeEntry
from pilus.node.routes import TUNNEL_DEV, NodeRoutes, RouteSpec
from pilus.testing.fake_datapath import FakeTunnelMap


class DictTarget:
    def __init__(self) -> None:
        self.rows: dict = {}

    def dump(self):
        return list(self.rows.items())

    def update(self, key, value) -> None:
        self.rows[key] = value

    def delete(self, key) -> None:
        self.rows.pop(key, None)


class Registry:
    def __init__(self, nodes: dict[str, NodeEntry]) -> None:
        self.nodes = nodes
        self.callbacks = []

    def on_change(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, nodes: dict[str, NodeEntry]) -> None:
        self.nodes = nodes
        for cb in list(self.callbacks):
            cb(nodes)


def node(i: int, cidr: str | None = None, started: float = 0.0) -> NodeEntry:
    pod = IPv4Network(cidr or f"10.1.{i}.0/24")
    return NodeEntry(f"n{i}", "c", IPv4Address(f"192.0.2.{10 + i}"), pod, pod.network_address + 1,
                     started=started)


def make(mode: str, nodes: dict[str, NodeEntry]):
    registry, routes, tunnel, ips = Registry(nodes), DictTarget(), FakeTunnelMap(), []
    nr = NodeRoutes(registry, mode, nodes["n1"], tunnel_map=tunnel if mode == "tunnel" else None,
                    native_device="eth0", routes=routes, node_ips=ips.append)
    run(nr.start())
    return nr, registry, routes, tunnel, ips


def test_tunnel_mode_maps_other_pod_cidrs_to_node_ips_and_routes_them_into_the_vxlan_device():
    nodes = {f"n{i}": node(i) for i in (1, 2, 3)}
    nr, registry, routes, tunnel, ips = make("tunnel", nodes)
    assert tunnel.rows == {IPv4Network("10.1.2.0/24"): IPv4Address("192.0.2.12"),
                           IPv4Network("10.1.3.0/24"): IPv4Address("192.0.2.13")}
    assert routes.rows[IPv4Network("10.1.2.0/24")] == RouteSpec(TUNNEL_DEV, None, IPv4Address("10.1.1.1"), 1450)
    assert IPv4Network("10.1.1.0/24") not in routes.rows  # never the own CIDR
    assert ips[-1] == [IPv4Address(f"192.0.2.{10 + i}") for i in (1, 2, 3)]
    registry.set({k: v for k, v in nodes.items() if k != "n3"})  # n3's lease expired
    assert IPv4Network("10.1.3.0/24") not in tunnel.rows and IPv4Network("10.1.3.0/24") not in routes.rows
    assert IPv4Address("192.0.2.13") not in ips[-1]
    run(nr.stop())


def test_native_mode_routes_via_the_node_ips_without_a_tunnel_map():
    nodes = {f"n{i}": node(i) for i in (1, 2)}
    nr, registry, routes, tunnel, ips = make("native", nodes)
    assert routes.rows == {IPv4Network("10.1.2.0/24"): RouteSpec("eth0", IPv4Address("192.0.2.12"))}
    assert nr.tunnels is None and tunnel.rows == {}
    assert nr.status() == {"mode": "native", "routes": 1, "conflicts": {}}


def test_an_overlapping_pod_cidr_is_left_out_and_reported():
    nodes = {"n1": node(1), "n2": node(2, started=1.0), "n3": node(3, "10.1.2.128/25", started=2.0),
             "n4": node(4, "10.1.0.0/16", started=3.0)}
    nr, registry, routes, tunnel, ips = make("tunnel", nodes)
    assert set(tunnel.rows) == {IPv4Network("10.1.2.0/24")}  # the first to register keeps its CIDR
    assert set(nr.status()["conflicts"]) == {"n3", "n4"}
    assert "overlaps node n2" in nr.status()["conflicts"]["n3"]


def test_an_unknown_mode_or_native_without_a_device_is_refused():
    nodes = {"n1": node(1)}
    with pytest.raises(ValueError, match="unknown routing mode 'vxlan'"):
        NodeRoutes(Registry(nodes), "vxlan", nodes["n1"], routes=DictTarget())
    with pytest.raises(ValueError, match="native device"):
        NodeRoutes(Registry(nodes), "native", nodes["n1"], routes=DictTarget())
