"""pilus.cluster: the pure parts (names, CIDR carving, cluster.json shape)."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pilus.cluster import plan
from pilus.cluster.plan import ClusterError, ClusterSpec


def test_node_pod_cidrs_are_the_ith_slash24():
    pod = IPv4Network("10.200.0.0/16")
    assert plan.node_pod_cidr(pod, 1) == IPv4Network("10.200.1.0/24")
    assert plan.node_pod_cidr(pod, 2) == IPv4Network("10.200.2.0/24")
    assert plan.node_pod_cidr(pod, 255) == IPv4Network("10.200.255.0/24")
    assert plan.node_pod_cidr(IPv4Network("10.8.0.0/14"), 300) == IPv4Network("10.9.44.0/24")
    with pytest.raises(ClusterError):
        plan.node_pod_cidr(pod, 256)
    assert plan.router_ip(IPv4Network("10.200.3.0/24")) == "10.200.3.1"


def test_underlay_addresses():
    und = IPv4Network("172.30.0.0/24")
    assert plan.bridge_ip(und) == "172.30.0.1"
    assert plan.node_ip(und, 1) == "172.30.0.11"
    assert plan.node_ip(und, 3) == "172.30.0.13"


def test_names():
    assert plan.node_name("default", 1) == "default-node1"
    assert plan.node_netns("default-node1") == "pilus-default-node1"
    assert plan.bridge_name("default") == "plbr-default"
    assert plan.bridge_name("averyveryverylongname") == "plbr-averyveryv"
    for name in ("default", "a", "x" * 32, "bench"):
        for i in (1, 9, 200):
            v = plan.host_veth_name(name, i)
            assert len(v) <= 15 and plan.host_veth_re(name).match(v)
            assert len(plan.bridge_name(name)) <= 15
    # long names that share a prefix still get different veth names
    assert plan.host_veth_name("clusterone", 1) != plan.host_veth_name("clustertwo", 1)
    assert plan.host_veth_name("bench", 2) == "plubench2"


def test_name_patterns_do_not_catch_other_clusters():
    ns = plan.node_netns_re("a")
    assert ns.match("pilus-a-node1")
    assert ns.match("pilus-a-node12-ep7")
    assert not ns.match("pilus-a-node-node1")  # cluster "a-node"
    assert not ns.match("pilus-ab-node1")
    assert not ns.match("pilus-a-ext")
    assert plan.node_name_re("a").match("a-node3")
    assert not plan.node_name_re("a").match("a-node3x")
    assert not plan.host_veth_re("bench").match("plubench2x")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "Bad_Name"}, "invalid cluster name"),
        ({"name": "-x"}, "invalid cluster name"),
        ({"nodes": 0}, "invalid node count"),
        ({"pod_cidr": IPv4Network("10.200.0.0/24")}, "too small"),
        ({"pod_cidr": IPv4Network("10.200.0.0/23"), "nodes": 2}, "room for 1 nodes"),
        ({"underlay_cidr": IPv4Network("172.30.0.0/29")}, "too small"),
        ({"pod_cidr": IPv4Network("172.30.0.0/16")}, "overlaps"),
        ({"kvstore": "zookeeper"}, "unknown kvstore 'zookeeper': use one of embedded, etcd"),
    ],
)
def test_validate_rejects(kwargs, fragment):
    with pytest.raises(ClusterError, match=fragment):
        plan.validate(ClusterSpec(**kwargs))


def test_cluster_json_shape():
    spec = ClusterSpec(name="default", nodes=2, state_root=Path("/run/pilus"))
    doc = plan.build_cluster_doc(spec, supervisor_pid=123)
    assert doc["name"] == "default"
    assert doc["bridge"] == "plbr-default"
    assert doc["underlay_cidr"] == "172.30.0.0/24"
    assert doc["pod_cidr"] == "10.200.0.0/16"
    assert doc["kvstore"] == "embedded"
    assert doc["kvstore_path"] == "/run/pilus/default/kvstore.db"
    assert doc["supervisor_pid"] == 123
    n1, n2 = doc["nodes"]
    assert n1 == {
        "name": "default-node1",
        "index": 1,
        "netns": "pilus-default-node1",
        "state_dir": "/run/pilus/default/default-node1",
        "socket": "/run/pilus/default/default-node1/pilus.sock",
        "node_ip": "172.30.0.11",
        "underlay_device": "eth0",
        "host_veth": plan.host_veth_name("default", 1),
        "pod_cidr": "10.200.1.0/24",
        "router_ip": "10.200.1.1",
    }
    assert (n2["node_ip"], n2["pod_cidr"], n2["router_ip"]) == (
        "172.30.0.12",
        "10.200.2.0/24",
        "10.200.2.1",
    )


def test_agent_argv_default_and_override():
    doc = plan.build_cluster_doc(ClusterSpec(name="c1", nodes=1))
    node = doc["nodes"][0]
    argv = plan.agent_argv(doc, node, "/usr/bin/python3")
    assert argv == [
        "/usr/bin/python3", "-m", "pilus", "agent",
        "--node-name", "c1-node1",
        "--state-dir", "/run/pilus/c1/c1-node1",
        "--pod-cidr", "10.200.1.0/24",
        "--cluster-name", "c1",
        "--kvstore", "embedded",
        "--kvstore-path", "/run/pilus/c1/kvstore.db",
        "--native-device", "eth0",
        "--cluster-cidr", "10.200.0.0/16",
        "--routing-mode", "tunnel",
        "--hubble-listen-address", ":4244",
        "--hubble-metrics", "flow,drop,tcp,policy",
    ]  # fmt: skip
    doc["agent_cmd"] = ["{python}", "fake.py", "--node-name", "{node}", "--socket", "{socket}"]
    assert plan.agent_argv(doc, node, "py") == [
        "py", "fake.py", "--node-name", "c1-node1", "--socket", "/run/pilus/c1/c1-node1/pilus.sock",
    ]  # fmt: skip


def test_supervisor_exec_prefix(monkeypatch):
    from pilus.cluster import supervisor

    monkeypatch.setenv("PILUS_AGENT_EXEC", "ip-netns-exec")
    assert supervisor.netns_exec_prefix("pilus-x-node1") == ["ip", "netns", "exec", "pilus-x-node1"]
    monkeypatch.delenv("PILUS_AGENT_EXEC")
    monkeypatch.setattr(supervisor.shutil, "which", lambda _: "/usr/bin/nsenter")
    assert supervisor.netns_exec_prefix("pilus-x-node1") == [
        "nsenter",
        "--net=/run/netns/pilus-x-node1",
        "--",
    ]


def test_etcd_cluster_doc_and_argv():
    doc = plan.build_cluster_doc(ClusterSpec(name="c1", nodes=2, kvstore="etcd"))
    assert doc["kvstore"] == "etcd" and doc["kvstore_path"] is None
    assert doc["kvstore_address"] == "http://172.30.0.1:2379"
    assert doc["etcd"] == {
        "data_dir": "/run/pilus/c1/etcd",
        "peer_url": "http://172.30.0.1:2380",
        "log": "/run/pilus/c1/etcd.log",
    }
    assert plan.kvstore_description(doc) == "etcd http://172.30.0.1:2379"
    argv = plan.agent_argv(doc, doc["nodes"][1], "py")
    assert argv[argv.index("--kvstore") : argv.index("--kvstore") + 4] == [
        "--kvstore", "etcd", "--kvstore-opt", "etcd.address=http://172.30.0.1:2379",
    ]  # fmt: skip
    assert "--kvstore-path" not in argv
    etcd = plan.etcd_argv(doc)
    assert etcd[0] == "etcd"
    opts = dict(zip(etcd[1::2], etcd[2::2], strict=False))
    assert opts["--data-dir"] == "/run/pilus/c1/etcd"
    assert opts["--listen-client-urls"] == "http://172.30.0.1:2379"
    assert opts["--listen-peer-urls"] == "http://172.30.0.1:2380"
    assert opts["--initial-cluster"] == "c1=http://172.30.0.1:2380"
    embedded = plan.build_cluster_doc(ClusterSpec(name="c1"))
    assert "etcd" not in embedded and "kvstore_address" not in embedded
    assert plan.kvstore_description(embedded) == "embedded /run/pilus/c1/kvstore.db"


def test_cli_kvstore_choices_match_the_plan():
    from pilus.cli import cluster as cli_cluster

    assert cli_cluster.KVSTORES == plan.KVSTORES


def test_cli_rejects_an_unknown_kvstore(capsys):
    from pilus.cli.main import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["cluster", "up", "--kvstore", "zookeeper"])
    assert exc.value.code == 2
    assert "invalid choice: 'zookeeper'" in capsys.readouterr().err
