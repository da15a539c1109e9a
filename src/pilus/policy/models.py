"""The policy documents' structure as pydantic models, with the field-local checks.

Each check raises ValueError with the reason; pydantic attaches the field path
(``errors.format_pydantic`` writes it as in the document). Conversion to internal
rules is ``convert.py``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from pilus.fqdn.matchpattern import validate_name, validate_pattern
from pilus.identity.labels import ANY, K8S, Label, LabelError
from pilus.policy.rule import ENTITIES, ICMP4_TYPES, ICMP6_TYPES
from pilus.policy.selector import OPERATORS, EndpointSelector, split_key
from pilus.proxy.kafka_rules import validate_kafka_rule

_SVC_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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


def network(v: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
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
                o, n = network(outer), network(e)
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


class SecretM(_M):
    namespace: str
    name: str


class HeaderMatchM(_M):
    name: str
    value: str | None = None
    mismatch: str | None = None
    secret: SecretM | None = None

    @field_validator("mismatch")
    @classmethod
    def _mm(cls, v: str | None) -> str | None:
        if v not in (None, "", "LOG", "ADD", "DELETE", "REPLACE"):
            raise ValueError("must be LOG, ADD, DELETE or REPLACE")
        return v


class PortRuleHTTPM(_M):
    """Cilium's PortRuleHTTP: method, path and host are extended regexes."""

    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: list[str] | None = None
    headerMatches: list[HeaderMatchM] | None = None

    _re = field_validator("method", "path", "host")(classmethod(lambda cls, v: _check_regex(v)))


_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]*$")


class PortRuleKafkaM(_M):
    """Cilium's PortRuleKafka: role (produce / consume) or apiKey, not both."""

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
        if v is not None and len(v) > 249:
            raise ValueError("at most 249 characters (Kafka's limit for a topic name)")
        if v is not None and not _KAFKA_TOPIC.match(v):
            raise ValueError(f"{v!r} is not a Kafka topic (only [a-zA-Z0-9._-])")
        return v

    @model_validator(mode="after")
    def _exclusive(self) -> PortRuleKafkaM:
        if self.role and self.apiKey:
            raise ValueError("role and apiKey are mutually exclusive")
        try:  # the Kafka proxy's own check (API key names, versions): what it refuses, policy refuses
            validate_kafka_rule(self.model_dump(exclude_none=True), "rule")
        except ValueError as e:
            raise ValueError(str(e).removeprefix("rule.")) from None
        return self


def _check_dns_label(v: str) -> str:
    if not isinstance(v, str) or len(v) > 63 or not DNS1123_LABEL.match(v):
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


class PortRuleDNSM(_M):
    """Cilium's PortRuleDNS: exactly one of matchName and matchPattern."""

    matchName: str | None = None
    matchPattern: str | None = None

    @field_validator("matchName")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None:  # the DNS proxy's and toFQDNs' own check (pilus.fqdn.matchpattern)
            try:
                validate_name(v)
            except ValueError as e:
                raise ValueError(f"{v[:64]!r} is not a DNS name: {e}") from None
        return v

    @field_validator("matchPattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                validate_pattern(v)
            except ValueError as e:
                raise ValueError(f"{v[:64]!r} is not a DNS name pattern: {e}") from None
        return v

    @model_validator(mode="after")
    def _one(self) -> PortRuleDNSM:
        if bool(self.matchName) == bool(self.matchPattern):
            raise ValueError("exactly one of matchName and matchPattern is required")
        return self


class L7RulesM(_M):
    http: list[PortRuleHTTPM] | None = None
    kafka: list[PortRuleKafkaM] | None = None
    dns: list[PortRuleDNSM] | None = None
    l7proto: str | None = None
    l7: list[dict[str, str]] | None = None


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
    toFQDNs: list[PortRuleDNSM] | None = None  # Cilium's FQDNSelector: the same two fields
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
