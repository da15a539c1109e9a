"""Parse and validate CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
Kubernetes NetworkPolicy documents into :class:`PolicyDoc` s of internal rules.

All-or-nothing: :func:`parse_policies` either returns every document or raises
:class:`PolicyValidationError` listing every problem found, each with the document
index, the field path and the reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from pilus import manifests
from pilus.identity.labels import ANY, K8S, LABEL_NAMESPACE, LABEL_NAMESPACE_LABELS, RESERVED, Label, LabelError
from pilus.policy.rule import (
    ENTITIES,
    ICMP4_TYPES,
    ICMP6_TYPES,
    ICMPField,
    PeerRule,
    PortProtocol,
    PortRule,
    Rule,
    ServiceSelector,
)
from pilus.policy.selector import OPERATORS, CIDRSelector, EndpointSelector, Requirement, SelectorError, split_key

__all__ = [
    "KIND_CCNP",
    "KIND_CNP",
    "KIND_KNP",
    "SCTP_WARNING",
    "PolicyDoc",
    "PolicyValidationError",
    "ValidationIssue",
    "parse_policies",
    "parse_policy_objects",
]

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
KIND_KNP = "NetworkPolicy"
API_VERSIONS = {KIND_CNP: ("cilium.io/v2",), KIND_CCNP: ("cilium.io/v2",), KIND_KNP: ("networking.k8s.io/v1",)}

SCTP_WARNING = "SCTP cannot be enforced on this kernel (no CONFIG_IP_SCTP): rule ignored"
L7_WARNING = (
    "L7 rules are accepted but not enforced yet: the port is allowed at L4 (all requests pass) until the L7 proxy lands"
)


@dataclass(frozen=True)
class ValidationIssue:
    doc_index: int
    path: str
    reason: str
    doc: str = ""  # "CiliumNetworkPolicy default/foo" when known

    def __str__(self) -> str:
        where = f"document {self.doc_index}" + (f" ({self.doc})" if self.doc else "")
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class PolicyValidationError(Exception):
    def __init__(self, errors: list[ValidationIssue]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


@dataclass(frozen=True)
class PolicyDoc:
    kind: str
    name: str
    namespace: str | None
    rules: tuple[Rule, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    warnings: list[str] = field(default_factory=list, compare=False)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def origin(self) -> str:
        return _origin(self.kind, self.namespace, self.name)


def _origin(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


# ---------------------------------------------------------------------------
# field checks (raise ValueError with the reason; pydantic attaches the path)

_SVC_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _named_port(s: str) -> str | None:
    """IANA service name (as Kubernetes container port names) or None."""
    s2 = s.lower()
    if 1 <= len(s2) <= 15 and _SVC_NAME_RE.match(s2) and "--" not in s2 and re.search("[a-z]", s2):
        return s2
    return None


def _check_port(v: Any, *, lo: int, named: bool = True) -> int | str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError("must be a port number or a port name")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and v.strip().isdigit():
        n = int(v.strip())
    elif isinstance(v, str) and named:
        name = _named_port(v.strip())
        if name is None:
            raise ValueError(
                f"{v!r} is neither a port number nor a valid port name "
                "(at most 15 of [a-z0-9-], with a letter, no leading, trailing or double '-')"
            )
        return name
    else:
        raise ValueError("must be a port number" + (" or a port name" if named else ""))
    if not lo <= n <= 65535:
        raise ValueError(f"must be {lo}-65535")
    return n


def _check_cidr(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a CIDR string like 10.0.0.0/8")
    try:
        if "/" not in v:
            ipaddress.ip_address(v)  # a plain IP is a /32 (Cilium accepts it)
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not a valid CIDR (like 10.0.0.0/8)") from None
    return v


def _net(v: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(v, strict=False)


def _check_label_key(k: str) -> None:
    src, key = split_key(k)
    try:
        if src == "cidr":
            Label(src, key)
        else:
            Label(src if src != ANY else K8S, key)
    except LabelError as e:
        raise ValueError(f"bad label key {k!r}: {str(e).split(': ', 1)[-1]}") from None


def _check_label_value(k: str, v: str) -> None:
    if v == "":
        return
    try:
        Label(K8S, "x", v)
    except LabelError as e:
        raise ValueError(f"bad value {v!r} for {k!r}: {str(e).split(': ', 1)[-1]}") from None


def _check_regex(v: str | None) -> str | None:
    if v is None:
        return v
    try:
        re.compile(v)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    return v


# ---------------------------------------------------------------------------
# pydantic models (structure + field-local checks)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class SelectorRequirementM(_M):
    key: str
    operator: str
    values: list[str] | None = Field(default=None, validate_default=True)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        _check_label_key(v)
        return v

    @field_validator("operator")
    @classmethod
    def _op(cls, v: str) -> str:
        if v not in OPERATORS:
            raise ValueError(f"unknown operator {v!r} (In, NotIn, Exists, DoesNotExist)")
        return v

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str] | None, info: Any) -> list[str] | None:
        op = info.data.get("operator")
        if op in ("In", "NotIn") and not v:
            raise ValueError(f"operator {op} needs a non-empty values list")
        if op in ("Exists", "DoesNotExist") and v:
            raise ValueError(f"operator {op} takes no values")
        for x in v or ():
            _check_label_value(info.data.get("key", ""), x)
        return v


class LabelSelectorM(_M):
    matchLabels: dict[str, str] | None = None
    matchExpressions: list[SelectorRequirementM] | None = None

    @field_validator("matchLabels")
    @classmethod
    def _ml(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for k, val in (v or {}).items():
            _check_label_key(k)
            _check_label_value(k, val)
        return v

    def to_selector(self, default_source: str = ANY) -> EndpointSelector:
        return EndpointSelector.from_k8s(
            self.matchLabels,
            [e.model_dump() for e in self.matchExpressions or ()],
            default_source,
        )


class CIDRRuleM(_M):
    cidr: str | None = None
    except_: list[str] | None = Field(default=None, alias="except")
    cidrGroupRef: str | None = None
    cidrGroupSelector: LabelSelectorM | None = None

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, v: str | None) -> str | None:
        return None if v is None else _check_cidr(v)

    @field_validator("except_")
    @classmethod
    def _except(cls, v: list[str] | None, info: Any) -> list[str] | None:
        outer = info.data.get("cidr")
        for i, e in enumerate(v or ()):
            try:
                _check_cidr(e)
            except ValueError as err:
                raise ValueError(f"[{i}]: {err}") from None
            if outer is not None:
                o, n = _net(outer), _net(e)
                if o.version != n.version or not n.subnet_of(o):  # type: ignore[arg-type]
                    raise ValueError(f"[{i}]: {e} is not inside cidr {outer}")
        return v


class PortProtocolM(_M):
    port: Any = None
    endPort: int | None = None
    protocol: str | None = None

    @field_validator("port")
    @classmethod
    def _port(cls, v: Any) -> Any:
        return _check_port(v, lo=0)

    @field_validator("endPort")
    @classmethod
    def _end(cls, v: int | None, info: Any) -> int | None:
        if v is None:
            return v
        if not 0 <= v <= 65535:
            raise ValueError("must be 0-65535")
        p = info.data.get("port")
        if isinstance(p, str):
            raise ValueError("endPort cannot be used with a named port")
        if v and not p:
            raise ValueError("endPort needs a non-zero port")
        if p and v and v < p:
            raise ValueError(f"must be >= port ({p})")
        return v

    @field_validator("protocol")
    @classmethod
    def _proto(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if v.upper() not in ("TCP", "UDP", "SCTP", "ANY"):
            raise ValueError(f"unsupported protocol {v!r} (TCP, UDP, SCTP, ANY)")
        return v.upper()


class HeaderMatchM(_M):
    name: str
    value: str | None = None
    mismatch: str | None = None
    secret: dict[str, str] | None = None

    @field_validator("mismatch")
    @classmethod
    def _mm(cls, v: str | None) -> str | None:
        if v not in (None, "", "LOG", "ADD", "DELETE", "REPLACE"):
            raise ValueError("must be LOG, ADD, DELETE or REPLACE")
        return v


class HTTPRuleM(_M):
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: list[str] | None = None
    headerMatches: list[HeaderMatchM] | None = None

    _re = field_validator("method", "path", "host")(classmethod(lambda cls, v: _check_regex(v)))


class KafkaRuleM(_M):
    role: str | None = None
    apiKey: str | None = None
    apiVersion: str | None = None
    clientID: str | None = None
    topic: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str | None) -> str | None:
        if v not in (None, "", "produce", "consume"):
            raise ValueError("must be produce or consume")
        return v

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is not None and len(v) > 255:
            raise ValueError("at most 255 characters")
        return v


def _check_dns_label(v: str) -> str:
    if not isinstance(v, str) or len(v) > 63 or not _DNS1123_LABEL.match(v):
        raise ValueError(f"must be a DNS label (at most 63 of [a-z0-9-], alphanumeric at both ends), got {v!r}")
    return v


class K8sServiceM(_M):
    serviceName: str
    namespace: str | None = None

    _n = field_validator("serviceName")(classmethod(lambda cls, v: _check_dns_label(v)))
    _ns = field_validator("namespace")(classmethod(lambda cls, v: None if v in (None, "") else _check_dns_label(v)))


class K8sServiceSelectorM(_M):
    selector: LabelSelectorM
    namespace: str | None = None

    _ns = field_validator("namespace")(classmethod(lambda cls, v: None if v in (None, "") else _check_dns_label(v)))


class ServiceM(_M):
    k8sService: K8sServiceM | None = None
    k8sServiceSelector: K8sServiceSelectorM | None = None


class DNSRuleM(_M):
    matchName: str | None = None
    matchPattern: str | None = None

    @field_validator("matchName", "matchPattern")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[-a-zA-Z0-9_.*]+$", v):
            raise ValueError(f"{v!r} is not a DNS name or pattern")
        return v


class L7RulesM(_M):
    http: list[HTTPRuleM] | None = None
    kafka: list[KafkaRuleM] | None = None
    dns: list[DNSRuleM] | None = None
    l7proto: str | None = None
    l7: list[dict[str, str]] | None = None

    @field_validator("l7")
    @classmethod
    def _one(cls, v: Any, info: Any) -> Any:
        return v


class TLSContextM(_M):
    secret: dict[str, str] | None = None
    trustedCA: str | None = None
    certificate: str | None = None
    privateKey: str | None = None


class ListenerM(_M):
    envoyConfig: dict[str, str]
    name: str
    priority: int | None = None


class PortRuleM(_M):
    ports: list[PortProtocolM] | None = None
    rules: L7RulesM | None = None
    terminatingTLS: TLSContextM | None = None
    originatingTLS: TLSContextM | None = None
    serverNames: list[str] | None = None
    listener: ListenerM | None = None

    @field_validator("ports")
    @classmethod
    def _max(cls, v: list[PortProtocolM] | None) -> list[PortProtocolM] | None:
        if v is not None and len(v) > 40:
            raise ValueError("at most 40 ports per port rule")
        return v


class PortDenyRuleM(_M):
    ports: list[PortProtocolM] | None = None


class ICMPFieldM(_M):
    family: str | None = None
    type: Any

    @field_validator("family")
    @classmethod
    def _fam(cls, v: str | None) -> str | None:
        if v not in (None, "", "IPv4", "IPv6"):
            raise ValueError("must be IPv4 or IPv6")
        return v

    @field_validator("type")
    @classmethod
    def _type(cls, v: Any, info: Any) -> Any:
        fam = info.data.get("family") or "IPv4"
        names = ICMP6_TYPES if fam == "IPv6" else ICMP4_TYPES
        if isinstance(v, bool):
            raise ValueError("must be an ICMP type number or name")
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            n = int(v)
            if not 0 <= n <= 255:
                raise ValueError("must be 0-255")
            return n
        if isinstance(v, str) and v in names:
            return names[v]
        raise ValueError(f"unknown {fam} ICMP type {v!r} (a number 0-255 or one of {', '.join(names)})")


class ICMPRuleM(_M):
    fields: list[ICMPFieldM]

    @field_validator("fields")
    @classmethod
    def _max(cls, v: list[ICMPFieldM]) -> list[ICMPFieldM]:
        if len(v) > 40:
            raise ValueError("at most 40 ICMP fields")
        return v


class AuthenticationM(_M):
    mode: str

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v == "disabled":
            return v
        if v in ("required", "test-always-fail"):
            raise ValueError(f"authentication mode {v!r} (mutual authentication) is not supported by pilus")
        raise ValueError("must be disabled, required or test-always-fail")


def _entities(v: list[str] | None) -> list[str] | None:
    for i, e in enumerate(v or ()):
        if e not in ENTITIES:
            raise ValueError(f"[{i}]: unknown entity {e!r} (known: {', '.join(ENTITIES)})")
    return v


def _cidrs(v: list[str] | None) -> list[str] | None:
    for i, c in enumerate(v or ()):
        try:
            _check_cidr(c)
        except ValueError as e:
            raise ValueError(f"[{i}]: {e}") from None
    return v


class _PeerM(_M):
    icmps: list[ICMPRuleM] | None = None
    authentication: AuthenticationM | None = None


class IngressM(_PeerM):
    fromEndpoints: list[LabelSelectorM] | None = None
    fromRequires: list[LabelSelectorM] | None = None
    fromCIDR: list[str] | None = None
    fromCIDRSet: list[CIDRRuleM] | None = None
    fromEntities: list[str] | None = None
    fromGroups: list[dict[str, Any]] | None = None
    fromNodes: list[LabelSelectorM] | None = None
    toPorts: list[PortRuleM] | None = None

    _e = field_validator("fromEntities")(classmethod(lambda cls, v: _entities(v)))
    _c = field_validator("fromCIDR")(classmethod(lambda cls, v: _cidrs(v)))


class IngressDenyM(_PeerM):
    fromEndpoints: list[LabelSelectorM] | None = None
    fromRequires: list[LabelSelectorM] | None = None
    fromCIDR: list[str] | None = None
    fromCIDRSet: list[CIDRRuleM] | None = None
    fromEntities: list[str] | None = None
    toPorts: list[PortDenyRuleM] | None = None

    _e = field_validator("fromEntities")(classmethod(lambda cls, v: _entities(v)))
    _c = field_validator("fromCIDR")(classmethod(lambda cls, v: _cidrs(v)))


class EgressM(_PeerM):
    toEndpoints: list[LabelSelectorM] | None = None
    toRequires: list[LabelSelectorM] | None = None
    toCIDR: list[str] | None = None
    toCIDRSet: list[CIDRRuleM] | None = None
    toEntities: list[str] | None = None
    toServices: list[ServiceM] | None = None
    toFQDNs: list[DNSRuleM] | None = None
    toGroups: list[dict[str, Any]] | None = None
    toNodes: list[LabelSelectorM] | None = None
    toPorts: list[PortRuleM] | None = None

    _e = field_validator("toEntities")(classmethod(lambda cls, v: _entities(v)))
    _c = field_validator("toCIDR")(classmethod(lambda cls, v: _cidrs(v)))


class EgressDenyM(_PeerM):
    toEndpoints: list[LabelSelectorM] | None = None
    toRequires: list[LabelSelectorM] | None = None
    toCIDR: list[str] | None = None
    toCIDRSet: list[CIDRRuleM] | None = None
    toEntities: list[str] | None = None
    toPorts: list[PortDenyRuleM] | None = None

    _e = field_validator("toEntities")(classmethod(lambda cls, v: _entities(v)))
    _c = field_validator("toCIDR")(classmethod(lambda cls, v: _cidrs(v)))


class DefaultDenyM(_M):
    ingress: StrictBool | None = None
    egress: StrictBool | None = None


class RuleLabelM(_M):
    key: str
    value: str | None = None
    source: str | None = None


class RuleM(_M):
    endpointSelector: LabelSelectorM | None = None
    nodeSelector: LabelSelectorM | None = None
    ingress: list[IngressM] | None = None
    ingressDeny: list[IngressDenyM] | None = None
    egress: list[EgressM] | None = None
    egressDeny: list[EgressDenyM] | None = None
    labels: list[RuleLabelM] | None = None
    enableDefaultDeny: DefaultDenyM | None = None
    description: str | None = None
    log: dict[str, str] | None = None


# Kubernetes NetworkPolicy


class IPBlockM(_M):
    cidr: str
    except_: list[str] | None = Field(default=None, alias="except")

    _cidr = field_validator("cidr")(classmethod(lambda cls, v: _check_cidr(v)))
    _except = field_validator("except_")(classmethod(lambda cls, v, info: CIDRRuleM._except.__func__(cls, v, info)))


class NPPeerM(_M):
    podSelector: LabelSelectorM | None = None
    namespaceSelector: LabelSelectorM | None = None
    ipBlock: IPBlockM | None = None

    @field_validator("ipBlock")
    @classmethod
    def _excl(cls, v: IPBlockM | None, info: Any) -> IPBlockM | None:
        if v is not None and (
            info.data.get("podSelector") is not None or info.data.get("namespaceSelector") is not None
        ):
            raise ValueError("ipBlock cannot be combined with podSelector or namespaceSelector in one peer")
        return v


class NPPortM(_M):
    protocol: str | None = None
    port: Any = None
    endPort: int | None = None

    @field_validator("protocol")
    @classmethod
    def _proto(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.upper() not in ("TCP", "UDP", "SCTP"):
            raise ValueError(f"unsupported protocol {v!r} (TCP, UDP, SCTP)")
        return v.upper()

    @field_validator("port")
    @classmethod
    def _port(cls, v: Any) -> Any:
        return _check_port(v, lo=1)

    @field_validator("endPort")
    @classmethod
    def _end(cls, v: int | None, info: Any) -> int | None:
        if v is None:
            return v
        p = info.data.get("port")
        if isinstance(p, str):
            raise ValueError("endPort cannot be used with a named port")
        if p is None:
            raise ValueError("endPort needs port")
        if not 1 <= v <= 65535:
            raise ValueError("must be 1-65535")
        if v < p:
            raise ValueError(f"must be >= port ({p})")
        return v


class NPIngressM(_M):
    from_: list[NPPeerM] | None = Field(default=None, alias="from")
    ports: list[NPPortM] | None = None


class NPEgressM(_M):
    to: list[NPPeerM] | None = None
    ports: list[NPPortM] | None = None


class NPSpecM(_M):
    podSelector: LabelSelectorM
    policyTypes: list[str] | None = None
    ingress: list[NPIngressM] | None = None
    egress: list[NPEgressM] | None = None

    @field_validator("policyTypes")
    @classmethod
    def _types(cls, v: list[str] | None) -> list[str] | None:
        for i, t in enumerate(v or ()):
            if t not in ("Ingress", "Egress"):
                raise ValueError(f"[{i}]: {t!r} is not Ingress or Egress")
        return v


# ---------------------------------------------------------------------------
# conversion to internal rules


class _Ctx:
    def __init__(self, warn: Callable[[str, str], None], namespace: str | None, origin: str) -> None:
        self.warn = warn
        self.namespace = namespace
        self.origin = origin


def _peer_selector(ctx: _Ctx, sel: LabelSelectorM, matches_init: bool) -> EndpointSelector:
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
    ctx: _Ctx, path: str, cidrs: list[str] | None, sets: list[CIDRRuleM] | None
) -> tuple[list[CIDRSelector], list[str]]:
    out: list[CIDRSelector] = []
    unsupported: list[str] = []
    for c in cidrs or ():
        out.append(CIDRSelector(_net(c)))
    for i, s in enumerate(sets or ()):
        if s.cidr is None:
            unsupported.append("cidrGroupRef")
            ctx.warn(
                f"{path}CIDRSet[{i}]",
                "cidrGroupRef/cidrGroupSelector (CiliumCIDRGroup) is not supported: selects nothing",
            )
            continue
        out.append(CIDRSelector(_net(s.cidr), tuple(_net(e) for e in s.except_ or ())))
    for sel in out:
        if sel.cidr.version == 6:
            ctx.warn(path + "CIDR", f"IPv6 prefix {sel.cidr} cannot match on this IPv4-only datapath")
    return out, unsupported


def _port_rules(
    ctx: _Ctx, path: str, rules: list[PortRuleM] | list[PortDenyRuleM] | None, default_proto: str
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
        l7 = ""
        if isinstance(pr, PortRuleM):
            if pr.rules is not None:
                d = pr.rules.model_dump(exclude_none=True, by_alias=True)
                kinds = [k for k in ("http", "kafka", "dns", "l7") if d.get(k)]
                if len(kinds) > 1:
                    raise _ConvError(f"{p}.rules", "only one L7 rule type (http, kafka, dns or l7) per port rule")
                if d.get("l7") and not d.get("l7proto"):
                    raise _ConvError(f"{p}.rules.l7proto", "l7 rules need l7proto")
                l7 = json.dumps(d, sort_keys=True, separators=(",", ":"))
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


class _ConvError(Exception):
    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason


def _icmps(ctx: _Ctx, path: str, icmps: list[ICMPRuleM] | None) -> tuple[ICMPField, ...]:
    out = []
    for r in icmps or ():
        for f in r.fields:
            out.append(ICMPField(int(f.type), f.family or "IPv4"))
    return tuple(out)


def _peer_rule(ctx: _Ctx, path: str, m: Any, egress: bool, deny: bool, matches_init: bool) -> PeerRule:
    pre = "to" if egress else "from"
    eps = getattr(m, pre + "Endpoints")
    reqs = getattr(m, pre + "Requires")
    ents = getattr(m, pre + "Entities")
    cidrs, unsupported = _cidr_selectors(ctx, f"{path}.{pre}", getattr(m, pre + "CIDR"), getattr(m, pre + "CIDRSet"))
    has_cidr = getattr(m, pre + "CIDR") is not None or getattr(m, pre + "CIDRSet") is not None
    for f in ("Groups", "Nodes", "FQDNs"):
        name = ("to" if f == "FQDNs" else pre) + f
        if getattr(m, name, None) is not None:
            if f == "FQDNs" and not egress:
                continue
            unsupported.append(name)
            ctx.warn(f"{path}.{name}", f"{name} is not supported yet: it selects no peer")
    svcs = getattr(m, "toServices", None) if egress else None
    if m.toPorts and m.icmps:
        raise _ConvError(f"{path}.icmps", "icmps cannot be combined with toPorts in one rule (use two rules)")
    return PeerRule(
        endpoints=None if eps is None else tuple(_peer_selector(ctx, s, matches_init) for s in eps),
        requires=tuple(_peer_selector(ctx, s, matches_init) for s in reqs or ()),
        entities=None if ents is None else tuple(ents),
        cidrs=tuple(cidrs) if has_cidr else None,
        services=None
        if svcs is None
        else tuple(_service_selector(f"{path}.toServices[{i}]", s) for i, s in enumerate(svcs)),
        unsupported=tuple(unsupported),
        to_ports=_port_rules(ctx, f"{path}.toPorts", m.toPorts, "ANY"),
        icmps=_icmps(ctx, f"{path}.icmps", m.icmps),
    )


def _service_selector(path: str, m: ServiceM) -> ServiceSelector:
    """``toServices[i]``: exactly one of k8sService / k8sServiceSelector; no namespace = any."""
    if (m.k8sService is None) == (m.k8sServiceSelector is None):
        raise _ConvError(path, "exactly one of k8sService and k8sServiceSelector is required")
    if m.k8sService is not None:
        return ServiceSelector(name=m.k8sService.serviceName, namespace=m.k8sService.namespace or "")
    assert m.k8sServiceSelector is not None
    sel = m.k8sServiceSelector
    return ServiceSelector(namespace=sel.namespace or "", selector=sel.selector.to_selector())


def _cilium_rule(ctx: _Ctx, path: str, r: RuleM) -> Rule | None:
    if (r.endpointSelector is None) == (r.nodeSelector is None):
        raise _ConvError(path, "exactly one of endpointSelector and nodeSelector is required")
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


def _np_peer(ctx: _Ctx, peer: NPPeerM, path: str) -> tuple[list[EndpointSelector], list[CIDRSelector]]:
    if peer.ipBlock is not None:
        b = peer.ipBlock
        # matches every address it covers, pods included (not Cilium's CIDR semantics)
        sel = CIDRSelector(_net(b.cidr), tuple(_net(e) for e in b.except_ or ()), ipblock=True)
        if sel.cidr.version == 6:
            ctx.warn(path + ".ipBlock", f"IPv6 prefix {sel.cidr} cannot match on this IPv4-only datapath")
        return [], [sel]
    if peer.podSelector is None and peer.namespaceSelector is None:
        raise _ConvError("", "a peer needs podSelector, namespaceSelector or ipBlock")
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


def _np_rule(ctx: _Ctx, spec: NPSpecM) -> Rule:
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
            except _ConvError as err:
                raise _ConvError(where, err.reason) from None
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


# ---------------------------------------------------------------------------
# documents


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = {"except_": "except", "from_": "from"}.get(str(part), str(part))
            out += ("." if out else "") + part
    return out


def _fmt_pydantic(prefix: str, err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Input should be"):
            msg = "wrong type: " + msg[0].lower() + msg[1:] + f" (got {type(e.get('input')).__name__})"
        if msg.startswith("[") and "]: " in msg:  # list item errors raised from a list validator
            idx, msg = msg.split(": ", 1)
            loc = loc + (int(idx[1:-1]),)
        path = _fmt_loc(loc)
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, msg))
    return out


_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _convert_doc(idx: int, doc: Any, prefix: str, issues: list[ValidationIssue]) -> PolicyDoc | None:
    start = len(issues)

    def err(path: str, reason: str, label: str = "") -> None:
        p = (f"{prefix}{path}" if prefix else path) if path else prefix.rstrip(".")
        issues.append(ValidationIssue(idx, p, reason, label))

    if not isinstance(doc, dict):
        err("", f"a policy document must be a mapping, got {type(doc).__name__}")
        return None
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    label = ""
    if isinstance(kind, str) and isinstance(name, str):
        nsl = None if kind == KIND_CCNP else (ns if isinstance(ns, str) else "default")
        label = _origin(kind, nsl, name)
    if kind not in API_VERSIONS:
        err(
            "kind",
            f"unsupported kind {kind!r} (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)",
            label,
        )
        return None
    api = doc.get("apiVersion")
    if api not in API_VERSIONS[kind]:
        err("apiVersion", f"must be {API_VERSIONS[kind][0]} for {kind}, got {api!r}", label)
    allowed = {"apiVersion", "kind", "metadata", "status"} | ({"spec"} if kind == KIND_KNP else {"spec", "specs"})
    for k in doc:
        if k not in allowed:
            err(str(k), "unknown field", label)
    if not isinstance(meta, dict):
        err("metadata", "required field missing" if meta is None else "must be a mapping", label)
        return None
    if not isinstance(name, str) or not name:
        err("metadata.name", "required field missing" if name is None else "must be a non-empty string", label)
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        err("metadata.name", "must be a DNS subdomain (lowercase alphanumerics, '-' and '.')", label)
    if kind == KIND_CCNP:
        if ns is not None:
            err("metadata.namespace", "a CiliumClusterwideNetworkPolicy is not namespaced", label)
        namespace = None
    else:
        if ns is None:
            namespace = "default"
        elif not isinstance(ns, str) or not _DNS1123_LABEL.match(ns) or len(ns) > 63:
            err("metadata.namespace", "must be a DNS label (lowercase alphanumerics and '-')", label)
            namespace = "default"
        else:
            namespace = ns
    warnings: list[str] = []

    def warn(path: str, msg: str) -> None:
        warnings.append(f"{prefix}{path}: {msg}")

    ctx = _Ctx(warn, namespace, label)
    rules: list[Rule] = []
    if kind == KIND_KNP:
        spec = doc.get("spec")
        if spec is None:
            err("spec", "required field missing", label)
            return None
        try:
            m = NPSpecM.model_validate(spec)
        except ValidationError as e:
            for p, r in _fmt_pydantic("spec", e):
                err(p, r, label)
            return None
        try:
            rules.append(_np_rule(ctx, m))
        except _ConvError as e:
            err(e.path, e.reason, label)
    else:
        specs: list[tuple[str, Any]] = []
        if "spec" in doc and doc["spec"] is not None:
            specs.append(("spec", doc["spec"]))
        if "specs" in doc and doc["specs"] is not None:
            if not isinstance(doc["specs"], list):
                err("specs", "wrong type: must be a list of rules", label)
            else:
                specs += [(f"specs[{i}]", s) for i, s in enumerate(doc["specs"])]
        if not specs:
            err("spec", "a CiliumNetworkPolicy needs spec or specs", label)
        for path, s in specs:
            try:
                m = RuleM.model_validate(s)
            except ValidationError as e:
                for p, r in _fmt_pydantic(path, e):
                    err(p, r, label)
                continue
            try:
                rr = _cilium_rule(ctx, path, m)
            except _ConvError as e:
                err(e.path, e.reason, label)
                continue
            except SelectorError as e:
                err(path, str(e), label)
                continue
            if rr is not None:
                rules.append(rr)
    if len(issues) > start:
        return None
    return PolicyDoc(kind, name, namespace, tuple(rules), doc, warnings)  # type: ignore[arg-type]


def parse_policy_objects(objs: list[Any]) -> list[PolicyDoc]:
    """Already-loaded documents (dicts, or List objects with items) -> PolicyDocs."""
    issues: list[ValidationIssue] = []
    out: list[PolicyDoc] = []
    seen: dict[tuple[str, str | None, str], int] = {}
    for idx, obj in enumerate(objs):
        if obj is None:
            continue
        items: list[tuple[str, Any]]
        if isinstance(obj, dict) and isinstance(obj.get("kind"), str) and obj["kind"].endswith("List"):
            its = obj.get("items")
            if not isinstance(its, list):
                issues.append(ValidationIssue(idx, "items", "a List needs an items list"))
                continue
            items = [(f"items[{i}].", it) for i, it in enumerate(its)]
        else:
            items = [("", obj)]
        for prefix, it in items:
            d = _convert_doc(idx, it, prefix, issues)
            if d is None:
                continue
            if d.key in seen:
                issues.append(
                    ValidationIssue(
                        idx, prefix + "metadata.name", f"duplicate: same policy as document {seen[d.key]}", d.origin
                    )
                )
                continue
            seen[d.key] = idx
            out.append(d)
    if issues:
        raise PolicyValidationError(issues)
    return out


def parse_policies(text: str) -> list[PolicyDoc]:
    """YAML (multi-document, or a List with items) or JSON -> PolicyDocs, all or nothing."""
    if not isinstance(text, str):
        raise TypeError("text must be a str")
    objs: list[Any] = []
    try:
        for obj in manifests.load_all(text):
            objs.append(obj)
    except manifests.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise PolicyValidationError([ValidationIssue(len(objs), "", f"bad YAML: {where}{problem}")]) from None
    if isinstance(text, str) and not any(o is not None for o in objs):
        raise PolicyValidationError([ValidationIssue(0, "", "no policy documents found")])
    return parse_policy_objects(objs)
