"""Connection set-up latency to one service while 1 ... 100k services are installed:
pilus (BPF LB maps; per-packet and socket-level) vs kube-proxy-style iptables DNAT
chains vs a direct connection.

    python -m bench.service_scale [--sizes 1,1000,10000,100000] [--conns 400] [--json FILE]

Two identical three-namespace topologies (a node and two pods joined by veth
pairs, /32 routes, static neighbours):
  pilus     the pilus datapath attached to both lxc devices (loaded without pins);
            N services installed in the LB maps (one backend each: the server pod)
  iptables  no BPF; N services as kube-proxy writes them (KUBE-SERVICES ->
            KUBE-SVC-* -> KUBE-SEP-* DNAT), loaded with iptables-restore into the
            node namespace's nat table
  socket    the pilus topology and maps with the socket LB (bpf_sock.c): the
            connect() is translated at the socket (cgroup/connect4, gated on the
            client pod's netns cookie), so the packets go straight to the backend.
            Its programs are attached to a throwaway cgroup the bench joins only
            while it measures this configuration (the others pay no hook)
  direct    the pilus topology, connecting to the backend's own address
One measured connection = socket + connect + 1-byte request + reply + close, from
the client pod to the service in the middle of the N installed (kube-proxy's
average: the nat table is walked for the first packet of every connection). Every
size runs the three configurations interleaved in rounds; the medians of per-round
ratios to `direct` are reported, with absolute medians (microseconds).
Also reported: LB map memory per service (memlock of the maps, from fdinfo) and
the time to install the services (pilus maps vs iptables-restore).
Everything made here is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pyroute2

from pilus.datapath import Datapath, DatapathConfig, EndpointInfo
from pilus.datapath.lb import LB_MAP_NAMES, BackendEntry, Frontend
from pilus.datapath.socklb import PodNetns, cgroup2_root, netns_cookie

ROUTER_IP = IPv4Address("10.210.1.1")
NODE_IP = IPv4Address("172.31.253.11")
POD_CIDR = IPv4Network("10.210.1.0/24")
CLIENT_IP, SERVER_IP = IPv4Address("10.210.1.5"), IPv4Address("10.210.1.6")
SERVER_PORT = 8080
SVC_PORT = 80
TAG = f"{os.getpid() % 100000}"


def log(msg: str) -> None:
    print(f"[service_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vip(i: int) -> IPv4Address:
    """Service i's ClusterIP: 10.96.0.0/12 (room for 1M services)."""
    return IPv4Address(int(IPv4Address("10.96.0.0")) + 1 + i)


@contextmanager
def in_netns(name):
    pyroute2.netns.pushns(name)
    try:
        yield
    finally:
        pyroute2.netns.popns()


def _mac(ipr, ifname):
    return ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")


class Topology:
    """node + client + server namespaces; `name` makes them unique."""

    def __init__(self, name: str):
        self.node = f"plsvc-{name}-n-{TAG}"
        self.pods = [f"plsvc-{name}-c-{TAG}", f"plsvc-{name}-s-{TAG}"]
        self.eps: list[EndpointInfo] = []
        self.created: list[str] = []

    def up(self) -> Topology:
        for ns in (self.node, *self.pods):
            pyroute2.netns.create(ns)
            self.created.append(ns)
        with in_netns(self.node), pyroute2.IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True)
        for i, (pod, ip) in enumerate(zip(self.pods, (CLIENT_IP, SERVER_IP), strict=True)):
            lxc = f"lxcb{i}"
            with in_netns(self.node), pyroute2.IPRoute() as ipr:
                ipr.link("add", ifname=lxc, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod})
                idx = ipr.link_lookup(ifname=lxc)[0]
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst=f"{ip}/32", oif=idx)
                host_mac = _mac(ipr, lxc)
            with in_netns(pod), pyroute2.IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                e0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.link("set", index=e0, state="up")
                ipr.addr("add", index=e0, address=str(ip), prefixlen=32)
                ipr.route("add", dst=f"{ROUTER_IP}/32", oif=e0, scope=253)
                ipr.route("add", dst="0.0.0.0/0", gateway=str(ROUTER_IP), oif=e0)
                ipr.neigh("add", dst=str(ROUTER_IP), lladdr=host_mac, ifindex=e0, state=128)
                pod_mac = _mac(ipr, "eth0")
            with in_netns(self.node), pyroute2.IPRoute() as ipr:
                ipr.neigh("add", dst=str(ip), lladdr=pod_mac, ifindex=idx, state=128)
            self.eps.append(EndpointInfo(ipv4=ip, ifindex=idx, ep_id=10 + i, identity=3000 + i,
                                         mac=pod_mac, host_mac=host_mac))
        return self

    def down(self) -> None:
        for ns in self.created:
            with contextlib.suppress(OSError):
                pyroute2.netns.remove(ns)
        self.created.clear()


