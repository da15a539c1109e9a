"""Side-by-side pod-to-pod benchmark: plain routing (the limit) vs pilus.

    python -m bench.run [--rounds 5] [--duration 3] [--no-pilus] [--json FILE]

Configurations, each its own set of network namespaces (performance.md §8.1):
  A   client and server namespaces joined to a routing namespace by veth pairs,
      /32 addresses, per-pod routes, static neighbours; no BPF, no netfilter.
      The limit, and the denominator of every ratio.
  A'  an identical copy of A: the A'/A ratio is the noise floor of this machine.
  B   pilus: a one-node cluster (`cluster_up(ClusterSpec(name="bench"))`) with two
      endpoints created through the agent API; same node, pod to pod; no policy
      selects them (allow-all: §8's "B0", the datapath cost).
  B+pol  two more endpoints of the same cluster, selected by an L3/L4 policy that
      allows client -> server on the benchmark ports (§8's "B"); the run checks
      that the policy drops a connection it does not allow. Skipped with a note
      when the agent has no policy API (--no-policy skips it).

Workloads: RR = 1-byte ping-pong on one TCP connection (bench/rr.c, TCP_NODELAY),
trans/s and p50/p99 latency; STREAM = `iperf3 -J`, one stream. The client is
pinned to CPU 0 and the server to CPU 1 in every configuration. Every round runs
every (configuration, workload) once in random order; ratios are computed per
round against that round's A and the median over rounds is reported, with the
inter-quartile range and the absolute medians. A short warm-up round is discarded.
Everything made here is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
RR_BIN = BUILD / "rr"
RR_PORT = 7001
IPERF_PORT = 5201
CPU_CLIENT, CPU_SERVER = 0, 1
CLEAN_TOL = 0.05

BENCH_CLUSTER = "bench"
BENCH_POD_CIDR = IPv4Network("10.203.0.0/16")
BENCH_UNDERLAY = IPv4Network("172.31.252.0/24")
A_PREFIX = "plbench-"  # namespaces of the plain configurations


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ tools


def build_rr() -> Path:
    src = REPO / "bench" / "rr.c"
    BUILD.mkdir(exist_ok=True)
    if not RR_BIN.exists() or RR_BIN.stat().st_mtime < src.stat().st_mtime:
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise BenchError("no C compiler found: install gcc (make setup)")
        subprocess.run([cc, "-O2", "-Wall", "-o", str(RR_BIN), str(src)], check=True)
    return RR_BIN


def check_tools() -> None:
    missing = [t for t in ("ip", "taskset", "iperf3") if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (run `make setup`)")
    if os.geteuid() != 0:
        raise BenchError("the benchmark needs root (network namespaces): run it as root")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("the benchmark pins client and server to CPUs 0 and 1: needs 2 CPUs")


# --------------------------------------------------------------- /proc/stat


def cpu_sample() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies over all CPUs."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (parts + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


# -------------------------------------------------------------- topologies


@dataclass
class Config:
    key: str  # "A", "A'", "B"
    label: str
    client_ns: str
    server_ns: str
    client_ip: str
    server_ip: str
    servers: list[subprocess.Popen] = field(default_factory=list)


def build_plain(key: str, tag: str, subnet: str) -> Config:
    """Routed pod-to-pod through a node namespace; no BPF, no netfilter."""
    from pilus.datapath import links

    node, cns, sns = f"{A_PREFIX}{tag}-n", f"{A_PREFIX}{tag}-c", f"{A_PREFIX}{tag}-s"
    net = IPv4Network(subnet)
    router, cip, sip = (str(net.network_address + i) for i in (1, 2, 3))
    for ns in (node, cns, sns):
        links.create_netns(ns)
    links.set_link_up("lo", node)
    for key_, val in (
        ("net.ipv4.ip_forward", 1),
        ("net.ipv4.conf.all.rp_filter", 0),
        ("net.ipv4.conf.default.rp_filter", 0),
    ):
        links.set_sysctl(key_, val, node)
    for host_if, pod_ns, pod_ip in (("vc", cns, cip), ("vs", sns, sip)):
        v = links.create_veth(host_if, "eth0", peer_netns=pod_ns, host_netns=node, mtu=1500)
        links.add_address("eth0", f"{pod_ip}/32", pod_ns)
        links.add_route(f"{router}/32", dev="eth0", netns=pod_ns, scope="link")
        links.add_route("default", gateway=router, dev="eth0", netns=pod_ns)
        links.add_neigh(router, v.host_mac, "eth0", pod_ns)
        links.add_route(f"{pod_ip}/32", dev=host_if, netns=node)
        links.add_neigh(pod_ip, v.peer_mac, host_if, node)
    return Config(key, f"{key} plain veth + routing", cns, sns, cip, sip)


def destroy_plain() -> None:
    from pilus.datapath import links

    for ns in links.list_netns(A_PREFIX):
        links.delete_netns(ns)


POLICY_YAML = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: bench-allow
  namespace: default
spec:
  endpointSelector:
    matchLabels:
      app: pserver
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: pclient
    toPorts:
    - ports:
      - port: "{RR_PORT}"
        protocol: TCP
      - port: "{IPERF_PORT}"
        protocol: TCP
"""


