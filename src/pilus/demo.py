"""A narrated tour of pilus (``make demo`` / ``python -m pilus.demo``), as root.

It drives the real CLI (``python -m pilus ...``) and prints each command like a
shell transcript: cluster up, three Star Wars endpoints, identities, a TCP
service in the deathstar reached by tiefighter and xwing, a spoofed packet from
xwing dropped by the datapath and seen by ``pilus monitor``, Cilium's Star Wars
L3/L4 policy (tiefighter lands, xwing is dropped, ``pilus observe`` shows the
dropped flow through the Hubble Relay), its L7 version (landing passes the L7 proxy,
the exhaust port gets 403 and ``pilus monitor --type l7`` says so), DNS rules (the
agent's DNS proxy answers a name of the empire and refuses another, ``pilus fqdn cache
list``), ``pilus policy trace`` explaining both, the maps, metrics and status, and finally
``pilus cluster down`` -- always, even on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# PILUS_DEMO_CLUSTER: run the tour on another cluster name (e.g. next to a test cluster)
CLUSTER = os.environ.get("PILUS_DEMO_CLUSTER") or "default"
PORT = 80
SPOOFED_SRC = "10.200.1.250"

NODE1, NODE2 = f"{CLUSTER}-node1", f"{CLUSTER}-node2"
# the deathstar on node2, the ships on node1: every landing crosses the VXLAN tunnel
ENDPOINTS = [
    ("default/deathstar", "org=empire,class=deathstar", NODE2),
    ("default/tiefighter", "org=empire,class=tiefighter", NODE1),
    ("default/xwing", "org=alliance,class=xwing", NODE1),
]

SERVER = f"""\
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = {{("POST", "/v1/request-landing"): (200, "Ship landed\\n"),
          ("PUT", "/v1/exhaust-port"): (503, "Panic: deathstar exploded\\n")}}