def start_server(top: Topology) -> subprocess.Popen:
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{SERVER_IP}', {SERVER_PORT})); s.listen(1024)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    c,_=s.accept()\n"
        "    c.recv(1); c.sendall(b'x'); c.close()\n"
    )
    p = subprocess.Popen(["ip", "netns", "exec", top.pods[1], sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("server did not start")
    return p


def stop(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, 9)
    p.wait()


FAILURES: dict[str, int] = {}


def measure(top: Topology, ip: IPv4Address, port: int, n: int, name: str = "") -> list[float]:
    """n connect+request+close latencies (microseconds) from the client pod;
    failed connections (timeouts) are counted in FAILURES[name], not timed."""
    with in_netns(top.pods[0]):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    out = []
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.settimeout(2)
        t0 = time.perf_counter_ns()
        try:
            s.connect((str(ip), port))
            s.sendall(b"x")
            s.recv(1)
        except OSError as exc:
            FAILURES[name] = FAILURES.get(name, 0) + 1
            log(f"{name}: connection to {ip}:{port} failed: {exc}")
            continue
        finally:
            s.close()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _own_cgroup(root: Path) -> Path:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return root / line.strip()[3:].lstrip("/")
    return root


class SockCgroup:
    """A throwaway cgroup v2 child carrying the socket-LB programs; `joined()`
    puts this process in it (sockets belong to the cgroup they are created in)."""

    def __init__(self) -> None:
        self.root = cgroup2_root()
        self.home = _own_cgroup(self.root)
        self.path = self.root / f"pilus-svc-bench-{TAG}"
        self.path.mkdir()

    @contextmanager
    def joined(self):
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.home / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


def lb_memlock(dp: Datapath) -> int:
    total = 0
    for name in LB_MAP_NAMES:
        fd = dp.map_fd(name)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    total += int(line.split()[1])
    return total


def install_pilus(dp: Datapath, n: int, backend_id: int = 1) -> float:
    be = BackendEntry(backend_id, SERVER_IP, SERVER_PORT, "TCP")
    dp.lb.upsert_backend(be)
    t0 = time.perf_counter()
    for i in range(n):
        dp.lb.upsert_service(i + 1, Frontend(vip(i), SVC_PORT, "TCP"), [be], write_backends=False)
    return time.perf_counter() - t0


def flush_pilus(dp: Datapath) -> None:
    for e in dp.lb.items():
        dp.lb.delete_service(e.id, e.frontend)
    dp.lb.ct_flush()


def iptables_rules(n: int) -> str:
    lines = ["*nat", ":KUBE-SERVICES - [0:0]"]
    for i in range(n):
        lines.append(f":KUBE-SVC-{i:08X} - [0:0]")
        lines.append(f":KUBE-SEP-{i:08X} - [0:0]")
    lines.append("-A PREROUTING -j KUBE-SERVICES")
    lines.append("-A OUTPUT -j KUBE-SERVICES")
    for i in range(n):
        lines.append(f"-A KUBE-SERVICES -d {vip(i)}/32 -p tcp -m comment --comment "
                     f"\"default/svc{i}:http cluster IP\" -m tcp --dport {SVC_PORT} "
                     f"-j KUBE-SVC-{i:08X}")
        lines.append(f"-A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}")
        lines.append(f"-A KUBE-SEP-{i:08X} -p tcp -m tcp -j DNAT --to-destination "
                     f"{SERVER_IP}:{SERVER_PORT}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def install_iptables(top: Topology, n: int, restore: str) -> float:
    text = iptables_rules(n)
    with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", top.node, restore, path], check=True)
        return time.perf_counter() - t0
    finally:
        os.unlink(path)


def flush_iptables(top: Topology, restore: str) -> None:
    subprocess.run(["ip", "netns", "exec", top.node, restore], input="*nat\nCOMMIT\n",
                   text=True, check=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.service_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,1000,10000,100000")
    ap.add_argument("--conns", type=int, default=400, help="connections per configuration and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iptables", default="iptables-restore",
                    help="iptables-restore binary (iptables-legacy-restore for the legacy backend)")
    ap.add_argument("--no-socket-lb", action="store_true", help="leave out the socket-LB configuration")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("service_scale: needs root (namespaces, BPF, iptables)", file=sys.stderr)
        return 2
    if not shutil.which(args.iptables):
        print(f"service_scale: {args.iptables} not found (apt-get install iptables)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    state = Path(tempfile.mkdtemp(prefix="pilus-svc-bench-"))
    pil, ipt = Topology("p"), Topology("i")
    servers: list[subprocess.Popen] = []
    dp = None
    sockcg: SockCgroup | None = None
    results = []
    try:
        pil.up()
        ipt.up()
        dp = Datapath(DatapathConfig("svc-bench", ROUTER_IP, NODE_IP, POD_CIDR), state,
                      bpffs_root=None)
        dp.load()
        for ep in pil.eps:
            dp.endpoints.upsert(ep)
            dp.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity)
        with in_netns(pil.node):
            for ep in pil.eps:
                dp.attach_endpoint(ep.ifindex)
        if not args.no_socket_lb:
            sockcg = SockCgroup()
            sock = dp.load_socket_lb(cgroup=sockcg.path)
            client = pil.eps[0]
            sock.add_netns(PodNetns(netns_cookie(pil.pods[0]), client.ipv4, client.ep_id))
        servers = [start_server(pil), start_server(ipt)]
        mem0 = lb_memlock(dp)
        for n in sizes:
            log(f"{n} services: installing")
            t_pilus = install_pilus(dp, n)
            mem = lb_memlock(dp) - mem0
            t_ipt = install_iptables(ipt, n, args.iptables)
            target = vip(n // 2)
            cfgs = {
                "direct": (pil, SERVER_IP, SERVER_PORT),
                "pilus": (pil, target, SVC_PORT),
                "iptables": (ipt, target, SVC_PORT),
            }
            if sockcg is not None:
                cfgs["socket"] = (pil, target, SVC_PORT)

            def run(name: str, conns: int, cfgs: dict = cfgs) -> list[float]:
                top, ip, port = cfgs[name]
                if name != "socket":
                    return measure(top, ip, port, conns, name)
                assert sockcg is not None
                with sockcg.joined():
                    return measure(top, ip, port, conns, name)

            for name in cfgs:  # warm-up, and a correctness check
                run(name, 20)
            per: dict[str, list[float]] = {k: [] for k in cfgs}
            ratios: dict[str, list[float]] = {k: [] for k in cfgs if k != "direct"}
            sock_vs_pilus: list[float] = []
            for r in range(args.rounds):
                order = list(cfgs) if r % 2 == 0 else list(reversed(cfgs))
                got = {}
                for name in order:
                    got[name] = med(run(name, args.conns))
                    per[name].append(got[name])
                for k in ratios:
                    ratios[k].append(got[k] / got["direct"])
                if "socket" in got:
                    sock_vs_pilus.append(got["socket"] / got["pilus"])
            row = {
                "services": n,
                "direct_us": round(med(per["direct"]), 1),
                "pilus_us": round(med(per["pilus"]), 1),
                "iptables_us": round(med(per["iptables"]), 1),
                "pilus_vs_direct": round(med(ratios["pilus"]), 3),
                "iptables_vs_direct": round(med(ratios["iptables"]), 3),
                "iptables_vs_pilus": round(med(per["iptables"]) / med(per["pilus"]), 3),
                "socket_us": round(med(per["socket"]), 1) if "socket" in per else None,
                "socket_vs_direct": round(med(ratios["socket"]), 3) if "socket" in ratios else None,
                "socket_vs_pilus": round(med(sock_vs_pilus), 3) if sock_vs_pilus else None,
                "install_pilus_s": round(t_pilus, 2),
                "install_iptables_s": round(t_ipt, 2),
                "lb_map_memlock_bytes_per_service": round(mem / n, 1) if n else None,
                "failed_connections": dict(FAILURES),
            }
            FAILURES.clear()
            results.append(row)
            log(json.dumps(row))
            flush_pilus(dp)
            flush_iptables(ipt, args.iptables)
    finally:
        for p in servers:
            stop(p)
        if dp is not None:
            dp.close()  # also detaches the (unpinned) socket-LB links
        if sockcg is not None:
            sockcg.remove()
        pil.down()
        ipt.down()
        shutil.rmtree(state, ignore_errors=True)
    hdr = (f"{'services':>9} {'direct us':>10} {'pilus us':>9} {'iptables us':>12} "
           f"{'pilus/direct':>13} {'ipt/direct':>11} {'ipt/pilus':>10} {'install pilus s':>16} "
           f"{'install ipt s':>14} {'LB B/svc':>9} {'socket us':>10} {'sock/direct':>12} "
           f"{'sock/pilus':>11}")
    print(hdr)
    for r in results:
        print(f"{r['services']:>9} {r['direct_us']:>10} {r['pilus_us']:>9} {r['iptables_us']:>12} "
              f"{r['pilus_vs_direct']:>13} {r['iptables_vs_direct']:>11} "
              f"{r['iptables_vs_pilus']:>10} {r['install_pilus_s']:>16} "
              f"{r['install_iptables_s']:>14} {r['lb_map_memlock_bytes_per_service']!s:>9} "
              f"{r['socket_us']!s:>10} {r['socket_vs_direct']!s:>12} {r['socket_vs_pilus']!s:>11}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
