"""Cross-node pod-to-pod benchmark: pilus tunnel/native vs the kernel doing the same.

    python -m bench.crossnode [--rounds 5] [--duration 2] [--quick] [--no-pilus] [--json FILE]

Configurations, one pod on each of two nodes, all measured in the same run
(bench.crossnode_topo for the baselines):
  A-vxlan   two node namespaces on a bridge, joined by a plain kernel VXLAN
            (vx0: VNI 42, UDP 8472, fixed remote; pod routes MTU 1450), no BPF.
  B-tunnel  pilus `cluster up --nodes 2 --routing-mode tunnel` (pilus_vxlan,
            collect-metadata), one endpoint per node.
  A-routed  the same nodes with plain kernel routing (`<peer pod /24> via
            <peer node IP>`), no BPF.
  B-native  pilus `--routing-mode native`.
Ratios: B-tunnel/A-vxlan and B-native/A-routed, per round, median [IQR] over
rounds (goal: >= 1.00 for RR and STREAM, >= 0.95 for CRR). Workloads and the
protocol are bench.run's: RR and CRR (bench/rr.c) and STREAM (iperf3), client
on CPU 0 and server on CPU 1, every round every (configuration, workload) once
in random order, a discarded warm-up round. Every pilus RR/CRR test also
records both agents' CPU time per transaction (they are not pinned); after the
rounds, 3 extra 1 s RR and CRR runs per pilus configuration with
kernel.bpf_stats_enabled=1 give every program's ns/run and runs per
transaction on both nodes. Before the rounds each
configuration must pass a TCP probe across the nodes, and the packets must be
seen on its cross-node device (vx0 / pilus_vxlan for the tunnels, eth0 for
routing); a pilus configuration that fails is reported and left out.
Everything made here (bx-* namespaces, clusters bxtun and bxnat) is removed at
the start and at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import signal
import statistics
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from bench import crossnode_topo as topo
from bench.run import (
    BPF_REPS,
    BUILD,
    RR_PORT,
    BenchError,
    Config,
    _endpoint,
    _ip,
    agent_pid,
    bpf_stats_enabled,
    build_rr,
    check_tools,
    measure_bpf_cost,
    median_cost,
    pilus_prog_ids,
    quartiles,
    run_rr,
    run_stream,
    start_servers,
    stop_servers,
    tcp_probe,
)

WORKLOADS = ("rr", "crr", "stream")
# (pilus key, baseline key, cluster name, routing mode, underlay, pod CIDR)
PILUS = (
    ("B-tunnel", "A-vxlan", "bxtun", "tunnel", "172.31.244.0/25", "10.208.0.0/17"),
    ("B-native", "A-routed", "bxnat", "native", "172.31.244.128/25", "10.208.128.0/17"),
)
BASELINES = (
    ("A-vxlan", "vx", "172.31.243.0/25", "10.209.0.0/17", True),
    ("A-routed", "rt", "172.31.243.128/25", "10.209.128.0/17", False),
)
LABELS = {
    "A-vxlan": "kernel VXLAN between two node namespaces, MTU 1450, no BPF",
    "B-tunnel": "pilus 2 nodes, --routing-mode tunnel (pilus_vxlan)",
    "A-routed": "kernel routing via the peer node IP, MTU 1500, no BPF",
    "B-native": "pilus 2 nodes, --routing-mode native",
}
PAIRS = (("B-tunnel", "A-vxlan"), ("B-native", "A-routed"))
GOALS = {"rr": 1.00, "crr": 0.95, "stream": 1.00}
METRICS = (("rr", "tps", "RR trans/s", "{:,.0f}"), ("crr", "cps", "CRR conn/s", "{:,.0f}"),
           ("stream", "gbit_s", "STREAM Gbit/s", "{:.2f}"), ("rr", "p50_us", "RR p50 µs", "{:.1f}"),
           ("crr", "p50_us", "CRR p50 µs", "{:.1f}"), ("rr", "cpu_us_per_tx", "RR CPU µs/tr", "{:.1f}"),
           ("crr", "cpu_us_per_tx", "CRR CPU µs/conn", "{:.1f}"),
           ("rr", "agents_us_per_tx", "RR agents µs/tr", "{:.1f}"),
           ("crr", "agents_us_per_tx", "CRR agents µs/c", "{:.1f}"))


def log(msg: str) -> None:
    print(f"[crossnode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def destroy_pilus() -> None:
    from pilus.cluster import cluster_down

    for _key, _base, name, *_ in PILUS:
        cluster_down(name)


def build_pilus(key: str, name: str, mode: str, underlay: str, pod_cidr: str, timeout: float) -> tuple[Config, dict]:
    """A two-node cluster in `mode`, client endpoint on node1, server on node2."""
    from pilus.cluster import ClusterSpec, cluster_up

    if "routing_mode" not in {f.name for f in dataclasses.fields(ClusterSpec)}:
        raise BenchError("this pilus has no --routing-mode (ClusterSpec.routing_mode): cross-node datapath not there")
    log(f"{key}: cluster up {name!r} (2 nodes, --routing-mode {mode})")
    doc = cluster_up(
        ClusterSpec(name=name, nodes=2, pod_cidr=IPv4Network(pod_cidr), underlay_cidr=IPv4Network(underlay),
                    routing_mode=mode),
        timeout=timeout,
    )
    n1, n2 = doc["nodes"][0], doc["nodes"][1]
    c = _endpoint(n1["socket"], "default/xclient", "app=xclient")
    s = _endpoint(n2["socket"], "default/xserver", "app=xserver")
    cfg = Config(key, LABELS[key], c["netns"], s["netns"], _ip(c), _ip(s), workloads=WORKLOADS)
    cfg.node_ns = n1["netns"]
    cfg.agent_pids = tuple(agent_pid(n["socket"]) for n in (n1, n2))
    cfg.prog_owner = {pid: f"node{i + 1}" for i, n in enumerate((n1, n2)) for pid in pilus_prog_ids(n["socket"])}
    return cfg, doc


def cross_device(cfg: Config, mode: str | None) -> str:
    """The device of the client's node that cross-node packets must use."""
    return {"tunnel": "pilus_vxlan", "native": "eth0", "vxlan": "vx0", "routed": "eth0"}[mode or ""]


