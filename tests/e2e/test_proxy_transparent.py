"""The L7 proxy as a transparent proxy between two namespaces (issue 10 part A).

client netns (10.221.1.2) -- middle netns (the router: 10.221.1.1 / 10.221.2.1, runs
``python -m pilus.proxy``) -- server netns (10.221.2.2: an HTTP echo server on :80, a gRPC
server on :50051). In the middle, an nftables TPROXY rule hands client->server :80 and :50051 to
the proxy's port, and ``socket transparent`` + ``ip rule fwmark 1 lookup 100`` bring the replies
of the proxy's upstream connections (which carry the client's address) back to it. Real clients:
curl and a grpcio client. Everything is removed at the end, also when a test fails.
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

from pilus.proxy.control import control_request

SUPPORT = Path(__file__).resolve().parents[1] / "unit" / "test_proxy_support.py"
TAG = f"{os.getpid() % 100000}"
NS_CLIENT, NS_MID, NS_SERVER = f"pxc{TAG}", f"pxm{TAG}", f"pxs{TAG}"
CLIENT_IP, MID_C, MID_S, SERVER_IP = "10.221.1.2", "10.221.1.1", "10.221.2.1", "10.221.2.2"
PROXY_PORT = 15001
CLIENT_ID, SERVER_ID = 1000, 2000

CONFIG = {"listeners": [{"name": "server-ingress", "port": PROXY_PORT, "direction": "ingress", "rules": [
    {"endpoint": 7, "endpoint_ips": [SERVER_IP], "port": 80, "peers": [CLIENT_ID], "http": [
        {"method": "GET", "path": "/public/.*"},
        {"method": "POST", "path": "/v1/request-landing"},
        {"method": "GET", "path": "/secure", "headerMatches": [
            {"name": "X-Token", "secret": {"namespace": "default", "name": "token"}, "mismatch": "REPLACE"}]},
    ]},
    {"endpoint": 7, "endpoint_ips": [SERVER_IP], "port": 50051, "peers": [CLIENT_ID], "http": [
        {"method": "POST", "path": "/cilium.examples.DoorManager/GetName"}]},
]}]}

NFT = f"""table ip pilus_l7 {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 1 accept
    ip daddr {SERVER_IP} tcp dport {{ 80, 50051 }} tproxy to :{PROXY_PORT} meta mark set 1 accept
  }}
}}
"""


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv} failed: {done.stderr.strip()}")
    return done


def _start(ns: str, *argv: str) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = proc.stdout.readline().strip()
    if line != "ready":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{argv} in {ns} did not start: {line} {proc.stderr.read()}")
    return proc


def _build(tmp: Path) -> None:
    for ns in (NS_CLIENT, NS_MID, NS_SERVER):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "c0", "netns", NS_CLIENT, "type", "veth", "peer", "m1", "netns", NS_MID)
    sh("ip", "link", "add", "s0", "netns", NS_SERVER, "type", "veth", "peer", "m2", "netns", NS_MID)
    for ns, dev, addr in ((NS_CLIENT, "c0", f"{CLIENT_IP}/24"), (NS_MID, "m1", f"{MID_C}/24"),
                          (NS_MID, "m2", f"{MID_S}/24"), (NS_SERVER, "s0", f"{SERVER_IP}/24")):
        sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
        sh("ip", "link", "set", dev, "up", ns=ns)
    for ns in (NS_CLIENT, NS_MID, NS_SERVER):
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "route", "add", "default", "via", MID_C, ns=NS_CLIENT)
    sh("ip", "route", "add", "default", "via", MID_S, ns=NS_SERVER)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
        sh("sysctl", "-qw", key, ns=NS_MID)
    sh("ip", "rule", "add", "fwmark", "1", "lookup", "100", ns=NS_MID)
    sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100", ns=NS_MID)
    (tmp / "rules.nft").write_text(NFT)
    sh("nft", "-f", str(tmp / "rules.nft"), ns=NS_MID)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("l7")
    procs: list[subprocess.Popen] = []
    try:
        _build(tmp)
        procs.append(_start(NS_SERVER, sys.executable, str(SUPPORT), "http", "80"))
        procs.append(_start(NS_SERVER, sys.executable, str(SUPPORT), "grpc", "50051"))
        (tmp / "proxy.json").write_text(json.dumps(CONFIG))
        (tmp / "ids.json").write_text(json.dumps({CLIENT_IP: CLIENT_ID, SERVER_IP: SERVER_ID}))
        (tmp / "secrets.json").write_text(json.dumps({"default/token": "sw0rdfish"}))
        proxy = _start(NS_MID, sys.executable, "-m", "pilus.proxy", "--config", str(tmp / "proxy.json"),
                       "--control", str(tmp / "control.sock"), "--identities", str(tmp / "ids.json"),
                       "--secrets", str(tmp / "secrets.json"), "--records", f"file:{tmp / 'records.jsonl'}")
        procs.append(proxy)
        yield {"tmp": tmp, "proxy": proxy}
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for ns in (NS_CLIENT, NS_MID, NS_SERVER):
            sh("ip", "netns", "delete", ns, check=False)


CURL_FMT = r"\n%{http_code} %{num_connects}\n"


def curl(*args: str) -> list[str]:
    """Bodies and "status connects" lines of one curl run (every transfer after --next repeats -w)."""
    done = sh("curl", "-s", "--max-time", "10", "-w", CURL_FMT, *args, ns=NS_CLIENT)
    return [line for line in done.stdout.splitlines() if line]


def records(net, n: int) -> list[dict]:
    path = net["tmp"] / "records.jsonl"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return [json.loads(x) for x in lines]
        time.sleep(0.05)
    raise AssertionError(f"expected {n} records, have {path.read_text() if path.exists() else 'none'}")


def test_allowed_get_keeps_the_client_address(net):
    out = curl(f"http://{SERVER_IP}/public/hello")
    seen = json.loads(out[0])
    assert out[-1].split()[0] == "200"
    assert seen["path"] == "/public/hello" and seen["client"] == CLIENT_IP  # not the proxy's address


def test_denied_put_is_403_and_the_connection_goes_on(net):
    before = len(records(net, 0))
    out = curl("-X", "PUT", f"http://{SERVER_IP}/v1/exhaust-port", "--next", "-s", "-w", CURL_FMT,
               f"http://{SERVER_IP}/public/after")
    assert out[0] == "Access denied" and out[1] == "403 1"
    assert json.loads(out[2])["path"] == "/public/after"
    assert out[3] == "200 0"  # no new connection: the same keep-alive connection served it
    recs = records(net, before + 2)[before:]
    assert [(r["method"], r["path"], r["status"], r["verdict"]) for r in recs] == [
        ("PUT", "/v1/exhaust-port", 403, "DENIED"), ("GET", "/public/after", 200, "FORWARDED")]
    assert recs[0]["source"] == {"ip": CLIENT_IP, "port": recs[0]["source"]["port"], "identity": CLIENT_ID}
    assert recs[0]["destination"]["identity"] == SERVER_ID and recs[0]["endpoint"] == 7


def test_post_landing_allowed(net):
    out = curl("-X", "POST", "-d", "ship", f"http://{SERVER_IP}/v1/request-landing")
    assert json.loads(out[0])["body"] == "ship" and out[1].startswith("200")


def test_header_replaced_from_a_secret(net):
    out = curl("-H", "X-Token: guess", f"http://{SERVER_IP}/secure")
    headers = dict(json.loads(out[0])["headers"])
    assert headers["X-Token"] == "sw0rdfish"
    rec = records(net, 1)[-1]
    assert rec["path"] == "/secure" and rec["header_mismatches"] == [{"name": "X-Token", "action": "REPLACE"}]
    assert "sw0rdfish" not in (net["tmp"] / "records.jsonl").read_text()


def grpc(method: str) -> dict:
    done = sh(sys.executable, str(SUPPORT), "grpc-call", f"{SERVER_IP}:50051", method, "leia", ns=NS_CLIENT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_grpc_allowed_and_denied_methods(net):
    ok = grpc("GetName")
    assert ok["code"] == "OK" and ok["reply"].startswith("name:leia")
    assert f"ipv4:{CLIENT_IP}:" in ok["reply"]  # the gRPC server sees the client's own address
    assert grpc("OpenDoor")["code"] == "PERMISSION_DENIED"
    recs = records(net, 1)
    grpc_recs = [r for r in recs if r["protocol"] == "HTTP/2"][-2:]
    assert [(r["path"], r["grpc_status"], r["verdict"]) for r in grpc_recs] == [
        ("/cilium.examples.DoorManager/GetName", 0, "FORWARDED"),
        ("/cilium.examples.DoorManager/OpenDoor", 7, "DENIED")]


def test_status_and_reload_without_dropping_connections(net):
    sock = net["tmp"] / "control.sock"
    st = control_request(sock, "status")
    lst = st["listeners"][0]
    assert st["ok"] and lst["name"] == "server-ingress" and lst["forwarded"] >= 1 and lst["denied"] >= 1
    # a long request in flight while the config changes twice (SIGHUP and the control command)
    slow = subprocess.Popen(["ip", "netns", "exec", NS_CLIENT, "curl", "-s", "--max-time", "20",
                             "-w", r"\n%{http_code}", "--limit-rate", "20k", "-X", "POST", "--data-binary",
                             "@-", f"http://{SERVER_IP}/v1/request-landing"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        cfg = json.loads(json.dumps(CONFIG))
        cfg["listeners"][0]["rules"][0]["http"].append({"method": "GET", "path": "/new"})
        (net["tmp"] / "proxy.json").write_text(json.dumps(cfg))
        os.kill(net["proxy"].pid, signal.SIGHUP)
        assert control_request(sock, "reload")["ok"]
        out, _ = slow.communicate("x" * 40000, timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            slow.kill()
    assert out.splitlines()[-1] == "200" and json.loads(out.splitlines()[0])["body"] == "x" * 40000
    assert curl(f"http://{SERVER_IP}/new")[-1].startswith("200")
    assert control_request(sock, "status")["generation"] >= 3
    (net["tmp"] / "proxy.json").write_text('{"listeners": [{"port": 0}]}')
    bad = control_request(sock, "reload")
    assert not bad["ok"] and bad["error"].startswith("listeners[0].port")


def test_h2c_denial_with_curl(net):
    out = curl("--http2-prior-knowledge", "-X", "PUT", f"http://{SERVER_IP}/v1/exhaust-port")
    assert out[0] == "Access denied" and out[1].startswith("403")
    rec = records(net, 1)[-1]
    assert (rec["protocol"], rec["method"], rec["status"], rec["verdict"]) == ("HTTP/2", "PUT", 403, "DENIED")
