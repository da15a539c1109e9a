"""DNSPolicy: which rule sets apply to a query, the union of their names, errors with the path."""

from __future__ import annotations

import pytest

from pilus.fqdn.rules import DNSPolicy, DNSPolicyError

SETS = [
    {"endpoint": 12, "endpoint_ips": ["10.200.1.5"], "port": 53, "end_port": None, "peers": [2000],
     "dns": [{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}]},
    {"endpoint": 12, "endpoint_ips": ["10.200.1.5"], "port": 53, "peers": [2000, 3000],
     "dns": [{"matchName": "example.org"}]},
    {"endpoint": 14, "endpoint_ips": ["10.200.1.6"], "port": 5300, "end_port": 5310, "peers": None, "dns": []},
]


def test_select_union_of_applicable_sets():
    p = DNSPolicy.from_rule_sets(SETS)
    m, ep = p.select("10.200.1.5", 53, 2000)
    assert ep == 12
    assert m.matches("docs.cilium.io") and m.matches("api.github.com") and m.matches("example.org")
    assert not m.matches("evil.com")
    m, ep = p.select("10.200.1.5", 53, 3000)  # only the second set names server 3000
    assert ep == 12 and m.matches("example.org") and not m.matches("api.github.com")


def test_select_none_when_nothing_applies():
    p = DNSPolicy.from_rule_sets(SETS)
    assert p.select("10.200.1.5", 53, 4000) == (None, None)  # another server
    assert p.select("10.200.1.5", 54, 2000) == (None, None)  # another port
    assert p.select("10.200.1.9", 53, 2000) == (None, None)  # another endpoint
    assert DNSPolicy().select("10.200.1.5", 53, 2000) == (None, None)


def test_port_range_any_peer_and_visibility():
    p = DNSPolicy.from_rule_sets(SETS)
    m, ep = p.select("10.200.1.6", 5305, 99)
    assert ep == 14 and m.matches("whatever.example")  # dns: [] allows every name
    assert p.select("10.200.1.6", 5311, 99) == (None, None)
    any_ep = DNSPolicy.from_rule_sets([{"dns": [{"matchName": "a.com"}]}])
    m, ep = any_ep.select("1.2.3.4", 53, 7)
    assert ep is None and m.matches("a.com")


@pytest.mark.parametrize(("data", "error"), [
    ({}, "rule_sets: must be a list"),
    ([7], "rule_sets[0]: must be an object"),
    ([{"http": []}], "rule_sets[0].http: unknown field"),
    ([{}, {"dns": [{}, {"matchPattern": "a b"}]}], "rule_sets[1].dns[1].matchPattern: character ' '"),
    ([{"dns": [{"matchName": "a.com", "matchPattern": "*"}]}], "rule_sets[0].dns[0]: only one of"),
    ([{"dns": {"matchName": "a.com"}}], "rule_sets[0].dns: must be a list"),
    ([{"endpoint_ips": ["10.0.0.300"]}], "rule_sets[0].endpoint_ips[0]: '10.0.0.300' is not an IPv4 address"),
    ([{"port": 0}], "rule_sets[0].port: must be an integer 1-65535"),
    ([{"end_port": 60}], "rule_sets[0].end_port: needs port"),
    ([{"port": 53, "end_port": 50}], "rule_sets[0].end_port: must be an integer 53-65535"),
    ([{"peers": [1, "x"]}], "rule_sets[0].peers[1]: must be an integer"),
    ([{"peers": 5}], "rule_sets[0].peers: must be a list"),
])
def test_errors_name_the_field_path(data, error):
    with pytest.raises(DNSPolicyError) as e:
        DNSPolicy.from_rule_sets(data)
    assert str(e.value).startswith(error), str(e.value)