def probe(cfg: Config, dev: str) -> dict[str, Any]:
    """A TCP connect across the nodes (server running) and the packets the client's
    node sent on the cross-node device meanwhile."""
    rx0, tx0 = topo.link_packets(dev, cfg.node_ns)
    res = tcp_probe(cfg.client_ns, cfg.server_ip, RR_PORT, timeout=3.0)
    rx1, tx1 = topo.link_packets(dev, cfg.node_ns)
    ev = {"probe": res, "device": dev, "dev_tx_packets": tx1 - tx0 if tx0 >= 0 else None,
          "dev_rx_packets": rx1 - rx0 if rx0 >= 0 else None}
    ev["ok"] = res == "open" and (ev["dev_tx_packets"] or 0) >= 3 and (ev["dev_rx_packets"] or 0) >= 2
    return ev


def run_one(cfg: Config, wl: str, duration: float, warmup: float) -> dict[str, Any]:
    return run_stream(cfg, duration) if wl == "stream" else run_rr(cfg, duration, warmup, mode=wl)


def bpf_cost(cfg: Config, crr: bool) -> dict[str, dict]:
    """Every program of both nodes during one 1 s RR or CRR run, as ``<program>@node1``."""
    return measure_bpf_cost(cfg, 1.0, set(cfg.prog_owner), crr, owner=cfg.prog_owner)


