"""headerMatches REPLACE from a secret, end to end: a secret imported with `pilus secret
import`, a rules.http policy whose headerMatches takes it, curl through the datapath
redirect to the agent's L7 proxy, and the server receiving the secret's value in the
header (it echoes what it got). Evidence: the echoed value, the l7 event with the
REPLACE mismatch (name and action, never the value) on `pilus monitor --type l7`, and
the same requests as Hubble L7 flows on `pilus observe`, and the value changing when the
secret is imported again."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from .conftest import pilus_cli, wait_for

PORT = 80
TOKEN = "tok-3f9a-e2e-header"

SERVER = """\
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"x-token={self.headers.get('X-Token')}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

srv = ThreadingHTTPServer(("", int(sys.argv[1])), H)
print("ready", flush=True)
srv.serve_forever()
"""


def secret(value: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hdr-token", "namespace": "default"},
                       "data": {"token": base64.b64encode(value.encode()).decode()}})


POLICY = f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: secret-header-e2e, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: shweb}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: shclient}}}}]
    toPorts:
    - ports: [{{port: "{PORT}", protocol: TCP}}]
      rules:
        http:
        - method: GET
          headerMatches:
          - name: X-Token
            mismatch: REPLACE
            secret: {{namespace: default, name: hdr-token}}
"""


def _curl(netns: str, url: str, *headers: str) -> tuple[int, str]:
    extra = [a for h in headers for a in ("-H", h)]
    done = subprocess.run(["ip", "netns", "exec", netns, "curl", "-s", "--max-time", "10", *extra,
                           "-w", "\\n%{http_code}", url], capture_output=True, text=True, timeout=30)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body.strip()


class Monitor:
    """`pilus monitor --type l7` (text) and the API's l7 stream (JSON) while the test runs."""

    def __init__(self, api, socket: str) -> None:
        self.lines: list[str] = []
        self.events: list[dict] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "pilus", "--socket", socket, "monitor", "--type", "l7"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        self._stream = api.stream_monitor(type="l7")
        threading.Thread(target=self._read_lines, daemon=True).start()
        threading.Thread(target=self._read_events, daemon=True).start()

    def _read_lines(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _read_events(self) -> None:
        with contextlib.suppress(Exception):
            for ev in self._stream:
                self.events.append(ev)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        with contextlib.suppress(Exception):
            self._stream.close()


@pytest.fixture
def world(api, node):
    server = api.create_endpoint("default/shweb", ["app=shweb"])
    client = api.create_endpoint("default/shclient", ["app=shclient"])
    procs: list[subprocess.Popen] = []
    mon = None
    try:
        srv = subprocess.Popen(["ip", "netns", "exec", server["netns"], sys.executable, "-c", SERVER, str(PORT)],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(srv)
        assert srv.stdout.readline().strip() == "ready"
        mon = Monitor(api, node["socket"])
        yield server, client, mon
    finally:
        if mon is not None:
            mon.close()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with contextlib.suppress(Exception):
            api.request("DELETE", "/policy?name=secret-header-e2e&namespace=default")
        with contextlib.suppress(Exception):
            api.request("DELETE", "/secret/default/hdr-token")
        for ep in (server, client):
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])


def test_replace_from_a_secret(api, node, world):
    server, client, mon = world
    api.request("PUT", "/secret", {"yaml": secret(TOKEN)})
    api.request("PUT", "/policy", {"yaml": POLICY})
    url = f"http://{server['ipv4']}:{PORT}/"

    # the proxy has the rule set and the secret once a request comes back with the value
    replaced = wait_for(lambda: _curl(client["netns"], url, "X-Token: wrong") == (200, f"x-token={TOKEN}"),
                        timeout=30)
    assert replaced, (_curl(client["netns"], url, "X-Token: wrong"), api.request("GET", "/proxy"))
    # no header at all: REPLACE sets it too
    assert _curl(client["netns"], url) == (200, f"x-token={TOKEN}")

    # requests of the wait above, before the secret reached the proxy, may have been denied:
    # the evidence is a forwarded one
    ev = wait_for(lambda: next((e for e in mon.events if e.get("dst_ep") == server["id"]
                                and e.get("header_mismatches") and e.get("verdict") == "FORWARDED"), None),
                  timeout=10)
    assert ev, mon.events
    assert ev["status"] == 200
    assert ev["header_mismatches"] == [{"name": "X-Token", "action": "REPLACE"}]
    assert TOKEN not in json.dumps(mon.events)
    line = wait_for(lambda: next((ln for ln in mon.lines if f"to {server['id']} (" in ln
                                  and "verdict Forwarded" in ln), None), timeout=10)
    assert line and line.startswith("<- Request http from ") and "verdict Forwarded GET" in line, mon.lines
    assert f"identity {client['identity']}->{server['identity']}" in line
    assert "header-mismatch X-Token:REPLACE" in line and TOKEN not in "\n".join(mon.lines)

    # the same requests as Hubble L7 flows (pilus observe on the node's hubble.sock)
    out = pilus_cli("--socket", node["socket"], "observe", "--type", "l7", "--http-method", "GET",
                    "--last", "100", "-o", "json")
    assert TOKEN not in out  # flows carry no headers
    flows = [json.loads(ln)["flow"] for ln in out.splitlines() if ln.strip().startswith('{"flow"')]
    mine = [f for f in flows if server["id"] in (f["source"].get("ID"), f["destination"].get("ID"))]
    kinds = {(f["l7"]["type"], f["verdict"], f["l7"]["http"].get("code")) for f in mine}
    assert {("REQUEST", "FORWARDED", None), ("RESPONSE", "FORWARDED", 200)} <= kinds, mine
    assert all(f["event_type"]["type"] == 129 and f["Type"] == "L7" for f in mine)
    text = pilus_cli("--socket", node["socket"], "observe", "--type", "l7", "--http-status", "200", "--last", "100")
    assert "default/shclient" in text and "<- default/shweb:80" in text
    assert "http-response FORWARDED (HTTP/1.1 200" in text

    # a new value of the secret reaches the proxy without touching the policy
    api.request("PUT", "/secret", {"yaml": secret(TOKEN + "-2")})
    assert wait_for(lambda: _curl(client["netns"], url) == (200, f"x-token={TOKEN}-2"), timeout=30)
