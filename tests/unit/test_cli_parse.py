"""Argument parsing, socket resolution and error reporting of the pilus CLI."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pilus.cli import common, monitor
from pilus.cli.main import _first_positional, build_parser, main
from pilus.datapath.events import MONITOR_TYPES


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("PILUS_SOCK", raising=False)
    monkeypatch.delenv("PILUS_CLUSTER", raising=False)
    monkeypatch.setenv("PILUS_STATE_ROOT", str(tmp_path / "run"))


def parse(*argv):
    return build_parser().parse_args(list(argv))


def bad(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pilus" in err
    return err.strip().splitlines()[-1]


# -- good arguments -----------------------------------------------------------------

def test_global_options_before_and_after_subcommand():
    assert parse("--node", "n1", "endpoint", "list").node == "n1"
    assert parse("endpoint", "list", "--node", "n2").node == "n2"
    assert parse("--node", "n1", "endpoint", "list", "--node", "n3").node == "n3"
    ns = parse("--cluster", "c1", "status", "--socket", "/x.sock")
    assert (ns.cluster, ns.socket) == ("c1", "/x.sock")
    assert parse("status").node is None


def test_endpoint_create_args():
    ns = parse("endpoint", "create", "xwing", "--labels", "org=alliance,class=xwing",
               "-l", "k8s:team=a", "--service-account", "pilot")
    assert ns.name == "default/xwing"
    assert ns.labels == ["org=alliance", "class=xwing", "k8s:team=a"]
    assert ns.service_account == "pilot"
    assert parse("endpoint", "create", "ns1/pod.a", "--labels", "a=").labels == ["a="]


def test_endpoint_refs():
    assert parse("endpoint", "get", "7").ref == "7"
    assert parse("endpoint", "get", "xwing").ref == "default/xwing"
    assert parse("ep", "rm", "kube-system/dns").ref == "kube-system/dns"


def test_exec_takes_the_rest():
    ns = parse("exec", "default/xwing", "--", "sh", "-c", "exit 3")
    assert ns.ref == "default/xwing" and ns.cmd == ["sh", "-c", "exit 3"]
    ns = parse("exec", "--node", "n2", "xwing", "ip", "-br", "a")
    assert ns.node == "n2" and ns.cmd == ["ip", "-br", "a"]


def test_monitor_args():
    ns = parse("monitor", "--type", "drop", "-v", "--endpoint", "3", "-o", "json")
    assert (ns.type, ns.verbose, ns.endpoint, ns.output) == ("drop", 1, 3, "json")
    assert parse("monitor", "-j").output == "json"
    assert parse("monitor", "--related-to", "4").endpoint == 4


def test_cluster_up_args():
    ns = parse("cluster", "up", "--nodes", "3", "--pod-cidr", "10.99.0.0/16")
    assert ns.nodes == 3 and str(ns.pod_cidr) == "10.99.0.0/16"
    assert str(ns.underlay_cidr) == "172.30.0.0/24"


def test_bpf_ct_accepts_global():
    assert parse("bpf", "ct", "list", "global").func.__name__ == "cmd_ct_list"
    assert parse("bpf", "ct", "flush").func.__name__ == "cmd_ct_flush"


def test_first_positional_skips_global_options():
    assert _first_positional(["--cluster", "x", "agent", "--node-name", "n"]) == 2
    assert _first_positional(["--socket", "/s", "status"]) == 2
    assert _first_positional(["-h"]) is None


# -- bad arguments: exit 2 with what is expected ---------------------------------------

def test_missing_command(capsys):
    assert "required: COMMAND" in bad(capsys)


def test_bad_endpoint_name(capsys):
    msg = bad(capsys, "endpoint", "create", "Bad_Name", "--labels", "a=b")
    assert "expected NAME or NAMESPACE/NAME" in msg


def test_bad_labels(capsys):
    msg = bad(capsys, "endpoint", "create", "x", "--labels", "org=empire,=oops")
    assert "invalid label '=oops'" in msg and "KEY=VALUE" in msg
    msg = bad(capsys, "endpoint", "create", "x", "--labels", "a=b c")
    assert "invalid label value" in msg


def test_labels_required(capsys):
    assert "-l/--labels" in bad(capsys, "endpoint", "create", "x")


def test_bad_identity(capsys):
    assert "expected a numeric identity" in bad(capsys, "identity", "get", "abc")


def test_bad_monitor_type(capsys):
    assert "invalid choice: 'policy'" in bad(capsys, "monitor", "--type", "policy")


def test_bad_cidr_and_nodes(capsys):
    assert "expected an IPv4 CIDR" in bad(capsys, "cluster", "up", "--pod-cidr", "10.0.0.1/16")
    assert "positive whole number" in bad(capsys, "cluster", "up", "--nodes", "0")


def test_exec_without_command(capsys):
    assert "a command is required" in bad(capsys, "exec", "xwing")


def test_bad_output_format(capsys):
    assert "invalid choice: 'xml'" in bad(capsys, "endpoint", "list", "-o", "xml")


# -- socket resolution ---------------------------------------------------------------------

def write_cluster(root, name="default", nodes=("default-node1", "default-node2")):
    d = root / name
    d.mkdir(parents=True)
    info = {"name": name, "nodes": [
        {"name": n, "netns": f"pilus-{n}", "state_dir": str(d / n),
         "socket": str(d / n / "pilus.sock"),
         "node_ip": f"172.30.0.{11 + i}", "pod_cidr": f"10.200.{i + 1}.0/24",
         "router_ip": f"10.200.{i + 1}.1"} for i, n in enumerate(nodes)]}
    (d / "cluster.json").write_text(json.dumps(info))
    return d


def test_socket_resolution_order(tmp_path, monkeypatch):
    root = tmp_path / "run"
    d = write_cluster(root)
    ns = parse("status")
    assert common.resolve_socket(ns) == str(d / "default-node1" / "pilus.sock")
    assert common.resolve_socket(parse("status", "--node", "default-node2")).endswith(
        "default-node2/pilus.sock")
    assert common.resolve_socket(parse("status", "--node", "node2")).endswith(
        "default-node2/pilus.sock")
    monkeypatch.setenv("PILUS_SOCK", "/env.sock")
    assert common.resolve_socket(ns) == "/env.sock"
    assert common.resolve_socket(parse("status", "--socket", "/opt.sock")) == "/opt.sock"


def test_cluster_from_env(tmp_path, monkeypatch):
    write_cluster(tmp_path / "run", name="blue", nodes=("blue-node1",))
    monkeypatch.setenv("PILUS_CLUSTER", "blue")
    assert common.resolve_socket(parse("status")).endswith("blue/blue-node1/pilus.sock")


def test_unknown_node(tmp_path, capsys):
    write_cluster(tmp_path / "run")
    assert main(["status", "--node", "n9"]) == 1
    err = capsys.readouterr().err
    assert err == ("Error: cluster 'default' has no node named 'n9' "
                   "(nodes: default-node1, default-node2)\n")


def test_no_cluster_is_one_line(capsys):
    assert main(["endpoint", "list"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "Error: no pilus cluster named 'default' is up: run `pilus cluster up`\n"


def test_agent_down_is_one_line(tmp_path, capsys):
    write_cluster(tmp_path / "run")
    assert main(["identity", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot reach the pilus agent at" in err and "(pilus cluster up)" in err


# -- delegation ---------------------------------------------------------------------------

def test_agent_gets_all_remaining_args(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    monkeypatch.setitem(sys.modules, "pilus.agent", types.SimpleNamespace(main=fake_main))
    import pilus

    monkeypatch.setattr(pilus, "agent", sys.modules["pilus.agent"], raising=False)
    assert main(["agent", "--node-name", "n1", "--help"]) == 3
    assert seen["argv"] == ["--node-name", "n1", "--help"]


def test_cluster_commands_call_the_manager(monkeypatch, tmp_path, capsys):
    calls = {}

    class ClusterError(Exception):
        pass

    class ClusterSpec:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def cluster_up(spec):
        calls["up"] = spec
        return {"name": spec.name, "nodes": [
            {"name": "lab-node1", "netns": "pilus-lab-node1", "node_ip": "172.30.0.11",
             "pod_cidr": "10.200.1.0/24", "router_ip": "10.200.1.1", "socket": "/nope"}]}

    def cluster_down(name, state_root):
        if name == "bad":
            raise ClusterError("cannot delete bridge plbr-bad: busy")
        return ["netns pilus-lab-node1", "bridge plbr-lab"]

    def load_cluster(name, state_root):
        return None

    mgr = types.SimpleNamespace(ClusterSpec=ClusterSpec, ClusterError=ClusterError,
                                cluster_up=cluster_up, cluster_down=cluster_down,
                                load_cluster=load_cluster)
    monkeypatch.setattr("pilus.cli.cluster._manager", lambda: mgr)

    assert main(["cluster", "up", "--name", "lab", "--nodes", "1"]) == 0
    spec = calls["up"]
    assert (spec.name, spec.nodes, str(spec.pod_cidr), spec.kvstore) == (
        "lab", 1, "10.200.0.0/16", "embedded")
    assert str(spec.state_root) == str(tmp_path / "run")
    out = capsys.readouterr().out
    assert "Cluster 'lab' is up" in out and "lab-node1" in out and "10.200.1.0/24" in out

    assert main(["--cluster", "lab", "cluster", "down"]) == 0
    assert "removed bridge plbr-lab" in capsys.readouterr().out
    assert main(["cluster", "down", "--name", "bad"]) == 1
    assert capsys.readouterr().err == "Error: cannot delete bridge plbr-bad: busy\n"
    assert main(["cluster", "status", "--name", "lab"]) == 1
    assert "no pilus cluster named 'lab' is up" in capsys.readouterr().err


def test_monitor_type_choices_are_the_datapath_event_types():
    assert tuple(MONITOR_TYPES.values()) == monitor.EVENT_TYPES
