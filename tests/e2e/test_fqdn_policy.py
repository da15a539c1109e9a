"""DNS rules and toFQDNs end to end (issue 11): a pod's queries to the cluster's DNS server
(dnsmasq in a kube-system pod) are redirected by the datapath to the agent's DNS proxy,
which refuses names the rules do not allow and forwards the others; the addresses of
allowed answers become identities that toFQDNs selects before the answer reaches the pod,
so the first connection to the address passes, while an address nobody resolved is
dropped on the same port. When the TTL ends the address stays while a connection uses it
(a zombie) and goes afterwards.

Evidence: the DNS rcode the pod sees, the proxy's L7 records (monitor ``l7``), drop events
with reason 133, ``GET /v1/fqdn/cache`` (``pilus fqdn cache list``), the FQDN selector's
identities (``policy selectors``), and dnsmasq's own query log (the refused name never
reached it; the allowed one came from the pod's address)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from .conftest import EXTERNAL_IP, UNDERLAY, EventLog, Servers, pilus_cli, probe, wait_for

EXT2 = str(UNDERLAY.network_address + 201)  # a second address of the external namespace
WILDCARD_IP = "192.0.2.99"  # what dnsmasq answers for every other name
PORT = 8443
TTL = 3

DNS_CLIENT = """
import json, sys
import dns.message, dns.query, dns.rcode
name, server, transport = sys.argv[1:4]
q = dns.message.make_query(name, "A")
try:
    r = (dns.query.tcp if transport == "tcp" else dns.query.udp)(q, server, timeout=3)
    ips = [rr.address for rrset in r.answer for rr in rrset if rrset.rdtype == 1]
    print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "ips": ips}))
except Exception as exc:
    print(json.dumps({"rcode": None, "error": repr(exc)}))
"""

HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print("connected", flush=True)
time.sleep(float(sys.argv[3]))
"""

