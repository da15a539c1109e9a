# ruff: noqa: E501  (table rows of inline YAML read better on one line)
"""toServices (CNP egress): selects the backends of the matching services.

Selector services -> the pods the service selects (its selector AND its namespace);
services with explicit backends -> CIDR /32 identities of the backend IPs. Any port
unless the same rule element has toPorts. Verdicts go through the engine's map entries
and the independent datapath-style lookup of pilus_policy_testlib.
"""

from __future__ import annotations

import ipaddress
import sys
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from pilus_policy_testlib import Cluster

from pilus.identity.labels import Label, Labels
from pilus.policy import PolicyEngine, PolicyValidationError, ServiceRef, parse_policies

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/unit: lb_fakes


def cnp(body: str, name: str = "p", ns: str = "default") -> str:
    lines = "\n".join("  " + ln for ln in body.strip("\n").splitlines())
    return f"---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{lines}\n"


def egress(*peers: str, to_ports: str = "") -> str:
    """A policy for app=client pods whose one egress element has these toServices items."""
    items = "\n".join(f"  - {p}" for p in peers)
    tp = f"\n  toPorts: {to_ports}" if to_ports else ""
    return f"endpointSelector: {{matchLabels: {{app: client}}}}\negress:\n- toServices:\n{items}{tp}"


WEB = ServiceRef(labels={"tier": "frontend", "team": "a"}, selector={"app": "web"})
DB = ServiceRef(labels={"tier": "backend", "team": "a"}, selector={"app": "db"})
EXT = ServiceRef(labels={"tier": "external"}, selector=None, backend_ips=[IPv4Address("203.0.113.5"), IPv4Address("203.0.113.6")])
OTHER_WEB = ServiceRef(labels={"tier": "frontend"}, selector={"app": "web"})

SERVICES = {
    ("default", "web"): WEB,
    ("default", "db"): DB,
    ("default", "ext"): EXT,
    ("other", "web"): OTHER_WEB,
}


class SvcCluster(Cluster):
    """Cluster + services; CIDR identities follow cidr_prefixes() after every change."""

    def set_services(self, services) -> None:
        self.eng.set_services(services)
        self.refresh_cidrs()

    def set_policies(self, yaml_text: str) -> None:
        super().set_policies(yaml_text)
        self.refresh_cidrs()

    def refresh_cidrs(self) -> None:
        for pfx in self.eng.cidr_prefixes():
            if pfx not in self.cidr_ids:
                i = (1 << 24) | (len(self.cidr_ids) + 1)
                self.cidr_ids[pfx] = i
                lbls = Labels([Label("cidr", str(pfx)), Label("reserved", "world")])
                self.labels[i] = lbls
                self.eng.upsert_identity(i, lbls)


def world(policy: str, services=SERVICES) -> SvcCluster:
    c = SvcCluster()
    c.set_services(services)
    c.pod("client", app="client")
    c.pod("web1", app="web")
    c.pod("web2", app="web", version="v2")
    c.pod("db", app="db")
    c.pod("cache", app="cache")
    c.pod("web-other", ns="other", app="web")
    c.pod("db-other", ns="other", app="db")
    c.set_policies(cnp(policy))
    return c


TARGETS = ("web1", "web2", "db", "cache", "web-other", "db-other", "203.0.113.5", "203.0.113.6", "203.0.113.7")


def allowed(c: Cluster, port: int = 8080, proto: str = "TCP") -> set[str]:
    return {t for t in TARGETS if c.verdict("client", t, port, proto) == "allowed"}


