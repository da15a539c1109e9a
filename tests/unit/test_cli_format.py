"""Table and line formats of each command, from canned JSON of the documented shapes,
and the whole CLI (main()) against a fake agent on a UNIX socket."""

from __future__ import annotations

import json
import threading

import pytest
from test_cli_fakeagent import (
    BPF_ENDPOINTS,
    BPF_METRICS,
    CT,
    DROP_EVENT,
    ENDPOINTS,
    HEALTH,
    IDENTITIES,
    IPCACHE,
    METRICS,
    TRACE_EVENT,
    FakeAgent,
)

from pilus.cli import bpf, common, endpoint, identity, monitor, node, output, status
from pilus.cli.main import main

# -- pure formatting ----------------------------------------------------------------------


def test_table_alignment_and_continuation_lines():
    text = output.table(["A", "LONGER", "C"], [["1", ["x", "yy"], "z"], ["22", "w", ""]])
    assert text == ("A    LONGER   C\n"
                    "1    x        z\n"
                    "     yy\n"
                    "22   w\n")


def test_endpoint_list_format():
    lines = endpoint.format_list(ENDPOINTS).splitlines()
    assert lines[0].split() == ["ENDPOINT", "NAME", "POLICY", "(ingress)", "ENFORCEMENT", "POLICY",
                                "(egress)", "ENFORCEMENT", "IDENTITY", "LABELS", "(source:key[=value])",
                                "IPv4", "STATUS"]
    # sorted by ID; first label on the row, the others on continuation lines, sorted
    assert lines[1].split() == ["1", "default/deathstar", "Enabled", "Disabled", "12345", "k8s:class=deathstar",
                                "10.200.1.2", "ready"]
    assert lines[2].strip() == "k8s:org=empire"
    label_col = lines[0].index("LABELS")
    assert lines[2].index("k8s:org=empire") == label_col
    assert lines[3].split()[:5] == ["3", "default/xwing", "-", "-", "23456"]
    assert [ln.strip() for ln in lines[4:8]] == [
        "k8s:io.cilium.k8s.policy.cluster=default",
        "k8s:io.cilium.k8s.policy.serviceaccount=default",
        "k8s:io.kubernetes.pod.namespace=default", "k8s:org=alliance"]
    # IPv4 column aligned across rows
    assert lines[1].index("10.200.1.2") == lines[3].index("10.200.1.4") == lines[0].index("IPv4")


def test_endpoint_detail_and_created():
    text = endpoint.format_detail(ENDPOINTS[0])
    assert "Netns:           pilus-default-node1-ep3" in text
    assert "Interface:       lxc0123456789a (ifindex 9)" in text
    assert endpoint.format_created(ENDPOINTS[1]) == (
        "Endpoint 1 default/deathstar created: identity 12345, IPv4 10.200.1.2, "
        "interface lxcaaaaaaaaaaa, state ready\n")


def test_identity_list_format():
    lines = identity.format_list(IDENTITIES).splitlines()
    assert lines[0].split() == ["ID", "ENDPOINTS", "LABELS"]
    assert lines[1].split() == ["1", "0", "reserved:host"]
    assert lines[3].split() == ["12345", "1", "k8s:class=deathstar"]
    assert lines[4].strip() == "k8s:org=empire"


def test_status_format():
    text = status.format_status(HEALTH)
    lines = text.splitlines()
    assert lines[0] == ("Node:                    default-node1 "
                        "(node IP 172.30.0.11, router IP 10.200.1.1)")
    assert ("KVStore:                 Ok   embedded /run/pilus/default/kvstore.db "
            "(revision 42, 17 keys)") in lines
    assert "Pilus:                   Ok   0.1.0 (pid 4242, up 3m12s)" in lines
    assert "Datapath:                Ok   2/2 programs attached, 2 maps" in lines
    assert "IPAM:                    IPv4: 3/253 allocated from 10.200.1.0/24" in lines
    assert "Endpoints:               3 total (3 ready)" in lines
    assert "Identities:              3 allocated" in lines
    assert "Events:                  120 received, 0 lost" in lines
    maps = [ln for ln in lines if "pilus_lxc" in ln or "pilus_ipcache" in ln]
    assert maps[0].startswith("BPF maps:                pilus_lxc       3/65536")
    assert maps[1].startswith(" " * 25 + "pilus_ipcache   5/512000")
    # every value starts at the same column, like cilium-dbg status
    assert all(ln[25] != " " for ln in lines if ln[:1] != " ")


