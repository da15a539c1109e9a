"""The service model: Kubernetes Service (+ Endpoints / EndpointSlice) documents,
validated into plain dataclasses.

Validation collects every problem with the path of the field
(``spec.ports[0].port: must be 1-65535``); a document with any problem raises
:class:`ServiceValidationError` and nothing of the request is applied.

Accepted (a subset of core/v1 Service and discovery/v1 EndpointSlice):

  apiVersion: v1
  kind: Service
  metadata: {name, namespace (default "default"), labels, annotations}
  spec:
    type: ClusterIP | NodePort | LoadBalancer      (default ClusterIP)
    clusterIP: 10.96.0.10                          (required: pilus has no IP allocator for services)
    ports: [{name, port, protocol: TCP|UDP, targetPort: int | name, nodePort}]
    selector: {key: value}                         (no selector: backends come from Endpoints/EndpointSlice)
    externalIPs: [ip]
    loadBalancerIP: ip                             (or status.loadBalancer.ingress[].ip)
    sessionAffinity: None | ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds}}   (default 10800)
    externalTrafficPolicy: Cluster | Local
    internalTrafficPolicy: Cluster | Local
  metadata.annotations["service.cilium.io/lb-algorithm"]: random | maglev

  kind: Endpoints      metadata.name = the service; subsets[].addresses[].ip, subsets[].ports[]
  kind: EndpointSlice  labels["kubernetes.io/service-name"] = the service; endpoints[].addresses,
                       endpoints[].conditions {ready, serving, terminating}, ports[]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from pilus import manifests, protocols

ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_AFFINITY_TIMEOUT = 10800
NODEPORT_MIN, NODEPORT_MAX = 30000, 32767
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
#: service protocols: those the LB datapath translates
PROTOCOLS = tuple(protocols.name(p) for p in (protocols.TCP, protocols.UDP))
ALGORITHMS = ("random", "maglev")
BACKEND_STATES = ("active", "terminating", "quarantined", "maintenance")

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_PORT_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ServiceValidationError(ValueError):
    """One or more problems, each ``path: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class ServicePort:
    port: int
    protocol: str = "TCP"
    target_port: int | str = 0  # number, or a named port of the pods; 0 = same as port
    name: str = ""
    node_port: int = 0

    @property
    def target(self) -> int | str:
        return self.target_port or self.port


@dataclass(frozen=True)
class EndpointAddress:
    """An explicit backend address (Endpoints / EndpointSlice)."""

    ip: IPv4Address
    ports: tuple[tuple[str, int, str], ...]  # (name, port, protocol)
    state: str = "active"
    node_local: bool = True


@dataclass
class Service:
    namespace: str
    name: str
    cluster_ip: IPv4Address
    ports: list[ServicePort]
    type: str = "ClusterIP"
    selector: dict[str, str] | None = None
    external_ips: list[IPv4Address] = field(default_factory=list)
    lb_ips: list[IPv4Address] = field(default_factory=list)
    session_affinity: bool = False
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_traffic_policy: str = "Cluster"
    internal_traffic_policy: str = "Cluster"
    algorithm: str | None = None  # None: the agent's default
    annotations: dict[str, str] = field(default_factory=dict)
    endpoints: list[EndpointAddress] | None = None  # explicit backends (no selector)
    labels: dict[str, str] = field(default_factory=dict)  # metadata.labels (toServices selectors)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "namespace": self.namespace,
            "name": self.name,
            "type": self.type,
            "cluster_ip": str(self.cluster_ip),
            "ports": [
                {
                    "name": p.name,
                    "port": p.port,
                    "protocol": p.protocol,
                    "target_port": p.target,
                    **({"node_port": p.node_port} if p.node_port else {}),
                }
                for p in self.ports
            ],
            "selector": self.selector,
            "external_ips": [str(i) for i in self.external_ips],
            "lb_ips": [str(i) for i in self.lb_ips],
            "session_affinity": "ClientIP" if self.session_affinity else "None",
            "affinity_timeout": self.affinity_timeout if self.session_affinity else 0,
            "external_traffic_policy": self.external_traffic_policy,
            "internal_traffic_policy": self.internal_traffic_policy,
            "algorithm": self.algorithm,
            "labels": dict(self.labels),
        }
        if self.endpoints is not None:
            d["endpoints"] = [
                {
                    "ip": str(e.ip),
                    "ports": [list(p) for p in e.ports],
                    "state": e.state,
                    "node_local": e.node_local,
                }
                for e in self.endpoints
            ]
        return d

    def to_k8s(self) -> dict:
        """A Kubernetes Service document (what `import` accepts) for this service."""
        spec: dict[str, Any] = {
            "type": self.type,
            "clusterIP": str(self.cluster_ip),
            "ports": [],
        }
        for p in self.ports:
            port: dict[str, Any] = {"port": p.port, "protocol": p.protocol}
            if p.name:
                port["name"] = p.name
            if p.target_port:
                port["targetPort"] = p.target_port
            if p.node_port:
                port["nodePort"] = p.node_port
            spec["ports"].append(port)
        if self.selector is not None:
            spec["selector"] = dict(self.selector)
        if self.external_ips:
            spec["externalIPs"] = [str(i) for i in self.external_ips]
        if self.lb_ips:
            spec["loadBalancerIP"] = str(self.lb_ips[0])
        if self.session_affinity:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": self.affinity_timeout}}
        if self.external_traffic_policy != "Cluster":
            spec["externalTrafficPolicy"] = self.external_traffic_policy
        if self.internal_traffic_policy != "Cluster":
            spec["internalTrafficPolicy"] = self.internal_traffic_policy
        annotations = dict(self.annotations)
        if self.algorithm:
            annotations[ALGORITHM_ANNOTATION] = self.algorithm
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.labels:
            meta["labels"] = dict(self.labels)
        if annotations:
            meta["annotations"] = annotations
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


