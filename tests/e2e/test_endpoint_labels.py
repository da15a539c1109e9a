"""`pilus endpoint labels` on live pods: a relabelled pod gets the identity of its new
labels and policy follows at once, on both ends of a connection. Each change is proven
by a real TCP connect, the drop (133 Policy denied) and policy-verdict events carrying
the identities, `endpoint list`, `identity list`, the policy map and `policy trace`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import textwrap
import time

import pytest

from pilus.cli.main import main as cli

from .conftest import EventLog, Servers, probe, wait_for

PORT = 9191
POLICY_DENIED = 133
# what the issue asks: the new verdict holds within a second of the change
CHANGE_DEADLINE_S = 1.0

POLICIES = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: vault-friends, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: vault}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: friend}}]
    toPorts: [{ports: [{port: "9191", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: locked-down, namespace: default}
spec:
  endpointSelector: {matchLabels: {tier: locked}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: friend}}]
    toPorts: [{ports: [{port: "9191", protocol: TCP}]}]
"""


@pytest.fixture(scope="module")
def world(api):
    pods, servers = {}, Servers()
    try:
        for name, labels in (("vault", ["app=vault"]), ("target", ["app=target"]),
                             ("visitor", ["app=visitor", "role=guest"])):
            pods[name] = api.create_endpoint(f"default/{name}", labels)
        servers.start(pods["vault"]["netns"], "tcp-server", PORT)
        servers.start(pods["target"]["netns"], "tcp-server", PORT)
        api.request("PUT", "/policy", {"yaml": textwrap.dedent(POLICIES)})
        yield pods, EventLog(api)
    finally:
        servers.stop()
        for name in ("vault-friends", "locked-down"):
            with contextlib.suppress(Exception):
                api.request("DELETE", f"/policy?name={name}&namespace=default")
        for ep in pods.values():
            with contextlib.suppress(Exception):
                api.delete_endpoint(ep["id"])


def pilus(node, *argv: str) -> tuple[int, str, str]:
    """The user's command, `pilus --socket SOCK ARGV...`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli(["--socket", node["socket"], *argv])
        except SystemExit as exc:  # argparse refuses bad arguments this way
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def connects(pods, src: str, dst: str) -> bool:
    return probe(pods[src]["netns"], "tcp-connect", pods[dst]["ipv4"], str(PORT), "whoami", "0.4")["ok"]


def relabel(node, pods, ref: str, *flags: str, then_connects: tuple[str, str, bool]) -> dict:
    """`pilus endpoint labels REF FLAGS -o json`, then probe the connection that must
    change. The agent answers once the maps are written, so the first connection after
    the change must already get the new verdict, and within the issue's second."""
    start = time.monotonic()
    rc, out, err = pilus(node, "endpoint", "labels", ref, *flags, "-o", "json")
    assert rc == 0, err
    src, dst, allowed = then_connects
    assert connects(pods, src, dst) is allowed, f"{src} -> {dst} after relabelling {ref} {flags}"
    elapsed = time.monotonic() - start
    assert elapsed < CHANGE_DEADLINE_S, f"the verdict took {elapsed:.2f}s to change"
    return json.loads(out)


def trace(api, src: str, dst: str) -> str:
    body = {"src_endpoint": f"default/{src}", "dst_endpoint": f"default/{dst}", "dport": f"{PORT}/TCP"}
    return api.request("POST", "/policy/trace", body)["verdict"]


def listed(api, name: str) -> dict:
    return next(ep for ep in api.list_endpoints() if ep["name"] == f"default/{name}")


def identities(api) -> dict[int, dict]:
    return {row["id"]: row for row in api.list_identities()}


def policy_identities(api, name: str) -> set[int]:
    return {e["identity"] for e in api.request("GET", f"/bpf/policy/default/{name}")["entries"]}


def denied_evidence(log: EventLog, pods, src: str, dst: str, src_identity: int, dst_identity: int) -> None:
    src_ip, dst_ip = pods[src]["ipv4"], pods[dst]["ipv4"]
    drop = log.find(lambda e: e["type"] == "drop" and e.get("reason") == POLICY_DENIED and e.get("src_ip") == src_ip
                    and e.get("dst_ip") == dst_ip and e.get("dport") == PORT and e.get("src_identity") == src_identity)
    assert drop, f"no drop {POLICY_DENIED} for {src} (identity {src_identity}) -> {dst}"
    assert drop["reason_desc"] == "Policy denied"
    verdict = log.find(lambda e: e["type"] == "policy-verdict" and e.get("action") == "deny"
                       and e.get("src_ip") == src_ip and e.get("dst_ip") == dst_ip
                       and e.get("remote_identity") == src_identity and e.get("local_identity") == dst_identity)
    assert verdict and verdict["direction"] == "ingress" and verdict["drop_reason"] == POLICY_DENIED, verdict


def allowed_evidence(log: EventLog, pods, src: str, dst: str, src_identity: int, dst_identity: int) -> None:
    verdict = log.find(lambda e: e["type"] == "policy-verdict" and e.get("action") == "allow"
                       and e.get("src_ip") == pods[src]["ipv4"] and e.get("dst_ip") == pods[dst]["ipv4"]
                       and e.get("remote_identity") == src_identity and e.get("local_identity") == dst_identity)
    assert verdict and verdict["direction"] == "ingress", f"no allow verdict for {src} -> {dst}"


