"""`pilus cluster up --kvstore etcd`: one supervised etcd on the bridge address, shared by
the real agents of two nodes; `cluster down` leaves no etcd and no data dir.

Own ranges (pod 10.204.0.0/16, underlay 172.31.248.0/24) and a tmp state root, so it
neither meets the other e2e clusters nor a system etcd on 127.0.0.1:2379."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pilus.cluster import ClusterSpec, cluster_down, cluster_up
from pilus.cluster.manager import unix_http
from pilus.cluster.supervisor import etcd_healthy

from .conftest import wait_for

POD = IPv4Network("10.204.0.0/16")
UNDERLAY = IPv4Network("172.31.248.0/24")
ADDRESS = "http://172.31.248.1:2379"
REPO = Path(__file__).resolve().parents[2]


def _pilus(state_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PILUS_STATE_ROOT=str(state_root), PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "pilus", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def _json(state_root: Path, *args: str):
    done = _pilus(state_root, *args, "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)



def _etcd_pids(data_dir: Path) -> list[int]:
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"etcd" and str(data_dir).encode() in argv:
            out.append(int(pid))
    return out


@pytest.fixture
def etcd_cluster(tmp_path):
    name = f"te{os.getpid() % 10000}"
    root = tmp_path / "state"
    cluster_down(name, root)
    try:
        yield name, root
    finally:
        cluster_down(name, root)


def test_cluster_on_etcd(etcd_cluster):
    name, root = etcd_cluster
    done = _pilus(root, "cluster", "up", "--name", name, "--nodes", "2", "--kvstore", "etcd",
                  "--pod-cidr", str(POD), "--underlay-cidr", str(UNDERLAY))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"kvstore etcd {ADDRESS}" in done.stdout
    doc = json.loads((root / name / "cluster.json").read_text())
    assert (doc["kvstore"], doc["kvstore_address"]) == ("etcd", ADDRESS)
    data_dir = root / name / "etcd"
    assert data_dir.is_dir() and len(_etcd_pids(data_dir)) == 1

    status = _pilus(root, "cluster", "status", "--name", name)
    assert f"kvstore etcd {ADDRESS} (Ok)" in status.stdout, status.stdout + status.stderr

    n1, n2 = doc["nodes"]
    for node in (n1, n2):
        kv = _json(root, "--socket", node["socket"], "status")["kvstore"]
        assert (kv["backend"], kv["endpoint"], kv["state"]) == ("etcd", ADDRESS, "Ok"), kv

    # shared store: node 2 sees the identity of an endpoint made on node 1
    st, ep = unix_http(n1["socket"], "POST", "/v1/endpoint",
                       {"name": "default/etcd1", "labels": ["app=etcd-shared"]}, timeout=30)
    assert st == 201, ep

    def on_node2():
        ids = _json(root, "--socket", n2["socket"], "identity", "list")
        return [i for i in ids if any("app=etcd-shared" in x for x in i.get("labels") or [])]

    shared = wait_for(on_node2, 15)
    assert shared and shared[0]["id"] == ep["identity"], (shared, ep)

    # supervised: a killed etcd comes back and the agents' kvstore is Ok again
    (pid1,) = _etcd_pids(data_dir)
    os.kill(pid1, signal.SIGKILL)

    def back():
        pids = _etcd_pids(data_dir)
        if pids == [pid1] or not pids or not etcd_healthy(ADDRESS, timeout=0.5):
            return False
        kv = _json(root, "--socket", n2["socket"], "status")["kvstore"]
        return kv["state"] == "Ok"

    assert wait_for(back, 10), (root / name / "supervisor.log").read_text()[-2000:]

    down = _pilus(root, "cluster", "down", "--name", name)
    assert down.returncode == 0, down.stdout + down.stderr
    assert _etcd_pids(data_dir) == [] and not data_dir.exists()
    assert not etcd_healthy(ADDRESS, timeout=0.5)


def test_etcd_that_cannot_start_is_one_line_and_leaves_nothing(etcd_cluster, monkeypatch, tmp_path):
    name, root = etcd_cluster
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "etcd").write_text("#!/bin/sh\necho 'etcd: listen tcp: address already in use' >&2\n"
                               "exit 1\n")
    (fake / "etcd").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    from pilus.cluster import ClusterError

    with pytest.raises(ClusterError) as exc:
        cluster_up(ClusterSpec(name=name, nodes=1, pod_cidr=POD, underlay_cidr=UNDERLAY,
                               state_root=root, kvstore="etcd"), timeout=20)
    msg = str(exc.value)
    assert ADDRESS in msg and "address already in use" in msg and "\n" not in msg, msg
    assert not (root / name).exists()
    assert not any(n.startswith(f"pilus-{name}-") for n in os.listdir("/run/netns"))
