"""The DNS proxy (pilus.fqdn.DNSProxy) as a transparent proxy between namespaces (issue 11).

client netns (10.224.1.2) -- router netns (10.224.1.1 / 10.224.2.1: the DNSProxy on 15053, run
by RUNNER below) -- server netns (dnsmasq on 10.224.2.2, identity 2000, and 10.224.2.3,
identity 3000). In the router an nftables TPROXY rule hands the client's UDP and TCP port 53 to
the proxy; ``socket transparent`` + ``fwmark 1 -> table 100`` bring the server's replies to the
proxy's upstream sockets (which carry the client's address) back to it. Real programs: dnsmasq
(logs every query with its source address) and a dnspython client. Everything is removed at the
end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilus import programs

pytestmark = pytest.mark.root

TAG = f"{os.getpid() % 100000}"
NS_CLIENT, NS_ROUTER, NS_SERVER = f"dnc{TAG}", f"dnr{TAG}", f"dns{TAG}"
CLIENT_IP, R_C, R_S, SERVER_IP, OTHER_SERVER = "10.224.1.2", "10.224.1.1", "10.224.2.1", "10.224.2.2", "10.224.2.3"
PORT = 15053
IDS = {CLIENT_IP: 1000, SERVER_IP: 2000, OTHER_SERVER: 3000}
RULE_SETS = [{"endpoint": 12, "endpoint_ips": [CLIENT_IP], "port": 53, "peers": [2000],
              "dns": [{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}]}]

NFT = f"""table ip pilus_dns {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    ip saddr 10.224.2.0/24 meta l4proto {{ tcp, udp }} socket transparent 1 meta mark set 1 accept
    ip daddr 10.224.2.0/24 meta l4proto {{ tcp, udp }} th dport 53 tproxy to :{PORT} meta mark set 1 accept
  }}
}}
"""

#: the proxy in the router. on_answer appends the answer to answers.jsonl and, for names under
#: held., waits until the test says "open" on stdin; "status" prints DNSProxy.status().
RUNNER = """\
import asyncio, json, sys
from pilus.fqdn.dnsproxy import DNSProxy
from pilus.fqdn.rules import DNSPolicy

tmp, ids, rule_sets = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

async def main():
    gate = asyncio.Event()
    answers = open(f"{tmp}/answers.jsonl", "a")
    records = open(f"{tmp}/records.jsonl", "a")

    async def on_answer(a):
        answers.write(json.dumps({"qname": a.qname, "ips": list(a.ips), "ttl": a.ttl, "endpoint": a.endpoint,
                                  "client_ip": a.client_ip}) + "\\n")
        answers.flush()
        if a.qname.startswith("held."):
            await gate.wait()

    def sink(rec):
        records.write(json.dumps(rec) + "\\n")
        records.flush()

    proxy = DNSProxy(DNSPolicy.from_rule_sets(rule_sets), lambda ip: ids.get(ip, 2), port=int(sys.argv[4]),
                     on_answer=on_answer, sink=sink)
    await proxy.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := (await reader.readline()).decode().strip():
        if line == "status":
            print(json.dumps(proxy.status()), flush=True)
        elif line == "open":
            gate.set()
            print("opened", flush=True)
    await proxy.stop()

