# ruff: noqa: E501  (table rows of inline YAML read better on one line)
"""Parsing and validation: every bad document names document index, field path and reason."""

from __future__ import annotations

import json

import pytest

from pilus.policy import PolicyNotFound, PolicyValidationError, Repository, parse_policies
from pilus.policy.l7 import HeaderMatch, L7Rules, PortRuleDNS, PortRuleHTTP, PortRuleKafka, PortRuleL7, Secret
from pilus.policy.schema import SCTP_WARNING


def cnp(spec: str, name: str = "foo", extra: str = "") -> str:
    body = "\n".join("  " + ln for ln in spec.strip("\n").splitlines())
    return f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: default}}\n{extra}spec:\n{body}\n"


SEL = "endpointSelector: {matchLabels: {app: web}}\n"

BAD = [
    # (yaml, doc index, path, reason substring)
    ("a: [1\nb: 2", 0, "", "bad YAML"),
    (
        cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: '70000'}]}]"),
        0,
        "spec.ingress[0].toPorts[0].ports[0].port",
        "must be 0-65535",
    ),
    (
        cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: 80, endPort: 79}]}]"),
        0,
        "spec.ingress[0].toPorts[0].ports[0].endPort",
        ">= port",
    ),
    (
        cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: http, endPort: 90}]}]"),
        0,
        "spec.ingress[0].toPorts[0].ports[0].endPort",
        "named port",
    ),
    (
        cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: 80, protocol: ICMP}]}]"),
        0,
        "spec.ingress[0].toPorts[0].ports[0].protocol",
        "unsupported protocol",
    ),
    (cnp(SEL + "ingress:\n- fromCIDR: [10.0.0.0/33]"), 0, "spec.ingress[0].fromCIDR[0]", "not a valid CIDR"),
    (
        cnp(SEL + "egress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}]"),
        0,
        "spec.egress[0].toCIDRSet[0].except[0]",
        "not inside cidr",
    ),
    (cnp(SEL + "ingress:\n- fromEntities: [wrld]"), 0, "spec.ingress[0].fromEntities[0]", "unknown entity 'wrld'"),
    (
        cnp(SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: a, operator: Is}]}]"),
        0,
        "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
        "unknown operator",
    ),
    (
        cnp(SEL + "ingress:\n- fromEndpoints: [{matchExpressions: [{key: a, operator: In}]}]"),
        0,
        "spec.ingress[0].fromEndpoints[0].matchExpressions[0].values",
        "non-empty values",
    ),
    (cnp(SEL + "ingress:\n- fromEndpoint: [{}]"), 0, "spec.ingress[0].fromEndpoint", "unknown field"),
    (cnp(SEL + "ingress:\n- fromEndpoints: {app: x}"), 0, "spec.ingress[0].fromEndpoints", "wrong type"),
    (cnp(SEL + "enableDefaultDeny: {ingress: 'no'}"), 0, "spec.enableDefaultDeny.ingress", "wrong type"),
    (cnp("ingress: [{}]"), 0, "spec", "exactly one of endpointSelector and nodeSelector"),
    (
        cnp(SEL + "ingress:\n- icmps: [{fields: [{type: Bogus}]}]"),
        0,
        "spec.ingress[0].icmps[0].fields[0].type",
        "unknown IPv4 ICMP type",
    ),
    (
        cnp(
            SEL
            + "ingress:\n- fromEndpoints: [{}]\n  toPorts: [{ports: [{port: '80'}]}]\n  icmps: [{fields: [{type: 8}]}]"
        ),
        0,
        "spec.ingress[0].icmps",
        "cannot be combined",
    ),
    (
        cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: '80'}], rules: {http: [{method: '('}]}}]"),
        0,
        "spec.ingress[0].toPorts[0].rules.http[0].method",
        "regular expression",
    ),
    (
        cnp(SEL + "ingressDeny:\n- toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]"),
        0,
        "spec.ingressDeny[0].toPorts[0].rules",
        "unknown field",
    ),
    (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {namespace: default}\nspec: {endpointSelector: {}}\n",
        0,
        "metadata.name",
        "required",
    ),
    (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolcy\nmetadata: {name: x}\nspec: {endpointSelector: {}}\n",
        0,
        "kind",
        "unsupported kind",
    ),
    (
        "apiVersion: v1\nkind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}}\n",
        0,
        "apiVersion",
        "cilium.io/v2",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n",
        0,
        "spec.ingress[0].ports[0].port",
        "must be 1-65535",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 70000}]\n",
        0,
        "spec.ingress[0].ports[0].port",
        "must be 1-65535",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n",
        0,
        "spec.egress[0].to[0].ipBlock",
        "cannot be combined",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  ingress: []\n",
        0,
        "spec.podSelector",
        "required",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingres]\n",
        0,
        "spec.policyTypes[0]",
        "not Ingress or Egress",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{protocol: ICMP}]\n",
        0,
        "spec.ingress[0].ports[0].protocol",
        "unsupported protocol",
    ),
    (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70}]\n",
        0,
        "spec.ingress[0].ports[0].endPort",
        ">= port",
    ),
    (
        cnp(SEL) + "---\n" + cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: 'http_x'}]}]", name="bar"),
        1,
        "spec.ingress[0].toPorts[0].ports[0].port",
        "neither a port number nor a valid port name",
    ),
    (cnp(SEL) + "---\n" + cnp(SEL), 1, "metadata.name", "duplicate"),
    (
        "apiVersion: v1\nkind: List\nitems:\n- " + cnp(SEL + "ingress:\n- fromEntities: [bogus]").replace("\n", "\n  "),
        0,
        "items[0].spec.ingress[0].fromEntities[0]",
        "unknown entity",
    ),
]


