"""Shared data and helpers of the BPF_PROG_TEST_RUN tests."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pilus.datapath import Datapath, DatapathConfig, EndpointInfo, PolicyKey

ROUTER_IP = IPv4Address("10.200.1.1")
NODE_IP = IPv4Address("172.30.0.11")
POD_CIDR = IPv4Network("10.200.1.0/24")

EP_A = EndpointInfo(
    ipv4=IPv4Address("10.200.1.5"),
    ifindex=100,
    ep_id=5,
    identity=1000,
    mac="02:00:00:00:00:05",
    host_mac="02:00:00:00:01:05",
)
EP_B = EndpointInfo(
    ipv4=IPv4Address("10.200.1.6"),
    ifindex=101,
    ep_id=6,
    identity=1001,
    mac="02:00:00:00:00:06",
    host_mac="02:00:00:00:01:06",
)


EP_C = EndpointInfo(
    ipv4=IPv4Address("10.200.1.7"),
    ifindex=1,
    ep_id=7,
    identity=1007,
    mac="02:00:00:00:00:07",
    host_mac="02:00:00:00:01:07",
)


def key(identity, egress, proto=0, dport=0, prefix_len=None):
    """A policy key; a port rule matches its port in full unless prefix_len says otherwise."""
    if prefix_len is None:
        prefix_len = 16 if proto and dport else 0
    return PolicyKey(identity, egress, proto, dport, prefix_len)


def enforce(dp, ep, flags):
    """Write `ep` into the endpoint map with enforcement `flags`; returns it."""
    ep = replace(ep, flags=flags)
    dp.endpoints.upsert(ep)
    return ep


def make_datapath(state_dir: Path, **cfg_kw) -> Datapath:
    cfg = DatapathConfig(
        node_name="test-node",
        router_ip=ROUTER_IP,
        node_ip=NODE_IP,
        pod_cidr=POD_CIDR,
        **cfg_kw,
    )
    dp = Datapath(cfg, state_dir, bpffs_root=None)  # no pinning: nothing left behind
    dp.load()
    return dp


def seed(dp: Datapath) -> None:
    dp.endpoints.upsert(EP_A)
    dp.endpoints.upsert(EP_B)
    dp.ipcache.upsert(IPv4Network(f"{EP_A.ipv4}/32"), EP_A.identity)
    dp.ipcache.upsert(IPv4Network(f"{EP_B.ipv4}/32"), EP_B.identity)
    dp.ipcache.upsert(IPv4Network(f"{ROUTER_IP}/32"), 1)
    dp.ipcache.upsert(IPv4Network(f"{NODE_IP}/32"), 1)