asyncio.run(main())
"""

#: one query from the client: prints {"rcode", "ips", "ttl"} or {"error"}
CLIENT = """\
import json, sys
import dns.message, dns.query, dns.rcode
proto, server, name = sys.argv[1:4]
q = dns.message.make_query(name, "A")
try:
    r = (dns.query.tcp if proto == "tcp" else dns.query.udp)(q, server, timeout=20)
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
ips = [rd.address for rr in r.answer if rr.rdtype == 1 for rd in rr]
ttl = min((rr.ttl for rr in r.answer), default=0)
print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "ips": ips, "ttl": ttl}))
"""

#: garbage datagrams; prints the replies' hex (a FORMERR for the one with a readable header)
GARBAGE = """\
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(b"\\x00\\x01junk", (sys.argv[1], 53))
s.sendto(b"\\xab\\xcd\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\xc0\\x0c\\x00\\x01", (sys.argv[1], 53))
data, addr = s.recvfrom(512)
print(json.dumps({"reply": data.hex(), "from": list(addr)}))
"""


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed: {done.stderr.strip()}")
    return done


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _build(tmp: Path) -> None:
    for ns in (NS_CLIENT, NS_ROUTER, NS_SERVER):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "c0", "netns", NS_CLIENT, "type", "veth", "peer", "r1", "netns", NS_ROUTER)
    sh("ip", "link", "add", "s0", "netns", NS_SERVER, "type", "veth", "peer", "r2", "netns", NS_ROUTER)
    for ns, dev, addr in ((NS_CLIENT, "c0", f"{CLIENT_IP}/24"), (NS_ROUTER, "r1", f"{R_C}/24"),
                          (NS_ROUTER, "r2", f"{R_S}/24"), (NS_SERVER, "s0", f"{SERVER_IP}/24"),
                          (NS_SERVER, "s0", f"{OTHER_SERVER}/24")):
        sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
    for ns, dev in ((NS_CLIENT, "c0"), (NS_ROUTER, "r1"), (NS_ROUTER, "r2"), (NS_SERVER, "s0"),
                    (NS_CLIENT, "lo"), (NS_ROUTER, "lo"), (NS_SERVER, "lo")):
        sh("ip", "link", "set", dev, "up", ns=ns)
    sh("ip", "route", "add", "default", "via", R_C, ns=NS_CLIENT)
    sh("ip", "route", "add", "default", "via", R_S, ns=NS_SERVER)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        sh("sysctl", "-qw", key, ns=NS_ROUTER)
    sh("ip", "rule", "add", "fwmark", "1", "lookup", "100", ns=NS_ROUTER)
    sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100", ns=NS_ROUTER)
    (tmp / "rules.nft").write_text(NFT)
    sh("nft", "-f", str(tmp / "rules.nft"), ns=NS_ROUTER)


def _dnsmasq(tmp: Path) -> subprocess.Popen:
    programs.require("dnsmasq", "nft")
    argv = ["dnsmasq",
            "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces",
            f"--listen-address={SERVER_IP}", f"--listen-address={OTHER_SERVER}", "--port=53",
            "--address=/api.github.com/10.9.9.1", "--address=/cilium.io/10.9.9.2", "--address=/example.com/10.9.9.3",
            "--local-ttl=300", "--log-queries=extra", f"--log-facility={tmp / 'dnsmasq.log'}",
            f"--pid-file={tmp / 'dnsmasq.pid'}", "--user=root", "--group=root"]
    proc = subprocess.Popen(["ip", "netns", "exec", NS_SERVER, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 15  # a start-up wait, not a verdict
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited: {proc.stderr.read()}")
        if "started" in _read(tmp / "dnsmasq.log"):
            return proc
        time.sleep(0.05)
    _kill(proc)
    raise AssertionError(f"dnsmasq did not start: {_read(tmp / 'dnsmasq.log')}")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns")
    procs: list[subprocess.Popen] = []
    try:
        _build(tmp)
        procs.append(_dnsmasq(tmp))
        (tmp / "runner.py").write_text(RUNNER)
        (tmp / "client.py").write_text(CLIENT)
        (tmp / "garbage.py").write_text(GARBAGE)
        proxy = subprocess.Popen(
            ["ip", "netns", "exec", NS_ROUTER, sys.executable, str(tmp / "runner.py"), str(tmp), json.dumps(IDS),
             json.dumps(RULE_SETS), str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proxy)
        line = proxy.stdout.readline().strip()
        if line != "ready":
            _kill(proxy)
            raise AssertionError(f"DNS proxy did not start: {line} {proxy.stderr.read()}")
        yield {"tmp": tmp, "proxy": proxy}
    finally:
        for proc in procs:
            _kill(proc)
        for ns in (NS_CLIENT, NS_ROUTER, NS_SERVER):
            sh("ip", "netns", "delete", ns, check=False)


def status(net) -> dict:
    net["proxy"].stdin.write("status\n")
    net["proxy"].stdin.flush()
    return json.loads(net["proxy"].stdout.readline())


def query(net, name: str, proto: str = "udp", server: str = SERVER_IP) -> dict:
    done = sh(sys.executable, str(net["tmp"] / "client.py"), proto, server, name, ns=NS_CLIENT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def records(net) -> list[dict]:
    return [json.loads(x) for x in _read(net["tmp"] / "records.jsonl").splitlines()]


def record_for(net, name: str, transport: str = "udp") -> dict:
    # written after the answer went out: the client already has it, so it may lag by a moment
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [r for r in records(net) if r["dns"]["query"] == name and r["transport"] == transport]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no {transport} record for {name}: {records(net)}")


def dnsmasq_queries(net) -> list[str]:
    return [line for line in _read(net["tmp"] / "dnsmasq.log").splitlines() if "query[" in line]


def test_allowed_names_resolve_and_the_server_sees_the_client(net):
    assert query(net, "api.github.com") == {"rcode": "NOERROR", "ips": ["10.9.9.1"], "ttl": 300}
    assert query(net, "docs.CILIUM.io") == {"rcode": "NOERROR", "ips": ["10.9.9.2"], "ttl": 300}
    # dnsmasq logged the queries as coming from the client's own address
    log = dnsmasq_queries(net)
    assert any(f"query[A] api.github.com from {CLIENT_IP}" in line for line in log), log
    assert any(f"from {CLIENT_IP}" in line and "docs.cilium.io" in line.lower() for line in log), log
    # --log-queries=extra: "<serial> <ip>/<port> query[...]": the proxy's source ports, above the pods' range
    ports = [int(line.split(f"{CLIENT_IP}/")[1].split()[0]) for line in log]
    assert ports and all(51000 <= p <= 60999 for p in ports), ports
    rec = record_for(net, "api.github.com.")
    assert rec["verdict"] == "FORWARDED" and rec["l7"] == "dns" and rec["endpoint"] == 12
    assert rec["source"]["ip"] == CLIENT_IP and rec["source"]["identity"] == 1000
    assert rec["destination"] == {"ip": SERVER_IP, "port": 53, "identity": 2000}
    assert rec["dns"]["ips"] == ["10.9.9.1"] and rec["dns"]["ttl"] == 300 and rec["dns"]["rcode"] == 0


def test_denied_names_are_refused_by_the_proxy(net):
    assert query(net, "evil.example.com") == {"rcode": "REFUSED", "ips": [], "ttl": 0}
    # a server the rule set does not name: even an allowed name is refused
    assert query(net, "api.github.com", server=OTHER_SERVER)["rcode"] == "REFUSED"
    rec = record_for(net, "evil.example.com.")
    assert rec["verdict"] == "DENIED" and rec["dns"]["rcode"] == 5
    other = [r for r in records(net) if r["destination"]["ip"] == OTHER_SERVER]
    assert other and other[-1]["verdict"] == "DENIED" and other[-1]["destination"]["identity"] == 3000
    # the denied queries never reached dnsmasq (which would have answered example.com)
    log = dnsmasq_queries(net)
    assert not any("evil.example.com" in line for line in log), log
    assert not any(OTHER_SERVER in line for line in log), log


def test_tcp_queries(net):
    before = status(net)["tcp_connections"]
    assert query(net, "www.cilium.io", proto="tcp") == {"rcode": "NOERROR", "ips": ["10.9.9.2"], "ttl": 300}
    assert query(net, "evil.example.com", proto="tcp")["rcode"] == "REFUSED"
    assert status(net)["tcp_connections"] == before + 2
    rec = record_for(net, "www.cilium.io.", "tcp")
    assert rec["verdict"] == "FORWARDED" and rec["dns"]["ips"] == ["10.9.9.2"]
    assert record_for(net, "evil.example.com.", "tcp")["verdict"] == "DENIED"
    assert any(f"query[A] www.cilium.io from {CLIENT_IP}" in line for line in dnsmasq_queries(net))


def test_on_answer_runs_before_the_client_gets_the_answer(net):
    client = subprocess.Popen(["ip", "netns", "exec", NS_CLIENT, sys.executable, str(net["tmp"] / "client.py"),
                               "udp", SERVER_IP, "held.cilium.io"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 15  # waiting for the hook to start, not a verdict
        while status(net)["answers_pending"] != 1:
            assert time.monotonic() < deadline, "on_answer never started"
            time.sleep(0.05)
        # the hook already knows the IPs, and the client has no answer yet
        answers = [json.loads(x) for x in _read(net["tmp"] / "answers.jsonl").splitlines()]
        assert {"qname": "held.cilium.io.", "ips": ["10.9.9.2"], "ttl": 300, "endpoint": 12,
                "client_ip": CLIENT_IP} in answers
        assert client.poll() is None
        assert not [r for r in records(net) if r["dns"]["query"] == "held.cilium.io."]
        net["proxy"].stdin.write("open\n")
        net["proxy"].stdin.flush()
        assert net["proxy"].stdout.readline().strip() == "opened"
        out, _ = client.communicate(timeout=30)
        assert json.loads(out) == {"rcode": "NOERROR", "ips": ["10.9.9.2"], "ttl": 300}
        assert status(net)["answers_pending"] == 0
    finally:
        _kill(client)


def test_garbage_is_counted_and_answered_formerr(net):
    before = status(net)["parse_errors"]
    done = sh(sys.executable, str(net["tmp"] / "garbage.py"), SERVER_IP, ns=NS_CLIENT)
    out = json.loads(done.stdout)
    reply = bytes.fromhex(out["reply"])
    assert reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == 1  # the readable header got FORMERR (1)
    assert out["from"] == [SERVER_IP, 53]  # from the address the client asked
    assert status(net)["parse_errors"] == before + 2
    assert query(net, "api.github.com")["rcode"] == "NOERROR"  # still serving
