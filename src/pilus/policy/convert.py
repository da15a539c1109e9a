"""Validated models -> internal rules (``rule.py``): Cilium's selector semantics.

Namespace restrictions (``_peer_selector``), entity and CIDR selectors, port
rules (SCTP and L7 warnings), and the Kubernetes NetworkPolicy translation.
A problem that spans fields raises ``ConversionError`` with the field path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pilus.identity.labels import K8S, LABEL_NAMESPACE, LABEL_NAMESPACE_LABELS, RESERVED
from pilus.policy.l7 import HeaderMatch, L7Rules, PortRuleDNS, PortRuleHTTP, PortRuleKafka, PortRuleL7, Secret
from pilus.policy.models import (
    CIDRRuleM,
    DefaultDenyM,
    ICMPRuleM,
    L7RulesM,
    LabelSelectorM,
    NPPeerM,
    NPPortM,
    NPSpecM,
    PortDenyRuleM,
    PortRuleM,
    RuleM,
    ServiceM,
    network,
)
from pilus.policy.rule import ICMPField, PeerRule, PortProtocol, PortRule, Rule, ServiceSelector
from pilus.policy.selector import CIDRSelector, EndpointSelector, FQDNSelector, Requirement

__all__ = ["L7_WARNING", "SCTP_WARNING", "ConversionError", "Context", "cilium_rule", "np_rule"]

SCTP_WARNING = "SCTP cannot be enforced on this kernel (no CONFIG_IP_SCTP): rule ignored"
L7_WARNING = "l7proto rules (generic L7 parsers) are not enforced: the port is allowed at L4 (all requests pass)"


class Context:
    """What conversion needs to know about the document: its namespace and name, and where warnings go."""

    def __init__(self, warn: Callable[[str, str], None], namespace: str | None, origin: str) -> None:
        self.warn = warn
        self.namespace = namespace
        self.origin = origin


def _peer_selector(ctx: Context, sel: LabelSelectorM, matches_init: bool) -> EndpointSelector:
    """Cilium's getEndpointSelector: restrict peers to the policy namespace (CNP), or to
    managed pods (CCNP: namespace label exists), unless the selector names a namespace,
    namespace labels, reserved labels, or the rule selects init endpoints."""
    es = sel.to_selector()
    if es.has_source(RESERVED) or matches_init or es.has_key(LABEL_NAMESPACE):
        return es
    if ctx.namespace is None:
        return es.with_requirements([Requirement(LABEL_NAMESPACE, K8S, "Exists")])
    if es.has_key_prefix(LABEL_NAMESPACE_LABELS):
        return es
    return es.with_requirements([Requirement(LABEL_NAMESPACE, K8S, "In", (ctx.namespace,))])


def _cidr_selectors(
    ctx: Context, path: str, cidrs: list[str] | None, sets: list[CIDRRuleM] | None
) -> tuple[list[CIDRSelector], list[str]]:
    out: list[CIDRSelector] = []
    unsupported: list[str] = []
    for c in cidrs or ():
        out.append(CIDRSelector(network(c)))
    for i, s in enumerate(sets or ()):
        if s.cidr is None:
            unsupported.append("cidrGroupRef")
            ctx.warn(
                f"{path}CIDRSet[{i}]",
                "cidrGroupRef/cidrGroupSelector (CiliumCIDRGroup) is not supported: selects nothing",
            )
            continue
        out.append(CIDRSelector(network(s.cidr), tuple(network(e) for e in s.except_ or ())))
    for sel in out:
        if sel.cidr.version == 6:
            ctx.warn(path + "CIDR", f"IPv6 prefix {sel.cidr} cannot match on this IPv4-only datapath")
    return out, unsupported


def _port_rules(
    ctx: Context, path: str, rules: list[PortRuleM] | list[PortDenyRuleM] | None, default_proto: str, egress: bool
) -> tuple[PortRule, ...]:
    out = []
    for i, pr in enumerate(rules or ()):
        p = f"{path}[{i}]"
        ports: list[PortProtocol] = []
        for j, pp in enumerate(pr.ports or ()):
            proto = pp.protocol or default_proto
            if proto == "SCTP":
                ctx.warn(f"{p}.ports[{j}]", SCTP_WARNING)
                continue
            if isinstance(pp.port, str):
                ports.append(PortProtocol(0, 0, proto, pp.port))
            else:
                port = pp.port or 0
                ports.append(PortProtocol(port, pp.endPort or 0 if port else 0, proto))
        l7 = None
        if isinstance(pr, PortRuleM):
            if pr.rules is not None:
                l7 = _l7_rules(f"{p}.rules", pr.rules)
                if l7.dns and not egress:
                    raise ConversionError(f"{p}.rules.dns",
                                          "DNS rules apply to egress only (the DNS proxy sees a pod's queries)")
                if l7.l7proto:  # http, kafka and dns rules have proxies; generic parsers do not
                    ctx.warn(f"{p}.rules", L7_WARNING)
            for extra in ("terminatingTLS", "originatingTLS", "serverNames", "listener"):
                if getattr(pr, extra) is not None:
                    ctx.warn(f"{p}.{extra}", "TLS interception / listeners are not supported yet: ignored (plain L4)")
        if pr.ports and not ports:
            # every listed port was SCTP: the port rule is ignored
            continue
        out.append(PortRule(tuple(ports), l7))
    if rules and not out:
        return (PortRule((PortProtocol(0, 0, "_NONE"),)),)  # only ignored ports: matches nothing
    return tuple(out)


class ConversionError(Exception):
    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


def _icmps(ctx: Context, path: str, icmps: list[ICMPRuleM] | None) -> tuple[ICMPField, ...]:
    out = []
    for r in icmps or ():
        for f in r.fields:
            out.append(ICMPField(int(f.type), f.family or "IPv4"))
    return tuple(out)


def _peer_rule(ctx: Context, path: str, m: Any, egress: bool, deny: bool, matches_init: bool) -> PeerRule:
    pre = "to" if egress else "from"
    eps = getattr(m, pre + "Endpoints")
    reqs = getattr(m, pre + "Requires")
    ents = getattr(m, pre + "Entities")
    cidrs, unsupported = _cidr_selectors(ctx, f"{path}.{pre}", getattr(m, pre + "CIDR"), getattr(m, pre + "CIDRSet"))
    has_cidr = getattr(m, pre + "CIDR") is not None or getattr(m, pre + "CIDRSet") is not None
    for f in ("Groups", "Nodes"):
        name = pre + f
        if getattr(m, name, None) is not None:
            unsupported.append(name)
            ctx.warn(f"{path}.{name}", f"{name} is not supported yet: it selects no peer")
    fqdns = getattr(m, "toFQDNs", None) if egress else None
    svcs = getattr(m, "toServices", None) if egress else None
    if m.toPorts and m.icmps:
        raise ConversionError(f"{path}.icmps", "icmps cannot be combined with toPorts in one rule (use two rules)")
    return PeerRule(
        endpoints=None if eps is None else tuple(_peer_selector(ctx, s, matches_init) for s in eps),
        requires=tuple(_peer_selector(ctx, s, matches_init) for s in reqs or ()),
        entities=None if ents is None else tuple(ents),
        cidrs=tuple(cidrs) if has_cidr else None,
        services=None
        if svcs is None
        else tuple(_service_selector(f"{path}.toServices[{i}]", s) for i, s in enumerate(svcs)),
        fqdns=None if fqdns is None else tuple(FQDNSelector.of(d.matchName or "", d.matchPattern or "") for d in fqdns),
        unsupported=tuple(unsupported),
        to_ports=_port_rules(ctx, f"{path}.toPorts", m.toPorts, "ANY", egress),
        icmps=_icmps(ctx, f"{path}.icmps", m.icmps),
    )


def _service_selector(path: str, m: ServiceM) -> ServiceSelector:
    """``toServices[i]``: exactly one of k8sService / k8sServiceSelector; no namespace = any."""
    if (m.k8sService is None) == (m.k8sServiceSelector is None):
        raise ConversionError(path, "exactly one of k8sService and k8sServiceSelector is required")
    if m.k8sService is not None:
        return ServiceSelector(name=m.k8sService.serviceName, namespace=m.k8sService.namespace or "")
    assert m.k8sServiceSelector is not None
    sel = m.k8sServiceSelector
    return ServiceSelector(namespace=sel.namespace or "", selector=sel.selector.to_selector())


def cilium_rule(ctx: Context, path: str, r: RuleM) -> Rule | None:
    if (r.endpointSelector is None) == (r.nodeSelector is None):
        raise ConversionError(path, "exactly one of endpointSelector and nodeSelector is required")
    if r.nodeSelector is not None:
        ctx.warn(f"{path}.nodeSelector", "host policies (nodeSelector) are not supported yet: rule ignored")
        subject = None
    else:
        assert r.endpointSelector is not None
        subject = r.endpointSelector.to_selector()
        if ctx.namespace is not None:
            # the endpointSelector always applies in the policy's namespace
            subject = EndpointSelector(
                tuple(q for q in subject.requirements if q.key != LABEL_NAMESPACE)
                + (Requirement(LABEL_NAMESPACE, K8S, "In", (ctx.namespace,)),)
            )
    matches_init = subject is not None and subject.has_key("init", RESERVED)
    ing = tuple(
        _peer_rule(ctx, f"{path}.ingress[{i}]", m, False, False, matches_init) for i, m in enumerate(r.ingress or ())
    )
    ingd = tuple(
        _peer_rule(ctx, f"{path}.ingressDeny[{i}]", m, False, True, matches_init)
        for i, m in enumerate(r.ingressDeny or ())
    )
    eg = tuple(
        _peer_rule(ctx, f"{path}.egress[{i}]", m, True, False, matches_init) for i, m in enumerate(r.egress or ())
    )
    egd = tuple(
        _peer_rule(ctx, f"{path}.egressDeny[{i}]", m, True, True, matches_init)
        for i, m in enumerate(r.egressDeny or ())
    )
    has_in = bool(r.ingress) or bool(r.ingressDeny)
    has_eg = bool(r.egress) or bool(r.egressDeny)
    dd = r.enableDefaultDeny or DefaultDenyM()
    return Rule(
        subject=subject,
        ingress=ing,
        ingress_deny=ingd,
        egress=eg,
        egress_deny=egd,
        has_ingress=has_in,
        has_egress=has_eg,
        default_deny_ingress=has_in if dd.ingress is None else (has_in and dd.ingress),
        default_deny_egress=has_eg if dd.egress is None else (has_eg and dd.egress),
        namespace=ctx.namespace,
        origin=ctx.origin,
        description=r.description or "",
    )


def _np_peer(ctx: Context, peer: NPPeerM, path: str) -> tuple[list[EndpointSelector], list[CIDRSelector]]:
    if peer.ipBlock is not None:
        b = peer.ipBlock
        # matches every address it covers, pods included (not Cilium's CIDR semantics)
        sel = CIDRSelector(network(b.cidr), tuple(network(e) for e in b.except_ or ()), ipblock=True)
        if sel.cidr.version == 6:
            ctx.warn(path + ".ipBlock", f"IPv6 prefix {sel.cidr} cannot match on this IPv4-only datapath")
        return [], [sel]
    if peer.podSelector is None and peer.namespaceSelector is None:
        raise ConversionError("", "a peer needs podSelector, namespaceSelector or ipBlock")
    reqs: list[Requirement] = []
    if peer.podSelector is not None:
        reqs += peer.podSelector.to_selector(K8S).requirements
    if peer.namespaceSelector is not None:
        ns = peer.namespaceSelector.to_selector(K8S)
        reqs += [Requirement(LABEL_NAMESPACE_LABELS + q.key, K8S, q.operator, q.values) for q in ns.requirements]
        # only pods (managed endpoints) are in a namespace; makes NotIn / DoesNotExist safe
        reqs.append(Requirement(LABEL_NAMESPACE, K8S, "Exists"))
    else:
        assert ctx.namespace is not None
        reqs.append(Requirement(LABEL_NAMESPACE, K8S, "In", (ctx.namespace,)))
    return [EndpointSelector(tuple(reqs))], []


def np_rule(ctx: Context, spec: NPSpecM) -> Rule:
    types = spec.policyTypes
    if not types:
        types = ["Ingress"] + (["Egress"] if spec.egress else [])
    subject = spec.podSelector.to_selector(K8S)
    subject = EndpointSelector(
        tuple(q for q in subject.requirements if q.key != LABEL_NAMESPACE)
        + (Requirement(LABEL_NAMESPACE, K8S, "In", (ctx.namespace or "default",)),)
    )

    def peers(path: str, items: list[NPPeerM] | None, ports: list[NPPortM] | None, egress: bool) -> PeerRule:
        conv = (
            [
                PortRule(
                    tuple(
                        PortProtocol(0, 0, p.protocol or "TCP", p.port)
                        if isinstance(p.port, str)
                        else PortProtocol(p.port or 0, p.endPort or 0, p.protocol or "TCP")
                        for p in ports
                        if (p.protocol or "TCP") != "SCTP" or ctx.warn(path + ".ports", SCTP_WARNING)
                    )
                )
            ]
            if ports
            else []
        )
        if ports and not conv[0].ports:
            conv = [PortRule((PortProtocol(0, 0, "_NONE"),))]
        if not items:
            return PeerRule(entities=("all",), to_ports=tuple(conv))
        eps: list[EndpointSelector] = []
        cidrs: list[CIDRSelector] = []
        for i, pe in enumerate(items):
            where = f"{path}.{'to' if egress else 'from'}[{i}]"
            try:
                e, c = _np_peer(ctx, pe, where)
            except ConversionError as err:
                raise ConversionError(where, err.reason) from None
            eps += e
            cidrs += c
        return PeerRule(endpoints=tuple(eps), cidrs=tuple(cidrs), to_ports=tuple(conv))

    ing = tuple(peers(f"spec.ingress[{i}]", r.from_, r.ports, False) for i, r in enumerate(spec.ingress or ()))
    eg = tuple(peers(f"spec.egress[{i}]", r.to, r.ports, True) for i, r in enumerate(spec.egress or ()))
    has_in, has_eg = "Ingress" in types, "Egress" in types
    if not has_in and spec.ingress:
        ctx.warn("spec.ingress", "ignored: Ingress is not in policyTypes")
    if not has_eg and spec.egress:
        ctx.warn("spec.egress", "ignored: Egress is not in policyTypes")
    return Rule(
        subject=subject,
        ingress=ing if has_in else (),
        egress=eg if has_eg else (),
        has_ingress=has_in,
        has_egress=has_eg,
        default_deny_ingress=has_in,
        default_deny_egress=has_eg,
        namespace=ctx.namespace,
        origin=ctx.origin,
    )


def _l7_rules(path: str, m: L7RulesM) -> L7Rules:
    kinds = [k for k in ("http", "kafka", "dns", "l7") if getattr(m, k)]
    if len(kinds) > 1:
        raise ConversionError(path, "only one L7 rule type (http, kafka, dns or l7) per port rule")
    if m.l7 and not m.l7proto:
        raise ConversionError(f"{path}.l7proto", "l7 rules need l7proto")
    return L7Rules(
        http=tuple(
            PortRuleHTTP(
                h.method or "",
                h.path or "",
                h.host or "",
                tuple(h.headers or ()),
                tuple(
                    HeaderMatch(
                        hm.name,
                        hm.value,
                        Secret(hm.secret.namespace, hm.secret.name) if hm.secret else None,
                        hm.mismatch or "",
                    )
                    for hm in h.headerMatches or ()
                ),
            )
            for h in m.http or ()
        ),
        kafka=tuple(
            PortRuleKafka(k.role or "", k.apiKey or "", k.apiVersion or "", k.clientID or "", k.topic or "")
            for k in m.kafka or ()
        ),
        dns=tuple(PortRuleDNS(d.matchName or "", d.matchPattern or "") for d in m.dns or ()),
        l7proto=m.l7proto or "",
        l7=tuple(PortRuleL7(tuple(sorted(r.items()))) for r in m.l7 or ()),
    )
