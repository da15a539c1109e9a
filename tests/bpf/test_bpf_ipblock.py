"""The second policy lookup for Kubernetes ipBlocks (BPF_PROG_TEST_RUN).

An endpoint whose policy uses an ipBlock in a direction has ENDPOINT_F_IPBLOCK_*
set; its policy check then also looks up the identity of the longest
pilus_ipblock prefix covering the peer's address. Endpoints A (identity 1000)
and B (identity 1001) come from lxc_env; MATE has B's identity and another
address (a pod on another node: ipcache only), so identity-keyed entries cannot
tell them apart but ipBlock prefixes can. C (identity 1007) sits on ifindex 1
for to-container.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from lxc_env import EP_A, EP_B, EP_C, enforce, key
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath import (
    ENDPOINT_F_IPBLOCK_EGRESS,
    ENDPOINT_F_IPBLOCK_INGRESS,
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    DropEvent,
    PolicyEntry,
    PolicyVerdictEvent,
)
from pilus.datapath.policy import match_type
from pilus.datapath.testrun import run_skb
from pilus.observer.format import event_record
from pilus.policy import mapstate

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
EGR = ENDPOINT_F_POLICY_EGRESS | ENDPOINT_F_IPBLOCK_EGRESS
ING = ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_IPBLOCK_INGRESS
TCP_ = 6
ALLOW, DENY = PolicyEntry(deny=False), PolicyEntry(deny=True)


def mirror(dp, ep_id, identity, egress, proto, port, ipblock_identity=0):
    """The Python mirror of the datapath lookup over what the map really holds."""
    v = mapstate.lookup(dp.policy.state(ep_id), identity, egress, proto, port, ipblock_identity)
    return {"action": v.action, "match_type": match_type(v)}
MATE = IPv4Address("10.200.2.8")  # B's identity, another address
IB_B, IB_NET, IB_EXT = (1 << 24) | 0x101, (1 << 24) | 0x102, (1 << 24) | 0x103  # ipBlock identities

def syn(src, dst, dport, sport):
    return Ether() / IP(src=str(src), dst=str(dst)) / TCP(sport=sport, dport=dport, flags="S")


def from_a(dp, a, dst, dport, sport):
    return run_skb(dp.prog_fd("cil_from_container"), raw(syn(a.ipv4, dst, dport, sport)),
                   ingress_ifindex=a.ifindex).retval


def to_c(dp, src, dport, sport):
    return run_skb(dp.prog_fd("cil_to_container"), raw(syn(src, EP_C.ipv4, dport, sport)), ifindex=1).retval


def outcome(evs):
    """(action, drop reason, remote identity, match type) of every policy verdict."""
    return [
        (v["action"], v["drop_reason"], v["remote_identity"], v["match_type"])
        for v in (event_record(e) for e in evs if isinstance(e, PolicyVerdictEvent))
    ]


def drop_reasons(evs):
    return [event_record(e)["reason"] for e in evs if isinstance(e, DropEvent)]


def packets(dp, ep_id, identity):
    return sum(r["packets"] for r in dp.policy.items(ep_id) if r["identity"] == identity)


@pytest.fixture
def mate(dp):
    dp.ipcache.upsert(IPv4Network(f"{MATE}/32"), EP_B.identity)
    return MATE


def test_tc_lxc_ipblock_egress_to_one_pod(dp, events, mate):
    """ipBlock {cidr: B/32}: B is allowed, its identity-mate stays denied (133)."""
    a = enforce(dp, EP_A, EGR)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(a.ep_id, {key(IB_B, True, TCP_, 80): ALLOW})
    assert from_a(dp, a, EP_B.ipv4, 80, 41000) == TC_ACT_REDIRECT
    assert from_a(dp, a, mate, 80, 41001) == TC_ACT_SHOT
    assert from_a(dp, a, EP_B.ipv4, 81, 41002) == TC_ACT_SHOT  # combined with ports
    evs = events.poll()
    assert outcome(evs) == [
        ("allow", 0, EP_B.identity, "L3-L4"),
        ("deny", 133, EP_B.identity, "none"),
        ("deny", 133, EP_B.identity, "none"),
    ]
    assert drop_reasons(evs) == [133, 133]
    assert packets(dp, a.ep_id, IB_B) == 1  # the ipBlock identity's entry decided


def test_tc_lxc_ipblock_flag_clear_skips_the_second_lookup(dp, events):
    """Same entries without ENDPOINT_F_IPBLOCK_EGRESS: no second lookup, default deny."""
    a = enforce(dp, EP_A, ENDPOINT_F_POLICY_EGRESS)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(a.ep_id, {key(IB_B, True, TCP_, 80): ALLOW})
    assert from_a(dp, a, EP_B.ipv4, 80, 41010) == TC_ACT_SHOT
    assert drop_reasons(events.poll()) == [133]
    assert packets(dp, a.ep_id, IB_B) == 0


def test_tc_lxc_ipblock_except(dp, events, mate):
    """ipBlock {cidr: 10.200.0.0/16, except: [B/32]}: B is carved out, the mate is not."""
    a = enforce(dp, EP_A, EGR)
    dp.ipblock.upsert(IPv4Network("10.200.0.0/16"), IB_NET)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(a.ep_id, {key(IB_NET, True): ALLOW})  # the except prefix selects nothing
    assert from_a(dp, a, EP_B.ipv4, 80, 41020) == TC_ACT_SHOT
    assert from_a(dp, a, mate, 80, 41021) == TC_ACT_OK  # not local: to the stack
    evs = events.poll()
    assert outcome(evs) == [("deny", 133, EP_B.identity, "none"), ("allow", 0, EP_B.identity, "L3-Only")]
    assert packets(dp, a.ep_id, IB_NET) == 1


@pytest.mark.parametrize(
    "entries,why",
    [
        ({key(EP_B.identity, True, TCP_, 80): DENY, key(IB_B, True): ALLOW}, "identity deny, ipBlock allow"),
        ({key(EP_B.identity, True): ALLOW, key(IB_B, True, TCP_, 80): DENY}, "identity allow, ipBlock deny"),
        ({key(0, True, TCP_, 80): DENY, key(IB_B, True): ALLOW}, "any-identity deny, ipBlock allow"),
        ({key(0, True): ALLOW, key(IB_B, True, TCP_): DENY}, "any-identity allow, ipBlock deny"),
    ],
)
def test_tc_lxc_ipblock_deny_wins_in_either_lookup(dp, events, entries, why):
    a = enforce(dp, EP_A, EGR)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(a.ep_id, entries)
    assert from_a(dp, a, EP_B.ipv4, 80, 41030) == TC_ACT_SHOT, why
    evs = events.poll()
    assert drop_reasons(evs) == [181], why
    assert [o[:2] for o in outcome(evs)] == [("deny", 181)], why


def test_tc_lxc_ipblock_allow_from_either_lookup(dp, events):
    """An allow of the peer's identity stands when the ipBlock entry has nothing to say."""
    a = enforce(dp, EP_A, EGR)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(a.ep_id, {key(EP_B.identity, True, TCP_, 80): ALLOW, key(IB_B, True, TCP_, 443): ALLOW})
    assert from_a(dp, a, EP_B.ipv4, 80, 41040) == TC_ACT_REDIRECT
    assert from_a(dp, a, EP_B.ipv4, 443, 41041) == TC_ACT_REDIRECT
    assert from_a(dp, a, EP_B.ipv4, 22, 41042) == TC_ACT_SHOT
    assert [o[:2] for o in outcome(events.poll())] == [("allow", 0), ("allow", 0), ("deny", 133)]
    assert packets(dp, a.ep_id, EP_B.identity) == 1 and packets(dp, a.ep_id, IB_B) == 1