# policy (toServices items)  ->  the targets the client may reach (TCP 8080)
TABLE = [
    # by name and namespace: the pods the service selects, in the service's namespace
    (egress("k8sService: {serviceName: web, namespace: default}"), {"web1", "web2"}),
    (egress("k8sService: {serviceName: db, namespace: default}"), {"db"}),
    (egress("k8sService: {serviceName: web, namespace: other}"), {"web-other"}),
    # namespace omitted: the service of that name in every namespace (Cilium)
    (egress("k8sService: {serviceName: web}"), {"web1", "web2", "web-other"}),
    # no such service (yet): nothing, never "any peer"
    (egress("k8sService: {serviceName: nope, namespace: default}"), set()),
    (egress("k8sService: {serviceName: db, namespace: nope}"), set()),
    # explicit backends: CIDR /32 of each backend IP (not the rest of the prefix)
    (egress("k8sService: {serviceName: ext, namespace: default}"), {"203.0.113.5", "203.0.113.6"}),
    # by the services' metadata labels
    (egress("k8sServiceSelector: {selector: {matchLabels: {tier: frontend}}, namespace: default}"), {"web1", "web2"}),
    (egress("k8sServiceSelector: {selector: {matchLabels: {tier: frontend}}}"), {"web1", "web2", "web-other"}),
    (egress("k8sServiceSelector: {selector: {matchLabels: {team: a}}, namespace: default}"), {"web1", "web2", "db"}),
    (egress("k8sServiceSelector: {selector: {matchExpressions: [{key: tier, operator: In, values: [backend, external]}]}}"), {"db", "203.0.113.5", "203.0.113.6"}),
    (egress("k8sServiceSelector: {selector: {matchLabels: {k8s:tier: frontend}}, namespace: other}"), {"web-other"}),
    (egress("k8sServiceSelector: {selector: {matchLabels: {tier: nope}}}"), set()),
    # the service's pod selector labels are not its metadata labels
    (egress("k8sServiceSelector: {selector: {matchLabels: {app: web}}}"), set()),
    # several items: union
    (egress("k8sService: {serviceName: db, namespace: default}", "k8sService: {serviceName: ext, namespace: default}"), {"db", "203.0.113.5", "203.0.113.6"}),
]


@pytest.mark.parametrize(("policy", "expected"), TABLE)
def test_truth_table(policy, expected):
    c = world(policy)
    assert allowed(c) == expected
    # any port and protocol: Cilium's toServices has no port restriction of its own
    assert allowed(c, 53, "UDP") == expected
    assert allowed(c, 1, "ICMP") == expected
    pol = c.eng.policy_for(c.ids["client"])
    assert pol.egress_enforced and not pol.ingress_enforced


def test_to_ports_in_the_same_element_restricts_ports():
    c = world(egress("k8sService: {serviceName: web, namespace: default}", to_ports="[{ports: [{port: '8080', protocol: TCP}]}]"))
    assert allowed(c, 8080) == {"web1", "web2"}
    assert allowed(c, 8081) == set()
    assert allowed(c, 8080, "UDP") == set()


def test_policy_namespace_does_not_restrict_the_service_namespace():
    """A CNP in namespace prod names default/web: its backends are in default."""
    c = SvcCluster()
    c.set_services(SERVICES)
    c.pod("client", ns="prod", app="client")
    c.pod("web1", app="web")
    c.pod("web-prod", ns="prod", app="web")
    c.set_policies(cnp(egress("k8sService: {serviceName: web, namespace: default}"), ns="prod"))
    assert c.verdict("client", "web1", 80) == "allowed"
    assert c.verdict("client", "web-prod", 80) == "denied"


def test_to_requires_applies_to_selector_services():
    c = world(egress("k8sService: {serviceName: web, namespace: default}") + "\n  toRequires: [{matchLabels: {version: v2}}]")
    assert allowed(c) == {"web2"}


def test_cidr_prefixes_name_explicit_backends_only_when_a_rule_selects_the_service():
    c = world(egress("k8sService: {serviceName: web, namespace: default}"))
    assert c.eng.cidr_prefixes() == set()
    c.set_policies(cnp(egress("k8sServiceSelector: {selector: {matchLabels: {tier: external}}}")))
    assert c.eng.cidr_prefixes() == {ipaddress.ip_network("203.0.113.5/32"), ipaddress.ip_network("203.0.113.6/32")}


