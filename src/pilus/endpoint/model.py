"""The endpoint model: what the agent knows about one pod, and how it is saved."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

from pilus import protocols
from pilus.datapath import ENDPOINT_F_POLICY_EGRESS, ENDPOINT_F_POLICY_INGRESS, EndpointInfo
from pilus.endpoint.state import State, check_transition
from pilus.identity.labels import is_dns_label

# IANA service name, as Kubernetes validates container port names
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")


class EndpointNameError(ValueError):
    pass


def parse_port_spec(spec: str) -> tuple[int, str]:
    """'80', '80/TCP', '53/udp' -> (port, protocol)."""
    port_text, _, proto = spec.partition("/")
    proto = (proto or "TCP").upper()
    ported = protocols.NUMBERS.get(proto) in protocols.PORT_PROTOCOLS
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535 or not ported:
        raise EndpointNameError(f"port {spec!r} is invalid: expected PORT[/TCP|UDP|SCTP] with PORT 1-65535")
    return int(port_text), proto


def check_named_ports(ports: dict[str, str]) -> dict[str, str]:
    out = {}
    for name, spec in ports.items():
        if not _PORT_NAME.match(name):
            raise EndpointNameError(
                f"port name {name!r} is invalid: 1-15 lowercase letters, digits and '-', with at least one letter"
            )
        port, proto = parse_port_spec(spec)
        out[name] = f"{port}/{proto}"
    return out


def split_name(name: str) -> tuple[str, str]:
    """'ns/name' or 'name' (namespace 'default') -> (namespace, pod name)."""
    namespace, _, pod = name.rpartition("/")
    namespace = namespace or "default"
    for what, value in (("namespace", namespace), ("name", pod)):
        if not is_dns_label(value):
            raise EndpointNameError(
                f"endpoint {what} {value!r} is invalid: use 1-63 lowercase letters, digits "
                "and '-', starting and ending with a letter or digit (e.g. default/xwing)"
            )
    return namespace, pod


@dataclass
class Endpoint:
    id: int
    namespace: str
    pod_name: str
    user_labels: list[str]
    service_account: str
    ipv4: IPv4Address
    netns: str
    interface_name: str
    state: State = State.WAITING_FOR_IDENTITY
    identity: int = 0
    labels: list[str] = field(default_factory=list)  # security labels of the identity
    interface_index: int = 0
    mac: str = ""
    host_mac: str = ""
    named_ports: dict[str, str] = field(default_factory=dict)  # container port name -> "80/TCP"
    policy_flags: int = 0  # ENDPOINT_F_POLICY_* as last written to the datapath
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.pod_name}"

    def set_state(self, new: State) -> None:
        if new is not self.state:
            check_transition(self.state, new)
            self.state = new

    def to_json(self) -> dict:
        out = asdict(self)
        out["ipv4"] = str(self.ipv4)
        out["state"] = self.state.value
        out["name"] = self.name
        out["policy_enforcement"] = {
            "ingress": bool(self.policy_flags & ENDPOINT_F_POLICY_INGRESS),
            "egress": bool(self.policy_flags & ENDPOINT_F_POLICY_EGRESS),
        }
        return out

    @classmethod
    def from_json(cls, data: dict) -> Endpoint:
        data = dict(data)
        data.pop("name", None)
        data.pop("policy_enforcement", None)
        data["ipv4"] = IPv4Address(data["ipv4"])
        data["state"] = State(data["state"])
        return cls(**data)


def endpoint_info(ep: Endpoint) -> EndpointInfo:
    """The endpoint as the datapath's endpoint map holds it."""
    return EndpointInfo(
        ipv4=ep.ipv4,
        ifindex=ep.interface_index,
        ep_id=ep.id,
        identity=ep.identity,
        mac=ep.mac,
        host_mac=ep.host_mac,
        flags=ep.policy_flags,
    )


class EndpointStore:
    """One JSON file per endpoint under <state-dir>/endpoints/, written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "endpoints"

    def save(self, ep: Endpoint) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{ep.id}.json.tmp"
        tmp.write_text(json.dumps(ep.to_json(), indent=1))
        os.replace(tmp, self.dir / f"{ep.id}.json")

    def remove(self, ep_id: int) -> None:
        (self.dir / f"{ep_id}.json").unlink(missing_ok=True)

    def load_all(self) -> list[Endpoint]:
        if not self.dir.is_dir():
            return []
        return sorted(
            (Endpoint.from_json(json.loads(p.read_text())) for p in self.dir.glob("*.json")),
            key=lambda ep: ep.id,
        )
