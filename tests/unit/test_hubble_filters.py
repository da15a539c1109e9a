"""FlowFilter matching (pilus.hubble.filters): each field, the corners Hubble users rely
on (pod prefixes, "ns/" as a namespace, --not), and errors for values that cannot work."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, TCP, UDP
from test_hubble_flows import COREDNS_IP, DEATHSTAR_IP, WORLD_IP, XWING_IP, drop, packet, parse, trace, verdict

from pilus.datapath import abi
from pilus.hubble.filters import FIELDS, FilterError, FlowMatcher, compile_filter, parse_selector
from pilus.hubble.protos import flow_pb2

FF = flow_pb2.FlowFilter

XWING_TO_DEATHSTAR = parse(drop(133))  # xwing -> deathstar:80 TCP SYN, DROPPED at deathstar (ingress)
DEATHSTAR_TO_XWING = parse(trace(abi.TRACE_TO_LXC, ct=2, source_ep=5, src_id=1001, pkt=packet(
    src=DEATHSTAR_IP, dst=XWING_IP, l4=TCP(sport=80, dport=43512, flags="SA"))))  # a reply, FORWARDED
WORLD_TO_XWING = parse(verdict(0, pkt=packet(src=WORLD_IP, dst=XWING_IP, l4=UDP(sport=999, dport=53)),
                               source_ep=5, local=1000, remote=2))
COREDNS_PING = parse(trace(abi.TRACE_FROM_OVERLAY, ct=0, source_ep=5, src_id=1002, pkt=packet(
    src=COREDNS_IP, dst=XWING_IP, l4=ICMP(type=8))))
FLOWS = {"x2d": XWING_TO_DEATHSTAR, "d2x": DEATHSTAR_TO_XWING, "w2x": WORLD_TO_XWING, "dns": COREDNS_PING}


def http_flow(method="GET", url="http://deathstar/v1/request-landing", code=0, headers=()) -> flow_pb2.Flow:
    f = flow_pb2.Flow()
    f.CopyFrom(XWING_TO_DEATHSTAR)
    f.Type = flow_pb2.L7
    f.l7.type = flow_pb2.RESPONSE if code else flow_pb2.REQUEST
    f.l7.http.method, f.l7.http.url, f.l7.http.code = method, url, code
    f.l7.http.headers.extend(flow_pb2.HTTPHeader(key=k, value=v) for k, v in headers)
    return f


def matching(*whitelist: FF, blacklist: tuple[FF, ...] = ()) -> set[str]:
    m = FlowMatcher(whitelist, blacklist)
    return {name for name, f in FLOWS.items() if m(f)}


def test_every_flowfilter_field_has_a_matcher():
    # a field without a row would be ignored silently: a filter the user set that does nothing
    assert set(FIELDS) == {f.name for f in FF.DESCRIPTOR.fields}


def test_no_filters_match_everything_and_an_empty_filter_too():
    assert matching() == set(FLOWS)
    assert matching(FF()) == set(FLOWS)


def test_whitelist_is_an_or_of_filters_and_a_filter_an_and_of_fields():
    assert matching(FF(verdict=[flow_pb2.DROPPED]), FF(source_ip=[WORLD_IP])) == {"x2d", "w2x"}
    assert matching(FF(source_pod=["default/"], verdict=[flow_pb2.FORWARDED])) == {"d2x"}
    # within one field: any value
    assert matching(FF(source_ip=[XWING_IP, WORLD_IP])) == {"x2d", "w2x"}


def test_blacklist_excludes_as_hubble_observe_not():
    assert matching(blacklist=(FF(verdict=[flow_pb2.DROPPED]),)) == {"d2x", "w2x", "dns"}
    assert matching(FF(destination_ip=[XWING_IP]), blacklist=(FF(source_pod=["kube-system/"]),)) == {"d2x", "w2x"}


def test_pod_filter_is_namespace_and_name_prefix():
    assert matching(FF(source_pod=["default/xwing"])) == {"x2d"}
    assert matching(FF(source_pod=["default/x"])) == {"x2d"}
    assert matching(FF(source_pod=["default/deathstar"])) == {"d2x"}
    assert matching(FF(source_pod=["kube-system/xwing"])) == set()
    assert matching(FF(destination_pod=["default/deathstar-6c94d"])) == {"x2d"}


def test_pod_filter_ns_slash_means_the_whole_namespace():
    assert matching(FF(source_pod=["default/"])) == {"x2d", "d2x"}
    assert matching(FF(source_pod=["kube-system/"])) == {"dns"}
    # the namespace filter of hubble observe: either end in the namespace
    assert matching(FF(source_pod=["kube-system/"]), FF(destination_pod=["kube-system/"])) == {"dns"}
    # world has neither namespace nor pod name: no pod filter selects it
    assert matching(FF(source_pod=["/w"])) == set()
    with pytest.raises(FilterError, match="namespace/"):
        compile_filter(FF(source_pod=["/"]))


def test_pod_filter_without_namespace_is_in_default():
    assert matching(FF(source_pod=["xwing"])) == {"x2d"}
    assert matching(FF(source_pod=["coredns"])) == set()  # coredns is in kube-system


def test_pod_filter_rejects_an_empty_value():
    with pytest.raises(FilterError, match="source_pod"):
        compile_filter(FF(source_pod=[""]))


def test_label_selectors():
    assert matching(FF(source_label=["k8s:class=xwing"])) == {"x2d"}
    assert matching(FF(source_label=["class=xwing"])) == {"x2d"}  # no source: any source
    assert matching(FF(source_label=["class==xwing"])) == {"x2d"}
    assert matching(FF(source_label=["reserved:class=xwing"])) == set()  # another source
    assert matching(FF(source_label=["class in (xwing, deathstar)"])) == {"x2d", "d2x"}
    assert matching(FF(source_label=["k8s:class notin (xwing)"])) == {"d2x", "w2x", "dns"}
    assert matching(FF(source_label=["class!=xwing"])) == {"d2x", "w2x", "dns"}
    assert matching(FF(source_label=["org"])) == {"x2d", "d2x"}
    assert matching(FF(source_label=["!org"])) == {"w2x", "dns"}
    assert matching(FF(source_label=["reserved:world"])) == {"w2x"}
    assert matching(FF(source_label=["k8s:class=xwing,k8s:org=alliance"])) == {"x2d"}
    assert matching(FF(source_label=["class=xwing,org=empire"])) == set()
    assert matching(FF(destination_label=["k8s:class=deathstar"])) == {"x2d"}
    assert matching(FF(source_label=["k8s:io.kubernetes.pod.namespace=kube-system"])) == {"dns"}


@pytest.mark.parametrize("bad", ["class in xwing", "=x", "class=x=y", "a,,b", ""])
def test_invalid_label_selectors(bad):
    with pytest.raises(FilterError, match="invalid label selector"):
        parse_selector(bad)


def test_ip_filters_take_addresses_and_cidrs():
    assert matching(FF(source_ip=[XWING_IP])) == {"x2d"}
    assert matching(FF(source_ip=["10.200.1.0/24"])) == {"x2d", "d2x"}
    assert matching(FF(source_ip=["10.200.0.0/16"])) == {"x2d", "d2x", "dns"}
    assert matching(FF(destination_ip=["10.200.1.5/32"])) == {"d2x", "w2x", "dns"}
    assert matching(FF(source_ip=["fd00::/8"])) == set()
    with pytest.raises(FilterError, match="source_ip: '10.0.0.300'"):
        compile_filter(FF(source_ip=["10.0.0.300"]))


def test_identity_filters():
    assert matching(FF(source_identity=[1000])) == {"x2d"}
    assert matching(FF(source_identity=[2])) == {"w2x"}
    assert matching(FF(destination_identity=[1000])) == {"d2x", "w2x", "dns"}


def test_verdict_and_drop_reason():
    assert matching(FF(verdict=[flow_pb2.DROPPED])) == {"x2d"}
    assert matching(FF(verdict=[flow_pb2.FORWARDED])) == {"d2x", "w2x", "dns"}
    assert matching(FF(drop_reason_desc=[flow_pb2.POLICY_DENIED])) == {"x2d"}
    assert matching(FF(drop_reason_desc=[flow_pb2.POLICY_DENY])) == set()


def test_event_type_with_and_without_sub_type():
    ET = flow_pb2.EventTypeFilter
    assert matching(FF(event_type=[ET(type=1)])) == {"x2d"}
    assert matching(FF(event_type=[ET(type=4)])) == {"d2x", "dns"}
    assert matching(FF(event_type=[ET(type=5)])) == {"w2x"}
    # trace:to-endpoint is sub type 0 (Cilium's TraceToLxc); from-overlay is 9
    assert matching(FF(event_type=[ET(type=4, match_sub_type=True, sub_type=0)])) == {"d2x"}
    assert matching(FF(event_type=[ET(type=4, match_sub_type=True, sub_type=9)])) == {"dns"}
    # sub_type without match_sub_type is ignored, as in Hubble; type 0 is any type
    assert matching(FF(event_type=[ET(type=4, sub_type=9)])) == {"d2x", "dns"}
    assert matching(FF(event_type=[ET(type=0)])) == set(FLOWS)
    assert matching(FF(event_type=[ET(match_sub_type=True, sub_type=133)])) == {"x2d"}


def test_protocol():
    assert matching(FF(protocol=["tcp"])) == {"x2d", "d2x"}
    assert matching(FF(protocol=["UDP"])) == {"w2x"}
    assert matching(FF(protocol=["icmp"])) == matching(FF(protocol=["ICMPv4"])) == {"dns"}
    assert matching(FF(protocol=["sctp", "icmpv6"])) == set()
    assert FlowMatcher([FF(protocol=["http"])])(http_flow()) and not FlowMatcher([FF(protocol=["http"])])(
        XWING_TO_DEATHSTAR)
    with pytest.raises(FilterError, match="unknown protocol 'foo'"):
        compile_filter(FF(protocol=["foo"]))


def test_ports():
    assert matching(FF(destination_port=["80"])) == {"x2d"}
    assert matching(FF(source_port=["80"])) == {"d2x"}
    assert matching(FF(destination_port=["53"])) == {"w2x"}
    assert matching(FF(destination_port=["0"])) == set()  # ICMP has no port 0 either
    for bad in ("http", "70000", "-1", ""):
        with pytest.raises(FilterError, match="invalid port"):
            compile_filter(FF(source_port=[bad]))


def test_tcp_flags_the_flow_must_have_all_flags_of_one_filter():
    TF = flow_pb2.TCPFlags
    assert matching(FF(tcp_flags=[TF(SYN=True)])) == {"x2d", "d2x"}
    assert matching(FF(tcp_flags=[TF(SYN=True, ACK=True)])) == {"d2x"}
    assert matching(FF(tcp_flags=[TF(FIN=True), TF(ACK=True)])) == {"d2x"}
    assert matching(FF(tcp_flags=[TF(RST=True)])) == set()


def test_node_name_patterns():
    # the flows' node is default/default-node1 (cluster/node)
    assert matching(FF(node_name=["default-node1"])) == set(FLOWS)  # cluster defaults to "default"
    assert matching(FF(node_name=["default/default-node*"])) == set(FLOWS)
    assert matching(FF(node_name=["*/default-node1"])) == set(FLOWS)
    assert matching(FF(node_name=["other/default-node1", "default-node2"])) == set()
    assert matching(FF(node_name=["default-*1"])) == set(FLOWS)
    # a flow whose node name has no cluster is in cluster "default"
    bare = flow_pb2.Flow(node_name="node7")
    assert FlowMatcher([FF(node_name=["node7"])])(bare)
    assert not FlowMatcher([FF(node_name=["other/node7"])])(bare)
    with pytest.raises(FilterError, match="node_name"):
        compile_filter(FF(node_name=["Node_1"]))


def test_traffic_direction():
    assert matching(FF(traffic_direction=[flow_pb2.INGRESS])) == {"x2d", "w2x", "dns"}
    assert matching(FF(traffic_direction=[flow_pb2.EGRESS])) == {"d2x"}


def test_reply_unknown_matches_neither():
    assert matching(FF(reply=[True])) == {"d2x"}
    assert matching(FF(reply=[False])) == {"w2x", "dns"}  # x2d is a drop: reply unknown
    assert matching(FF(reply=[True, False])) == {"d2x", "w2x", "dns"}


def test_http_filters():
    req = http_flow("GET", "http://deathstar/v1/request-landing")
    resp = http_flow("POST", "http://deathstar/v1/exhaust-port?x=1", code=403, headers=[("x-ship", "xwing")])

    def m(ff: FF) -> list[bool]:
        return [FlowMatcher([ff])(f) for f in (req, resp, XWING_TO_DEATHSTAR)]

    assert m(FF(http_method=["get"])) == [True, False, False]
    assert m(FF(http_method=["POST", "PUT"])) == [False, True, False]
    assert m(FF(http_path=["^/v1/exhaust"])) == [False, True, False]
    assert m(FF(http_path=["landing$"])) == [True, False, False]
    assert m(FF(http_url=["exhaust-port\\?x=1"])) == [False, True, False]
    assert m(FF(http_status_code=["403"])) == [False, True, False]
    assert m(FF(http_status_code=["4+"])) == [False, True, False]
    assert m(FF(http_status_code=["40+"])) == [False, True, False]
    assert m(FF(http_status_code=["2+", "404"])) == [False, False, False]
    assert m(FF(http_header=[flow_pb2.HTTPHeader(key="x-ship", value="xwing")])) == [False, True, False]
    for bad in ("600", "abc", "4", "4++"):
        with pytest.raises(FilterError, match="http_status_code"):
            compile_filter(FF(http_status_code=[bad]))
    with pytest.raises(FilterError, match="needs an event type filter"):
        compile_filter(FF(http_status_code=["200"], event_type=[flow_pb2.EventTypeFilter(type=1)]))
    compile_filter(FF(http_status_code=["200"], event_type=[flow_pb2.EventTypeFilter(type=129)]))
    with pytest.raises(FilterError, match="http_path: invalid regular expression"):
        compile_filter(FF(http_path=["(unclosed"]))


def test_dns_query_and_fqdn():
    f = flow_pb2.Flow()
    f.CopyFrom(WORLD_TO_XWING)
    f.l7.dns.query = "deathstar.empire.svc.cluster.local."
    f.destination_names.append("api.Empire.io")
    assert FlowMatcher([FF(dns_query=["empire\\.svc"])])(f)
    assert not FlowMatcher([FF(dns_query=["^rebel"])])(f)
    assert FlowMatcher([FF(destination_fqdn=["*.empire.io"])])(f)
    assert not FlowMatcher([FF(destination_fqdn=["*.io"])])(f)  # '*' stays within one label
    assert not FlowMatcher([FF(source_fqdn=["*.empire.io"])])(f)


def test_the_less_used_fields():
    f = XWING_TO_DEATHSTAR
    assert FlowMatcher([FF(uuid=[f.uuid])])(f) and not FlowMatcher([FF(uuid=["x"])])(DEATHSTAR_TO_XWING)
    assert matching(FF(source_cluster_name=["default"])) == {"x2d", "d2x", "dns"}
    assert matching(FF(destination_cluster_name=["other"])) == set()
    assert matching(FF(ip_version=[flow_pb2.IPv4])) == set(FLOWS)
    assert matching(FF(interface=[flow_pb2.NetworkInterface(index=101)])) == set(FLOWS)
    assert matching(FF(interface=[flow_pb2.NetworkInterface(index=7)])) == set()
    assert matching(FF(encrypted=[True])) == set()
    svc = flow_pb2.Flow(destination_service=flow_pb2.Service(name="deathstar", namespace="default"))
    assert FlowMatcher([FF(destination_service=["default/death"])])(svc)
    assert not FlowMatcher([FF(source_service=["default/"])])(svc)
    wl = flow_pb2.Flow(source=flow_pb2.Endpoint(workloads=[flow_pb2.Workload(name="xwing", kind="Deployment")]))
    assert FlowMatcher([FF(source_workload=[flow_pb2.Workload(kind="Deployment")])])(wl)
    assert not FlowMatcher([FF(source_workload=[flow_pb2.Workload(name="tie")])])(wl)


def test_cel_expressions_are_refused():
    ff = FF(experimental=FF.Experimental(cel_expression=["true"]))
    with pytest.raises(FilterError, match="CEL"):
        compile_filter(ff)
