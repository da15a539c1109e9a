"""DNSCache: TTLs, --tofqdns-min-ttl, the per-host IP limit, zombies kept by connections,
selectors, the dump format and persistence."""

from __future__ import annotations

import json

import pytest

from pilus.fqdn.cache import DNSCache
from pilus.fqdn.matchpattern import NameMatcher

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def never(ip):
    return False


def test_update_and_ttl_expiry():
    c = DNSCache()
    assert c.update(12, "API.github.com", ["1.2.3.4", "1.2.3.5"], 300, T0) is True
    assert c.lookup(12, "api.github.com.") == {"1.2.3.4", "1.2.3.5"}
    assert c.update(12, "api.github.com", ["1.2.3.4"], 300, T0 + 10) is False  # refresh only
    assert c.update(12, "api.github.com", ["1.2.3.6"], 300, T0 + 10) is True  # a new IP
    assert c.expire(T0 + 299, never) == set()
    # 1.2.3.5 expired at T0+300; the two refreshed at T0+10 live until T0+310
    assert c.expire(T0 + 300, never) == {"1.2.3.5"}
    assert c.lookup(12, "api.github.com") == {"1.2.3.4", "1.2.3.6"}
    assert c.expire(T0 + 310, never) == {"1.2.3.4", "1.2.3.6"}
    assert c.dump() == []


def test_min_ttl_raises_short_ttls():
    c = DNSCache(min_ttl=3600)
    c.update(1, "a.com", ["10.0.0.1"], 5, T0)
    assert c.dump()[0]["ttl"] == 3600
    assert c.expire(T0 + 3599, never) == set()
    assert c.expire(T0 + 3600, never) == {"10.0.0.1"}
    c0 = DNSCache(min_ttl=0)  # 0: the answer's own TTL
    c0.update(1, "a.com", ["10.0.0.1"], 5, T0)
    assert c0.expire(T0 + 5, never) == {"10.0.0.1"}


def test_ip_shared_by_endpoints_or_names_is_released_last():
    c = DNSCache()
    c.update(1, "a.com", ["10.0.0.1"], 10, T0)
    c.update(2, "b.com", ["10.0.0.1"], 100, T0)
    assert c.expire(T0 + 10, never) == set()  # endpoint 2 still holds it
    assert c.names_for_ip("10.0.0.1") == ["b.com."]
    assert c.expire(T0 + 100, never) == {"10.0.0.1"}


def test_max_ips_per_host_evicts_the_first_to_expire():
    c = DNSCache(max_ips_per_host=2)
    c.update(1, "a.com", ["10.0.0.1"], 100, T0)
    c.update(1, "a.com", ["10.0.0.2"], 50, T0)
    c.update(1, "a.com", ["10.0.0.3"], 200, T0)  # over the limit: 10.0.0.2 expires first
    assert c.lookup(1, "a.com") == {"10.0.0.1", "10.0.0.3"}
    # the evicted IP is a zombie: a connection may use it; without one the next expire frees it
    assert [r["ips"] for r in c.dump() if r["source"] == "connection"] == [["10.0.0.2"]]
    assert c.expire(T0 + 1, never) == {"10.0.0.2"}
    with pytest.raises(ValueError):
        DNSCache(max_ips_per_host=0)


def test_zombies_live_while_conntrack_uses_them():
    c = DNSCache()
    c.update(12, "api.github.com", ["1.2.3.4", "1.2.3.5"], 60, T0)
    conns = {"1.2.3.4"}
    assert c.expire(T0 + 60, lambda ip: ip in conns) == {"1.2.3.5"}
    assert c.lookup(12, "api.github.com") == set()  # no live entry
    rows = c.dump()
    assert rows == [{"endpoint": 12, "fqdn": "api.github.com.", "ips": ["1.2.3.4"], "ttl": 60,
                     "lookup_time": "2023-11-14T22:13:20Z", "expiration_time": "2023-11-14T22:14:20Z",
                     "source": "connection"}]
    # selectors still see the zombie: dropping it from policy would cut the connection
    assert c.ips_matching(NameMatcher(patterns=["*.github.com"])) == {"1.2.3.4"}
    assert c.names_for_ip("1.2.3.4") == ["api.github.com."]
    assert c.expire(T0 + 1000, lambda ip: ip in conns) == set()
    conns.clear()
    assert c.expire(T0 + 1001, lambda ip: ip in conns) == {"1.2.3.4"}
    assert c.dump() == [] and c.names_for_ip("1.2.3.4") == []


