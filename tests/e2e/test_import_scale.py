"""Large imports through the CLI and the API: 20,000 ClusterIP services (a ~4 MB
stream, what a kube-proxy replacement must take) are applied while the API keeps
answering, and reach the datapath; a body over the API's 64 MiB limit is refused
with a one-line message naming the limit, and changes nothing."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import pytest

from pilus.api.client import APIError, Client

from .conftest import probe

SERVICES = 20_000
NAMESPACE = "scale"
PORT = 8080


def _vip(i: int) -> str:
    return f"10.98.{i // 256}.{i % 256}"


def _services_yaml(n: int) -> str:
    return "---\n".join(
        "apiVersion: v1\nkind: Service\n"
        f"metadata:\n  name: svc-{i}\n  namespace: {NAMESPACE}\n"
        f"spec:\n  type: ClusterIP\n  clusterIP: {_vip(i)}\n"
        "  selector:\n    app: scale-web\n"
        f"  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: {PORT}\n"
        for i in range(n)
    )


def _cli(node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pilus", "--socket", node["socket"], *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def scale_pods(api):
    web = api.create_endpoint(f"{NAMESPACE}/web", ["app=scale-web"])
    client = api.create_endpoint(f"{NAMESPACE}/client", ["app=scale-client"])
    yield web, client
    with contextlib.suppress(Exception):
        api.delete_services(NAMESPACE)
    for ep in (web, client):
        with contextlib.suppress(Exception):
            api.delete_endpoint(ep["id"])


def test_20k_services_import_while_the_api_answers(api, node, scale_pods, servers, tmp_path):
    web, client = scale_pods
    servers.start(web["netns"], "tcp-server", PORT)
    manifest = tmp_path / "services.yaml"
    manifest.write_text(_services_yaml(SERVICES))
    assert manifest.stat().st_size > 3 * 2**20  # well over the 1 MiB aiohttp takes by default
    result: dict = {}

    def run_import():
        t0 = time.monotonic()
        result["done"] = _cli(node, "service", "import", str(manifest))
        result["seconds"] = time.monotonic() - t0

    importer = threading.Thread(target=run_import)
    importer.start()
    answered = []  # endpoint list round trips (served from memory: the event loop is free)
    health = []  # healthz also walks the maps, which fill meanwhile: no time bound
    try:
        while importer.is_alive():
            t0 = time.monotonic()
            assert any(e["id"] == web["id"] for e in api.list_endpoints())
            answered.append(time.monotonic() - t0)
            health.append(api.healthz()["agent"]["state"])
            time.sleep(0.2)
    finally:
        importer.join()
    done = result["done"]
    print(f"\n{SERVICES} services imported in {result['seconds']:.1f} s")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"Applied {SERVICES} services ({SERVICES} frontends): "
                           "see `pilus service list`\n")
    # the API answered all along the import (liveness, not a benchmark: generous bound)
    assert len(answered) >= 3, answered
    assert max(answered) < 2.0, answered
    assert set(health) == {"Ok"}, health

    backend = f"{web['ipv4']}:{PORT}/TCP"
    rows = [r for r in api.list_services() if r["service"].startswith(f"{NAMESPACE}/")]
    assert len(rows) == SERVICES
    assert all([b["address"] for b in r["backends"]] == [backend] for r in rows)
    lb = [e for e in api.bpf_lb() if e["frontend"].startswith("10.98.")]
    assert len(lb) == SERVICES and all(e["count"] == 1 for e in lb)
    assert {b["address"] for e in lb for b in e["backends"]} == {backend}
    # the datapath translates through the last service of the stream
    res = probe(client["netns"], "tcp-connect", _vip(SERVICES - 1), "80")
    assert res["ok"], res
    assert res["reply"].split(":")[0] == client["ipv4"]

    listed = _cli(node, "service", "delete", "--namespace", NAMESPACE)
    assert listed.returncode == 0 and listed.stdout == f"Deleted {SERVICES} services\n", listed.stderr
    assert not [e for e in api.bpf_lb() if e["frontend"].startswith("10.98.")]


def test_import_over_the_body_limit_is_refused_and_changes_nothing(api, node, tmp_path):
    services_before = api.list_services()
    policy_before = api.get_policy()["revision"]
    # a valid document padded past 64 MiB with a YAML comment
    padding = "# " + "x" * (65 * 2**20) + "\n"
    manifest = tmp_path / "huge.yaml"
    manifest.write_text(_services_yaml(1) + padding)
    done = _cli(node, "service", "import", str(manifest))
    assert done.returncode == 1
    assert done.stderr.startswith("Error: request body is 65.0 MiB, over the API's limit of 64 MiB")
    assert done.stderr.count("\n") == 1, done.stderr  # one line
    policy = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
              "metadata: {name: huge, namespace: default}\n"
              "spec: {endpointSelector: {}, ingress: [{}]}\n")
    with pytest.raises(APIError) as err:
        Client(node["socket"], timeout=120).import_policy(policy + padding)
    assert err.value.status == 413
    assert "over the API's limit of 64 MiB" in err.value.message
    assert api.list_services() == services_before
    assert api.get_policy()["revision"] == policy_before
