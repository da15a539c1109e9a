"""Side-by-side pod-to-pod benchmark: plain routing (the limit) vs pilus vs iptables.

    python -m bench.run [--rounds 5] [--duration 2] [--no-pilus] [--no-policy]
                        [--no-pol10k] [--no-monitor] [--no-iptables] [--json FILE]

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
      when the agent has no policy API (--no-policy skips it and B+pol10k).
  B+pol+mon  the B+pol endpoints while a monitor subscriber (`pilus monitor`'s
      GET /v1/monitor, every event type) streams from the agent: the datapath
      then emits trace and policy-verdict events and the agent decodes them.
      In every other configuration nobody listens, so the datapath emits no
      events at all (--no-monitor skips it).
  B+pol10k  two more endpoints; the server's ingress policy map holds >= 10,000
      entries: one CiliumNetworkPolicy allows the client on 10,000 filler ports
      (20000-29999, 250 toPorts rules of 40 ports) plus the benchmark port. The
      run reads GET /v1/bpf/policy/<server> (>= 10k entries) and probes that a
      connection the policy does not allow is dropped (timeout, and the agent's
      policy-denied drop counter grows). toPorts, not 10k fromCIDR /32s: the
      agent's CIDR selector cache is quadratic in the number of CIDRs (see
      docs/benchmarks.md). --no-pol10k skips it.
  C-ipt  the A topology plus iptables in the routing namespace doing the same
      job: FORWARD policy DROP, `-m conntrack --ctstate ESTABLISHED,RELATED -j
      ACCEPT`, and `-m set --match-set allow src -p tcp --dport P -j ACCEPT` with
      an ipset (hash:ip) of 10,000 addresses incl. the client.
  C-ipt-linear  the same 10,000 allows as individual `-s IP/32 -p tcp --dport P
      -j ACCEPT` rules, the client's rule last (the linear-chain case).
      Both C configurations also get a third pod that is not allowed; the run
      checks that its connection is dropped (timeout, FORWARD policy counter).
      Skipped, with the missing tools named, without iptables/ipset
      (--no-iptables skips them).

Workloads: RR = 1-byte ping-pong on one TCP connection (bench/rr.c, TCP_NODELAY),
trans/s and p50/p99 latency; CRR = connect, 1 byte each way, the server closes
first (bench/rr.c -C), conn/s and p50/p99; CRR-cf = the same, but the client
closes first (rr.c -X, netperf's order: TIME_WAIT on the client, whose namespace
gets net.ipv4.tcp_tw_reuse=1 in every configuration; A, A', B, B+pol,
B+pol+mon); STREAM = `iperf3 -J`, one stream (A, A', B, B+pol only: policies
act on the first packet of a connection, which RR and CRR cover). The client is
pinned to CPU 0 and the server to CPU 1 in every configuration; the agent is
not pinned and competes with both. Every round runs every (configuration, workload) once in random
order; ratios are computed per round against that round's A and the median
over rounds is reported, with the inter-quartile range and the absolute
medians. A short warm-up round is discarded. For pilus configurations the
agent's own CPU time per transaction is recorded too (/proc/<pid>/stat). After
the rounds, extra RR and CRR runs per pilus configuration with
kernel.bpf_stats_enabled=1 give the ns per run of cil_from_container /
cil_to_container and the runs per connection.
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
import socket
import statistics
import subprocess
import sys
import threading
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

BPF_REPS = 3  # repetitions of the kernel.bpf_stats_enabled runs (median reported)
BIG_N = 10_000  # entries of the large allow lists (B+pol10k, C-ipt, C-ipt-linear)
FILLER_PORT0 = 20000  # B+pol10k: filler ports FILLER_PORT0 .. FILLER_PORT0 + BIG_N - 1
FILLER_NET = IPv4Network("100.64.0.0/16")  # C-ipt*: filler source addresses (never used)

BENCH_CLUSTER = "bench"
BENCH_POD_CIDR = IPv4Network("10.203.0.0/16")
BENCH_UNDERLAY = IPv4Network("172.31.252.0/24")
A_PREFIX = "plbench-"  # namespaces of the plain configurations


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def kill_all(procs) -> None:
    """Kill background processes started with start_new_session (their whole group)."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(10)


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


WORKLOADS = ("rr", "crr", "crr_cf", "stream")
NO_STREAM = ("rr", "crr")
CRR_WORKLOADS = ("crr", "crr_cf")


@dataclass
class Config:
    key: str  # "A", "A'", "B", "B+pol", "B+pol10k", "C-ipt", "C-ipt-linear"
    label: str
    client_ns: str
    server_ns: str
    client_ip: str
    server_ip: str
    workloads: tuple[str, ...] = WORKLOADS
    node_ns: str = ""  # plain/iptables configurations: the routing namespace
    probe_ns: str = ""  # iptables configurations: a pod the filter does not allow
    probe_ip: str = ""
    agent_pid: int = 0  # pilus configurations: the agent, whose CPU time is recorded
    #: more than one node: every agent (not pinned: what they spend comes out of the
    #: client's or the server's CPU), recorded together as agents_us_per_tx
    agent_pids: tuple[int, ...] = ()
    prog_owner: dict[int, str] = field(default_factory=dict)  # their programs' ids -> node (BPF tables)
    monitor_socket: str = ""  # B+pol+mon: a monitor subscriber streams during each test
    servers: list[subprocess.Popen] = field(default_factory=list)


