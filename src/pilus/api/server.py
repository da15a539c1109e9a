"""The agent's REST API (JSON) on a UNIX socket; described by openapi.yaml beside it.

Handlers only translate HTTP to calls on the agent's components; errors become
{"error": "..."} bodies with a status code in one place (pilus.api.errors); they hold
no state of their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from pilus.api.errors import MAX_BODY_BYTES, error_response, json_errors
from pilus.api.fqdn_routes import add_fqdn_routes
from pilus.api.proxy_routes import add_proxy_routes
from pilus.api.secret_routes import add_secret_routes
from pilus.api.service_routes import add_service_routes
from pilus.datapath.events import MONITOR_TYPES
from pilus.metrics.server import exposition
from pilus.observer.format import event_record
from pilus.observer.l7 import L7Event

log = logging.getLogger(__name__)

#: the ?type= values of GET /v1/monitor (datapath events, and the L7 proxy's records)
MONITOR_TYPE_NAMES = frozenset(MONITOR_TYPES.values()) | {L7Event.kind}


class AgentSurface(Protocol):
    """What the handlers use of the agent (pilus.agent.Agent): its components and a few
    questions. The API holds no state of its own and never imports the agent."""

    endpoints: Any
    datapath: Any
    events: Any
    distribution: Any
    policy: Any
    registry: Any
    node_registry: Any

    async def status(self) -> dict: ...

    async def identity_rows(self) -> list[dict]: ...

    def samples(self) -> Iterable[Any]: ...

    async def trace(self, body: dict) -> dict: ...


class APIServer:
    def __init__(self, agent: AgentSurface, socket_path: Path) -> None:
        self.agent = agent
        self.socket_path = socket_path
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
        r = app.router
        r.add_get("/v1/healthz", self.healthz)
        r.add_get("/v1/openapi.yaml", self.openapi)
        r.add_get("/v1/endpoint", self.endpoint_list)
        r.add_post("/v1/endpoint", self.endpoint_create)
        r.add_get("/v1/endpoint/{ref:.+}", self.endpoint_get)
        r.add_delete("/v1/endpoint/{ref:.+}", self.endpoint_delete)
        r.add_patch("/v1/endpoint/{ref:.+}/labels", self.endpoint_labels)
        r.add_get("/v1/identity", self.identity_list)
        r.add_get("/v1/identity/{id}", self.identity_get)
        r.add_get("/v1/node", self.node_list)
        r.add_get("/v1/bpf/ipcache", self.bpf_ipcache)
        r.add_get("/v1/bpf/tunnel", self.bpf_tunnel)
        r.add_get("/v1/bpf/endpoint", self.bpf_endpoint)
        r.add_get("/v1/bpf/ct", self.bpf_ct)
        r.add_delete("/v1/bpf/ct", self.bpf_ct_flush)
        r.add_get("/v1/bpf/metrics", self.bpf_metrics)
        r.add_get("/v1/metrics", self.metrics)
        r.add_get("/v1/metrics/prometheus", self.metrics_prometheus)
        r.add_get("/v1/monitor", self.monitor)
        r.add_get("/v1/policy", self.policy_get)
        r.add_put("/v1/policy", self.policy_import)
        r.add_delete("/v1/policy", self.policy_delete)
        r.add_post("/v1/policy/trace", self.policy_trace)
        r.add_get("/v1/policy/selectors", self.policy_selectors)
        r.add_get("/v1/bpf/policy/{ref:.+}", self.bpf_policy)
        add_service_routes(app, self.agent)
        add_proxy_routes(app, self.agent)
        add_fqdn_routes(app, self.agent)
        add_secret_routes(app, self.agent)
        r.add_get("/v1/namespace", self.namespace_list)
        r.add_put("/v1/namespace/{name}", self.namespace_put)
        r.add_delete("/v1/namespace/{name}", self.namespace_delete)
        return app

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket_path)).start()
        os.chmod(self.socket_path, 0o660)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.socket_path.unlink(missing_ok=True)

    # -- handlers ----------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.status())

    async def openapi(self, request: web.Request) -> web.Response:
        text = resources.files("pilus.api").joinpath("openapi.yaml").read_text()
        return web.Response(text=text, content_type="application/yaml")

    async def endpoint_list(self, request: web.Request) -> web.Response:
        return web.json_response([ep.to_json() for ep in self.agent.endpoints.list()])

    async def endpoint_create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return error_response(400, f"request body is not JSON: {exc}")
        name = body.get("name")
        labels = body.get("labels", [])
        if not isinstance(name, str) or not name:
            return error_response(400, "field 'name' is required: the endpoint name as ns/name")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            return error_response(400, "field 'labels' must be a list of strings like 'org=alliance'")
        sa = body.get("service_account") or "default"
        ports = body.get("named_ports") or {}
        if not isinstance(ports, dict) or not all(isinstance(v, str) for v in ports.values()):
            return error_response(400, "field 'named_ports' must map port names to 'PORT/PROTOCOL' strings")
        ep = await self.agent.endpoints.create(name, labels, service_account=sa, named_ports=ports)
        return web.json_response(ep.to_json(), status=201)

    async def endpoint_get(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.endpoints.lookup(request.match_info["ref"]).to_json())

    async def endpoint_delete(self, request: web.Request) -> web.Response:
        ep = await self.agent.endpoints.delete(request.match_info["ref"])
        return web.json_response({"deleted": ep.id})

    async def endpoint_labels(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return error_response(400, f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object with 'add' and/or 'delete' lists")
        changes = {}
        for field in ("add", "delete"):
            value = body.get(field, [])
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                return error_response(400, f"field '{field}' must be a list of strings like 'org=alliance'")
            changes[field] = value
        ep, previous = await self.agent.endpoints.relabel(request.match_info["ref"], **changes)
        return web.json_response({"endpoint": ep.to_json(), "previous_identity": previous})

    async def identity_list(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.identity_rows())

    async def node_list(self, request: web.Request) -> web.Response:
        registry = self.agent.node_registry
        if registry is None:
            return error_response(503, "the node registry is not running (yet)")
        return web.json_response(registry.rows())

    async def identity_get(self, request: web.Request) -> web.Response:
        raw = request.match_info["id"]
        if not raw.isdigit():
            return error_response(400, f"identity {raw!r} is not a number")
        for row in await self.agent.identity_rows():
            if row["id"] == int(raw):
                return web.json_response(row)
        return error_response(404, f"identity {raw} not found")

    async def bpf_ipcache(self, request: web.Request) -> web.Response:
        rows = [
            {"prefix": str(prefix), "identity": ident, "tunnel_endpoint": str(tep) if tep else None}
            for prefix, ident, tep in self.agent.datapath.ipcache.items()
        ]
        return web.json_response(sorted(rows, key=lambda r: r["prefix"]))

    async def bpf_tunnel(self, request: web.Request) -> web.Response:
        rows = [{"prefix": str(prefix), "endpoint": str(endpoint)}
                for prefix, endpoint in self.agent.datapath.tunnel.dump()]
        return web.json_response(rows)

    async def bpf_endpoint(self, request: web.Request) -> web.Response:
        rows = [
            {"ip": str(i.ipv4), "ifindex": i.ifindex, "ep_id": i.ep_id, "identity": i.identity,
             "mac": i.mac, "host_mac": i.host_mac, "flags": i.flags}
            for i in self.agent.datapath.endpoints.items()
        ]
        return web.json_response(sorted(rows, key=lambda r: r["ep_id"]))

    async def bpf_ct(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.datapath.ct.items())

    async def bpf_ct_flush(self, request: web.Request) -> web.Response:
        return web.json_response({"flushed": self.agent.datapath.ct.flush()})

    async def bpf_metrics(self, request: web.Request) -> web.Response:
        return web.json_response(self.agent.datapath.metrics.items())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"name": s.name, "labels": s.labels, "value": s.value} for s in self.agent.samples()]
        )

    async def metrics_prometheus(self, request: web.Request) -> web.Response:
        return exposition(self.agent.registry)

    async def monitor(self, request: web.Request) -> web.StreamResponse:
        types_arg = request.query.get("type")
        types = frozenset(types_arg.split(",")) if types_arg else None
        if types and not types <= MONITOR_TYPE_NAMES:
            return error_response(400, f"unknown event type {types_arg!r}: expected one of "
                                       f"{', '.join(sorted(MONITOR_TYPE_NAMES))}")
        endpoint = request.query.get("endpoint")
        if endpoint is not None and not endpoint.isdigit():
            return error_response(400, f"endpoint {endpoint!r} is not an endpoint id")
        sub = self.agent.events.subscribe(types, int(endpoint) if endpoint else None)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            while True:
                # everything queued in one write: the hub offers events in batches
                events = [await sub.queue.get()]
                while not sub.queue.empty():
                    events.append(sub.queue.get_nowait())
                await response.write(
                    b"".join(json.dumps(event_record(e)).encode() + b"\n" for e in events))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.agent.events.unsubscribe(sub)
        return response

    # -- policy ----------------------------------------------------------------

    async def policy_get(self, request: web.Request) -> web.Response:
        revision, docs = await self.agent.distribution.load()
        return web.json_response({"revision": revision, "policies": [d.raw for d in docs]})

    async def policy_import(self, request: web.Request) -> web.Response:
        text = await request.text()
        if request.content_type == "application/json":
            try:
                body = json.loads(text)
            except json.JSONDecodeError as exc:
                return error_response(400, f"request body is not JSON: {exc}")
            text = body.get("yaml", text) if isinstance(body, dict) and "yaml" in body else text
        _rev, docs = await self.agent.distribution.import_text(text)  # 400 if invalid
        revision = await self.agent.policy.reload_policies()
        return web.json_response({
            "revision": revision,
            "imported": [{"kind": d.kind, "namespace": d.namespace, "name": d.name} for d in docs],
            "warnings": [w for d in docs for w in getattr(d, "warnings", ())],
        })

    async def policy_delete(self, request: web.Request) -> web.Response:
        everything = request.query.get("all") in ("1", "true", "yes")
        name = request.query.get("name")
        if not everything and not name:
            return error_response(400, "say which policy: ?name=NAME[&namespace=NS] or ?all=true")
        _rev, count = await self.agent.distribution.delete(
            name, request.query.get("namespace"), everything=everything
        )
        revision = await self.agent.policy.reload_policies()
        return web.json_response({"revision": revision, "deleted": count})

    async def policy_trace(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            return error_response(400, f"request body is not JSON: {exc}")
        return web.json_response(await self.agent.trace(body))

    async def policy_selectors(self, request: web.Request) -> web.Response:
        return web.json_response(await self.agent.policy.selectors())

    async def bpf_policy(self, request: web.Request) -> web.Response:
        ep = self.agent.endpoints.lookup(request.match_info["ref"])
        entries = self.agent.datapath.policy.items(ep.id)
        return web.json_response({"endpoint": ep.id, "name": ep.name, "entries": entries})

    # -- namespaces ------------------------------------------------------------

    async def namespace_list(self, request: web.Request) -> web.Response:
        namespaces = await self.agent.distribution.namespaces()
        return web.json_response([{"name": n, "labels": labels} for n, labels in sorted(namespaces.items())])

    async def namespace_put(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError as exc:
            return error_response(400, f"request body is not JSON: {exc}")
        labels = body.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            return error_response(400, "field 'labels' must be an object of string values")
        name = request.match_info["name"]
        full = await self.agent.distribution.put_namespace(name, labels)
        await self.agent.policy.refresh_namespaces()
        return web.json_response({"name": name, "labels": full})

    async def namespace_delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not await self.agent.distribution.delete_namespace(name):
            return error_response(404, f"namespace {name!r} not found")
        await self.agent.policy.refresh_namespaces()
        return web.json_response({"deleted": name})