def test_relabelled_source_gains_then_loses_access(api, node, world):
    pods, log = world
    guest = listed(api, "visitor")["identity"]
    vault = listed(api, "vault")["identity"]
    assert not connects(pods, "visitor", "vault")
    denied_evidence(log, pods, "visitor", "vault", guest, vault)
    assert trace(api, "visitor", "vault") == "DENIED"

    # (a) role=friend matches the vault's allow rule: access at once
    res = relabel(node, pods, "default/visitor", "--add", "role=friend", then_connects=("visitor", "vault", True))
    friend = res["endpoint"]["identity"]
    assert res["previous_identity"] == guest != friend
    assert "k8s:role=friend" in res["endpoint"]["labels"]
    allowed_evidence(log, pods, "visitor", "vault", friend, vault)
    assert trace(api, "visitor", "vault") == "ALLOWED"
    assert listed(api, "visitor")["identity"] == friend
    ids = identities(api)
    assert ids[friend]["endpoints"] == 1 and "k8s:role=friend" in ids[friend]["labels"]
    assert guest not in ids, "the old identity had no other user: it is released and gone"
    assert friend in policy_identities(api, "vault")
    assert {"ip": pods["visitor"]["ipv4"] + "/32", "identity": friend} in [
        {"ip": r["prefix"], "identity": r["identity"]} for r in api.bpf_ipcache()]

    # (b) relabelled out again (role deleted): the next connection is denied
    res = relabel(node, pods, str(pods["visitor"]["id"]), "--delete", "role",
                  then_connects=("visitor", "vault", False))
    nobody = res["endpoint"]["identity"]
    assert res["previous_identity"] == friend != nobody
    assert not any(label.startswith("k8s:role") for label in res["endpoint"]["labels"])
    denied_evidence(log, pods, "visitor", "vault", nobody, vault)
    assert trace(api, "visitor", "vault") == "DENIED"
    ids = identities(api)
    assert friend not in ids and ids[nobody]["endpoints"] == 1
    # peers drop the released identity from their maps (it went through the kvstore watch)
    assert wait_for(lambda: friend not in policy_identities(api, "vault"), timeout=5)


def test_relabelled_destination_comes_under_policy_and_out_again(api, node, world):
    pods, log = world
    pilus(node, "endpoint", "labels", "default/visitor", "--add", "role=guest")  # whatever the last test left
    visitor = listed(api, "visitor")["identity"]
    assert connects(pods, "visitor", "target")  # no policy selects the target
    assert listed(api, "target")["policy_enforcement"]["ingress"] is False

    # tier=locked: the locked-down policy selects it, ingress is default-deny but for friends
    res = relabel(node, pods, "default/target", "-a", "tier=locked", then_connects=("visitor", "target", False))
    locked = res["endpoint"]["identity"]
    assert res["endpoint"]["policy_enforcement"]["ingress"] is True
    denied_evidence(log, pods, "visitor", "target", visitor, locked)
    assert trace(api, "visitor", "target") == "DENIED"
    rc, out, _ = pilus(node, "endpoint", "list")
    row = next(line for line in out.splitlines() if "default/target" in line)
    assert row.split()[1:4] == ["default/target", "Enabled", "Disabled"] and str(locked) in row.split()

    # and out again: the policy no longer applies
    res = relabel(node, pods, "default/target", "-d", "tier", then_connects=("visitor", "target", True))
    assert res["previous_identity"] == locked and res["endpoint"]["policy_enforcement"]["ingress"] is False
    assert trace(api, "visitor", "target") == "ALLOWED"
    assert locked not in identities(api)


def test_invalid_labels_are_refused_and_change_nothing(api, node, world):
    pods, _ = world
    before = (listed(api, "visitor"), identities(api), api.bpf_ipcache(), policy_identities(api, "vault"))
    for flags, message in (
        (["--add", "k8s:io.kubernetes.pod.namespace=kube-system"],
         "label 'k8s:io.kubernetes.pod.namespace=kube-system': key 'io.kubernetes.pod.namespace' is set by "
         "pilus from its namespace; it cannot be set or removed as a pod label"),
        (["--delete", "io.cilium.k8s.policy.serviceaccount"], "is set by pilus from its service account"),
        (["--add", "reserved:host"], "source 'reserved' is set by pilus itself"),
        (["--delete", "team"], "label 'team': not found on the endpoint"),
        (["--add", "role=friend", "--add", "role=enemy"], "key 'role' already set"),
    ):
        rc, _, err = pilus(node, "endpoint", "labels", "default/visitor", *flags)
        assert rc == 1 and message in err, (flags, err)
    rc, _, err = pilus(node, "endpoint", "labels", "default/visitor", "--add", "bad key=x")
    assert rc == 2 and "invalid label 'bad key=x'" in err  # refused by the CLI already
    after = (listed(api, "visitor"), identities(api), api.bpf_ipcache(), policy_identities(api, "vault"))
    assert after == before
    assert not connects(pods, "visitor", "vault")


def _agent_pid(api) -> int | None:
    try:
        return api.healthz()["agent"]["pid"]
    except Exception:
        return None


def test_relabel_survives_agent_restart(api, node, world):
    pods, _ = world
    relabel(node, pods, "default/visitor", "--add", "role=friend", then_connects=("visitor", "vault", True))
    before = listed(api, "visitor")
    old_pid = _agent_pid(api)
    os.kill(old_pid, signal.SIGKILL)
    assert wait_for(lambda: (p := _agent_pid(api)) and p != old_pid, timeout=20), "agent not restarted"
    after = listed(api, "visitor")
    assert after["user_labels"] == ["k8s:app=visitor", "k8s:role=friend"]
    assert (after["identity"], after["labels"]) == (before["identity"], before["labels"])
    assert connects(pods, "visitor", "vault")
    assert trace(api, "visitor", "vault") == "ALLOWED"