def build_plain(key: str, tag: str, subnet: str, probe_pod: bool = False) -> Config:
    """Routed pod-to-pod through a node namespace; no BPF, no netfilter.
    probe_pod adds a third pod ("x") on the same node (the not-allowed source)."""
    from pilus.datapath import links

    node, cns, sns = f"{A_PREFIX}{tag}-n", f"{A_PREFIX}{tag}-c", f"{A_PREFIX}{tag}-s"
    xns = f"{A_PREFIX}{tag}-x" if probe_pod else ""
    net = IPv4Network(subnet)
    router, cip, sip, xip = (str(net.network_address + i) for i in (1, 2, 3, 4))
    for ns in (node, cns, sns, xns):
        if ns:
            links.create_netns(ns)
    links.set_link_up("lo", node)
    for key_, val in (
        ("net.ipv4.ip_forward", 1),
        ("net.ipv4.conf.all.rp_filter", 0),
        ("net.ipv4.conf.default.rp_filter", 0),
    ):
        links.set_sysctl(key_, val, node)
    pods = [("vc", cns, cip), ("vs", sns, sip)] + ([("vx", xns, xip)] if xns else [])
    for host_if, pod_ns, pod_ip in pods:
        v = links.create_veth(host_if, "eth0", peer_netns=pod_ns, host_netns=node, mtu=1500)
        links.add_address("eth0", f"{pod_ip}/32", pod_ns)
        links.add_route(f"{router}/32", dev="eth0", netns=pod_ns, scope="link")
        links.add_route("default", gateway=router, dev="eth0", netns=pod_ns)
        links.add_neigh(router, v.host_mac, "eth0", pod_ns)
        links.add_route(f"{pod_ip}/32", dev=host_if, netns=node)
        links.add_neigh(pod_ip, v.peer_mac, host_if, node)
    return Config(
        key,
        "plain veth + routing (no BPF, no netfilter)" if key == "A" else "copy of A (noise floor)",
        cns,
        sns,
        cip,
        sip,
        node_ns=node,
        probe_ns=xns,
        probe_ip=xip if xns else "",
    )


def destroy_plain() -> None:
    from pilus.datapath import links

    for ns in links.list_netns(A_PREFIX):
        if ns.endswith("-n"):
            _netfilter_flush(ns)
        links.delete_netns(ns)


# ------------------------------------------------------ iptables (C-ipt*)

IPT_TOOLS = ("iptables", "iptables-restore", "ipset")


def iptables_missing() -> list[str]:
    return [t for t in IPT_TOOLS if shutil.which(t) is None]


def _ns_run(ns: str, argv: list[str], stdin: str | None = None, check: bool = True) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise BenchError(f"{ns}: {' '.join(argv[:3])} failed: {(r.stderr or r.stdout).strip()[:300]}")
    return r.stdout


def _netfilter_flush(ns: str) -> None:
    """Remove what build_iptables put into ns (the namespace is deleted right after;
    this keeps the cleanup explicit and also works if deletion is delayed)."""
    if shutil.which("iptables"):
        _ns_run(ns, ["iptables", "-w", "-F", "FORWARD"], check=False)
        _ns_run(ns, ["iptables", "-w", "-P", "FORWARD", "ACCEPT"], check=False)
    if shutil.which("ipset"):
        _ns_run(ns, ["ipset", "destroy"], check=False)


def _filler_ips(n: int) -> list[str]:
    return [str(FILLER_NET.network_address + 1 + i) for i in range(n)]


