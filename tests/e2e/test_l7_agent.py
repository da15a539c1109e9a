"""The agent's L7 proxy end to end: an imported rules.http policy becomes the proxy's config,
curl through the datapath redirect is allowed or denied by it (403, the listener's counters
and an l7 event on the monitor as evidence), a proxy killed with -9 is restarted by the
agent, and an agent restart during a loop of requests fails none of them and keeps the
same proxy process (adopted by the new agent)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import Servers, pilus_cli, wait_for

PORT = 80


# one request per line of output, each on a new connection that the client closes first
# (keep-alive, then close): the TIME_WAIT stays with the client, as with curl. When the
# proxy's side closes first (Connection: close), its TIME_WAIT socket in the node's netns
# has the 4-tuple of a later connection from the same client port, and that SYN is lost
LOOP = """\
import http.client, os, sys, time
host, path, stop = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(stop):
    conn = http.client.HTTPConnection(host, 80, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        print("ok", r.status, flush=True)
    except Exception as e:
        print("fail", f"{time.time():.3f}", repr(e), flush=True)
    finally:
        conn.close()
    time.sleep(0.05)  # a steady load, not a flood: every connection leaves a TIME_WAIT upstream
"""

POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: l7-web, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: l7web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: l7client}}}}]
    toPorts:
    - ports: [{{port: "{PORT}", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: "/public/.*"}}]
"""


def _curl(netns: str, url: str) -> tuple[int, str]:
    done = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10", "-w", "\\n%{http_code}",
                           url], capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


@contextlib.contextmanager
def l7_events(api):
    """The l7 events the agent streams while the block runs; the stream is closed after it
    (an open monitor stream would hold up the agent's API shutdown at its restart)."""
    conn, resp = api._open("GET", "/monitor?type=l7", timeout=api.timeout)
    conn.sock.settimeout(None)
    events: list[dict] = []
    reader = threading.Thread(target=lambda: events.extend(api._events(conn, resp)), daemon=True)
    reader.start()
    try:
        yield events
    finally:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        reader.join(10)


def _proxy(api) -> dict:
    return api.request("GET", "/proxy")


def _agent_pid(api) -> int | None:
    try:
        return api.healthz()["agent"]["pid"]
    except Exception:
        return None


def _ingress(status: dict) -> dict:
    (lst,) = [li for li in status["listeners"] if li["direction"] == "ingress"]
    return lst


@pytest.fixture
def web(api):
    server = api.create_endpoint("default/l7web", ["app=l7web"])
    client = api.create_endpoint("default/l7client", ["app=l7client"])
    servers = Servers()
    try:
        servers.hello(server["netns"], PORT)
        api.request("PUT", "/policy", {"yaml": POLICY})
        yield server, client, servers.procs
    finally:
        servers.stop()
        with contextlib.suppress(Exception):
            api.request("DELETE", "/policy?name=l7-web&namespace=default")
        for ep in (server, client):
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])


def _configured(api, server) -> dict | None:
    """The proxy runs and has loaded the server's rule set."""
    s = _proxy(api)
    ok = (s["process"]["running"] and any(r["endpoint"] == server["id"] and PORT in r["ingress"]
                                          for r in s["redirects"])
          and s["listeners"] and _ingress(s)["rule_sets"] >= 1)
    return s if ok else None


def test_policy_becomes_proxy_config_and_status(api, node, web):
    server, client, _ = web
    status = wait_for(lambda: _configured(api, server), timeout=30)
    assert status, _proxy(api)
    assert status["ports"] == {"ingress": 15001, "egress": 15002, "kafka-ingress": 15003, "kafka-egress": 15004}
    pid = status["process"]["pid"]
    # the process the agent runs is the proxy of this node's state dir, in its own session
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"pilus.proxy" in cmdline and os.getsid(pid) == pid
    pdir = Path(node["state_dir"]) / "proxy"
    assert int((pdir / "proxy.pid").read_text()) == pid
    assert oct((pdir / "secrets.json").stat().st_mode & 0o777) == "0o600"
    cfg = json.loads((pdir / "config.json").read_text())
    (rs,) = [r for lst in cfg["listeners"] if lst["direction"] == "ingress" for r in lst["rules"]]
    assert rs["endpoint_ips"] == [server["ipv4"]] and rs["peers"] == [client["identity"]]
    assert rs["http"] == [{"method": "GET", "path": "/public/.*"}]
    health = api.healthz()["proxy"]
    assert health["state"] == "Ok" and health["process"]["pid"] == pid and health["redirects"] >= 1
    text = pilus_cli("--socket", node["socket"], "proxy", "status")
    assert f"pid {pid}" in text and "ingress:15001" in text and "default/l7web" in text
    assert "Proxy:" in pilus_cli("--socket", node["socket"], "status")


