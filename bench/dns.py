"""DNS through the agent's DNS proxy vs the same pods with an L4-only rule, and the time
from a DNS answer to an allowed connection (toFQDNs). One run, side by side.

    python -m bench.dns [--rounds 3] [--duration 3] [--inflight 16] [--names 40] [--json FILE]

One one-node cluster (pods 10.223.0.0/16, underlay 172.31.235.0/24). kube-system/dns runs
dnsmasq (cache on, every name of bench.test answered from a hosts file). Two client pods:
`l4` may reach the DNS pod on port 53 at L4 only (no redirect); `l7` has `rules.dns`
(matchPattern `*.bench.test`) on port 53, so every query goes through the proxy, plus
toFQDNs `*.bench.test` on port 8443. A namespace outside the cluster holds the addresses
the names resolve to (one per name) and a TCP server on 8443.

- `qps`: a UDP load client in the pod keeps --inflight queries outstanding for --duration
  seconds over --names names: answers/s and p99 latency, for `l4` and `l7`.
- `first connection`: from `l7`, for each of --names fresh names, query then connect at
  once to the new address: the connect must pass the first time (the answer was held until
  the policy knew the address); reported are the query latency (which includes the
  policy update) vs the same query for a name already known, and the connect time vs a
  connect to an already-allowed address. The proxy's own `answers_held_ns` says how long
  answers waited for the policy.

Ratios are per round, medians over rounds. Everything is removed at the start and at the
end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from bench.run import BenchError, _endpoint, _import_policy, _ip, kill_all, log

CLUSTER = "dnsb"
POD_CIDR = IPv4Network("10.223.0.0/16")
UNDERLAY = IPv4Network("172.31.235.0/24")
EXT_NS = "pilus-dnsb-ext"
EXT_IF = "plxdnsb"
PORT = 8443

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-l4, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: l4}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-l7, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: l7}}
  egress:
  - toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*.bench.test"}]
  - toFQDNs: [{matchPattern: "*.bench.test"}]
    toPorts: [{ports: [{port: "8443", protocol: TCP}]}]
"""

# a UDP load generator: --inflight queries outstanding, answers/s and latency percentiles
LOAD = r"""
import json, random, selectors, socket, struct, sys, time
server, seconds, inflight, names = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def query(qid, name):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)
socks, sel, sent, lat, errors = [], selectors.DefaultSelector(), {}, [], 0
for i in range(inflight):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((server, 53)); s.setblocking(False)
    socks.append(s); sel.register(s, selectors.EVENT_READ, i)
def send(i):
    qid = random.randrange(65536)
    socks[i].send(query(qid, f"n{random.randrange(names)}.bench.test")); sent[i] = (qid, time.perf_counter())
for i in range(inflight):
    send(i)
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    ready = sel.select(0.5)
    if not ready:  # a lost datagram: resend on every socket that waits too long
        for i, (qid, t0) in list(sent.items()):
            if time.perf_counter() - t0 > 1.0:
                errors += 1; send(i)
        continue
    for key, _ in ready:
        i = key.data
        data = socks[i].recv(4096)
        qid, t0 = sent.get(i, (None, 0))
        if len(data) >= 4 and struct.unpack("!H", data[:2])[0] == qid:
            rcode = data[3] & 0xF
            if rcode == 0:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1
            send(i)
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0
print(json.dumps({"answers": len(lat), "qps": len(lat) / seconds, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                  "errors": errors}))
"""

