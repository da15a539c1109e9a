"""Prometheus exposition on a TCP port (`--prometheus-serve-addr`, Cilium's flag), in
the agent's network namespace. Same registry as `GET /v1/metrics/prometheus`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def exposition(registry: CollectorRegistry) -> web.Response:
    """The registry in Prometheus' text format (served here and at /v1/metrics/prometheus)."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def parse_addr(text: str) -> tuple[str, int]:
    """':9962' or '127.0.0.1:9962' -> (host, port); ValueError with what is expected."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected [HOST]:PORT like :9962, got {text!r}")
    return host or "0.0.0.0", int(port)


class PrometheusServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        return exposition(self.registry)
