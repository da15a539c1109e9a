"""ServiceManager: desired services -> the datapath's LB maps.

The manager keeps the desired services (Kubernetes Service model) and the
agent's endpoints; from them it derives every *frontend* (a VIP:port/proto of
one type: ClusterIP, NodePort on each node address, ExternalIP, LoadBalancer
IP), its backends (label selector over the endpoints, or explicit
Endpoints/EndpointSlice addresses), their states, the algorithm and the
affinity, and writes the difference to the maps (``datapath.lb``).

Ids: every frontend gets a service id (= rev_nat_index) in 1..65535, every
backend (addr, port, proto) a backend id, both kept stable while they exist
and recovered from the maps after a restart (so connections tracked with an
id keep their meaning). Requests are all-or-nothing: a request that fails
validation (overlapping frontends, unknown networks, capacity) changes nothing.

Restart: ``restore`` adopts what the maps hold (ids, and every frontend as it
was written) and the saved services, then writes nothing until the first
``set_endpoints``: the agent restores its endpoints after the services, and
taking "no endpoints yet" as truth would program selector services without
backends, so the datapath would refuse new connections for a moment. That
first reconcile then writes only what differs from the maps.

Thread-safety: one lock around every public method (the API may call from a
worker thread while the agent calls set_endpoints from its loop).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pilus.datapath import lb as lbmaps
from pilus.loadbalancer.endpoints import EndpointView, selector_matches, view_key
from pilus.loadbalancer.model import (
    ALGORITHMS,
    BACKEND_STATES,
    Service,
    ServiceValidationError,
    parse_documents,
    parse_objects,
    service_documents,
)
from pilus.loadbalancer.writer import MAX_SERVICE_ID, FrontendSpec, LbWriter

log = logging.getLogger(__name__)

#: backends of one frontend (slots); Maglev frontends are also bounded by M
MAX_BACKENDS_PER_FRONTEND = 16384


class ServiceNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "service not found"


class ServiceConflict(ValueError):
    """The request collides with another service (409)."""


class BackendNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "backend not found"


class ServiceManager:
    """Desired services -> LB maps. ``datapath``: a loaded Datapath (uses ``.lb``)."""

    def __init__(
        self,
        datapath,
        *,
        default_algorithm: str = "random",
        node_ips: Iterable[IPv4Address] = (),
        known_networks: Iterable[IPv4Network] = (),
        local_networks: Iterable[IPv4Network] = (),
        state_path: Path | None = None,
    ) -> None:
        if default_algorithm not in ALGORITHMS:
            raise ValueError(f"unknown LB algorithm {default_algorithm!r}: random or maglev")
        self.datapath = datapath
        self.default_algorithm = default_algorithm
        self.node_ips = [IPv4Address(str(i)) for i in node_ips]
        self.known_networks = [IPv4Network(str(n)) for n in known_networks]
        self.local_networks = [IPv4Network(str(n)) for n in local_networks]
        self.state_path = Path(state_path) if state_path else None
        self._lock = threading.RLock()
        self._services: dict[tuple[str, str], Service] = {}
        #: None after restore() until the agent's endpoints are known (nothing is written)
        self._endpoints: list[EndpointView] | None = []
        self._overrides: dict[tuple[IPv4Address, int], str] = {}  # PATCH backend-state
        self._lb_writer: LbWriter | None = None  # ids and the reconcilers of the LB maps
        self._last_desired: list[FrontendSpec] = []
        # (the desired list it indexes, (address, port, proto) -> (namespace, name)): service_at
        self._frontend_index: tuple[list[FrontendSpec] | None, dict] = (None, {})
        #: service key -> (the Service, its frontends): derived frontends are kept until the
        #: service, the endpoints its selector matches or the backend states change
        self._specs: dict[tuple[str, str], tuple[Service, list[FrontendSpec]]] = {}
        self.last_errors: list[str] = []
        #: called with the current services after they were restored, added, replaced or
        #: deleted (the agent feeds policy toServices); runs under the lock: must not block
        self._subscribers: list[Callable[[list[Service]], None]] = []  # told after every change

    # -- lifecycle -------------------------------------------------------------

    @property
    def maps(self) -> lbmaps.LbMaps:
        return self.datapath.lb

    @property
    def _writer(self) -> LbWriter:
        if self._lb_writer is None or self._lb_writer.maps is not self.maps:
            self._lb_writer = LbWriter(self.maps)  # bound to the loaded maps on first use
        return self._lb_writer

    @property
    def maglev_table_size(self) -> int:
        return self.maps.maglev_table_size

    def restore(self) -> int:
        """Agent restart: adopt the maps' ids and frontends and reload the saved
        services; returns how many. Writes nothing: the first ``set_endpoints``
        reconciles, rewriting what changed and removing what is no longer wanted."""
        with self._lock:
            self._writer.adopt()
            services: list[Service] = []
            if self.state_path and self.state_path.exists():
                try:
                    data = json.loads(self.state_path.read_text())
                    docs = data.get("documents") or []
                    if docs:
                        services = parse_objects(docs)
                    self._overrides = {
                        (IPv4Address(k.rsplit(":", 1)[0]), int(k.rsplit(":", 1)[1])): v
                        for k, v in (data.get("backend_states") or {}).items()
                    }
                except (OSError, ValueError, ServiceValidationError) as exc:
                    log.error("cannot restore services from %s: %s", self.state_path, exc)
            for s in services:
                self._services[s.key] = s
            self._specs.clear()
            self._endpoints = None
            self._notify()
            return len(services)

    # -- queries -----------------------------------------------------------------

    def services(self) -> list[Service]:
        with self._lock:
            return sorted(self._services.values(), key=lambda s: s.key)

    def get(self, namespace: str, name: str) -> Service:
        with self._lock:
            try:
                return self._services[(namespace, name)]
            except KeyError:
                raise ServiceNotFound(f"service {namespace}/{name} not found") from None

    def service_at(self, ip: str, port: int, proto: str) -> tuple[str, str] | None:
        """(namespace, name) of the service with this frontend (ClusterIP, external or
        LoadBalancer IP, NodePort on a node address), as the datapath has it now; None
        for any other address. Hubble's source/destination_service (GetServiceByAddr)."""
        desired = self._last_desired
        if self._frontend_index[0] is not desired:
            self._frontend_index = (desired, {(str(s.address), s.port, s.proto): s.service for s in desired})
        return self._frontend_index[1].get((ip, port, proto))

    def frontends(self) -> list[dict]:
        """Rows of `pilus service list` (one per frontend, like cilium-dbg)."""
        with self._lock:
            rows = []
            for spec in self._desired_cache:
                sid = self._writer.svc_ids.get(spec.fkey, 0)
                rows.append(
                    {
                        "id": sid,
                        "frontend": f"{spec.address}:{spec.port}/{spec.proto}",
                        "type": spec.kind,
                        "scope": "internal" if spec.scope else "external",
                        "service": f"{spec.service[0]}/{spec.service[1]}",
                        "port_name": spec.port_name,
                        "algorithm": spec.algorithm,
                        "session_affinity_timeout": spec.affinity_timeout,
                        "flags": spec.flags,
                        "flags2": spec.flags2,
                        "backends": [
                            {
                                "id": self._writer.be_ids.get((ip, port, proto), 0),
                                "address": f"{ip}:{port}/{proto}",
                                "state": state,
                            }
                            for ip, port, proto, state in spec.backends
                        ],
                    }
                )
            return sorted(rows, key=lambda r: (r["id"], r["scope"]))

    # -- changes ---------------------------------------------------------------

    def upsert(self, services: list[Service]) -> list[Service]:
        """Add or replace services (all or nothing)."""
        with self._lock:
            new = dict(self._services)
            for s in services:
                new[s.key] = s
            desired = self._check(services, new)
            old = self._services
            self._services = new
            try:
                self._reconcile(strict=True, desired=desired)
            except Exception:
                self._services = old
                self._reconcile()
                raise
            self._save()
            self._notify()
            return services

    def apply_yaml(self, text: str) -> list[Service]:
        return self.upsert(parse_documents(text))

    def delete(self, namespace: str, name: str) -> Service:
        with self._lock:
            svc = self._services.pop((namespace, name), None)
            if svc is None:
                raise ServiceNotFound(f"service {namespace}/{name} not found")
            self._specs.pop(svc.key, None)
            self._reconcile()
            self._save()
            self._notify()
            return svc

    def delete_all(self, namespace: str | None = None) -> int:
        """Delete every service, or every service of ``namespace``; returns how many."""
        with self._lock:
            keys = [k for k in self._services if namespace is None or k[0] == namespace]
            for k in keys:
                del self._services[k]
                self._specs.pop(k, None)
            if keys:
                self._reconcile()
                self._save()
                self._notify()
            return len(keys)

    def set_endpoints(self, endpoints: Iterable[dict | EndpointView]) -> list[str]:
        """The agent's endpoints changed: recompute selector-based backends.

        Entries: {ip, labels: ["k8s:app=web", ...], named_ports: {name: (port,
        proto)}, node_local: bool, state: "active"|"terminating"}. Returns the
        problems found (also logged); never raises for bad services."""
        views = [e if isinstance(e, EndpointView) else EndpointView.from_dict(e) for e in endpoints]
        with self._lock:
            before = {view_key(v): v for v in self._endpoints or ()}
            after = {view_key(v): v for v in views}
            self._forget_specs_of([v for k, v in before.items() if k not in after]
                                  + [v for k, v in after.items() if k not in before])
            self._endpoints = views
            self._reconcile()
            return self.last_errors

    def _forget_specs_of(self, changed: list[EndpointView]) -> None:
        """Drop the derived frontends of the selector services that match an endpoint
        which came, went or changed (found through one selector label per service)."""
        if not changed:
            return
        by_label: dict[str, list[Service]] = {}
        for svc in self._services.values():
            if svc.selector:
                k, v = min(svc.selector.items())
                by_label.setdefault(f"k8s:{k}={v}", []).append(svc)
        for ep in changed:
            for label in ep.labels:
                for svc in by_label.get(label, ()):
                    if selector_matches(svc, ep):
                        self._specs.pop(svc.key, None)

    def set_backend_state(self, address: IPv4Address | str, port: int, state: str) -> int:
        """Administrative state of a backend (all services, all protocols):
        active (clears the override), maintenance, quarantined, terminating."""
        if state not in BACKEND_STATES:
            raise ServiceValidationError(
                [f"state: must be one of {', '.join(BACKEND_STATES)}, got {state!r}"]
            )
        address = IPv4Address(str(address))
        with self._lock:
            known = [k for k in self._backend_keys() if k[0] == address and k[1] == port]
            if not known:
                raise BackendNotFound(f"no service has the backend {address}:{port}")
            if state == "active":
                self._overrides.pop((address, port), None)
            else:
                self._overrides[(address, port)] = state
            self._specs.clear()  # administrative states win in every service's backends
            self._reconcile()
            self._save()
            return len(known)

    # -- validation ----------------------------------------------------------

    def _frontend_keys(self, svc: Service) -> list[tuple[str, tuple[IPv4Address, int, str]]]:
        out = []
        for i, p in enumerate(svc.ports):
            out.append((f"spec.clusterIP ({svc.cluster_ip}) / spec.ports[{i}].port",
                        (svc.cluster_ip, p.port, p.protocol)))
            for j, ip in enumerate(svc.external_ips):
                out.append((f"spec.externalIPs[{j}] / spec.ports[{i}].port", (ip, p.port, p.protocol)))
            for ip in svc.lb_ips:
                out.append((f"spec.loadBalancerIP / spec.ports[{i}].port", (ip, p.port, p.protocol)))
            if p.node_port:
                for ip in self.node_ips:
                    out.append((f"spec.ports[{i}].nodePort", (ip, p.node_port, p.protocol)))
                out.append((f"spec.ports[{i}].nodePort",
                             (IPv4Address("0.0.0.0"), p.node_port, p.protocol)))
        return out

    def _check(self, request: list[Service], new: dict[tuple[str, str], Service]) -> list[FrontendSpec]:
        """Raise for a request that cannot be applied; else its desired frontends."""
        problems: list[str] = []
        conflicts: list[str] = []
        owners: dict[tuple, str] = {}
        requested = {s.key for s in request}
        for s in new.values():
            if s.key in requested:
                continue
            for _, k in self._frontend_keys(s):
                owners[k] = s.full_name
        for s in request:
            for path, k in self._frontend_keys(s):
                other = owners.get(k)
                if other and other != s.full_name:
                    fe = f"{k[0]}:{k[1]}/{k[2]}" if str(k[0]) != "0.0.0.0" else f"*:{k[1]}/{k[2]}"
                    conflicts.append(f"Service {s.full_name}: {path}: frontend {fe} is already "
                                     f"used by service {other}")
                owners[k] = s.full_name
            if s.endpoints is not None and self.known_networks:
                for i, ep in enumerate(s.endpoints):
                    if not any(ep.ip in n for n in self.known_networks):
                        nets = ", ".join(str(n) for n in self.known_networks)
                        problems.append(f"Service {s.full_name}: endpoints[{i}].ip: {ep.ip} is "
                                        f"outside any known network ({nets})")
        if conflicts:
            raise ServiceConflict("; ".join(conflicts))
        if problems:
            raise ServiceValidationError(problems)
        # capacity: what the request would need, computed like the real thing
        desired = self._desired(new)
        self._check_capacity(desired, request)
        return desired

    def _check_capacity(self, desired: list[FrontendSpec], request: list[Service] | None) -> None:
        problems = []
        names = {s.key for s in request} if request is not None else None
        slots = 0
        backends: set[tuple] = set()
        for spec in desired:
            active = sum(1 for b in spec.backends if b[3] == "active")
            slots += 1 + active
            backends.update(b[:3] for b in spec.backends)
            limit = MAX_BACKENDS_PER_FRONTEND
            if spec.algorithm == "maglev":
                limit = min(limit, self.maglev_table_size)
            if len(spec.backends) > limit and (names is None or spec.service in names):
                problems.append(
                    f"Service {spec.service[0]}/{spec.service[1]}: {len(spec.backends)} backends "
                    f"for {spec.address}:{spec.port}/{spec.proto}: more than one frontend can "
                    f"hold ({limit})"
                )
        fronts = {s.fkey for s in desired}
        if len(fronts) > MAX_SERVICE_ID:
            problems.append(f"{len(fronts)} frontends: more than the {MAX_SERVICE_ID} service ids")
        if slots > lbmaps.PILUS_LB_SVC_MAX:
            problems.append(f"the services need {slots} entries in pilus_lb4_svc, which holds "
                            f"{lbmaps.PILUS_LB_SVC_MAX}")
        if len(backends) > lbmaps.PILUS_LB_BE_MAX:
            problems.append(f"{len(backends)} backends: more than pilus_lb4_be holds "
                            f"({lbmaps.PILUS_LB_BE_MAX})")
        if problems:
            raise ServiceValidationError(problems)

    # -- derivation --------------------------------------------------------------

    def _is_local(self, ip: IPv4Address) -> bool:
        if not self.local_networks:
            return True
        return any(ip in n for n in self.local_networks)

    def _backends_for(self, svc: Service, i: int) -> list[tuple[IPv4Address, int, str, str, bool]]:
        """(ip, port, proto, state, node_local) of service port i."""
        sp = svc.ports[i]
        out = []
        if svc.endpoints is not None:
            for ep in svc.endpoints:
                port = None
                named = [p for p in ep.ports if p[0] == sp.name and p[2] == sp.protocol]
                if named:
                    port = named[0][1]
                elif not ep.ports and isinstance(sp.target, int):
                    port = sp.target
                elif len(ep.ports) == 1 and len(svc.ports) == 1 and ep.ports[0][2] == sp.protocol:
                    port = ep.ports[0][1]
                if port:
                    out.append((ep.ip, port, sp.protocol, ep.state, self._is_local(ep.ip)))
        elif svc.selector:
            for ep in self._endpoints or ():
                if not selector_matches(svc, ep):
                    continue
                if isinstance(sp.target, int):
                    port, proto = sp.target, sp.protocol
                else:
                    if sp.target not in ep.named_ports:
                        continue
                    port, proto = ep.named_ports[sp.target]
                    if proto != sp.protocol:
                        continue
                out.append((ep.ip, port, proto, ep.state, ep.node_local))
        # administrative states win over what the endpoints say
        res = []
        seen = set()
        for ip, port, proto, state, local in sorted(out, key=lambda b: (b[0], b[1])):
            if (ip, port, proto) in seen:
                continue
            seen.add((ip, port, proto))
            res.append((ip, port, proto, self._overrides.get((ip, port), state), local))
        return res

    def _desired(self, services: dict[tuple[str, str], Service]) -> list[FrontendSpec]:
        """Every frontend of ``services``, ordered by service; a service's frontends are
        derived once and kept until it, its endpoints or the backend states change."""
        out: list[FrontendSpec] = []
        for svc in sorted(services.values(), key=lambda s: s.key):
            cached = self._specs.get(svc.key)
            if cached is None or cached[0] is not svc:
                cached = self._specs[svc.key] = (svc, self._service_specs(svc))
            out.extend(cached[1])
        return out

    def _service_specs(self, svc: Service) -> list[FrontendSpec]:
        out: list[FrontendSpec] = []
        algo = svc.algorithm or self.default_algorithm
        aff = svc.affinity_timeout if svc.session_affinity else 0
        aflag = lbmaps.SVC_FLAG_AFFINITY if aff else 0
        itp_local = svc.internal_traffic_policy == "Local"
        etp_local = svc.external_traffic_policy == "Local"
        for i, sp in enumerate(svc.ports):
            bes = self._backends_for(svc, i)
            every = tuple(b[:4] for b in bes)
            local = tuple(b[:4] for b in bes if b[4])
            internal = local if itp_local else every
            external = local if etp_local else every

            def spec(kind, addr, port, scope, backends, flags, flags2, svc=svc, sp=sp,
                     algo=algo, aff=aff):
                return FrontendSpec(svc.key, kind, addr, port, sp.protocol, scope, backends,
                                    algo, aff, flags, flags2, sp.name)

            f2_int = lbmaps.SVC_FLAG2_INT_LOCAL_SCOPE if itp_local else 0
            out.append(spec("ClusterIP", svc.cluster_ip, sp.port, 0, internal, aflag, f2_int))
            ext_fronts = []
            if sp.node_port:
                for ip in self.node_ips:
                    ext_fronts.append(("NodePort", ip, sp.node_port,
                                       lbmaps.SVC_FLAG_NODEPORT))
            for ip in svc.external_ips:
                ext_fronts.append(("ExternalIPs", ip, sp.port, lbmaps.SVC_FLAG_EXTERNAL_IP))
            for ip in svc.lb_ips:
                ext_fronts.append(("LoadBalancer", ip, sp.port, lbmaps.SVC_FLAG_LOADBALANCER))
            for kind, ip, port, f in ext_fronts:
                flags = f | lbmaps.SVC_FLAG_ROUTABLE | aflag
                if etp_local:
                    flags |= lbmaps.SVC_FLAG_EXT_LOCAL_SCOPE
                two = set(internal) != set(external)
                flags2 = f2_int | (lbmaps.SVC_FLAG2_TWO_SCOPES if two else 0)
                out.append(spec(kind, ip, port, 0, external, flags, flags2))
                if two:
                    out.append(spec(kind, ip, port, 1, internal, flags, flags2))
        return out

    @property
    def _desired_cache(self) -> list[FrontendSpec]:
        return self._last_desired

    def _backend_keys(self) -> set[tuple[IPv4Address, int, str]]:
        return {b[:3] for spec in self._desired_cache for b in spec.backends}

    # -- reconcile ---------------------------------------------------------------

    def reconcilers_status(self) -> list[dict]:
        """The reconcilers of the LB maps (pending writes, errors) for ``pilus status``.
        Without the lock: healthz must answer while a large import holds it (the
        counters are read as they are)."""
        return self._writer.status()

    def retry_due(self) -> bool:
        with self._lock:
            return self._writer.retry_due()

    def retry(self) -> None:
        """Write again what failed (backends first: slots never point at a missing one)."""
        with self._lock:
            self._writer.retry()

    def _reconcile(self, strict: bool = False, desired: list[FrontendSpec] | None = None) -> None:
        if self._endpoints is None:
            return  # restored, endpoints not yet known: the maps keep what the last run wrote
        if desired is None:
            desired = self._desired(self._services)
        try:
            self._check_capacity(desired, None)
        except ServiceValidationError as exc:
            if strict:
                raise
            self.last_errors = exc.problems
            log.error("services exceed the datapath's capacity, not applied: %s", exc)
            return
        self.last_errors = []
        self._writer.write(desired)
        self._last_desired = desired

    def subscribe(self, fn: Callable[[list[Service]], None]) -> Callable[[], None]:
        """Call ``fn(services)`` after every change; returns the unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def _notify(self) -> None:
        if not self._subscribers:
            return
        services = self.services()
        for fn in list(self._subscribers):
            try:
                fn(services)
            except Exception:
                log.exception("service change hook failed")

    # -- persistence -------------------------------------------------------------

    def _save(self) -> None:
        if not self.state_path:
            return
        docs = [d for svc in self.services() for d in service_documents(svc)]
        data = {
            "documents": docs,
            "backend_states": {f"{ip}:{port}": st for (ip, port), st in self._overrides.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_path)
