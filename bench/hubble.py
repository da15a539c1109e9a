"""What Hubble costs: pod-to-pod CRR/RR with Hubble off, on, and on with traces; and the
flows per second one node's observer ingests and serves.

    python -m bench.hubble [--rounds 7] [--duration 2] [--no-pods] [--no-observer] [--json FILE]

1. Pods (issue 12, "Performance"). Four one-node clusters side by side, each with an
   L3/L4 policy selecting the server pod (bench.run's POLICY_YAML: pclient -> pserver
   on the benchmark port), so every new connection asks for one ingress policy-verdict
   event. Monitor aggregation is the agents' default (medium). The agents run the
   cluster's own command line (plan.agent_argv, which also turns on the Hubble metrics
   flow,drop,tcp,policy) with one change each:
     off      --no-enable-hubble (nobody listens: the datapath emits nothing)
     off'     a second pod pair of the same cluster: off'/off is the noise floor
     on       as the cluster starts it (Hubble on, --hubble-monitor-events
              drop,policy-verdict, the default)
     on-nomet on without --hubble-metrics (what the metrics handlers add)
     on+trace --hubble-monitor-events drop,policy-verdict,trace
   Workloads RR and CRR (bench/rr.c, the server closes first), client on CPU 0 and
   server on CPU 1; every round runs every (configuration, workload) once in random
   order after a discarded warm-up round; ratios X/off are taken per round and
   reported as median [IQR] over rounds (goal: CRR on/off >= 0.95). Per CRR test: the
   agent's CPU per connection (/proc/<pid>/stat) and the flows Hubble stored per
   connection (ServerStatus seen_flows over hubble.sock).
2. Observer. A child process (the "agent": HubblePart, its EventHub and its gRPC server
   on a unix socket, without a datapath) is fed real typed events of
   pilus.datapath.events (policy verdicts, drops, traces of TCP packets between two
   known endpoints) through the hub's reader interface, in batches of 1,000, as fast as
   it takes them: flows/s ingested and the child's CPU per 1,000 flows, with and
   without the Hubble metrics. Then GetFlows from this process over the unix socket:
   number=N (non-follow) out of a full ring, and a follow stream while the child
   ingests: flows/s served and the child's CPU per 1,000 flows. Decoding ring-buffer
   bytes into typed events (pilus.datapath.events, ~7 µs an event) is not in these
   numbers: it is paid before the hub, by any subscriber.

Addresses: pods 10.218.0.0/16, underlay 172.31.234.0/24 (nothing else uses them).
Everything made here (clusters hboff, hbon, hbnom, hbtrc; the observer child and its
socket directory; rr servers) is removed at the start and at the end, also on failure,
Ctrl-C or SIGTERM. Take /tmp/pilus-e2e.lock around it (`flock /tmp/pilus-e2e.lock
python -m bench.hubble`) when e2e tests may run at the same time.
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
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from bench.run import (
    BUILD,
    POLICY_YAML,
    REPO,
    RR_PORT,
    BenchError,
    Config,
    _endpoint,
    _import_policy,
    _ip,
    agent_pid,
    build_rr,
    check_tools,
    process_cpu_s,
    quartiles,
    run_rr,
    start_servers,
    stop_servers,
    tcp_probe,
)

WORKLOADS = ("rr", "crr")
GOAL_CRR = 0.95
TRACE_EVENTS = "drop,policy-verdict,trace"


@dataclass(frozen=True)
class ClusterPlan:
    name: str
    pod_cidr: str
    underlay: str
    extra: tuple[str, ...] = ()  # flags added to the cluster's agent command line
    drop_metrics: bool = False  # remove the cluster's --hubble-metrics
    hubble: bool = True


CLUSTERS = (
    ClusterPlan("hboff", "10.218.0.0/18", "172.31.234.0/26", extra=("--no-enable-hubble",), hubble=False),
    ClusterPlan("hbon", "10.218.64.0/18", "172.31.234.64/26"),
    ClusterPlan("hbnom", "10.218.128.0/18", "172.31.234.128/26", drop_metrics=True),
    ClusterPlan("hbtrc", "10.218.192.0/18", "172.31.234.192/26", extra=("--hubble-monitor-events", TRACE_EVENTS)),
)
# (config key, cluster, pod pair suffix, label)
CONFIGS = (
    ("off", "hboff", "", "Hubble off (--no-enable-hubble): the denominator"),
    ("off'", "hboff", "2", "a second pod pair of the off cluster (noise floor)"),
    ("on", "hbon", "", "Hubble on, drop,policy-verdict (default), metrics flow,drop,tcp,policy"),
    ("on-nomet", "hbnom", "", "Hubble on, drop,policy-verdict, no --hubble-metrics"),
    ("on+trace", "hbtrc", "", f"Hubble on, {TRACE_EVENTS}, metrics on"),
)


def log(msg: str) -> None:
    print(f"[hubble {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ clusters


def agent_cmd(plan: ClusterPlan, spec: Any) -> list[str]:
    """The cluster's own agent command line (plan.agent_argv) with plan's changes, as
    cluster_up's agent_cmd (str.format placeholders: only {python} is left)."""
    from pilus.cluster.plan import agent_argv, build_cluster_doc

    doc = build_cluster_doc(spec)
    argv = agent_argv(doc, doc["nodes"][0], "{python}")
    if plan.drop_metrics and "--hubble-metrics" in argv:
        i = argv.index("--hubble-metrics")
        del argv[i : i + 2]
    return [a.replace("{", "{{").replace("}", "}}") if a != "{python}" else a for a in argv] + list(plan.extra)