def build_iptables(key: str, tag: str, subnet: str, linear: bool) -> Config:
    """The A topology + FORWARD filtering in the routing namespace (and a probe pod).
    ipset: one rule matching a hash:ip set of BIG_N addresses (the client among them);
    linear: BIG_N rules, one per address, the client's last."""
    cfg = build_plain(key, tag, subnet, probe_pod=True)
    fillers = _filler_ips(BIG_N - 1)
    rules = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD DROP [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    if linear:
        cfg.label = f"A + iptables FORWARD DROP, conntrack, {BIG_N:,} linear -s rules (client last)"
        rules += [f"-A FORWARD -s {ip}/32 -p tcp -m tcp --dport {RR_PORT} -j ACCEPT" for ip in fillers]
        rules.append(f"-A FORWARD -s {cfg.client_ip}/32 -p tcp -m tcp --dport {RR_PORT} -j ACCEPT")
    else:
        cfg.label = f"A + iptables FORWARD DROP, conntrack, -m set (hash:ip, {BIG_N:,} entries)"
        sets = [f"create allow hash:ip family inet hashsize 16384 maxelem {4 * BIG_N}"]
        sets += [f"add allow {ip}" for ip in [*fillers, cfg.client_ip]]
        _ns_run(cfg.node_ns, ["ipset", "restore"], stdin="\n".join(sets) + "\n")
        rules.append(f"-A FORWARD -p tcp -m set --match-set allow src -m tcp --dport {RR_PORT} -j ACCEPT")
    rules.append("COMMIT")
    _ns_run(cfg.node_ns, ["iptables-restore", "-w"], stdin="\n".join(rules) + "\n")
    cfg.workloads = NO_STREAM
    return cfg


def iptables_evidence(cfg: Config) -> dict[str, Any]:
    """What the filter holds, and that it drops a source it does not allow."""
    ev: dict[str, Any] = {}
    rules = _ns_run(cfg.node_ns, ["iptables", "-w", "-S", "FORWARD"]).splitlines()
    ev["forward_rules"] = sum(1 for r in rules if r.startswith("-A FORWARD"))
    ev["forward_policy"] = next((r.split()[2] for r in rules if r.startswith("-P FORWARD")), "?")
    if not cfg.key.endswith("linear"):
        head = _ns_run(cfg.node_ns, ["ipset", "list", "-t", "allow"])
        n = next((ln.split(":")[1] for ln in head.splitlines() if ln.startswith("Number of entries")), "0")
        ev["ipset_entries"] = int(n)
    ev["backend"] = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout.strip()
    drops0 = _forward_policy_drops(cfg.node_ns)
    ev["allowed_probe"] = tcp_probe(cfg.client_ns, cfg.server_ip, RR_PORT)
    ev["denied_probe"] = tcp_probe(cfg.probe_ns, cfg.server_ip, RR_PORT)
    ev["policy_drop_packets"] = _forward_policy_drops(cfg.node_ns) - drops0
    ev["ok"] = (
        ev["allowed_probe"] == "open"
        and ev["denied_probe"] == "timeout"
        and ev["policy_drop_packets"] > 0
        and (ev["forward_rules"] >= BIG_N if cfg.key.endswith("linear") else ev.get("ipset_entries", 0) >= BIG_N)
    )
    return ev


def _forward_policy_drops(ns: str) -> int:
    first = _ns_run(ns, ["iptables", "-w", "-L", "FORWARD", "-n", "-v", "-x"]).splitlines()[0]
    # "Chain FORWARD (policy DROP 3 packets, 180 bytes)"
    try:
        return int(first.split("policy")[1].split()[1])
    except (IndexError, ValueError):
        return 0


_PROBE = """
import socket, sys
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b"C"); s.recv(1); print("open")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error:" + str(e))
"""


def tcp_probe(ns: str, ip: str, port: int, timeout: float = 1.5) -> str:
    """open | timeout (dropped) | refused | error:...; one TCP connect from ns."""
    r = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _PROBE, ip, str(port), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
    )
    return (r.stdout.strip() or f"error:{r.stderr.strip()[:100]}").splitlines()[-1]


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


def policy_10k_yaml() -> str:
    """B+pol10k: p10client may reach p10server on BIG_N filler ports (250 toPorts
    rules of 40 ports: the schema's limit per rule) and, last, the benchmark port."""
    lines = [
        "apiVersion: cilium.io/v2",
        "kind: CiliumNetworkPolicy",
        "metadata:",
        "  name: bench-allow-10k",
        "  namespace: default",
        "spec:",
        "  endpointSelector:",
        "    matchLabels:",
        "      app: p10server",
        "  ingress:",
        "  - fromEndpoints:",
        "    - matchLabels:",
        "        app: p10client",
        "    toPorts:",
    ]
    for i in range(0, BIG_N, 40):
        lines.append("    - ports:")
        for port in range(FILLER_PORT0 + i, FILLER_PORT0 + min(i + 40, BIG_N)):
            lines.append(f'      - {{port: "{port}", protocol: TCP}}')
    lines += ["    - ports:", f'      - {{port: "{RR_PORT}", protocol: TCP}}']
    return "\n".join(lines) + "\n"


def _endpoint(sock: str, name: str, label: str) -> dict:
    from pilus.cluster import unix_http

    status, body = unix_http(sock, "POST", "/v1/endpoint", {"name": name, "labels": [label]}, timeout=60)
    if status not in (200, 201):
        raise BenchError(f"pilus: creating endpoint {name} failed ({status}): {body}")
    return body


def _ip(ep: dict) -> str:
    return str(ep["ipv4"]).split("/")[0]


def _import_policy(sock: str, text: str) -> None:
    from pilus.cluster import unix_http

    status, body = unix_http(sock, "PUT", "/v1/policy", {"yaml": text}, timeout=120)
    if status != 200:
        raise BenchError(f"policy import answered {status}: {body}")


