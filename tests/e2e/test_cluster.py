"""Local clusters: up/down leave nothing behind, the supervisor restarts agents.

Plumbing tests use a stand-in agent (serves /v1/healthz on the node socket) so
they do not depend on the datapath; one test runs the real `pilus agent`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pilus.cluster import ClusterError, ClusterSpec, cluster_down, cluster_up, load_cluster, plan
from pilus.cluster.manager import healthy, unix_http
from pilus.datapath import links

from .conftest import wait_for

POD = IPv4Network("10.202.0.0/16")
UNDERLAY = IPv4Network("172.31.251.0/24")
REPO = Path(__file__).resolve().parents[2]

STANDIN = r"""
import http.server, json, os, socketserver, sys
args = sys.argv[1:]
opt = dict(zip(args[::2], args[1::2]))
if opt.get("--fail"):
    print("stand-in agent: " + opt["--fail"], file=sys.stderr, flush=True)
    sys.exit(3)
sock = opt["--socket"]
try:
    os.unlink(sock)
except FileNotFoundError:
    pass
netns = os.stat("/proc/self/ns/net").st_ino

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "node": opt["--node-name"], "netns": netns}).encode()
        self.send_response(200 if self.path == "/v1/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

class S(socketserver.UnixStreamServer):
    def get_request(self):
        req, _ = super().get_request()
        return req, ("local", 0)

print("stand-in agent for", opt["--node-name"], "pid", os.getpid(), flush=True)
S(sock, H).serve_forever()
"""


def _name(tag: str) -> str:
    return f"t{tag}{os.getpid() % 10000}"


@pytest.fixture
def standin(tmp_path):
    path = tmp_path / "standin_agent.py"
    path.write_text(STANDIN)
    return ["{python}", str(path), "--node-name", "{node}", "--socket", "{socket}"]


@pytest.fixture
def state_root(tmp_path):
    root = tmp_path / "state"
    yield root


@pytest.fixture
def cleanup():
    made: list[tuple[str, Path]] = []
    yield made
    for name, root in made:
        cluster_down(name, root)


def _leftovers(name: str, root: Path) -> list[str]:
    out = [f"netns {n}" for n in links.list_netns(f"pilus-{name}-")]
    for ifname in os.listdir("/sys/class/net"):
        if ifname == plan.bridge_name(name) or plan.host_veth_re(name).match(ifname):
            out.append(f"link {ifname}")
    if (root / name).exists():
        out.append(f"dir {root / name}")
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{name}-node" in cmd or f"--cluster {name} " in cmd + " ":
            out.append(f"process {pid}: {cmd[:80]}")
    pins = plan.BPFFS_ROOT
    if pins.is_dir():
        out += [f"pins {p}" for p in pins.iterdir() if p.name.startswith(f"{name}-node")]
    return out


def _ns(netns: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True)



def test_up_down_leaves_nothing(standin, state_root, cleanup):
    name = _name("u")
    cleanup.append((name, state_root))
    spec = ClusterSpec(
        name=name, nodes=2, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root
    )
    doc = cluster_up(spec, agent_cmd=standin)

    assert load_cluster(name, state_root) == doc
    assert json.loads((state_root / name / "cluster.json").read_text()) == doc
    assert doc["bridge"] == plan.bridge_name(name)
    assert doc["kvstore_path"] == str(state_root / name / "kvstore.db")
    assert [n["name"] for n in doc["nodes"]] == [f"{name}-node1", f"{name}-node2"]
    n1, n2 = doc["nodes"]
    assert n2["pod_cidr"] == "10.202.2.0/24" and n2["router_ip"] == "10.202.2.1"

    # machine side: bridge with .1, one veth per node on it
    assert links.addresses(doc["bridge"]) == ["172.31.251.1/24"]
    br = links.link_info(doc["bridge"])
    for n in doc["nodes"]:
        assert links.link_info(n["host_veth"])["master"] == br["ifindex"]
        assert links.addresses("eth0", n["netns"]) == [f"{n['node_ip']}/24"]
        assert links.default_route_device(n["netns"]) == "eth0"
        assert links.link_info("lo", n["netns"])["up"]
        for key in ("ip_forward", "conf.all.rp_filter", "conf.default.rp_filter"):
            want = "1" if key == "ip_forward" else "0"
            assert links.get_sysctl(f"net.ipv4.{key}", n["netns"]) == want
        # the agent runs inside the node namespace and answers on its socket
        status, body = unix_http(n["socket"], "GET", "/v1/healthz")
        assert status == 200 and body["node"] == n["name"]
        assert body["netns"] == os.stat(links.netns_path(n["netns"])).st_ino

    # nodes reach each other and the machine over the underlay
    r = _ns(n1["netns"], "ping", "-c1", "-W2", n2["node_ip"])
    assert r.returncode == 0, r.stdout + r.stderr
    r = _ns(n1["netns"], "ping", "-c1", "-W2", "172.31.251.1")
    assert r.returncode == 0, r.stdout + r.stderr

    with pytest.raises(
        ClusterError, match=rf"cluster '{name}' is already up; run `pilus cluster down` first"
    ):
        cluster_up(spec, agent_cmd=standin)

    removed = cluster_down(name, state_root)
    assert any(x.startswith("supervisor pid") for x in removed)
    assert f"netns pilus-{name}-node1" in removed
    assert f"bridge {doc['bridge']}" in removed
    assert _leftovers(name, state_root) == []
    assert cluster_down(name, state_root) == []  # idempotent
    assert load_cluster(name, state_root) is None


def test_supervisor_restarts_a_killed_agent(standin, state_root, cleanup):
    name = _name("r")
    cleanup.append((name, state_root))
    doc = cluster_up(
        ClusterSpec(
            name=name, nodes=1, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root
        ),
        agent_cmd=standin,
    )
    node = doc["nodes"][0]
    pid1 = unix_http(node["socket"], "GET", "/v1/healthz")[1]["pid"]
    os.kill(pid1, signal.SIGKILL)

    def new_pid():
        try:
            status, body = unix_http(node["socket"], "GET", "/v1/healthz", timeout=1)
        except OSError:
            return None
        return body["pid"] if status == 200 and body["pid"] != pid1 else None

    t0 = time.monotonic()
    pid2 = wait_for(new_pid, 10)
    assert pid2, (state_root / name / "supervisor.log").read_text()
    assert time.monotonic() - t0 < 5
    sup = json.loads((state_root / name / "supervisor.json").read_text())
    assert sup["agents"][node["name"]] == {"pid": pid2, "restarts": 1, "last_exit": -9}
    log = Path(node["state_dir"], "agent.log").read_text()
    assert log.count("supervisor: starting agent") == 2

    # SIGTERM to the supervisor stops its agents
    os.kill(doc["supervisor_pid"], signal.SIGTERM)
    assert wait_for(lambda: not healthy(node["socket"], timeout=0.5), 8)
    assert wait_for(lambda: not Path(f"/proc/{pid2}").exists(), 8)


def test_failed_up_tears_down_and_shows_the_log(tmp_path, state_root, cleanup):
    name = _name("f")
    cleanup.append((name, state_root))
    script = tmp_path / "fail.py"
    script.write_text(STANDIN)
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as exc:
        cluster_up(
            ClusterSpec(
                name=name, nodes=1, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root
            ),
            agent_cmd=[
                "{python}",
                str(script),
                "--node-name",
                "{node}",
                "--fail",
                "no-datapath-here",
            ],
            timeout=20,
        )
    msg = str(exc.value)
    assert time.monotonic() - t0 < 15  # fails fast on a crash loop, not after the timeout
    assert "exited 3 times in a row" in msg and "no-datapath-here" in msg
    assert "\n" not in msg
    assert _leftovers(name, state_root) == []


def test_down_after_a_crash(standin, state_root, cleanup):
    """Supervisor SIGKILLed and cluster.json gone: down still finds everything."""
    name = _name("c")
    cleanup.append((name, state_root))
    doc = cluster_up(
        ClusterSpec(
            name=name, nodes=2, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root
        ),
        agent_cmd=standin,
    )
    os.kill(doc["supervisor_pid"], signal.SIGKILL)
    (state_root / name / "cluster.json").unlink()
    # a process left running in a node namespace (e.g. a user's server)
    sleeper = subprocess.Popen(
        ["ip", "netns", "exec", doc["nodes"][0]["netns"], "sleep", "600"], start_new_session=True
    )
    time.sleep(0.3)
    try:
        removed = cluster_down(name, state_root)
        assert f"netns pilus-{name}-node2" in removed
        assert _leftovers(name, state_root) == []
        assert sleeper.wait(timeout=5) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_refuses_leftovers(state_root, cleanup):
    name = _name("l")
    cleanup.append((name, state_root))
    links.create_netns(f"pilus-{name}-node1")
    try:
        with pytest.raises(ClusterError, match="leftovers.*run `pilus cluster down` first"):
            cluster_up(
                ClusterSpec(name=name, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root)
            )
    finally:
        links.delete_netns(f"pilus-{name}-node1")


def test_real_agents(state_root, cleanup):
    """The real `pilus agent` under the supervisor: healthy, endpoint API, restart, clean down."""
    name = _name("a")
    cleanup.append((name, state_root))
    doc = cluster_up(
        ClusterSpec(
            name=name, nodes=2, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root
        ),
        timeout=60,
    )
    node = doc["nodes"][0]
    status, ep = unix_http(
        node["socket"],
        "POST",
        "/v1/endpoint",
        {"name": "default/t1", "labels": ["app=t1"]},
        timeout=30,
    )
    assert status == 201, ep
    assert links.netns_exists(ep["netns"])
    r = _ns(ep["netns"], "ping", "-c1", "-W2", node["router_ip"])
    assert r.returncode == 0, r.stdout + r.stderr

    pid1 = json.loads((state_root / name / "supervisor.json").read_text())["agents"][node["name"]][
        "pid"
    ]
    os.kill(pid1, signal.SIGKILL)

    def restarted():
        sup = json.loads((state_root / name / "supervisor.json").read_text())
        pid = sup["agents"][node["name"]]["pid"]
        return pid not in (None, pid1) and healthy(node["socket"])

    assert wait_for(restarted, 30), Path(node["state_dir"], "agent.log").read_text()[-2000:]
    status, eps = unix_http(node["socket"], "GET", "/v1/endpoint")
    assert status == 200 and [e["name"] for e in eps] == ["default/t1"]

    removed = cluster_down(name, state_root)
    assert f"netns {ep['netns']}" in removed
    assert _leftovers(name, state_root) == []


def test_up_times_out_on_a_silent_agent(state_root, cleanup):
    name = _name("s")
    cleanup.append((name, state_root))
    with pytest.raises(ClusterError, match=r"did not answer GET /v1/healthz .* within 3 s"):
        cluster_up(
            ClusterSpec(name=name, pod_cidr=POD, underlay_cidr=UNDERLAY, state_root=state_root),
            agent_cmd=["sleep", "600"],
            timeout=3,
        )
    assert _leftovers(name, state_root) == []