def _endpoint(sock: str, name: str, label: str) -> dict:
    from pilus.cluster import unix_http

    status, body = unix_http(sock, "POST", "/v1/endpoint", {"name": name, "labels": [label]}, timeout=60)
    if status not in (200, 201):
        raise BenchError(f"pilus: creating endpoint {name} failed ({status}): {body}")
    return body


def _ip(ep: dict) -> str:
    return str(ep["ipv4"]).split("/")[0]


def build_pilus(timeout: float, with_policy: bool) -> tuple[list[Config], dict, dict]:
    """B: two endpoints, no policy selects them (allow-all; §8's B0).
    B+pol: two more endpoints, an L3/L4 policy allows pclient -> pserver on the
    benchmark ports (§8's B). Returns (configs, cluster doc, notes)."""
    from pilus.cluster import ClusterSpec, cluster_up, unix_http

    log(f"pilus: cluster up {BENCH_CLUSTER!r} (1 node)")
    doc = cluster_up(
        ClusterSpec(name=BENCH_CLUSTER, nodes=1, pod_cidr=BENCH_POD_CIDR, underlay_cidr=BENCH_UNDERLAY),
        timeout=timeout,
    )
    sock = doc["nodes"][0]["socket"]
    notes: dict[str, Any] = {}
    c, sv = _endpoint(sock, "default/client", "app=client"), _endpoint(sock, "default/server", "app=server")
    configs = [
        Config("B", "B pilus, no policy", c["netns"], sv["netns"], _ip(c), _ip(sv)),
    ]
    if with_policy:
        try:
            status, body = unix_http(sock, "PUT", "/v1/policy", {"yaml": POLICY_YAML}, timeout=60)
            if status != 200:
                raise BenchError(f"policy import answered {status}: {body}")
            pc = _endpoint(sock, "default/pclient", "app=pclient")
            ps = _endpoint(sock, "default/pserver", "app=pserver")
            configs.append(Config("B+pol", "B pilus + L3/L4 policy", pc["netns"], ps["netns"], _ip(pc), _ip(ps)))
        except (BenchError, OSError) as e:
            notes["policy_error"] = " ".join(str(e).split())[:300]
            log(f"pilus: no policy configuration: {notes['policy_error']}")
    return configs, doc, notes


def policy_enforced(b: Config, bpol: Config) -> bool:
    """True if the policy drops B's client -> B+pol's server (not in the allow rule)."""
    r = subprocess.run(
        ns_cmd(
            b.client_ns,
            CPU_CLIENT,
            ["timeout", "2", str(RR_BIN), "-c", bpol.server_ip, "-p", str(RR_PORT), "-t", "0.1", "-w", "0"],
        ),
        capture_output=True,
        text=True,
    )
    return r.returncode != 0


