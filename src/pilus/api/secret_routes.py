"""The agent's secret routes (issue 10, part B)."""

from __future__ import annotations

from aiohttp import web


def add_secret_routes(app: web.Application, agent) -> None:
    """Register the secret routes on the agent's API app (none yet)."""
