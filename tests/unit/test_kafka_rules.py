"""PortRuleKafka semantics (truth table), validation with field paths, and the per-topic split of
requests and merge of answers, on frames captured from real clients."""

from __future__ import annotations

import copy

import pytest
from test_kafka_wire import FRAMES, find

from pilus.proxy.config import ConfigError, ProxyConfig
from pilus.proxy.kafka_rules import (
    CompiledKafkaRules,
    KafkaRuleError,
    compile_kafka_rules,
    decide,
    kafka_rule_from_dict,
    merge,
    topic_errors,
    validate_kafka_rule,
)
from pilus.proxy.kafka_schema import API
from pilus.proxy.kafka_wire import Request, decode_request, decode_response, encode_request, encode_response


def rules(*ds: dict) -> CompiledKafkaRules:
    return compile_kafka_rules([kafka_rule_from_dict(d, f"kafka[{i}]") for i, d in enumerate(ds)])


PRODUCE, FETCH, OFFSETS, METADATA, COMMIT, OFFSETFETCH, FINDCOORD, JOIN, HEARTBEAT = 0, 1, 2, 3, 8, 9, 10, 11, 12
CREATETOPICS, APIVERSIONS = 19, 18

# (rule, api key, version, client id, topic or None for a request without topics, allowed)
TRUTH = [
    ({"role": "produce"}, PRODUCE, 8, "c", "t", True),
    ({"role": "produce"}, METADATA, 8, "c", "t", True),
    ({"role": "produce"}, APIVERSIONS, 3, "c", None, True),
    ({"role": "produce"}, FETCH, 10, "c", "t", False),
    ({"role": "produce"}, FINDCOORD, 2, "c", None, False),
    ({"role": "consume"}, FETCH, 10, "c", "t", True),
    ({"role": "consume"}, OFFSETS, 5, "c", "t", True),
    ({"role": "consume"}, COMMIT, 7, "c", "t", True),
    ({"role": "consume"}, OFFSETFETCH, 5, "c", "t", True),
    ({"role": "consume"}, JOIN, 5, "c", None, True),
    ({"role": "consume"}, HEARTBEAT, 4, "c", None, True),
    ({"role": "consume"}, PRODUCE, 8, "c", "t", False),
    ({"role": "CONSUME"}, FETCH, 10, "c", "t", True),  # role and apiKey are case-insensitive, as in Cilium
    ({"apiKey": "produce"}, PRODUCE, 8, "c", "t", True),
    ({"apiKey": "produce"}, METADATA, 8, "c", "t", False),  # apiKey is that key alone
    ({"apiKey": "createtopics"}, CREATETOPICS, 4, "c", None, True),
    ({"apiKey": "Fetch"}, FETCH, 3, "c", "t", True),
    ({"apiKey": "produce", "apiVersion": "8"}, PRODUCE, 8, "c", "t", True),
    ({"apiKey": "produce", "apiVersion": "8"}, PRODUCE, 9, "c", "t", False),
    ({"apiVersion": "3"}, METADATA, 3, "c", "t", True),
    ({"apiVersion": "3"}, METADATA, 4, "c", "t", False),
    ({"clientID": "rdkafka"}, PRODUCE, 8, "rdkafka", "t", True),
    ({"clientID": "rdkafka"}, PRODUCE, 8, "rdkafka2", "t", False),
    ({"clientID": "rdkafka"}, PRODUCE, 8, None, "t", False),
    ({"topic": "t"}, PRODUCE, 8, "c", "t", True),
    ({"topic": "t"}, PRODUCE, 8, "c", "t2", False),
    ({"topic": "t"}, FETCH, 8, "c", "T", False),  # exact, case-sensitive
    ({"topic": "t"}, HEARTBEAT, 4, "c", None, True),  # no topics in the request: topic not checked
    ({"role": "produce", "topic": "t"}, PRODUCE, 8, "c", "t", True),
    ({"role": "produce", "topic": "t"}, PRODUCE, 8, "c", "u", False),
    ({"role": "produce", "topic": "t", "clientID": "x"}, PRODUCE, 8, "y", "t", False),
    ({}, CREATETOPICS, 1, "c", "anything", True),
]


@pytest.mark.parametrize("rule,key,version,cid,topic,allowed", TRUTH)
def test_truth_table(rule, key, version, cid, topic, allowed):
    assert rules(rule).allows(key, version, cid, topic) is allowed


def test_any_rule_allows():
    r = rules({"role": "produce", "topic": "a"}, {"role": "consume", "topic": "b"})
    assert r.allows(PRODUCE, 8, "c", "a") and r.allows(FETCH, 10, "c", "b")
    assert not r.allows(PRODUCE, 8, "c", "b") and not r.allows(FETCH, 10, "c", "a")


