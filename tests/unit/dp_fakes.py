"""FakePlumbing stands in for the netlink work of the endpoint room (endpoint/plumbing.py);
the datapath's maps are pilus.testing.fake_datapath (conformance-checked)."""

from __future__ import annotations

import itertools


class FakePlumbing:
    """Netns and veth pairs as sets (endpoint/plumbing.VethPlumbing without netlink)."""

    def __init__(self) -> None:
        self.netns: set[str] = set()
        self.veths: dict[str, int] = {}  # host-side name -> ifindex
        self._ifindex = itertools.count(100)

    def plumb(self, ep, router_ip, mtu, route_mtu=None) -> None:
        if ep.netns in self.netns or ep.interface_name in self.veths:
            raise OSError(17, f"{ep.netns} or {ep.interface_name}: file exists")
        self.netns.add(ep.netns)
        ep.interface_index = self.veths[ep.interface_name] = next(self._ifindex)
        ep.host_mac, ep.mac = "02:00:00:00:00:01", f"02:00:00:00:01:{ep.id:02x}"

    def remove_netns(self, ep) -> None:
        self.netns.discard(ep.netns)

    def remove_veth(self, ep) -> None:
        self.veths.pop(ep.interface_name, None)

    def teardown(self, ep) -> None:
        self.remove_veth(ep)
        self.remove_netns(ep)

    def find(self, ep) -> int | None:
        if ep.netns not in self.netns:
            return None
        return self.veths.get(ep.interface_name)
