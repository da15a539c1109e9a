"""L7 proxy: keep-alive HTTP GET requests/s and latency through pilus's proxy vs direct vs
Debian's haproxy doing plain transparent forwarding, in the same namespaces, one run.

    sudo .venv/bin/python -m bench.l7_proxy [--duration 5] [--connections 32]

client netns -- middle netns (router; TPROXY to the proxy under test) -- server netns, where
haproxy answers ``200 ok`` itself (a C server, so the server is not the limit). Each path is
measured with wrk twice: ``--connections`` keep-alive connections (throughput, p99) and one
connection (the latency a single request sees). The proxy's CPU seconds per 1,000 requests come
from /proc. Not a pass/fail test; not in `make bench` (yet). Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.l7 import cpu_seconds, wrk
from bench.run import kill_all

TAG = f"{os.getpid() % 100000}"
NS_C, NS_M, NS_S = f"pbc{TAG}", f"pbm{TAG}", f"pbs{TAG}"
CLIENT_IP, MID_C, MID_S, SERVER_IP = "10.221.1.2", "10.221.1.1", "10.221.2.1", "10.221.2.2"
PILUS_PORT, HAPROXY_PORT = 15001, 15002
URL = f"http://{SERVER_IP}/public/x"


def sh(*args: str, ns: str | None = None, check: bool = True, inp: str | None = None) -> str:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, input=inp, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv}: {done.stderr.strip()}")
    return done.stdout


def build() -> None:
    for ns in (NS_C, NS_M, NS_S):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "link", "add", "c0", "netns", NS_C, "type", "veth", "peer", "m1", "netns", NS_M)
    sh("ip", "link", "add", "s0", "netns", NS_S, "type", "veth", "peer", "m2", "netns", NS_M)
    for ns, dev, addr in ((NS_C, "c0", CLIENT_IP), (NS_M, "m1", MID_C), (NS_M, "m2", MID_S), (NS_S, "s0", SERVER_IP)):
        sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
    sh("ip", "route", "add", "default", "via", MID_C, ns=NS_C)
    sh("ip", "route", "add", "default", "via", MID_S, ns=NS_S)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        sh("sysctl", "-qw", key, ns=NS_M)
    sh("ip", "rule", "add", "fwmark", "1", "lookup", "100", ns=NS_M)
    sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100", ns=NS_M)


def redirect(port: int | None) -> None:
    """Point client->server:80 at a proxy port in the middle (None: plain routing)."""
    rule = f"ip daddr {SERVER_IP} tcp dport 80 tproxy to :{port} meta mark set 1 accept" if port else ""
    sh("nft", "-f", "-", ns=NS_M, inp=f"""table ip pilus_l7b {{}}
flush table ip pilus_l7b
table ip pilus_l7b {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 1 accept
    {rule}
  }}
}}
""")


def start(ns: str, argv: list[str], ready: str | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if ready is not None:
        line = proc.stdout.readline().strip()
        if line != ready:
            raise RuntimeError(f"{argv} did not start: {line} {proc.stderr.read()}")
    else:
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"{argv} exited: {proc.stderr.read()}")
    return proc


def measure(name: str, pid: int | None, args) -> dict:
    res = {"path": name}
    for label, conns in (("load", args.connections), ("single", 1)):
        cpu0 = cpu_seconds(pid) if pid else 0.0
        r = wrk(NS_C, URL, conns, args.duration)
        if pid:
            r["cpu_ms_per_1k"] = round((cpu_seconds(pid) - cpu0) * 1e6 / max(r["requests"], 1), 1)
        res[label] = r
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="l7bench"))
    procs: list[subprocess.Popen] = []
    results = []
    try:
        build()
        (tmp / "server.cfg").write_text(f"""global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind {SERVER_IP}:80
  http-request return status 200 content-type text/plain string "ok"
""")
        procs.append(start(NS_S, ["haproxy", "-db", "-f", str(tmp / "server.cfg")]))
        (tmp / "fwd.cfg").write_text(f"""global
  maxconn 4096
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend fe
  bind :{HAPROXY_PORT} transparent
  default_backend be
backend be
  source 0.0.0.0 usesrc clientip
  server s1 {SERVER_IP}:80
""")
        cfg = {"listeners": [{"port": PILUS_PORT, "direction": "ingress", "rules": [
            {"port": 80, "peers": None, "http": [{"method": "GET", "path": "/public/.*"}]}]}]}
        (tmp / "proxy.json").write_text(json.dumps(cfg))
        pilus = start(NS_M, [sys.executable, "-m", "pilus.proxy", "--config", str(tmp / "proxy.json"),
                             "--control", str(tmp / "control.sock"), "--log-level", "warning"], ready="ready")
        procs.append(pilus)
        haproxy = start(NS_M, ["haproxy", "-db", "-f", str(tmp / "fwd.cfg")])
        procs.append(haproxy)
        redirect(None)
        results.append(measure("direct", None, args))
        redirect(PILUS_PORT)
        results.append(measure("pilus-proxy", pilus.pid, args))
        redirect(HAPROXY_PORT)
        results.append(measure("haproxy", haproxy.pid, args))
    finally:
        kill_all(procs)
        for ns in (NS_C, NS_M, NS_S):
            sh("ip", "netns", "delete", ns, check=False)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    direct = results[0]["load"]["rps"]
    print(f"{'path':<12} {'req/s':>9} {'x direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'1-conn p50':>11} "
          f"{'1-conn p99':>11} {'CPU ms/1k':>10} {'non-2xx':>8}")
    for r in results:
        ld, one = r["load"], r["single"]
        cpu = ld.get("cpu_ms_per_1k", "-")
        print(f"{r['path']:<12} {ld['rps']:>9.0f} {ld['rps'] / direct:>9.2f} {ld['p50_ms']:>8.2f} {ld['p99_ms']:>8.2f} "
              f"{one['p50_ms']:>11.3f} {one['p99_ms']:>11.3f} {cpu!s:>10} {ld['non2xx']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
