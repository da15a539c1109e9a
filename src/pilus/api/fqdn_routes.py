"""The agent's FQDN cache routes (issue 11): the DNS names the DNS proxy saw answered, per
endpoint, as Cilium's ``/fqdn/cache`` (``cilium-dbg fqdn cache list|clean``).

  GET    /v1/fqdn/cache?endpoint=ID&matchpattern=PATTERN
         a list of {endpoint, fqdn, ips, ttl, lookup_time, expiration_time, source}
         (source "lookup", or "connection" for an expired name a connection still uses)
  DELETE /v1/fqdn/cache?endpoint=ID
         forget the entries (of one endpoint, else all): {"deleted": n}

The agent's ``fqdn`` object answers (``cache_list(endpoint, pattern)``,
``cache_clean(endpoint)``); 503 while it has none, 400 naming the parameter for a bad
endpoint id, pattern or an unknown parameter.
"""

from __future__ import annotations

from aiohttp import web

from pilus.api.errors import error_response
from pilus.endpoint.manager import MAX_ENDPOINT_ID
from pilus.fqdn.matchpattern import validate_pattern

AGENT_KEY: web.AppKey = web.AppKey("pilus_fqdn_agent", object)

LIST_PARAMS = ("endpoint", "matchpattern")
CLEAN_PARAMS = ("endpoint",)


class _BadParameter(Exception):
    pass


def add_fqdn_routes(app: web.Application, agent) -> None:
    """Register the FQDN cache routes on the agent's API app."""
    app[AGENT_KEY] = agent
    app.router.add_get("/v1/fqdn/cache", fqdn_cache_list)
    app.router.add_delete("/v1/fqdn/cache", fqdn_cache_clean)


def _params(request: web.Request, known: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for key, value in request.query.items():
        if key not in known:
            raise _BadParameter(f"unknown query parameter {key[:64]!r} (known: {', '.join(known)})")
        if key in out:
            raise _BadParameter(f"{key}: given more than once")
        if value != "":  # ?endpoint= is no filter
            out[key] = value
    return out


def _endpoint(params: dict[str, str]) -> int | None:
    text = params.get("endpoint")
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_ENDPOINT_ID:
        raise _BadParameter(f"endpoint: must be an endpoint id (1-{MAX_ENDPOINT_ID}), got {text[:64]!r}")
    return int(text)


def _pattern(params: dict[str, str]) -> str | None:
    text = params.get("matchpattern")
    if text is None:
        return None
    try:
        return validate_pattern(text)
    except ValueError as exc:
        raise _BadParameter(f"matchpattern: {exc}") from None


def _fqdn(request: web.Request):
    return getattr(request.app[AGENT_KEY], "fqdn", None)


NO_FQDN = "the agent has no FQDN cache (no DNS proxy running yet: is the agent still starting?)"


async def fqdn_cache_list(request: web.Request) -> web.Response:
    try:
        params = _params(request, LIST_PARAMS)
        endpoint, pattern = _endpoint(params), _pattern(params)
    except _BadParameter as exc:
        return error_response(400, str(exc))
    fqdn = _fqdn(request)
    if fqdn is None:
        return error_response(503, NO_FQDN)
    return web.json_response(await fqdn.cache_list(endpoint, pattern))


async def fqdn_cache_clean(request: web.Request) -> web.Response:
    try:
        endpoint = _endpoint(_params(request, CLEAN_PARAMS))
    except _BadParameter as exc:
        return error_response(400, str(exc))
    fqdn = _fqdn(request)
    if fqdn is None:
        return error_response(503, NO_FQDN)
    return web.json_response({"deleted": await fqdn.cache_clean(endpoint)})
