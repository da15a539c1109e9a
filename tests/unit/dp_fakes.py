"""In-memory stand-ins for the datapath parts the endpoint room writes (no root).

Each behaves like the real wrapper in datapath/maps.py and datapath/policy.py on the
properties the tests use: the same methods and return shapes, an LPM map keyed by
normalised prefixes, a delete of a missing key that reports False, and ``fail`` to
make writes of chosen keys raise as a full or refused BPF map does. A FakeDatapath's
parts append their writes to one ``journal``, so tests can check the order of writes
across maps. FakePlumbing stands in for the netlink work (endpoint/plumbing.py).
"""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv4Network


class FakeIpcacheMap:
    """pilus_ipcache: prefix -> identity (+ tunnel endpoint), as IpcacheMap."""

    def __init__(self, journal: list | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.rows: dict[IPv4Network, int] = {}
        self.tunnels: dict[IPv4Network, IPv4Address] = {}
        self.fail: set[IPv4Network] = set()
        self.writes = 0

    def upsert(self, prefix, identity: int, tunnel_endpoint: IPv4Address | None = None) -> None:
        prefix = IPv4Network(prefix, strict=False)
        if prefix in self.fail:
            raise OSError(28, f"pilus_ipcache update {prefix}: no space left on device")
        self.writes += 1
        self.journal.append(("ipcache", "upsert", prefix))
        self.rows[prefix] = identity
        if tunnel_endpoint is None:
            self.tunnels.pop(prefix, None)
        else:
            self.tunnels[prefix] = tunnel_endpoint

    def delete(self, prefix) -> bool:
        prefix = IPv4Network(prefix, strict=False)
        if prefix in self.fail:
            raise OSError(1, f"pilus_ipcache delete {prefix}: operation not permitted")
        self.writes += 1
        self.journal.append(("ipcache", "delete", prefix))
        self.tunnels.pop(prefix, None)
        return self.rows.pop(prefix, None) is not None

    def items(self) -> list[tuple[IPv4Network, int, IPv4Address | None]]:
        out = [(p, i, self.tunnels.get(p)) for p, i in self.rows.items()]
        return sorted(out, key=lambda t: (t[0].network_address, t[0].prefixlen))

    # Reconciler target, as IpcacheMap: prefix -> (identity, tunnel endpoint or None)
    def dump(self) -> list[tuple[IPv4Network, tuple[int, IPv4Address | None]]]:
        return [(p, (i, tunnel)) for p, i, tunnel in self.items()]

    def update(self, prefix, value) -> None:
        self.upsert(prefix, *value)


class FakeEndpointMap:
    """pilus_lxc (+ pilus_lxc_if): EndpointInfo rows keyed by IP, as EndpointMap."""

    def __init__(self, journal: list | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.rows: dict = {}
        self.writes = 0

    def upsert(self, ep) -> None:
        self.writes += 1
        self.journal.append(("endpoints", "upsert", IPv4Address(ep.ipv4)))
        self.rows[IPv4Address(ep.ipv4)] = ep

    def get(self, ipv4):
        return self.rows.get(IPv4Address(ipv4))

    def delete(self, ipv4) -> bool:
        self.writes += 1
        self.journal.append(("endpoints", "delete", IPv4Address(ipv4)))
        return self.rows.pop(IPv4Address(ipv4), None) is not None

    def items(self) -> list:
        return sorted(self.rows.values(), key=lambda e: e.ipv4)

    # Reconciler target, as EndpointMap: IP -> EndpointInfo
    def dump(self) -> list:
        return [(IPv4Address(ep.ipv4), ep) for ep in self.items()]

    def update(self, ipv4, ep) -> None:
        if IPv4Address(ipv4) != IPv4Address(ep.ipv4):
            raise ValueError(f"endpoint {ep.ep_id}: key {ipv4} is not its address {ep.ipv4}")
        self.upsert(ep)


class FakePolicyMaps:
    """Per-endpoint policy maps, as PolicyMaps: sync writes the whole set of keys."""

    def __init__(self, journal: list | None = None) -> None:
        self.journal = journal if journal is not None else []
        self.maps: dict[int, dict] = {}

    def sync(self, ep_id: int, entries) -> dict:
        self.journal.append(("policy", "sync", ep_id))
        self.maps[ep_id] = dict(entries)
        return {"entries": len(entries)}

    def delete(self, ep_id: int) -> None:
        self.journal.append(("policy", "delete", ep_id))
        self.maps.pop(ep_id, None)


class FakePrefixMap:
    """pilus_ipblock: prefix -> identity, as IpblockMap."""

    def __init__(self) -> None:
        self.entries: dict[IPv4Network, int] = {}

    def upsert(self, prefix, identity: int) -> None:
        self.entries[IPv4Network(prefix, strict=False)] = identity

    def delete(self, prefix) -> bool:
        return self.entries.pop(IPv4Network(prefix, strict=False), None) is not None

    def items(self) -> list[tuple[IPv4Network, int]]:
        return sorted(self.entries.items())


class FakeCt:
    def gc(self) -> int:
        return 0


class FakeDatapath:
    """The datapath attributes the endpoint manager and the policy sync use."""

    def __init__(self) -> None:
        self.journal: list[tuple[str, str, object]] = []
        self.endpoints = FakeEndpointMap(self.journal)
        self.ipcache = FakeIpcacheMap(self.journal)
        self.policy = FakePolicyMaps(self.journal)
        self.ipblock = FakePrefixMap()
        self.ct = FakeCt()
        self.attached: list[int] = []

        self.fail_attach = False

    def attach_endpoint(self, ifindex: int) -> None:
        if self.fail_attach:
            raise OSError(19, f"attaching to ifindex {ifindex}: no such device")
        self.journal.append(("programs", "attach", ifindex))
        self.attached.append(ifindex)

    def detach_endpoint(self, ifindex: int) -> None:
        self.journal.append(("programs", "detach", ifindex))
        if ifindex in self.attached:
            self.attached.remove(ifindex)


class FakePlumbing:
    """Netns and veth pairs as sets (endpoint/plumbing.VethPlumbing without netlink)."""

    def __init__(self) -> None:
        self.netns: set[str] = set()
        self.veths: dict[str, int] = {}  # host-side name -> ifindex
        self._ifindex = itertools.count(100)

    def plumb(self, ep, router_ip, mtu) -> None:
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
