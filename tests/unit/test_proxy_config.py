"""The proxy config: selection by (endpoint, port, peer), union of rule sets, errors with the
field path, all-or-nothing."""

from __future__ import annotations

import pytest

from pilus.proxy.config import ConfigError, ProxyConfig
from pilus.proxy.http_rules import DictSecretStore, RequestHead


def cfg(rules, **listener):
    return ProxyConfig.from_dict({"listeners": [{"port": 15001, "direction": "ingress", "rules": rules, **listener}]})


def allowed(config, local_ip, port, peer, method="GET", path="/"):
    rules, _ = config.listeners[0].select(local_ip, port, peer)
    return rules.evaluate(RequestHead(method, path, "h"), DictSecretStore()).allowed


def test_selection_by_endpoint_port_and_peer():
    c = cfg([
        {"endpoint": 1, "endpoint_ips": ["10.0.0.1"], "port": 80, "peers": [100], "http": [{"method": "GET"}]},
        {"endpoint": 1, "endpoint_ips": ["10.0.0.1"], "port": 80, "peers": [200], "http": [{"method": "PUT"}]},
        {"port": 8080, "peers": None, "http": []},  # any endpoint, any peer: visibility only
    ])
    assert allowed(c, "10.0.0.1", 80, 100, "GET") and not allowed(c, "10.0.0.1", 80, 100, "PUT")
    assert allowed(c, "10.0.0.1", 80, 200, "PUT") and not allowed(c, "10.0.0.1", 80, 200, "GET")
    assert not allowed(c, "10.0.0.1", 80, 300)  # no rule set for this peer: denied
    assert not allowed(c, "10.0.0.2", 80, 100)  # another endpoint
    assert allowed(c, "10.9.9.9", 8080, 12345, "DELETE")
    assert c.listeners[0].select("10.0.0.1", 80, 100)[1] == 1


def test_union_of_rule_sets_for_one_peer():
    c = cfg([{"peers": [100], "http": [{"method": "GET"}]}, {"peers": [100, 200], "http": [{"method": "POST"}]}])
    assert allowed(c, "1.1.1.1", 80, 100, "GET") and allowed(c, "1.1.1.1", 80, 100, "POST")
    assert not allowed(c, "1.1.1.1", 80, 200, "GET")


def test_port_range():
    c = cfg([{"port": 8000, "end_port": 8010, "peers": None, "http": [{"method": "GET"}]}])
    assert allowed(c, "1.1.1.1", 8000, 7) and allowed(c, "1.1.1.1", 8010, 7)
    assert not allowed(c, "1.1.1.1", 7999, 7) and not allowed(c, "1.1.1.1", 8011, 7)


def test_defaults():
    lst = cfg([]).listeners[0]
    assert (lst.name, lst.address, lst.transparent, lst.upstream) == ("ingress:15001", "0.0.0.0", True, None)


@pytest.mark.parametrize(("doc", "field"), [
    ({"listeners": [{"port": 0, "direction": "ingress"}]}, "listeners[0].port"),
    ({"listeners": [{"port": 1, "direction": "up"}]}, "listeners[0].direction"),
    ({"listeners": [{"port": 1, "direction": "egress", "transparent": False}]}, "listeners[0].upstream"),
    ({"listeners": [{"port": 1, "direction": "egress", "upstream": "a:1"}]}, "listeners[0].upstream"),
    ({"listeners": [{"port": 1, "direction": "egress", "bogus": 1}]}, "listeners[0].bogus"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"peers": 5}]}]}, "listeners[0].rules[0].peers"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"end_port": 5}]}]},
     "listeners[0].rules[0].end_port"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"port": 9, "end_port": 5}]}]},
     "listeners[0].rules[0].end_port"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"endpoint_ips": ["x"]}]}]},
     "listeners[0].rules[0].endpoint_ips[0]"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"http": [{"path": "(?x)"}]}]}]},
     "listeners[0].rules[0].http[0].path"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"http": [{"headerMatches": [
        {"name": "a", "mismatch": "DROP"}]}]}]}]}, "listeners[0].rules[0].http[0].headerMatches[0].mismatch"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"http": [{"verb": "GET"}]}]}]},
     "listeners[0].rules[0].http[0].verb"),
    ({"listeners": [{"port": 1, "direction": "ingress"}, {"port": 1, "direction": "egress"}]}, "listeners"),
])
def test_errors_name_the_field(doc, field):
    with pytest.raises(ConfigError) as e:
        ProxyConfig.from_dict(doc)
    assert str(e.value).startswith(field)
