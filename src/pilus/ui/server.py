"""``pilus ui``'s web server (aiohttp): the service map page and its data.

One background task reads Hubble flows (``GetFlows`` with ``number`` = the last N and
``follow``) from a Hubble server (the cluster's relay or one node's ``hubble.sock``) into
a ``graph.ServiceMap``; the page gets a namespace's view and then every new flow.

- ``GET /``: the page (``static/index.html``); ``GET /static/{file}``: its script and style.
- ``GET /api/graph?namespace=NS``: the view as JSON: namespaces, nodes, edges (counts, last
  drop reason), table rows (no ``namespace``: the one ``--namespace`` chose; empty: all).
- ``GET /api/stream?namespace=NS``: a WebSocket of JSON messages ``{"type", "data"}``:
  ``snapshot`` (the view), then ``flow`` (a row, its edge, both nodes) for each new flow
  the namespace shows, ``status`` when the connection to Hubble changes. The page sends
  ``{"namespace": NS}`` to choose another namespace and gets its snapshot. (A WebSocket
  rather than Server-Sent Events: headless Chromium's virtual time waits for an open
  EventSource to finish, so ``--dump-dom`` and ``--screenshot`` would never return.)
- ``GET /api/status``: where the flows come from, whether it answers, the last error,
  unavailable nodes.

A subscriber whose queue is full (a page that stopped reading) is closed; the page
connects again and starts from a snapshot. When the Hubble stream ends
the task asks again (1 s, doubling to 5 s) with ``since`` the last flow's time, skipping
flows it already has (by uuid).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from pilus.ui.graph import ServiceMap, flow_row

__all__ = ["FEED", "UISettings", "build_app", "run"]

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
QUEUE_LIMIT = 1000
KEEPALIVE = 15.0
RETRY_FIRST, RETRY_MAX = 1.0, 5.0


@dataclass(frozen=True)
class UISettings:
    """Where to read flows and how much to show."""

    target: str  # a gRPC target: HOST:PORT or unix:PATH
    source: str = ""  # what to call it on the page
    namespace: str = ""  # the namespace the page opens with ("" every namespace)
    last: int = 1000  # flows read at start
    keep: int = 500  # table rows kept


class FlowFeed:
    """The Hubble stream -> the service map -> the pages' queues."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self.map = ServiceMap(keep=settings.keep)
        self.subscribers: dict[asyncio.Queue, str] = {}  # queue -> the namespace it shows
        self.connected = False
        self.error = ""
        self.unavailable: list[str] = []
        self._seen: deque[str] = deque(maxlen=4096)
        self._seen_set: set[str] = set()
        self._since: Any = None

    def status(self) -> dict[str, Any]:
        return {"source": self.settings.source or self.settings.target, "target": self.settings.target,
                "connected": self.connected, "error": self.error, "unavailable_nodes": list(self.unavailable),
                "flows": self.map.flows}

    # -- subscribers --

    def subscribe(self, namespace: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_LIMIT)
        self.subscribers[queue] = namespace
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.pop(queue, None)

    def _publish(self, event: str, data: dict[str, Any], ends: tuple | None = None) -> None:
        for queue, namespace in list(self.subscribers.items()):
            if ends is not None and not ServiceMap.shows(ends, namespace):
                continue
            try:
                queue.put_nowait((event, data))
            except asyncio.QueueFull:
                del self.subscribers[queue]
                while not queue.empty():  # room for the one event that tells the page's handler to end
                    queue.get_nowait()
                queue.put_nowait(("close", {}))
                log.warning("a page stopped reading flows: closed it (it connects again)")

    # -- the Hubble stream --

    def _request(self):
        from pilus.hubble.protos import observer_pb2

        req = observer_pb2.GetFlowsRequest(follow=True)
        if self._since is None:
            req.number = self.settings.last
        else:
            req.since.CopyFrom(self._since)
        return req

    def _take(self, response) -> None:
        kind = response.WhichOneof("response_types")
        if kind == "node_status":
            ns = response.node_status
            from pilus.hubble.protos import relay_pb2

            names = list(ns.node_names)
            if ns.state_change == relay_pb2.NODE_CONNECTED:
                self.unavailable = [n for n in self.unavailable if n not in names]
            elif ns.state_change in (relay_pb2.NODE_UNAVAILABLE, relay_pb2.NODE_GONE):
                self.unavailable = sorted(set(self.unavailable) | set(names))
            self._publish("status", self.status())
            return
        if kind != "flow":
            return
        flow = response.flow
        if flow.uuid:
            if flow.uuid in self._seen_set:
                return
            if len(self._seen) == self._seen.maxlen:
                self._seen_set.discard(self._seen[0])
            self._seen.append(flow.uuid)
            self._seen_set.add(flow.uuid)
        if flow.HasField("time"):
            self._since = flow.time
        row = flow_row(flow)
        edge = self.map.add(row)
        self._publish("flow", {"row": row.to_json(), "edge": edge.to_json(),
                               "nodes": [row.source.to_json(), row.destination.to_json()],
                               "flows": self.map.flows}, ends=(row.source, row.destination))

    async def run_flows(self) -> None:
        """Read flows until cancelled, asking again after a failure."""
        import grpc

        from pilus.hubble.protos import observer_pb2_grpc

        delay = RETRY_FIRST
        while True:
            try:
                async with grpc.aio.insecure_channel(self.settings.target) as channel:
                    await asyncio.wait_for(channel.channel_ready(), timeout=5)
                    stream = observer_pb2_grpc.ObserverStub(channel).GetFlows(self._request())
                    self._set(connected=True, error="")
                    delay = RETRY_FIRST
                    async for response in stream:
                        self._take(response)
                    self._set(connected=False, error="the Hubble stream ended")
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                self._set(connected=False, error=f"{self.settings.target} does not answer")
            except grpc.aio.AioRpcError as exc:
                self._set(connected=False, error=f"{exc.code().name}: {exc.details()}")
            except Exception as exc:  # a flow we cannot read must not end the page's data for good
                log.exception("reading flows from %s", self.settings.target)
                self._set(connected=False, error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _set(self, *, connected: bool, error: str) -> None:
        if (connected, error) != (self.connected, self.error):
            self.connected, self.error = connected, error
            if error:
                log.warning("flows from %s: %s", self.settings.target, error)
            self._publish("status", self.status())


# -- HTTP ------------------------------------------------------------------------------------

#: the application's FlowFeed
FEED = web.AppKey("feed", FlowFeed)
_FEED_TASK = web.AppKey("feed_task", asyncio.Task)

def build_app(settings: UISettings, *, feed: FlowFeed | None = None) -> web.Application:
    """The application; it starts the flow reader on startup and stops it on cleanup
    (a given ``feed`` is used as is and not started: tests feed it themselves)."""
    app = web.Application()
    own = feed is None
    feed = feed or FlowFeed(settings)
    app[FEED] = feed

    def namespace_of(request: web.Request) -> str:
        return request.query.get("namespace", settings.namespace if "namespace" not in request.query else "")

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def graph(request: web.Request) -> web.Response:
        view = feed.map.view(namespace_of(request) or None)
        view["status"] = feed.status()
        return web.json_response(view)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(feed.status())

    def snapshot(namespace: str) -> dict[str, Any]:
        view = feed.map.view(namespace or None)
        view["status"] = feed.status()
        return {"type": "snapshot", "data": view}

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=KEEPALIVE)
        await ws.prepare(request)
        namespace = namespace_of(request)
        queue = feed.subscribe(namespace)

        async def read() -> None:  # the page choosing another namespace
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                with contextlib.suppress(ValueError, AttributeError):
                    wanted = json.loads(msg.data).get("namespace")
                    if isinstance(wanted, str) and queue in feed.subscribers:
                        feed.subscribers[queue] = wanted
                        await ws.send_json(snapshot(wanted))

        reader = asyncio.create_task(read())
        try:
            await ws.send_json(snapshot(namespace))
            while not reader.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                event, data = getter.result()
                if event == "close":
                    break
                await ws.send_json({"type": event, "data": data})
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            feed.unsubscribe(queue)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await ws.close()
        return ws

    async def start_feed(app: web.Application) -> None:
        app[_FEED_TASK] = asyncio.create_task(feed.run_flows(), name="pilus-ui-flows")

    async def stop_feed(app: web.Application) -> None:
        task = app[_FEED_TASK]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def no_stale_page(request: web.Request, response: web.StreamResponse) -> None:
        if request.path == "/" or request.path.startswith("/static/"):  # a new pilus's page, not a cached one
            response.headers["Cache-Control"] = "no-cache"

    app.on_response_prepare.append(no_stale_page)
    app.router.add_get("/", index)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/api/status", status)
    app.router.add_static("/static/", STATIC)
    if own:
        app.on_startup.append(start_feed)
        app.on_cleanup.append(stop_feed)
    return app


def run(settings: UISettings, host: str, port: int) -> None:
    """Serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(f"pilus ui: http://{host}:{port}/ (flows from {settings.source or settings.target})", flush=True)
    web.run_app(build_app(settings), host=host, port=port, print=None, shutdown_timeout=2)
