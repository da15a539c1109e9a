"""The L7 path on pods: keep-alive HTTP GETs through pilus's HTTP proxy vs the same pods
with an L4-only rule, and Debian's haproxy (C, plain forwarding) on the node as the
reference; then one new connection per request. One run, side by side.

    python -m bench.l7 [--rounds 3] [--duration 4] [--connections 32] [--json FILE]

One one-node cluster (pods 10.217.0.0/16, underlay 172.31.232.0/24). Pods default/client
and default/web; in web, haproxy answers `200 ok` itself on ports 80 and 8080 (a C server:
the server is not the limit). One policy selects web: from client, port 80 at L4 only, and
port 8080 with an HTTP rule (`GET /.*`), so every request on 8080 goes through the node's
L7 proxy (the datapath's redirect, issue 10) and every request on 80 does not. The
reference: haproxy in the node's namespace on :18080 forwarding to web:80 (one thread,
keep-alive; what a C proxy costs on the same hop, without identities or rules).

Workloads with wrk from the client pod: `ka` (--connections keep-alive connections:
requests/s and p99), `one` (one keep-alive connection: the latency a single request
sees; L7 minus L4 is the added latency) and `close` (`Connection: close`: a new connection
per request). Each round runs every (path, workload) once in random order after a
warm-up; ratios to L4 are taken per round, reported as the median over rounds. The
proxy's CPU per 1,000 requests comes from /proc/<pid>/stat. Everything is removed at the
start and at the end, also on failure. Take /tmp/pilus-e2e.lock around it when e2e tests
may run at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from bench.run import BenchError, _endpoint, _import_policy, _ip, kill_all, log

CLUSTER = "l7b"
POD_CIDR = IPv4Network("10.217.0.0/16")
UNDERLAY = IPv4Network("172.31.232.0/24")
HAPROXY_PORT = 18080

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7bench, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/.*"}]
"""

SERVER_CFG = """global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind :80
  bind :8080
  http-request return status 200 content-type text/plain string "ok"
"""

FWD_CFG = """global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind :{port}
  default_backend be
backend be
  server s1 {server}:80
"""


