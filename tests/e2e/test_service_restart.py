"""An agent restart changes nothing for services: new connections to a ClusterIP
service, one every few milliseconds, all succeed across two `kill -9` of the agent
(the supervisor restarts it; the restored agent must not program the service
without its backend before the endpoints are restored)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from .conftest import probe, wait_for

VIP = "10.96.30.10"
PORT = 8080

SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: restart-web, namespace: default}}
spec:
  clusterIP: {VIP}
  selector: {{app: restart-web}}
  ports: [{{port: 80, targetPort: {PORT}}}]
"""


def _agent_pid(api) -> int | None:
    try:
        return api.healthz()["agent"]["pid"]
    except Exception:
        return None


def _restart_agent(api) -> int:
    """kill -9 the agent; return the pid of the one the supervisor started."""
    old = _agent_pid(api)
    assert old, "the agent is not running"
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := _agent_pid(api)) and p != old and p, timeout=30)
    assert new, "the supervisor did not restart the agent"
    return new


def _backends(api) -> list[str]:
    rows = [r for r in api.list_services() if r["service"] == "default/restart-web"]
    return [b["address"] for r in rows for b in r["backends"]]


def test_new_connections_to_a_service_survive_two_agent_restarts(api, servers):
    web = api.create_endpoint("default/restart-web", ["app=restart-web"])
    client = api.create_endpoint("default/restart-client", ["app=restart-client"])
    loop = None
    try:
        servers.start(web["netns"], "tcp-server", PORT)
        api.put_service(yaml_text=SERVICE)
        assert _backends(api) == [f"{web['ipv4']}:{PORT}/TCP"]
        assert probe(client["netns"], "tcp-connect", VIP, "80")["ok"]
        pids = [_agent_pid(api)]
        loop = subprocess.Popen(
            ["ip", "netns", "exec", client["netns"], sys.executable, "-m", "pilus.testing.probe",
             "tcp-connect-loop", VIP, "80", "120", "4"],
            stdout=subprocess.PIPE, text=True,
        )
        for _ in range(2):
            time.sleep(1.0)
            pids.append(_restart_agent(api))
            # the restarted agent is serving (endpoints restored) before the next kill
            assert wait_for(lambda: api.get_endpoint(web["id"])["state"] == "ready", timeout=10)
        time.sleep(1.0)
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        print(f"\n{result['connected']} connections in {result['seconds']} s, "
              f"{result['failed']} failed, agent pids {pids}")
        assert len(set(pids)) == 3, pids  # two real restarts
        assert result["failed"] == 0, result["failures"]
        assert result["connected"] > 300, result
        # connections were made in every second of the run, restarts included
        assert all(n > 0 for n in result["per_second"]), result["per_second"]
        assert _backends(api) == [f"{web['ipv4']}:{PORT}/TCP"]
        lb = [e for e in api.bpf_lb() if e["frontend"] == f"{VIP}:80/TCP"]
        assert [b["address"] for e in lb for b in e["backends"]] == [f"{web['ipv4']}:{PORT}/TCP"]
    finally:
        if loop is not None and loop.poll() is None:
            loop.kill()
            loop.wait()
        with contextlib.suppress(Exception):
            api.delete_service("default", "restart-web")
        for ep in (web, client):
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])
