"""The agent's endpoints as service backends: what the ServiceManager needs to know
about each (address, labels, named ports, state) and how a selector matches it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from pilus.loadbalancer.model import BACKEND_STATES, Service

NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"

#: endpoint states whose pods serve (ready, or being regenerated/restored
#: while their datapath keeps forwarding); "disconnecting" ones terminate
_SERVING = {"ready", "regenerating", "restoring"}
_TERMINATING = {"disconnecting"}


@dataclass(frozen=True)
class EndpointView:
    """What the manager needs to know about one of the agent's endpoints."""

    ip: IPv4Address
    labels: frozenset[str]  # "k8s:app=web", ...
    named_ports: dict[str, tuple[int, str]] = field(default_factory=dict, hash=False, compare=False)
    node_local: bool = True
    state: str = "active"  # "terminating" while it is being deleted

    @classmethod
    def from_dict(cls, d: dict) -> EndpointView:
        named: dict[str, tuple[int, str]] = {}
        for name, v in (d.get("named_ports") or {}).items():
            if isinstance(v, str):  # the endpoint model's "8080/TCP"
                num, _, proto = v.partition("/")
                named[name] = (int(num), (proto or "TCP").upper())
            elif isinstance(v, (list, tuple)):
                named[name] = (int(v[0]), str(v[1] if len(v) > 1 else "TCP").upper())
            else:
                named[name] = (int(v), "TCP")
        state = d.get("state", "active")
        if state not in BACKEND_STATES:
            raise ValueError(f"endpoint {d.get('ip')}: unknown state {state!r}")
        return cls(
            IPv4Address(str(d["ip"])),
            frozenset(str(x) for x in d.get("labels") or []),
            named,
            bool(d.get("node_local", True)),
            state,
        )


def endpoints_for_services(endpoints: Iterable[Any], node_local: bool = True) -> list[dict]:
    """The agent's Endpoint objects (pilus.endpoint.model.Endpoint: ipv4,
    labels, named_ports "8080/TCP", state) -> ``set_endpoints`` entries."""
    out = []
    for ep in endpoints:
        state = str(getattr(ep.state, "value", ep.state))
        if state in _SERVING:
            be_state = "active"
        elif state in _TERMINATING:
            be_state = "terminating"
        else:
            continue
        if not ep.ipv4 or not ep.labels:
            continue
        out.append({
            "ip": str(ep.ipv4),
            "labels": [str(x) for x in ep.labels],
            "named_ports": dict(getattr(ep, "named_ports", None) or {}),
            "node_local": node_local,
            "state": be_state,
        })
    return out


def view_key(v: EndpointView) -> tuple:
    """Everything of an endpoint that a service's backends depend on."""
    return (v.ip, v.labels, tuple(sorted(v.named_ports.items())), v.node_local, v.state)


def selector_matches(svc: Service, ep: EndpointView) -> bool:
    if not svc.selector:
        return False
    ns = next((x.split("=", 1)[1] for x in ep.labels if x.startswith(NAMESPACE_LABEL + "=")), None)
    if ns is not None and ns != svc.namespace:
        return False
    return all(f"k8s:{k}={v}" in ep.labels for k, v in svc.selector.items())