def summarize(results: dict[str, list[dict]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"abs": {}, "ratio": {}}
    for wl, fld, *_ in METRICS:
        for k in keys:
            vals = [r[wl][fld] for r in results[k] if fld in r.get(wl, {})]
            out["abs"][f"{k}.{wl}.{fld}"] = statistics.median(vals) if vals else None
        for b, a in PAIRS:
            if b not in results or a not in results:
                continue
            rs = [x[wl][fld] / y[wl][fld] for x, y in zip(results[b], results[a], strict=True)
                  if y.get(wl, {}).get(fld) and fld in x.get(wl, {})]
            q1, med, q3 = quartiles(rs)
            out["ratio"][f"{b}/{a}.{wl}.{fld}"] = {"median": med, "q1": q1, "q3": q3, "n": len(rs)}
    return out


def print_report(summary: dict[str, Any], keys: list[str], meta: dict[str, Any]) -> None:
    print()
    print(f"pilus crossnode: pod-to-pod across two nodes, {meta['rounds']} rounds x {meta['duration']} s per test, "
          "client CPU 0, server CPU 1")
    print()
    for k in keys:
        nat = " + nft masquerade table (conntrack)" if meta.get("baseline_nat") and k.startswith("A") else ""
        print(f"  {k:<10}{LABELS[k]}{nat}")
    print()
    print("absolute values (median over rounds)")
    head = f"{'config':<10}" + "".join(f"{m[2]:>17}" for m in METRICS)
    print(head)
    print("-" * len(head))
    for k in keys:
        cells = []
        for wl, fld, _label, fmt in METRICS:
            v = summary["abs"].get(f"{k}.{wl}.{fld}")
            cells.append(f"{(fmt.format(v) if v is not None else '-'):>17}")
        print(f"{k:<10}" + "".join(cells))
    print()
    print("ratios B/A: median over rounds [IQR] (goal: RR >= 1.00, CRR >= 0.95, STREAM >= 1.00)")
    for b, a in PAIRS:
        if b not in keys or a not in keys:
            print(f"  {b + '/' + a:<20}-  ({b} not measured)")
            continue
        cells = []
        for wl, fld, label, _fmt in METRICS[:3]:
            r = summary["ratio"].get(f"{b}/{a}.{wl}.{fld}")
            if not r or not r["n"]:
                cells.append(f"{label.split()[0]} -")
                continue
            mark = "ok" if r["median"] >= GOALS[wl] else "BELOW GOAL"
            cells.append(f"{label.split()[0]} {r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}] {mark}")
        print(f"  {b + '/' + a:<20}" + "   ".join(cells))
    print()
    print("cross-node evidence (checked before the rounds):")
    for k, e in meta["evidence"].items():
        detail = ", ".join(f"{n}={v}" for n, v in e.items() if n != "ok")
        print(f"  {k:<10}{'OK' if e.get('ok') else 'FAILED'}: {detail}")
    if meta.get("max_steal_pct", 0) > 2:
        print(f"warning: CPU steal up to {meta['max_steal_pct']:.1f} % during tests")
    for k, err in meta["pilus_errors"].items():
        print(f"{k} was not measured: {err}")
    if meta.get("bpf"):
        print()
        print(f"BPF per transaction (kernel.bpf_stats_enabled, median of {BPF_REPS} extra 1 s runs; "
              "program@node: ns/run x runs/tx)")
        for k, per_wl in meta["bpf"].items():
            for wl, progs in per_wl.items():
                total = sum(p["ns_per_tx"] for p in progs.values())
                cells = ", ".join(f"{n} {p['ns_per_run']:.0f}x{p['runs_per_tx']:g}" for n, p in progs.items()
                                  if p["ns_per_run"] is not None)  # programs that ran
                print(f"  {k:<9}{wl.upper():<4}{total / 1000:6.1f} µs/tx: {cells}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.crossnode", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per test (default 2)")
    ap.add_argument("--warmup", type=float, default=0.3, help="RR/CRR warm-up seconds (default 0.3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds x 1 s (about 2 minutes)")
    ap.add_argument("--no-pilus", action="store_true", help="the two baselines only")
    ap.add_argument("--baseline-nat", action="store_true",
                    help="give the baseline nodes pilus's (never matching) nft masquerade table: conntrack on")
    ap.add_argument("--seed", type=int, default=None, help="seed of the run order")
    ap.add_argument("--json", type=Path, default=None, help="write all samples here")
    ap.add_argument("--up-timeout", type=float, default=90.0, help="cluster up timeout")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = min(args.rounds, 3), 1.0

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    configs: list[Config] = []
    meta: dict[str, Any] = {"rounds": args.rounds, "duration": args.duration, "evidence": {}, "pilus_errors": {},
                            "baseline_nat": args.baseline_nat}
    modes: dict[str, str] = {}
    exit_code = 0
    try:
        check_tools()
        build_rr()
        topo.destroy_all()  # leftovers of an interrupted run
        if not args.no_pilus:
            destroy_pilus()
        for key, tag, underlay, pods, vxlan in BASELINES:
            log(f"building {key}")
            b = topo.build(tag, underlay, pods, vxlan, nat=args.baseline_nat)
            cfg = Config(key, LABELS[key], b.client_ns, b.server_ns, b.client_ip, b.server_ip, workloads=WORKLOADS)
            cfg.node_ns = b.node_ns[0]
            configs.append(cfg)
            modes[key] = "vxlan" if vxlan else "routed"
        if not args.no_pilus:
            for key, _base, name, mode, underlay, pods in PILUS:
                try:
                    cfg, _doc = build_pilus(key, name, mode, underlay, pods, args.up_timeout)
                    configs.append(cfg)
                    modes[key] = mode
                except Exception as e:  # noqa: BLE001 - reported; the baselines are still measured
                    meta["pilus_errors"][key] = " ".join(str(e).split())[:400]
                    log(f"{key} unavailable: {meta['pilus_errors'][key]}")
                    exit_code = 1
        order = ["A-vxlan", "B-tunnel", "A-routed", "B-native"]
        configs.sort(key=lambda c: order.index(c.key))
        measured = []
        for cfg in configs:
            start_servers(cfg)
            ev = probe(cfg, cross_device(cfg, modes[cfg.key]))
            meta["evidence"][cfg.key] = ev
            log(f"{cfg.key}: cross-node evidence {'OK' if ev['ok'] else 'FAILED'}: {ev}")
            if ev["ok"]:
                measured.append(cfg)
            else:
                exit_code = 1
                if cfg.key.startswith("B"):
                    meta["pilus_errors"][cfg.key] = (
                        f"a pod on node1 does not reach a pod on node2 over {ev['device']} "
                        f"(probe {ev['probe']}, {ev['dev_tx_packets']} packets out on it)")
        if not any(c.key.startswith("A") for c in measured):
            raise BenchError("no baseline passed its cross-node probe: nothing to compare against")
        keys = [c.key for c in measured]
        by_key = {c.key: c for c in measured}
        log("warm-up round (discarded)")
        for cfg in measured:
            for wl in WORKLOADS:
                run_one(cfg, wl, 0.5 if wl != "stream" else 1, 0.2)
        results: dict[str, list[dict]] = {k: [] for k in keys}
        max_steal = 0.0
        for rnd in range(1, args.rounds + 1):
            tests = [(k, wl) for k in keys for wl in WORKLOADS]
            rng.shuffle(tests)
            sample: dict[str, dict] = {k: {} for k in keys}
            for k, wl in tests:
                sample[k][wl] = run_one(by_key[k], wl, args.duration, args.warmup)
                max_steal = max(max_steal, sample[k][wl]["steal_pct"])
            line = f"round {rnd}/{args.rounds}:"
            for k in keys:
                results[k].append(sample[k])
                s = sample[k]
                line += f" | {k} rr {s['rr']['tps']:,.0f} crr {s['crr']['cps']:,.0f} {s['stream']['gbit_s']:.2f}G"
            log(line)
        meta["max_steal_pct"] = max_steal
        pilus_cfgs = [c for c in measured if c.prog_owner]
        if pilus_cfgs:
            with bpf_stats_enabled() as on:
                if on:
                    log(f"BPF run time per program (kernel.bpf_stats_enabled), {BPF_REPS} x RR and CRR")
                    meta["bpf"] = {c.key: {wl: median_cost([bpf_cost(c, wl == "crr") for _ in range(BPF_REPS)])
                                           for wl in ("rr", "crr")} for c in pilus_cfgs}
        meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
        summary = summarize(results, keys)
        print_report(summary, keys, meta)
        out = args.json or (BUILD / "bench" / f"crossnode-{time.strftime('%Y%m%d-%H%M%S')}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "summary": summary, "samples": results}, indent=1) + "\n")
        print(f"samples: {out} (total {meta['elapsed_s']} s)")
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        exit_code = 130
    except (BenchError, topo.TopoError) as e:
        print(f"crossnode: {e}", file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for cfg in configs:
            stop_servers(cfg)
        try:
            topo.destroy_all()
        except Exception as e:  # noqa: BLE001
            print(f"crossnode: cleanup of the {topo.PREFIX}* namespaces failed: {e}", file=sys.stderr)
            exit_code = exit_code or 1
        if not args.no_pilus:
            try:
                destroy_pilus()
            except Exception as e:  # noqa: BLE001
                print(f"crossnode: cleanup of the pilus clusters failed: {e}", file=sys.stderr)
                exit_code = exit_code or 1
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
