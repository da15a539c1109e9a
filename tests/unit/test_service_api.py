"""Service routes (service_routes.add_service_routes) through the real client and CLI,
against an agent whose datapath maps are in memory."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from aiohttp import web
from lb_fakes import FakeDatapath

from pilus.api.client import APIError, Client
from pilus.api.errors import json_errors
from pilus.api.service_routes import add_service_routes
from pilus.cli.main import main as cli
from pilus.loadbalancer.manager import ServiceManager

SVC_YAML = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


class FakeAgent:
    def __init__(self):
        self.datapath = FakeDatapath()
        self.services = ServiceManager(self.datapath, node_ips=[IPv4Address("172.30.0.11")],
                                       known_networks=[IPv4Network("10.200.0.0/16")])


@pytest.fixture
def agent():
    a = FakeAgent()
    tmp = Path(tempfile.mkdtemp(prefix="pilus-svc-api-"))
    sock = tmp / "pilus.sock"
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def start():
        app = web.Application(middlewares=[json_errors])  # as the agent's API app
        add_service_routes(app, a)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(sock)).start()
        state["runner"] = runner
        ready.set()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait(10)
    a.socket = str(sock)
    yield a
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    shutil.rmtree(tmp, ignore_errors=True)


def run_cli(agent, capsys, *args):
    rc = cli(["--socket", agent.socket, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_put_list_get_delete(agent):
    c = Client(agent.socket)
    res = c.put_service(yaml_text=SVC_YAML)
    assert res["applied"] == ["default/web"]
    agent.services.set_endpoints([{"ip": "10.200.1.5", "labels": ["k8s:app=web"]}])
    rows = c.list_services()
    assert [(r["id"], r["frontend"], r["type"]) for r in rows] == [(1, "10.96.0.10:80/TCP",
                                                                     "ClusterIP")]
    assert rows[0]["backends"][0]["address"] == "10.200.1.5:8080/TCP"
    got = c.get_service("default", "web")
    assert got["service"]["cluster_ip"] == "10.96.0.10" and len(got["frontends"]) == 1
    # a Kubernetes Service as JSON
    svc = json.loads(json.dumps(agent.services.get("default", "web").to_k8s()))
    svc["metadata"]["name"] = "web2"
    svc["spec"]["clusterIP"] = "10.96.0.11"
    assert c.put_service(service=svc)["applied"] == ["default/web2"]
    assert c.delete_service("default", "web2") == {"deleted": "default/web2"}
    with pytest.raises(APIError) as ei:
        c.delete_service("default", "web2")
    assert ei.value.status == 404


def test_errors_are_json_with_status(agent):
    c = Client(agent.socket)
    c.put_service(yaml_text=SVC_YAML)
    with pytest.raises(APIError) as ei:
        c.put_service(yaml_text=SVC_YAML.replace("port: 80,", "port: 99999,"))
    assert ei.value.status == 400 and "spec.ports[0].port: must be 1-65535" in ei.value.message
    with pytest.raises(APIError) as ei:
        c.put_service(yaml_text=SVC_YAML.replace("name: web", "name: other"))
    assert ei.value.status == 409 and "already used by service default/web" in ei.value.message
    with pytest.raises(APIError) as ei:
        c.set_backend_state("10.200.9.9:80", "maintenance")
    assert ei.value.status == 404
    with pytest.raises(APIError) as ei:
        c.set_backend_state("nonsense", "maintenance")
    assert ei.value.status == 400
    with pytest.raises(APIError) as ei:
        c.request("PUT", "/service", {"foo": 1})
    assert ei.value.status == 400
    with pytest.raises(APIError) as ei:
        c.bpf_lb_maglev(77)
    assert ei.value.status == 404


def test_cli_create_list_update_delete(agent, capsys, tmp_path):
    rc, out, err = run_cli(agent, capsys, "service", "create", "--name", "default/web",
                           "--frontend", "10.96.0.10:80/TCP", "--selector", "app=web",
                           "--target-port", "8080", "--algorithm", "maglev")
    assert rc == 0, err
    assert "Applied default/web" in out
    agent.services.set_endpoints([{"ip": "10.200.1.5", "labels": ["k8s:app=web"]},
                                  {"ip": "10.200.1.6", "labels": ["k8s:app=web"]}])
    rc, out, _ = run_cli(agent, capsys, "service", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert lines[1].split()[:3] == ["1", "10.96.0.10:80/TCP", "ClusterIP"]
    assert "1 => 10.200.1.5:8080/TCP (active)" in lines[1]
    assert "2 => 10.200.1.6:8080/TCP (active)" in lines[2]
    rc, out, _ = run_cli(agent, capsys, "service", "update", "--backend-state",
                         "10.200.1.5:8080=maintenance")
    assert rc == 0 and "maintenance" in out
    rc, out, _ = run_cli(agent, capsys, "service", "list", "-o", "json")
    rows = json.loads(out)
    assert [b["state"] for b in rows[0]["backends"]] == ["maintenance", "active"]
    rc, out, _ = run_cli(agent, capsys, "bpf", "lb", "list")
    assert rc == 0 and "10.96.0.10:80/TCP" in out and "maglev" in out
    rc, out, _ = run_cli(agent, capsys, "bpf", "lb", "maglev", "get", "1")
    assert rc == 0 and "Maglev table of 251 slots" in out
    rc, out, _ = run_cli(agent, capsys, "bpf", "lb", "maglev", "get", "1", "-o", "json")
    assert len(json.loads(out)["table"]) == 251
    f = tmp_path / "svc.yaml"
    f.write_text(SVC_YAML.replace("name: web", "name: api").replace("10.96.0.10", "10.96.0.20"))
    rc, out, _ = run_cli(agent, capsys, "service", "import", str(f))
    assert rc == 0 and "Applied default/api" in out
    rc, out, err = run_cli(agent, capsys, "service", "import", str(f).replace("svc", "nope"))
    assert rc == 1 and "cannot read" in err
    rc, out, err = run_cli(agent, capsys, "service", "create", "--name", "default/bad",
                           "--frontend", "10.96.0.10:80", "--selector", "app=x")
    assert rc == 1 and "already used by service default/web" in err
    rc, out, _ = run_cli(agent, capsys, "service", "delete", "default/api")
    assert rc == 0 and "Deleted service default/api" in out
    rc, out, err = run_cli(agent, capsys, "service", "create", "--name", "default/e",
                           "--frontend", "10.96.0.30:53/UDP", "--backend", "10.200.1.9:5353")
    assert rc == 0, err
    assert "10.200.1.9:5353/UDP" in out


def test_cli_import_of_many_services_prints_one_summary_line(agent, capsys, tmp_path):
    f = tmp_path / "many.yaml"
    f.write_text("---\n".join(
        SVC_YAML.replace("name: web", f"name: web{i}").replace("10.96.0.10", f"10.96.1.{i}")
        for i in range(25)))
    rc, out, err = run_cli(agent, capsys, "service", "import", str(f))
    assert rc == 0, err
    assert out == "Applied 25 services (25 frontends): see `pilus service list`\n"
    assert len(agent.services.frontends()) == 25
    rc, out, err = run_cli(agent, capsys, "service", "delete")
    assert rc == 1 and err == "Error: say which services: NS/NAME, --namespace NS or --all\n"
    rc, out, err = run_cli(agent, capsys, "service", "delete", "--namespace", "other")
    assert rc == 0 and out == "Deleted 0 services\n"
    rc, out, err = run_cli(agent, capsys, "service", "delete", "--namespace", "default")
    assert rc == 0 and out == "Deleted 25 services\n"
    assert agent.services.frontends() == [] and agent.datapath.lb.svc == {}