def test_status_tolerates_sparse_health():
    text = status.format_status({"node": "n1", "ipam": {"allocated": 1, "available": 9},
                                 "pod_cidr": "10.0.0.0/28"})
    assert "IPAM:                    IPv4: 1/10 allocated from 10.0.0.0/28" in text
    assert "KVStore:                 Unknown" in text
    assert status.format_brief({"agent": {"state": "Ok"}, "kvstore": {"state": "Failure"},
                                "datapath": {"state": "Ok"}}) == "KVStore: Failure\n"


def test_bpf_formats():
    assert bpf.format_ipcache(IPCACHE).splitlines() == [
        "IP PREFIX/ADDRESS   IDENTITY",
        "10.200.1.2/32       identity=12345 tunnelendpoint=0.0.0.0",
        "10.200.2.0/24       identity=6 tunnelendpoint=172.30.0.12",
    ]
    assert bpf.format_bpf_endpoints(BPF_ENDPOINTS).splitlines()[1] == (
        "10.200.1.2:0   id=1 sec_id=12345 flags=0x0000 ifindex=7 mac=0a:58:0a:c8:01:02 "
        "nodemac=0e:11:22:33:44:56")
    assert bpf.format_ct(CT) == ("TCP OUT 10.200.1.4:40000 -> 10.200.1.2:80 expires=57 "
                                 "Packets=5 Bytes=420 Flags=[ SeenNonSyn ]\n")
    assert bpf.format_ct([dict(CT[0], flags=0x13)]).endswith("Flags=0x0013\n")
    assert bpf.format_ct([]) == "No entries found.\n"
    assert bpf.format_bpf_metrics(BPF_METRICS).splitlines() == [
        "REASON              DIRECTION   PACKETS   BYTES",
        "Success             EGRESS      10        1000",
        "Invalid source ip   EGRESS      1         42",
    ]


def test_metrics_format():
    lines = bpf.format_metrics(METRICS).splitlines()
    assert lines[0].split() == ["Metric", "Labels", "Value"]
    assert lines[1].startswith("pilus_drop_count_total   direction=EGRESS reason=Invalid source ip")
    assert lines[1].endswith("   1")
    assert lines[2].split() == ["pilus_endpoint_count", "3"]
    assert len(bpf.format_metrics(METRICS, "endpoint").splitlines()) == 2
    assert output.number(0.25) == "0.250000"


def test_monitor_drop_line():
    assert monitor.format_event(DROP_EVENT) == (
        "xx drop (Invalid source ip) flow 0x1f2e3d4c to endpoint 0, ifindex 9, "
        "identity 23456->2: 10.200.1.250:1234 -> 10.200.1.2:80 udp")


def test_monitor_drop_line_built_from_fields():
    ev = dict(DROP_EVENT, summary="", proto="tcp", src_ip="10.200.1.9", dst_ip="10.200.1.3",
              sport=1234, dport=80, tcp_flags=["SYN"], ifindex=7, src_identity=12345)
    assert monitor.format_event(ev) == (
        "xx drop (Invalid source ip) flow 0x1f2e3d4c to endpoint 0, ifindex 7, "
        "identity 12345->2: 10.200.1.9:1234 -> 10.200.1.3:80 tcp SYN")
    icmp = dict(ev, proto="icmp", sport=None, dport=None, icmp_type=8, icmp_code=0)
    assert monitor.format_event(icmp).endswith(": 10.200.1.9 -> 10.200.1.3 icmp EchoRequest")


def test_monitor_trace_line():
    assert monitor.format_event(TRACE_EVENT, ifnames={7: "lxc1234"}) == (
        "-> endpoint 1 flow 0xabc , identity 23456->12345 state new ifindex lxc1234 "
        "orig-ip 0.0.0.0: 10.200.1.4:40000 -> 10.200.1.2:80 tcp SYN")
    # numeric observation point / ct state, unknown ifindex -> number
    ev = dict(TRACE_EVENT, observation_point=5, ct_state=2, tcp_flags=["SYN", "ACK"])
    assert monitor.format_event(ev).startswith(
        "<- endpoint 3 flow 0xabc , identity 23456->12345 state reply ifindex 7 ")
    assert monitor.format_event(ev).endswith("tcp SYN, ACK")
    assert monitor.format_event(dict(ev, observation_point="to-stack")).startswith("-> stack ")
    assert monitor.format_event(dict(ev, observation_point="FROM_NETWORK")).startswith(
        "<- network ")