# fresh names: query, then connect at once to the address it gave
FIRST = r"""
import json, socket, struct, sys, time
server, known_name, known_ip = sys.argv[1], sys.argv[4], sys.argv[5]
first, count, port = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[6])
def resolve(name):
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect((server, 53))
    t0 = time.perf_counter(); s.send(q); data = s.recv(4096); dt = time.perf_counter() - t0; s.close()
    if data[3] & 0xF:
        raise SystemExit(f"{name}: rcode {data[3] & 0xF}")
    return socket.inet_ntoa(data[-4:]), dt
def connect(ip):
    t0 = time.perf_counter()
    try:
        c = socket.create_connection((ip, port), timeout=2); c.close(); return time.perf_counter() - t0
    except OSError:
        return None
out = {"fresh_query_ms": [], "fresh_connect_ms": [], "failed_first": 0, "known_query_ms": [], "known_connect_ms": []}
for i in range(first, first + count):
    ip, dq = resolve(f"f{i}.bench.test")
    dc = connect(ip)
    out["fresh_query_ms"].append(dq * 1000)
    if dc is None:
        out["failed_first"] += 1
    else:
        out["fresh_connect_ms"].append(dc * 1000)
    _ip, dq = resolve(known_name)
    out["known_query_ms"].append(dq * 1000)
    dc = connect(known_ip)
    if dc is not None:
        out["known_connect_ms"].append(dc * 1000)
print(json.dumps(out))
"""


def sh(*argv: str, timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])}: {done.stderr.strip()[:300]}")
    return done.stdout


def in_pod(ns: str, script: str, *args: str, timeout: float = 120) -> dict:
    out = sh("ip", "netns", "exec", ns, sys.executable, "-c", script, *args, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def dns_counters(sock: str) -> dict:
    from pilus.cluster import unix_http

    _s, body = unix_http(sock, "GET", "/v1/healthz", None, timeout=10)
    return ((body or {}).get("dns_proxy") or {}).get("proxy", {}) if isinstance(body, dict) else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--names", type=int, default=40)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    from pilus.cluster import ClusterSpec, cluster_down, cluster_up
    from pilus.datapath import links

    tmp = Path(tempfile.mkdtemp(prefix="dnsbench"))
    procs: list[subprocess.Popen] = []
    fresh_total = args.names * args.rounds
    # one outside address per fresh name from .100 (node IPs are .11 ..; the server binds them all)
    if fresh_total > 150:
        raise BenchError(f"--names x --rounds is at most 150 (one underlay address each), got {fresh_total}")
    ext_ips = [str(UNDERLAY.network_address + 100 + i) for i in range(fresh_total + 1)]
    cluster_down(CLUSTER)
    links.delete_netns(EXT_NS)
    links.delete_link(EXT_IF)
    try:
        log(f"dns: cluster up {CLUSTER!r} (1 node)")
        doc = cluster_up(ClusterSpec(name=CLUSTER, nodes=1, pod_cidr=POD_CIDR, underlay_cidr=UNDERLAY))
        sock = doc["nodes"][0]["socket"]
        links.create_netns(EXT_NS)
        links.create_veth(EXT_IF, "eth0", peer_netns=EXT_NS)
        links.set_master(EXT_IF, doc["bridge"])
        for ip in ext_ips:
            links.add_address("eth0", f"{ip}/{UNDERLAY.prefixlen}", netns=EXT_NS)
        dns = _endpoint(sock, "kube-system/dns", "k8s-app=kube-dns")
        pods = {k: _endpoint(sock, f"default/{k}", f"app={k}") for k in ("l4", "l7")}
        hosts = [f"{ext_ips[0]} known.bench.test"]
        hosts += [f"{ext_ips[i % len(ext_ips)]} n{i}.bench.test" for i in range(args.names)]
        hosts += [f"{ext_ips[1 + i]} f{i}.bench.test" for i in range(fresh_total)]
        (tmp / "hosts").write_text("\n".join(hosts) + "\n")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", dns["netns"], "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
             f"--addn-hosts={tmp / 'hosts'}", "--bind-interfaces", f"--listen-address={_ip(dns)}",
             "--local-ttl=600", "--cache-size=10000", "--dns-forward-max=1000", f"--pid-file={tmp / 'pid'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", EXT_NS, sys.executable, "-m", "pilus.testing.probe", "tcp-server", str(PORT)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True))
        if procs[-1].stdout.readline().strip() != "ready":
            raise BenchError("the TCP server outside the cluster did not start")
        _import_policy(sock, POLICY)
        time.sleep(1.5)
        server = _ip(dns)
        # warm-up; the known name's address becomes allowed
        for k in pods:
            in_pod(pods[k]["netns"], LOAD, server, "0.5", "2", str(args.names))
        in_pod(pods["l7"]["netns"], FIRST, server, "0", "0", "known.bench.test", ext_ips[0], str(PORT))
        rounds = []
        for rnd in range(args.rounds):
            row = {k: in_pod(pods[k]["netns"], LOAD, server, str(args.duration), str(args.inflight),
                             str(args.names), timeout=args.duration + 60) for k in ("l4", "l7")}
            row["first"] = in_pod(pods["l7"]["netns"], FIRST, server, str(rnd * args.names), str(args.names),
                                  "known.bench.test", ext_ips[0], str(PORT))
            rounds.append(row)
            log(f"dns: round {rnd + 1}/{args.rounds}: l4 {row['l4']['qps']:.0f}/s, l7 {row['l7']['qps']:.0f}/s, "
                f"first connections failed {row['first']['failed_first']}")
        counters = dns_counters(sock)
    finally:
        kill_all(procs)
        cluster_down(CLUSTER)
        links.delete_link(EXT_IF)
        links.delete_netns(EXT_NS)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    summary = summarize(rounds, counters)
    print_summary(summary, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))
    return 0