def destroy_clusters() -> None:
    from pilus.cluster import cluster_down

    for plan in CLUSTERS:
        cluster_down(plan.name)


def hubble_seen(sock_path: str) -> int | None:
    """ServerStatus.seen_flows of one node's hubble.sock (None: no Hubble there)."""
    if not Path(sock_path).exists():
        return None
    import grpc

    from pilus.hubble.protos import observer_pb2, observer_pb2_grpc

    with grpc.insecure_channel(f"unix:{sock_path}") as ch:
        st = observer_pb2_grpc.ObserverStub(ch).ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        return int(st.seen_flows)


@dataclass
class PodConfig:
    cfg: Config
    cluster: str
    hubble_sock: str = ""
    agent_sock: str = ""


def build_clusters(timeout: float) -> tuple[list[PodConfig], dict[str, Any]]:
    from pilus.cluster import ClusterSpec, cluster_up

    socks: dict[str, dict] = {}
    notes: dict[str, Any] = {"agent_cmd": {}}
    for plan in CLUSTERS:
        spec = ClusterSpec(name=plan.name, nodes=1, pod_cidr=IPv4Network(plan.pod_cidr),
                           underlay_cidr=IPv4Network(plan.underlay))
        cmd = agent_cmd(plan, spec)
        notes["agent_cmd"][plan.name] = " ".join(cmd)
        log(f"cluster up {plan.name!r}: {' '.join(cmd[3:])}")
        doc = cluster_up(spec, agent_cmd=cmd, timeout=timeout)
        node = doc["nodes"][0]
        socks[plan.name] = {"sock": node["socket"], "hubble": str(Path(node["state_dir"]) / "hubble.sock"),
                            "hubble_on": plan.hubble}
        _import_policy(node["socket"], POLICY_YAML)
    out = []
    for key, cluster, suffix, label in CONFIGS:
        s = socks[cluster]
        c = _endpoint(s["sock"], f"default/pclient{suffix}", "app=pclient")
        sv = _endpoint(s["sock"], f"default/pserver{suffix}", "app=pserver")
        cfg = Config(key, label, c["netns"], sv["netns"], _ip(c), _ip(sv), workloads=WORKLOADS)
        cfg.agent_pid = agent_pid(s["sock"])
        out.append(PodConfig(cfg, cluster, s["hubble"] if s["hubble_on"] else "", s["sock"]))
    # an outsider pod (no label the policy allows) in the off cluster: the policy must drop it
    o = _endpoint(socks["hboff"]["sock"], "default/outsider", "app=outsider")
    notes["outsider"] = {"netns": o["netns"], "ip": _ip(o)}
    return out, notes


