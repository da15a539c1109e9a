"""The proxy's configuration file (JSON), parsed and compiled all-or-nothing.

```
{"listeners": [
  {"name": "ep12-ingress",          optional; default "<direction>:<port>"
   "port": 15001,                    the port the proxy listens on (TPROXY / datapath target)
   "address": "0.0.0.0",             optional
   "direction": "ingress",           ingress | egress
   "protocol": "http",               optional; http (default) | kafka: which parser serves it
   "transparent": true,              optional; false = a plain listener (tests, debugging)
   "upstream": "10.0.0.5:80",        optional; only with transparent false: where to forward
   "rules": [                        rule sets; the union of those that apply is enforced
     {"endpoint": 12,                optional, reported in records
      "endpoint_ips": ["10.200.1.5"], optional; null/absent = any local endpoint
      "port": 80,                    optional; the original destination port; null = any
      "end_port": 89,                optional; with port: the range port..end_port (endPort)
      "peers": [1234, 2],            the peer identities it applies to; null = any peer
      "http": [ {PortRuleHTTP with Cilium's field names}, ... ]}   [] = allow all (visibility)
      -- or, on a kafka listener --
      "kafka": [ {PortRuleKafka: role, apiKey, apiVersion, clientID, topic}, ... ]}
   ]}
]}
```

The local endpoint is the original destination on ingress and the client on egress; the peer
is the other side. No applicable rule set: the request is denied (403; Kafka: the API's
authorization error). A rule set carries the rules of its listener's protocol only.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .http_rules import CompiledHttpRules, HttpRuleError, compile_http_rules, deny_all, rule_from_dict
from .kafka_rules import CompiledKafkaRules, KafkaRuleError, compile_kafka_rules, kafka_rule_from_dict

__all__ = ["ConfigError", "ListenerConfig", "ProxyConfig", "RuleSet", "rule_set_scope"]

DIRECTIONS = ("ingress", "egress")
PROTOCOLS = ("http", "kafka")


class ConfigError(ValueError):
    """A configuration the proxy refuses; the message starts with the field path."""


@dataclass(frozen=True)
class RuleSet:
    endpoint: int | None
    endpoint_ips: frozenset[str] | None
    port: int | None
    peers: frozenset[int] | None
    http: CompiledHttpRules
    end_port: int | None = None  # the range port..end_port (None: port alone)
    kafka: CompiledKafkaRules = CompiledKafkaRules()

    def applies(self, local_ip: str, port: int, peer: int) -> bool:
        return ((self.endpoint_ips is None or local_ip in self.endpoint_ips)
                and (self.port is None or self.port <= port <= (self.end_port or self.port))
                and (self.peers is None or peer in self.peers))


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    port: int
    address: str
    direction: str
    transparent: bool
    upstream: tuple[str, int] | None
    rules: tuple[RuleSet, ...]
    protocol: str = "http"

    def select_kafka(self, local_ip: str, port: int, peer: int) -> tuple[CompiledKafkaRules, int | None]:
        """As ``select``, for a kafka listener (no rule set applies: nothing is allowed)."""
        sets = [r for r in self.rules if r.applies(local_ip, port, peer)]
        if not sets:
            return CompiledKafkaRules(), None
        return CompiledKafkaRules.union(r.kafka for r in sets), sets[0].endpoint

    def select(self, local_ip: str, port: int, peer: int) -> tuple[CompiledHttpRules, int | None]:
        """The rules for one request's (endpoint, port, peer) and the endpoint id."""
        sets = [r for r in self.rules if r.applies(local_ip, port, peer)]
        if not sets:
            return deny_all(), None
        return CompiledHttpRules.union(r.http for r in sets), sets[0].endpoint


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]

    @classmethod
    def from_file(cls, path: str | Path) -> ProxyConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ProxyConfig:
        if not isinstance(data, dict) or not isinstance(data.get("listeners", []), list):
            raise ConfigError("listeners: must be a list")
        listeners = tuple(_listener(ld, f"listeners[{i}]") for i, ld in enumerate(data.get("listeners", [])))
        seen: dict[tuple[str, int], str] = {}
        for lst in listeners:
            if (lst.address, lst.port) in seen:
                other = seen[(lst.address, lst.port)]
                raise ConfigError(f"listeners: port {lst.port} used twice ({other}, {lst.name})")
            seen[(lst.address, lst.port)] = lst.name
        return cls(listeners)


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}: must be an integer {lo}-{hi}")
    return v


