"""Internal, validated form of policy rules (what the engine resolves).

The schema (``schema.py``) turns CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
/ Kubernetes NetworkPolicy documents into these frozen, hashable objects; selectors
already carry the namespace restrictions Cilium adds (see ``docs/policy.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pilus.identity.labels import Labels
from pilus.policy.l7 import L7Rules
from pilus.policy.selector import CIDRSelector, EndpointSelector, FQDNSelector

__all__ = [
    "ENTITIES",
    "ICMP4_TYPES",
    "ICMP6_TYPES",
    "ICMPField",
    "PeerRule",
    "PortProtocol",
    "PortRule",
    "Rule",
    "ServiceSelector",
    "port_range_prefixes",
]

#: Cilium's entities (pkg/policy/api/entity.go, incl. newer ones)
ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "cluster",
    "host",
    "remote-node",
    "kube-apiserver",
    "ingress",
    "health",
    "init",
    "unmanaged",
    "none",
)

#: Cilium's ICMP type names (pkg/policy/api/icmp.go)
ICMP4_TYPES = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "Echo": 8,
    "EchoRequest": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}
ICMP6_TYPES = {
    "DestinationUnreachable": 1,
    "PacketTooBig": 2,
    "TimeExceeded": 3,
    "ParameterProblem": 4,
    "EchoRequest": 128,
    "EchoReply": 129,
    "MulticastListenerQuery": 130,
    "MulticastListenerReport": 131,
    "MulticastListenerDone": 132,
    "RouterSolicitation": 133,
    "RouterAdvertisement": 134,
    "NeighborSolicitation": 135,
    "NeighborAdvertisement": 136,
    "RedirectMessage": 137,
    "RouterRenumbering": 138,
    "ICMPNodeInformationQuery": 139,
    "ICMPNodeInformationResponse": 140,
    "InverseNeighborDiscoverySolicitation": 141,
    "InverseNeighborDiscoveryAdvertisement": 142,
    "HomeAgentAddressDiscoveryRequest": 144,
    "HomeAgentAddressDiscoveryReply": 145,
    "MobilePrefixSolicitation": 146,
    "MobilePrefixAdvertisement": 147,
    "DuplicateAddressRequestCodeSuffix": 157,
    "DuplicateAddressConfirmationCodeSuffix": 158,
    "ExtendedEchoRequest": 160,
    "ExtendedEchoReply": 161,
}


def port_range_prefixes(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] as the fewest (value, prefix_len) 16-bit prefixes (Cilium's range -> LPM)."""
    if not 0 <= lo <= hi <= 0xFFFF:
        raise ValueError(f"bad port range {lo}-{hi}")
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 16 - size.bit_length() + 1))
        lo += size
    return out


@dataclass(frozen=True)
class PortProtocol:
    """One ``ports[]`` item: ``port`` 0 = all ports; ``name`` set for a named port."""

    port: int = 0
    end_port: int = 0
    protocol: str = "ANY"  # TCP, UDP, SCTP, ANY
    name: str = ""

    def __str__(self) -> str:
        p = self.name or (
            str(self.port) if not self.end_port or self.end_port == self.port else f"{self.port}-{self.end_port}"
        )
        return f"{p}/{self.protocol}"


@dataclass(frozen=True)
class ICMPField:
    type: int
    family: str = "IPv4"

    def __str__(self) -> str:
        return f"icmp type {self.type} ({self.family})"


@dataclass(frozen=True)
class PortRule:
    """One ``toPorts[]`` item; ``l7``: its typed ``rules`` (None: no ``rules``)."""

    ports: tuple[PortProtocol, ...] = ()
    l7: L7Rules | None = None


@dataclass(frozen=True)
class ServiceSelector:
    """One ``toServices[]`` item: ``k8sService`` (``name`` set) or ``k8sServiceSelector``
    (``selector`` over the service's metadata labels). ``namespace`` '' = any namespace
    (Cilium: an omitted namespace matches services of every namespace)."""

    name: str = ""
    namespace: str = ""
    selector: EndpointSelector | None = None

    def matches(self, namespace: str, name: str, labels: Labels) -> bool:
        if self.namespace and self.namespace != namespace:
            return False
        if self.selector is not None:
            return self.selector.matches(labels)
        return self.name == name

    def __str__(self) -> str:
        ns = self.namespace or "*"
        if self.selector is not None:
            return f"k8sServiceSelector {ns}/{self.selector}"
        return f"k8sService {ns}/{self.name}"


@dataclass(frozen=True)
class PeerRule:
    """One item of ``ingress``/``ingressDeny``/``egress``/``egressDeny``.

    Peer fields are ``None`` when absent; an explicitly empty list selects nothing
    (Cilium). ``services`` (``toServices``) select the backends of the matching
    services, resolved by the engine against its service input (none matching =
    no peer). ``unsupported`` names peer fields that are present but not enforced by
    pilus (groups, nodes, cidrGroupRef): they select nothing, so the element never
    widens to "any peer". ``fqdns`` (``toFQDNs``) select the identities of the IPs the
    DNS proxy learned for matching names.
    """

    endpoints: tuple[EndpointSelector, ...] | None = None
    requires: tuple[EndpointSelector, ...] = ()
    entities: tuple[str, ...] | None = None
    cidrs: tuple[CIDRSelector, ...] | None = None
    services: tuple[ServiceSelector, ...] | None = None
    fqdns: tuple[FQDNSelector, ...] | None = None
    unsupported: tuple[str, ...] = ()
    to_ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()

    @property
    def has_l3(self) -> bool:
        return (
            self.endpoints is not None
            or self.entities is not None
            or self.cidrs is not None
            or self.services is not None
            or self.fqdns is not None
            or bool(self.unsupported)
        )

    @property
    def has_l4(self) -> bool:
        return bool(self.to_ports) or bool(self.icmps)


@dataclass(frozen=True)
class Rule:
    """One Cilium rule (a CNP ``spec``/``specs[i]``, a CCNP spec, a translated K8s NP).

    ``subject`` already includes the policy's namespace for namespaced kinds;
    ``None`` = host policy (``nodeSelector``), which selects no endpoint here.
    ``default_deny_*``: this rule puts the endpoints it selects into default deny
    for that direction (a section is present and ``enableDefaultDeny`` is not false).
    ``has_*``: the rule has rules for that direction (ingress or ingressDeny non-empty,
    or for a K8s NetworkPolicy the direction is in policyTypes).
    """

    subject: EndpointSelector | None
    ingress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    has_ingress: bool = False
    has_egress: bool = False
    default_deny_ingress: bool = False
    default_deny_egress: bool = False
    namespace: str | None = None
    origin: str = ""
    description: str = ""

    def sections(self, egress: bool) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
        """(allow rules, deny rules) of a direction."""
        return (self.egress, self.egress_deny) if egress else (self.ingress, self.ingress_deny)