class Deathstar(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route(self):
        code, text = ROUTES.get((self.command, self.path), (404, "Not found\\n"))
        self.answer(code, text)

    do_POST = do_PUT = do_GET = route

    def log_message(self, fmt, *args):
        print("request from", self.client_address[0], self.command, self.path, flush=True)

srv = ThreadingHTTPServer(("", {PORT}), Deathstar)
print("listening on port {PORT}", flush=True)
srv.serve_forever()
"""

SPOOF = """\
import socket, struct, sys
src, dst = sys.argv[1], sys.argv[2]
udp = struct.pack("!HHHH", 1234, 80, 15, 0) + b"spoofed"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
for _ in range(3):
    s.sendto(ip + udp, (dst, 0))
print(f"sent 3 UDP packets {src} -> {dst} (forged source)")
"""

# Cilium's Star Wars rule: only the empire may land on the deathstar, on port 80/TCP
POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
  namespace: default
spec:
  description: "L3-L4 policy to restrict deathstar access to empire ships only"
  endpointSelector:
    matchLabels: {{org: empire, class: deathstar}}
  ingress:
  - fromEndpoints:
    - matchLabels: {{org: empire}}
    toPorts:
    - ports: [{{port: "{PORT}", protocol: TCP}}]
"""

# the same rule with Cilium's L7 part: the empire may only request landing
POLICY_L7 = POLICY.replace("L3-L4 policy", "L7 policy") + """\
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"""

_TTY = sys.stdout.isatty()


class DemoError(Exception):
    pass


def bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if _TTY else text


def step(title: str) -> None:
    print(f"\n{bold('==> ' + title)}", flush=True)


def note(text: str) -> None:
    print(f"    {text}", flush=True)


def python3() -> str:
    return "python3" if shutil.which("python3") else sys.executable


def pilus_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pilus", *args]


def show(args: list[str]) -> None:
    print(bold("$ ") + "pilus " + shlex.join(args), flush=True)


def pilus(*args: str, capture: bool = False, timeout: float = 60,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run ``pilus ARGS`` as a shell transcript line; its output goes to ours."""
    show(list(args))
    res = subprocess.run(pilus_argv(list(args)), text=True, timeout=timeout,
                         stdout=subprocess.PIPE if capture else None)
    if check and res.returncode != 0:
        raise DemoError(f"`pilus {shlex.join(args)}` failed with exit code {res.returncode}")
    return res


class Background:
    """A pilus command running in the background, its output lines in a queue."""

    def __init__(self, label: str, args: list[str]):
        self.label = label
        show(args)
        note("(in the background)")
        self.proc = subprocess.Popen(pilus_argv(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream, q: queue.Queue) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))

    def wait_line(self, q: queue.Queue, pred, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = q.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and q.empty():
                    return None
                continue
            print(f"    [{self.label}] {line}", flush=True)
            if pred(line):
                return line
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def endpoint_ip(name: str, node: str) -> str:
    res = pilus("--node", node, "endpoint", "get", name, "-o", "json", capture=True)
    ip = json.loads(res.stdout).get("ipv4")
    if not ip:
        raise DemoError(f"endpoint {name} has no IPv4 address")
    note(f"{name} has IP {ip}")
    return ip


def request(client: str, ip: str, method: str = "POST", path: str = "/v1/request-landing",
            timeout: float = 5, shown: bool = True) -> str | None:
    """One HTTP request from ``client`` to the deathstar with curl; prints its answer (or
    why there was none) as the command's output and returns the body (None: no answer)."""
    args = ["exec", client, "--", "curl", "-s", "--max-time", f"{timeout:g}", "-X", method,
            f"http://{ip}:{PORT}{path}"]
    if shown:
        show(args)
    res = subprocess.run(pilus_argv(args), text=True, timeout=30, stdout=subprocess.PIPE)
    if res.returncode == 0:
        print(res.stdout.strip(), flush=True)
        return res.stdout
    why = "timed out" if res.returncode == 28 else f"curl exit code {res.returncode}"
    print(f"no answer: {why}", file=sys.stderr, flush=True)
    return None


def land(client: str, ip: str, timeout: float = 5, shown: bool = True) -> bool:
    return "Ship landed" in (request(client, ip, timeout=timeout, shown=shown) or "")


def connect(client: str, ip: str) -> None:
    # the service may need a moment to listen
    for attempt in range(10):
        if land(client, ip, shown=attempt == 0):
            return
        time.sleep(0.5)
    raise DemoError(f"{client} could not connect to {ip}:{PORT}")


def wait_for_flow(timeout: float = 10) -> bool:
    """Whether the relay has xwing's dropped flow (node2's flows reach it within a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(pilus_argv(["observe", "--verdict", "DROPPED", "--from-pod", "default/xwing",
                                         "--last", "1", "-o", "json"]),
                             capture_output=True, text=True, timeout=30)
        if res.returncode == 0 and "POLICY_DENIED" in res.stdout:
            return True
        time.sleep(0.5)
    return False


# a two-line `dig`: the answer's addresses, or the DNS status when there are none
DIG = """import sys, dns.message as m, dns.query as q, dns.rcode as rc
r = q.udp(m.make_query(sys.argv[1], "A"), sys.argv[2], timeout=3)
print(sys.argv[1], rc.to_text(r.rcode()), *[a.address for s in r.answer for a in s if s.rdtype == 1])
"""

POLICY_DNS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: xwing-dns
  namespace: default
spec:
  description: "xwing may ask the cluster's DNS for the empire's names only"
  endpointSelector:
    matchLabels: {class: xwing}
  egress:
  - toEndpoints:
    - matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.empire.local"
"""


def dns_chapter(background: list[Background], deathstar_ip: str) -> None:
    step("DNS-aware policy: a DNS server (dnsmasq) in kube-system on node1, and a rule that lets xwing "
         "ask it for *.empire.local only; node1's datapath hands xwing's port 53 to the agent's DNS proxy")
    pilus("--node", NODE1, "endpoint", "create", "kube-system/coredns", "--labels", "k8s-app=kube-dns")
    dns_ip = endpoint_ip("kube-system/coredns", NODE1)
    dnsmasq = Background("dnsmasq", ["--node", NODE1, "exec", "kube-system/coredns", "--", "dnsmasq",
                                     "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                                     f"--listen-address={dns_ip}", "--local-ttl=300", "--pid-file=",
                                     f"--address=/deathstar.empire.local/{deathstar_ip}",
                                     "--address=/rebel-base.example/10.99.0.1"])
    background.append(dnsmasq)
    if dnsmasq.wait_line(dnsmasq.err, lambda s: "started" in s, 15) is None:
        raise DemoError("dnsmasq did not start in kube-system/coredns")
    policy_file = Path(f"/run/pilus/{CLUSTER}/demo-dns.yaml")
    policy_file.write_text(POLICY_DNS)
    print(f"$ cat {policy_file}\n{POLICY_DNS}", end="", flush=True)
    pilus("policy", "import", str(policy_file))
    dig = Path(f"/run/pilus/{CLUSTER}/dig.py")
    dig.write_text(DIG)

    def ask(name: str, shown: bool) -> str:
        argv = ["--node", NODE1, "exec", "default/xwing", "--", sys.executable, str(dig), name, dns_ip]  # dnspython
        res = pilus(*argv, capture=True, check=False) if shown else \
            subprocess.run(pilus_argv(argv), text=True, timeout=30, stdout=subprocess.PIPE)
        out = (res.stdout or "").strip()
        if shown:
            print(out or f"no answer (exit code {res.returncode})", flush=True)
        return out

    for attempt in range(20):  # the DNS proxy follows the policy within a moment
        if deathstar_ip in ask("deathstar.empire.local", shown=attempt == 0):
            break
        time.sleep(0.5)
    else:
        raise DemoError("xwing got no answer for deathstar.empire.local through the DNS proxy")
    if "REFUSED" not in ask("rebel-base.example", shown=True):
        raise DemoError("the DNS proxy did not refuse rebel-base.example")
    note("REFUSED by the DNS proxy on node1: the query never reached dnsmasq")
    pilus("--node", NODE1, "fqdn", "cache", "list")


def run_demo(background: list[Background]) -> None:
    step(f"Create a local cluster '{CLUSTER}' of two nodes: node namespaces, underlay, kvstore, "
         "one agent per node, a VXLAN tunnel between them")
    pilus("cluster", "up", "--name", CLUSTER, "--nodes", "2", timeout=300)
    pilus("cluster", "status", "--name", CLUSTER)

    step("Create three endpoints (pods): the deathstar on node2, the ships on node1; each gets "
         "an IP and an identity from its labels")
    for name, labels, node in ENDPOINTS:
        pilus("--node", node, "endpoint", "create", name, "--labels", labels)
    for node in (NODE1, NODE2):
        pilus("--node", node, "endpoint", "list")

    step("Identities: one per distinct set of security-relevant labels, plus reserved ones")
    pilus("identity", "list")

    step("Start an HTTP service in the deathstar: POST /v1/request-landing answers 'Ship landed'")
    deathstar_ip = endpoint_ip("default/deathstar", NODE2)
    server = Background("deathstar", ["--node", NODE2, "exec", "default/deathstar", "--", python3(), "-c",
                                      SERVER])
    background.append(server)
    if server.wait_line(server.lines, lambda s: "listening" in s, 15) is None:
        raise DemoError("the service in the deathstar did not start")

    step("node1's datapath knows the deathstar: its identity, and node2's IP as tunnel endpoint")
    pilus("--node", NODE1, "bpf", "ipcache", "list")

    step("tiefighter and xwing land on the deathstar (no policy yet: both allowed)")
    for client in ("default/tiefighter", "default/xwing"):
        connect(client, deathstar_ip)
        server.wait_line(server.lines, lambda s: "request from" in s, 3)

    step("Watch drops with `pilus monitor`, then send packets with a forged source IP "
         "from xwing")
    mon = Background("monitor", ["monitor", "--type", "drop"])
    background.append(mon)
    if mon.wait_line(mon.err, lambda s: "Listening" in s, 15) is None:
        raise DemoError("pilus monitor did not start")
    pilus("exec", "default/xwing", "--", python3(), "-c", SPOOF, SPOOFED_SRC, deathstar_ip)
    line = mon.wait_line(mon.lines, lambda s: "invalid source ip" in s.lower(), 10)
    if line is None:
        raise DemoError("no 'Invalid source ip' drop was reported by pilus monitor")
    note("the datapath dropped the forged packets before they reached the deathstar")
    mon.stop()

    step("Only the empire may land: import Cilium's Star Wars L3/L4 policy")
    policy_file = Path(f"/run/pilus/{CLUSTER}/demo-policy.yaml")
    policy_file.write_text(POLICY)
    print(f"$ cat {policy_file}\n{POLICY}", end="", flush=True)
    pilus("policy", "import", str(policy_file))
    pilus("endpoint", "list")

    step("tiefighter still lands; xwing is dropped by policy on node2 (the identity came in the "
         "VNI), and node2's monitor says why")
    mon = Background("monitor", ["--node", NODE2, "monitor", "--type", "drop"])
    background.append(mon)
    if mon.wait_line(mon.err, lambda s: "Listening" in s, 15) is None:
        raise DemoError("pilus monitor did not start")
    connect("default/tiefighter", deathstar_ip)
    if land("default/xwing", deathstar_ip, timeout=2):
        raise DemoError("xwing landed although the policy denies it")
    line = mon.wait_line(mon.lines, lambda s: "policy denied" in s.lower(), 10)
    if line is None:
        raise DemoError("no 'Policy denied' drop was reported by pilus monitor")
    mon.stop()

    step("The same drop as a Hubble flow, through the cluster's Hubble Relay: both ends' names "
         "and labels, the node that dropped it and why")
    if not wait_for_flow():
        raise DemoError("the Hubble Relay shows no dropped flow of xwing")
    pilus("observe", "--verdict", "DROPPED", "--from-pod", "default/xwing", "--last", "3")

    step("The empire's ships may land, but nobody may reach the exhaust port: a tiefighter "
         "can do it at L3/L4")
    body = request("default/tiefighter", deathstar_ip, "PUT", "/v1/exhaust-port")
    if not body or "exploded" not in body:
        raise DemoError("the exhaust port did not answer at L3/L4")

    step("Import the same rule with an HTTP part (Cilium's L7 Star Wars policy): POST "
         "/v1/request-landing only. node2's datapath now hands port 80 to its L7 proxy")
    policy_file.write_text(POLICY_L7)
    print(f"$ cat {policy_file}\n{POLICY_L7}", end="", flush=True)
    pilus("policy", "import", str(policy_file))
    mon = Background("monitor", ["--node", NODE2, "monitor", "--type", "l7"])
    background.append(mon)
    if mon.wait_line(mon.err, lambda s: "Listening" in s, 15) is None:
        raise DemoError("pilus monitor did not start")
    for attempt in range(20):  # the proxy follows the policy within a moment
        if land("default/tiefighter", deathstar_ip, shown=attempt == 0) and \
                mon.wait_line(mon.lines, lambda s: "request-landing" in s, 2):
            break
        time.sleep(0.5)
    else:
        raise DemoError("the landing request did not pass the L7 proxy")
    body = request("default/tiefighter", deathstar_ip, "PUT", "/v1/exhaust-port")
    if not body or "Access denied" not in body:
        raise DemoError("the L7 proxy did not deny PUT /v1/exhaust-port")
    line = mon.wait_line(mon.lines, lambda s: "exhaust-port" in s, 10)
    if line is None:
        raise DemoError("pilus monitor --type l7 did not show the denied request")
    note("403 from the proxy on node2: the request never reached the deathstar")
    mon.stop()
    pilus("--node", NODE2, "proxy", "status")

    dns_chapter(background, deathstar_ip)

    step("Explain the verdict without sending a packet, and show the deathstar's policy map")
    pilus("policy", "trace", "--src-endpoint", "default/xwing", "--dst-endpoint", "default/deathstar",
          "--dport", f"{PORT}/TCP")
    pilus("policy", "trace", "--src-endpoint", "default/tiefighter", "--dst-endpoint", "default/deathstar",
          "--dport", f"{PORT}/TCP")
    pilus("--node", NODE2, "bpf", "policy", "get", "default/deathstar")

    step("The tunnel: node1 reaches node2's pod CIDR through node2's IP")
    pilus("--node", NODE1, "bpf", "tunnel", "list")
    pilus("node", "list")

    step("Metrics: the drops are counted by reason, on the node that dropped")
    pilus("--node", NODE2, "metrics", "list")

    step("Agent status")
    pilus("status")


def cleanup(background: list[Background]) -> bool:
    step(f"Clean up: stop background commands, take cluster '{CLUSTER}' down")
    for bg in reversed(background):
        try:
            bg.stop()
        except Exception as e:  # keep going: the cluster must go down
            note(f"could not stop {bg.label}: {e}")
    args = ["cluster", "down", "--name", CLUSTER]
    show(args)
    # own session: a second Ctrl-C on the terminal must not interrupt the teardown
    res = subprocess.run(pilus_argv(args), start_new_session=True, timeout=300)
    return res.returncode == 0


def main() -> int:
    if os.geteuid() != 0:
        print("the demo needs root (network namespaces, BPF): run `sudo make demo`",
              file=sys.stderr)
        return 1
    root = Path(os.environ.get("PILUS_STATE_ROOT") or "/run/pilus")
    if (root / CLUSTER / "cluster.json").exists():
        # never tear down someone else's cluster
        print(f"a pilus cluster named '{CLUSTER}' is already up: take it down with "
              f"`pilus cluster down --name {CLUSTER}` (or set PILUS_DEMO_CLUSTER=<other name>)",
              file=sys.stderr)
        return 1
    # every command of the tour talks to the demo's cluster
    os.environ["PILUS_CLUSTER"] = CLUSTER
    os.environ.pop("PILUS_SOCK", None)

    background: list[Background] = []
    rc = 0
    try:
        run_demo(background)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        rc = 130
    except (DemoError, subprocess.TimeoutExpired) as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if not cleanup(background):
                print("cluster down failed: run `pilus cluster down` by hand", file=sys.stderr)
                rc = rc or 1
        finally:
            signal.signal(signal.SIGINT, previous)
    if rc == 0:
        step("Done")
    return rc


if __name__ == "__main__":
    sys.exit(main())