def test_monitor_lost_and_verbose():
    assert monitor.format_event({"type": "lost", "count": 12}) == "EVENTS LOST: 12"
    text = monitor.format_event(DROP_EVENT, verbose=1).splitlines()
    assert text[0] == "-" * 78
    assert text[1].startswith("xx drop (Invalid source ip)")
    assert text[2] == "  42 bytes on the wire, 42 captured, at 2026-11-26T12:01:00Z"
    assert text[3].startswith("  00000000  45 00 00 20 00 00 00 00  00 00")
    assert text[3].endswith("|E.. ............|")


# -- the whole CLI against a fake agent ------------------------------------------------


@pytest.fixture
def agent(monkeypatch):
    fake = FakeAgent().start()
    monkeypatch.setenv("PILUS_SOCK", fake.socket)
    try:
        yield fake
    finally:
        fake.stop()


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, first", [
    (["endpoint", "list"], "ENDPOINT   NAME"),
    (["identity", "list"], "ID      ENDPOINTS   LABELS"),
    (["identity", "get", "12345"], "ID      ENDPOINTS   LABELS"),
    (["status"], "Node:"),
    (["bpf", "ipcache", "list"], "IP PREFIX/ADDRESS"),
    (["bpf", "endpoint", "list"], "IP ADDRESS"),
    (["bpf", "ct", "list"], "TCP OUT"),
    (["bpf", "metrics", "list"], "REASON"),
    (["metrics", "list"], "Metric"),
    (["endpoint", "get", "default/xwing"], "ID:"),
])
def test_commands_print_tables(agent, capsys, argv, first):
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, "")
    assert out.startswith(first)


@pytest.mark.parametrize("argv", [
    ["endpoint", "list"], ["endpoint", "get", "1"], ["identity", "list"],
    ["identity", "get", "1"], ["status"], ["bpf", "ipcache", "list"],
    ["bpf", "endpoint", "list"], ["bpf", "ct", "list"], ["bpf", "metrics", "list"],
    ["metrics", "list"], ["bpf", "ct", "flush"],
])
def test_json_output_is_the_api_data(agent, capsys, argv):
    rc, out, _ = run(capsys, *argv, "-o", "json")
    assert rc == 0
    json.loads(out)


def test_endpoint_create_and_delete(agent, capsys):
    rc, out, _ = run(capsys, "endpoint", "create", "tiefighter", "--labels",
                     "org=empire,class=tiefighter")
    assert rc == 0 and out.startswith("Endpoint 9 default/tiefighter created:")
    assert agent.requests[-1][2] == {"name": "default/tiefighter",
                                     "labels": ["org=empire", "class=tiefighter"]}
    rc, out, _ = run(capsys, "endpoint", "delete", "default/tiefighter")
    assert (rc, out) == (0, "Endpoint 9 deleted\n")


def test_api_errors_are_one_line(agent, capsys):
    rc, out, err = run(capsys, "endpoint", "create", "xwing", "--labels", "org=alliance")
    assert (rc, out) == (1, "")
    assert err == "Error: endpoint default/xwing already exists: delete it first\n"
    rc, _, err = run(capsys, "endpoint", "get", "42")
    assert (rc, err) == (1, "Error: endpoint 42 not found\n")


def test_monitor_command(agent, capsys):
    rc, out, err = run(capsys, "monitor")
    lines = out.splitlines()
    assert lines[0].startswith("xx drop (Invalid source ip) flow 0x1f2e3d4c")
    assert lines[1] == "EVENTS LOST: 5"
    # ifindex 7 resolved to the endpoint's host-side interface via GET /v1/endpoint
    assert "ifindex lxcaaaaaaaaaaa orig-ip" in lines[2]
    assert err.startswith("Listening for events... Press Ctrl-C to quit\n")
    # the agent ended the stream (not Ctrl-C): say so, exit 1
    assert "closed the event stream" in err and rc == 1


def test_monitor_json_and_filters(agent, capsys):
    rc, out, _ = run(capsys, "monitor", "--type", "drop", "--endpoint", "3", "-o", "json")
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["drop", "lost"]
    assert ("GET", "/v1/monitor?type=drop&endpoint=3", None) in agent.requests


def test_monitor_ctrl_c_exits_0_quietly(monkeypatch, capsys, agent):
    from pilus.api import client as client_mod

    def interrupted(self, type=None, endpoint=None):
        def gen():
            yield DROP_EVENT
            raise KeyboardInterrupt
        return gen()

    monkeypatch.setattr(client_mod.Client, "stream_monitor", interrupted)
    rc, out, err = run(capsys, "monitor")
    assert rc == 0
    assert out.startswith("xx drop")
    assert err == "Listening for events... Press Ctrl-C to quit\n"