def test_service_added_after_the_policy():
    c = world(egress("k8sService: {serviceName: web, namespace: default}", "k8sService: {serviceName: ext, namespace: default}"), services={})
    client = c.ids["client"]
    assert allowed(c) == set()
    c.eng.policy_for(client)
    assert c.eng.changed_endpoints() == set()
    c.set_services({("default", "web"): WEB})
    assert c.eng.changed_endpoints() == {client}
    assert allowed(c) == {"web1", "web2"}
    c.set_services({("default", "web"): WEB, ("default", "ext"): EXT})
    assert allowed(c) == {"web1", "web2", "203.0.113.5", "203.0.113.6"}
    # a pod the service selects appears later: incremental, like any selector
    web3 = c.pod("web3", app="web")
    assert c.verdict("client", "web3", 80) == "allowed"
    assert web3 != client


def test_service_deleted_and_changed():
    c = world(egress("k8sService: {serviceName: web, namespace: default}", "k8sService: {serviceName: ext, namespace: default}"))
    assert allowed(c) == {"web1", "web2", "203.0.113.5", "203.0.113.6"}
    rest = {k: v for k, v in SERVICES.items() if k != ("default", "web")}
    c.set_services(rest)
    assert allowed(c) == {"203.0.113.5", "203.0.113.6"}
    # the service's selector changes: it now selects the cache pods
    c.set_services({**rest, ("default", "web"): ServiceRef(WEB.labels, {"app": "cache"})})
    assert allowed(c) == {"cache", "203.0.113.5", "203.0.113.6"}
    # explicit backends change
    c.set_services({**rest, ("default", "ext"): ServiceRef({}, None, [IPv4Address("203.0.113.7")])})
    assert allowed(c) == {"203.0.113.7"}
    c.set_services({})
    assert allowed(c) == set()
    assert c.eng.cidr_prefixes() == set()


def test_service_changes_recompute_only_endpoints_whose_rules_name_them():
    c = world(egress("k8sService: {serviceName: web, namespace: default}"))
    c.set_policies(
        cnp(egress("k8sService: {serviceName: web, namespace: default}"))
        + cnp("endpointSelector: {matchLabels: {app: cache}}\negress:\n- toServices:\n  - k8sService: {serviceName: db, namespace: default}", name="q")
        + cnp("endpointSelector: {matchLabels: {app: db}}\negress:\n- toEndpoints: [{}]", name="r")
    )
    for ep in c.local:
        c.eng.policy_for(ep)
    full = c.eng.stats["full"]
    c.set_services({**SERVICES, ("default", "db"): ServiceRef(DB.labels, {"app": "web"})})
    assert c.eng.changed_endpoints() == {c.ids["cache"]}
    assert c.eng.stats["full"] == full + 1
    assert c.verdict("cache", "web1", 80) == "allowed"
    assert c.verdict("cache", "db", 80) == "denied"
    # an unchanged set changes nothing
    c.set_services({**SERVICES, ("default", "db"): ServiceRef(DB.labels, {"app": "web"})})
    assert c.eng.changed_endpoints() == set()


def test_incremental_equals_full_recompute():
    policy = egress(
        "k8sServiceSelector: {selector: {matchLabels: {team: a}}}",
        "k8sService: {serviceName: ext}",
    )
    steps = [
        {},
        {("default", "web"): WEB},
        {("default", "web"): WEB, ("default", "ext"): EXT},
        SERVICES,
        {("default", "db"): DB, ("default", "ext"): EXT},
        {("default", "db"): ServiceRef({"team": "b"}, {"app": "db"}), ("default", "ext"): EXT},
    ]
    c = world(policy, services={})
    client = c.ids["client"]
    for services in steps:
        c.set_services(services)
        fresh = world(policy, services=services)
        # same pods, same ids; CIDR identities may be numbered differently: compare by target
        assert allowed(c) == allowed(fresh)
        assert c.eng.policy_for(client).egress_enforced


def test_trace_names_the_rule():
    c = world(egress("k8sService: {serviceName: web, namespace: default}"))
    res = c.eng.trace(c.labels[c.ids["client"]], c.labels[c.ids["web1"]], 8080, 6)
    assert res.verdict == "ALLOWED"
    assert res.egress.allowed_by == ["CiliumNetworkPolicy default/p (egress)"]
    res = c.eng.trace(c.labels[c.ids["client"]], c.labels[c.ids["db"]], 8080, 6)
    assert res.verdict == "DENIED"