def _listener(d: Any, where: str) -> ListenerConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = set(d) - {"name", "port", "address", "direction", "protocol", "transparent", "upstream", "rules"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    port = _int(d.get("port"), f"{where}.port", 1, 65535)
    direction = d.get("direction")
    if direction not in DIRECTIONS:
        raise ConfigError(f"{where}.direction: must be ingress or egress")
    protocol = d.get("protocol", "http")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}.protocol: must be http or kafka")
    address = str(d.get("address", "0.0.0.0"))
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ConfigError(f"{where}.address: not an IPv4 address") from None
    transparent = d.get("transparent", True)
    if not isinstance(transparent, bool):
        raise ConfigError(f"{where}.transparent: must be true or false")
    upstream = None
    if d.get("upstream") is not None:
        if transparent:
            raise ConfigError(f"{where}.upstream: only for a listener with transparent false")
        host, _, p = str(d["upstream"]).rpartition(":")
        if not host or not p.isdigit():
            raise ConfigError(f"{where}.upstream: must be HOST:PORT")
        upstream = (host, _int(int(p), f"{where}.upstream", 1, 65535))
    elif not transparent:
        raise ConfigError(f"{where}.upstream: needed when transparent is false")
    rules = d.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{where}.rules: must be a list")
    return ListenerConfig(
        str(d.get("name") or f"{direction}:{port}"), port, address, direction, transparent, upstream,
        tuple(_ruleset(r, f"{where}.rules[{i}]", protocol) for i, r in enumerate(rules)), protocol,
    )


def rule_set_scope(d: Any, where: str, rules: tuple[str, ...]) -> tuple[
        int | None, frozenset[str] | None, int | None, int | None, frozenset[int] | None]:
    """The fields that say where a rule set applies, shared by every proxy's rule sets:
    (endpoint, endpoint_ips, port, end_port, peers); ``rules``: the rule fields the caller
    reads itself (any other field is refused). ConfigError names the field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be an object")
    unknown = set(d) - {"endpoint", "endpoint_ips", "port", "end_port", "peers", *rules}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown field")
    endpoint = None if d.get("endpoint") is None else _int(d["endpoint"], f"{where}.endpoint", 0, 2**32 - 1)
    ips = d.get("endpoint_ips")
    if ips is not None:
        if not isinstance(ips, list):
            raise ConfigError(f"{where}.endpoint_ips: must be a list of IPv4 addresses or null")
        for j, ip in enumerate(ips):
            try:
                ipaddress.IPv4Address(ip)
            except ValueError:
                raise ConfigError(f"{where}.endpoint_ips[{j}]: {str(ip)[:64]!r} is not an IPv4 address") from None
        ips = frozenset(ips)
    port = None if d.get("port") is None else _int(d["port"], f"{where}.port", 1, 65535)
    end_port = None
    if d.get("end_port") is not None:
        if port is None:
            raise ConfigError(f"{where}.end_port: needs port")
        end_port = _int(d["end_port"], f"{where}.end_port", port, 65535)
    peers = d.get("peers")
    if peers is not None:
        if not isinstance(peers, list):
            raise ConfigError(f"{where}.peers: must be a list of identities or null (any peer)")
        peers = frozenset(_int(p, f"{where}.peers[{j}]", 0, 2**32 - 1) for j, p in enumerate(peers))
    return endpoint, ips, port, end_port, peers


def _ruleset(d: Any, where: str, protocol: str = "http") -> RuleSet:
    endpoint, ips, port, end_port, peers = rule_set_scope(d, where, ("http", "kafka"))
    other = "http" if protocol == "kafka" else "kafka"
    if other in d:
        raise ConfigError(f"{where}.{other}: not on a {protocol} listener")
    if protocol == "kafka":
        kafka = d.get("kafka", [])
        if not isinstance(kafka, list):
            raise ConfigError(f"{where}.kafka: must be a list")
        try:
            krules = compile_kafka_rules([kafka_rule_from_dict(r, f"{where}.kafka[{i}]") for i, r in enumerate(kafka)])
        except KafkaRuleError as e:
            raise ConfigError(str(e)) from None
        return RuleSet(endpoint, ips, port, peers, deny_all(), end_port, krules)
    http = d.get("http", [])
    if not isinstance(http, list):
        raise ConfigError(f"{where}.http: must be a list")
    try:
        typed = [rule_from_dict(r, f"{where}.http[{i}]") for i, r in enumerate(http)]
        compiled = compile_http_rules(typed, f"{where}.http")
    except HttpRuleError as e:
        raise ConfigError(str(e)) from None
    return RuleSet(endpoint, ips, port, peers, compiled, end_port)
