"""REST routes of service load balancing; the server calls ``add_service_routes``.

  GET    /v1/service                     frontends (one row per frontend, like cilium-dbg service list)
  GET    /v1/service/{ns}/{name}         one service: its spec and frontends
  PUT    /v1/service                     {"yaml": "<Service/Endpoints/EndpointSlice YAML>"}
                                         or {"service": {<Kubernetes Service as JSON>}}
                                         or a Kubernetes Service object itself
  DELETE /v1/service/{ns}/{name}
  DELETE /v1/service?namespace=NS        every service of NS (?all=true: every service)
  PATCH  /v1/service/backend-state       {"backend": "10.0.1.5:8080", "state": "maintenance"}
  GET    /v1/bpf/lb                      the LB maps as the datapath sees them
  GET    /v1/bpf/lb/maglev/{id}          the Maglev table of one service id (?scope=internal)

Errors are {"error": "..."} (pilus.api.errors): 400 invalid request, 404 unknown
service/backend, 409 a frontend already used by another service, 503 no service manager.
"""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address
from typing import Any

from aiohttp import web

from pilus.api.errors import error_response
from pilus.loadbalancer.model import (
    ServiceValidationError,
    parse_documents,
    parse_objects,
    service_from_json,
)

AGENT_KEY: web.AppKey = web.AppKey("pilus_service_agent", object)


def _manager(agent):
    return getattr(agent, "services", None)


def _sync(agent):
    """The agent's ServiceDistribution (services cluster-wide), if it runs one."""
    return getattr(agent, "service_sync", None)


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServiceValidationError([f"request body is not JSON: {exc}"]) from None


async def _body(request: web.Request) -> Any:
    return _decode(await request.read())


