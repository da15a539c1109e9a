"""The map wrappers as Reconciler targets (dump / update / delete): what a
reconciler writes is what the datapath then holds, and a resync of a map in
sync writes nothing."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from lxc_env import EP_A, EP_B, NODE_IP, ROUTER_IP
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath.lb import BackendEntry, Frontend, ServiceValue
from pilus.datapath.loader import map_info
from pilus.datapath.objects import HOST, LXC, OBJECTS, OVERLAY, SOCK
from pilus.datapath.testrun import run_skb
from pilus.loadbalancer.maglev import build_table
from pilus.reconcile import Reconciler

VIP = "10.96.0.30"


def in_sync(rec: Reconciler) -> bool:
    r = rec.resync()
    return (r.upserted, r.deleted, r.failed) == (0, 0, 0)


def test_ipcache_target(dp):
    rec = Reconciler("ipcache", dp.ipcache)
    want = {
        IPv4Network(f"{EP_A.ipv4}/32"): (EP_A.identity, None),
        IPv4Network(f"{ROUTER_IP}/32"): (1, None),
        IPv4Network(f"{NODE_IP}/32"): (1, None),
        IPv4Network("10.200.0.0/16"): (77, IPv4Address("172.30.0.12")),
    }
    rec.set(want).raise_for_errors("ipcache")
    assert dict(dp.ipcache.dump()) == want  # EP_B's entry pruned
    assert in_sync(rec)


def test_endpoint_target(dp):
    rec = Reconciler("lxc", dp.endpoints)
    rec.set({EP_A.ipv4: EP_A}).raise_for_errors("lxc")
    assert dp.endpoints.items() == [EP_A]
    assert in_sync(rec)


def test_lb_targets_write_what_the_datapath_translates(dp):
    backends = Reconciler("lb4_be", dp.lb.backend_table)
    services = Reconciler("lb4_svc", dp.lb.service_table)
    be = BackendEntry(21, EP_B.ipv4, 8080)
    backends.set({21: be, 22: BackendEntry(22, EP_B.ipv4, 8081, state="terminating")})
    fe = Frontend(IPv4Address(VIP), 80)
    fe_m = Frontend(IPv4Address(VIP), 81)
    table = tuple(build_table([(21, str(be))], dp.lb.maglev_table_size))
    want = {
        fe: ServiceValue(5, (21,), affinity_timeout=30),
        fe_m: ServiceValue(6, (21,), algorithm="maglev", maglev_table=table),
    }
    services.set(want).raise_for_errors("lb4_svc")
    assert dict(dp.lb.service_table.dump()) == want
    assert in_sync(backends) and in_sync(services)

    syn = (Ether(src=EP_A.mac, dst=EP_A.host_mac) / IP(src=str(EP_A.ipv4), dst=VIP)
           / TCP(sport=40100, dport=81, flags="S"))
    r = run_skb(dp.prog_fd("cil_from_container"), raw(syn), ingress_ifindex=EP_A.ifindex)
    assert Ether(r.data)[IP].dst == str(EP_B.ipv4) and Ether(r.data)[TCP].dport == 8080

    services.set({fe: want[fe]})
    backends.set({21: be})
    assert [e.frontend for e in dp.lb.items()] == [fe]
    assert dp.lb.maglev_get(6) is None
    assert list(dp.lb.backends()) == [21]


def test_the_object_table(dp):
    assert [spec.name for spec in OBJECTS] == ["lxc", "host", "overlay", "sock"]
    assert SOCK.enabled(dp.cfg) is None  # not managed by load() unless configured
    assert OVERLAY.enabled(dp.cfg) is None  # native routing: no tunnel device
    for spec in (LXC, HOST):
        for prog in spec.programs:
            assert dp.prog_fd(prog) > 0
    # without pins the host object reuses the lxc object's maps, and always its
    # monitor mask (an internal map); its .rodata sections are its own
    lxc, host = dp._objects[LXC.name], dp._objects[HOST.name]
    for name in (".data.monitor", "pilus_events", "pilus_lb4_svc", "pilus_lxc"):
        assert map_info(lxc.map_fd(name)).id == map_info(host.map_fd(name)).id, name
    assert map_info(lxc.map_fd(".rodata.lb")).id != map_info(host.map_fd(".rodata.lb")).id