@pytest.mark.parametrize("text,idx,path,reason", BAD)
def test_rejects(text, idx, path, reason):
    with pytest.raises(PolicyValidationError) as ei:
        parse_policies(text)
    errs = ei.value.errors
    assert any(e.doc_index == idx and e.path == path and reason in e.reason for e in errs), str(ei.value)
    # str(): one line per issue, "document N (...): path: reason"
    assert str(ei.value).splitlines()[0].startswith("document ")


def test_error_line_format():
    with pytest.raises(PolicyValidationError) as ei:
        parse_policies(cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: '70000'}]}]"))
    assert str(ei.value) == (
        "document 0 (CiliumNetworkPolicy default/foo): spec.ingress[0].toPorts[0].ports[0].port: must be 0-65535"
    )


def test_every_problem_listed_and_nothing_returned():
    text = (
        cnp(SEL + "ingress:\n- fromEntities: [x]\n  toPorts: [{ports: [{port: '99999'}]}]")
        + "---\n"
        + cnp(SEL + "egress:\n- toCIDR: [nope]", name="b")
    )
    with pytest.raises(PolicyValidationError) as ei:
        parse_policies(text)
    assert {e.doc_index for e in ei.value.errors} == {0, 1}
    assert len(ei.value.errors) == 3


def test_good_documents():
    text = (
        cnp(SEL + "ingress:\n- fromEndpoints: [{}]\n  toPorts: [{ports: [{port: '0', protocol: TCP}]}]", extra="")
        + "---\n"
    )
    text += "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: cw, labels: {a: b}, annotations: {x: y}, uid: '1'}\n"
    text += "specs:\n- endpointSelector: {}\n  egress: [{toEntities: [world]}]\n- endpointSelector: {}\n  ingress: [{fromEntities: [cluster]}]\n"
    text += "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np}\nspec: {podSelector: {}}\nstatus: {}\n"
    docs = parse_policies(text)
    assert [(d.kind, d.namespace, d.name, len(d.rules)) for d in docs] == [
        ("CiliumNetworkPolicy", "default", "foo", 1),
        ("CiliumClusterwideNetworkPolicy", None, "cw", 2),
        ("NetworkPolicy", "default", "np", 1),  # namespace defaults to "default"
    ]
    assert docs[1].raw["metadata"]["name"] == "cw"


