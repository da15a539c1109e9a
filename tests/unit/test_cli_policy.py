"""``pilus policy ...``, ``pilus namespace ...``, ``pilus bpf policy get``,
``pilus endpoint create --port`` and ``pilus monitor --type policy-verdict``: argument
checks, formats, and the whole CLI against a fake agent serving canned JSON of the
documented shapes (src/pilus/api/openapi.yaml)."""

from __future__ import annotations

import json

import pytest
import yaml
from aiohttp import web
from test_cli_fakeagent import IDENTITIES, FakeAgent

from pilus.cli import bpf, monitor, namespace, policy
from pilus.cli.main import build_parser, main

CNP = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "rule1", "namespace": "default"},
       "spec": {"endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                             "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}
KNP = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
       "metadata": {"name": "deny-all", "namespace": "rebels"},
       "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
POLICY_GET = {"revision": 7, "policies": [CNP, KNP]}
IMPORTED = {"revision": 8,
            "imported": [{"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "rule1"},
                         {"kind": "CiliumClusterwideNetworkPolicy", "namespace": None,
                          "name": "world"}],
            "warnings": ["document 1 (CiliumClusterwideNetworkPolicy world): "
                         "spec.ingress[0].toPorts[0].ports[0].protocol: SCTP cannot be "
                         "enforced by this kernel"]}
INVALID = {"error": "document 0 (CiliumNetworkPolicy default/rule1): "
                    "spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range "
                    "1-65535\ndocument 1 (NetworkPolicy default/np): spec.ingress[0].from[0]."
                    "ipBlock.cidr: '10.0.0.0/33' is not a CIDR",
           "errors": [{"doc_index": 0, "path": "spec.ingress[0].toPorts[0].ports[0].port",
                       "reason": "port 70000 is out of range 1-65535"},
                      {"doc_index": 1, "path": "spec.ingress[0].from[0].ipBlock.cidr",
                       "reason": "'10.0.0.0/33' is not a CIDR"}]}
TRACE = {"lines": ["Tracing From: [k8s:class=xwing, k8s:org=alliance] => "
                   "To: [k8s:class=deathstar, k8s:org=empire] Ports: [80/TCP]",
                   "",
                   "Egress (from the source): no policy selects the source: allowed",
                   "Ingress (to the destination):",
                   "  CiliumNetworkPolicy default/rule1: selected",
                   "    Allows from labels {k8s:org=empire}: no label match",
                   "1/1 rules selected",
                   "Ingress verdict: denied"],
         "ingress": "DENIED", "egress": "ALLOWED", "verdict": "DENIED"}
SELECTORS = [{"selector": "&LabelSelector{MatchLabels:map[k8s:org:empire],}",
              "identities": [12345, 23457], "users": 2},
             {"selector": "&LabelSelector{MatchLabels:map[k8s:org:alliance],}",
              "identities": [], "users": 1}]
BPF_POLICY = {"endpoint": 1, "name": "default/deathstar", "entries": [
    {"identity": 12345, "direction": "ingress", "proto": 6, "dport": 80, "prefix_len": 16,
     "port": "80/TCP", "deny": False, "proxy_port": 0, "packets": 3, "bytes": 222},
    {"identity": 0, "direction": "egress", "proto": 0, "dport": 0, "prefix_len": 0,
     "deny": False, "proxy_port": 0, "packets": 10, "bytes": 1000},
    {"identity": 2, "direction": "ingress", "proto": 17, "dport": 53, "prefix_len": 16,
     "deny": True, "proxy_port": 0, "packets": 1, "bytes": 60},
    {"identity": 777, "direction": "ingress", "proto": 6, "dport": 8080, "prefix_len": 14},
]}
NAMESPACES = [{"name": "rebels", "labels": {"kubernetes.io/metadata.name": "rebels",
                                            "team": "rebels", "env": "prod"}},
              {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}]
VERDICT_EVENT = {"type": "policy-verdict", "time": "2026-11-26T12:02:00Z", "hash": 0xABCD,
                 "source_ep": 3, "remote_identity": 12345, "direction": "ingress",
                 "action": "allow", "match_type": "L3-L4", "proto": "tcp",
                 "src_ip": "10.200.1.2", "dst_ip": "10.200.1.3", "sport": 40000, "dport": 80,
                 "tcp_flags": ["SYN"], "summary": "10.200.1.2:40000 -> 10.200.1.3:80 tcp SYN"}


class PolicyAgent(FakeAgent):
    """The fake agent plus the policy, namespace and bpf policy API."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces = [dict(n, labels=dict(n["labels"])) for n in NAMESPACES]
        self.events = [VERDICT_EVENT]

    def app(self) -> web.Application:
        app = super().app()

        def static(data, status=200):
            async def handler(request):
                await self._record(request)
                return web.json_response(data, status=status)
            return handler

        async def policy_put(request):
            await self._record(request)
            body = await request.json()
            text = body.get("yaml", "")
            if "70000" in text:
                return web.json_response(INVALID, status=400)
            if "garbage" in text:
                return web.json_response({"error": "document 0: not YAML: mapping values "
                                                   "are not allowed here"}, status=400)
            return web.json_response(IMPORTED)

        async def policy_delete(request):
            await self._record(request)
            if request.query.get("all") == "true":
                return web.json_response({"revision": 9, "deleted": 2})
            if request.query.get("name") == "rule1":
                return web.json_response({"revision": 9, "deleted": 1})
            ns = request.query.get("namespace", "default")
            return web.json_response(
                {"error": f"policy '{request.query.get('name')}' in namespace '{ns}' not "
                          "found: nothing deleted (pilus policy get lists them)"}, status=404)

        async def bpf_policy(request):
            await self._record(request)
            if request.match_info["ref"] in ("1", "default/deathstar"):
                return web.json_response(BPF_POLICY)
            if request.match_info["ref"] in ("3", "default/xwing"):
                return web.json_response({"endpoint": 3, "name": "default/xwing", "entries": []})
            return web.json_response(
                {"error": f"endpoint {request.match_info['ref']} not found"}, status=404)

        def find_ns(name):
            return next((n for n in self.namespaces if n["name"] == name), None)

        async def ns_list(request):
            await self._record(request)
            return web.json_response(self.namespaces)

        async def ns_put(request):
            await self._record(request)
            name = request.match_info["name"]
            labels = dict((await request.json())["labels"], **{
                "kubernetes.io/metadata.name": name})
            ns = find_ns(name)
            if ns is None:
                ns = {"name": name}
                self.namespaces.append(ns)
            ns["labels"] = labels
            return web.json_response(ns)

        async def ns_delete(request):
            await self._record(request)
            ns = find_ns(request.match_info["name"])
            if ns is None:
                return web.json_response(
                    {"error": f"namespace {request.match_info['name']!r} not found"}, status=404)
            self.namespaces.remove(ns)
            return web.json_response({"deleted": ns["name"]})

        r = app.router
        r.add_get("/v1/policy", static(POLICY_GET))
        r.add_put("/v1/policy", policy_put)
        r.add_delete("/v1/policy", policy_delete)
        r.add_post("/v1/policy/trace", static(TRACE))
        r.add_get("/v1/policy/selectors", static(SELECTORS))
        r.add_get("/v1/bpf/policy/{ref:.+}", bpf_policy)
        r.add_get("/v1/namespace", ns_list)
        r.add_put("/v1/namespace/{name}", ns_put)
        r.add_delete("/v1/namespace/{name}", ns_delete)
        return app


@pytest.fixture
def agent(monkeypatch, tmp_path):
    monkeypatch.setenv("PILUS_STATE_ROOT", str(tmp_path / "run"))
    fake = PolicyAgent().start()
    monkeypatch.setenv("PILUS_SOCK", fake.socket)
    try:
        yield fake
    finally:
        fake.stop()


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def parse(*argv):
    return build_parser().parse_args(list(argv))


def bad(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: pilus" in err
    return err.strip().splitlines()[-1]


# -- arguments ------------------------------------------------------------------------------

def test_trace_args():
    ns = parse("policy", "trace", "--src-endpoint", "xwing", "--dst-endpoint", "7",
               "--dport", "80/tcp")
    assert (ns.src_endpoint, ns.dst_endpoint, ns.dport) == ("default/xwing", "7", "80/TCP")
    ns = parse("policy", "trace", "-s", "org=alliance", "--src-namespace", "rebels",
               "-d", "org=empire,class=deathstar", "--dport", "53")
    assert (ns.src_labels, ns.src_namespace, ns.dst_labels, ns.dport) == (
        "org=alliance", "rebels", "org=empire,class=deathstar", "53/TCP")
    assert parse("policy", "trace", "-s", "reserved:world", "-d", "a=b").dport is None
    ns = parse("policy", "trace", "--src-endpoint", "xwing", "--dst-ip", "172.31.250.200", "--dport", "80")
    assert policy.trace_request(ns) == {"src_endpoint": "default/xwing", "dst_ip": "172.31.250.200",
                                        "dport": "80/TCP"}


@pytest.mark.parametrize("argv, message", [
    (["policy", "trace", "--src-endpoint", "1", "--dst-ip", "10.1.2"], "expected an IPv4 address"),
    (["policy", "trace", "--dst-endpoint", "1"], "one of the arguments --src-endpoint"),
    (["policy", "trace", "--src-endpoint", "1", "--src-labels", "a=b", "--dst-endpoint", "2"],
     "not allowed with argument"),
    (["policy", "trace", "-s", "a=b", "-d", "c=d", "--dport", "80/XTP"], "PORT[/PROTOCOL]"),
    (["policy", "trace", "-s", "a=b", "-d", "c=d", "--dport", "http"], "got 'http'"),
    (["policy", "trace", "-s", "a=b", "-d", "c=d", "--dport", "65536/UDP"], "PORT 0-65535"),
    (["policy", "trace", "-s", "a b", "-d", "c=d"], "invalid label"),
    (["policy", "trace", "--src-endpoint", "1", "--src-namespace", "x", "-d", "c=d"],
     "--src-namespace goes with --src-labels"),
    (["policy", "trace", "-s", "a=b", "--src-namespace", "Bad_NS", "-d", "c=d"],
     "invalid namespace"),
    (["policy", "delete"], "one of the arguments --name --all is required"),
    (["policy", "delete", "--name", "x", "--all"], "not allowed with argument"),
    (["policy", "delete", "--all", "--namespace", "x"], "--namespace goes with --name"),
    (["policy", "import"], "required: FILE"),
    (["policy", "get", "-o", "table"], "invalid choice"),
    (["bpf", "policy", "get"], "required: ENDPOINT"),
    (["bpf", "policy", "get", "Bad/Name!"], "expected an endpoint ID"),
    (["namespace", "create", "Bad_Name"], "invalid namespace name"),
    (["namespace", "create", "ok", "--labels", "novalue"], "expected KEY=VALUE"),
    (["namespace", "create", "ok", "--labels", "k=bad value"], "invalid label value"),
    (["namespace", "label", "ok"], "required: KEY=VALUE|KEY-"),
    (["namespace", "label", "ok", "team"], "expected KEY=VALUE to set or KEY- to remove"),
    (["namespace", "label", "ok", "kubernetes.io/metadata.name-"], "cannot be removed"),
    (["namespace", "label", "ok", "kubernetes.io/metadata.name=x"], "cannot be changed"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "http"], "NAME=PORT[/PROTOCOL]"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "HTTP=80"], "invalid port name"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "12345=80"], "invalid port name"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "a--b=80"], "invalid port name"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "http=0"], "PORT 1-65535"),
    (["endpoint", "create", "a", "-l", "a=b", "--port", "http=80/ICMP"], "TCP, UDP, SCTP"),
    (["endpoint", "create", "a", "-l", "a=b", "-p", "http=80", "-p", "http=81"],
     "port name 'http' given twice"),
    (["monitor", "--type", "policy"], "invalid choice: 'policy'"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    assert message in bad(capsys, *argv)


def test_endpoint_port_args():
    ns = parse("endpoint", "create", "web", "-l", "app=web", "--port", "http=80",
               "-p", "dns=53/udp", "--port", "metrics-9=9090/TCP")
    assert ns.named_ports == {"http": "80/TCP", "dns": "53/UDP", "metrics-9": "9090/TCP"}
    assert parse("endpoint", "create", "web", "-l", "app=web").named_ports is None


def test_namespace_args():
    ns = parse("namespace", "create", "rebels", "--labels", "team=rebels,env=prod",
               "-l", "example.com/tier=1")
    assert ns.labels == {"team": "rebels", "env": "prod", "example.com/tier": "1"}
    ns = parse("ns", "label", "rebels", "team=empire", "env-", "empty=")
    assert ns.changes == [("team", "empire"), ("env", None), ("empty", "")]
    assert parse("monitor", "-t", "policy-verdict").type == "policy-verdict"
    assert parse("bpf", "policy", "get", "deathstar", "-n").numeric is True


# -- formats -------------------------------------------------------------------------------

def test_policy_get_format_is_reimportable_yaml():
    text = policy.format_policies(POLICY_GET)
    assert text.endswith("# Revision: 7\n")
    assert list(yaml.safe_load_all(text)) == [CNP, KNP]
    # key order of the documents is kept (apiVersion, kind, metadata, spec)
    assert text.startswith("---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n")
    assert policy.format_policies({"revision": 1, "policies": []}) == (
        "# no policies in force\n# Revision: 1\n")


def test_import_format():
    assert policy.format_imported(IMPORTED) == (
        "Imported 2 policies:\n"
        "  CiliumNetworkPolicy default/rule1\n"
        "  CiliumClusterwideNetworkPolicy world\n"
        "Revision: 8\n")
    assert policy.format_imported({"revision": 3, "imported": []}) == (
        "Imported 0 policies\nRevision: 3\n")


def test_validation_problems():
    assert policy.validation_problems(INVALID) == INVALID["error"].splitlines()
    # a one-line error text but several structured errors: one line per error
    body = dict(INVALID, error="2 problems")
    assert policy.validation_problems(body) == [
        "document 0: spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range "
        "1-65535",
        "document 1: spec.ingress[0].from[0].ipBlock.cidr: '10.0.0.0/33' is not a CIDR"]
    assert policy.validation_problems(None) == []


def test_trace_format():
    text = policy.format_trace(TRACE)
    assert text.splitlines()[0].startswith("Tracing From: [k8s:class=xwing")
    assert text.endswith("Ingress verdict: denied\nFinal verdict: DENIED\n")
    # an agent whose lines already end with the verdict: not repeated
    done = dict(TRACE, lines=TRACE["lines"] + ["Final verdict: DENIED"])
    assert policy.format_trace(done).count("DENIED") == 1


def test_selectors_format():
    lines = policy.format_selectors(SELECTORS).splitlines()
    assert lines[0].split() == ["SELECTOR", "IDENTITIES", "USERS"]
    # sorted by selector; identities one per line
    assert lines[1].split() == ["&LabelSelector{MatchLabels:map[k8s:org:alliance],}", "1"]
    assert lines[2].split() == ["&LabelSelector{MatchLabels:map[k8s:org:empire],}", "12345",
                                "2"]
    assert lines[3].strip() == "23457"
    assert lines[3].index("23457") == lines[0].index("IDENTITIES")


def test_bpf_policy_format_with_labels():
    labels = {i["id"]: i["labels"] for i in IDENTITIES}
    lines = bpf.format_bpf_policy(BPF_POLICY, labels).splitlines()
    assert lines[0].split() == ["POLICY", "DIRECTION", "IDENTITY", "LABELS",
                                "(source:key[=value])", "PORT/PROTO", "PROXY", "PORT", "BYTES",
                                "PACKETS", "PREFIX"]
    # ingress first, by identity; labels one per line
    assert lines[1].split() == ["Deny", "Ingress", "2", "reserved:world", "53/UDP", "NONE",
                                "60", "1", "24"]
    assert lines[2].split() == ["Allow", "Ingress", "777", "(unknown", "identity)",
                                "8080-8083/TCP", "NONE", "0", "0", "22"]
    assert lines[3].split() == ["Allow", "Ingress", "12345", "k8s:class=deathstar", "80/TCP",
                                "NONE", "222", "3", "24"]
    assert lines[4].strip() == "k8s:org=empire"
    assert lines[5].split() == ["Allow", "Egress", "0", "ANY", "ANY", "NONE", "1000", "10", "0"]


def test_bpf_policy_format_numeric_and_empty():
    lines = bpf.format_bpf_policy(BPF_POLICY).splitlines()
    assert "LABELS" not in lines[0] and lines[0].split()[2] == "IDENTITY"
    assert lines[1].split() == ["Deny", "Ingress", "2", "53/UDP", "NONE", "60", "1", "24"]
    assert bpf.format_bpf_policy({"endpoint": 3, "name": "default/xwing", "entries": []}) == (
        "Policy map of endpoint default/xwing is empty: no policy selects it, or enforcement "
        "is off (all traffic allowed)\n")


@pytest.mark.parametrize("entry, text", [
    ({"proto": 6, "dport": 0, "prefix_len": 0}, "ANY/TCP"),
    ({"proto": "udp", "dport": 53}, "53/UDP"),
    ({"proto": 132, "dport": 9000, "prefix_len": 16}, "9000/SCTP"),
    ({"proto": "TCP", "dport": 1024, "prefix_len": 6}, "1024-2047/TCP"),
    ({"proto": 0, "dport": 0}, "ANY"),
    ({}, "ANY"),
    ({"port": "80-81/TCP", "proto": 6, "dport": 80}, "80-81/TCP"),
])
def test_bpf_policy_port_column(entry, text):
    assert bpf._policy_port(entry) == text


def test_policy_verdict_line():
    assert monitor.format_event(VERDICT_EVENT) == (
        "Policy verdict log: flow 0xabcd local EP ID 3, remote ID 12345, proto 6, ingress, "
        "action allow, match L3-L4, 10.200.1.2:40000 -> 10.200.1.3:80 tcp SYN")
    ev = dict(VERDICT_EVENT, direction="egress", action="deny", match_type=0, proto=17,
              summary="", sport=5353, dport=53, src_ip="10.200.1.3", dst_ip="10.0.0.10")
    assert monitor.format_event(ev) == (
        "Policy verdict log: flow 0xabcd local EP ID 3, remote ID 12345, proto 17, egress, "
        "action deny, match none, 10.200.1.3:5353 -> 10.0.0.10:53 udp")
    assert monitor.format_event(dict(VERDICT_EVENT, match_type=3)).count("match L4-Only") == 1
    assert "action audit" in monitor.format_event(dict(VERDICT_EVENT, audited=True))


def test_bpf_policy_prefix_column():
    # cilium-dbg's PREFIX counts protocol (8) + port bits; the agent's prefix_len is port bits
    assert bpf._policy_prefix({"proto": 6, "prefix_len": 16}) == "24"
    assert bpf._policy_prefix({"proto": 6, "prefix_len": 0}) == "8"
    assert bpf._policy_prefix({"proto": 0, "prefix_len": 0}) == "0"
    assert bpf._policy_prefix({"proto": "UDP"}) == "-"


def test_namespace_list_format():
    lines = namespace.format_list(NAMESPACES).splitlines()
    assert lines[0].split() == ["NAME", "LABELS"]
    assert lines[1].split() == ["default", "kubernetes.io/metadata.name=default"]
    assert lines[2].split() == ["rebels", "env=prod"]
    assert [ln.strip() for ln in lines[3:]] == ["kubernetes.io/metadata.name=rebels",
                                                "team=rebels"]


# -- the whole CLI against the fake agent ---------------------------------------------------

def test_policy_import_file_and_stdin(agent, capsys, tmp_path, monkeypatch):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump_all([CNP, KNP]))
    rc, out, err = run(capsys, "policy", "import", str(f))
    assert rc == 0
    assert out == policy.format_imported(IMPORTED)
    assert err.startswith("Warning: document 1 (CiliumClusterwideNetworkPolicy world)")
    assert agent.requests[-1] == ("PUT", "/v1/policy", {"yaml": f.read_text()})

    import io
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(CNP)))
    rc, out, _ = run(capsys, "policy", "import", "-", "-o", "json")
    assert rc == 0 and json.loads(out)["revision"] == 8
    assert agent.requests[-1][2] == {"yaml": json.dumps(CNP)}


def test_policy_import_validation_errors_one_per_line(agent, capsys, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("port: 70000\n")
    rc, out, err = run(capsys, "policy", "import", str(f))
    assert (rc, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == ("Error: policy not imported (2 problems); nothing was applied and the "
                        "previous revision stays in force:")
    assert lines[1] == ("  document 0 (CiliumNetworkPolicy default/rule1): "
                        "spec.ingress[0].toPorts[0].ports[0].port: port 70000 is out of range "
                        "1-65535")
    assert lines[2].startswith("  document 1 (NetworkPolicy default/np): spec.ingress[0]")
    assert len(lines) == 3
    f.write_text("garbage: : :\n")
    rc, _, err = run(capsys, "policy", "import", str(f))
    assert rc == 1
    assert err.splitlines()[1] == ("  document 0: not YAML: mapping values are not allowed "
                                   "here")


def test_policy_import_file_problems(agent, capsys, tmp_path):
    rc, _, err = run(capsys, "policy", "import", str(tmp_path / "nope.yaml"))
    assert (rc, err) == (1, f"Error: policy file {tmp_path / 'nope.yaml'} not found\n")
    rc, _, err = run(capsys, "policy", "import", str(tmp_path))
    assert rc == 1 and "is a directory" in err
    (tmp_path / "empty.yaml").write_text("\n")
    rc, _, err = run(capsys, "policy", "import", str(tmp_path / "empty.yaml"))
    assert rc == 1 and err.endswith("is empty: nothing to import\n")
    assert not [r for r in agent.requests if r[0] == "PUT"]


def test_policy_get(agent, capsys):
    rc, out, err = run(capsys, "policy", "get")
    assert (rc, err) == (0, "")
    assert out == policy.format_policies(POLICY_GET)
    rc, out, _ = run(capsys, "policy", "get", "-o", "json")
    assert json.loads(out) == POLICY_GET
    rc, out, _ = run(capsys, "policy", "get", "-o", "yaml")
    assert yaml.safe_load(out) == POLICY_GET


def test_policy_delete(agent, capsys):
    rc, out, _ = run(capsys, "policy", "delete", "--name", "rule1", "--namespace", "default")
    assert (rc, out) == (0, "Deleted 1 policy\nRevision: 9\n")
    assert agent.requests[-1][:2] == ("DELETE", "/v1/policy?name=rule1&namespace=default")
    rc, out, _ = run(capsys, "policy", "rm", "--all")
    assert (rc, out) == (0, "Deleted 2 policies\nRevision: 9\n")
    assert agent.requests[-1][:2] == ("DELETE", "/v1/policy?all=true")
    rc, out, err = run(capsys, "policy", "delete", "--name", "nope", "-n", "rebels")
    assert (rc, out) == (1, "")
    assert err == ("Error: policy 'nope' in namespace 'rebels' not found: nothing deleted "
                   "(pilus policy get lists them)\n")


def test_policy_trace_requests(agent, capsys):
    rc, out, _ = run(capsys, "policy", "trace", "--src-endpoint", "default/xwing",
                     "--dst-endpoint", "1", "--dport", "80/TCP")
    assert rc == 0 and out == policy.format_trace(TRACE)
    assert agent.requests[-1] == ("POST", "/v1/policy/trace", {
        "src_endpoint": "default/xwing", "dst_endpoint": 1, "dport": "80/TCP"})
    rc, out, _ = run(capsys, "policy", "trace", "--src-labels", "org=alliance",
                     "--src-namespace", "rebels", "--dst-labels", "org=empire,class=deathstar",
                     "--dport", "80", "-o", "json")
    assert json.loads(out) == TRACE
    assert agent.requests[-1][2] == {"src_labels": "org=alliance", "src_namespace": "rebels",
                                     "dst_labels": "org=empire,class=deathstar",
                                     "dport": "80/TCP"}


def test_policy_selectors(agent, capsys):
    rc, out, _ = run(capsys, "policy", "selectors")
    assert rc == 0 and out == policy.format_selectors(SELECTORS)
    rc, out, _ = run(capsys, "policy", "selectors", "-o", "json")
    assert json.loads(out) == SELECTORS


def test_bpf_policy_get(agent, capsys):
    rc, out, _ = run(capsys, "bpf", "policy", "get", "deathstar")
    assert rc == 0
    assert out.splitlines()[1].split()[:4] == ["Deny", "Ingress", "2", "reserved:world"]
    assert ("GET", "/v1/bpf/policy/default/deathstar", None) in agent.requests
    assert ("GET", "/v1/identity", None) in agent.requests
    agent.requests.clear()
    rc, out, _ = run(capsys, "bpf", "policy", "get", "1", "-n")
    assert out == bpf.format_bpf_policy(BPF_POLICY)
    assert agent.requests == [("GET", "/v1/bpf/policy/1", None)]
    rc, out, _ = run(capsys, "bpf", "policy", "get", "xwing")
    assert out.startswith("Policy map of endpoint default/xwing is empty")
    rc, out, _ = run(capsys, "bpf", "policy", "get", "1", "-o", "json")
    assert json.loads(out) == BPF_POLICY
    rc, _, err = run(capsys, "bpf", "policy", "get", "42")
    assert (rc, err) == (1, "Error: endpoint 42 not found\n")


def test_namespace_lifecycle(agent, capsys):
    rc, out, _ = run(capsys, "namespace", "create", "empire", "--labels", "team=empire")
    assert (rc, out) == (0, "Namespace empire created: kubernetes.io/metadata.name=empire, "
                            "team=empire\n")
    assert agent.requests[-1] == ("PUT", "/v1/namespace/empire",
                                  {"labels": {"team": "empire"}})
    rc, _, err = run(capsys, "namespace", "create", "empire")
    assert rc == 1 and err == ("Error: namespace empire already exists: change its labels "
                               "with `pilus namespace label empire KEY=VALUE ...`\n")
    # merge: set one, overwrite one, remove one, keep the rest
    rc, out, err = run(capsys, "ns", "label", "rebels", "tier=1", "team=alliance", "env-",
                       "ghost-")
    assert rc == 0
    assert agent.requests[-1][2] == {"labels": {"team": "alliance", "tier": "1"}}
    assert out == ("Namespace rebels labeled: kubernetes.io/metadata.name=rebels, "
                   "team=alliance, tier=1\n")
    assert err == "Warning: label 'ghost' not found on namespace rebels\n"
    rc, _, err = run(capsys, "namespace", "label", "nowhere", "a=b")
    assert rc == 1 and err.startswith("Error: namespace nowhere not found: create it")
    rc, out, _ = run(capsys, "namespace", "list")
    assert out.splitlines()[0].split() == ["NAME", "LABELS"]
    assert [ln.split()[0] for ln in out.splitlines()[1:] if not ln.startswith(" ")] == [
        "default", "empire", "rebels"]
    rc, out, _ = run(capsys, "namespace", "list", "-o", "json")
    assert {n["name"] for n in json.loads(out)} == {"default", "empire", "rebels"}
    rc, out, _ = run(capsys, "namespace", "delete", "empire")
    assert (rc, out) == (0, "Namespace empire deleted\n")
    rc, _, err = run(capsys, "namespace", "rm", "empire")
    assert (rc, err) == (1, "Error: namespace 'empire' not found\n")


def test_endpoint_create_with_ports(agent, capsys):
    rc, out, _ = run(capsys, "endpoint", "create", "web", "-l", "app=web",
                     "--port", "http=80", "--port", "dns=53/UDP")
    assert rc == 0 and out.startswith("Endpoint 9 default/web created:")
    assert agent.requests[-1][2] == {"name": "default/web", "labels": ["app=web"],
                                     "named_ports": {"http": "80/TCP", "dns": "53/UDP"}}


def test_endpoint_detail_shows_named_ports():
    from pilus.cli import endpoint

    text = endpoint.format_detail({"id": 1, "named_ports": {"http": "80/TCP", "dns": "53/UDP"}})
    assert "Named ports:     dns=53/UDP\n                 http=80/TCP\n" in text
    assert "Named ports" not in endpoint.format_detail({"id": 1, "named_ports": {}})


def test_monitor_policy_verdict(agent, capsys):
    rc, out, _ = run(capsys, "monitor", "--type", "policy-verdict")
    assert out.splitlines() == [monitor.format_event(VERDICT_EVENT)]
    assert ("GET", "/v1/monitor?type=policy-verdict", None) in agent.requests