def test_monitor_unreachable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PILUS_SOCK", str(tmp_path / "none.sock"))
    rc, out, err = run(capsys, "monitor")
    assert rc == 1 and out == ""
    assert err == (f"Error: cannot reach the pilus agent at {tmp_path / 'none.sock'}: "
                   "is the cluster up? (pilus cluster up)\n")


def test_exec_runs_ip_netns_exec(agent, capsys, monkeypatch):
    seen = {}

    def fake_execvp(file, argv):
        seen["call"] = (file, argv)
        raise SystemExit(0)

    monkeypatch.setattr("os.execvp", fake_execvp)
    with pytest.raises(SystemExit):
        main(["exec", "default/xwing", "--", "sh", "-c", "exit 3"])
    assert seen["call"] == ("ip", ["ip", "netns", "exec", "pilus-default-node1-ep3",
                                   "sh", "-c", "exit 3"])


def test_fake_agent_serves_concurrently(agent):
    # sanity of the fixture itself: two clients at once
    from pilus.api.client import Client

    results = []
    threads = [threading.Thread(target=lambda: results.append(Client(agent.socket).healthz()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == [HEALTH, HEALTH]


def test_status_shows_components_and_failed_map_writes():
    health = {"agent": {"state": "Ok"}, "kvstore": {"state": "Ok"}, "datapath": {"state": "Ok"},
              "components": [
                  {"name": "datapath", "job": "load", "state": "Ok"},
                  {"name": "ipcache", "job": "owner", "state": "Ok",
                   "maps": [{"name": "ipcache", "state": "Pending", "desired": 4, "pending": 1, "errors": 3,
                             "last_error": "10.9.0.0/16: no space left on device"}]},
                  {"name": "metrics", "job": "Prometheus /metrics", "state": "Disabled"},
              ]}
    lines = status.format_status(health).splitlines()
    assert "Components:              2/2 Ok" in lines
    assert ("Map writers:             ipcache   Pending   4 desired, 1 pending, 3 errors, "
            "last: 10.9.0.0/16: no space left on device") in lines
    assert status.format_brief(health) == "OK\n"
    health["components"][0]["state"] = "Failed: clang not found"
    assert status.format_brief(health) == "datapath: Failed: clang not found\n"
    assert "Components:              1/2 Ok (datapath: Failed: clang not found)" in status.format_status(health)


# -- pilus node list ----------------------------------------------------------------------

NODES = [
    {"name": "default-node2", "cluster": "default", "node_ip": "172.30.0.12", "pod_cidr": "10.200.2.0/24",
     "router_ip": "10.200.2.1", "health": "Ok", "boot_id": "b2", "started": 2.0, "local": False},
    {"name": "default-node1", "cluster": "default", "node_ip": "172.30.0.11", "pod_cidr": "10.200.1.0/24",
     "router_ip": "10.200.1.1", "health": "Ok", "boot_id": "b1", "started": 1.0, "local": True},
]


def test_node_list_format():
    lines = node.format_list(NODES).splitlines()
    assert lines[0].split() == ["NAME", "IPV4", "ADDRESS", "ENDPOINT", "CIDR", "ROUTER", "IP", "HEALTH"]
    assert lines[1].split() == ["default-node1", "(local)", "172.30.0.11", "10.200.1.0/24", "10.200.1.1", "Ok"]
    assert lines[2].split() == ["default-node2", "172.30.0.12", "10.200.2.0/24", "10.200.2.1", "Ok"]
    assert node.format_list(NODES, no_headers=True).splitlines()[0].startswith("default-node1")


class _NodesClient:
    def list_nodes(self):
        return NODES


@pytest.mark.parametrize("extra", [[], ["-o", "json"]])
def test_node_list_command(monkeypatch, capsys, extra):
    monkeypatch.setattr(common, "client", lambda args: _NodesClient())
    rc, out, err = run(capsys, "node", "list", *extra)
    assert (rc, err) == (0, "")
    if extra:
        assert json.loads(out) == NODES
    else:
        assert out.startswith("NAME") and "default-node1 (local)" in out


def test_status_shows_cluster_nodes():
    lines = status.format_status({**HEALTH, "nodes": {"nodes": 3, "reachable": 2}}).splitlines()
    assert "Cluster:                 2/3 nodes reachable" in lines
    assert not any(ln.startswith("Cluster:") for ln in status.format_status(HEALTH).splitlines())


def test_status_names_the_etcd_endpoint():
    text = status.format_status({"kvstore": {"state": "Ok", "backend": "etcd", "endpoint": "http://172.30.0.1:2379",
                                             "revision": 9}})
    assert "KVStore:                 Ok   etcd http://172.30.0.1:2379 (revision 9)" in text
