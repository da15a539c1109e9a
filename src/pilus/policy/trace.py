"""Explain a verdict: which rules select the endpoints, which allow/deny rules match.

Evaluates the compiled rules (the same compilation the map entries come from)
directly against the labels given, like ``cilium policy trace``. When the peer's
address is known, Kubernetes ipBlock rules are evaluated against the ipBlock
identity of the longest ipBlock prefix covering it, as the datapath's second
lookup does, and the verdict says so. Each direction's verdict is the datapath's
lookup (``mapstate.lookup``) over the map entries these rules give the peer, so the
trace and the datapath cannot disagree; the text says which rules matched.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from pilus import protocols
from pilus.identity.labels import Labels
from pilus.identity.reserved import HOST
from pilus.policy.compiled import CompiledPolicy
from pilus.policy.mapstate import PolicyEntry, PolicyKey, lookup, merge_entry, normalize
from pilus.policy.rule import Rule
from pilus.policy.selector import CIDRSelector, ipblock_identity_labels

__all__ = ["DirectionTrace", "TraceResult", "run_trace"]

#: the traced peer's identity in the trace's map entries (labels are matched, not identities)
TRACE_PEER = 0xFFFFFFFF


class TraceSource(Protocol):
    """What the trace reads from the policy engine."""

    mode: str
    allow_localhost: bool

    def compile_for(self, labels: Labels) -> CompiledPolicy: ...
    def rules(self) -> list[Rule]: ...
    def ipblock_identity(self, addr: ipaddress.IPv4Address) -> tuple[ipaddress.IPv4Network, int] | None: ...


PROXY_NAMES = {"http": "HTTP proxy", "kafka": "Kafka proxy", "dns": "DNS proxy"}
UNITS = {"http": "request", "kafka": "request", "dns": "query"}


@dataclass
class DirectionTrace:
    direction: str
    evaluated: bool
    verdict: str  # "allowed" / "denied"
    reason: str
    rules_selected: list[str] = field(default_factory=list)
    allowed_by: list[str] = field(default_factory=list)
    denied_by: list[str] = field(default_factory=list)
    #: allowed, and an HTTP rule covers the port: the L7 proxy judges each request against
    #: these rules ({} = any request: a plain allow of the same peer and port)
    http_rules: list[dict[str, Any]] = field(default_factory=list)
    #: the same for any proxy: its parser (http, kafka, dns) and rules
    l7_parser: str = ""
    l7_rules: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TraceResult:
    lines: list[str]
    ingress: DirectionTrace
    egress: DirectionTrace
    verdict: str  # "ALLOWED" / "DENIED"

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "ingress": self.ingress.to_dict(),
            "egress": self.egress.to_dict(),
            "lines": list(self.lines),
        }

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _port_str(dport: int, proto: int) -> str:
    if proto in (protocols.ICMP, protocols.ICMPV6):
        return f"{protocols.name(proto)} type {dport}"
    return f"{dport}/{protocols.name(proto)}"


def _direction(
    eng: TraceSource,
    egress: bool,
    subject: Labels,
    peer: Labels,
    dport: int,
    proto: int,
    lines: list[str],
    peer_ip: ipaddress.IPv4Address | None = None,
) -> DirectionTrace:
    d = "egress" if egress else "ingress"
    lines.append(f"Resolving {d} policy for [{subject}]")
    comp = eng.compile_for(subject)
    enforced = comp.enforced(egress)
    dd = comp.default_deny(egress)
    res = DirectionTrace(d, True, "allowed", "")
    for r in comp.rules:
        has = r.has_egress if egress else r.has_ingress
        lines.append(f"* Rule {r.origin}: selected" + ("" if has else f" (no {d} rules)"))
        res.rules_selected.append(r.origin)
    lines.append(f"{len(comp.rules)}/{len(eng.rules())} rules selected")
    if eng.mode == "never":
        res.reason = "policy enforcement is disabled (mode never)"
    elif not enforced:
        res.reason = f"no rule selects the endpoint for {d}: all traffic allowed"
    else:
        uses_ipblock = comp.ipblock(egress)
        covered = eng.ipblock_identity(peer_ip) if uses_ipblock and peer_ip is not None else None
        ipblock_peer = ipblock_identity_labels(covered[0]) if covered else None
        via: dict[str, str] = {}  # origin -> why an ipBlock rule matched
        l7: list[tuple[str, str, list[dict[str, Any]]]] = []  # each matching allow: (origin, parser, L7 rules)
        peer_id = HOST if _is_host(peer) else TRACE_PEER
        # the map entries these rules give this peer (identity 0: any peer)
        entries = {k: e for k, e in comp.static.items() if k.egress == egress and k.identity in (0, peer_id)}
        if uses_ipblock:
            if peer_ip is None:
                lines.append("    the peer's address is not known: ipBlock rules cannot match")
            elif covered is None:
                lines.append(f"    {peer_ip} is not covered by any ipBlock prefix")
            else:
                lines.append(f"    {peer_ip} is covered by ipBlock prefix {covered[0]} (identity {covered[1]})")
        for sel, _peer_rule, c in comp.items:
            if c.egress != egress:
                continue
            if isinstance(sel, CIDRSelector) and sel.ipblock:
                if ipblock_peer is None or not sel.matches(ipblock_peer):
                    continue
            elif sel is not None and not sel.matches(peer):
                continue
            what = "any peer" if sel is None else f"selector {sel}"
            ident = peer_id if sel is not None else 0
            if isinstance(sel, CIDRSelector) and sel.ipblock and covered is not None:
                ident = covered[1]
            for k in c.keys:
                merge_entry(entries, PolicyKey(ident, egress, *k), PolicyEntry(c.deny, 0, c.origin))
            if not any(PolicyKey(0, egress, *k).matches(proto, dport) for k in c.keys):
                ports = ", ".join(PolicyKey(0, egress, *k).text() for k in c.keys)
                lines.append(f"    {c.origin}: {what} matches, but port {_port_str(dport, proto)} is not in [{ports}]")
                continue
            verb = "Denies" if c.deny else "Allows"
            lines.append(
                f"    {c.origin}: {verb} {_port_str(dport, proto)} from {what}"
                if not egress
                else f"    {c.origin}: {verb} {_port_str(dport, proto)} to {what}"
            )
            (res.denied_by if c.deny else res.allowed_by).append(c.origin)
            if not c.deny:
                for k, rules in c.l7:
                    if c.proxy_keys.get(k) == rules.parser and PolicyKey(0, egress, *k).matches(proto, dport):
                        l7.append((c.origin, rules.parser, [r.to_dict() for r in getattr(rules, rules.parser)]))
                        break
                else:
                    l7.append((c.origin, "", []))
            if isinstance(sel, CIDRSelector) and sel.ipblock and covered is not None:
                via.setdefault(c.origin, f"{peer_ip} is covered by ipBlock prefix {covered[0]} (identity {covered[1]})")
        verdict = lookup(normalize(entries), peer_id, egress, proto, dport, covered[1] if covered else 0)
        if not verdict.allowed and res.denied_by:
            res.verdict = "denied"
            res.reason = f"denied by {_deny_reason(res.denied_by[0])}"
        elif verdict.allowed and res.allowed_by:
            first = res.allowed_by[0]
            res.reason = f"{via[first]}: allowed by {first}" if first in via else f"allowed by {first}"
        elif verdict.allowed and not egress and eng.allow_localhost and peer_id == HOST:
            res.reason = "allow-localhost: the host may always reach local endpoints"
            res.allowed_by.append("allow-localhost")
        elif verdict.allowed and not dd:
            res.reason = f"rules select the endpoint for {d} with enableDefaultDeny=false: default allow"
        elif verdict.allowed:
            res.reason = f"allowed by {verdict.entry.rule if verdict.entry else 'the policy map'}"
        else:
            res.verdict = "denied"
            why = (
                "mode always: default deny"
                if eng.mode == "always" and not comp.rules
                else (
                    f"default deny: rules select the endpoint for {d} but none allows "
                    f"{_port_str(dport, proto)} {'to' if egress else 'from'} [{peer}]"
                )
            )
            res.reason = why
        parser = next((p for _o, p, _r in l7 if p), "")
        if res.verdict == "allowed" and parser:
            res.l7_parser = parser
            res.l7_rules = [r for _o, _p, rules in l7 for r in (rules or [{}])]
            if parser == "http":
                res.http_rules = res.l7_rules
            unit = UNITS[parser]
            lines.append(f"    L7: redirected to the {PROXY_NAMES[parser]}; a {unit} passes when it matches one of:")
            for origin, _p, rules in l7:
                for r in rules or [{}]:
                    what = json.dumps(r, separators=(",", ":")) if r else f"any {unit} (a plain allow: visible)"
                    lines.append(f"      {what}  ({origin})")
    lines.append(f"{d.capitalize()} verdict: {res.verdict} ({res.reason})")
    lines.append("")
    return res


def _is_host(peer: Labels) -> bool:
    lbl = peer.get("host")
    return lbl is not None and lbl.source == "reserved"


def _deny_reason(origin: str) -> str:
    # "CiliumNetworkPolicy default/x (ingressDeny)" -> "ingressDeny in CiliumNetworkPolicy default/x"
    if origin.endswith(")") and " (" in origin:
        pol, kind = origin[:-1].rsplit(" (", 1)
        return f"{kind} in {pol}"
    return origin


def run_trace(
    eng: TraceSource,
    src: Labels,
    dst: Labels,
    dport: int,
    proto: int,
    src_is_local: bool,
    dst_is_local: bool,
    src_ip: ipaddress.IPv4Address | None = None,
    dst_ip: ipaddress.IPv4Address | None = None,
) -> TraceResult:
    lines = [
        "----------------------------------------------------------------",
        f"Tracing From: [{src}] => To: [{dst}] Ports: [{_port_str(dport, proto)}]",
        "",
    ]
    if src_is_local:
        eg = _direction(eng, True, src, dst, dport, proto, lines, dst_ip)
    else:
        eg = DirectionTrace("egress", False, "allowed", "source is not a local endpoint: no egress policy applies")
        lines += [f"Egress: {eg.reason}", ""]
    if dst_is_local:
        ing = _direction(eng, False, dst, src, dport, proto, lines, src_ip)
    else:
        ing = DirectionTrace(
            "ingress", False, "allowed", "destination is not a local endpoint: no ingress policy applies"
        )
        lines += [f"Ingress: {ing.reason}", ""]
    verdict = "ALLOWED" if eg.verdict == "allowed" and ing.verdict == "allowed" else "DENIED"
    lines.append(f"Final verdict: {verdict}")
    return TraceResult(lines, ing, eg, verdict)