def test_empty_lists_allow_everything_and_no_ruleset_denies():
    for r in (compile_kafka_rules([]), rules({})):
        assert r.allow_all and r.allows(42, 1, None, "x") and r.allows_opaque(71, 0, None)
    nothing = CompiledKafkaRules()
    assert not nothing.allows(APIVERSIONS, 3, "c", None) and not nothing.allows_opaque(71, 0, "c")
    assert CompiledKafkaRules.union([nothing, rules({})]).allow_all


def test_opaque_requests_need_a_rule_without_topic():
    assert rules({"apiKey": "createtopics"}).allows_opaque(CREATETOPICS, 4, "c")
    assert not rules({"apiKey": "createtopics", "topic": "t"}).allows_opaque(CREATETOPICS, 4, "c")
    assert not rules({"role": "consume"}).allows_opaque(71, 0, "c")  # telemetry is no role's
    assert rules({"role": "consume"}).allows_opaque(FETCH, 16, "c")
    assert not rules({"role": "consume", "apiVersion": "12"}).allows_opaque(FETCH, 16, "c")


@pytest.mark.parametrize("d,msg", [
    ({"role": "produce", "apiKey": "fetch"}, "kafka[0]: role and apiKey are exclusive"),
    ({"role": "admin"}, "kafka[0].role: unknown role 'admin'"),
    ({"apiKey": "bogus"}, "kafka[0].apiKey: unknown API key 'bogus'"),
    ({"apiVersion": "v1"}, "kafka[0].apiVersion: must be a decimal number"),
    ({"apiVersion": "99999"}, "kafka[0].apiVersion: must be a decimal number"),
    ({"topic": "a b"}, "kafka[0].topic: 'a b' is not a Kafka topic name"),
    ({"topic": "x" * 250}, "kafka[0].topic: "),
    ({"topic": "ü"}, "kafka[0].topic: "),
    ({"topic": 3}, "kafka[0].topic: must be a string"),
    ({"topics": "a"}, "kafka[0].topics: unknown field"),
    ("produce", "kafka[0]: must be an object"),
])
def test_validation_names_the_field(d, msg):
    with pytest.raises(KafkaRuleError) as e:
        validate_kafka_rule(d, "kafka[0]")
    assert str(e.value).startswith(msg) and isinstance(e.value, ValueError)
    validate_kafka_rule({"topic": "x" * 249, "apiKey": "produce", "apiVersion": "0", "clientID": "a b"}, "k")


def _listener(**extra):
    return {"listeners": [{"port": 15003, "direction": "ingress", "protocol": "kafka",
                           "rules": [{"peers": [5], **extra}]}]}


def test_config_kafka_listener():
    cfg = ProxyConfig.from_dict(_listener(kafka=[{"role": "produce", "topic": "t"}]))
    lst = cfg.listeners[0]
    assert lst.protocol == "kafka"
    r, _ = lst.select_kafka("10.0.0.1", 9092, 5)
    assert r.allows(PRODUCE, 8, "c", "t") and not r.allows(PRODUCE, 8, "c", "u")
    r, endpoint = lst.select_kafka("10.0.0.1", 9092, 6)  # no rule set for this peer
    assert not r.allows(APIVERSIONS, 3, "c", None) and endpoint is None
    assert ProxyConfig.from_dict({"listeners": [{"port": 1, "direction": "egress"}]}).listeners[0].protocol == "http"


@pytest.mark.parametrize("cfg,msg", [
    (_listener(kafka=[{"topic": "a/b"}]), "listeners[0].rules[0].kafka[0].topic: "),
    (_listener(kafka={"role": "produce"}), "listeners[0].rules[0].kafka: must be a list"),
    (_listener(http=[{"method": "GET"}]), "listeners[0].rules[0].http: not on a kafka listener"),
    ({"listeners": [{"port": 1, "direction": "ingress", "rules": [{"kafka": []}]}]},
     "listeners[0].rules[0].kafka: not on a http listener"),
    ({"listeners": [{"port": 1, "direction": "ingress", "protocol": "dns"}]},
     "listeners[0].protocol: must be http or kafka"),
])
def test_config_errors(cfg, msg):
    with pytest.raises(ConfigError) as e:
        ProxyConfig.from_dict(cfg)
    assert str(e.value).startswith(msg), str(e.value)


def _two_topics(client: str, key: int, version: int) -> Request:
    """A captured request with a second topic added (a copy of the first, renamed)."""
    req = next(r for f in FRAMES if (f["direction"], f["client"], f["api_key"], f["api_version"], f["pass"])
               == ("request", client, key, version, "clamped")
               and (r := decode_request(bytes.fromhex(f["hex"])[4:])).body["topics"])
    extra = copy.deepcopy(req.body["topics"][0])
    extra["name"] = "denied-topic"
    req.body["topics"] = [extra, req.body["topics"][0]]
    return req


