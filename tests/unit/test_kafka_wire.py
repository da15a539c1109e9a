"""The Kafka codec against frames captured from real clients (kafka-python 2.x, confluent-kafka /
librdkafka 2.16) talking to a tansu broker (tests/unit/data/capture_kafka.py recorded them):
they decode to the expected fields and encode back byte for byte."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pilus.proxy.kafka_rules import clamp_api_versions
from pilus.proxy.kafka_schema import API
from pilus.proxy.kafka_wire import (
    MAX_FRAME,
    MIN_RESPONSE,
    FrameReader,
    KafkaCodecError,
    Request,
    Response,
    decode_request,
    decode_response,
    default_body,
    encode_request,
    encode_response,
    frame,
)

FRAMES = json.loads((Path(__file__).parent / "data" / "kafka_frames.json").read_text())


def covered(f: dict) -> bool:
    api = API.get(f["api_key"])
    return api is not None and api.min <= f["api_version"] <= api.max


def find(direction: str, client: str, key: int, version: int | None = None, pass_: str = "clamped") -> bytes:
    for f in FRAMES:
        if (f["direction"], f["client"], f["api_key"], f["pass"]) == (direction, client, key, pass_) and (
                version is None or f["api_version"] == version):
            return bytes.fromhex(f["hex"])
    raise LookupError((direction, client, key, version))


def _id(f: dict) -> str:
    return f"{f['pass']}-{f['client']}-{f['direction']}-{f['api_key']}v{f['api_version']}"


def test_the_captures_cover_the_apis_both_clients_use():
    seen = {(f["client"], f["api_key"]) for f in FRAMES if f["pass"] == "clamped" and covered(f)}
    for key in (0, 1, 3, 8, 9, 10, 18):
        assert ("kafka-python", key) in seen and ("confluent-kafka", key) in seen, key
    assert {("kafka-python", 2), ("kafka-python", 11), ("kafka-python", 13), ("confluent-kafka", 22)} <= seen
    # flexible versions are among them (compact types, tagged fields)
    assert any(API[f["api_key"]].is_flexible(f["api_version"]) for f in FRAMES if covered(f)
               and f["api_key"] != 18)


@pytest.mark.parametrize("f", [f for f in FRAMES if f["direction"] == "request"], ids=_id)
def test_requests_round_trip(f):
    data = bytes.fromhex(f["hex"])
    req = decode_request(data[4:])
    assert (req.api_key, req.api_version) == (f["api_key"], f["api_version"])
    assert req.known == covered(f)  # beyond the schemas (Fetch v16, OffsetFetch v9): opaque
    assert encode_request(req) == data


@pytest.mark.parametrize("f", [f for f in FRAMES if f["direction"] == "response" and covered(f)], ids=_id)
def test_responses_round_trip(f):
    data = bytes.fromhex(f["hex"])
    resp = decode_response(f["api_key"], f["api_version"], data[4:])
    assert encode_response(f["api_key"], f["api_version"], resp) == data


def test_produce_request_fields():
    req = decode_request(find("request", "kafka-python", 0, 8)[4:])
    assert req.client_id == "kafka-python-cap" and req.correlation_id > 0
    assert req.body["acks"] == 1 and req.body["transactional_id"] is None
    [topic] = req.body["topics"]
    assert topic["name"] in ("cap-a", "cap-b") and topic["partitions"][0]["partition"] == 0
    assert b"hello-" in topic["partitions"][0]["records"]  # the record batch, kept as bytes
    # librdkafka's v10 is flexible: header v2 with tagged fields, compact strings
    flex = decode_request(find("request", "confluent-kafka", 0, 10)[4:])
    assert flex.client_id == "rdkafka-cap" and flex.header_tags == [] and "_tags" in flex.body
    assert flex.body["topics"][0]["name"] in ("cap-a", "cap-b")


def test_produce_response_fields():
    resp = decode_response(0, 8, find("response", "kafka-python", 0, 8)[4:])
    part = resp.body["topics"][0]["partitions"][0]
    assert part["error_code"] == 0 and part["base_offset"] >= 0


def test_fetch_metadata_and_group_fields():
    fetch = decode_request(find("request", "confluent-kafka", 1, 12)[4:])
    assert API[1].is_flexible(12) and fetch.body["topics"][0]["name"] == "cap-a"
    assert fetch.body["topics"][0]["partitions"][0]["fetch_offset"] == 0
    resp = decode_response(1, 10, find("response", "kafka-python", 1, 10)[4:])
    p = resp.body["topics"][0]["partitions"][0]
    assert p["error_code"] == 0 and b"hello-a" in p["records"]
    md = decode_response(3, 12, find("response", "confluent-kafka", 3, 12)[4:])
    assert md.body["brokers"][0]["port"] > 0
    fc = decode_request(find("request", "kafka-python", 10)[4:])
    assert fc.body["key"].startswith("capgroup")
    join = decode_request(find("request", "kafka-python", 11, 5)[4:])
    assert join.body["group_id"] == "capgroup3" and join.body["protocol_type"] == "consumer"
    commit = decode_request(find("request", "confluent-kafka", 8, 9)[4:])
    assert commit.body["topics"][0]["partitions"][0]["committed_offset"] >= 1


def test_api_versions_header_v0_and_clamp():
    data = find("response", "confluent-kafka", 18, 3, pass_="native")
    resp = decode_response(18, 3, data[4:])
    assert resp.header_tags == []  # ApiVersions answers with response header v0 even when flexible
    native = {k["api_key"]: k["max_version"] for k in resp.body["api_keys"]}
    assert native[1] > API[1].max  # the broker offers Fetch with topic ids
    clamped = clamp_api_versions(resp.body, lambda key: False)
    got = {k["api_key"]: (k["min_version"], k["max_version"]) for k in clamped["api_keys"]}
    assert set(got) <= set(API) and got[1][1] == API[1].max and got[0][1] <= API[0].max
    again = decode_response(18, 3, encode_response(18, 3, Response(resp.correlation_id, clamped))[4:])
    assert again.body["api_keys"] == clamped["api_keys"]
    kept = clamp_api_versions(resp.body, lambda key: key == 71)
    assert 71 in {k["api_key"] for k in kept["api_keys"]}  # an unknown API the rules let pass unparsed


@pytest.mark.parametrize("key", sorted(API))
def test_every_version_of_every_api_encodes_and_decodes(key):
    """The bodies the proxy builds itself (denials, merged answers) in each version it speaks."""
    api = API[key]
    for v in range(api.min, api.max + 1):
        flex = api.is_flexible(v)
        body = default_body(api.response, v, flex)
        data = encode_response(key, v, Response(7, body))
        assert decode_response(key, v, data[4:]).body == body, v
        req = Request(key, v, 9, "cid", [], default_body(api.request, v, flex))
        got = decode_request(encode_request(req)[4:])
        assert (got.body, got.client_id, got.correlation_id) == (req.body, "cid", 9), v


def test_frames_split_across_feeds():
    data = b"".join(bytes.fromhex(f["hex"]) for f in FRAMES[:6])
    r = FrameReader()
    out = []
    for i in range(0, len(data), 7):
        out += r.feed(data[i:i + 7])
    assert out == [bytes.fromhex(f["hex"])[4:] for f in FRAMES[:6]] and r.pending == 0
    r.feed(data[:10])
    assert r.pending == 10  # a truncated frame is visible at EOF


@pytest.mark.parametrize("size", [-1, -(2**31), 0, 7, MAX_FRAME + 1, 2**31 - 1])
def test_bad_frame_sizes_are_refused(size):
    with pytest.raises(KafkaCodecError, match="frame size"):
        FrameReader().feed(struct.pack(">i", size) + b"x" * 8)


def test_responses_may_be_shorter_than_requests():
    six = frame(b"\0\0\0\x05\0\x1e")  # Heartbeat v0: correlation id and error code
    with pytest.raises(KafkaCodecError):
        FrameReader().feed(six)
    [body] = FrameReader(min_frame=MIN_RESPONSE).feed(six)
    assert decode_response(12, 0, body).body == {"error_code": 30}


def test_the_limit_itself_is_allowed():
    r = FrameReader()
    assert r.feed(struct.pack(">i", MAX_FRAME)) == [] and r.pending == 4


def test_bad_bodies_raise_the_codec_error():
    good = find("request", "kafka-python", 0, 8)[4:]
    with pytest.raises(KafkaCodecError):
        decode_request(good[:-3])  # truncated
    with pytest.raises(KafkaCodecError, match="bytes after"):
        decode_request(good + b"\0")
    with pytest.raises(KafkaCodecError):
        decode_response(0, 8, b"\0\0")
    with pytest.raises(KafkaCodecError, match="no schema"):
        decode_response(71, 0, b"\0\0\0\1")
    assert frame(b"abc") == b"\0\0\0\3abc"
