"""What one new connection costs in cil_from_container, program by itself.

    python -m bench.datapath_cost [--connections 3000] [--json FILE]

Loads the datapath without pins (as tests/bpf does) and replays the packets of
`bench/rr.c -C` connections (pod A -> pod B, local delivery, the server closes
first) through BPF_PROG_TEST_RUN, one run per packet, each with a new client
port. It reports the median ns per run of each packet of the connection and
the sum per connection, for these cases:

  no listener      nobody subscribed to the monitor: the datapath emits nothing
  monitor          a subscriber for every event type, the agent's default rate
                   limit (1000 events/s per CPU, burst 200): most events are
                   suppressed by the limit
  monitor, no limit  every event reaches the ring buffer (what the rate limit saves)
  policy + ...     the same with an L3/L4 ingress policy on B (A may reach port
                   7001) and an egress policy on A (B on 7001): two policy lookups
                   and two policy-verdict events per connection

The program runs on a CPU of its own (the caller's), on packets that are not
clones, and with no other load: it is the program's own cost (map lookups,
conntrack, events), not the skb copies, cache misses and scheduling of real
traffic that `make bench` sees. Root is needed, namespaces are not. Events are
drained between cases; nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pilus.datapath import (
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
    Datapath,
    DatapathConfig,
    EndpointInfo,
    PolicyEntry,
    PolicyKey,
)
from pilus.datapath.events import listen_mask
from pilus.datapath.testrun import run_skb

ROUTER_IP = IPv4Address("10.200.1.1")
NODE_IP = IPv4Address("172.30.0.11")
POD_CIDR = IPv4Network("10.200.1.0/24")
PORT = 7001
TCP = 6
ROUNDS = 10  # the cases take turns, in this many rounds

CLIENT = EndpointInfo(IPv4Address("10.200.1.5"), 100, 5, 1000, "02:00:00:00:00:05", "02:00:00:00:01:05")
SERVER = EndpointInfo(IPv4Address("10.200.1.6"), 101, 6, 1001, "02:00:00:00:00:06", "02:00:00:00:01:06")

# one rr.c -C connection as seen by the two lxc devices: (sender, TCP flags,
# payload); 5 packets each way, as the veth counters show for real ones
CONNECTION = (
    ("client", "S", b""),
    ("server", "SA", b""),
    ("client", "A", b""),
    ("client", "PA", b"C"),
    ("server", "A", b""),
    ("server", "PA", b"C"),
    ("server", "FA", b""),
    ("client", "A", b""),
    ("client", "FA", b""),
    ("server", "A", b""),
)


L4_OFF = 14 + 20  # Ethernet + IPv4 without options


def _packet(sender: str, flags: str, payload: bytes, sport: int) -> bytes:
    from scapy.layers.inet import IP
    from scapy.layers.inet import TCP as TCPh
    from scapy.layers.l2 import Ether
    from scapy.packet import raw

    c, s = CLIENT, SERVER
    if sender == "client":
        pkt = (
            Ether(src=c.mac, dst=c.host_mac)
            / IP(src=str(c.ipv4), dst=str(s.ipv4))
            / TCPh(sport=sport, dport=PORT, flags=flags)
        )
    else:
        pkt = (
            Ether(src=s.mac, dst=s.host_mac)
            / IP(src=str(s.ipv4), dst=str(c.ipv4))
            / TCPh(sport=PORT, dport=sport, flags=flags)
        )
    return raw(pkt / payload) if payload else raw(pkt)


def _datapath(state_dir: Path, rate: int) -> Datapath:
    cfg = DatapathConfig("cost", ROUTER_IP, NODE_IP, POD_CIDR, events_rate=rate, events_burst=200)
    dp = Datapath(cfg, state_dir, bpffs_root=None)
    dp.load()
    for ep in (CLIENT, SERVER):
        dp.endpoints.upsert(ep)
        dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
    return dp


def _with_policy(dp: Datapath) -> None:
    allow = PolicyEntry(deny=False)
    dp.policy.sync(SERVER.ep_id, {PolicyKey(CLIENT.identity, False, TCP, PORT, 16): allow})
    dp.policy.sync(CLIENT.ep_id, {PolicyKey(SERVER.identity, True, TCP, PORT, 16): allow})
    dp.endpoints.upsert(replace(SERVER, flags=ENDPOINT_F_POLICY_INGRESS))
    dp.endpoints.upsert(replace(CLIENT, flags=ENDPOINT_F_POLICY_EGRESS))


def measure(dp: Datapath, connections: int, sport0: int) -> tuple[list[list[int]], int]:
    """ns of each packet of the connection over `connections` connections, and
    the number of events the datapath emitted."""
    prog = dp.prog_fd("cil_from_container")
    ifindex = {"client": CLIENT.ifindex, "server": SERVER.ifindex}
    per_step: list[list[int]] = [[] for _ in CONNECTION]
    templates = [bytearray(_packet(sender, flags, payload, 0)) for sender, flags, payload in CONNECTION]
    with dp.events() as reader:
        for i in range(connections):
            port = (sport0 + i).to_bytes(2, "big")
            for step, (sender, _flags, _payload) in enumerate(CONNECTION):
                # the client port (TCP checksums are not checked by the datapath)
                pkt = templates[step]
                off = L4_OFF if sender == "client" else L4_OFF + 2
                pkt[off : off + 2] = port
                r = run_skb(prog, bytes(pkt), ingress_ifindex=ifindex[sender])
                if r.retval != 7:  # TC_ACT_REDIRECT: delivered to the peer
                    raise RuntimeError(f"packet {step} ({sender}) was not delivered: {r.retval}")
                per_step[step].append(r.duration_ns)
            if i % 500 == 499:
                reader.poll()  # keep the ring from filling
        reader.poll()
        events = reader.records
    return per_step, events


def summarize(per_step: list[list[int]], events: int, connections: int) -> dict:
    med = [statistics.median(v) for v in per_step]
    return {
        "ns_per_packet": [round(m) for m in med],
        "ns_per_connection": round(sum(med)),
        "ns_per_run": round(sum(med) / len(med), 1),
        "events_per_connection": round(events / connections, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.datapath_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=3000, help="connections per case (default 3000)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.datapath_cost needs root (BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 1
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one CPU: one token bucket, no migrations
    everything = listen_mask([None])
    cases = [
        ("no listener", 1000, 0, False),
        ("monitor", 1000, everything, False),
        ("monitor, no limit", 0, everything, False),
        ("policy, no listener", 1000, 0, True),
        ("policy, monitor", 1000, everything, True),
        ("policy, monitor, no limit", 0, everything, True),
    ]
    rounds = ROUNDS
    per_round = max(1, args.connections // rounds)
    samples: dict[str, list[list[int]]] = {name: [[] for _ in CONNECTION] for name, *_ in cases}
    events = dict.fromkeys(samples, 0)
    with tempfile.TemporaryDirectory(prefix="pilus-cost-") as tmp:
        dps = {}
        try:
            for name, rate, mask, policy in cases:
                dps[name] = dp = _datapath(Path(tmp), rate)
                if policy:
                    _with_policy(dp)
                with dp.events() as reader:
                    reader.set_listen_mask(mask)
                measure(dp, 200, 60000)  # warm up
            # cases alternate, so that CPU frequency and other load hit them alike
            for rnd in range(rounds):
                for name, dp in dps.items():
                    steps, n = measure(dp, per_round, 1024 + rnd * per_round)
                    for mine, got in zip(samples[name], steps, strict=True):
                        mine.extend(got)
                    events[name] += n
        finally:
            for dp in dps.values():
                dp.close()
    connections = per_round * rounds
    results = {name: summarize(samples[name], events[name], connections) for name in samples}
    steps = " ".join(f"{s[0][0]}:{s[1]}" for s in CONNECTION)
    print(
        f"cil_from_container per packet of one CRR connection (BPF_PROG_TEST_RUN, CPU {cpu}, "
        f"median over {connections} connections)"
    )
    print(f"packets: {steps}  (c = client's lxc, s = server's lxc)")
    print(f"{'case':<28}{'ns/run':>8}{'ns/conn':>9}{'events/conn':>13}  ns per packet")
    for name, r in results.items():
        print(
            f"{name:<28}{r['ns_per_run']:>8.1f}{r['ns_per_connection']:>9}{r['events_per_connection']:>13.2f}  "
            + " ".join(str(x) for x in r["ns_per_packet"])
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
