"""Explain a verdict: which rules select the endpoints, which allow/deny rules match.

Evaluates the compiled rules (the same compilation the map entries come from)
directly against the labels given, like ``cilium policy trace``. When the peer's
address is known, Kubernetes ipBlock rules are evaluated against the ipBlock
identity of the longest ipBlock prefix covering it, as the datapath's second
lookup does, and the verdict says so.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from pilus.identity.labels import Labels
from pilus.policy.selector import CIDRSelector, ipblock_identity_labels

if TYPE_CHECKING:
    from pilus.policy.engine import DirectionTrace, PolicyEngine, TraceResult

PROTO_NAMES = {0: "ANY", 1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}


def _port_str(dport: int, proto: int) -> str:
    if proto in (1, 58):
        return f"{PROTO_NAMES[proto]} type {dport}"
    return f"{dport}/{PROTO_NAMES.get(proto, str(proto))}"


def _direction(
    eng: PolicyEngine,
    egress: bool,
    subject: Labels,
    peer: Labels,
    dport: int,
    proto: int,
    lines: list[str],
    peer_ip: ipaddress.IPv4Address | None = None,
) -> DirectionTrace:
    from pilus.policy.engine import DirectionTrace, PolicyKey

    d = "egress" if egress else "ingress"
    lines.append(f"Resolving {d} policy for [{subject}]")
    named = eng._named_ports_for(subject)
    comp = eng._compile(subject, named)
    enforced = comp.egress_enforced if egress else comp.ingress_enforced
    dd = comp.egress_default_deny if egress else comp.ingress_default_deny
    res = DirectionTrace(d, True, "allowed", "")
    for r in comp.rules:
        has = r.has_egress if egress else r.has_ingress
        lines.append(f"* Rule {r.origin}: selected" + ("" if has else f" (no {d} rules)"))
        res.rules_selected.append(r.origin)
    lines.append(f"{len(comp.rules)}/{len(eng._rules)} rules selected")
    if eng.mode == "never":
        res.reason = "policy enforcement is disabled (mode never)"
    elif not enforced:
        res.reason = f"no rule selects the endpoint for {d}: all traffic allowed"
    else:
        uses_ipblock = comp.egress_ipblock if egress else comp.ingress_ipblock
        covered = eng.ipblock_identity(peer_ip) if uses_ipblock and peer_ip is not None else None
        ipblock_peer = ipblock_identity_labels(covered[0]) if covered else None
        via: dict[str, str] = {}  # origin -> why an ipBlock rule matched
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
            if not any(PolicyKey(0, egress, pr, dp, pl).covers_port(proto, dport) for pr, dp, pl in c.keys):
                ports = ", ".join(PolicyKey(0, egress, *k).port_str() for k in c.keys)
                lines.append(f"    {c.origin}: {what} matches, but port {_port_str(dport, proto)} is not in [{ports}]")
                continue
            verb = "Denies" if c.deny else "Allows"
            lines.append(
                f"    {c.origin}: {verb} {_port_str(dport, proto)} from {what}"
                if not egress
                else f"    {c.origin}: {verb} {_port_str(dport, proto)} to {what}"
            )
            (res.denied_by if c.deny else res.allowed_by).append(c.origin)
            if isinstance(sel, CIDRSelector) and sel.ipblock and covered is not None:
                via.setdefault(c.origin, f"{peer_ip} is covered by ipBlock prefix {covered[0]} (identity {covered[1]})")
        if res.denied_by:
            res.verdict = "denied"
            res.reason = f"denied by {_deny_reason(res.denied_by[0])}"
        elif res.allowed_by:
            first = res.allowed_by[0]
            res.reason = f"{via[first]}: allowed by {first}" if first in via else f"allowed by {first}"
        elif not egress and eng.allow_localhost and peer.get("host") is not None and peer["host"].source == "reserved":
            res.reason = "allow-localhost: the host may always reach local endpoints"
            res.allowed_by.append("allow-localhost")
        elif not dd:
            res.reason = f"rules select the endpoint for {d} with enableDefaultDeny=false: default allow"
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
    lines.append(f"{d.capitalize()} verdict: {res.verdict} ({res.reason})")
    lines.append("")
    return res


def _deny_reason(origin: str) -> str:
    # "CiliumNetworkPolicy default/x (ingressDeny)" -> "ingressDeny in CiliumNetworkPolicy default/x"
    if origin.endswith(")") and " (" in origin:
        pol, kind = origin[:-1].rsplit(" (", 1)
        return f"{kind} in {pol}"
    return origin


def run_trace(
    eng: PolicyEngine,
    src: Labels,
    dst: Labels,
    dport: int,
    proto: int,
    src_is_local: bool,
    dst_is_local: bool,
    src_ip: ipaddress.IPv4Address | None = None,
    dst_ip: ipaddress.IPv4Address | None = None,
) -> TraceResult:
    from pilus.policy.engine import DirectionTrace, TraceResult

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
