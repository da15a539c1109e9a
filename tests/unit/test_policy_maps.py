"""Policy-map encoding and sync without root: key/value <-> C structs, the deny-wins
map state, the lookup mirror, and the reconciler writing one endpoint's map (a fake
BPF map keyed by the key's bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilus.datapath import abi
from pilus.datapath.policy import (
    _PolicyMapTarget,
    entry_from_c,
    entry_to_c,
    key_from_c,
    key_to_c,
    match_type,
)
from pilus.policy.mapstate import (
    DROP_DENY,
    DROP_NO_ENTRY,
    EndpointPolicy,
    PolicyEntry,
    PolicyKey,
    lookup,
    normalize,
    port_range,
    port_range_text,
)
from pilus.reconcile import Reconciler

ALLOW, DENY = PolicyEntry(False), PolicyEntry(True)


def test_key_round_trip_with_prefix_masks():
    for k in (
        PolicyKey(1001, True, 6, 80, 16),
        PolicyKey(7, False, 0, 0, 0),  # L3-only
        PolicyKey(0, False, 17, 0, 0),  # proto-only (any port)
        PolicyKey(0, True, 6, 8000, 14),  # 8000-8003
        PolicyKey(5, False, 1, 8, 16),  # ICMP echo request: the type in the port
        PolicyKey(0xFFFFFFFF, True, 132, 0x8000, 1),
    ):
        assert key_from_c(key_to_c(k)) == k
        assert abi.PolicyKeyC.from_raw(bytes(key_to_c(k).to_bytes())).sec_label == k.identity
    c = key_to_c(PolicyKey(0, False, 6, 8003, 14))  # bits past the prefix are dropped
    assert key_from_c(c) == PolicyKey(0, False, 6, 8000, 14)
    assert c.lpm_prefixlen == abi.POLICY_STATIC_PREFIX + 8 + 14
    assert key_to_c(PolicyKey(1, False, 1, 8, 16)).to_bytes()[-2:] == b"\x00\x08"


@pytest.mark.parametrize(
    "bad",
    [
        PolicyKey(1, False, 0, 80, 16),  # any protocol cannot name a port
        PolicyKey(1, False, 6, 80, 17),
        PolicyKey(1, False, 256, 0, 0),
        PolicyKey(1, False, 6, 70000, 16),
        PolicyKey(-1, False, 6, 80, 16),
    ],
)
def test_keys_the_map_cannot_hold(bad):
    with pytest.raises(ValueError):
        key_to_c(bad)
    with pytest.raises(ValueError):
        normalize({bad: ALLOW})


def test_entry_encoding_and_range_text():
    k = PolicyKey(3, True, 6, 8080, 16)
    e = entry_to_c(k, PolicyEntry(False, 15001))
    assert e.lpm_prefix_length == 24 and abi.raw_to_port(e.proxy_port) == 15001
    assert entry_from_c(e) == PolicyEntry(False, 15001)
    assert entry_to_c(PolicyKey(3, True, 0, 0, 0), DENY).lpm_prefix_length == 0
    assert port_range(8000, 14) == (8000, 8003) and port_range(0, 0) == (0, 65535)
    assert [port_range_text(*t) for t in ((6, 80, 16), (6, 8000, 14), (17, 0, 0), (0, 0, 0), (58, 128, 16))] == [
        "80/TCP",
        "8000-8003/TCP",
        "ANY/UDP",
        "ANY",
        "128/ICMPv6",
    ]


def test_normalize_writes_covered_allows_as_denies_and_is_idempotent():
    entries = {
        PolicyKey(5, False, 6, 80, 16): PolicyEntry(False, 0, "allow-80"),
        PolicyKey(5, False, 6, 0, 0): PolicyEntry(True, 0, "deny-tcp"),
        PolicyKey(0, False, 6, 80, 16): ALLOW,  # identity 0: its own lookup, not rewritten
        PolicyKey(5, False, 6, 81, 15): ALLOW,  # masked to 80/15, covered
    }
    out = normalize(entries)
    assert out[PolicyKey(5, False, 6, 80, 16)] == PolicyEntry(True, 0, "deny-tcp")
    assert out[PolicyKey(5, False, 6, 80, 15)].deny and not out[PolicyKey(0, False, 6, 80, 16)].deny
    assert normalize(out) == out


def test_lookup_mirror_and_match_types():
    state = normalize(
        {
            PolicyKey(9, True, 6, 80, 16): ALLOW,
            PolicyKey(0, True, 6, 8000, 14): ALLOW,
            PolicyKey(0, True, 6, 22, 16): DENY,
            PolicyKey(9, True, 17, 0, 0): ALLOW,
            PolicyKey(77, True, 6, 443, 16): ALLOW,  # an ipBlock identity
            PolicyKey(77, True, 6, 80, 16): DENY,
        }
    )

    def got(proto, port, ipb=0):
        v = lookup(state, 9, True, proto, port, ipb)
        return v.action, v.reason, match_type(v)

    assert got(6, 80) == ("allow", 0, "L3-L4")
    assert got(6, 8002) == ("allow", 0, "L4-Only")
    assert got(6, 22) == ("deny", DROP_DENY, "L4-Only")
    assert got(17, 53) == ("allow", 0, "L3-Proto")
    assert got(6, 81) == ("deny", DROP_NO_ENTRY, "none")
    assert got(6, 443, 77) == ("allow", 0, "L3-L4")  # the ipBlock allow stands in for nothing
    assert got(6, 80, 77) == ("deny", DROP_DENY, "L3-L4")  # the ipBlock deny wins
    pol = EndpointPolicy(False, True, state, egress_ipblock=False)
    assert pol.verdict(9, False, 6, 1).allowed and not pol.verdict(9, False, 6, 1).enforced
    assert pol.verdict(9, True, 6, 443, 77).reason == DROP_NO_ENTRY  # no ipBlock rules: no second lookup


keys = st.builds(
    lambda ident, egress, proto, port, plen: PolicyKey(
        ident, egress, proto, port if proto else 0, plen if proto else 0
    ),
    st.sampled_from([0, 9, 77]),
    st.booleans(),
    st.sampled_from([0, 6, 17]),
    st.integers(0, 31),
    st.sampled_from([0, 12, 14, 15, 16]),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, st.booleans(), max_size=12), st.sampled_from([6, 17]), st.integers(0, 31), st.booleans())
def test_mirror_over_the_map_state_is_deny_wins_over_the_rules(raw, proto, port, egress):
    """Independent statement: allowed iff some allow of the peer's identity, identity 0
    or the ipBlock identity matches and no deny of those does."""
    entries = {k: PolicyEntry(deny) for k, deny in raw.items()}
    matching = [
        e for k, e in entries.items() if k.identity in (0, 9, 77) and k.egress == egress and k.matches(proto, port)
    ]
    want = any(not e.deny for e in matching) and not any(e.deny for e in matching)
    assert lookup(normalize(entries), 9, egress, proto, port, 77).allowed == want


class FakeBpfMap:
    """The BpfMap calls the policy-map target uses, over a dict keyed by the key's bytes."""

    def __init__(self) -> None:
        self.data: dict[bytes, abi.PolicyEntryC] = {}
        self.writes: list[tuple[str, PolicyKey]] = []

    def items(self):
        return [(abi.PolicyKeyC.from_raw(k), v) for k, v in self.data.items()]

    def lookup(self, key):
        return self.data.get(bytes(key.to_bytes()))

    def update(self, key, value):
        self.writes.append(("update", key_from_c(key)))
        self.data[bytes(key.to_bytes())] = value

    def delete(self, key):
        self.writes.append(("delete", key_from_c(key)))
        return self.data.pop(bytes(key.to_bytes()), None) is not None