def destroy_pilus() -> list[str]:
    from pilus.cluster import cluster_down

    return cluster_down(BENCH_CLUSTER)


# --------------------------------------------------------------- processes


def ns_cmd(ns: str, cpu: int, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, "taskset", "-c", str(cpu), *argv]


def start_servers(cfg: Config) -> None:
    rr = subprocess.Popen(
        ns_cmd(cfg.server_ns, CPU_SERVER, [str(RR_BIN), "-s", "-p", str(RR_PORT)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    cfg.servers.append(rr)
    line = rr.stdout.readline().strip() if rr.stdout else ""
    if line != "ready":
        raise BenchError(f"{cfg.key}: rr server did not start: {line} {rr.stderr.read()[:300]}")
    ip3 = subprocess.Popen(
        ns_cmd(cfg.server_ns, CPU_SERVER, ["iperf3", "-s", "-p", str(IPERF_PORT)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cfg.servers.append(ip3)


def stop_servers(cfg: Config) -> None:
    for p in cfg.servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
    cfg.servers.clear()


def _run_client(cfg: Config, argv: list[str], timeout: float) -> str:
    r = subprocess.run(ns_cmd(cfg.client_ns, CPU_CLIENT, argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"{cfg.key}: {argv[0]} failed: {(r.stderr or r.stdout).strip()[:300]}")
    return r.stdout


def run_rr(cfg: Config, duration: float, warmup: float) -> dict[str, Any]:
    c0 = cpu_sample()
    out = _run_client(
        cfg,
        [str(RR_BIN), "-c", cfg.server_ip, "-p", str(RR_PORT), "-t", str(duration), "-w", str(warmup)],
        timeout=duration + warmup + 20,
    )
    c1 = cpu_sample()
    res = json.loads(out.strip().splitlines()[-1])
    res.update(_cpu(c0, c1))
    if res["transactions"]:
        # cpu jiffies (10 ms) over the whole test incl. warm-up -> µs of CPU per transaction
        total_s = duration + warmup
        res["cpu_us_per_tx"] = round(res["busy_s"] / (res["tps"] * total_s) * 1e6, 2)
    return res


def run_stream(cfg: Config, duration: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", cfg.server_ip, "-p", str(IPERF_PORT), "-t", str(int(duration))]
    argv += ["-J"]
    c0 = cpu_sample()
    for attempt in range(3):
        try:
            out = _run_client(cfg, argv, timeout=duration + 30)
            break
        except BenchError:
            if attempt == 2:
                raise
            time.sleep(0.5)  # server still starting
    c1 = cpu_sample()
    data = json.loads(out)
    if "error" in data:
        raise BenchError(f"{cfg.key}: iperf3: {data['error']}")
    end = data["end"]
    gbps = end["sum_received"]["bits_per_second"] / 1e9
    res = {"gbit_s": round(gbps, 3), "retransmits": end["sum_sent"].get("retransmits", 0)}
    res.update(_cpu(c0, c1))
    return res


def _cpu(c0: tuple[int, int, int], c1: tuple[int, int, int]) -> dict[str, float]:
    hz = os.sysconf("SC_CLK_TCK")
    busy, steal, total = (b - a for a, b in zip(c0, c1, strict=True))
    return {
        "busy_s": round(busy / hz, 3),
        "steal_pct": round(100.0 * steal / total, 2) if total else 0.0,
    }


# ------------------------------------------------------------ BPF run time


def bpf_prog_stats() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of sched_cls programs (needs bpftool)."""
    if shutil.which("bpftool") is None:
        return {}
    r = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    out = {}
    for p in json.loads(r.stdout or "[]"):
        if p.get("type") in ("sched_cls", "xdp", "cgroup_sock_addr"):
            out[p["id"]] = (p.get("name", "?"), p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return out


def pilus_prog_ids(socket_path: str) -> set[int]:
    """ids of the programs the agent reports in /v1/healthz (datapath.programs)."""
    from pilus.cluster import unix_http

    try:
        _status, body = unix_http(socket_path, "GET", "/v1/healthz")
        progs = body.get("datapath", {}).get("programs", [])
        return {int(p["prog_id"]) for p in progs if p.get("prog_id")}
    except (OSError, AttributeError, KeyError, TypeError, ValueError):
        return set()


def measure_bpf_cost(cfg: Config, seconds: float, prog_ids: set[int]) -> dict[str, Any]:
    """ns per program invocation during one RR run on B (kernel.bpf_stats_enabled).
    Only the agent's programs count (other clusters may run on this machine)."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    try:
        old = path.read_text().strip()
        path.write_text("1")
    except OSError:
        return {}
    try:
        before = bpf_prog_stats()
        rr = run_rr(cfg, seconds, 0.2)
        after = bpf_prog_stats()
    finally:
        with contextlib.suppress(OSError):
            path.write_text(old)
    progs = {}
    for pid, (name, ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(pid, (name, 0, 0))[1:]
        if (not prog_ids or pid in prog_ids) and cnt1 - cnt0 > 100:
            progs[f"{name}#{pid}"] = {
                "ns_per_run": round((ns1 - ns0) / (cnt1 - cnt0), 1),
                "runs_per_tx": round((cnt1 - cnt0) / max(rr["transactions"], 1), 2),
            }
    return progs


# -------------------------------------------------------------- statistics


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if not xs:
        return (float("nan"),) * 3
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


METRICS = [
    # (workload, field, label, higher_is_better, format)
    ("rr", "tps", "RR transactions/s", True, "{:,.0f}"),
    ("rr", "p50_us", "RR p50 latency µs", False, "{:.1f}"),
    ("rr", "p99_us", "RR p99 latency µs", False, "{:.1f}"),
    ("rr", "cpu_us_per_tx", "RR CPU µs/transaction", False, "{:.1f}"),
    ("stream", "gbit_s", "STREAM Gbit/s", True, "{:.2f}"),
]


def summarize(results: dict[str, list[dict]], keys: list[str]) -> dict[str, Any]:
    """results[key] = list over rounds of {"rr": {...}, "stream": {...}}."""
    summary: dict[str, Any] = {}
    rounds = len(results["A"])
    for wl, fld, label, hib, _fmt in METRICS:
        row: dict[str, Any] = {"label": label, "higher_is_better": hib, "abs": {}, "ratio": {}}
        for k in keys:
            vals = [r[wl][fld] for r in results[k] if r.get(wl) and fld in r[wl]]
            row["abs"][k] = statistics.median(vals) if vals else None
            if k == "A":
                continue
            ratios = []
            for i in range(rounds):
                a, x = results["A"][i].get(wl, {}), results[k][i].get(wl, {})
                if a.get(fld) and x.get(fld) is not None:
                    ratios.append(x[fld] / a[fld])
            q1, med, q3 = quartiles(ratios)
            row["ratio"][k] = {"median": med, "q1": q1, "q3": q3, "n": len(ratios)}
            if k != "A'" and "A'" in results:
                # rounds whose A'/A control is within ±5 % (performance.md §8.3.3)
                clean = []
                for i in range(rounds):
                    a = results["A"][i].get(wl, {}).get(fld)
                    a2 = results["A'"][i].get(wl, {}).get(fld)
                    x = results[k][i].get(wl, {}).get(fld)
                    if a and a2 is not None and x is not None and abs(a2 / a - 1) <= CLEAN_TOL:
                        clean.append(x / a)
                row["ratio"][k]["clean_median"] = statistics.median(clean) if clean else None
                row["ratio"][k]["clean_n"] = len(clean)
        summary[f"{wl}.{fld}"] = row
    return summary


def print_report(summary: dict[str, Any], keys: list[str], meta: dict[str, Any]) -> None:
    names = {"A": "A (limit)", "A'": "A' (control)", "B": "B (pilus)", "B+pol": "B+pol"}
    ratio_keys = [k for k in keys if k != "A"]
    print()
    print(
        f"pilus bench: pod-to-pod on one machine, {meta['rounds']} rounds x {meta['duration']} s, "
        f"client CPU {CPU_CLIENT}, server CPU {CPU_SERVER}, MTU 1500"
    )
    print()
    print("absolute values (median over rounds)")
    head = f"{'metric':<24}" + "".join(f"{names[k]:>14}" for k in keys)
    print(head)
    print("-" * len(head))
    for wl, fld, label, _hib, fmt in METRICS:
        row = summary[f"{wl}.{fld}"]
        line = f"{label:<24}"
        for k in keys:
            v = row["abs"].get(k)
            line += f"{(fmt.format(v) if v is not None else '-'):>14}"
        print(line)
    print()
    clean_keys = [k for k in ratio_keys if k != "A'" and "A'" in keys]
    print(f"ratios to A: median over rounds [IQR]; 'clean (n)': only rounds whose A'/A is within ±{CLEAN_TOL:.0%}")
    head = f"{'metric':<24}" + "".join(f"{k + '/A':>21}" for k in ratio_keys)
    head += "".join(f"{k + '/A clean (n)':>19}" for k in clean_keys)
    print(head)
    print("-" * len(head))
    for wl, fld, label, _hib, _fmt in METRICS:
        row = summary[f"{wl}.{fld}"]
        line = f"{label:<24}"
        for k in ratio_keys:
            r = row["ratio"].get(k)
            if r and r["n"]:
                line += f"{r['median']:>7.3f} [{r['q1']:.3f}-{r['q3']:.3f}]"
            else:
                line += f"{'-':>21}"
        for k in clean_keys:
            r = row["ratio"].get(k) or {}
            if r.get("clean_median") is not None:
                line += f"{r['clean_median']:>14.3f} ({r['clean_n']})"
            else:
                line += f"{'- (0)':>19}"
        print(line)
    print()
    print("ratios are per round against the same round's A; A'/A is the noise floor:")
    print("differences of B/A within it are noise. Higher is better for rates, lower for µs.")
    if meta.get("max_steal_pct", 0) > 2:
        print(f"warning: CPU steal up to {meta['max_steal_pct']:.1f} % during tests")
    if meta.get("bpf_cost"):
        print(
            f"pilus datapath cost (kernel.bpf_stats_enabled, one extra RR run on {meta.get('bpf_cost_config', 'B')}):"
        )
        for name, v in sorted(meta["bpf_cost"].items()):
            print(f"  {name:<32} {v['ns_per_run']:>8.1f} ns/run  {v['runs_per_tx']:>5.2f} runs/transaction")
    if "policy_enforced" in meta:
        print(
            "B+pol: policy enforced (a connection it does not allow was dropped)"
            if meta["policy_enforced"]
            else "B+pol: WARNING the policy did not drop a connection it does not allow"
        )
    if meta.get("policy_error"):
        print(f"B+pol was not measured: {meta['policy_error']}")
    if meta.get("pilus_error"):
        print(f"B (pilus) was not measured: {meta['pilus_error']}")


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per test (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="RR warm-up seconds (default 0.5)")
    ap.add_argument("--no-pilus", action="store_true", help="only A and A' (no cluster)")
    ap.add_argument("--no-policy", action="store_true", help="skip the B+pol configuration")
    ap.add_argument("--seed", type=int, default=None, help="seed of the run order")
    ap.add_argument("--json", type=Path, default=None, help="write all samples here")
    ap.add_argument("--up-timeout", type=float, default=60.0, help="cluster up timeout")
    args = ap.parse_args(argv)

    # SIGTERM / SIGHUP unwind like Ctrl-C so that the finally block cleans up
    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)

    rng = random.Random(args.seed)
    t_start = time.monotonic()
    configs: list[Config] = []
    pilus_made = False
    bench_socket = ""
    meta: dict[str, Any] = {"rounds": args.rounds, "duration": args.duration}
    exit_code = 0
    try:
        check_tools()
        build_rr()
        # leftovers of an interrupted earlier run
        destroy_plain()
        if not args.no_pilus:
            destroy_pilus()

        log("building A and A' (plain veth + routing)")
        configs.append(build_plain("A", "a", "10.204.0.0/24"))
        configs.append(build_plain("A'", "a2", "10.205.0.0/24"))
        if not args.no_pilus:
            pilus_made = True
            try:
                pcfgs, doc, notes = build_pilus(args.up_timeout, not args.no_policy)
                configs += pcfgs
                meta.update(notes)
                bench_socket = doc["nodes"][0]["socket"]
            except Exception as e:  # noqa: BLE001 - reported, A/A' still measured
                msg = " ".join(str(e).split())
                meta["pilus_error"] = msg if len(msg) <= 600 else msg[:250] + " ... " + msg[-350:]
                log(f"pilus unavailable: {meta['pilus_error']}")
                exit_code = 1
        for cfg in configs:
            start_servers(cfg)
        keys = [c.key for c in configs]
        by_key = {c.key: c for c in configs}
        if "B+pol" in by_key:
            meta["policy_enforced"] = policy_enforced(by_key["B"], by_key["B+pol"])
            if not meta["policy_enforced"]:
                log("warning: the policy did not block a connection it does not allow")

        log("warm-up round (discarded)")
        for cfg in configs:
            run_rr(cfg, 0.5, 0.2)
            run_stream(cfg, 1)

        results: dict[str, list[dict]] = {k: [] for k in keys}
        max_steal = 0.0
        for rnd in range(1, args.rounds + 1):
            tests = [(k, wl) for k in keys for wl in ("rr", "stream")]
            rng.shuffle(tests)
            sample: dict[str, dict] = {k: {} for k in keys}
            for k, wl in tests:
                cfg = by_key[k]
                if wl == "rr":
                    sample[k]["rr"] = run_rr(cfg, args.duration, args.warmup)
                else:
                    sample[k]["stream"] = run_stream(cfg, args.duration)
                max_steal = max(max_steal, sample[k][wl]["steal_pct"])
            for k in keys:
                results[k].append(sample[k])
            a = sample["A"]
            line = f"round {rnd}/{args.rounds}: A rr {a['rr']['tps']:,.0f}/s {a['stream']['gbit_s']:.1f} Gbit/s"
            for k in keys[1:]:
                s = sample[k]
                line += (
                    f" | {k}/A rr {s['rr']['tps'] / a['rr']['tps']:.3f}"
                    f" stream {s['stream']['gbit_s'] / a['stream']['gbit_s']:.3f}"
                )
            log(line)
        meta["max_steal_pct"] = max_steal
        bkey = "B+pol" if "B+pol" in by_key else "B"
        if bkey in by_key:
            meta["bpf_cost_config"] = bkey
            meta["bpf_cost"] = measure_bpf_cost(by_key[bkey], 2.0, pilus_prog_ids(bench_socket))
        summary = summarize(results, keys)
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        print_report(summary, keys, meta)
        out = args.json or (BUILD / "bench" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": summary, "samples": results}, indent=1) + "\n")
        print(f"samples: {out} (total {meta['elapsed_s']} s)")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        exit_code = 130
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for cfg in configs:
            stop_servers(cfg)
        with contextlib.suppress(Exception):
            destroy_plain()
        if pilus_made:
            try:
                destroy_pilus()
            except Exception as e:  # noqa: BLE001
                print(f"bench: cleanup of cluster {BENCH_CLUSTER!r} failed: {e}", file=sys.stderr)
                exit_code = exit_code or 1
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
