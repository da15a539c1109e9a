"""The agent's proxy routes (issue 10, part B).

  GET /v1/proxy    the L7 proxy: listener ports, its process (pid, running, restarts,
                   started), config generation, per-listener counters (from the proxy's
                   control socket) and the redirects per endpoint (pilus proxy status)

Errors are {"error": "..."} (pilus.api.errors): 503 when the agent has no proxy row running.
"""

from __future__ import annotations

from aiohttp import web

from pilus.api.errors import error_response

AGENT_KEY: web.AppKey = web.AppKey("pilus_proxy_agent", object)


def add_proxy_routes(app: web.Application, agent) -> None:
    """Register the proxy routes on the agent's API app."""
    app[AGENT_KEY] = agent
    app.router.add_get("/v1/proxy", proxy_status)


async def proxy_status(request: web.Request) -> web.Response:
    proxy = getattr(request.app[AGENT_KEY], "proxy", None)
    if proxy is None:
        return error_response(503, "the L7 proxy is not running in this agent (is the agent still starting?)")
    return web.json_response(await proxy.status())