def evidence(pcs: list[PodConfig], outsider_ns: str) -> dict[str, Any]:
    """Each pair connects; the off cluster's policy drops the outsider (it selects the
    servers); a Hubble cluster stores flows for new connections, the off one has no socket."""
    ev: dict[str, Any] = {}
    for pc in pcs:
        e: dict[str, Any] = {}
        seen0 = hubble_seen(pc.hubble_sock) if pc.hubble_sock else None
        e["allowed_probe"] = tcp_probe(pc.cfg.client_ns, pc.cfg.server_ip, RR_PORT)
        if pc.cfg.key == "off":
            e["outsider_probe"] = tcp_probe(outsider_ns, pc.cfg.server_ip, RR_PORT)
        if pc.hubble_sock:
            time.sleep(0.3)
            seen1 = hubble_seen(pc.hubble_sock)
            e["hubble_new_flows"] = (seen1 or 0) - (seen0 or 0)
        else:
            e["hubble_socket"] = "present" if (Path(pc.agent_sock).parent / "hubble.sock").exists() else "absent"
        e["ok"] = (e["allowed_probe"] == "open" and e.get("outsider_probe", "timeout") == "timeout"
                   and (e.get("hubble_new_flows", 1) > 0) and e.get("hubble_socket", "absent") == "absent")
        ev[pc.cfg.key] = e
    return ev


def measure(pc: PodConfig, wl: str, duration: float, warmup: float) -> dict[str, Any]:
    seen0 = hubble_seen(pc.hubble_sock) if pc.hubble_sock and wl == "crr" else None
    res = run_rr(pc.cfg, duration, warmup, mode=wl)
    if seen0 is not None:
        seen1 = hubble_seen(pc.hubble_sock) or 0
        conns = (res.get("cps") or 0) * (duration + warmup)
        if conns:
            res["flows_per_conn"] = round((seen1 - seen0) / conns, 3)
    return res