def _guard(fn):
    """A route that needs the service manager: 503 without one. Its errors become
    responses in the app's middleware (pilus.api.errors)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        agent = request.app[AGENT_KEY]
        mgr = _manager(agent)
        if mgr is None:
            return error_response(503, "service load balancing is not running on this agent")
        return await fn(request, agent, mgr)

    handler.__name__ = fn.__name__
    return handler


@_guard
async def service_list(request, agent, mgr):
    # in a thread: the manager's lock may be held by a large import for seconds
    return web.json_response(await asyncio.to_thread(mgr.frontends))


@_guard
async def service_get(request, agent, mgr):
    svc = await asyncio.to_thread(mgr.get, request.match_info["ns"], request.match_info["name"])
    rows = [r for r in await asyncio.to_thread(mgr.frontends) if r["service"] == svc.full_name]
    return web.json_response({"service": svc.to_json(), "frontends": rows})


@_guard
async def service_put(request, agent, mgr):
    raw = await request.read()
    # decoding, validating and applying 20,000 services takes seconds: off the event loop
    services = await asyncio.to_thread(_parse_services, raw)
    sync = _sync(agent)
    if sync is not None:  # cluster-wide: applied here, then published through the kvstore
        applied = await sync.upsert(services)
    else:
        applied = await asyncio.to_thread(mgr.upsert, services)
    names = {s.full_name for s in applied}
    reply = await asyncio.to_thread(
        lambda: json.dumps({"applied": sorted(names),
                            "frontends": [r for r in mgr.frontends() if r["service"] in names]}))
    return web.Response(text=reply, content_type="application/json")


def _parse_services(raw: bytes) -> list:
    body = _decode(raw)
    if not isinstance(body, dict):
        raise ServiceValidationError(["body: must be a JSON object"])
    if "yaml" in body:
        if not isinstance(body["yaml"], str):
            raise ServiceValidationError(["yaml: must be a string"])
        return parse_documents(body["yaml"])
    if "service" in body:
        if not isinstance(body["service"], dict):
            raise ServiceValidationError(["service: must be a Kubernetes Service object"])
        return [service_from_json(body["service"])]
    if body.get("kind") in ("Service", "List"):
        return parse_objects([body])
    raise ServiceValidationError(
        ['body: expected {"yaml": "..."}, {"service": {...}} or a Kubernetes Service']
    )


@_guard
async def service_delete(request, agent, mgr):
    ns, name = request.match_info["ns"], request.match_info["name"]
    sync = _sync(agent)
    svc = await sync.delete(ns, name) if sync is not None else await asyncio.to_thread(mgr.delete, ns, name)
    return web.json_response({"deleted": svc.full_name})


@_guard
async def service_delete_all(request, agent, mgr):
    everything = request.query.get("all") in ("1", "true", "yes")
    namespace = request.query.get("namespace")
    if not everything and not namespace:
        raise ServiceValidationError(["say which services: ?namespace=NS or ?all=true"])
    sync = _sync(agent)
    if sync is not None:
        n = await sync.delete_all(namespace or None)
    else:
        n = await asyncio.to_thread(mgr.delete_all, namespace or None)
    return web.json_response({"deleted": n})


@_guard
async def backend_state(request, agent, mgr):
    body = await _body(request)
    if not isinstance(body, dict):
        raise ServiceValidationError(["body: must be a JSON object"])
    backend, state = body.get("backend"), body.get("state")
    if not isinstance(backend, str) or ":" not in backend:
        raise ServiceValidationError([f"backend: expected IP:PORT, got {backend!r}"])
    ip, _, port = backend.rpartition(":")
    port = port.split("/")[0]
    try:
        addr = IPv4Address(ip)
        pnum = int(port)
    except ValueError:
        raise ServiceValidationError([f"backend: expected IP:PORT, got {backend!r}"]) from None
    if not 1 <= pnum <= 65535:
        raise ServiceValidationError([f"backend: port must be 1-65535, got {pnum}"])
    if not isinstance(state, str):
        raise ServiceValidationError(["state: required (active, terminating, quarantined, "
                                      "maintenance)"])
    n = await asyncio.to_thread(mgr.set_backend_state, addr, pnum, state)
    return web.json_response({"backend": f"{addr}:{pnum}", "state": state, "backends": n})


async def bpf_lb(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    dp = getattr(agent, "datapath", None)
    if dp is None:
        return error_response(503, "the datapath is not loaded")
    return web.json_response(await asyncio.to_thread(dp.lb.dump))


async def bpf_lb_maglev(request: web.Request) -> web.Response:
    agent = request.app[AGENT_KEY]
    dp = getattr(agent, "datapath", None)
    if dp is None:
        return error_response(503, "the datapath is not loaded")
    raw = request.match_info["id"]
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        return error_response(400, f"service id {raw!r}: expected a number 1-65535")
    scope = request.query.get("scope", "external")
    if scope not in ("external", "internal"):
        return error_response(400, f"scope {scope!r}: expected external or internal")
    table = await asyncio.to_thread(dp.lb.maglev_get, int(raw), 1 if scope == "internal" else 0)
    if table is None:
        return error_response(404, f"service {raw} has no Maglev table (not a Maglev service, "
                           "no active backends, or no such service)")
    counts: dict[int, int] = {}
    for b in table:
        counts[b] = counts.get(b, 0) + 1
    return web.json_response({
        "id": int(raw),
        "scope": scope,
        "size": len(table),
        "backends": [{"id": b, "slots": n} for b, n in sorted(counts.items())],
        "table": table,
    })


def add_service_routes(app: web.Application, agent) -> None:
    """Register the service and LB map routes on the agent's API app."""
    app[AGENT_KEY] = agent
    r = app.router
    r.add_get("/v1/service", service_list)
    r.add_put("/v1/service", service_put)
    r.add_delete("/v1/service", service_delete_all)
    r.add_patch("/v1/service/backend-state", backend_state)
    r.add_get("/v1/service/{ns}/{name}", service_get)
    r.add_delete("/v1/service/{ns}/{name}", service_delete)
    r.add_get("/v1/bpf/lb", bpf_lb)
    r.add_get("/v1/bpf/lb/maglev/{id}", bpf_lb_maglev)
