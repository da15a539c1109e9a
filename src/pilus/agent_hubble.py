"""The agent's answers to Hubble's questions about a flow's two ends.

``AgentEndpointLookup`` is the ``pilus.hubble.lookup.EndpointLookup`` over the agent's
own endpoints (by address and id, indexed once per change of the endpoint set), the
other nodes' endpoints (``IPCacheSync``, from the kvstore), the identity cache (no
store access: the flow parser runs for every event and must not wait) and the FQDN cache
(``dns_names``: a flow's source_names / destination_names) and the services' frontends
(``service_at``: a flow's source_service / destination_service).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pilus.hubble.lookup import EndpointDetails


class AgentEndpointLookup:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._by_ip: dict[str, EndpointDetails] | None = None
        self._by_id: dict[int, EndpointDetails] = {}

    def invalidate(self) -> None:
        """The agent's endpoints changed: index them again on the next question."""
        self._by_ip = None

    def _index(self) -> dict[str, EndpointDetails]:
        if self._by_ip is None:
            eps = self.agent.endpoints.list() if self.agent.endpoints is not None else []
            details = [EndpointDetails(ep.id, ep.identity, ep.namespace, ep.pod_name, tuple(ep.labels),
                                       str(ep.ipv4)) for ep in eps]
            self._by_id = {d.id: d for d in details}
            self._by_ip = {d.ip: d for d in details}
        return self._by_ip

    def endpoint_by_ip(self, ip: str) -> EndpointDetails | None:
        local = self._index().get(ip)
        if local is not None:
            return local
        sync = self.agent.parts.get("ipcache-sync")
        pair = sync.remote_by_ip(ip) if sync is not None else None
        if pair is None:
            return None
        namespace, _, pod = pair.endpoint.partition("/")
        return EndpointDetails(0, pair.identity, namespace, pod, tuple(self.identity_labels(pair.identity)),
                               str(pair.ip))

    def endpoint_by_id(self, endpoint_id: int) -> EndpointDetails | None:
        self._index()
        return self._by_id.get(endpoint_id)

    def service_at(self, ip: str, port: int, proto: str) -> tuple[str, str] | None:
        """The service whose frontend this is (a flow's source/destination_service)."""
        services = getattr(self.agent, "services", None)
        return services.service_at(ip, port, proto) if services is not None else None

    def dns_names(self, ip: str) -> list[str]:
        """The DNS names the agent's FQDN cache holds for the address (none without one)."""
        fqdn = getattr(self.agent, "fqdn", None)
        return fqdn.names_for_ip(ip) if fqdn is not None else []

    def identity_labels(self, identity: int) -> list[str]:
        ids = self.agent.identities
        labels = ids.cached(identity) if ids is not None else None
        return [str(label) for label in labels] if labels is not None else []


class NodePeers:
    """The ``PeerSource`` of peer.Peer/Notify: every node of the node registry, named
    ``<cluster>/<node>`` as flows name them, at ``<node IP>:<its Hubble port>`` (every
    agent of a cluster listens on the same port)."""

    def __init__(self, registry: Any, cluster: str, port: int) -> None:
        self.registry, self.cluster, self.port = registry, cluster, port

    def _table(self, nodes: Any) -> dict[str, str]:
        return {f"{self.cluster}/{n.name}": f"{n.node_ip}:{self.port}" for n in nodes.values()}

    def current(self) -> dict[str, str]:
        return self._table(self.registry.nodes)

    def subscribe(self, callback: Callable[[dict[str, str]], None]) -> Callable[[], None]:
        return self.registry.on_change(lambda nodes: callback(self._table(nodes)))
