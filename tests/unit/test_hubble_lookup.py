"""The lookup seam flows use for their two ends (pilus.hubble.lookup): StaticLookup's
tables, the reserved identities' fallback labels, and the Protocol check."""

from __future__ import annotations

import pytest

from pilus.hubble.lookup import EndpointDetails, EndpointLookup, StaticLookup, labels_of


def test_static_lookup_is_an_endpoint_lookup():
    assert isinstance(StaticLookup(), EndpointLookup)


def test_static_lookup_add_and_remove():
    lk = StaticLookup()
    ep = EndpointDetails(7, 1007, "default", "a", ("k8s:app=a",), ip="10.0.0.7")
    lk.add(ep)
    assert lk.endpoint_by_ip("10.0.0.7") == ep and lk.endpoint_by_id(7) == ep
    assert lk.identity_labels(1007) == ("k8s:app=a",)
    moved = EndpointDetails(8, 1007, "default", "a", ("k8s:app=a",), ip="10.0.0.7")
    lk.add(moved)  # the same address, another endpoint: the old one's id goes
    assert lk.endpoint_by_id(7) is None and lk.endpoint_by_id(8) == moved
    lk.remove("10.0.0.7")
    assert lk.endpoint_by_ip("10.0.0.7") is None and lk.endpoint_by_id(8) is None
    with pytest.raises(ValueError, match="no ip"):
        lk.add(EndpointDetails(9, 1, "default", "b"))


def test_labels_of_falls_back_to_reserved_identities_and_sorts():
    lk = StaticLookup(identities={300: ["k8s:b=2", "k8s:a=1"], 2: ["reserved:world", "cidr:1.0.0.0/8"]})
    assert labels_of(lk, 300) == ["k8s:a=1", "k8s:b=2"]
    assert labels_of(lk, 2) == ["cidr:1.0.0.0/8", "reserved:world"]  # the lookup's answer wins
    assert labels_of(StaticLookup(), 1) == ["reserved:host"]
    assert labels_of(StaticLookup(), 6) == ["reserved:remote-node"]
    assert labels_of(StaticLookup(), 0) == [] and labels_of(StaticLookup(), 4242) == []