def ns_popen(ns: str, argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.5)
    if proc.poll() is not None:
        raise BenchError(f"{argv[0]} in {ns} exited: {proc.stderr.read()[:300]}")
    return proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise BenchError(f"wrk latency {text!r} not understood")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(ns: str, url: str, connections: int, duration: float, close: bool = False) -> dict:
    argv = ["ip", "netns", "exec", ns, "wrk", "-t", "1" if connections == 1 else "2", "-c", str(connections),
            "-d", f"{max(1, round(duration))}s", "--latency", url]
    if close:
        argv[-1:-1] = ["-H", "Connection: close"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    out = done.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done.returncode != 0 or m is None:
        raise BenchError(f"wrk {url}: {done.stderr.strip()[:300]} {out[-300:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(m.group(1)),
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0,
    }


def proxy_pid(sock: str) -> int:
    from pilus.cluster import unix_http

    status, body = unix_http(sock, "GET", "/v1/proxy", None, timeout=10)
    if status != 200 or not (body.get("process") or {}).get("pid"):
        raise BenchError(f"GET /v1/proxy answered {status}: {body}")
    return int(body["process"]["pid"])


def proxy_counters(sock: str) -> dict[str, int]:
    from pilus.cluster import unix_http

    _status, body = unix_http(sock, "GET", "/v1/proxy", None, timeout=10)
    out: dict[str, int] = {}
    for lst in body.get("listeners") or ():
        for k in ("forwarded", "denied", "parse_errors", "upstream_errors"):
            out[k] = out.get(k, 0) + int(lst.get(k) or 0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=4)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    from pilus.cluster import ClusterSpec, cluster_down, cluster_up

    tmp = Path(tempfile.mkdtemp(prefix="l7bench"))
    procs: list[subprocess.Popen] = []
    cluster_down(CLUSTER)
    try:
        log(f"l7: cluster up {CLUSTER!r} (1 node)")
        doc = cluster_up(ClusterSpec(name=CLUSTER, nodes=1, pod_cidr=POD_CIDR, underlay_cidr=UNDERLAY))
        node = doc["nodes"][0]
        sock = node["socket"]
        client, web = _endpoint(sock, "default/client", "app=client"), _endpoint(sock, "default/web", "app=web")
        _import_policy(sock, POLICY)
        (tmp / "server.cfg").write_text(SERVER_CFG)
        procs.append(ns_popen(web["netns"], ["haproxy", "-db", "-f", str(tmp / "server.cfg")]))
        (tmp / "fwd.cfg").write_text(FWD_CFG.format(port=HAPROXY_PORT, server=_ip(web)))
        haproxy = ns_popen(node["netns"], ["haproxy", "-db", "-f", str(tmp / "fwd.cfg")])
        procs.append(haproxy)
        # the node as the pod sees it: its default gateway (the router IP on pilus_host)
        gateway = subprocess.run(["ip", "netns", "exec", client["netns"], "ip", "-4", "route", "show", "default"],
                                 capture_output=True, text=True, check=True).stdout.split()[2]
        urls = {"L4": f"http://{_ip(web)}/x", "L7": f"http://{_ip(web)}:8080/x",
                "haproxy": f"http://{gateway}:{HAPROXY_PORT}/x"}
        time.sleep(2)  # the proxy's config follows the policy
        pid = proxy_pid(sock)
        work = {"ka": (args.connections, False), "one": (1, False), "close": (args.connections, True)}
        for path, url in urls.items():  # warm-up, and every path answers 200
            r = wrk(client["netns"], url, 4, 1.0)
            if r["non2xx"] or not r["requests"]:
                raise BenchError(f"warm-up on {path} ({url}): {r}")
        before = proxy_counters(sock)
        results: list[dict] = []
        for rnd in range(args.rounds):
            runs = [(path, w) for path in urls for w in work]
            random.shuffle(runs)
            row: dict = {}
            for path, w in runs:
                conns, close = work[w]
                cpu0 = cpu_seconds(pid)
                r = wrk(client["netns"], urls[path], conns, args.duration, close)
                r["proxy_cpu_ms_per_1k"] = round((cpu_seconds(pid) - cpu0) * 1e6 / max(r["requests"], 1), 1)
                row[f"{path}/{w}"] = r
            results.append(row)
            log(f"l7: round {rnd + 1}/{args.rounds}: " + ", ".join(
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


def summarize(results: list[dict]) -> dict:
    med = statistics.median
    out: dict = {}
    for w in ("ka", "one", "close"):
        for path in ("L4", "L7", "haproxy"):
            rs = [r[f"{path}/{w}"] for r in results]
            out[f"{path}/{w}"] = {
                "rps": med(r["rps"] for r in rs), "p50_ms": med(r["p50_ms"] for r in rs),
                "p99_ms": med(r["p99_ms"] for r in rs),
                "proxy_cpu_ms_per_1k": med(r["proxy_cpu_ms_per_1k"] for r in rs),
                "non2xx": sum(r["non2xx"] for r in rs), "socket_errors": sum(r["socket_errors"] for r in rs),
                "x_L4": med(r[f"{path}/{w}"]["rps"] / r[f"L4/{w}"]["rps"] for r in results),
            }
    out["added_p50_ms_one"] = med(r["L7/one"]["p50_ms"] - r["L4/one"]["p50_ms"] for r in results)
    out["added_p99_ms_one"] = med(r["L7/one"]["p99_ms"] - r["L4/one"]["p99_ms"] for r in results)
    return out


def print_summary(s: dict, args) -> None:
    print(f"\nL7 proxy on pods: {args.rounds} rounds x {args.duration:g}s, medians; ka = {args.connections} "
          "keep-alive connections, one = 1 connection, close = a new connection per request")
    print(f"{'path/workload':<14} {'req/s':>9} {'x L4':>6} {'p50 ms':>8} {'p99 ms':>8} {'proxy CPU ms/1k':>16} "
          f"{'non-2xx':>8} {'sock err':>8}")
    for w in ("ka", "one", "close"):
        for path in ("L4", "L7", "haproxy"):
            r = s[f"{path}/{w}"]
            cpu = f"{r['proxy_cpu_ms_per_1k']:.1f}" if path == "L7" else "-"
            print(f"{path + '/' + w:<14} {r['rps']:>9.0f} {r['x_L4']:>6.2f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                  f"{cpu:>16} {r['non2xx']:>8} {r['socket_errors']:>8}")
    print(f"added latency on one connection (L7 - L4): p50 {s['added_p50_ms_one']:+.3f} ms, "
          f"p99 {s['added_p99_ms_one']:+.3f} ms (goal p99 < 1 ms)")
    print(f"L7/L4 keep-alive: {s['L7/ka']['x_L4']:.2f}x (goal >= 0.30x); haproxy/L4: {s['haproxy/ka']['x_L4']:.2f}x")
    print(f"proxy counters during the rounds: {s.get('proxy_counters')}")


if __name__ == "__main__":
    sys.exit(main())
