"""Monitor aggregation levels in the datapath (lib/trace.h, lib/conntrack.h), with
BPF_PROG_TEST_RUN: none (and lowest, low) traces every packet; medium (and maximum)
traces a connection's first packet, its first reply and its flag changes, and a live
connection again once --monitor-aggregation-interval has passed."""

from __future__ import annotations

import time

import pytest
from lxc_env import EP_A, EP_B, make_datapath, seed
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from test_lxc import TC_ACT_REDIRECT, a_eth, from_a

from pilus.datapath.events import TraceEvent
from pilus.observer.format import event_record


def _udp(sport: int):
    return a_eth() / IP(src=str(EP_A.ipv4), dst=str(EP_B.ipv4)) / UDP(sport=sport, dport=80) / b"x"


def _reply(sport: int):
    return Ether(src=EP_B.mac, dst=EP_B.host_mac) / IP(src=str(EP_B.ipv4), dst=str(EP_A.ipv4)) / UDP(
        sport=80, dport=sport) / b"y"


def _traces(reader) -> list[str]:
    return [event_record(e)["ct_state"] for e in reader.poll() if isinstance(e, TraceEvent)]


def _datapath(state_dir, **kw):
    dp = make_datapath(state_dir, events_rate=100000, events_burst=10000, **kw)
    seed(dp)
    return dp


@pytest.mark.parametrize("level", ["none", "lowest", "low"])
def test_below_medium_every_packet_is_traced(bpf_state_dir, level):
    dp = _datapath(bpf_state_dir, monitor_aggregation=level)
    try:
        with dp.events() as reader:
            reader.poll()
            for _ in range(3):
                assert from_a(dp, _udp(41000)).retval == TC_ACT_REDIRECT
            assert from_a(dp, _reply(41000), ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
            assert _traces(reader) == ["new", "established", "established", "reply"]
    finally:
        dp.close()


@pytest.mark.parametrize("level", ["medium", "maximum"])
def test_medium_traces_a_live_connection_again_after_the_interval(bpf_state_dir, level):
    dp = _datapath(bpf_state_dir, monitor_aggregation=level, monitor_aggregation_interval=1)
    try:
        with dp.events() as reader:
            reader.poll()
            for _ in range(3):
                assert from_a(dp, _udp(41001)).retval == TC_ACT_REDIRECT
            for _ in range(2):
                assert from_a(dp, _reply(41001), ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
            assert _traces(reader) == ["new", "reply"]  # the rest is aggregated
            time.sleep(1.1)  # the datapath's clock has seconds: one boundary has passed
            for _ in range(2):
                assert from_a(dp, _udp(41001)).retval == TC_ACT_REDIRECT
                assert from_a(dp, _reply(41001), ingress_ifindex=EP_B.ifindex).retval == TC_ACT_REDIRECT
            assert _traces(reader) == ["established", "reply"]  # once per direction, then quiet again
    finally:
        dp.close()