def build_pilus(
    timeout: float, with_policy: bool, with_10k: bool, with_monitor: bool
) -> tuple[list[Config], dict, dict]:
    """B: two endpoints, no policy selects them (allow-all; §8's B0).
    B+pol: two more endpoints, an L3/L4 policy allows pclient -> pserver on the
    benchmark ports (§8's B). B+pol+mon: the B+pol endpoints with a monitor
    subscriber. B+pol10k: two more, the server's policy map holds >= BIG_N
    entries. Returns (configs, cluster doc, notes)."""
    from pilus.cluster import ClusterSpec, cluster_up

    log(f"pilus: cluster up {BENCH_CLUSTER!r} (1 node)")
    doc = cluster_up(
        ClusterSpec(name=BENCH_CLUSTER, nodes=1, pod_cidr=BENCH_POD_CIDR, underlay_cidr=BENCH_UNDERLAY),
        timeout=timeout,
    )
    sock = doc["nodes"][0]["socket"]
    notes: dict[str, Any] = {}
    c, sv = _endpoint(sock, "default/client", "app=client"), _endpoint(sock, "default/server", "app=server")
    configs = [
        Config("B", "pilus, no policy selects the endpoints", c["netns"], sv["netns"], _ip(c), _ip(sv)),
    ]
    if with_policy:
        try:
            _import_policy(sock, POLICY_YAML)
            pc = _endpoint(sock, "default/pclient", "app=pclient")
            ps = _endpoint(sock, "default/pserver", "app=pserver")
            configs.append(
                Config(
                    "B+pol", "pilus + L3/L4 allow policy (3 map entries)", pc["netns"], ps["netns"], _ip(pc), _ip(ps)
                )
            )
            if with_monitor:
                configs.append(
                    Config(
                        "B+pol+mon",
                        "B+pol while a monitor subscriber streams every event type",
                        pc["netns"],
                        ps["netns"],
                        _ip(pc),
                        _ip(ps),
                        workloads=("rr", *CRR_WORKLOADS),
                        monitor_socket=sock,
                    )
                )
        except (BenchError, OSError) as e:
            notes["policy_error"] = " ".join(str(e).split())[:300]
            log(f"pilus: no policy configuration: {notes['policy_error']}")
    if with_policy and with_10k and "policy_error" not in notes:
        try:
            t0 = time.monotonic()
            _import_policy(sock, policy_10k_yaml())
            notes["pol10k_import_s"] = round(time.monotonic() - t0, 2)
            pc = _endpoint(sock, "default/p10client", "app=p10client")
            ps = _endpoint(sock, "default/p10server", "app=p10server")
            cfg = Config(
                "B+pol10k",
                f"pilus + L3/L4 allow policy, >= {BIG_N:,} map entries",
                pc["netns"],
                ps["netns"],
                _ip(pc),
                _ip(ps),
                workloads=NO_STREAM,
            )
            notes["pol10k_map_ready_s"] = wait_policy_entries(sock, "default/p10server", BIG_N, 60.0)
            configs.append(cfg)
        except (BenchError, OSError) as e:
            notes["pol10k_error"] = " ".join(str(e).split())[:300]
            log(f"pilus: no B+pol10k configuration: {notes['pol10k_error']}")
    pid = agent_pid(sock)
    for cfg in configs:
        cfg.agent_pid = pid
    return configs, doc, notes


def agent_pid(sock: str) -> int:
    from pilus.cluster import unix_http

    _status, body = unix_http(sock, "GET", "/v1/healthz", timeout=30)
    return int(((body or {}).get("agent") or {}).get("pid") or 0)


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MonitorStream:
    """A `pilus monitor` subscriber (GET /v1/monitor, every type) reading in a thread
    while a test runs; counts the events it received."""

    def __init__(self, sock_path: str) -> None:
        self.events = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(10)
        self._sock.connect(sock_path)
        self._sock.sendall(b"GET /v1/monitor HTTP/1.1\r\nHost: pilus\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:  # the agent has subscribed once it answers
            chunk = self._sock.recv(4096)
            if not chunk:
                raise BenchError("the agent closed the monitor stream")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"GET /v1/monitor answered {head.splitlines()[0]!r}")
        self._sock.settimeout(None)
        self._tail = b""
        self._count(head.split(b"\r\n\r\n", 1)[1])
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _count(self, chunk: bytes) -> None:
        # ndjson in HTTP chunks: every event ends with "}\n" (chunk sizes are hex lines)
        data = self._tail + chunk
        self.events += data.count(b"}\n")
        self._tail = data[-1:]

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._sock.recv(65536):
                self._count(chunk)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=5)


def _policy_entries(sock: str, ref: str) -> list[dict]:
    from pilus.cluster import unix_http

    status, body = unix_http(sock, "GET", f"/v1/bpf/policy/{ref}", timeout=60)
    if status != 200:
        raise BenchError(f"GET /v1/bpf/policy/{ref} answered {status}: {body}")
    return body.get("entries", [])


def wait_policy_entries(sock: str, ref: str, want: int, timeout: float) -> float:
    """Seconds until the endpoint's BPF policy map holds >= want entries."""
    t0 = time.monotonic()
    while True:
        n = len(_policy_entries(sock, ref))
        if n >= want:
            return round(time.monotonic() - t0, 2)
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"{ref}: policy map holds {n} entries after {timeout:.0f} s, want >= {want}")
        time.sleep(0.5)


