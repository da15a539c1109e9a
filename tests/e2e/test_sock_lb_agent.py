"""`pilus agent --socket-lb`: the agent attaches bpf_sock.o to the cgroup v2 root
with pinned links, registers its endpoints' network namespaces, and pods reach a
ClusterIP with the translation done at connect()/sendmsg()."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import probe
from .test_agent_standalone import NODE, agent  # noqa: F401 (fixture)

VIP = "10.96.20.10"


@pytest.mark.parametrize("agent", [["--socket-lb"]], indirect=True)
def test_agent_socket_lb(agent, servers):  # noqa: F811
    _cmd, client, created = agent
    web = client.create_endpoint("default/web", ["app=web"])
    created.append(web["id"])
    cl = client.create_endpoint("default/client", ["app=client"])
    created.append(cl["id"])
    client.put_service(yaml_text=f"""
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 8080}}
""")
    servers.start(web["netns"], "tcp-server", 8080)
    servers.start(web["netns"], "udp-server", 8080)

    progs = {p["name"]: p for p in client.status()["datapath"]["programs"]}
    assert progs["cil_sock4_connect"]["attached"] == 1
    assert progs["cil_sock4_connect"]["hook"] == "cgroup/connect4"
    links = Path(f"/sys/fs/bpf/pilus/{NODE}/links")
    assert len(list(links.iterdir())) == 4  # pinned: they outlive the agent

    for _ in range(4):
        res = probe(cl["netns"], "tcp-connect", VIP, "80")
        assert res["ok"], res
        assert res["reply"].split(":")[0] == cl["ipv4"]
    res = probe(cl["netns"], "udp-send", VIP, "53", "hello")
    assert res == {"ok": True, "reply": "hello", "peer": f"{VIP}:53"}
    # the sockets were connected straight to the backend: conntrack saw the
    # backend address, never the VIP, and the per-packet LB recorded nothing
    flows = client.bpf_ct()
    assert any(c["dst"] == web["ipv4"] and c["dport"] == 8080 for c in flows)
    assert not any(c["dst"] == VIP for c in flows)
    maps = {m["name"]: m for m in client.status()["datapath"]["maps"]}
    assert maps["pilus_sock_netns"]["entries"] == 2  # both endpoints' namespaces
