"""REST routes of the secrets headerMatches use (issue 10, part B); the server calls
``add_secret_routes``.

  GET    /v1/secret                 every secret: namespace, name, type, keys and sizes
  PUT    /v1/secret                 {"yaml": "<Secret YAML/JSON, multi-document or a v1 List>"}
  GET    /v1/secret/{ns}/{name}     one secret (no values)
  DELETE /v1/secret/{ns}/{name}

No answer ever carries a value. Errors are {"error": "..."}: 400 invalid input (with
"errors": one "<field path>: <reason>" per problem), 404 unknown secret, 503 no kvstore.
"""

from __future__ import annotations

import json

from aiohttp import web

from pilus.api.errors import error_response
from pilus.secrets import SecretDistribution, SecretNotFound, SecretValidationError


def add_secret_routes(app: web.Application, agent) -> None:
    """Register the secret routes on the agent's API app."""

    def dist() -> SecretDistribution | None:
        store = getattr(agent, "store", None)
        return SecretDistribution(store) if store is not None else None

    def guard(fn):
        async def handler(request: web.Request) -> web.Response:
            d = dist()
            if d is None:
                return error_response(503, "this agent has no kvstore: secrets are not available")
            try:
                return await fn(request, d)
            except SecretValidationError as exc:
                n = len(exc.errors)
                return error_response(400, f"secrets not imported ({n} problem{'s' if n != 1 else ''}); "
                                           "nothing was written", errors=exc.errors)
            except SecretNotFound as exc:
                return error_response(404, str(exc))
        return handler

    async def secret_list(request: web.Request, d: SecretDistribution) -> web.Response:
        return web.json_response({"secrets": [s.summary() for s in await d.list()]})

    async def secret_import(request: web.Request, d: SecretDistribution) -> web.Response:
        text = await request.text()
        if request.content_type == "application/json":
            try:
                body = json.loads(text)
            except json.JSONDecodeError as exc:
                # position only: the body may hold secret values
                return error_response(400, f"request body is not JSON (line {exc.lineno} column {exc.colno})")
            if isinstance(body, dict) and isinstance(body.get("yaml"), str):
                text = body["yaml"]
        secrets = await d.import_text(text)
        return web.json_response({"imported": [s.summary() for s in secrets]})

    async def secret_get(request: web.Request, d: SecretDistribution) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        s = await d.get(ns, name)
        if s is None:
            raise SecretNotFound(f"secret {ns}/{name} not found")
        return web.json_response(s.summary())

    async def secret_delete(request: web.Request, d: SecretDistribution) -> web.Response:
        ns, name = request.match_info["ns"], request.match_info["name"]
        await d.delete(ns, name)
        return web.json_response({"deleted": f"{ns}/{name}"})

    r = app.router
    r.add_get("/v1/secret", guard(secret_list))
    r.add_put("/v1/secret", guard(secret_import))
    r.add_get("/v1/secret/{ns}/{name}", guard(secret_get))
    r.add_delete("/v1/secret/{ns}/{name}", guard(secret_delete))