def test_json_and_list():
    obj = {
        "apiVersion": "v1",
        "kind": "CiliumNetworkPolicyList",
        "items": [
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNetworkPolicy",
                "metadata": {"name": "a"},
                "spec": {"endpointSelector": {}, "ingress": [{}]},
            }
        ],
    }
    docs = parse_policies(json.dumps(obj))
    assert docs[0].name == "a" and docs[0].namespace == "default"


def test_warnings_sctp_and_l7():
    docs = parse_policies(
        cnp(
            SEL
            + """
ingress:
- toPorts:
  - ports: [{port: '80', protocol: SCTP}]
  - ports: [{port: '8080', protocol: TCP}]
    rules: {http: [{method: GET, path: /public}]}
"""
        )
    )
    w = docs[0].warnings
    assert any(SCTP_WARNING in x and "spec.ingress[0].toPorts[0].ports[0]" in x for x in w)
    assert not any("L7" in x or "Kafka" in x for x in w)  # HTTP rules are enforced by the L7 proxy
    pr = docs[0].rules[0].ingress[0].to_ports
    assert len(pr) == 1 and json.loads(pr[0].l7.to_json()) == {"http": [{"method": "GET", "path": "/public"}]}
    assert pr[0].l7 == L7Rules(http=(PortRuleHTTP(method="GET", path="/public"),)) and pr[0].l7.parser == "http"


def l7_rules(rules: str):
    """The typed rules of one port rule with ``rules: <rules>`` (flow YAML)."""
    doc = parse_policies(cnp(SEL + f"egress:\n- toPorts:\n  - ports: [{{port: '80', protocol: TCP}}]\n    rules: {rules}\n"))
    return doc[0].rules[0].egress[0].to_ports[0].l7


def l7_error(rules: str) -> str:
    with pytest.raises(PolicyValidationError) as ei:
        l7_rules(rules)
    return str(ei.value)


def test_typed_l7_rules():
    http = l7_rules(
        "{http: [{method: 'GET|POST', path: '/api/.*', headers: ['X-Test'],"
        " headerMatches: [{name: X-Token, secret: {namespace: ns, name: tok}, mismatch: REPLACE}]}]}"
    )
    (h,) = http.http
    assert (h.method, h.path, h.headers) == ("GET|POST", "/api/.*", ("X-Test",))
    assert h.headerMatches == (HeaderMatch("X-Token", None, Secret("ns", "tok"), "REPLACE"),)
    kafka = l7_rules("{kafka: [{role: produce, topic: orders.v1}, {apiKey: fetch, clientID: c1}]}")
    assert kafka.kafka == (PortRuleKafka(role="produce", topic="orders.v1"), PortRuleKafka(apiKey="fetch", clientID="c1"))
    assert l7_rules("{dns: [{matchPattern: '*.example.com'}]}").dns == (PortRuleDNS(matchPattern="*.example.com"),)
    generic = l7_rules("{l7proto: r2d2, l7: [{cmd: READ, file: '/x'}]}")
    assert generic.parser == "r2d2" and generic.l7 == (PortRuleL7((("cmd", "READ"), ("file", "/x"))),)
    assert l7_rules("{}") == L7Rules()  # present but empty: still an L7 port (warned)


