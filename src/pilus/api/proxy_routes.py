"""The agent's proxy routes (issue 10, part B)."""

from __future__ import annotations

from aiohttp import web


def add_proxy_routes(app: web.Application, agent) -> None:
    """Register the proxy routes on the agent's API app (none yet)."""
