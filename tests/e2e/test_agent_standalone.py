"""An agent started by hand in a fresh namespace: bad input at start-up and at the API."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pilus.api.client import APIError, Client

from .conftest import wait_for

NODE = f"e2esa{os.getpid() % 10000}"
NETNS = f"pilus-{NODE}"


@pytest.fixture
def agent(tmp_path, request):
    from pilus.datapath import links, remove_pins

    extra = getattr(request, "param", [])
    links.delete_netns(NETNS)
    links.create_netns(NETNS)
    state = tmp_path / "state"
    cmd = ["nsenter", f"--net=/run/netns/{NETNS}", "--", sys.executable, "-m", "pilus", "agent",
           "--node-name", NODE, "--state-dir", str(state), "--pod-cidr", "10.202.0.0/29", *extra]
    log = open(tmp_path / "agent.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    client = Client(str(state / "pilus.sock"))
    created: list[int] = []
    try:
        assert wait_for(lambda: _healthy(client), timeout=60), (tmp_path / "agent.log").read_text()
        yield cmd, client, created
    finally:
        for ep_id in created:
            with contextlib.suppress(Exception):
                client.delete_endpoint(ep_id)
        proc.terminate()
        proc.wait(10)
        log.close()
        from pilus.agent_proxy import stop_proxy

        stop_proxy(state)  # the L7 proxy outlives its agent: no cluster down kills it here
        for ns in links.list_netns(f"pilus-{NODE}-ep"):
            links.delete_netns(ns)
        links.delete_netns(NETNS)
        remove_pins(NODE)


def _healthy(client: Client) -> bool:
    try:
        return client.healthz()["agent"]["state"] == "Ok"
    except Exception:
        return False


def test_second_agent_on_same_state_dir_is_refused(agent):
    cmd, _client, _ = agent
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert "another pilus agent" in line and "--state-dir" in line


def test_exhausted_pod_cidr_is_a_clear_error_and_leaves_nothing(agent):
    from pilus.datapath import links

    _cmd, client, created = agent
    # a /29 has 8 addresses: network, broadcast and the router leave 5 for pods
    for i in range(5):
        created.append(client.create_endpoint(f"default/pod{i}", [f"n={i}"])["id"])
    netns_before = set(links.list_netns(f"pilus-{NODE}-ep"))
    with pytest.raises(APIError) as err:
        client.create_endpoint("default/pod5", ["n=5"])
    assert err.value.status == 503
    assert "exhausted" in str(err.value) and "10.202.0.0/29" in str(err.value)
    assert set(links.list_netns(f"pilus-{NODE}-ep")) == netns_before
    assert len(client.list_endpoints()) == 5


def test_bad_pod_cidr_argument(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pilus", "agent", "--node-name", "x", "--state-dir", str(tmp_path),
         "--pod-cidr", "10.0.0.1/24"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "expected an IPv4 CIDR" in done.stderr


def test_missing_state_is_not_needed_for_describe(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pilus", "agent", "--node-name", "x", "--state-dir", str(tmp_path / "s"),
         "--pod-cidr", "10.0.0.0/24", "--describe"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0
    assert "datapath" in done.stdout and not Path(tmp_path / "s").exists()


@pytest.mark.parametrize("agent", [["--policy-enforcement", "always"]], indirect=True)
def test_enforcement_always_denies_without_policy(agent):
    from .conftest import Servers, probe

    _cmd, client, created = agent
    server = client.create_endpoint("default/server", ["app=server"])
    talker = client.create_endpoint("default/talker", ["app=talker"])
    created.extend([server["id"], talker["id"]])
    servers = Servers()
    try:
        servers.start(server["netns"], "tcp-server", 8080)
        result = probe(talker["netns"], "tcp-connect", server["ipv4"], "8080", "whoami", "1")
        assert result == {"ok": False, "error": "timeout"}
        drops = {(r["reason"], r["direction"]) for r in client.bpf_metrics() if r["packets"]}
        assert (133, "egress") in drops  # the sender's egress is default deny too
        assert client.healthz()["policy"]["mode"] == "always"
    finally:
        servers.stop()


def test_bpffs_not_usable_is_one_line_and_changes_nothing(tmp_path):
    from pilus.datapath import links

    netns = f"pilus-{NODE}-nobpffs"
    links.delete_netns(netns)
    links.create_netns(netns)
    try:
        done = subprocess.run(
            ["nsenter", f"--net=/run/netns/{netns}", "--", sys.executable, "-m", "pilus", "agent",
             "--node-name", f"{NODE}x", "--state-dir", str(tmp_path / "s"), "--pod-cidr", "10.202.8.0/24",
             "--bpffs-root", str(tmp_path / "not-bpffs")],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "bpffs" in lines[0], done.stderr
        # nothing was set up in the node namespace: no router device, no endpoints
        assert links.link_info("pilus_host", netns=netns) is None
        assert not links.list_netns(f"pilus-{NODE}x-ep")
    finally:
        links.delete_netns(netns)


@pytest.mark.parametrize("agent", [["--prometheus-serve-addr", "127.0.0.1:9962"]], indirect=True)
def test_prometheus_endpoint_in_the_node_namespace(agent):
    _cmd, client, created = agent
    created.append(client.create_endpoint("default/metered", ["app=m"])["id"])
    fetch = (
        "import urllib.request;"
        "print(urllib.request.urlopen('http://127.0.0.1:9962/metrics', timeout=5).read().decode())"
    )
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{NETNS}", "--", sys.executable, "-c", fetch],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert 'pilus_endpoint_state{endpoint_state="ready"} 1.0' in done.stdout
    assert "pilus_events_lost_total" in done.stdout