# ---- field checks ------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, msg: str) -> None:
        self.items.append(f"{path}: {msg}")


def _port(v: Any, path: str, pr: _Problems, lo: int = 1, hi: int = 65535) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int):
        pr.add(path, f"must be a number {lo}-{hi}, got {v!r}")
        return None
    if not lo <= v <= hi:
        pr.add(path, f"must be {lo}-{hi}, got {v}")
        return None
    return v


def _ipv4(v: Any, path: str, pr: _Problems) -> IPv4Address | None:
    try:
        return IPv4Address(str(v))
    except ValueError:
        pr.add(path, f"{v!r} is not an IPv4 address")
        return None


def _protocol(v: Any, path: str, pr: _Problems) -> str:
    if v is None:
        return "TCP"
    if not isinstance(v, str) or v.upper() not in PROTOCOLS:
        pr.add(path, f"must be TCP or UDP, got {v!r}")
        return "TCP"
    return v.upper()


def check_label_key(key: Any) -> str | None:
    """None if ``key`` is a valid Kubernetes label key, else why not."""
    if not isinstance(key, str) or not key:
        return "label key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        return f"invalid label key {key!r}: the prefix must be a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME_RE.match(name):
        return (
            f"invalid label key {key!r}: at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending with an alphanumeric"
        )
    return None


