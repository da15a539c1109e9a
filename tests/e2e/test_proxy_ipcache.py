"""The proxy's IpcacheIdentityResolver reads a node's real pinned pilus_ipcache (longest prefix
wins; unknown is world; a removed pin is world, not an error)."""

from __future__ import annotations

import os
import shutil
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from pilus.datapath.config import DatapathConfig
from pilus.datapath.datapath import Datapath
from pilus.proxy.identity import IpcacheIdentityResolver

BPFFS_ROOT = Path(f"/sys/fs/bpf/pilus-l7test-{os.getpid()}")


@pytest.fixture
def pinned(tmp_path):
    cfg = DatapathConfig(node_name="l7node", router_ip=IPv4Address("10.221.8.1"),
                         node_ip=IPv4Address("10.221.8.2"), pod_cidr=IPv4Network("10.221.8.0/24"))
    dp = Datapath(cfg, tmp_path, bpffs_root=BPFFS_ROOT)
    try:
        dp.load()
        yield dp
    finally:
        dp.close()
        shutil.rmtree(BPFFS_ROOT, ignore_errors=True)


def test_resolver_reads_the_pinned_ipcache(pinned):
    pinned.ipcache.upsert(IPv4Network("10.221.9.0/24"), 5000)
    pinned.ipcache.upsert(IPv4Network("10.221.9.7/32"), 5001)
    resolver = IpcacheIdentityResolver(pinned.pin_root)
    try:
        assert resolver.resolve("10.221.9.7") == 5001
        assert resolver.resolve("10.221.9.8") == 5000
        assert resolver.resolve("192.0.2.1") == 2  # world
        pinned.ipcache.upsert(IPv4Network("10.221.9.8/32"), 5002)  # live updates, same fd
        assert resolver.resolve("10.221.9.8") == 5002
    finally:
        resolver.close()
    assert IpcacheIdentityResolver(BPFFS_ROOT / "no-such-node").resolve("10.221.9.7") == 2
