"""NodePort DSR (--bpf-lb-mode dsr, the IPv4 option dispatch) in cil_from_netdev and
cil_from_container (BPF_PROG_TEST_RUN).

Entry node: a connection to a remote backend keeps the client's address and port, every
packet gets the 8-byte option (type 0x9a, length 8, port, address in Cilium's byte order)
with ihl, tot_len and both checksums right, and is routed by the FIB lookup (run inside
a namespace whose device has a route and a neighbour for the backend's node); a packet
too big with the option gets ICMP fragmentation needed. Backend node: the option makes
a reverse entry (backend -> client, the frontend as nat address), so the pod's reply
leaves with the frontend as its source; a packet without the option changes nothing."""

from __future__ import annotations

import os
import struct
from contextlib import contextmanager, suppress
from ipaddress import IPv4Address, IPv4Network

import pyroute2
import pytest
from lxc_env import EP_A, make_datapath, seed
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath import lb as lbm
from pilus.datapath import links
from pilus.datapath.lb import BackendEntry, Frontend
from pilus.datapath.testrun import run_skb

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
NODE = "172.30.0.11"  # lxc_env.NODE_IP: this node (the entry node in the first tests)
PEER = "172.30.0.12"  # the backend's node
PEER_MAC = "02:cc:00:00:00:12"
DEV_MAC = "02:dd:00:00:00:11"
CLIENT = "172.30.0.200"  # outside the cluster
REMOTE_BE = "10.200.2.9"  # a pod of PEER's pod CIDR
NODE_PORT = 30080
DROP_FRAG_NEEDED, DROP_NO_FIB = 136, 169


def _opt(vip: str, port: int) -> bytes:
    """The option as Cilium writes it: htons/htonl of the network-order values, i.e.
    both fields byte-reversed on this little-endian machine."""
    be_port = struct.unpack("=H", struct.pack("!H", port))[0]
    be_addr = struct.unpack("=I", IPv4Address(vip).packed)[0]
    return bytes([0x9A, 8]) + struct.pack("!H", be_port) + struct.pack("!I", be_addr)


def test_option_bytes_are_ciliums():
    # the reference values of the header comment in lib/nodeport.h
    assert _opt("172.31.236.11", 30480) == bytes([0x9A, 0x08, 0x10, 0x77, 0x0B, 0xEC, 0x1F, 0xAC])


def checksums_ok(frame: bytes) -> bool:
    """IP (options included) and L4 checksums equal freshly computed ones."""
    ip = Ether(frame)[IP]
    fresh = IP(raw(ip))
    del fresh.chksum
    del fresh.payload.chksum
    fresh = IP(raw(fresh))
    return ip.chksum == fresh.chksum and ip.payload.chksum == fresh.payload.chksum


@contextmanager
def _netns(name: str):
    pyroute2.netns.pushns(name)
    try:
        yield
    finally:
        pyroute2.netns.popns()


@pytest.fixture
def underlay():
    """A namespace with the node's device (a veth, NODE/24), a route to PEER's pod CIDR
    via PEER and PEER's MAC: what the FIB lookup of the entry node needs."""
    ns = f"pilus-dsr-{os.getpid() % 100000}"
    pyroute2.netns.create(ns)
    try:
        with _netns(ns), pyroute2.IPRoute() as ipr:
            ipr.link("add", ifname="dsr0", kind="veth", address=DEV_MAC, peer={"ifname": "dsr1"})
            idx = ipr.link_lookup(ifname="dsr0")[0]
            ipr.link("set", index=ipr.link_lookup(ifname="dsr1")[0], state="up")
            ipr.link("set", index=idx, state="up", mtu=1500)
            ipr.addr("add", index=idx, address=NODE, prefixlen=24)
            ipr.route("add", dst="10.200.2.0/24", gateway=PEER, oif=idx, flags=4)  # RTNH_F_ONLINK
            ipr.neigh("add", dst=PEER, lladdr=PEER_MAC, ifindex=idx, state=0x80)  # NUD_PERMANENT
        links.set_sysctl("net.ipv4.ip_forward", 1, netns=ns)  # a node forwards (else no FIB result)
        yield ns, idx
    finally:
        with suppress(OSError):
            pyroute2.netns.remove(ns)


@pytest.fixture
def dsr(bpf_state_dir):
    d = make_datapath(bpf_state_dir, events_rate=100000, events_burst=10000, lb_mode="dsr")
    seed(d)
    try:
        yield d
    finally:
        d.close()


def _nodeport(dp, svc_id: int, backend_ip: str, be_id: int) -> None:
    dp.lb.upsert_service(svc_id, Frontend(IPv4Address(NODE), NODE_PORT),
                         [BackendEntry(be_id, IPv4Address(backend_ip), 8080, "TCP", "active")],
                         flags=lbm.SVC_FLAG_NODEPORT | lbm.SVC_FLAG_ROUTABLE)


WIRE = Ether(src="02:aa:00:00:00:01", dst=DEV_MAC)