def test_tc_lxc_ipblock_ingress_local_delivery(dp, events):
    """B's ingress from an ipBlock covering A's address, on the local redirect path."""
    b = enforce(dp, EP_B, ING)
    dp.ipblock.upsert(IPv4Network(f"{EP_A.ipv4}/32"), IB_B)
    dp.policy.sync(b.ep_id, {key(IB_B, False, TCP_, 80): ALLOW})
    assert from_a(dp, EP_A, b.ipv4, 80, 41050) == TC_ACT_REDIRECT
    assert from_a(dp, EP_A, b.ipv4, 81, 41051) == TC_ACT_SHOT
    evs = events.poll()
    assert outcome(evs) == [("allow", 0, EP_A.identity, "L3-L4"), ("deny", 133, EP_A.identity, "none")]


def test_tc_to_container_ipblock_ingress(dp, events):
    """to-container: the source address decides; world outside the ipBlock stays denied."""
    dp.endpoints.upsert(EP_C)
    c = enforce(dp, EP_C, ING)
    dp.ipblock.upsert(IPv4Network("9.9.9.0/24"), IB_EXT)
    dp.policy.sync(c.ep_id, {key(IB_EXT, False, TCP_, 80): ALLOW})
    assert to_c(dp, "9.9.9.9", 80, 1001) == TC_ACT_OK
    assert to_c(dp, "8.8.8.8", 80, 1002) == TC_ACT_SHOT
    evs = events.poll()
    assert outcome(evs) == [("allow", 0, 2, "L3-L4"), ("deny", 133, 2, "none")]
    assert packets(dp, c.ep_id, IB_EXT) == 1


def test_python_verdict_agrees_with_the_two_lookups(dp, events):
    a = enforce(dp, EP_A, EGR)
    dp.ipblock.upsert(IPv4Network(f"{EP_B.ipv4}/32"), IB_B)
    dp.policy.sync(
        a.ep_id,
        {
            key(EP_B.identity, True, TCP_, 80): ALLOW,
            key(IB_B, True, TCP_, 443): ALLOW,
            key(IB_B, True, TCP_, 80): DENY,
            key(0, True, TCP_, 22): DENY,
            key(IB_B, True, TCP_, 22): ALLOW,
        },
    )
    for i, port in enumerate((80, 443, 22, 8080)):
        ret = from_a(dp, a, EP_B.ipv4, port, 41100 + i)
        ((action, _reason, _remote, match),) = outcome(events.poll())
        py = mirror(dp, a.ep_id, EP_B.identity, True, TCP_, port, IB_B)
        assert (py["action"], py["match_type"]) == (action, match), port
        assert (ret == TC_ACT_REDIRECT) == (action == "allow"), port


def test_ipblock_map_round_trip(dp):
    dp.ipblock.upsert(IPv4Network("10.0.0.0/8"), IB_NET)
    dp.ipblock.upsert(IPv4Network("0.0.0.0/0"), IB_EXT)
    assert dp.ipblock.items() == [(IPv4Network("0.0.0.0/0"), IB_EXT), (IPv4Network("10.0.0.0/8"), IB_NET)]
    assert dp.ipblock.delete(IPv4Network("10.0.0.0/8"))
    assert dp.ipblock.items() == [(IPv4Network("0.0.0.0/0"), IB_EXT)]
