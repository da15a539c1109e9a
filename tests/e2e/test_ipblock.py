"""Kubernetes NetworkPolicy ipBlock end to end, with the upstream NetworkPolicy e2e
semantics: an ipBlock matches the pods whose addresses it covers (Cilium's CIDR rules
never do). Real pods and TCP probes; every denial shows drop reason 133 and a deny
policy verdict; `policy trace` agrees with every probe and names the covering prefix;
the policy map's counter of the ipBlock identity's entry moves when it decides.

`server` and `server-mate` carry the same labels, hence the same identity, on
different addresses: only the second (ipBlock) lookup can tell them apart.
"""

from __future__ import annotations

import textwrap
import time

import pytest

from pilus.datapath import ENDPOINT_F_IPBLOCK_EGRESS, ENDPOINT_F_IPBLOCK_INGRESS

from .conftest import POD_CIDR, EventLog, Servers, probe

NS = "ipb"
PORT, OTHER_PORT = 80, 81
PODS = {
    f"{NS}/client": ["app=client"],
    f"{NS}/server": ["app=server"],
    f"{NS}/server-mate": ["app=server"],
    f"{NS}/other": ["app=other"],
}


@pytest.fixture(scope="module")
def world(api):
    api.request("PUT", f"/namespace/{NS}", {"labels": {"team": NS}})
    pods, servers = {}, Servers()
    try:
        for name, labels in PODS.items():
            pods[name] = api.request("POST", "/endpoint", {"name": name, "labels": labels})
        for name in (f"{NS}/server", f"{NS}/server-mate", f"{NS}/other"):
            for port in (PORT, OTHER_PORT):
                servers.start(pods[name]["netns"], "tcp-server", port)
        log = EventLog(api)
        time.sleep(0.3)
        yield pods, log
    finally:
        servers.stop()
        api.request("DELETE", "/policy?all=true")
        for ep in pods.values():
            api.delete_endpoint(ep["id"])
        api.request("DELETE", f"/namespace/{NS}")


def apply(api, log: EventLog, text: str) -> None:
    log.events.clear()
    api.request("DELETE", "/policy?all=true")
    api.request("PUT", "/policy", {"yaml": textwrap.dedent(text)})


def ip(pods, name: str) -> str:
    return pods[f"{NS}/{name}"]["ipv4"]


def trace(api, src: str, dst: str, port: int) -> dict:
    return api.request("POST", "/policy/trace",
                       {"src_endpoint": f"{NS}/{src}", "dst_endpoint": f"{NS}/{dst}", "dport": f"{port}/TCP"})


def reach(api, pods, log: EventLog, src: str, dst: str, port: int = PORT, *, direction: str = "egress") -> bool:
    """Probe over TCP; `policy trace` must predict it, and a denial must show its evidence."""
    connected = probe(pods[f"{NS}/{src}"]["netns"], "tcp-connect", ip(pods, dst), str(port), "whoami", "1")["ok"]
    traced = trace(api, src, dst, port)
    assert traced["verdict"] == ("ALLOWED" if connected else "DENIED"), (src, dst, port, connected, traced)
    if not connected:
        s, d = ip(pods, src), ip(pods, dst)
        drop = log.find(lambda e: e["type"] == "drop" and e.get("src_ip") == s and e.get("dst_ip") == d
                        and e.get("dport") == port and e.get("reason") == 133)
        assert drop, f"no drop 133 for {src} -> {dst}:{port}"
        verdict = log.find(lambda e: e["type"] == "policy-verdict" and e.get("action") == "deny"
                           and e.get("src_ip") == s and e.get("dst_ip") == d and e.get("dport") == port)
        assert verdict and verdict["direction"] == direction, verdict
    return connected


def local_id_packets(api, pod: str) -> dict[int, int]:
    """Packets counted per identity in the pod's policy map, local (ipBlock, CIDR) identities only."""
    entries = api.request("GET", f"/bpf/policy/{NS}/{pod}")["entries"]
    return {e["identity"]: e["packets"] for e in entries if e["identity"] >= 1 << 24}


def policy_flags(api) -> dict[str, int]:
    return {e["name"]: e["policy_flags"] for e in api.request("GET", "/endpoint")}


