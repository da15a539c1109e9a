"""The lookups flows use for their two ends (pilus.hubble.lookup): StaticLookup's
tables and AgentLookup over the agent's own types (endpoints, the kvstore's remote
endpoints, the identity cache), and a flow made through AgentLookup."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from test_hubble_flows import drop, packet

from pilus.endpoint.model import Endpoint
from pilus.hubble.flows import FlowParser
from pilus.hubble.lookup import AgentLookup, EndpointDetails, EndpointLookup, StaticLookup, labels_of
from pilus.identity.labels import Labels
from pilus.ipcache.kvsync import IPIdentityPair

XWING = Endpoint(id=5, namespace="default", pod_name="xwing", user_labels=["k8s:class=xwing"],
                 service_account="default", ipv4=IPv4Address("10.200.1.5"), netns="pilus-n1-ep5",
                 interface_name="lxc0", identity=1000,
                 labels=["k8s:class=xwing", "k8s:io.kubernetes.pod.namespace=default"])
COREDNS = IPIdentityPair(IPv4Address("10.200.2.7"), 1002, IPv4Address("172.30.0.12"), "default-node2",
                         "kube-system/coredns-abc")
IDENTITIES = {1002: Labels.parse(["k8s:k8s-app=kube-dns", "k8s:io.kubernetes.pod.namespace=kube-system"])}


def agent_lookup() -> AgentLookup:
    remote = {str(COREDNS.ip): COREDNS}
    return AgentLookup(lambda: [XWING], remote.get, IDENTITIES.get)


def test_both_lookups_are_endpoint_lookups():
    assert isinstance(agent_lookup(), EndpointLookup)
    assert isinstance(StaticLookup(), EndpointLookup)


def test_agent_lookup_finds_local_and_remote_endpoints():
    lk = agent_lookup()
    local = lk.endpoint_by_ip("10.200.1.5")
    assert local == EndpointDetails(5, 1000, "default", "xwing", tuple(XWING.labels), ip="10.200.1.5")
    assert lk.endpoint_by_id(5) == local and lk.endpoint_by_id(6) is None
    remote = lk.endpoint_by_ip("10.200.2.7")
    assert (remote.id, remote.identity, remote.namespace, remote.pod_name) == (0, 1002, "kube-system", "coredns-abc")
    assert "k8s:k8s-app=kube-dns" in remote.labels
    assert lk.endpoint_by_ip("1.1.1.1") is None


def test_agent_lookup_identity_labels_from_the_cache_then_local_endpoints():
    lk = agent_lookup()
    assert "k8s:k8s-app=kube-dns" in lk.identity_labels(1002)
    assert lk.identity_labels(1000) == tuple(XWING.labels)  # not cached: a local endpoint has it
    assert lk.identity_labels(4242) == ()
    assert labels_of(lk, 2) == ["reserved:world"]  # reserved identities need no lookup


def test_a_flow_through_the_agent_lookup():
    f = FlowParser(agent_lookup(), node_name="default/default-node1").parse(
        drop(133, pkt=packet(src="10.200.2.7", dst="10.200.1.5"), source_ep=5, src_id=1002, dst_id=1000))
    assert (f.source.pod_name, f.source.namespace, f.source.ID) == ("coredns-abc", "kube-system", 0)
    assert (f.destination.pod_name, f.destination.ID) == ("xwing", 5)
    assert "k8s:class=xwing" in f.destination.labels


def test_static_lookup_add_and_remove():
    lk = StaticLookup()
    ep = EndpointDetails(7, 1007, "default", "a", ("k8s:app=a",), ip="10.0.0.7")
    lk.add(ep)
    assert lk.endpoint_by_ip("10.0.0.7") == ep and lk.endpoint_by_id(7) == ep
    assert lk.identity_labels(1007) == ("k8s:app=a",)
    lk.remove("10.0.0.7")
    assert lk.endpoint_by_ip("10.0.0.7") is None and lk.endpoint_by_id(7) is None
    with pytest.raises(ValueError, match="no ip"):
        lk.add(EndpointDetails(8, 1, "default", "b"))