def test_sync_through_a_reconciler_keeps_counters_and_writes_only_the_difference():
    m = FakeBpfMap()
    rec = Reconciler("policy map of endpoint 1", _PolicyMapTarget(m))
    k80, k22, k53 = PolicyKey(9, True, 6, 80, 16), PolicyKey(0, True, 6, 22, 16), PolicyKey(9, True, 17, 53, 16)
    rec.set({k22: DENY, k80: ALLOW}).raise_for_errors("sync")
    assert m.writes == [("update", k22), ("update", k80)]
    m.data[bytes(key_to_c(k80).to_bytes())].packets = 7  # the datapath counts
    m.writes.clear()
    rec.set({k22: DENY, k80: ALLOW, k53: ALLOW}).raise_for_errors("sync")
    assert m.writes == [("update", k53)]
    m.writes.clear()
    rec.set({k22: DENY, k80: PolicyEntry(False, 15001)}).raise_for_errors("sync")  # changed, and k53 goes
    assert m.writes == [("delete", k53), ("update", k80)]
    assert m.lookup(key_to_c(k80)).packets == 7  # the counters of a rewritten entry stay
    # a new reconciler (a restarted agent) finds the map in sync
    again = Reconciler("policy map of endpoint 1", _PolicyMapTarget(m))
    m.writes.clear()
    assert again.set({k22: DENY, k80: PolicyEntry(False, 15001)}).upserted == 0 and m.writes == []