def test_l7_rules_are_validated_as_cilium_does():
    base = "spec.egress[0].toPorts[0].rules"
    assert f"{base}.http[0].path: not a valid regular expression" in l7_error("{http: [{path: '(['}]}")
    assert f"{base}.http[0].headerMatches[0].mismatch: must be LOG" in l7_error(
        "{http: [{headerMatches: [{name: a, mismatch: DROP}]}]}"
    )
    assert f"{base}.kafka[0]: role and apiKey are mutually exclusive" in l7_error(
        "{kafka: [{role: produce, apiKey: fetch}]}"
    )
    assert f"{base}.kafka[0].topic: at most 249 characters" in l7_error("{kafka: [{topic: " + "a" * 250 + "}]}")
    assert l7_rules("{kafka: [{topic: " + "a" * 249 + "}]}").kafka[0].topic == "a" * 249
    assert f"{base}.kafka[0].topic: 'a/b' is not a Kafka topic" in l7_error("{kafka: [{topic: 'a/b'}]}")
    # what the Kafka proxy and the DNS proxy would refuse, policy refuses (never a config the proxy rejects)
    assert f"{base}.kafka[0]: apiKey: unknown API key 'bogus'" in l7_error("{kafka: [{apiKey: bogus}]}")
    assert f"{base}.kafka[0]: apiVersion: must be a decimal number" in l7_error("{kafka: [{apiVersion: x}]}")
    assert f"{base}.dns[0].matchPattern: 'a..b' is not a DNS name pattern: empty label" in l7_error(
        "{dns: [{matchPattern: 'a..b'}]}")
    assert f"{base}.dns[0]: exactly one of matchName and matchPattern" in l7_error(
        "{dns: [{matchName: a.com, matchPattern: '*.com'}]}"
    )
    assert f"{base}.dns[0]: exactly one of matchName and matchPattern" in l7_error("{dns: [{}]}")
    assert f"{base}.dns[0].matchName: '*.com' is not a DNS name" in l7_error("{dns: [{matchName: '*.com'}]}")
    assert f"{base}: only one L7 rule type" in l7_error("{http: [{}], dns: [{matchName: a.com}]}")
    assert f"{base}.l7proto: l7 rules need l7proto" in l7_error("{l7: [{cmd: READ}]}")


def test_dns_rules_are_egress_only_and_tofqdns_select_by_name():
    with pytest.raises(PolicyValidationError) as ei:
        parse_policies(cnp(SEL + "ingress:\n- toPorts:\n  - ports: [{port: '53', protocol: ANY}]\n"
                                 "    rules: {dns: [{matchName: a.com}]}\n"))
    assert "spec.ingress[0].toPorts[0].rules.dns: DNS rules apply to egress only" in str(ei.value)
    doc = parse_policies(cnp(SEL + "egress:\n- toFQDNs: [{matchName: API.GitHub.com.}, {matchPattern: '*.cilium.io'}]\n"
                                   "  toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n"))
    peer = doc[0].rules[0].egress[0]
    assert [str(s) for s in peer.fqdns] == ["fqdn:api.github.com", "fqdn:*.cilium.io"]
    assert peer.has_l3 and not peer.unsupported
    with pytest.raises(PolicyValidationError) as ei:
        parse_policies(cnp(SEL + "egress:\n- toFQDNs: [{matchPattern: 'a b.com'}]\n"))
    assert "spec.egress[0].toFQDNs[0].matchPattern" in str(ei.value)


def test_repository():
    repo = Repository()
    r0 = repo.revision
    docs = parse_policies(cnp(SEL))
    r1 = repo.add(docs)
    assert r1 > r0 and len(repo.docs()) == 1
    r2 = repo.add(parse_policies(cnp(SEL + "ingress: [{}]")))  # same kind/ns/name replaces
    assert r2 > r1 and len(repo.docs()) == 1 and repo.docs()[0].rules[0].has_ingress
    with pytest.raises(PolicyNotFound, match="policy 'nope' in namespace 'default' not found"):
        repo.delete("nope", "default")
    assert repo.delete("foo", "default") > r2 and repo.docs() == []
    repo.add(docs)
    assert repo.delete_all() == repo.revision and not repo.docs()
