"""Host-scope IPAM: lowest free, reserved addresses, restore, release, exhaustion."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pilus.ipam import HostScopeIPAM, IPAMError, IPAMExhausted

A = IPv4Address


def node_ipam(cidr="10.200.1.0/24"):
    net = IPv4Network(cidr)
    return HostScopeIPAM(net, reserved=[net.network_address + 1])  # router IP


def test_lowest_free_skips_network_router_broadcast():
    ipam = node_ipam()
    assert ipam.allocate("ep1") == A("10.200.1.2")
    assert ipam.allocate("ep2") == A("10.200.1.3")
    assert ipam.owner_of("10.200.1.2") == "ep1"
    assert ipam.owner_of(A("10.200.1.9")) is None
    assert ipam.stats() == {
        "family": "ipv4",
        "cidr": "10.200.1.0/24",
        "allocated": 2,
        "available": 251,
        "total": 253,
    }
    assert ipam.reserved == [A("10.200.1.1")]


def test_exhaustion_message_and_recovery():
    ipam = node_ipam()
    got = [ipam.allocate(f"ep{i}") for i in range(253)]
    assert got[0] == A("10.200.1.2") and got[-1] == A("10.200.1.254")
    with pytest.raises(IPAMExhausted) as exc:
        ipam.allocate("one-too-many")
    assert str(exc.value) == (
        "pod CIDR 10.200.1.0/24 is exhausted (253 of 253 addresses in use): "
        "delete endpoints or start the node with a larger --pod-cidr"
    )
    assert isinstance(exc.value, IPAMError)
    assert ipam.release("10.200.1.77") is True
    assert ipam.allocate("late") == A("10.200.1.77")
    assert ipam.stats()["available"] == 0


def test_release_lowers_next_allocation():
    ipam = node_ipam()
    for i in range(5):
        ipam.allocate(f"ep{i}")
    assert ipam.release(A("10.200.1.3")) is True
    assert ipam.release(A("10.200.1.3")) is False  # idempotent (CNI DEL may repeat)
    assert ipam.allocate("new") == A("10.200.1.3")
    assert ipam.allocate("next") == A("10.200.1.7")
    with pytest.raises(IPAMError, match="not in pod CIDR"):
        ipam.release("10.9.9.9")


def test_allocate_specific():
    ipam = node_ipam()
    assert ipam.allocate_specific("10.200.1.2", "restored") == A("10.200.1.2")
    assert ipam.allocate_specific(A("10.200.1.2"), "restored") == A("10.200.1.2")  # same owner: ok
    assert ipam.allocate("fresh") == A("10.200.1.3")
    ipam.allocate_specific("10.200.1.5", "r5")
    assert ipam.allocate("f2") == A("10.200.1.4")
    assert ipam.allocate("f3") == A("10.200.1.6")
    cases = [
        ("10.200.1.2", "already allocated to restored"),
        ("10.200.2.5", "10.200.2.5 is not in pod CIDR 10.200.1.0/24"),
        ("10.200.1.1", "reserved"),
        ("10.200.1.0", "network address"),
        ("10.200.1.255", "broadcast address"),
        ("nonsense", "is not an IP address"),
        ("fd00::1", "not an IPv4 address"),
    ]
    for ip, msg in cases:
        with pytest.raises(IPAMError, match=msg):
            ipam.allocate_specific(ip, "intruder")
    with pytest.raises(IPAMError, match="owner"):
        ipam.allocate("")


def test_release_owner_and_allocations():
    ipam = node_ipam()
    ipam.allocate("a")
    ipam.allocate("b")
    ipam.allocate("a")
    assert ipam.allocations() == {A("10.200.1.2"): "a", A("10.200.1.3"): "b", A("10.200.1.4"): "a"}
    assert ipam.release_owner("a") == [A("10.200.1.2"), A("10.200.1.4")]
    assert ipam.is_allocated("10.200.1.3") and not ipam.is_allocated("10.200.1.2")
    assert ipam.allocate("c") == A("10.200.1.2")


def test_constructor_checks_and_small_prefixes():
    with pytest.raises(IPAMError, match="IPv6 pod CIDRs are not supported yet"):
        HostScopeIPAM("fd00::/64")
    with pytest.raises(IPAMError, match="has host bits set"):
        HostScopeIPAM("10.0.0.1/24")
    with pytest.raises(IPAMError, match="reserved address 10.1.0.1 is not in pod CIDR"):
        HostScopeIPAM("10.0.0.0/24", reserved=["10.1.0.1"])
    p31 = HostScopeIPAM("10.0.0.0/31")  # RFC 3021: both usable
    assert [p31.allocate("x"), p31.allocate("y")] == [A("10.0.0.0"), A("10.0.0.1")]
    p32 = HostScopeIPAM("10.0.0.7/32")
    assert p32.allocate("x") == A("10.0.0.7")
    with pytest.raises(IPAMExhausted, match=r"\(1 of 1 addresses in use\)"):
        p32.allocate("y")
    p30 = HostScopeIPAM("10.0.0.0/30", reserved=["10.0.0.1"])
    assert p30.stats()["total"] == 1 and p30.allocate("x") == A("10.0.0.2")


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(0, 5)),
        st.tuples(st.just("specific"), st.integers(0, 15)),
        st.tuples(st.just("release"), st.integers(0, 15)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_never_double_allocates(program):
    ipam = HostScopeIPAM("10.0.0.0/28", reserved=["10.0.0.1"])
    model: dict[IPv4Address, str] = {}
    usable = [A("10.0.0.0") + i for i in range(2, 15)]
    for op, arg in program:
        if op == "alloc":
            owner = f"o{arg}"
            if len(model) == len(usable):
                with pytest.raises(IPAMExhausted):
                    ipam.allocate(owner)
                continue
            ip = ipam.allocate(owner)
            assert ip not in model and ip in usable
            assert ip == min(set(usable) - set(model))  # lowest free
            model[ip] = owner
        elif op == "specific":
            ip = A("10.0.0.0") + arg
            if ip not in usable or model.get(ip, "s") != "s":
                with pytest.raises(IPAMError):
                    ipam.allocate_specific(ip, "s")
            else:
                assert ipam.allocate_specific(ip, "s") == ip
                model[ip] = "s"
        else:
            ip = A("10.0.0.0") + arg
            assert ipam.release(ip) is (model.pop(ip, None) is not None)
        assert ipam.allocations() == dict(sorted(model.items()))
        st_ = ipam.stats()
        assert st_["allocated"] == len(model) and st_["available"] == len(usable) - len(model)