def test_entry_node_adds_the_option_to_every_packet_and_routes_to_the_backends_node(dsr, underlay):
    ns, idx = underlay
    _nodeport(dsr, 21, REMOTE_BE, 211)
    netdev = dsr.prog_fd("cil_from_netdev")
    syn = WIRE / IP(src=CLIENT, dst=NODE, ttl=64, id=7) / TCP(sport=50600, dport=NODE_PORT, flags="S", seq=5)
    ack = WIRE / IP(src=CLIENT, dst=NODE, ttl=64) / TCP(sport=50600, dport=NODE_PORT, flags="A", seq=6) / b"hi"
    for pkt in (syn, ack):
        with _netns(ns):
            r = run_skb(netdev, raw(pkt), ingress_ifindex=idx)
        assert r.retval == TC_ACT_REDIRECT, r.retval
        out = Ether(r.data)
        ip = out[IP]
        # DNAT only: the client's address and port stay
        assert (ip.src, out[TCP].sport, ip.dst, out[TCP].dport) == (CLIENT, 50600, REMOTE_BE, 8080)
        assert ip.ihl == 7 and ip.len == len(raw(pkt[IP])) + 8 and ip.ttl == 63
        assert raw(ip)[20:28] == _opt(NODE, NODE_PORT)
        # the L4 header and payload follow the option untouched (but the port)
        assert (out[TCP].seq, out[TCP].flags, raw(out[TCP].payload)) == \
            (pkt[TCP].seq, pkt[TCP].flags, raw(pkt[TCP].payload))
        assert checksums_ok(r.data)
        assert (out.dst, out.src) == (PEER_MAC, DEV_MAC)  # routed to the backend's node
        assert len(r.data) == len(raw(pkt)) + 8
    # the entry node keeps only the frontend tuple -> backend (replies never come here)
    rows = [r for r in dsr.lb.ct_items() if r["kind"] == "service"]
    assert [(r["client"], r["frontend"], r["backend_id"]) for r in rows] == \
        [(f"{CLIENT}:50600", f"{NODE}:{NODE_PORT}", 211)]


def test_entry_node_keeps_earlier_options_behind_the_dsr_option(dsr, underlay):
    ns, idx = underlay
    _nodeport(dsr, 22, REMOTE_BE, 221)
    nop4 = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    syn = WIRE / IP(src=CLIENT, dst=NODE, options=nop4) / TCP(sport=50601, dport=NODE_PORT, flags="S")
    with _netns(ns):
        r = run_skb(dsr.prog_fd("cil_from_netdev"), raw(syn), ingress_ifindex=idx)
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.data)[IP]
    assert ip.ihl == 8 and raw(ip)[20:32] == _opt(NODE, NODE_PORT) + nop4
    assert checksums_ok(r.data)


def test_too_big_with_the_option_answers_fragmentation_needed(dsr, underlay):
    ns, idx = underlay
    _nodeport(dsr, 23, REMOTE_BE, 231)
    before = dsr.metrics.get(DROP_FRAG_NEEDED, "ingress")[0]
    big = WIRE / IP(src=CLIENT, dst=NODE, flags="DF") / UDP(sport=50602, dport=NODE_PORT) / (b"x" * 1472)
    dsr.lb.upsert_service(24, Frontend(IPv4Address(NODE), NODE_PORT, "UDP"),
                          [BackendEntry(241, IPv4Address(REMOTE_BE), 8080, "UDP", "active")],
                          flags=lbm.SVC_FLAG_NODEPORT | lbm.SVC_FLAG_ROUTABLE)
    with _netns(ns):
        # skb->dev = the 1500-byte device: 1500 + 8 does not fit
        r = run_skb(dsr.prog_fd("cil_from_netdev"), raw(big), ingress_ifindex=idx, ifindex=idx)
    assert r.retval == TC_ACT_REDIRECT
    out = Ether(r.data)
    assert out.dst == "02:aa:00:00:00:01"
    assert (out[IP].src, out[IP].dst, out[ICMP].type, out[ICMP].code) == (NODE, CLIENT, 3, 4)
    assert out[ICMP].nexthopmtu == 1492
    fresh = IP(raw(out[IP]))
    del fresh.chksum
    del fresh[ICMP].chksum
    fresh = IP(raw(fresh))
    assert (out[IP].chksum, out[ICMP].chksum) == (fresh.chksum, fresh[ICMP].chksum)
    quoted = out[ICMP].payload  # what the client sent: the frontend, not the backend
    assert (quoted.src, quoted.dst, quoted.payload.dport) == (CLIENT, NODE, NODE_PORT)
    assert dsr.metrics.get(DROP_FRAG_NEEDED, "ingress")[0] == before + 1
    # one that fits passes with the option
    fits = WIRE / IP(src=CLIENT, dst=NODE, flags="DF") / UDP(sport=50602, dport=NODE_PORT) / (b"x" * 1464)
    with _netns(ns):
        r = run_skb(dsr.prog_fd("cil_from_netdev"), raw(fits), ingress_ifindex=idx, ifindex=idx)
    assert r.retval == TC_ACT_REDIRECT and Ether(r.data)[IP].len == 1500
    assert checksums_ok(r.data)


