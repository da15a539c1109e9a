"""The datapath does not depend on the agent: kill -9 it during a TCP exchange; the
supervisor restarts it, the exchange never stalls, and the endpoints are the same."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import wait_for

PORT = 9090


@pytest.fixture
def pair(api):
    a = api.create_endpoint("default/echo", ["app=echo"])
    b = api.create_endpoint("default/talker", ["app=talker"])
    yield a, b
    for ep in (a, b):
        with contextlib.suppress(Exception):
            api.delete_endpoint(ep["id"])


def _agent_pid(api) -> int | None:
    try:
        return api.healthz()["agent"]["pid"]
    except Exception:
        return None


def test_kill_agent_during_tcp_exchange(api, pair, servers):
    echo, talker = pair
    servers.start(echo["netns"], "tcp-server", PORT)
    before = api.list_endpoints()
    old_pid = _agent_pid(api)
    assert old_pid
    stream = subprocess.Popen(
        ["ip", "netns", "exec", talker["netns"], sys.executable, "-m", "pilus.testing.probe",
         "tcp-stream", echo["ipv4"], str(PORT), "8"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        os.kill(old_pid, signal.SIGKILL)
        new_pid = wait_for(lambda: (p := _agent_pid(api)) and p != old_pid and p, timeout=20)
        assert new_pid, "the supervisor did not restart the agent"
        out, _ = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"], result
    assert result["round_trips"] > 100
    # nothing was lost while the agent was down and restarting: TCP never retransmitted
    assert result["retransmits"] == 0, result
    assert result["max_gap_ms"] < 1000, result  # and it never stalled (generous: a noisy VM)
    after = api.list_endpoints()
    key = lambda eps: sorted((e["id"], e["name"], e["ipv4"], e["identity"], e["state"]) for e in eps)  # noqa: E731
    assert key(after) == key(before)


def test_policy_keeps_being_enforced_while_the_agent_is_down(api, servers):
    from .conftest import probe

    server = api.create_endpoint("default/vault", ["app=vault"])
    friend = api.create_endpoint("default/friend", ["app=friend"])
    stranger = api.create_endpoint("default/stranger", ["app=stranger"])
    try:
        servers.start(server["netns"], "tcp-server", PORT)
        api.request("PUT", "/policy", {"yaml": (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
            "metadata: {name: vault, namespace: default}\n"
            "spec:\n  endpointSelector: {matchLabels: {app: vault}}\n"
            f"  ingress: [{{fromEndpoints: [{{matchLabels: {{app: friend}}}}], "
            f"toPorts: [{{ports: [{{port: \"{PORT}\", protocol: TCP}}]}}]}}]\n"
        )})

        def verdicts():
            return (probe(friend["netns"], "tcp-connect", server["ipv4"], str(PORT), "whoami", "1")["ok"],
                    probe(stranger["netns"], "tcp-connect", server["ipv4"], str(PORT), "whoami", "1")["ok"])

        assert verdicts() == (True, False)
        old_pid = _agent_pid(api)
        os.kill(old_pid, signal.SIGSTOP)  # the agent is frozen: only the datapath is left
        try:
            assert verdicts() == (True, False)
        finally:
            os.kill(old_pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # the supervisor may have reaped it already
                os.kill(old_pid, signal.SIGCONT)
        assert wait_for(lambda: (p := _agent_pid(api)) and p != old_pid, timeout=20)
        assert verdicts() == (True, False)  # and after the restart, from the restored state
        entries = api.request("GET", "/bpf/policy/default/vault")["entries"]
        assert any(e["identity"] == friend["identity"] and e["dport"] == PORT for e in entries)
    finally:
        with contextlib.suppress(Exception):
            api.request("DELETE", "/policy?name=vault&namespace=default")
        for ep in (server, friend, stranger):
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])