def check_label_value(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"label value must be a string, got {value!r}"
    if value and (len(value) > 63 or not _LABEL_NAME_RE.match(value)):
        return (
            f"invalid label value {value!r}: at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending with an alphanumeric"
        )
    return None


def parse_selector(text: str) -> dict[str, str]:
    """``app=web,tier=front`` -> {"app": "web", "tier": "front"} (CLI helper)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ServiceValidationError([f"selector: {part!r} is not key=value"])
        k, v = part.split("=", 1)
        k = k.strip()
        if k.startswith("k8s:"):
            k = k[4:]
        out[k] = v.strip()
    return out


# ---- documents -----------------------------------------------------------------------


def _meta(doc: dict, pr: _Problems) -> tuple[str, str]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        pr.add("metadata", "required: a mapping with name (and namespace)")
        return "default", ""
    name = meta.get("name")
    ns = meta.get("namespace") or "default"
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
        pr.add("metadata.name", f"must be a DNS label (lowercase alphanumerics and '-'), got {name!r}")
        name = ""
    if not isinstance(ns, str) or not _NAME_RE.match(ns) or len(ns) > 63:
        pr.add("metadata.namespace", f"must be a DNS label, got {ns!r}")
        ns = "default"
    return ns, name


def parse_service(doc: dict, where: str = "") -> Service:
    """One ``kind: Service`` document -> Service; raises ServiceValidationError."""
    pr = _Problems()
    ns, name = _meta(doc, pr)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        pr.add("spec", "required: a mapping")
        raise ServiceValidationError([where + p for p in pr.items])

    stype = spec.get("type", "ClusterIP")
    if stype not in SERVICE_TYPES:
        pr.add("spec.type", f"must be one of {', '.join(SERVICE_TYPES)}, got {stype!r}")
        stype = "ClusterIP"

    cluster_ip = None
    raw_cip = spec.get("clusterIP")
    if raw_cip in (None, ""):
        pr.add("spec.clusterIP", "required: pilus does not allocate service IPs")
    elif raw_cip == "None":
        pr.add("spec.clusterIP", "headless services (clusterIP: None) are not load-balanced")
    else:
        cluster_ip = _ipv4(raw_cip, "spec.clusterIP", pr)

    ports: list[ServicePort] = []
    raw_ports = spec.get("ports")
    if not isinstance(raw_ports, list) or not raw_ports:
        pr.add("spec.ports", "required: a non-empty list")
        raw_ports = []
    seen: dict[tuple[int, str], int] = {}
    names: set[str] = set()
    for i, p in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            pr.add(path, "must be a mapping")
            continue
        port = _port(p.get("port"), f"{path}.port", pr)
        proto = _protocol(p.get("protocol"), f"{path}.protocol", pr)
        pname = p.get("name") or ""
        if pname:
            if not isinstance(pname, str) or not _PORT_NAME_RE.match(pname) or len(pname) > 63:
                pr.add(f"{path}.name", f"must be a DNS label, got {pname!r}")
            elif pname in names:
                pr.add(f"{path}.name", f"duplicate port name {pname!r}")
            names.add(pname)
        elif len(raw_ports) > 1:
            pr.add(f"{path}.name", "required when a service has more than one port")
        target: int | str = 0
        raw_t = p.get("targetPort")
        if raw_t is not None:
            if isinstance(raw_t, str) and not raw_t.isdigit():
                if not _PORT_NAME_RE.match(raw_t) or len(raw_t) > 15:
                    pr.add(f"{path}.targetPort", f"must be a port number or a port name, got {raw_t!r}")
                target = raw_t
            else:
                t = _port(int(raw_t) if isinstance(raw_t, str) else raw_t, f"{path}.targetPort", pr)
                target = t or 0
        node_port = 0
        if p.get("nodePort") is not None:
            if stype == "ClusterIP":
                pr.add(f"{path}.nodePort", "only NodePort and LoadBalancer services have node ports")
            else:
                node_port = _port(p.get("nodePort"), f"{path}.nodePort", pr, NODEPORT_MIN,
                                  NODEPORT_MAX) or 0
        elif stype in ("NodePort", "LoadBalancer"):
            pr.add(f"{path}.nodePort", f"required ({NODEPORT_MIN}-{NODEPORT_MAX}): pilus does "
                                        "not allocate node ports")
        if port is not None:
            if (port, proto) in seen:
                pr.add(f"{path}.port", f"{port}/{proto} is already spec.ports[{seen[(port, proto)]}]")
            seen[(port, proto)] = i
            ports.append(ServicePort(port, proto, target, pname, node_port))

    selector = None
    if "selector" in spec and spec["selector"] is not None:
        sel = spec["selector"]
        if not isinstance(sel, dict):
            pr.add("spec.selector", f"must be a mapping of label key to value, got {sel!r}")
        else:
            selector = {}
            for k, v in sel.items():
                why = check_label_key(k) or check_label_value(v)
                if why:
                    pr.add(f"spec.selector.{k}", why)
                else:
                    selector[k] = v

    ext = []
    for i, ip in enumerate(spec.get("externalIPs") or []):
        a = _ipv4(ip, f"spec.externalIPs[{i}]", pr)
        if a:
            ext.append(a)
    lb_ips = []
    if spec.get("loadBalancerIP"):
        if stype != "LoadBalancer":
            pr.add("spec.loadBalancerIP", "only for type LoadBalancer")
        a = _ipv4(spec["loadBalancerIP"], "spec.loadBalancerIP", pr)
        if a:
            lb_ips.append(a)
    ingress = ((doc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    for i, ing in enumerate(ingress):
        if isinstance(ing, dict) and ing.get("ip"):
            a = _ipv4(ing["ip"], f"status.loadBalancer.ingress[{i}].ip", pr)
            if a and a not in lb_ips:
                lb_ips.append(a)

    affinity = spec.get("sessionAffinity", "None")
    if affinity not in ("None", "ClientIP"):
        pr.add("spec.sessionAffinity", f"must be None or ClientIP, got {affinity!r}")
    timeout = DEFAULT_AFFINITY_TIMEOUT
    cfg = ((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds")
    if cfg is not None:
        timeout = _port(cfg, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", pr, 1,
                        86400) or DEFAULT_AFFINITY_TIMEOUT
    etp = spec.get("externalTrafficPolicy", "Cluster")
    if etp not in ("Cluster", "Local"):
        pr.add("spec.externalTrafficPolicy", f"must be Cluster or Local, got {etp!r}")
        etp = "Cluster"
    itp = spec.get("internalTrafficPolicy", "Cluster")
    if itp not in ("Cluster", "Local"):
        pr.add("spec.internalTrafficPolicy", f"must be Cluster or Local, got {itp!r}")
        itp = "Cluster"

    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        pr.add("metadata.annotations", "must be a mapping")
        annotations = {}
    raw_labels = meta.get("labels") or {}
    labels: dict[str, str] = {}
    if not isinstance(raw_labels, dict):
        pr.add("metadata.labels", "must be a mapping of label key to value")
    else:
        for k, v in raw_labels.items():
            why = check_label_key(k) or check_label_value(v)
            if why:
                pr.add(f"metadata.labels.{k}", why)
            else:
                labels[k] = v
    algorithm = annotations.get(ALGORITHM_ANNOTATION)
    if algorithm is not None and algorithm not in ALGORITHMS:
        pr.add(f"metadata.annotations[{ALGORITHM_ANNOTATION}]",
               f"must be random or maglev, got {algorithm!r}")
        algorithm = None

    if pr.items:
        raise ServiceValidationError([where + p for p in pr.items])
    assert cluster_ip is not None
    return Service(
        namespace=ns,
        name=name,
        cluster_ip=cluster_ip,
        ports=ports,
        type=stype,
        selector=selector,
        external_ips=ext,
        lb_ips=lb_ips,
        session_affinity=affinity == "ClientIP",
        affinity_timeout=timeout,
        external_traffic_policy=etp,
        internal_traffic_policy=itp,
        algorithm=algorithm,
        annotations={str(k): str(v) for k, v in annotations.items()},
        labels=labels,
    )


def _ep_ports(raw: Any, path: str, pr: _Problems) -> tuple[tuple[str, int, str], ...]:
    out = []
    for i, p in enumerate(raw or []):
        if not isinstance(p, dict):
            pr.add(f"{path}[{i}]", "must be a mapping")
            continue
        port = _port(p.get("port"), f"{path}[{i}].port", pr)
        proto = _protocol(p.get("protocol"), f"{path}[{i}].protocol", pr)
        if port:
            out.append((str(p.get("name") or ""), port, proto))
    return tuple(out)


def parse_endpoints(doc: dict, where: str = "") -> tuple[tuple[str, str], list[EndpointAddress]]:
    """kind: Endpoints -> ((ns, service name), addresses)."""
    pr = _Problems()
    ns, name = _meta(doc, pr)
    out: list[EndpointAddress] = []
    for si, subset in enumerate(doc.get("subsets") or []):
        path = f"subsets[{si}]"
        if not isinstance(subset, dict):
            pr.add(path, "must be a mapping")
            continue
        ports = _ep_ports(subset.get("ports"), f"{path}.ports", pr)
        for key, state in (("addresses", "active"), ("notReadyAddresses", None)):
            for ai, addr in enumerate(subset.get(key) or []):
                ip = _ipv4((addr or {}).get("ip"), f"{path}.{key}[{ai}].ip", pr)
                if ip and state:
                    out.append(EndpointAddress(ip, ports, state))
    if pr.items:
        raise ServiceValidationError([where + p for p in pr.items])
    return (ns, name), out


def parse_endpoint_slice(doc: dict, where: str = "") -> tuple[tuple[str, str], list[EndpointAddress]]:
    """kind: EndpointSlice -> ((ns, service name), addresses)."""
    pr = _Problems()
    ns, _ = _meta(doc, pr)
    labels = (doc.get("metadata") or {}).get("labels") or {}
    svc = labels.get(SERVICE_NAME_LABEL)
    if not svc:
        pr.add(f"metadata.labels[{SERVICE_NAME_LABEL}]", "required: the service this slice belongs to")
    if doc.get("addressType", "IPv4") != "IPv4":
        pr.add("addressType", f"only IPv4 is supported, got {doc.get('addressType')!r}")
    ports = _ep_ports(doc.get("ports"), "ports", pr)
    out: list[EndpointAddress] = []
    for i, ep in enumerate(doc.get("endpoints") or []):
        path = f"endpoints[{i}]"
        if not isinstance(ep, dict):
            pr.add(path, "must be a mapping")
            continue
        cond = ep.get("conditions") or {}
        ready = cond.get("ready", True)
        serving = cond.get("serving", ready)
        terminating = cond.get("terminating", False)
        if terminating and serving:
            state = "terminating"
        elif ready:
            state = "active"
        else:
            state = None  # not ready, not serving: no backend
        for ai, a in enumerate(ep.get("addresses") or []):
            ip = _ipv4(a, f"{path}.addresses[{ai}]", pr)
            if ip and state:
                out.append(EndpointAddress(ip, ports, state))
    if pr.items:
        raise ServiceValidationError([where + p for p in pr.items])
    return (ns, str(svc)), out


def parse_documents(text: str) -> list[Service]:
    """A YAML/JSON stream of Service, Endpoints and EndpointSlice documents (or
    a v1 List) -> services with their explicit endpoints attached."""
    try:
        docs = [d for d in manifests.load_all(text) if d is not None]
    except manifests.YAMLError as exc:
        raise ServiceValidationError([f"not valid YAML: {exc}"]) from None
    return parse_objects(docs)


def parse_objects(docs: list[Any]) -> list[Service]:
    """Decoded documents (YAML or JSON objects, Lists flattened) -> services; the
    checks of ``parse_documents`` without a YAML parser (the state file, JSON bodies)."""
    flat: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List":
            flat.extend(d.get("items") or [])
        else:
            flat.append(d)
    problems: list[str] = []
    services: list[Service] = []
    explicit: dict[tuple[str, str], list[EndpointAddress]] = {}
    for i, d in enumerate(flat):
        where = f"document {i + 1}: " if len(flat) > 1 else ""
        if not isinstance(d, dict):
            problems.append(f"{where}must be a mapping (a Kubernetes object)")
            continue
        kind = d.get("kind")
        try:
            if kind == "Service":
                services.append(parse_service(d, where))
            elif kind == "Endpoints":
                key, addrs = parse_endpoints(d, where)
                explicit.setdefault(key, []).extend(addrs)
            elif kind == "EndpointSlice":
                key, addrs = parse_endpoint_slice(d, where)
                explicit.setdefault(key, []).extend(addrs)
            else:
                problems.append(f"{where}kind: must be Service, Endpoints or EndpointSlice, "
                                f"got {kind!r}")
        except ServiceValidationError as exc:
            problems.extend(exc.problems)
    names = {s.key for s in services}
    for key in explicit:
        if key not in names:
            problems.append(f"Endpoints for {key[0]}/{key[1]}: no such Service in this request")
    seen: set[tuple[str, str]] = set()
    for s in services:
        if s.key in seen:
            problems.append(f"Service {s.full_name}: defined twice")
        seen.add(s.key)
        if s.key in explicit:
            if s.selector:
                problems.append(f"Service {s.full_name}: has a selector and explicit Endpoints; "
                                "use one")
            s.endpoints = explicit[s.key]
    if problems:
        raise ServiceValidationError(problems)
    if not services:
        raise ServiceValidationError(["no Service in the input"])
    return services


def service_documents(svc: Service) -> list[dict[str, Any]]:
    """The Kubernetes documents that ``parse_objects`` turns back into ``svc``: the
    Service and one EndpointSlice per explicit backend (the state file, the kvstore)."""
    docs: list[dict[str, Any]] = [svc.to_k8s()]
    for i, ep in enumerate(svc.endpoints or ()):
        docs.append({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{svc.name}-{i}",
                "namespace": svc.namespace,
                "labels": {"kubernetes.io/service-name": svc.name},
            },
            "addressType": "IPv4",
            "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ep.ports],
            "endpoints": [{
                "addresses": [str(ep.ip)],
                "conditions": {
                    "ready": ep.state == "active",
                    "serving": True,
                    "terminating": ep.state == "terminating",
                },
            }],
        })
    return docs


def service_from_json(body: dict) -> Service:
    """A Kubernetes Service as JSON (the API's PUT body)."""
    if body.get("kind") not in (None, "Service"):
        raise ServiceValidationError([f"kind: must be Service, got {body.get('kind')!r}"])
    return parse_service(body)