def test_allowed_and_denied_through_the_proxy(api, web):
    server, client, _ = web
    before = wait_for(lambda: _configured(api, server), timeout=30)
    assert before, _proxy(api)
    with l7_events(api) as events:
        code, body = _curl(client["netns"], f"http://{server['ipv4']}/public/hello")
        assert code == 200 and body.startswith("hello /public/hello"), body
        assert f"from {client['ipv4']}" in body  # the server sees the real client (transparent upstream)
        code, body = _curl(client["netns"], f"http://{server['ipv4']}/private")
        assert code == 403 and body.strip() == "Access denied"
        denied = wait_for(lambda: [e for e in events if e.get("verdict") == "DENIED"], timeout=10)
    after = _proxy(api)
    assert _ingress(after)["forwarded"] >= _ingress(before)["forwarded"] + 1
    assert _ingress(after)["denied"] >= _ingress(before)["denied"] + 1
    assert denied, events
    assert denied[0].get("path") == "/private" or "/private" in json.dumps(denied[0])


def test_killed_proxy_is_restarted(api, web):
    server, client, _ = web
    before = wait_for(lambda: _configured(api, server), timeout=30)
    assert before, _proxy(api)
    old = before["process"]
    os.kill(old["pid"], signal.SIGKILL)
    after = wait_for(lambda: (s := _configured(api, server)) and s["process"]["pid"] != old["pid"] and s,
                     timeout=30)
    assert after, _proxy(api)
    assert after["process"]["restarts"] == old["restarts"] + 1
    assert "killed by signal 9" in (after.get("last_error") or "") or after["process"]["running"]
    code, _ = _curl(client["netns"], f"http://{server['ipv4']}/public/again")
    assert code == 200


def _log_tail(node, n: int = 30) -> str:
    path = Path(node["state_dir"]) / "agent.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def test_agent_restart_keeps_the_proxy_and_every_request(api, node, web, tmp_path):
    server, client, procs = web
    before = wait_for(lambda: _configured(api, server), timeout=30)
    assert before, _proxy(api)
    proxy_pid = before["process"]["pid"]
    stop = tmp_path / "stop"
    loop = subprocess.Popen(["ip", "netns", "exec", client["netns"], sys.executable, "-c", LOOP,
                             server["ipv4"], "/public/loop", str(stop)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    procs.append(loop)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(x for line in loop.stdout if (x := line.strip())), daemon=True).start()
    assert wait_for(lambda: len(lines) >= 20, timeout=30), lines
    old_agent = _agent_pid(api)
    os.kill(old_agent, signal.SIGTERM)  # a clean agent stop; the cluster supervisor starts it again
    assert wait_for(lambda: (p := _agent_pid(api)) and p != old_agent, timeout=60), _log_tail(node)
    during = len(lines)
    adopted = wait_for(lambda: (s := _proxy(api))["process"]["adopted"] and s, timeout=30)
    assert adopted and adopted["process"]["pid"] == proxy_pid, _proxy(api)
    assert wait_for(lambda: len(lines) >= during + 20, timeout=30)
    stop.touch()
    loop.wait(30)
    failed = [x for x in lines if x != "ok 200"]
    assert lines and not failed, (failed[:5], _log_tail(node, 60))
    # the new agent receives the records of the same proxy process
    with l7_events(api) as events:
        code, _ = _curl(client["netns"], f"http://{server['ipv4']}/private/after-restart")
        assert code == 403
        assert wait_for(lambda: any("after-restart" in json.dumps(e) for e in events), timeout=10), events
    assert _proxy(api)["process"]["pid"] == proxy_pid
