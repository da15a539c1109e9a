"""``pilus observe`` without a cluster: its flags -> GetFlowsRequest (number/first/follow,
since/until, FlowFilters built as hubble's with --not), and hubble's output formats of
real flows (pilus.hubble.flows from typed datapath events), plus the errors it reports
in one line."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from test_hubble_flows import DEATHSTAR_IP, PARSER, T0, WORLD_IP, XWING_IP, drop, packet, trace, verdict

from pilus.cli import common, observe
from pilus.cli.main import build_parser, main
from pilus.datapath import abi
from pilus.hubble.protos import flow_pb2, observer_pb2, relay_pb2

NOW = datetime(2026, 12, 3, 10, 0, 0, tzinfo=UTC)


def request(*argv: str) -> observer_pb2.GetFlowsRequest:
    args = build_parser().parse_args(["observe", *argv])
    return observe.build_request(args, now=NOW)


def response(event) -> observer_pb2.GetFlowsResponse:
    f = PARSER.parse(event)
    return observer_pb2.GetFlowsResponse(flow=f, node_name=f.node_name, time=f.time)


# -- the request -----------------------------------------------------------------------------

def test_last_20_is_the_default_and_last_first_all_follow_set_number():
    assert (request().number, request().first, request().follow) == (20, False, False)
    assert request("--last", "100").number == 100
    r = request("--first", "5")
    assert (r.number, r.first) == (5, True)
    assert request("--all").number == 0
    r = request("-f")
    assert (r.follow, r.number) == (True, 0)
    assert request("-f", "--last", "3").number == 3
    assert request("--since", "5m").number == 0  # since alone: everything since


def test_first_does_not_combine_with_last_or_follow_and_table_not_with_follow():
    for argv in (["--first", "2", "--last", "3"], ["--first", "2", "-f"], ["--first", "1", "--all"]):
        with pytest.raises(common.CLIError, match="--first cannot be combined"):
            request(*argv)
    with pytest.raises(common.CLIError, match="table is not compatible with --follow"):
        request("-o", "table", "-f")


def test_since_and_until_take_durations_and_rfc3339():
    r = request("--since", "1h30m", "--until", "2026-12-03T09:59:00Z")
    assert r.since.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 3, 8, 30, tzinfo=UTC)
    assert r.until.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 3, 9, 59, tzinfo=UTC)
    assert request("--since", "90s").since.ToDatetime(tzinfo=UTC) == datetime(2026, 12, 3, 9, 58, 30, tzinfo=UTC)
    assert request("--since", "2026-12-03 08:00").since.ToDatetime(tzinfo=UTC).hour == 8  # no zone: UTC
    with pytest.raises(common.CLIError, match="invalid time 'yesterday'"):
        request("--since", "yesterday")


def test_flags_of_one_side_and_different_kinds_make_one_filter():
    r = request("--from-pod", "default/xwing", "--to-label", "class=deathstar", "--to-port", "80",
                "--verdict", "DROPPED", "--from-pod", "default/tie")
    assert len(r.whitelist) == 1 and not r.blacklist
    f = r.whitelist[0]
    assert list(f.source_pod) == ["default/xwing", "default/tie"]  # one kind: OR
    assert list(f.destination_label) == ["class=deathstar"] and list(f.destination_port) == ["80"]
    assert list(f.verdict) == [flow_pb2.DROPPED]


def test_a_flag_of_either_end_makes_a_source_and_a_destination_filter():
    r = request("--pod", "default/xwing", "--protocol", "tcp")
    assert [(list(f.source_pod), list(f.destination_pod), list(f.protocol)) for f in r.whitelist] == [
        (["default/xwing"], [], ["tcp"]), ([], ["default/xwing"], ["tcp"])]
    ns = request("--namespace", "kube-system").whitelist
    assert [list(f.source_pod) for f in ns] == [["kube-system/"], []]
    assert [list(f.destination_pod) for f in ns] == [[], ["kube-system/"]]
    with pytest.raises(common.CLIError, match="--from-ip and --ip cannot be combined"):
        request("--from-ip", "10.0.0.1", "--ip", "10.0.0.2")


def test_not_sends_only_the_next_filter_to_the_deny_list():
    r = request("--verdict", "DROPPED", "--not", "--to-port", "53", "--drop-reason-desc", "POLICY_DENIED")
    assert [list(f.destination_port) for f in r.blacklist] == [["53"]]
    assert len(r.whitelist) == 1 and list(r.whitelist[0].drop_reason_desc) == [flow_pb2.POLICY_DENIED]
    with pytest.raises(common.CLIError, match="--not must be followed"):
        request("--verdict", "DROPPED", "--not")


def test_typed_filters():
    f = request("--type", "trace:to-endpoint", "--type", "drop", "--tcp-flags", "SYN,ACK",
                "--traffic-direction", "ingress", "--identity", "world",
                "--node-name", "hr*/hr*-node2", "--http-status", "5+").whitelist
    assert len(f) == 2
    types = [(t.type, t.sub_type, t.match_sub_type) for t in f[0].event_type]
    assert types == [(4, abi.TRACE_TO_LXC, True), (1, 0, False)]
    assert f[0].tcp_flags[0].SYN and f[0].tcp_flags[0].ACK and not f[0].tcp_flags[0].FIN
    assert list(f[0].traffic_direction) == [flow_pb2.INGRESS]
    assert list(f[0].source_identity) == [2] and list(f[1].destination_identity) == [2]
    assert list(request("--from-identity", "1000", "--from-identity", "host").whitelist[0].source_identity) == [1000, 1]
    assert list(f[0].node_name) == ["hr*/hr*-node2"] and list(f[0].http_status_code) == ["5+"]
    for argv, message in ((["--verdict", "MAYBE"], "invalid verdict 'MAYBE'"),
                          (["--type", "nope"], "invalid event type 'nope'"),
                          (["--tcp-flags", "SYN,BOGUS"], "invalid TCP flags"),
                          (["--identity", "martians"], "invalid identity 'martians'")):
        with pytest.raises(common.CLIError, match=message):
            request(*argv)


def test_print_raw_filters_shows_the_request(capsys):
    assert main(["observe", "--to-pod", "default/deathstar", "--not", "--verdict", "FORWARDED",
                 "--print-raw-filters"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw == {"allowlist": [{"destination_pod": ["default/deathstar"]}],
                   "denylist": [{"verdict": ["FORWARDED"]}]}


# -- output ------------------------------------------------------------------------------------

def test_compact_policy_verdict_and_drop_lines_are_hubbles():
    denied = response(verdict(-133, t=T0))
    assert observe.format_flow(denied) == (
        "Jun 15 15:06:40.250: default/xwing:43512 (ID:1000) -> default/deathstar-6c94d:80 (ID:1001) "
        "policy-verdict:L3-L4 INGRESS DENIED (TCP Flags: SYN)")
    dropped = response(drop(133, t=T0))
    assert observe.format_flow(dropped, node_name=True) == (
        "Jun 15 15:06:40.250 [default/default-node1]: default/xwing:43512 (ID:1000) <> "
        "default/deathstar-6c94d:80 (ID:1001) Policy denied DROPPED (TCP Flags: SYN)")
    assert observe.format_flow(dropped, translate=False).split(": ", 1)[1].startswith(
        f"{XWING_IP}:43512 (ID:1000) <> {DEATHSTAR_IP}:80")


def test_compact_reply_flips_the_ends_and_world_prints_its_name():
    reply = response(trace(abi.TRACE_TO_LXC, ct=2, source_ep=6, src_id=1001, t=T0,
                           pkt=packet(src=DEATHSTAR_IP, dst=XWING_IP)))
    line = observe.format_flow(reply)
    assert ": default/xwing:80 (ID:1000) <- default/deathstar-6c94d:43512 (ID:1001) to-endpoint FORWARDED" in line
    world = response(verdict(0, pkt=packet(src=WORLD_IP, dst=XWING_IP), source_ep=5, local=1000, remote=2))
    assert f": {WORLD_IP}:43512 (world) -> default/xwing:80 (ID:1000) policy-verdict:L3-L4 INGRESS ALLOWED" \
        in observe.format_flow(world)


def test_json_is_one_getflowsresponse_per_line_with_proto_field_names():
    out, err = io.StringIO(), io.StringIO()
    printer = observe.Printer("json", out=out, err=err)
    printer.write(response(drop(133, t=T0)))
    printer.write(observe_status(relay_pb2.NODE_CONNECTED))  # informational: not printed
    line = out.getvalue().strip()
    assert "\n" not in line and not err.getvalue()
    doc = json.loads(line)
    assert doc["node_name"] == "default/default-node1" and doc["time"] == "2025-06-15T15:06:40.250Z"
    f = doc["flow"]
    assert (f["verdict"], f["drop_reason_desc"], f["traffic_direction"]) == ("DROPPED", "POLICY_DENIED", "INGRESS")
    assert f["source"]["pod_name"] == "xwing" and f["destination"]["pod_name"] == "deathstar-6c94d"
    assert "k8s:class=xwing" in f["source"]["labels"] and f["l4"]["TCP"]["destination_port"] == 80
    assert f["Summary"] == "TCP Flags: SYN" and f["event_type"] == {"type": 1, "sub_type": 133}


def observe_status(state: int, names=("n2",)) -> observer_pb2.GetFlowsResponse:
    from pilus.hubble.flows import timestamp

    return observer_pb2.GetFlowsResponse(
        node_status=relay_pb2.NodeStatusEvent(state_change=state, node_names=list(names)),
        node_name="hubble-relay", time=timestamp(T0))


def test_unavailable_nodes_and_lost_events_go_to_stderr():
    out, err = io.StringIO(), io.StringIO()
    printer = observe.Printer("compact", out=out, err=err)
    printer.write(observe_status(relay_pb2.NODE_UNAVAILABLE, ["hr1-node2"]))
    printer.write(observer_pb2.GetFlowsResponse(lost_events=flow_pb2.LostEvent(
        source=flow_pb2.HUBBLE_RING_BUFFER, num_events_lost=7)))
    assert not out.getvalue()
    assert err.getvalue().splitlines() == [
        "Jun 15 15:06:40.250 [hubble-relay]: 1 nodes are unavailable: hr1-node2",
        "EVENTS LOST: HUBBLE_RING_BUFFER CPU(0) 7"]


def test_dict_and_table_formats():
    out = io.StringIO()
    printer = observe.Printer("dict", out=out)
    printer.write(response(drop(133, t=T0)))
    printer.write(response(drop(133, t=T0 + 1)))
    blocks = out.getvalue().split("------------\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines() == [
        "  TIMESTAMP: Jun 15 15:06:40.250", "     SOURCE: default/xwing:43512",
        "DESTINATION: default/deathstar-6c94d:80", "       TYPE: Policy denied", "    VERDICT: DROPPED",
        "    SUMMARY: TCP Flags: SYN"]
    out = io.StringIO()
    printer = observe.Printer("table", out=out)
    printer.write(response(drop(133, t=T0)))
    printer.close()
    header, row = out.getvalue().splitlines()
    assert header.split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert header.index("SOURCE") == row.index("default/xwing") == len("Jun 15 15:06:40.250") + 3
    assert row.endswith("DROPPED   TCP Flags: SYN")


# -- where it connects -----------------------------------------------------------------------

def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PILUS_STATE_ROOT", str(tmp_path))
    monkeypatch.delenv("PILUS_SOCK", raising=False)
    assert main(["observe", "--cluster", "nope"]) == 1
    assert capsys.readouterr().err.strip() == "Error: no pilus cluster named 'nope' is up: run " \
                                              "`pilus cluster up --name nope`"
    cdir = tmp_path / "c1"
    (cdir / "c1-node1").mkdir(parents=True)
    doc = {"name": "c1", "relay_address": "127.0.0.1:1",
           "nodes": [{"name": "c1-node1", "state_dir": str(cdir / "c1-node1"),
                      "socket": str(cdir / "c1-node1" / "pilus.sock")}]}
    (cdir / "cluster.json").write_text(json.dumps(doc))
    assert main(["observe", "--cluster", "c1", "--node", "node1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: node c1-node1 has no Hubble socket (") and "\n" not in err
    monkeypatch.setattr(observe, "CONNECT_TIMEOUT", 0.3)
    assert main(["observe", "--cluster", "c1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: the Hubble Relay of cluster 'c1' at 127.0.0.1:1 does not answer") and "\n" not in err