def summarize(rounds: list[dict], counters: dict) -> dict:
    med = statistics.median

    def pooled(key: str) -> list[float]:
        return sorted(x for r in rounds for x in r["first"][key])

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else 0.0

    out = {k: {"qps": med(r[k]["qps"] for r in rounds), "p50_ms": med(r[k]["p50_ms"] for r in rounds),
               "p99_ms": med(r[k]["p99_ms"] for r in rounds), "errors": sum(r[k]["errors"] for r in rounds)}
           for k in ("l4", "l7")}
    out["l7_x_l4"] = med(r["l7"]["qps"] / r["l4"]["qps"] for r in rounds)
    for key in ("fresh_query_ms", "known_query_ms", "fresh_connect_ms", "known_connect_ms"):
        xs = pooled(key)
        out[key] = {"p50": med(xs) if xs else 0.0, "p99": p99(xs), "n": len(xs)}
    out["failed_first"] = sum(r["first"]["failed_first"] for r in rounds)
    held, fwd = counters.get("answers_held_ns", 0), counters.get("forwarded", 0)
    out["answer_held_ms_mean"] = held / 1e6 / fwd if fwd else None
    return out


def print_summary(s: dict, args) -> None:
    print(f"\nDNS on pods: {args.rounds} rounds x {args.duration:g}s, {args.inflight} queries in flight, medians")
    print(f"{'path':<6} {'answers/s':>10} {'x L4':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for k, label in (("l4", "L4"), ("l7", "proxy")):
        r = s[k]
        ratio = 1.0 if k == "l4" else s["l7_x_l4"]
        print(f"{label:<6} {r['qps']:>10.0f} {ratio:>6.2f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>7}")
    fq, kq, fc, kc = (s[k] for k in ("fresh_query_ms", "known_query_ms", "fresh_connect_ms", "known_connect_ms"))
    print(f"answer -> connection ({fq['n']} fresh names): query p50 {fq['p50']:.3f} ms / p99 {fq['p99']:.3f} ms "
          f"(a known name: p50 {kq['p50']:.3f} / p99 {kq['p99']:.3f}); connect right after the answer "
          f"p50 {fc['p50']:.3f} ms (an allowed address: {kc['p50']:.3f}); first connections refused: "
          f"{s['failed_first']}")
    if s["answer_held_ms_mean"] is not None:
        print(f"answers held for the policy update: {s['answer_held_ms_mean']:.3f} ms on average (all queries)")


if __name__ == "__main__":
    sys.exit(main())