def test_snat_mode_is_unchanged(dp, underlay):
    """The default datapath (lb_mode snat): no option, the source becomes the node."""
    ns, idx = underlay
    _nodeport(dp, 25, REMOTE_BE, 251)
    syn = WIRE / IP(src=CLIENT, dst=NODE) / TCP(sport=50603, dport=NODE_PORT, flags="S")
    with _netns(ns):
        r = run_skb(dp.prog_fd("cil_from_netdev"), raw(syn), ingress_ifindex=idx)
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.data)[IP]
    assert ip.ihl == 5 and ip.src == NODE and ip[TCP].sport >= 61000 and ip.dst == REMOTE_BE
    assert checksums_ok(r.data)


# ---- the backend's node ----

ENTRY = "172.30.0.10"  # the entry node: the frontend is its address and node port


def _local_backend(dp):
    """A pod on ifindex 1, so that both its programs can run."""
    be = type(EP_A)(ipv4=IPv4Address("10.200.1.7"), ifindex=1, ep_id=7, identity=1007,
                    mac="02:00:00:00:00:07", host_mac="02:00:00:00:01:07")
    dp.endpoints.upsert(be)
    dp.ipcache.upsert(IPv4Network(f"{be.ipv4}/32"), be.identity)
    return be


def _arriving(be, sport: int, flags: str, with_opt: bool):
    opt = _opt(ENTRY, NODE_PORT) if with_opt else b""
    return (Ether(src=PEER_MAC, dst=DEV_MAC) / IP(src=CLIENT, dst=str(be.ipv4), options=opt)
            / TCP(sport=sport, dport=8080, flags=flags))


def _reply(be, dport: int, flags: str):
    return (Ether(src=be.mac, dst=be.host_mac) / IP(src=str(be.ipv4), dst=CLIENT)
            / TCP(sport=8080, dport=dport, flags=flags))


def _revnat(dp) -> list[tuple[str, str, str]]:
    return [(r["backend"], r["client"], r["frontend"]) for r in dp.lb.ct_items() if r["kind"] == "revnat"]


def test_backend_node_records_the_frontend_and_the_reply_leaves_with_it(dsr):
    be = _local_backend(dsr)
    netdev, lxc = dsr.prog_fd("cil_from_netdev"), dsr.prog_fd("cil_from_container")
    syn = _arriving(be, 50700, "S", with_opt=True)
    r = run_skb(netdev, raw(syn), ingress_ifindex=2)
    assert r.retval == TC_ACT_REDIRECT  # into the pod (BPF host routing), option and all
    out = Ether(r.data)
    assert (out[IP].src, out[IP].dst, out[IP].ihl) == (CLIENT, str(be.ipv4), 7)
    assert (out.src, out.dst) == (be.host_mac, be.mac)
    assert _revnat(dsr) == [(f"{be.ipv4}:8080", f"{CLIENT}:50700", f"{ENTRY}:{NODE_PORT}")]
    # the pod's reply: the frontend (the entry node's address and node port) is its
    # source, the client its destination; left to the stack, which routes it out
    r = run_skb(lxc, raw(_reply(be, 50700, "SA")), ingress_ifindex=1)
    assert r.retval == TC_ACT_OK
    out = Ether(r.data)
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (ENTRY, NODE_PORT, CLIENT, 50700)
    assert out[IP].ihl == 5 and checksums_ok(r.data)
    # the next packets refresh the same entry; a FIN marks it closing
    assert run_skb(netdev, raw(_arriving(be, 50700, "A", True)), ingress_ifindex=2).retval == TC_ACT_REDIRECT
    assert run_skb(netdev, raw(_arriving(be, 50700, "FA", True)), ingress_ifindex=2).retval == TC_ACT_REDIRECT
    rows = [r for r in dsr.lb.ct_items() if r["kind"] == "revnat"]
    assert len(rows) == 1 and rows[0]["flags"] & lbm.LB_CT_F_CLOSING
    assert rows[0]["expires_in_s"] <= 10  # ct_close_timeout


def test_backend_node_without_the_option_changes_nothing(dsr):
    be = _local_backend(dsr)
    r = run_skb(dsr.prog_fd("cil_from_netdev"), raw(_arriving(be, 50701, "S", False)), ingress_ifindex=2)
    assert r.retval == TC_ACT_REDIRECT and Ether(r.data)[IP].ihl == 5
    assert _revnat(dsr) == []
    r = run_skb(dsr.prog_fd("cil_from_container"), raw(_reply(be, 50701, "SA")), ingress_ifindex=1)
    assert r.retval == TC_ACT_OK
    assert (Ether(r.data)[IP].src, Ether(r.data)[TCP].sport) == (str(be.ipv4), 8080)


def test_backend_node_in_snat_mode_ignores_the_option(dp):
    """Only a DSR datapath trusts the option: elsewhere a sender could not make a
    pod's replies take another source."""
    be = _local_backend(dp)
    r = run_skb(dp.prog_fd("cil_from_netdev"), raw(_arriving(be, 50702, "S", True)), ingress_ifindex=2)
    assert r.retval == TC_ACT_REDIRECT
    assert _revnat(dp) == []