def run_pods(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    pcs: list[PodConfig] = []
    try:
        destroy_clusters()
        pcs, notes = build_clusters(args.up_timeout)
        meta.update(notes)
        served: set[tuple[str, str]] = set()
        for pc in pcs:
            start_servers(pc.cfg)
            served.add((pc.cfg.server_ns, pc.cfg.server_ip))
        ev = evidence(pcs, notes["outsider"]["netns"])
        meta["evidence"] = ev
        for k, e in ev.items():
            log(f"{k}: evidence {'OK' if e['ok'] else 'FAILED'}: {e}")
        if not all(e["ok"] for e in ev.values()):
            raise BenchError("evidence failed (see above): the configurations are not what they claim")
        log("warm-up round (discarded)")
        for pc in pcs:
            for wl in WORKLOADS:
                run_rr(pc.cfg, 0.5, 0.2, mode=wl)
        by_key = {pc.cfg.key: pc for pc in pcs}
        results: dict[str, list[dict]] = {k: [] for k in by_key}
        for rnd in range(1, args.rounds + 1):
            tests = [(k, wl) for k in by_key for wl in WORKLOADS]
            rng.shuffle(tests)
            sample: dict[str, dict] = {k: {} for k in by_key}
            for k, wl in tests:
                sample[k][wl] = measure(by_key[k], wl, args.duration, args.warmup)
            for k in by_key:
                results[k].append(sample[k])
            base = sample["off"]
            line = f"round {rnd}/{args.rounds}: off rr {base['rr']['tps']:,.0f}/s crr {base['crr']['cps']:,.0f}/s"
            for k in list(by_key)[1:]:
                s = sample[k]
                rr, crr = s["rr"]["tps"] / base["rr"]["tps"], s["crr"]["cps"] / base["crr"]["cps"]
                line += f" | {k} rr {rr:.3f} crr {crr:.3f}"
            log(line)
        return results
    finally:
        for pc in pcs:
            stop_servers(pc.cfg)


PMETRICS = (
    # (workload, field, label, ratio to off?)
    ("rr", "tps", "RR trans/s", True),
    ("crr", "cps", "CRR conn/s", True),
    ("rr", "p50_us", "RR p50 µs", True),
    ("crr", "p50_us", "CRR p50 µs", True),
    ("crr", "p99_us", "CRR p99 µs", True),
    ("crr", "cpu_us_per_tx", "CRR CPU µs/conn", False),
    ("crr", "agent_us_per_tx", "CRR agent µs/conn", False),
    ("crr", "flows_per_conn", "CRR flows/conn", False),
    ("crr", "steal_pct", "steal %", False),
)


def summarize_pods(results: dict[str, list[dict]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rounds = len(results["off"])
    for wl, fld, label, ratio in PMETRICS:
        row: dict[str, Any] = {"label": label, "abs": {}, "ratio": {}}
        for k, samples in results.items():
            vals = [s[wl][fld] for s in samples if fld in s.get(wl, {})]
            q1, med, q3 = quartiles(vals)
            row["abs"][k] = {"median": med, "q1": q1, "q3": q3, "n": len(vals)} if vals else None
            if ratio and k != "off":
                rs = [results[k][i][wl][fld] / results["off"][i][wl][fld] for i in range(rounds)
                      if results["off"][i][wl].get(fld) and fld in results[k][i][wl]]
                q1, med, q3 = quartiles(rs)
                row["ratio"][k] = {"median": med, "q1": q1, "q3": q3, "n": len(rs)}
        out[f"{wl}.{fld}"] = row
    return out


def _r(r: dict | None, digits: int = 3) -> str:
    if not r or not r.get("n"):
        return "-"
    return f"{r['median']:.{digits}f} [{r['q1']:.{digits}f}-{r['q3']:.{digits}f}]"


def print_pods(summary: dict[str, Any], keys: list[str], meta: dict[str, Any]) -> None:
    print()
    print(f"Hubble cost, pod to pod on one node, L3/L4 policy on the server, monitor aggregation medium; "
          f"{meta['rounds']} rounds x {meta['duration']} s per test, client CPU 0, server CPU 1")
    for key, _cluster, _sfx, label in CONFIGS:
        print(f"  {key:<10}{label}")
    print()
    print("ratios X/off, median over rounds [IQR] (per round against that round's off; off'/off = noise floor)")
    head = f"{'config':<10}" + "".join(f"{m[2] + ' /off':>28}" for m in PMETRICS if m[3])
    print(head)
    print("-" * len(head))
    for k in keys[1:]:
        print(f"{k:<10}" + "".join(f"{_r(summary[f'{wl}.{fld}']['ratio'].get(k)):>28}"
                                   for wl, fld, _l, ratio in PMETRICS if ratio))
    print()
    print("absolute values, median over rounds [IQR]")
    head = f"{'config':<10}" + "".join(f"{m[2]:>26}" for m in PMETRICS)
    print(head)
    print("-" * len(head))
    for k in keys:
        line = f"{k:<10}"
        for wl, fld, *_ in PMETRICS:
            a = summary[f"{wl}.{fld}"]["abs"].get(k)
            digits = 0 if fld in ("tps", "cps") else (3 if fld == "flows_per_conn" else 1)
            line += f"{_r(a, digits):>26}"
        print(line)
    crr = summary["crr.cps"]["ratio"]
    floor = _r(crr.get("off'"))
    for k in ("on", "on-nomet", "on+trace"):
        r = crr.get(k)
        if r and r["n"]:
            verdict = "meets" if r["median"] >= GOAL_CRR else "misses"
            print(f"CRR {k}/off {r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]: {verdict} the goal >= {GOAL_CRR} "
                  f"(noise floor off'/off {floor})")


# ------------------------------------------------------------------ observer


OBS_CAPACITY = 65535  # the child's ring (2^16 - 1): holds a whole number=N answer
OBS_BATCH = 1000
OBS_INGEST = 50_000  # events per ingest measurement
OBS_SERVE = 20_000  # number= of the non-follow GetFlows
OBS_FOLLOW = 20_000  # flows ingested while a follow stream reads
OBS_TYPES = ("policy-verdict", "drop", "trace")
CLIENT_IP, SERVER_IP = "10.218.250.5", "10.218.250.6"
METRIC_HANDLERS = ("flow", "drop", "tcp", "policy")


def _tcp_packet(sport: int, flags: int = 0x02) -> bytes:
    """Ethernet + IPv4 + TCP (SYN by default), client -> server port RR_PORT."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0x4000, 64, 6, 0,
                     socket.inet_aton(CLIENT_IP), socket.inet_aton(SERVER_IP))
    tcp = struct.pack("!HHIIBBHHH", sport, RR_PORT, 1, 0, 5 << 4, flags, 64240, 0, 0)
    eth = bytes.fromhex("020000000106" "020000000105") + struct.pack("!H", 0x0800)
    return eth + ip + tcp


def make_events(kind: str, n: int) -> list:
    """n typed events of one kind (distinct client ports), as the agent's reader makes them."""
    from pilus.datapath import abi
    from pilus.datapath.events import DropEvent, PolicyVerdictEvent, TraceEvent, parse_packet

    out = []
    now = time.time()
    for i in range(n):
        pkt = _tcp_packet(32768 + i % 28000)
        common = dict(source_ep=6, src_identity=20001, dst_identity=20002, dst_ep=0, ifindex=101, hash=i,
                      orig_len=len(pkt), cap_len=len(pkt), data=pkt, packet=parse_packet(pkt),
                      version=abi.NOTIFY_CAPTURE_VER, time=now)
        if kind == "policy-verdict":
            out.append(PolicyVerdictEvent(direction=abi.POLICY_INGRESS, remote_identity=20001, local_identity=20002,
                                          verdict=0, match_type=2, policy_proto=6, policy_dport=RR_PORT, **common))
        elif kind == "drop":
            out.append(DropEvent(reason=133, line=812, file=1, **common))
        else:
            out.append(TraceEvent(obs_point=abi.TRACE_TO_LXC, ct_reason=0, **common))
    return out


class PushReader:
    """EventReader's interface for the hub: events pushed here come out of poll()."""

    def __init__(self) -> None:
        from pilus.datapath.events import MONITOR_TYPES

        self.notify_of = {name: notify for notify, name in MONITOR_TYPES.items()}
        self.pending: list = []
        self.records = 0
        self.records_by_type: dict[int, int] = {}
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)

    def push(self, events: list) -> None:
        self.pending.extend(events)
        os.write(self._w, b"x")

    def fileno(self) -> int:
        return self._r

    def poll(self, timeout_ms: int = 0, want=None) -> list:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        events, self.pending = self.pending, []
        self.records += len(events)
        return [e for e in events if want is None or want(self.notify_of[e.kind])]

    def set_listen_mask(self, mask: int) -> None:
        pass

    def lost(self) -> int:
        return 0

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def observer_child(sockdir: str) -> int:
    """The child: HubblePart + EventHub + gRPC server on <sockdir>/hubble.sock. Reads
    one JSON command a line on stdin, answers one JSON line on stdout."""
    import asyncio

    from pilus.hubble.lookup import EndpointDetails, StaticLookup
    from pilus.hubble.metrics import HubbleMetrics
    from pilus.hubble.part import HubblePart
    from pilus.observer.monitor import EventHub

    lookup = StaticLookup([
        EndpointDetails(5, 20001, "default", "pclient", ("k8s:app=pclient", "k8s:io.kubernetes.pod.namespace=default"),
                        ip=CLIENT_IP),
        EndpointDetails(6, 20002, "default", "pserver", ("k8s:app=pserver", "k8s:io.kubernetes.pod.namespace=default"),
                        ip=SERVER_IP),
    ])
    pools = {k: make_events(k, 2000) for k in OBS_TYPES}

    async def main() -> None:
        reader = PushReader()
        hub = EventHub(reader, drain_interval=0.0)  # as fast as ingest takes them: no pause between drains
        await hub.start()
        metrics = HubbleMetrics(METRIC_HANDLERS)
        part = HubblePart(hub, lookup, node_name="hbench/hbench-node1", socket_path=Path(sockdir) / "hubble.sock",
                          capacity=OBS_CAPACITY, cluster_name="hbench", event_types=frozenset(OBS_TYPES),
                          metrics=metrics)
        await part.start()
        loop = asyncio.get_running_loop()
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    return
                cmd = json.loads(line)
                if cmd["cmd"] == "quit":
                    return
                part.metrics = metrics if cmd.get("metrics", True) else None
                pool, n = pools[cmd["type"]], int(cmd["n"])
                seen0, lost0 = part.ring.seen_flows, part.ring.lost
                t0, c0 = time.perf_counter(), time.process_time()
                pushed = 0
                while pushed < n:
                    batch = min(OBS_BATCH, n - pushed)
                    start = pushed % len(pool)  # len(pool) is a multiple of OBS_BATCH
                    reader.push(pool[start : start + batch])
                    pushed += batch
                    while part.ring.seen_flows - seen0 + (part.ring.lost - lost0) < pushed:
                        await asyncio.sleep(0.0005)
                t1, c1 = time.perf_counter(), time.process_time()
                print(json.dumps({"n": n, "seconds": t1 - t0, "cpu_s": c1 - c0,
                                  "flows": part.ring.seen_flows - seen0, "lost": part.ring.lost - lost0,
                                  "parse_errors": part.parse_errors}), flush=True)
        finally:
            await part.stop()
            await hub.stop()

    asyncio.run(main())
    return 0


class ObserverChild:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hbench-", dir="/tmp")  # short: sun_path holds 107 bytes
        self.sock = str(Path(self.dir) / "hubble.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.hubble", "--observer-child", self.dir],
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        ready = self._line(timeout=120)
        if not ready.get("ready"):
            raise BenchError(f"observer child did not start: {ready}")

    def _line(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise BenchError(f"observer child: no answer within {timeout:.0f} s (rc={self.proc.poll()})")
        return json.loads(box[0])

    def ingest(self, kind: str, n: int, *, metrics: bool = True, wait: bool = True) -> dict | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "ingest", "type": kind, "n": n, "metrics": metrics}) + "\n")
        self.proc.stdin.flush()
        return self._line(timeout=300) if wait else None

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _get_flows(sock: str, number: int) -> tuple[int, float]:
    """GetFlows(number) without follow: (flows received, seconds)."""
    import grpc

    from pilus.hubble.protos import observer_pb2, observer_pb2_grpc

    with grpc.insecure_channel(f"unix:{sock}", options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = observer_pb2_grpc.ObserverStub(ch)
        stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)  # connected before the clock starts
        t0, got = time.perf_counter(), 0
        for resp in stub.GetFlows(observer_pb2.GetFlowsRequest(number=number), timeout=120):
            got += resp.HasField("flow")
        return got, time.perf_counter() - t0