def test_a_new_lookup_revives_a_zombie():
    c = DNSCache()
    c.update(12, "a.com", ["1.2.3.4"], 60, T0)
    c.expire(T0 + 60, lambda ip: True)
    assert c.update(12, "a.com", ["1.2.3.4"], 60, T0 + 70) is False  # the selector had it already
    assert [r["source"] for r in c.dump()] == ["lookup"]
    assert c.update(12, "b.com", ["1.2.3.4"], 60, T0 + 70) is True  # b.com gains it


def test_max_zombies_drops_the_oldest():
    c = DNSCache(max_zombies=1)
    c.update(1, "a.com", ["10.0.0.1"], 10, T0)
    c.update(1, "b.com", ["10.0.0.2"], 20, T0)
    assert c.expire(T0 + 20, lambda ip: True) == {"10.0.0.1"}
    assert [r["ips"] for r in c.dump()] == [["10.0.0.2"]]


def test_ips_matching_and_dump_filters():
    c = DNSCache()
    c.update(12, "api.github.com", ["1.2.3.4"], 300, T0)
    c.update(12, "docs.cilium.io", ["5.6.7.8", "5.6.7.9"], 300, T0)
    c.update(14, "a.b.cilium.io", ["9.9.9.9"], 300, T0)
    assert c.ips_matching(NameMatcher(patterns=["*.cilium.io"])) == {"5.6.7.8", "5.6.7.9"}
    assert c.ips_matching(NameMatcher(patterns=["**.cilium.io"])) == {"5.6.7.8", "5.6.7.9", "9.9.9.9"}
    assert c.ips_matching(NameMatcher(names=["api.github.com"])) == {"1.2.3.4"}
    assert c.ips_matching(NameMatcher(allow_all=True)) == {"1.2.3.4", "5.6.7.8", "5.6.7.9", "9.9.9.9"}
    assert [r["fqdn"] for r in c.dump(endpoint=12)] == ["api.github.com.", "docs.cilium.io."]
    assert [r["fqdn"] for r in c.dump(pattern="**.cilium.io")] == ["docs.cilium.io.", "a.b.cilium.io."]
    with pytest.raises(ValueError, match="empty label"):
        c.dump(pattern="a..b")
    assert c.dump(name="DOCS.cilium.io") == [
        {"endpoint": 12, "fqdn": "docs.cilium.io.", "ips": ["5.6.7.8", "5.6.7.9"], "ttl": 300,
         "lookup_time": "2023-11-14T22:13:20Z", "expiration_time": "2023-11-14T22:18:20Z", "source": "lookup"}]


def test_clear():
    c = DNSCache()
    c.update(12, "a.com", ["1.1.1.1", "2.2.2.2"], 300, T0)
    c.update(14, "b.com", ["2.2.2.2"], 300, T0)
    assert c.clear(12) == {"1.1.1.1"}  # 2.2.2.2 still held by endpoint 14
    assert c.clear() == {"2.2.2.2"}
    assert c.dump() == []


def test_persistence_round_trip():
    c = DNSCache()
    c.update(12, "a.com", ["1.1.1.1"], 300, T0)
    c.update(12, "b.com", ["2.2.2.2"], 10, T0)
    c.expire(T0 + 10, lambda ip: True)
    d = DNSCache.from_json(c.to_json(), min_ttl=0)
    assert d.dump() == c.dump()
    assert d.expire(T0 + 11, never) == {"2.2.2.2"}


@pytest.mark.parametrize(("data", "error"), [
    ("{", "fqdn cache: not JSON"),
    ({"version": 2}, "fqdn cache: must be an object with version 1"),
    ({"version": 1, "entries": {}}, "fqdn cache.entries: must be a list"),
    ({"version": 1, "entries": [[1, "a.com", "300.1.1.1", 0, 1, 2]]}, "fqdn cache.entries[0]:"),
    ({"version": 1, "zombies": [[1, "1.1.1.1", [], 0, 1, 2]]}, "fqdn cache.zombies[0]: zombie names"),
    ({"version": 1, "entries": [[1, 2]]}, "fqdn cache.entries[0]: must be a list of 6 items"),
])
def test_bad_persisted_cache_is_refused(data, error):
    with pytest.raises(ValueError) as e:
        DNSCache.from_json(json.dumps(data) if isinstance(data, dict) else data)
    assert str(e.value).startswith(error), str(e.value)
