"""The ipcache's one owner: sources merged by precedence, one reconciler to the map."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pilus.identity import reserved
from pilus.identity.reserved import LOCAL_IDENTITY_FLAG
from pilus.ipcache import IPCache, IPCacheEntry, Source
from pilus.reconcile import ReconcileError
from pilus.testing.fake_datapath import FakeIpcache

NET = IPv4Network
POD = NET("10.200.1.2/32")
CIDR_ID = LOCAL_IDENTITY_FLAG | 1


def test_constructing_reads_nothing():
    class Untouchable(FakeIpcache):
        def dump(self):
            raise AssertionError("the map was read")

        items = dump

    IPCache(Untouchable())


def test_local_hides_generated_and_generated_comes_back():
    m = FakeIpcache()
    cache = IPCache(m)
    cache.upsert(POD, CIDR_ID, Source.GENERATED)
    assert m.rows == {POD: CIDR_ID}
    cache.upsert(POD, 1234, Source.LOCAL)
    assert m.rows == {POD: 1234}
    cache.upsert(POD, CIDR_ID + 1, Source.GENERATED)  # hidden: nothing written
    assert m.rows == {POD: 1234}
    assert cache.items() == [IPCacheEntry(POD, 1234, Source.LOCAL)]
    cache.delete(POD, Source.LOCAL)
    assert m.rows == {POD: CIDR_ID + 1}
    cache.delete(POD, Source.LOCAL)  # not claimed by LOCAL any more: nothing happens
    cache.delete(POD, Source.GENERATED)
    assert m.rows == {} and cache.items() == []


def test_kvstore_sits_between_local_and_generated():
    m = FakeIpcache()
    cache = IPCache(m)
    node = IPv4Address("192.168.0.2")
    cache.upsert(POD, CIDR_ID, Source.GENERATED)
    cache.upsert(POD, 5000, Source.KVSTORE, tunnel_endpoint=node)
    assert m.items() == [(POD, 5000, node)]
    cache.upsert(POD, 1234, Source.LOCAL)
    assert m.items() == [(POD, 1234, None)]  # the local claim has no tunnel
    cache.delete(POD, Source.LOCAL)
    assert m.items() == [(POD, 5000, node)]


def test_lookup_is_longest_prefix():
    cache = IPCache(FakeIpcache())
    cache.upsert(NET("0.0.0.0/0"), reserved.WORLD, Source.LOCAL)
    cache.upsert(NET("10.0.0.0/8"), CIDR_ID, Source.GENERATED)
    cache.upsert(NET("10.200.0.0/16"), CIDR_ID + 1, Source.GENERATED)
    cache.upsert(POD, 1234, Source.LOCAL)
    assert cache.lookup(IPv4Address("10.200.1.2")).identity == 1234
    assert cache.lookup(IPv4Address("10.200.1.3")).prefix == NET("10.200.0.0/16")
    assert cache.lookup(IPv4Address("10.1.1.1")).identity == CIDR_ID
    assert cache.lookup(IPv4Address("8.8.8.8")).identity == reserved.WORLD
    assert IPCache(FakeIpcache()).lookup(IPv4Address("8.8.8.8")) is None


def test_failed_write_stays_pending_in_status_and_retry_writes_it():
    m = FakeIpcache()
    cache = IPCache(m)
    m.fail.add(POD)
    with pytest.raises(ReconcileError, match="10.200.1.2/32"):
        cache.upsert(POD, 1234, Source.LOCAL)
    status = cache.status()
    assert (status["pending"], status["errors"], status["state"]) == (1, 1, "Pending")
    assert "no space left" in status["last_error"]
    assert status["entries"] == {"generated": 0, "fqdn": 0, "kvstore": 0, "local": 1, "restored": 0}
    cache.upsert(NET("10.9.0.0/16"), CIDR_ID, Source.GENERATED)  # other prefixes still get written
    assert NET("10.9.0.0/16") in m.rows
    m.fail.clear()
    cache.retry()
    assert m.rows[POD] == 1234 and cache.status()["state"] == "Ok"


def test_resync_repairs_drift():
    m = FakeIpcache()
    cache = IPCache(m)
    cache.upsert(POD, 1234, Source.LOCAL)
    cache.upsert(NET("10.9.0.0/16"), CIDR_ID, Source.GENERATED)
    m.rows[POD] = 99  # someone else wrote it
    del m.rows[NET("10.9.0.0/16")]  # or removed it
    m.rows[NET("10.7.0.0/16")] = 77  # or added one nobody claims
    cache.resync()
    assert m.rows == {POD: 1234, NET("10.9.0.0/16"): CIDR_ID}


def test_restart_keeps_an_earlier_runs_entries_until_resync():
    m = FakeIpcache()
    router, gone_pod = NET("10.200.1.1/32"), NET("10.200.1.9/32")
    m.rows = {POD: 1234, router: reserved.HOST, gone_pod: 4321, NET("9.9.9.0/24"): CIDR_ID + 7}
    cache = IPCache(m)
    # a policy CIDR naming the pod does not take the pod's entry over while it is restored
    cache.upsert(POD, CIDR_ID, Source.GENERATED)
    cache.upsert(NET("9.9.9.0/24"), CIDR_ID, Source.GENERATED)  # an earlier CIDR entry is rewritten
    assert m.rows[POD] == 1234 and m.rows[NET("9.9.9.0/24")] == CIDR_ID
    assert cache.status()["entries"]["restored"] == 3
    cache.upsert(router, reserved.HOST, Source.LOCAL)
    cache.upsert(POD, 1234, Source.LOCAL)  # the endpoint is restored
    assert gone_pod in m.rows  # nothing pruned before resync
    cache.resync()
    assert m.rows == {POD: 1234, router: reserved.HOST, NET("9.9.9.0/24"): CIDR_ID}
    cache.delete(POD, Source.LOCAL)
    assert m.rows[POD] == CIDR_ID  # the CIDR claim was kept underneath

