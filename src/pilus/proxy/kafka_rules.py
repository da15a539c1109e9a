"""Cilium's PortRuleKafka semantics: validation, matching, the per-topic split of a request and
the merge of the broker's answer with the denied topics.

A request is allowed when ANY rule allows it. A rule names ``role`` (produce / consume) or
``apiKey`` (Cilium's KafkaAPIKeyMap names), not both; ``apiVersion`` (decimal, exact),
``clientID`` (exact) and ``topic`` (exact) are checked when not ''. A request that names topics
is judged topic by topic; one without topics (ApiVersions, Metadata for all topics,
FindCoordinator, JoinGroup, ...) is allowed when a rule's key, version and clientID match,
whatever its topic. An API or version the codec cannot parse passes only on a rule without a
topic (it cannot be looked into). ``[]`` or ``[{}]`` allow everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .kafka_schema import (
    API,
    API_NAMES,
    TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    Api,
)
from .kafka_wire import Request, Response, default_body

__all__ = ["API_KEY_NAMES", "CompiledKafkaRules", "Decision", "KafkaRule", "KafkaRuleError", "clamp_api_versions",
           "compile_kafka_rules", "decide", "kafka_rule_from_dict", "merge", "validate_kafka_rule"]

ROLE_KEYS = {
    "produce": frozenset({0, 3, 18}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}
API_KEY_NAMES = {v: k for k, v in API_NAMES.items()}
_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_FIELDS = ("role", "apiKey", "apiVersion", "clientID", "topic")


class KafkaRuleError(ValueError):
    """A Kafka rule the proxy refuses; the message starts with the field path."""


@dataclass(frozen=True)
class KafkaRule:
    keys: frozenset[int] | None  # None: any API key
    version: int | None  # None: any version
    client_id: str = ""
    topic: str = ""

    def matches(self, key: int, version: int, client_id: str | None) -> bool:
        return ((self.keys is None or key in self.keys)
                and (self.version is None or self.version == version)
                and (not self.client_id or self.client_id == client_id))


def validate_kafka_rule(d: Any, where: str) -> None:
    """Raise KafkaRuleError (a ValueError) with the field path when ``d`` is not a valid rule."""
    kafka_rule_from_dict(d, where)


def kafka_rule_from_dict(d: Any, where: str) -> KafkaRule:
    if not isinstance(d, dict):
        raise KafkaRuleError(f"{where}: must be an object")
    for k in d:
        if k not in _FIELDS:
            raise KafkaRuleError(f"{where}.{k}: unknown field (role, apiKey, apiVersion, clientID, topic)")
        if not isinstance(d[k], str):
            raise KafkaRuleError(f"{where}.{k}: must be a string")
    role, api_key = d.get("role", "").lower(), d.get("apiKey", "").lower()
    if role and api_key:
        raise KafkaRuleError(f"{where}: role and apiKey are exclusive")
    keys: frozenset[int] | None = None
    if role:
        if role not in ROLE_KEYS:
            raise KafkaRuleError(f"{where}.role: unknown role {d['role']!r} (produce, consume)")
        keys = ROLE_KEYS[role]
    elif api_key:
        if api_key not in API_NAMES:
            raise KafkaRuleError(f"{where}.apiKey: unknown API key {d['apiKey']!r}")
        keys = frozenset({API_NAMES[api_key]})
    version = None
    if d.get("apiVersion"):
        v = d["apiVersion"]
        if not v.isdigit() or int(v) > 32767:
            raise KafkaRuleError(f"{where}.apiVersion: must be a decimal number 0-32767, got {v!r}")
        version = int(v)
    topic = d.get("topic", "")
    if topic and not _TOPIC.fullmatch(topic):
        raise KafkaRuleError(f"{where}.topic: {topic!r} is not a Kafka topic name "
                             "(at most 249 characters of a-z A-Z 0-9 . _ -)")
    return KafkaRule(keys, version, d.get("clientID", ""), topic)


@dataclass(frozen=True)
class CompiledKafkaRules:
    rules: tuple[KafkaRule, ...] = ()
    allow_all: bool = False

    @classmethod
    def union(cls, sets: Iterable[CompiledKafkaRules]) -> CompiledKafkaRules:
        sets = list(sets)
        if any(s.allow_all for s in sets):
            return cls((), True)
        return cls(tuple(r for s in sets for r in s.rules))

    def allows(self, key: int, version: int, client_id: str | None, topic: str | None) -> bool:
        """``topic`` None: a request without topics (a rule's topic is not checked)."""
        return self.allow_all or any(
            r.matches(key, version, client_id) and (topic is None or not r.topic or r.topic == topic)
            for r in self.rules)

    def allows_opaque(self, key: int, version: int | None, client_id: str | None) -> bool:
        """A request the codec cannot look into: only a rule without a topic lets it pass
        (``version`` None: any version of the key)."""
        return self.allow_all or any(
            not r.topic and (r.keys is None or key in r.keys)
            and (r.version is None or version is None or r.version == version)
            and (not r.client_id or r.client_id == client_id)
            for r in self.rules)


def compile_kafka_rules(rules: list[KafkaRule]) -> CompiledKafkaRules:
    """``[]`` and any rule that matches everything (``{}``) allow every request (visibility)."""
    if not rules or any(r.keys is None and r.version is None and not r.client_id and not r.topic for r in rules):
        return CompiledKafkaRules((), True)
    return CompiledKafkaRules(tuple(rules))


@dataclass
class Decision:
    """What to do with one request: forward (maybe with fewer topics) and/or answer locally."""

    topics: list[tuple[str, bool]]  # (topic, allowed) in request order; ("", allowed) without topics
    forward: Request | None = None  # what goes upstream; None: the proxy answers
    local: Response | None = None  # the proxy's own answer (forward None); None with no response due
    denied: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (position, request topic)

    @property
    def expects_response(self) -> bool:
        return self.forward is not None and not _no_response(self.forward)


def _no_response(req: Request) -> bool:
    return req.api_key == 0 and req.body is not None and req.body.get("acks") == 0  # acks=0 produce


def _topics(req: Request) -> list[dict[str, Any]] | None:
    api = API[req.api_key]
    if api.topics is None or req.body is None:
        return None
    return req.body.get("topics") or None  # null or [] (Metadata v0): no topics named


def decide(req: Request, rules: CompiledKafkaRules) -> Decision:
    """The verdict for a request the codec parsed (``req.known``)."""
    api = API[req.api_key]
    topics = _topics(req)
    if topics is None:
        ok = rules.allows(req.api_key, req.api_version, req.client_id, None)
        if ok:
            return Decision([("", True)], forward=req)
        return Decision([("", False)], local=_deny_topicless(req, api))
    verdicts = [rules.allows(req.api_key, req.api_version, req.client_id, t.get("name") or "") for t in topics]
    named = [(t.get("name") or "", ok) for t, ok in zip(topics, verdicts, strict=True)]
    denied = [(i, t) for i, (t, ok) in enumerate(zip(topics, verdicts, strict=True)) if not ok]
    if not denied:
        return Decision(named, forward=req)
    spec = api.topics
    assert spec is not None
    empty_ok = spec.forward_empty_from is not None and req.api_version >= spec.forward_empty_from
    if len(denied) == len(topics) and not empty_ok:
        d = Decision(named, denied=denied)
        if not _no_response(req):
            d.local = merge(req, d, None)
        return d
    body = dict(req.body or {})
    body["topics"] = [t for t, ok in zip(topics, verdicts, strict=True) if ok]
    fwd = Request(req.api_key, req.api_version, req.correlation_id, req.client_id, req.header_tags, body)
    return Decision(named, forward=fwd, denied=denied)


def _deny_topicless(req: Request, api: Api) -> Response:
    v, flex = req.api_version, api.is_flexible(req.api_version)
    err = api.deny_error
    if req.api_key == 22 and req.body and req.body.get("transactional_id") is not None:
        err = TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    body = default_body(api.response, v, flex)
    if "error_code" in body:
        body["error_code"] = err
    return Response(req.correlation_id, body)


def _resp_fields(api: Api, name: str):
    return next(f.type for f in api.response if f.name == name)


def _denied_topic(api: Api, version: int, topic: dict[str, Any]) -> dict[str, Any]:
    flex = api.is_flexible(version)
    tfields = _resp_fields(api, "topics")
    assert api.topics is not None
    if api.topics.topic_error:  # Metadata: the topic itself carries the error
        return default_body(tfields, version, flex, name=topic.get("name"), error_code=TOPIC_AUTHORIZATION_FAILED)
    pfields = next(f.type for f in tfields if f.name == "partitions")
    parts = topic.get("partitions") or []
    return default_body(tfields, version, flex, name=topic.get("name"), partitions=[
        default_body(pfields, version, flex, partition=p if api.topics.parts_are_ints else p.get("partition", 0),
                     error_code=TOPIC_AUTHORIZATION_FAILED)
        for p in parts])


def merge(req: Request, decision: Decision, broker: Response | None) -> Response:
    """The client's answer: the broker's topics and the denied ones, in request order (the
    broker's topics that the request did not name go last)."""
    api = API[req.api_key]
    v = req.api_version
    body = dict(broker.body) if broker is not None else default_body(api.response, v, api.is_flexible(v))
    if not decision.denied:
        return Response(req.correlation_id, body, broker.header_tags if broker else [])
    got: dict[str, list[dict[str, Any]]] = {}
    for t in body.get("topics") or []:
        got.setdefault(t.get("name") or "", []).append(t)
    denied = dict(decision.denied)
    out = []
    for i, t in enumerate((req.body or {}).get("topics") or []):
        if i in denied:
            out.append(_denied_topic(api, v, t))
        elif got.get(t.get("name") or ""):
            out.append(got[t.get("name") or ""].pop(0))
    out.extend(t for ts in got.values() for t in ts)
    body["topics"] = out
    return Response(req.correlation_id, body, broker.header_tags if broker else [])


def topic_errors(req: Request, resp: Response | None) -> dict[str, int]:
    """Per topic name, the first error code the answer carries (the record's error_code); key
    "" for the top-level error."""
    out: dict[str, int] = {}
    if resp is None:
        return out
    if isinstance(resp.body.get("error_code"), int):
        out[""] = resp.body["error_code"]
    for t in resp.body.get("topics") or []:
        name = t.get("name") or ""
        if name in out:
            continue
        codes = [t["error_code"]] if isinstance(t.get("error_code"), int) and t["error_code"] else []
        codes += [p.get("error_code", 0) for p in t.get("partitions") or [] if isinstance(p, dict)]
        out[name] = next((c for c in codes if c), 0)
    return out


def clamp_api_versions(body: dict[str, Any], keep_unknown: Callable[[int], bool]) -> dict[str, Any]:
    """The broker's ApiVersions answer limited to what the codec parses, so clients pick versions
    the proxy can judge; an API the codec does not know stays only when ``keep_unknown(key)``
    (the rules would let it pass unparsed)."""
    keys = []
    for k in body.get("api_keys") or []:
        api = API.get(k.get("api_key"))
        if api is None:
            if keep_unknown(k.get("api_key")):
                keys.append(k)
            continue
        lo, hi = max(k.get("min_version", 0), api.min), min(k.get("max_version", 0), api.max)
        if lo <= hi:
            keys.append({**k, "min_version": lo, "max_version": hi})
    return {**body, "api_keys": keys}