@dataclass
class FollowStream:
    sock: str
    got: int = 0
    last: float = 0.0

    def start(self) -> None:
        import grpc

        from pilus.hubble.protos import observer_pb2, observer_pb2_grpc

        self._ch = grpc.insecure_channel(f"unix:{self.sock}")
        stub = observer_pb2_grpc.ObserverStub(self._ch)
        stub.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
        self._call = stub.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        time.sleep(0.3)  # the server has started the stream at the ring's end

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for resp in self._call:
                if resp.HasField("flow"):
                    self.got += 1
                    self.last = time.perf_counter()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call.cancel()
        self._thread.join(timeout=5)
        self._ch.close()


def run_observer(rounds: int) -> dict[str, Any]:
    child = ObserverChild()
    samples: dict[str, list[dict]] = {}

    def add(key: str, flows: int, seconds: float, cpu_s: float, **extra: Any) -> None:
        samples.setdefault(key, []).append({"flows": flows, "seconds": seconds, "cpu_s": cpu_s,
                                            "flows_per_s": flows / seconds if seconds else 0.0,
                                            "cpu_ms_per_1k": cpu_s / flows * 1e6 if flows else None,
                                            **extra})

    try:
        child.ingest("policy-verdict", 5000)  # warm-up (imports, first flows, caches)
        for rnd in range(1, rounds + 1):
            for kind in ("drop", "trace", "policy-verdict"):  # the ring ends full of policy verdicts
                for met in (True, False):
                    r = child.ingest(kind, OBS_INGEST, metrics=met)
                    assert r is not None
                    add(f"ingest {kind}{'' if met else ' (no metrics)'}", r["flows"], r["seconds"], r["cpu_s"],
                        lost=r["lost"], parse_errors=r["parse_errors"])
            # the ring is full of policy verdicts (OBS_CAPACITY): serve OBS_SERVE of them
            c0 = child.cpu_s()
            got, secs = _get_flows(child.sock, OBS_SERVE)
            add("GetFlows number=N", got, secs, child.cpu_s() - c0, client="bench process")
            # a follow stream while the child ingests OBS_FOLLOW policy verdicts (metrics on)
            fs = FollowStream(child.sock)
            fs.start()
            c0, t0 = child.cpu_s(), time.perf_counter()
            child.ingest("policy-verdict", OBS_FOLLOW)
            deadline = time.monotonic() + 60
            while fs.got < OBS_FOLLOW and time.monotonic() < deadline:
                time.sleep(0.01)
            end = fs.last or time.perf_counter()
            add("GetFlows follow (while ingesting)", fs.got, end - t0, child.cpu_s() - c0)
            fs.close()
            line = ", ".join(f"{k} {v[-1]['flows_per_s']:,.0f}/s" for k, v in samples.items())
            log(f"observer round {rnd}/{rounds}: {line}")
    finally:
        child.close()
    return samples


