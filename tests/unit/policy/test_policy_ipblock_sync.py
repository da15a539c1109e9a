"""The agent side of ipBlocks: PolicySync gives every prefix an ipBlock names an ipBlock
identity and keeps pilus_ipblock equal to them (the conformance-checked FakeDatapath's map stands
in for the pinned one); a restart keeps the numbers, so it rewrites nothing; the endpoint flags."""

from __future__ import annotations

import ipaddress

import pytest
from test_policy_ipblock import EGRESS_EXCEPT, EGRESS_TO_SERVER

from pilus.datapath import (
    ENDPOINT_F_IPBLOCK_EGRESS,
    ENDPOINT_F_IPBLOCK_INGRESS,
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
)
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.policy_sync import IPBLOCK_IDENTITY_BASE, PolicySync, endpoint_flags
from pilus.identity.reserved import is_local
from pilus.ipcache import IPCache
from pilus.policy import PolicyEngine, parse_policies
from pilus.policy.engine import EndpointPolicy
from pilus.policy.selector import is_ipblock_identity
from pilus.testing.fake_datapath import FakeDatapath

NET = ipaddress.ip_network



@pytest.fixture
def make_sync():
    made = []

    def make(dp: FakeDatapath) -> PolicySync:
        sync = PolicySync(PolicyEngine(), dp, identities=None, distribution=None,
                          ipcache=IPCache(dp.ipcache), entries=EndpointEntries(dp.endpoints))
        made.append(sync)
        return sync

    yield make
    for sync in made:
        sync._worker.shutdown(wait=True)


def apply(sync: PolicySync, text: str) -> None:
    sync.engine.set_policies(parse_policies(text) if text else [])
    sync._refresh_cidr_identities()
    sync._sync_changed()  # the policy maps, then the new pilus_ipblock entries


def test_every_named_prefix_gets_an_ipblock_identity(make_sync):
    dp = FakeDatapath()
    sync = make_sync(dp)
    apply(sync, EGRESS_EXCEPT + EGRESS_TO_SERVER)
    ids = dict(dp.ipblock.items())
    assert set(ids) == {NET("10.1.2.0/24"), NET("10.1.2.11/32")}  # cidr and except, once each
    assert ids == sync.ipblock_identities
    assert all(is_local(i) and i >= IPBLOCK_IDENTITY_BASE for i in ids.values())
    assert len(set(ids.values())) == 2
    assert dp.ipcache.items() == []  # nothing for the ipcache: no Cilium CIDR rule
    labels = sync.engine.identities()
    assert all(is_ipblock_identity(labels[i]) for i in ids.values())
    assert sync.engine.ipblock_identity(ipaddress.ip_address("10.1.2.11")) == (
        NET("10.1.2.11/32"),
        ids[NET("10.1.2.11/32")],
    )


def test_restart_keeps_the_numbers_and_prunes_what_no_policy_names(make_sync):
    dp = FakeDatapath()
    apply(make_sync(dp), EGRESS_EXCEPT + EGRESS_TO_SERVER)
    before = dict(dp.ipblock.items())
    dp.ipblock.rows[NET("9.9.9.0/24")] = IPBLOCK_IDENTITY_BASE + 77  # left by an older policy set
    dp.ipblock.writes = 0
    again = make_sync(dp)  # a restarted agent: fresh engine, the pinned map
    apply(again, EGRESS_EXCEPT + EGRESS_TO_SERVER)
    assert dict(dp.ipblock.items()) == before == again.ipblock_identities
    assert dp.ipblock.writes == 1  # the stale entry's delete, nothing else
    later = dict(before)
    apply(again, EGRESS_TO_SERVER)  # the except policy goes away
    del later[NET("10.1.2.0/24")]
    assert dict(dp.ipblock.items()) == later
    assert before[NET("10.1.2.0/24")] not in again.engine.identities()
    apply(again, "")
    assert dp.ipblock.items() == [] and again.ipblock_identities == {}


@pytest.mark.parametrize(
    "policy,flags",
    [
        (
            EndpointPolicy(True, True, {}, True, False),
            ENDPOINT_F_POLICY_INGRESS | ENDPOINT_F_POLICY_EGRESS | ENDPOINT_F_IPBLOCK_INGRESS,
        ),
        (EndpointPolicy(False, True, {}, False, True), ENDPOINT_F_POLICY_EGRESS | ENDPOINT_F_IPBLOCK_EGRESS),
        (EndpointPolicy(False, False, {}, True, True), 0),  # not enforced: no lookup at all
        (EndpointPolicy(True, False, {}), ENDPOINT_F_POLICY_INGRESS),
    ],
)
def test_endpoint_flags(policy, flags):
    assert endpoint_flags(policy) == flags


def test_new_entries_wait_for_the_policy_maps(make_sync):
    """An address must not resolve to an ipBlock identity the policy maps do not know yet."""
    dp = FakeDatapath()
    sync = make_sync(dp)
    sync.engine.set_policies(parse_policies(EGRESS_TO_SERVER))
    sync._refresh_cidr_identities()
    assert dp.ipblock.items() == [] and sync.ipblock_identities  # engine first ...
    sync._sync_changed()
    assert dict(dp.ipblock.items()) == sync.ipblock_identities  # ... the map after the policy maps