def _policy_denied_drops(sock: str) -> int:
    """Node-wide ingress drops with reason 133 (policy denied)."""
    from pilus.cluster import unix_http

    _status, body = unix_http(sock, "GET", "/v1/bpf/metrics", timeout=30)
    return sum(
        int(m.get("packets", 0)) for m in body or [] if m.get("reason") == 133 and m.get("direction") == "ingress"
    )


def pilus_evidence(sock: str, outsider: Config, cfg: Config, ref: str) -> dict[str, Any]:
    """The server's BPF policy map (entries) and two probes: from an endpoint the
    policy does not allow (outsider's client) -> dropped; from the allowed client -> open."""
    entries = _policy_entries(sock, ref)
    allow = [e for e in entries if e.get("direction") == "ingress" and not e.get("deny")]
    ev: dict[str, Any] = {"map_entries": len(entries), "ingress_allow_entries": len(allow)}
    ev["bench_port_entries"] = sum(1 for e in allow if e.get("proto") == 6 and e.get("dport") == RR_PORT)
    drops0 = _policy_denied_drops(sock)
    ev["allowed_probe"] = tcp_probe(cfg.client_ns, cfg.server_ip, RR_PORT)
    ev["denied_probe"] = tcp_probe(outsider.client_ns, cfg.server_ip, RR_PORT)
    ev["policy_denied_drops"] = _policy_denied_drops(sock) - drops0
    ev["ok"] = ev["allowed_probe"] == "open" and ev["denied_probe"] == "timeout" and ev["policy_denied_drops"] > 0
    return ev


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
    if "stream" not in cfg.workloads:
        return
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
    try:
        r = subprocess.run(ns_cmd(cfg.client_ns, CPU_CLIENT, argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cfg.key}: {argv[0]} did not finish within {timeout:g} s") from None
    if r.returncode != 0:
        raise BenchError(f"{cfg.key}: {argv[0]} failed: {(r.stderr or r.stdout).strip()[:300]}")
    return r.stdout


RR_MODES = {"rr": "-c", "crr": "-C", "crr_cf": "-X"}


def run_rr(cfg: Config, duration: float, warmup: float, mode: str = "rr") -> dict[str, Any]:
    """RR (one connection), CRR (-C: one connection per transaction, the server
    closes first) or CRR-cf (-X: the client closes first)."""
    monitor = MonitorStream(cfg.monitor_socket) if cfg.monitor_socket else None
    try:
        c0, a0 = cpu_sample(), process_cpu_s(cfg.agent_pid) if cfg.agent_pid else 0.0
        all0 = sum(process_cpu_s(p) for p in cfg.agent_pids)
        out = _run_client(
            cfg,
            [str(RR_BIN), RR_MODES[mode], cfg.server_ip, "-p", str(RR_PORT)] + ["-t", str(duration), "-w", str(warmup)],
            timeout=duration + warmup + 20,
        )
        c1, a1 = cpu_sample(), process_cpu_s(cfg.agent_pid) if cfg.agent_pid else 0.0
        all1 = sum(process_cpu_s(p) for p in cfg.agent_pids)
    finally:
        if monitor is not None:
            monitor.close()
    res = json.loads(out.strip().splitlines()[-1])
    res.update(_cpu(c0, c1))
    rate = res.get("tps" if mode == "rr" else "cps") or 0
    if rate:
        # cpu jiffies over the whole test incl. warm-up -> µs of CPU per transaction
        txs = rate * (duration + warmup)
        res["cpu_us_per_tx"] = round(res["busy_s"] / txs * 1e6, 2)
        if cfg.agent_pid:
            res["agent_us_per_tx"] = round((a1 - a0) / txs * 1e6, 2)
        if cfg.agent_pids:
            res["agents_us_per_tx"] = round((all1 - all0) / txs * 1e6, 2)
        if monitor is not None:
            res["monitor_events_per_tx"] = round(monitor.events / txs, 2)
    return res


def run_stream(cfg: Config, duration: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", cfg.server_ip, "-p", str(IPERF_PORT), "-t", str(max(1, round(duration)))]  # whole seconds
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


def measure_bpf_cost(cfg: Config, seconds: float, prog_ids: set[int], crr: bool,
                     owner: dict[int, str] | None = None) -> dict[str, Any]:
    """ns per program invocation during one RR or CRR run (kernel.bpf_stats_enabled;
    the caller enables it). The programs are shared by all endpoints of the node;
    only this configuration carries traffic while it runs. Only the agent's
    programs count (other clusters may run on this machine). ``owner`` (program id ->
    node) names each program ``<name>@<node>``, for nodes whose programs share names."""
    before = bpf_prog_stats()
    # no warm-up: the programs count every run, so every transaction must count too
    # (a 0.2 s warm-up made 10 packets per connection look like 12 runs)
    res = run_rr(cfg, seconds, 0.0, mode="crr" if crr else "rr")
    after = bpf_prog_stats()
    txs = res.get("connections" if crr else "transactions") or 1
    progs = {}
    for pid, (name, ns1, cnt1) in after.items():
        ns0, cnt0 = before.get(pid, (name, 0, 0))[1:]
        runs = cnt1 - cnt0
        # the agent's programs (also those that did not run), else whatever ran a lot
        if (pid in prog_ids) if prog_ids else runs > 100:
            progs[f"{name}@{owner[pid]}" if owner and pid in owner else name] = {
                "ns_per_run": round((ns1 - ns0) / runs, 1) if runs else None,
                "runs_per_tx": round(runs / txs, 2),
                "ns_per_tx": round((ns1 - ns0) / txs, 1),
            }
    return progs


def median_cost(samples: list[dict[str, dict]]) -> dict[str, dict]:
    """Per program, the median of each field over repeated measure_bpf_cost runs."""
    out: dict[str, dict] = {}
    for name in sorted({n for smp in samples for n in smp}):
        runs = [smp[name] for smp in samples if name in smp]
        out[name] = {"reps": len(runs)}
        for f in ("ns_per_run", "runs_per_tx", "ns_per_tx"):
            vals = [r[f] for r in runs if r.get(f) is not None]
            out[name][f] = round(statistics.median(vals), 1 if f != "runs_per_tx" else 2) if vals else None
    return out


@contextlib.contextmanager
def bpf_stats_enabled():
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    try:
        old = path.read_text().strip()
        path.write_text("1")
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            path.write_text(old)


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
    ("rr", "tps", "RR trans/s", True, "{:,.0f}"),
    ("crr", "cps", "CRR conn/s", True, "{:,.0f}"),
    ("crr_cf", "cps", "CRR-cf conn/s", True, "{:,.0f}"),
    ("stream", "gbit_s", "STREAM Gbit/s", True, "{:.2f}"),
    ("rr", "p50_us", "RR p50 µs", False, "{:.1f}"),
    ("rr", "p99_us", "RR p99 µs", False, "{:.1f}"),
    ("crr", "p50_us", "CRR p50 µs", False, "{:.1f}"),
    ("crr", "p99_us", "CRR p99 µs", False, "{:.1f}"),
    ("crr_cf", "p50_us", "CRR-cf p50 µs", False, "{:.1f}"),
    ("rr", "cpu_us_per_tx", "RR CPU µs/trans", False, "{:.1f}"),
    ("crr", "cpu_us_per_tx", "CRR CPU µs/conn", False, "{:.1f}"),
    # the agent's own CPU (pilus only: no ratio to A, which has no agent)
    ("crr", "agent_us_per_tx", "CRR agent µs/conn", False, "{:.2f}"),
    ("crr", "monitor_events_per_tx", "CRR monitor ev/conn", False, "{:.2f}"),
]
MAIN_METRICS = 4  # the rates: shown with IQR and clean medians; the rest as medians


def summarize(results: dict[str, list[dict]], keys: list[str]) -> dict[str, Any]:
    """results[key] = list over rounds of {"rr": {...}, "crr": {...}, "stream": {...}}."""
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


def _cell_ratio(r: dict | None) -> str:
    if not r or not r["n"]:
        return "-"
    return f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]"