def knp_egress(name: str, peers: str) -> str:
    return f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: {name}, namespace: {NS}}}
        spec:
          podSelector: {{matchLabels: {{app: client}}}}
          policyTypes: [Egress]
          egress:
          - to: [{peers}]
    """


def test_egress_ipblock_to_one_pod(api, world):
    """Upstream: "should allow egress access to server in CIDR block" with a /32."""
    pods, log = world
    assert pods[f"{NS}/server"]["identity"] == pods[f"{NS}/server-mate"]["identity"]
    server = ip(pods, "server")
    apply(api, log, knp_egress("to-server", f"{{ipBlock: {{cidr: {server}/32}}}}"))
    assert reach(api, pods, log, "client", "server")
    assert not reach(api, pods, log, "client", "server-mate")  # the identity-mate stays denied
    assert not reach(api, pods, log, "client", "other")
    traced = trace(api, "client", "server", PORT)
    assert f"{server} is covered by ipBlock prefix {server}/32 (identity " in traced["egress"]["reason"]
    assert "allowed by NetworkPolicy ipb/to-server (egress)" in traced["egress"]["reason"]
    (count,) = local_id_packets(api, "client").values()
    assert count == 1  # the allowed SYN, counted on the ipBlock identity's entry
    flags = policy_flags(api)
    assert flags[f"{NS}/client"] & ENDPOINT_F_IPBLOCK_EGRESS  # the second lookup is on ...
    assert not flags[f"{NS}/server"] & (ENDPOINT_F_IPBLOCK_EGRESS | ENDPOINT_F_IPBLOCK_INGRESS)  # ... only there


def test_egress_ipblock_except(api, world):
    """Upstream: "should enforce except clause while egress access to server in CIDR block"."""
    pods, log = world
    apply(api, log, knp_egress("except", f"{{ipBlock: {{cidr: {POD_CIDR}, except: [{ip(pods, 'server')}/32]}}}}"))
    assert not reach(api, pods, log, "client", "server")
    assert reach(api, pods, log, "client", "server-mate")
    assert reach(api, pods, log, "client", "other")


def test_overlapping_except(api, world):
    """Upstream: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is
    allowed": one policy excepts the server, a second allows exactly it; and an except
    equal to its own cidr (Kubernetes' API server would reject it, pilus accepts it)
    leaves nothing."""
    pods, log = world
    server = ip(pods, "server")
    apply(api, log, knp_egress("except", f"{{ipBlock: {{cidr: {POD_CIDR}, except: [{server}/32]}}}}")
          + "---" + knp_egress("exact", f"{{ipBlock: {{cidr: {server}/32}}}}"))
    assert reach(api, pods, log, "client", "server")
    assert reach(api, pods, log, "client", "other")
    apply(api, log, knp_egress("equal", f"{{ipBlock: {{cidr: {server}/32, except: [{server}/32]}}}}"))
    assert not reach(api, pods, log, "client", "server")
    assert not reach(api, pods, log, "client", "server-mate")


def test_ingress_from_ipblock_covering_pods_with_ports(api, world):
    pods, log = world
    apply(api, log, f"""
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {{name: from-block, namespace: {NS}}}
        spec:
          podSelector: {{matchLabels: {{app: server}}}}
          policyTypes: [Ingress]
          ingress:
          - from: [{{ipBlock: {{cidr: {POD_CIDR}, except: [{ip(pods, 'other')}/32]}}}}]
            ports: [{{protocol: TCP, port: {PORT}}}]
    """)
    assert reach(api, pods, log, "client", "server")
    assert not reach(api, pods, log, "other", "server", direction="ingress")
    assert not reach(api, pods, log, "client", "server", OTHER_PORT, direction="ingress")
    assert reach(api, pods, log, "client", "server-mate")  # selected too (same labels)


def test_cilium_cidr_rules_still_do_not_select_pods(api, world):
    """Cilium's documented semantics stay: toCIDR covering the pods does not allow them."""
    pods, log = world
    apply(api, log, f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: cidr, namespace: {NS}}}
        spec:
          endpointSelector: {{matchLabels: {{app: client}}}}
          egress:
          - toCIDR: [{POD_CIDR}]
    """)
    assert not reach(api, pods, log, "client", "server")
    assert policy_flags(api)[f"{NS}/client"] & ENDPOINT_F_IPBLOCK_EGRESS == 0  # no second lookup
    assert list(local_id_packets(api, "client").values()) == [0]  # the CIDR identity's entry: unused
