"""Untrusted bytes never crash the Kafka codec (only KafkaCodecError comes out), and a kafka
listener fed garbage closes that connection, counts a parse error and keeps serving."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_kafka_wire import FRAMES, covered
from test_proxy_support import ProxyThread, free_port

from pilus.proxy.kafka_rules import compile_kafka_rules, decide, kafka_rule_from_dict, merge
from pilus.proxy.kafka_schema import API
from pilus.proxy.kafka_wire import (
    MAX_FRAME,
    FrameReader,
    KafkaCodecError,
    Request,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    frame,
)

CAPTURED = [f for f in FRAMES if covered(f)]
VERSIONS = [(k, v) for k, a in API.items() for v in range(a.min, a.max + 1)]


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


@given(data=st.binary(max_size=400))
@settings(max_examples=500)
def test_random_request_bodies(data):
    try:
        req = decode_request(data)
    except KafkaCodecError:
        return
    assert encode_request(req)[4:] == data or req.known  # a parsed body re-encodes (maybe canonically)


@given(f=st.sampled_from(CAPTURED), edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                   max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 2000)))
@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_captured_frames(f, edits, cut):
    body = _mutate(bytes.fromhex(f["hex"])[4:], edits, cut)
    try:
        if f["direction"] == "request":
            req = decode_request(body)
            if req.known:  # what decodes is judged and re-encoded without surprises
                d = decide(req, compile_kafka_rules([kafka_rule_from_dict({"topic": "cap-a"}, "r")]))
                if d.forward is not None:
                    encode_request(d.forward)
                if d.local is not None:
                    encode_response(req.api_key, req.api_version, d.local)
        else:
            resp = decode_response(f["api_key"], f["api_version"], body)
            encode_response(f["api_key"], f["api_version"], resp)
    except KafkaCodecError:
        pass


@given(kv=st.sampled_from(VERSIONS), data=st.binary(max_size=300))
@settings(max_examples=500)
def test_random_responses_for_every_version(kv, data):
    key, version = kv
    try:
        resp = decode_response(key, version, data)
    except KafkaCodecError:
        return
    assert encode_response(key, version, resp)[4:] == data  # what parses is exactly what was sent


@given(kv=st.sampled_from([(k, v) for k, v in VERSIONS if API[k].topics is not None]), data=st.binary(max_size=300))
@settings(max_examples=300)
def test_merge_with_any_broker_answer(kv, data):
    """A broker answer of any shape merged with denied topics still encodes."""
    key, version = kv
    try:
        broker = decode_response(key, version, data)
    except KafkaCodecError:
        return
    flex = API[key].is_flexible(version)
    topic = {"name": "denied", "partitions": [0, 1] if API[key].topics.parts_are_ints else [{"partition": 0}]}
    if flex:
        topic["_tags"] = []
    req = Request(key, version, broker.correlation_id, "c", [], {"topics": [topic]})
    d = decide(req, compile_kafka_rules([kafka_rule_from_dict({"topic": "other"}, "r")]))
    merged = merge(req, d, broker)
    again = decode_response(key, version, encode_response(key, version, merged)[4:])
    assert again.body["topics"][0]["name"] == "denied"


@given(chunks=st.lists(st.binary(max_size=40), max_size=10))
@example(chunks=[struct.pack(">i", -1)])
@example(chunks=[struct.pack(">i", MAX_FRAME + 1)])
@example(chunks=[b"\0\0", b"\0\x08", b"12345678"])
@settings(max_examples=400)
def test_frame_reader(chunks):
    r = FrameReader()
    got = []
    try:
        for c in chunks:
            got += r.feed(c)
    except KafkaCodecError:
        return
    data = b"".join(chunks)
    assert b"".join(frame(g) for g in got) + data[len(data) - r.pending:] == data


# -- the running proxy: garbage closes one connection, the listener keeps serving

HEARTBEAT_V4 = Request(12, 4, 5, "fuzz", [], {"group_id": "g", "generation_id": 1, "member_id": "m",
                                              "group_instance_id": None, "_tags": []})


@pytest.fixture(scope="module")
def proxy():
    port = free_port()
    cfg = {"listeners": [{"name": "k", "port": port, "address": "127.0.0.1", "direction": "ingress",
                          "protocol": "kafka", "transparent": False, "upstream": f"127.0.0.1:{free_port()}",
                          "rules": [{"kafka": [{"role": "produce", "topic": "t"}]}]}]}
    p = ProxyThread(cfg)
    p.port = port
    yield p
    p.close()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _heartbeat_answer(port: int) -> int:
    """A denied Heartbeat is answered by the proxy itself: the error code it carries."""
    out = _exchange(port, encode_request(HEARTBEAT_V4))
    return decode_response(12, 4, FrameReader().feed(out)[0]).body["error_code"]


@given(data=st.one_of(st.binary(max_size=200), st.sampled_from(CAPTURED).map(lambda f: bytes.fromhex(f["hex"])[:-3])))
@example(data=struct.pack(">i", MAX_FRAME + 1) + b"x" * 16)
@example(data=struct.pack(">i", -5) + b"x" * 16)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_listener_survives_garbage(proxy, data, caplog):
    before = proxy.server.status()["listeners"][0]["parse_errors"]
    with caplog.at_level(logging.ERROR, logger="pilus.proxy"):
        _exchange(proxy.port, data)
        assert _heartbeat_answer(proxy.port) == 30  # GROUP_AUTHORIZATION_FAILED, from the proxy
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no "connection failed" traceback
    assert proxy.server.status()["listeners"][0]["parse_errors"] >= before


def test_oversized_and_unparsable_frames_count_parse_errors(proxy):
    lst = lambda: proxy.server.status()["listeners"][0]  # noqa: E731
    before = lst()["parse_errors"]
    assert _exchange(proxy.port, struct.pack(">i", MAX_FRAME + 1) + b"x" * 8) == b""
    assert _exchange(proxy.port, frame(struct.pack(">hhih", 71, 0, 1, -1))) == b""  # no rule lets 71 pass
    assert _exchange(proxy.port, encode_request(HEARTBEAT_V4)[:-2]) == b""  # truncated at EOF
    assert lst()["parse_errors"] == before + 3
    # pipelined: two denials answered in order, same correlation ids, one connection
    two = encode_request(HEARTBEAT_V4) + encode_request(Request(**{**HEARTBEAT_V4.__dict__, "correlation_id": 6}))
    got = FrameReader().feed(_exchange(proxy.port, two))
    assert [decode_response(12, 4, g).correlation_id for g in got] == [5, 6]
    recs = [r for r in proxy.sink.records if r["kafka"]["correlation_id"] in (5, 6)]
    assert recs and all(r["verdict"] == "DENIED" and r["kafka"]["api_key"] == "heartbeat"
                        and r["kafka"]["error_code"] == 30 and r["l7"] == "kafka" for r in recs)


def test_reload_applies_to_an_open_connection():
    """Deny first; after a reload to allow-all the next request on the same connection goes
    upstream (nothing listens there: the request is recorded ERROR and the connection closes)."""
    from pilus.proxy.config import ProxyConfig

    port = free_port()

    def cfg(kafka):
        return {"listeners": [{"name": "k", "port": port, "address": "127.0.0.1", "direction": "ingress",
                               "protocol": "kafka", "transparent": False, "upstream": f"127.0.0.1:{free_port()}",
                               "rules": [{"kafka": kafka}]}]}

    p = ProxyThread(cfg([{"role": "produce"}]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_request(HEARTBEAT_V4))
            reader = FrameReader()
            got: list[bytes] = []
            while not got:
                got += reader.feed(s.recv(65536))
            assert decode_response(12, 4, got[0]).body["error_code"] == 30
            p.call(p.server.reload(ProxyConfig.from_dict(cfg([]))))
            s.sendall(encode_request(Request(**{**HEARTBEAT_V4.__dict__, "correlation_id": 8})))
            assert s.recv(65536) == b""  # closed: the upstream is unreachable
        lst = p.server.status()["listeners"][0]
        assert lst["denied"] == 1 and lst["upstream_errors"] == 1
        assert [r["verdict"] for r in p.sink.records] == ["DENIED", "ERROR"]
    finally:
        p.close()


def test_a_v0_api_versions_answer_is_clamped_too():
    """A broker that does not speak the client's ApiVersions version answers in v0 (error 35 and
    its versions); the proxy clamps that list as well. The broker here is a socket that answers
    that one frame."""
    import threading

    from pilus.proxy.kafka_schema import API

    srv = socket.create_server(("127.0.0.1", 0))
    keys = [(0, 0, 11), (1, 0, 17), (18, 0, 3), (71, 0, 0)]
    answer = struct.pack(">ihi", 0, 35, len(keys)) + b"".join(struct.pack(">hhh", *k) for k in keys)

    def broker():
        conn, _ = srv.accept()
        with conn:
            r = FrameReader()
            got: list[bytes] = []
            while not got:
                got += r.feed(conn.recv(65536))
            conn.sendall(frame(got[0][4:8] + answer[4:]))  # the request's correlation id
            conn.recv(1)

    t = threading.Thread(target=broker, daemon=True)
    t.start()
    port = free_port()
    p = ProxyThread({"listeners": [{"name": "k", "port": port, "address": "127.0.0.1", "direction": "ingress",
                                    "protocol": "kafka", "transparent": False,
                                    "upstream": f"127.0.0.1:{srv.getsockname()[1]}",
                                    "rules": [{"kafka": [{"role": "consume"}]}]}]})
    try:
        req = Request(18, 3, 41, "c", [], {"client_software_name": "c", "client_software_version": "1", "_tags": []})
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(encode_request(req))
            r, got = FrameReader(min_frame=4), []
            while not got:
                got += r.feed(s.recv(65536))
        resp = decode_response(18, 0, got[0])
        assert resp.correlation_id == 41 and resp.body["error_code"] == 35
        assert [(k["api_key"], k["min_version"], k["max_version"]) for k in resp.body["api_keys"]] == [
            (0, 0, API[0].max), (1, 0, API[1].max), (18, 0, 3)]  # 71: no rule lets it pass unparsed
    finally:
        p.close()
        srv.close()
        t.join(5)