def print_report(summary: dict[str, Any], keys: list[str], meta: dict[str, Any], labels: dict[str, str]) -> None:
    kw = max(len(k) for k in keys) + 2
    print()
    print(
        f"pilus bench: pod-to-pod on one machine, {meta['rounds']} rounds x {meta['duration']} s per test, "
        f"client CPU {CPU_CLIENT}, server CPU {CPU_SERVER}, MTU 1500"
    )
    print()
    for k in keys:
        print(f"  {k:<{kw}}{labels.get(k, '')}")
    print()
    print("absolute values (median over rounds)")
    head = f"{'config':<{kw}}" + "".join(f"{m[2]:>{max(len(m[2]) + 2, 11)}}" for m in METRICS)
    print(head)
    print("-" * len(head))
    for k in keys:
        line = f"{k:<{kw}}"
        for wl, fld, label, _hib, fmt in METRICS:
            v = summary[f"{wl}.{fld}"]["abs"].get(k)
            line += f"{(fmt.format(v) if v is not None else '-'):>{max(len(label) + 2, 11)}}"
        print(line)
    print()
    print(f"ratios X/A: median over rounds [IQR]; 'clean (n)': only rounds whose A'/A is within ±{CLEAN_TOL:.0%}")
    main = METRICS[:MAIN_METRICS]
    head = f"{'config':<{kw}}" + "".join(f"{m[2] + ' /A':>26}" for m in main)
    head += "".join(f"{m[2].split()[0] + ' clean (n)':>19}" for m in main)
    print(head)
    print("-" * len(head))
    for k in keys:
        if k == "A":
            continue
        line = f"{k:<{kw}}"
        for wl, fld, *_ in main:
            line += f"{_cell_ratio(summary[f'{wl}.{fld}']['ratio'].get(k)):>26}"
        for wl, fld, *_ in main:
            r = summary[f"{wl}.{fld}"]["ratio"].get(k) or {}
            cell = f"{r['clean_median']:.3f} ({r['clean_n']})" if r.get("clean_median") is not None else "-"
            line += f"{cell:>19}"
        print(line)
    print()
    rest = METRICS[MAIN_METRICS:]
    print("latency and CPU ratios X/A (median over rounds; lower is better)")
    head = f"{'config':<{kw}}" + "".join(f"{m[2]:>{max(len(m[2]) + 2, 11)}}" for m in rest)
    print(head)
    print("-" * len(head))
    for k in keys:
        if k == "A":
            continue
        line = f"{k:<{kw}}"
        for wl, fld, label, *_ in rest:
            r = summary[f"{wl}.{fld}"]["ratio"].get(k)
            cell = f"{r['median']:.3f}" if r and r["n"] else "-"
            line += f"{cell:>{max(len(label) + 2, 11)}}"
        print(line)
    print()
    print("ratios are per round against the same round's A; A'/A is the noise floor:")
    print("differences within it are noise. Higher is better for rates, lower for µs.")
    if meta.get("max_steal_pct", 0) > 2:
        print(f"warning: CPU steal up to {meta['max_steal_pct']:.1f} % during tests")
    if meta.get("bpf_cost"):
        print()
        print(
            f"pilus datapath cost (kernel.bpf_stats_enabled; median of {BPF_REPS} extra 1 s runs per "
            "configuration and workload, after the rounds; 'trans' = one RR transaction or one CRR connection):"
        )
        print(f"  {'config':<{kw}}{'workload':<10}{'program':<22}{'ns/run':>9}{'runs/trans':>12}{'ns/trans':>10}")
        for k, per_wl in meta["bpf_cost"].items():
            for wl, progs in per_wl.items():
                for name, v in sorted(progs.items()):
                    nsr = f"{v['ns_per_run']:.1f}" if v.get("ns_per_run") is not None else "-"
                    print(f"  {k:<{kw}}{wl:<10}{name:<22}{nsr:>9}{v['runs_per_tx']:>12.2f}{v['ns_per_tx']:>10.1f}")
    ev = meta.get("evidence", {})
    if ev:
        print()
        print("filter evidence (checked before the rounds):")
        for k, e in ev.items():
            verdict = "OK" if e.get("ok") else "FAILED"
            detail = ", ".join(f"{n}={v}" for n, v in e.items() if n not in ("ok", "backend"))
            print(f"  {k:<{kw}}{verdict}: {detail}")
    for note in meta.get("skipped", []):
        print(f"skipped: {note}")
    if meta.get("policy_error"):
        print(f"B+pol was not measured: {meta['policy_error']}")
    if meta.get("pol10k_error"):
        print(f"B+pol10k was not measured: {meta['pol10k_error']}")
    if meta.get("pilus_error"):
        print(f"B (pilus) was not measured: {meta['pilus_error']}")