def summarize_observer(samples: dict[str, list[dict]]) -> dict[str, Any]:
    out = {}
    for k, ss in samples.items():
        row = {}
        for fld in ("flows_per_s", "cpu_ms_per_1k"):
            vals = [s[fld] for s in ss if s.get(fld) is not None]
            q1, med, q3 = quartiles(vals)
            row[fld] = {"median": med, "q1": q1, "q3": q3, "n": len(vals)}
        row["flows"] = ss[-1]["flows"]
        row["lost"] = sum(s.get("lost", 0) for s in ss)
        out[k] = row
    return out


def print_observer(summary: dict[str, Any], rounds: int) -> None:
    print()
    print(f"Hubble observer of one node (HubblePart + EventHub + gRPC server in a child process, no datapath), "
          f"{rounds} rounds; median [IQR]")
    print(f"  ingest: {OBS_INGEST:,} typed events per test in batches of {OBS_BATCH:,}, metrics "
          f"{','.join(METRIC_HANDLERS)} unless '(no metrics)'; ring {OBS_CAPACITY:,}")
    print(f"  GetFlows number={OBS_SERVE:,} over the unix socket out of a full ring; follow: {OBS_FOLLOW:,} "
          "policy verdicts ingested while one follow stream reads (CPU = ingest + serve)")
    head = f"{'test':<38}{'flows/s':>28}{'child CPU ms / 1,000 flows':>30}{'lost':>8}"
    print(head)
    print("-" * len(head))
    for k, row in summary.items():
        print(f"{k:<38}{_r(row['flows_per_s'], 0):>28}{_r(row['cpu_ms_per_1k'], 1):>30}{row['lost']:>8}")


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hubble", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7)")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per test (default 2)")
    ap.add_argument("--warmup", type=float, default=0.3, help="RR/CRR warm-up seconds (default 0.3)")
    ap.add_argument("--observer-rounds", type=int, default=5, help="rounds of the observer tests (default 5)")
    ap.add_argument("--no-pods", action="store_true", help="skip the pod-to-pod part (no clusters)")
    ap.add_argument("--no-observer", action="store_true", help="skip the observer part")
    ap.add_argument("--seed", type=int, default=None, help="seed of the run order")
    ap.add_argument("--json", type=Path, default=None, help="write all samples here")
    ap.add_argument("--up-timeout", type=float, default=90.0, help="cluster up timeout")
    ap.add_argument("--observer-child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.observer_child:
        return observer_child(args.observer_child)

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    meta: dict[str, Any] = {"rounds": args.rounds, "duration": args.duration, "started": time.strftime("%F %T")}
    doc: dict[str, Any] = {"meta": meta}
    exit_code = 0
    made_clusters = False
    try:
        if not args.no_pods:
            check_tools()
            build_rr()
            made_clusters = True
            try:
                results = run_pods(args, meta)
                doc["pods"] = {"summary": summarize_pods(results), "samples": results}
                print_pods(doc["pods"]["summary"], list(results), meta)
            except Exception as e:  # noqa: BLE001 - reported; the observer part still runs
                msg = " ".join(str(e).split())
                meta["pods_error"] = msg[:600]
                log(f"pod-to-pod part not measured: {msg[:600]}")
                exit_code = 1
            finally:
                destroy_clusters()
                made_clusters = False
        if not args.no_observer:
            samples = run_observer(args.observer_rounds)
            doc["observer"] = {"summary": summarize_observer(samples), "samples": samples}
            print_observer(doc["observer"]["summary"], args.observer_rounds)
        out = args.json or (BUILD / "bench" / f"hubble-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"samples: {out}")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        exit_code = 130
    except BenchError as e:
        print(f"bench.hubble: {e}", file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if made_clusters:
            try:
                destroy_clusters()
            except Exception as e:  # noqa: BLE001
                print(f"bench.hubble: cluster cleanup failed: {e}", file=sys.stderr)
                exit_code = exit_code or 1
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