@pytest.mark.parametrize("client,key,version", [
    ("kafka-python", PRODUCE, 8), ("confluent-kafka", PRODUCE, 10),  # v10: flexible
    ("kafka-python", FETCH, 10), ("confluent-kafka", FETCH, 12),
    ("kafka-python", OFFSETS, 5), ("kafka-python", METADATA, 8), ("confluent-kafka", METADATA, 12),
    ("kafka-python", COMMIT, 7), ("confluent-kafka", COMMIT, 9), ("kafka-python", OFFSETFETCH, 5),
    ("confluent-kafka", OFFSETFETCH, 7),
])
def test_split_and_merge(client, key, version):
    req = _two_topics(client, key, version)
    allowed = req.body["topics"][1]["name"]
    d = decide(req, rules({"topic": allowed}))
    assert d.topics == [("denied-topic", False), (allowed, True)]
    # upstream gets the allowed topic only, same correlation id, and it encodes
    fwd = decode_request(encode_request(d.forward)[4:])
    assert [t["name"] for t in fwd.body["topics"]] == [allowed] and fwd.correlation_id == req.correlation_id
    # the broker's (captured) answer merged with the denied slot, in request order
    broker = decode_response(key, version, find("response", client, key, version)[4:])
    broker.correlation_id = req.correlation_id
    merged = decode_response(key, version, encode_response(key, version, merge(req, d, broker))[4:])
    names = [t["name"] for t in merged.body["topics"]]
    assert names[0] == "denied-topic" and allowed in names[1:]
    errs = topic_errors(req, merged)
    assert errs["denied-topic"] == 29 and errs[allowed] == 0
    denied = merged.body["topics"][0]
    if key == METADATA:
        assert denied["error_code"] == 29 and denied["partitions"] == []
    else:
        assert [p["error_code"] for p in denied["partitions"]] == [29] * len(req.body["topics"][0]["partitions"])


def test_all_topics_denied_is_answered_by_the_proxy():
    req = _two_topics("kafka-python", PRODUCE, 8)
    d = decide(req, rules({"topic": "elsewhere"}))
    assert d.forward is None and d.local is not None and not d.expects_response
    resp = decode_response(PRODUCE, 8, encode_response(PRODUCE, 8, d.local)[4:])
    assert resp.correlation_id == req.correlation_id
    assert [t["name"] for t in resp.body["topics"]] == [t["name"] for t in req.body["topics"]]
    assert all(p["error_code"] == 29 and p["base_offset"] == -1 for t in resp.body["topics"] for p in t["partitions"])


def test_acks_zero_produce_gets_no_answer():
    req = _two_topics("kafka-python", PRODUCE, 8)
    req.body["acks"] = 0
    assert decide(req, rules({"topic": "elsewhere"})).local is None
    d = decide(req, rules({"topic": req.body["topics"][1]["name"]}))
    assert d.forward is not None and not d.expects_response


def test_metadata_all_denied_still_asks_the_broker_for_brokers():
    req = decode_request(find("request", "kafka-python", METADATA, 8)[4:])
    req.body["topics"] = [{"name": "secret", "_tags": []}] if "_tags" in req.body else [{"name": "secret"}]
    d = decide(req, rules({"topic": "other"}))
    assert d.forward is not None and d.forward.body["topics"] == [] and d.denied
    v0 = Request(METADATA, 0, 5, "c", [], {"topics": [{"name": "secret"}]})
    d0 = decide(v0, rules({"topic": "other"}))  # in v0 an empty list would mean all topics
    assert d0.forward is None and d0.local.body["topics"][0]["error_code"] == 29


def test_metadata_for_all_topics_is_topicless():
    req = decode_request(find("request", "kafka-python", METADATA, 8)[4:])
    req.body["topics"] = None
    assert decide(req, rules({"role": "produce", "topic": "t"})).forward is req


@pytest.mark.parametrize("key,version,body,err", [
    (HEARTBEAT, 4, {"group_id": "g", "generation_id": 1, "member_id": "m", "group_instance_id": None}, 30),
    (FINDCOORD, 2, {"key": "g", "key_type": 0}, 30),
    (JOIN, 5, {"group_id": "g", "protocols": []}, 30),
    (APIVERSIONS, 3, {"client_software_name": "x", "client_software_version": "1"}, 31),
    (22, 4, {"transactional_id": None, "transaction_timeout_ms": 1}, 31),
    (22, 4, {"transactional_id": "tx", "transaction_timeout_ms": 1}, 53),
    (OFFSETFETCH, 5, {"group_id": "g", "topics": None}, 30),
])
def test_topicless_denials_carry_the_apis_authorization_error(key, version, body, err):
    req = Request(key, version, 77, "c", [], body)
    d = decide(req, rules({"apiKey": "produce"}))
    assert d.forward is None and d.topics == [("", False)]
    resp = decode_response(key, version, encode_response(key, version, d.local)[4:])
    assert resp.correlation_id == 77 and resp.body["error_code"] == err


def test_every_api_in_both_roles_is_parsed():
    from pilus.proxy.kafka_rules import ROLE_KEYS

    assert ROLE_KEYS["produce"] | ROLE_KEYS["consume"] <= set(API)