# -------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per test (default 2)")
    ap.add_argument("--warmup", type=float, default=0.3, help="RR/CRR warm-up seconds (default 0.3)")
    ap.add_argument("--no-pilus", action="store_true", help="no cluster (no B configurations)")
    ap.add_argument("--no-policy", action="store_true", help="skip B+pol and B+pol10k")
    ap.add_argument("--no-pol10k", action="store_true", help="skip B+pol10k")
    ap.add_argument("--no-monitor", action="store_true", help="skip B+pol+mon")
    ap.add_argument("--no-iptables", action="store_true", help="skip C-ipt and C-ipt-linear")
    ap.add_argument("--no-crr", action="store_true", help="skip the CRR and CRR-cf workloads")
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
    meta: dict[str, Any] = {"rounds": args.rounds, "duration": args.duration, "skipped": [], "evidence": {}}
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
                pcfgs, doc, notes = build_pilus(
                    args.up_timeout, not args.no_policy, not args.no_pol10k, not args.no_monitor
                )
                configs += pcfgs
                meta.update(notes)
                bench_socket = doc["nodes"][0]["socket"]
            except Exception as e:  # noqa: BLE001 - reported, A/A' still measured
                msg = " ".join(str(e).split())
                meta["pilus_error"] = msg if len(msg) <= 600 else msg[:250] + " ... " + msg[-350:]
                log(f"pilus unavailable: {meta['pilus_error']}")
                exit_code = 1
        if args.no_iptables:
            meta["skipped"].append("C-ipt, C-ipt-linear (--no-iptables)")
        elif missing := iptables_missing():
            msg = f"C-ipt, C-ipt-linear: missing tools: {', '.join(missing)} (apt-get install iptables ipset)"
            meta["skipped"].append(msg)
            log(f"skipping {msg}")
        else:
            log(f"building C-ipt and C-ipt-linear (A + iptables, {BIG_N:,} allows)")
            t0 = time.monotonic()
            for key, tag, subnet, linear in (
                ("C-ipt", "ci", "10.206.0.0/24", False),
                ("C-ipt-linear", "cl", "10.207.0.0/24", True),
            ):
                try:
                    configs.append(build_iptables(key, tag, subnet, linear=linear))
                except BenchError as e:  # e.g. no ip_set / xt_set in this kernel
                    meta["skipped"].append(f"{key}: {e}")
                    log(f"skipping {key}: {e}")
            meta["iptables_setup_s"] = round(time.monotonic() - t0, 2)
            meta["iptables_version"] = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout.strip()
        from pilus.datapath import links

        servers: dict[tuple[str, str], Config] = {}
        for cfg in configs:
            # B+pol+mon shares the B+pol pods: one server serves both
            if (cfg.server_ns, cfg.server_ip) not in servers:
                start_servers(cfg)
                servers[(cfg.server_ns, cfg.server_ip)] = cfg
            # CRR-cf leaves TIME_WAIT on the client: reuse it (netperf setups do the same)
            links.set_sysctl("net.ipv4.tcp_tw_reuse", 1, cfg.client_ns)
        keys = [c.key for c in configs]
        by_key = {c.key: c for c in configs}
        labels = {c.key: c.label for c in configs}

        # evidence: each filter holds what it should and drops what it does not allow
        for k in ("B+pol", "B+pol10k"):
            if k in by_key:
                ref = "default/pserver" if k == "B+pol" else "default/p10server"
                meta["evidence"][k] = pilus_evidence(bench_socket, by_key["B"], by_key[k], ref)
        for k in ("C-ipt", "C-ipt-linear"):
            if k in by_key:
                meta["evidence"][k] = iptables_evidence(by_key[k])
        for k, e in meta["evidence"].items():
            log(f"{k}: filter evidence {'OK' if e['ok'] else 'FAILED'}: {e}")
            if not e["ok"]:
                exit_code = 1

        wl_all = tuple(w for w in WORKLOADS if not (args.no_crr and w in CRR_WORKLOADS))
        log("warm-up round (discarded)")
        for cfg in configs:
            for wl in wl_all:
                if wl not in cfg.workloads:
                    continue
                if wl == "stream":
                    run_stream(cfg, 1)
                else:
                    run_rr(cfg, 0.5, 0.2, mode=wl)

        results: dict[str, list[dict]] = {k: [] for k in keys}
        max_steal = 0.0
        for rnd in range(1, args.rounds + 1):
            tests = [(k, wl) for k in keys for wl in wl_all if wl in by_key[k].workloads]
            rng.shuffle(tests)
            sample: dict[str, dict] = {k: {} for k in keys}
            for k, wl in tests:
                cfg = by_key[k]
                if wl == "stream":
                    sample[k][wl] = run_stream(cfg, args.duration)
                else:
                    sample[k][wl] = run_rr(cfg, args.duration, args.warmup, mode=wl)
                max_steal = max(max_steal, sample[k][wl]["steal_pct"])
            for k in keys:
                results[k].append(sample[k])
            a = sample["A"]
            line = f"round {rnd}/{args.rounds}: A rr {a['rr']['tps']:,.0f}/s"
            for wl in CRR_WORKLOADS:
                if wl in a:
                    line += f" {wl} {a[wl]['cps']:,.0f}/s"
            for k in keys[1:]:
                s = sample[k]
                line += f" | {k} rr {s['rr']['tps'] / a['rr']['tps']:.3f}"
                for wl in CRR_WORKLOADS:
                    if wl in s and wl in a:
                        line += f" {wl} {s[wl]['cps'] / a[wl]['cps']:.3f}"
            log(line)
        meta["max_steal_pct"] = max_steal
        bkeys = [k for k in ("B", "B+pol", "B+pol+mon", "B+pol10k") if k in by_key]
        if bkeys:
            prog_ids = pilus_prog_ids(bench_socket)
            raw: dict[str, dict[str, list]] = {k: {} for k in bkeys}
            with bpf_stats_enabled() as on:
                if on and shutil.which("bpftool"):
                    log(f"BPF run time per program (kernel.bpf_stats_enabled), {BPF_REPS} x on {', '.join(bkeys)}")
                    for _rep in range(BPF_REPS):
                        for wl in [w for w in ("rr", "crr") if w in wl_all]:
                            for k in rng.sample(bkeys, len(bkeys)):
                                c = measure_bpf_cost(by_key[k], 1.0, prog_ids, crr=wl == "crr")
                                raw[k].setdefault(wl, []).append(c)
                    meta["bpf_cost"] = {k: {wl: median_cost(v) for wl, v in per.items()} for k, per in raw.items()}
                    meta["bpf_cost_samples"] = raw
                else:
                    meta["skipped"].append("BPF ns/run: needs bpftool and kernel.bpf_stats_enabled")
        summary = summarize(results, keys)
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        print_report(summary, keys, meta, labels)
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
        try:
            destroy_plain()
        except Exception as e:  # noqa: BLE001
            print(f"bench: cleanup of the {A_PREFIX}* namespaces failed: {e}", file=sys.stderr)
            exit_code = exit_code or 1
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