def test_no_warning_any_more_and_validation():
    docs = parse_policies(cnp(egress("k8sService: {serviceName: web, namespace: default}")))
    assert docs[0].warnings == []
    bad = {
        "k8sService: {serviceName: web}\n    k8sServiceSelector: {selector: {matchLabels: {a: b}}}": "exactly one of k8sService and k8sServiceSelector",
        "{}": "exactly one of k8sService and k8sServiceSelector",
        "k8sService: {serviceName: Web_1}": "serviceName",
        "k8sService: {namespace: default}": "serviceName",
        "k8sService: {serviceName: web, name: x}": "name",
        "k8sServiceSelector: {namespace: default}": "selector",
        "k8sServiceSelector: {selector: {matchLabels: {'bad key!': x}}}": "bad label key",
    }
    for item, why in bad.items():
        with pytest.raises(PolicyValidationError) as exc:
            parse_policies(cnp(egress(item)))
        assert "toServices[0]" in str(exc.value) and why in str(exc.value), str(exc.value)
    # toServices exists only in egress (allow) rules
    for section in ("ingress", "egressDeny"):
        with pytest.raises(PolicyValidationError, match="toServices"):
            parse_policies(cnp(f"endpointSelector: {{}}\n{section}:\n- toServices: [{{k8sService: {{serviceName: web}}}}]"))


def test_empty_to_services_selects_nothing():
    c = world("endpointSelector: {matchLabels: {app: client}}\negress:\n- toServices: []")
    assert allowed(c) == set()
    assert c.eng.policy_for(c.ids["client"]).egress_enforced


def test_service_ref_normalization():
    eng = PolicyEngine()
    eng.set_services({("default", "x"): ServiceRef({"a": "b"}, {}, ["10.0.0.2", IPv4Address("10.0.0.1"), "10.0.0.2"])})
    ref = eng.services()[("default", "x")]
    assert ref.selector is None  # an empty selector selects no pods (as Kubernetes)
    assert list(ref.backend_ips) == [IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")]


# -- the agent's side: ServiceManager change hook -> engine input -----------------------------


def test_service_manager_hook_and_service_refs():
    from lb_fakes import FakeDatapath

    from pilus.endpoint.policy_sync import service_refs
    from pilus.loadbalancer.manager import ServiceManager

    seen: list[dict] = []
    mgr = ServiceManager(FakeDatapath(), known_networks=[ipaddress.ip_network("10.200.0.0/16")])
    mgr.subscribe(lambda services: seen.append(service_refs(services)))
    mgr.apply_yaml("""
kind: Service
metadata: {name: web, namespace: default, labels: {tier: frontend}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
kind: Service
metadata: {name: ext, namespace: default}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
kind: Endpoints
metadata: {name: ext, namespace: default}
subsets: [{addresses: [{ip: 10.200.9.5}, {ip: 10.200.9.6}], ports: [{port: 80}]}]
""")
    assert seen[-1] == {
        ("default", "web"): ServiceRef({"tier": "frontend"}, {"app": "web"}, []),
        ("default", "ext"): ServiceRef({}, None, [IPv4Address("10.200.9.5"), IPv4Address("10.200.9.6")]),
    }
    eng = PolicyEngine()
    eng.set_services(seen[-1])
    assert eng.services()[("default", "web")].labels == {"tier": "frontend"}
    n = len(seen)
    mgr.set_endpoints([])  # backends of selector services follow endpoints: not a service change
    assert len(seen) == n
    mgr.delete("default", "web")
    assert set(seen[-1]) == {("default", "ext")}
    # metadata.labels round-trip through the saved documents
    svc = mgr.get("default", "ext")
    assert svc.to_json()["labels"] == {}
    from pilus.loadbalancer.model import parse_documents

    (web,) = parse_documents("kind: Service\nmetadata: {name: w, labels: {tier: x}}\nspec: {clusterIP: 10.96.0.12, selector: {app: w}, ports: [{port: 80}]}")
    assert web.labels == {"tier": "x"}
    assert parse_documents(__import__("json").dumps(web.to_k8s()))[0].labels == {"tier": "x"}
