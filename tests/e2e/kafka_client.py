"""A real Kafka client run by tests/e2e/test_kafka_proxy.py inside a namespace; prints one JSON line.

    kafka_client.py LIB BOOTSTRAP produce TOPIC[,TOPIC...] VALUE [AGAIN_TOPIC]
    kafka_client.py LIB BOOTSTRAP consume TOPIC [AGAIN_TOPIC]
    kafka_client.py raw BOOTSTRAP probe -    (hand-made frames, see raw_probe)

LIB is kafka-python or confluent-kafka. produce sends VALUE to every topic in one batch (one
flush) and reports per topic the offset or the Kafka error code; consume reads partition 0 from
offset 0 and reports the values or the error code. AGAIN_TOPIC: afterwards, the same client (same
connection) does the same once more on that topic, to show a denial left the connection usable.
"""

from __future__ import annotations

import json
import sys

TIMEOUT = 20


def _kp_code(e: BaseException) -> int:
    return int(getattr(e, "errno", -1) or -1)


def kp_produce(bootstrap: str, topics: list[str], value: bytes, again: str | None) -> dict:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, client_id="kp-e2e", linger_ms=60000, retries=0,
                      max_block_ms=TIMEOUT * 1000, request_timeout_ms=TIMEOUT * 1000)
    try:
        out = _kp_send(p, topics, value)
        if again:  # the same producer: the same broker connection
            out[f"again:{again}"] = _kp_send(p, [again], value)[again]
        return out
    finally:
        p.close(timeout=5)


def _kp_send(p, topics: list[str], value: bytes) -> dict:
    out: dict[str, dict] = {}
    futures = {}
    for t in topics:
        try:
            futures[t] = p.send(t, value, partition=0)
        except Exception as e:  # metadata denied: the send fails before any produce request
            out[t] = {"error": _kp_code(e), "kind": type(e).__name__}
    p.flush(timeout=TIMEOUT)  # every batch of this call goes in one produce request
    for t, fut in futures.items():
        try:
            out[t] = {"offset": fut.get(timeout=TIMEOUT).offset}
        except Exception as e:
            out[t] = {"error": _kp_code(e), "kind": type(e).__name__}
    return out


def kp_consume(bootstrap: str, topic: str, again: str | None) -> dict:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, client_id="kp-e2e", enable_auto_commit=False,
                      request_timeout_ms=TIMEOUT * 1000)
    try:
        out = {topic: _kp_read(c, TopicPartition(topic, 0))}
        if again:
            out[again] = _kp_read(c, TopicPartition(again, 0))
        return out
    finally:
        c.close()


def _kp_read(c, tp) -> dict:
    c.assign([tp])
    c.seek(tp, 0)
    values: list[str] = []
    try:
        for _ in range(20):
            for msgs in c.poll(timeout_ms=500).values():
                values += [m.value.decode() for m in msgs]
            if values:
                break
    except Exception as e:
        return {"error": _kp_code(e), "kind": type(e).__name__}
    if not values and tp.topic in c._client.cluster.unauthorized_topics:
        # an assigned partition whose metadata came back with TopicAuthorizationFailed: the
        # client keeps it unfetched and notes the topic instead of raising
        return {"error": 29, "kind": "metadata"}
    return {"values": values}


def ck_produce(bootstrap: str, topics: list[str], value: bytes) -> dict:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "client.id": "ck-e2e", "linger.ms": 100,
                  "message.timeout.ms": TIMEOUT * 1000, "retries": 0})
    out: dict[str, dict] = {}

    def report(err, msg):
        out[msg.topic()] = {"error": err.code()} if err else {"offset": msg.offset()}

    for t in topics:
        p.produce(t, value, partition=0, on_delivery=report)
    p.flush(TIMEOUT)
    return {"p": p, "out": out}


