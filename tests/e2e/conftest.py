"""e2e fixtures: a real pilus cluster (node netns + agent under its supervisor), an
"external" namespace on the underlay, and probes run inside namespaces. Everything
is torn down at the end, also when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pilus.api.client import Client

CLUSTER = f"e2e{os.getpid() % 10000}"
POD_CIDR = IPv4Network("10.201.0.0/16")
UNDERLAY = IPv4Network("172.31.250.0/24")
EXTERNAL_IP = "172.31.250.200"


#: an HTTP/1.1 server for pods: GET answers "hello <path> from <client address>"
HELLO_SERVER = """\
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"hello {self.path} from {self.client_address[0]}\\n".encode()
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


def probe(netns: str | None, *args: str, timeout: float = 15) -> dict:
    """Run one probe in `netns` (None: this machine's namespace) and return its JSON verdict."""
    where = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run(
        [*where, sys.executable, "-m", "pilus.testing.probe", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"probe {args} in {netns} failed: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Servers:
    """Background probe servers; all killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, netns: str, kind: str, port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "pilus.testing.probe", kind, str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise AssertionError(f"{kind} in {netns} did not start: {line} {proc.stderr.read()}")
        self.procs.append(proc)
        return proc

    def hello(self, netns: str, port: int) -> subprocess.Popen:
        """An HELLO_SERVER on ``port`` in ``netns``, once it listens."""
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", HELLO_SERVER, str(port)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        assert proc.stdout.readline().strip() == "ready", f"hello server on {netns}:{port} did not start"
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
        self.procs.clear()


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def cluster():
    from pilus.cluster.manager import ClusterSpec, cluster_down, cluster_up

    cluster_down(CLUSTER)  # leftovers of an interrupted earlier run
    try:
        info = cluster_up(ClusterSpec(name=CLUSTER, nodes=1, pod_cidr=POD_CIDR, underlay_cidr=UNDERLAY))
        yield info
    finally:
        cluster_down(CLUSTER)


@pytest.fixture(scope="session")
def node(cluster) -> dict:
    return cluster["nodes"][0]


@pytest.fixture(scope="session")
def api(node) -> Client:
    return Client(node["socket"])


@pytest.fixture(scope="session")
def external(cluster):
    """A namespace outside the cluster, on the underlay bridge, with no route to pods."""
    from pilus.datapath import links

    name = f"pilus-{CLUSTER}-ext"
    host_if = f"plx{CLUSTER}"[:15]
    links.delete_netns(name)
    links.delete_link(host_if)
    try:
        links.create_netns(name)
        links.create_veth(host_if, "eth0", peer_netns=name)
        links.set_master(host_if, cluster["bridge"])
        links.add_address("eth0", f"{EXTERNAL_IP}/{UNDERLAY.prefixlen}", netns=name)
        yield name
    finally:
        links.delete_link(host_if)
        links.delete_netns(name)


class EventLog:
    """Everything `pilus monitor` streams (by default drops and policy verdicts; "l7": the
    proxies' records) while a test runs."""

    def __init__(self, api, types: str = "drop,policy-verdict", timeout: float = 3.0) -> None:
        self.events: list[dict] = []
        self.timeout = timeout
        self._stream = api.stream_monitor(type=types)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for event in self._stream:
            self.events.append(event)

    def find(self, predicate, timeout: float | None = None) -> dict | None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.05)
        return None


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def state_dir(node: dict) -> Path:
    return Path(node["state_dir"])


def pilus_cli(*args: str, timeout: float = 90) -> str:
    """Run the pilus CLI; a non-zero exit fails the test with its output."""
    r = subprocess.run([sys.executable, "-m", "pilus", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"pilus {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


@contextlib.contextmanager
def two_node_cluster(prefix: str, pod_cidr: str, underlay_cidr: str):
    """A two-node cluster of its own (name, `cluster up -o json` document), taken down
    afterwards, also when the test fails; leftovers of an interrupted run go first."""
    from pilus.cluster import cluster_down

    name = f"{prefix}{os.getpid() % 10000}"
    cluster_down(name)
    try:
        doc = json.loads(pilus_cli("cluster", "up", "--name", name, "--nodes", "2", "--pod-cidr", pod_cidr,
                                   "--underlay-cidr", underlay_cidr, "-o", "json"))
        yield name, doc
    finally:
        cluster_down(name)