POLICY = f"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{class: xwing}}}}
  egress:
  - toEndpoints: [{{matchLabels: {{k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}}}]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.cilium.io"}}, {{matchName: "api.github.com"}}]
  - toFQDNs: [{{matchName: api.github.com}}, {{matchPattern: "*.cilium.io"}}]
    toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
"""


@pytest.fixture(scope="module")
def fq(api, node, external):
    from pilus.datapath import links

    links.add_address("eth0", f"{EXT2}/{UNDERLAY.prefixlen}", netns=external)
    tmp = Path(tempfile.mkdtemp(prefix="pilus-dnsmasq-"))
    pods = {}
    servers = Servers()
    dnsmasq = None
    try:
        pods["dns"] = api.request("POST", "/endpoint", {"name": "kube-system/coredns", "labels": ["k8s-app=kube-dns"]})
        pods["xwing"] = api.request("POST", "/endpoint", {"name": "default/xwing", "labels": ["class=xwing"]})
        dns_ip = pods["dns"]["ipv4"]
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", pods["dns"]["netns"], "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
             "--bind-interfaces", f"--listen-address={dns_ip}", "--log-queries", f"--local-ttl={TTL}",
             f"--pid-file={tmp / 'pid'}", f"--address=/api.github.com/{EXTERNAL_IP}",
             f"--address=/docs.cilium.io/{EXT2}", f"--address=/#/{WILDCARD_IP}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        log_lines: list[str] = []
        threading.Thread(target=lambda: log_lines.extend(iter(dnsmasq.stdout.readline, "")), daemon=True).start()
        servers.start(external, "tcp-server", PORT)  # on every address of the namespace
        api.request("DELETE", "/policy?all=true")
        api.request("PUT", "/policy", {"yaml": textwrap.dedent(POLICY)})
        time.sleep(0.5)
        yield {"api": api, "pods": pods, "dns_ip": dns_ip, "dnsmasq_log": log_lines,
               "drops": EventLog(api), "l7": EventLog(api, "l7", 5.0)}
    finally:
        servers.stop()
        if dnsmasq is not None:
            os.killpg(dnsmasq.pid, signal.SIGKILL)
            dnsmasq.wait(5)
        api.request("DELETE", "/policy?all=true")
        for ep in pods.values():
            api.delete_endpoint(ep["id"])
        links.del_address("eth0", f"{EXT2}/{UNDERLAY.prefixlen}", netns=external)
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def query(fq, name: str, transport: str = "udp") -> dict:
    done = subprocess.run(["ip", "netns", "exec", fq["pods"]["xwing"]["netns"], sys.executable, "-c", DNS_CLIENT,
                           name, fq["dns_ip"], transport], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def connect(fq, ip: str) -> dict:
    return probe(fq["pods"]["xwing"]["netns"], "tcp-connect", ip, str(PORT), "whoami", "2")


def cache(fq) -> list[dict]:
    return fq["api"].request("GET", "/fqdn/cache")


def test_allowed_name_resolves_and_its_first_connection_passes(fq):
    answer = query(fq, "api.github.com")
    assert answer == {"rcode": "NOERROR", "ips": [EXTERNAL_IP]}, answer
    # no wait: the policy knew the address before the answer was released
    assert connect(fq, EXTERNAL_IP)["ok"]
    rec = fq["l7"].find(lambda e: (e.get("dns") or {}).get("query") == "api.github.com.")
    assert rec and rec["verdict"] == "FORWARDED" and EXTERNAL_IP in rec["dns"]["ips"], rec
    rows = [r for r in cache(fq) if r["fqdn"] == "api.github.com."]
    assert rows and rows[0]["ips"] == [EXTERNAL_IP] and rows[0]["endpoint"] == fq["pods"]["xwing"]["id"]
    sel = next(s for s in fq["api"].request("GET", "/policy/selectors") if s["selector"] == "fqdn:api.github.com")
    assert len(sel["identities"]) == 1 and sel["identities"][0] >= 1 << 24  # a local identity
    # dnsmasq saw the query from the pod itself (the proxy forwards with the pod's address)
    assert wait_for(lambda: any("api.github.com" in ln and fq["pods"]["xwing"]["ipv4"] in ln
                                for ln in fq["dnsmasq_log"]), 5), fq["dnsmasq_log"][-5:]


def test_denied_name_is_refused_by_the_proxy_and_never_reaches_the_server(fq):
    answer = query(fq, "evil.example.com")
    assert answer["rcode"] == "REFUSED", answer
    rec = fq["l7"].find(lambda e: (e.get("dns") or {}).get("query") == "evil.example.com.")
    assert rec and rec["verdict"] == "DENIED", rec
    assert not any("evil.example.com" in ln for ln in fq["dnsmasq_log"])
    assert query(fq, "evil.example.com", "tcp")["rcode"] == "REFUSED"  # TCP too


def test_unresolved_address_is_dropped_until_a_matching_name_resolves_to_it(fq):
    out = connect(fq, EXT2)
    assert not out["ok"], out
    src = fq["pods"]["xwing"]["ipv4"]
    assert fq["drops"].find(lambda e: e["type"] == "drop" and e.get("src_ip") == src and e.get("dst_ip") == EXT2
                            and e.get("dport") == PORT and e.get("reason") == 133), "no policy drop for EXT2"
    answer = query(fq, "docs.cilium.io", "tcp")  # the pattern, over TCP
    assert answer == {"rcode": "NOERROR", "ips": [EXT2]}, answer
    assert connect(fq, EXT2)["ok"]
    cli = json.loads(pilus_cli("fqdn", "cache", "list", "-o", "json", "--socket", fq["api"].socket_path))
    assert any(r["fqdn"] == "docs.cilium.io." and r["ips"] == [EXT2] for r in cli), cli


def test_ttl_expiry_keeps_an_address_in_use_and_then_drops_it(fq):
    assert query(fq, "api.github.com")["ips"] == [EXTERNAL_IP]
    hold = subprocess.Popen(["ip", "netns", "exec", fq["pods"]["xwing"]["netns"], sys.executable, "-c", HOLD,
                             EXTERNAL_IP, str(PORT), "60"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert hold.stdout.readline().strip() == "connected"
        # past the TTL the open connection keeps the address (a zombie, source "connection")
        zombie = wait_for(lambda: next((r for r in cache(fq) if r["fqdn"] == "api.github.com."
                                        and r["source"] == "connection"), None), TTL + 5)
        assert zombie and zombie["ips"] == [EXTERNAL_IP], cache(fq)
        assert connect(fq, EXTERNAL_IP)["ok"]  # still selected
    finally:
        os.killpg(hold.pid, signal.SIGKILL)
        hold.wait(5)
    # once conntrack has no live entry for it (closed connections linger for the close
    # timeout), the address leaves the cache and its identity, and is dropped again
    gone = wait_for(lambda: not any(r["fqdn"] == "api.github.com." for r in cache(fq)), 40, interval=0.5)
    assert gone, cache(fq)
    assert not connect(fq, EXTERNAL_IP)["ok"]