def ck_consume(bootstrap: str, topic: str, again: str | None) -> dict:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "client.id": "ck-e2e", "group.id": "ck-e2e",
                  "enable.auto.commit": False})
    try:
        out = {topic: _ck_read(c, TopicPartition(topic, 0, 0))}
        if again:
            out[again] = _ck_read(c, TopicPartition(again, 0, 0))
        return out
    finally:
        c.close()


def _ck_read(c, tp) -> dict:
    c.assign([tp])
    values: list[str] = []
    errors: list[int] = []
    for _ in range(40):
        m = c.poll(0.5)
        if m is None:
            if values:
                break
            continue
        if m.error():
            # a group error (the consumer's FindCoordinator denied: 30) comes on its own;
            # the partition's own error (29 from the fetch) is the one that ends the read
            errors.append(m.error().code())
            if m.error().code() == 29:
                break
            continue
        values.append(m.value().decode())
    c.unassign()
    if not values and errors:
        return {"error": 29 if 29 in errors else errors[0], "errors": errors}
    return {"values": values}


def raw_probe(bootstrap: str) -> dict:
    """On one connection: ApiVersions v3 (the answer the proxy clamped), GetTelemetrySubscriptions
    v0 (an API the codec does not parse), ApiVersions v9 (newer than the codec); each answer's
    correlation id and what it says. A closed connection ends the probe."""
    import socket

    from pilus.proxy.kafka_wire import MIN_RESPONSE, FrameReader, Request, decode_response, encode_request, frame

    host, port = bootstrap.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    reader = FrameReader(min_frame=MIN_RESPONSE)
    ready: list[bytes] = []

    def answer() -> bytes | None:
        while not ready:
            data = s.recv(65536)
            if not data:
                return None
            ready.extend(reader.feed(data))
        return ready.pop(0)

    out: dict = {}
    s.sendall(encode_request(Request(18, 3, 1, "raw", [], {"client_software_name": "raw",
                                                           "client_software_version": "1", "_tags": []})))
    a = answer()
    if a is None:
        return {"closed_at": "apiversions"}
    body = decode_response(18, 3, a).body
    out["apiversions"] = {"error_code": body["error_code"],
                          "max": {k["api_key"]: k["max_version"] for k in body["api_keys"]}}
    # GetTelemetrySubscriptions v0: header v2 (client id, no tags), client_instance_id (16 zero bytes), no tags
    s.sendall(frame(b"\0\x47\0\0\0\0\0\x02\0\x03raw\0" + bytes(16) + b"\0"))
    a = answer()
    if a is None:
        return {**out, "closed_at": "telemetry"}
    out["telemetry"] = {"correlation_id": int.from_bytes(a[:4], "big"), "size": len(a)}
    s.sendall(frame(b"\0\x12\0\x09\0\0\0\x03\0\x03raw\0\0\0\0"))
    a = answer()
    if a is None:
        return {**out, "closed_at": "apiversions-v9"}
    v0 = decode_response(18, 0, a)
    out["apiversions_v9"] = {"correlation_id": v0.correlation_id, "error_code": v0.body["error_code"],
                             "api_keys": v0.body["api_keys"]}
    s.close()
    return out


def main(argv: list[str]) -> int:
    lib, bootstrap, op, what = argv[:4]
    if lib == "raw":
        print(json.dumps(raw_probe(bootstrap)), flush=True)
        return 0
    if op == "produce":
        topics, value = what.split(","), argv[4].encode()
        again = argv[5] if len(argv) > 5 else None
        if lib == "kafka-python":
            out = kp_produce(bootstrap, topics, value, again)
        else:
            first = ck_produce(bootstrap, topics, value)
            out = first["out"]
            if again:  # the same producer instance: the same broker connection
                p = first["p"]
                p.produce(again, value, partition=0, on_delivery=lambda err, msg: out.__setitem__(
                    f"again:{again}", {"error": err.code()} if err else {"offset": msg.offset()}))
                p.flush(TIMEOUT)
    else:
        again = argv[4] if len(argv) > 4 else None
        out = (kp_consume if lib == "kafka-python" else ck_consume)(bootstrap, what, again)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
