"""The service map without root: flows -> boxes and edges (pilus.ui.graph), and the
server (pilus.ui.server) reading a Hubble Observer on a UNIX socket and serving the page,
the graph and the live WebSocket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from aiohttp.test_utils import TestClient, TestServer
from google.protobuf.wrappers_pb2 import BoolValue

from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc
from pilus.ui.graph import ServiceMap, flow_row
from pilus.ui.server import FEED, UISettings, build_app


def flow(src: str, dst: str, verdict: int = flow_pb2.FORWARDED, *, reason: int = 0, sport: int = 40000,
         dport: int = 80, ns: str = "default", dst_ns: str | None = None, reply: bool | None = None,
         second: int = 0, src_labels: tuple[str, ...] = (), uuid: str = "") -> flow_pb2.Flow:
    f = flow_pb2.Flow(verdict=verdict, drop_reason_desc=reason, node_name="c/c-node1", uuid=uuid)
    f.time.FromSeconds(1_764_700_000 + second)
    f.IP.source, f.IP.destination = "10.0.0.1", "10.0.0.2"
    if src == "world":
        f.source.identity = 2
        f.source.labels.append("reserved:world")
    else:
        f.source.namespace, f.source.pod_name = ns, src
        f.source.labels.extend(src_labels or (f"k8s:class={src}",))
    f.destination.namespace, f.destination.pod_name = dst_ns or ns, dst
    f.destination.labels.append(f"k8s:class={dst}")
    f.l4.TCP.source_port, f.l4.TCP.destination_port = sport, dport
    if reply is not None:
        f.is_reply.CopyFrom(BoolValue(value=reply))
    return f


def test_a_pod_is_its_namespace_and_app_label_else_its_pod_name():
    row = flow_row(flow("web-7f9c", "db", src_labels=("k8s:app=web", "k8s:class=x")))
    assert row.source.id == "default/web" and row.source.name == "web" and row.source_pod == "default/web-7f9c"
    assert row.destination.id == "default/db" and row.destination.kind == "workload"
    assert flow_row(flow("a", "b", src_labels=("k8s:app.kubernetes.io/name=shop",))).source.id == "default/shop"


def test_a_reserved_peer_is_an_entity_without_namespace():
    row = flow_row(flow("world", "web"))
    assert (row.source.id, row.source.kind, row.source.namespace) == ("world", "entity", "")
    assert row.source_pod == "world"


def test_a_reply_counts_for_the_connection_it_answers():
    row = flow_row(flow("db", "web", sport=5432, dport=41000, reply=True))
    assert (row.source.id, row.destination.id, row.port, row.protocol) == ("default/web", "default/db", 5432, "TCP")
    assert flow_row(flow("web", "db", dport=5432, reply=False)).edge_key == row.edge_key


def test_edges_count_forwarded_and_dropped_with_the_last_reason():
    m = ServiceMap()
    m.add(flow_row(flow("tiefighter", "deathstar")))
    m.add(flow_row(flow("xwing", "deathstar", flow_pb2.DROPPED, reason=flow_pb2.POLICY_DENIED)))
    m.add(flow_row(flow("xwing", "deathstar", flow_pb2.DROPPED, reason=flow_pb2.CT_MAP_INSERTION_FAILED)))
    m.add(flow_row(flow("xwing", "deathstar", flow_pb2.DROPPED, reason=flow_pb2.POLICY_DENIED)))
    m.add(flow_row(flow("xwing", "deathstar", flow_pb2.AUDIT)))
    m.add(flow_row(flow("xwing", "deathstar", dport=443)))
    edges = {e["id"]: e for e in m.view()["edges"]}
    x = edges["default/xwing->default/deathstar:80/TCP"]
    assert (x["forwarded"], x["dropped"], x["audit"], x["state"]) == (0, 3, 1, "dropped")
    assert x["last_reason"] == "POLICY_DENIED" and x["reasons"] == {"POLICY_DENIED": 2, "CT_MAP_INSERTION_FAILED": 1}
    assert edges["default/xwing->default/deathstar:443/TCP"]["state"] == "forwarded"
    tie = edges["default/tiefighter->default/deathstar:80/TCP"]
    assert (tie["forwarded"], tie["dropped"], tie["last_reason"]) == (1, 0, "")
    assert m.flows == 6 and [r["verdict"] for r in m.view()["rows"]][:2] == ["FORWARDED", "DROPPED"]


def test_a_forwarded_flow_has_no_drop_reason():
    assert flow_row(flow("a", "b", flow_pb2.FORWARDED, reason=flow_pb2.POLICY_DENIED)).reason == ""


def test_a_namespace_view_shows_the_edges_with_an_end_in_it_and_their_peers():
    m = ServiceMap(keep=3)
    m.add(flow_row(flow("web", "db", ns="shop")))
    m.add(flow_row(flow("client", "web", ns="other", dst_ns="shop")))
    m.add(flow_row(flow("a", "b", ns="other")))
    m.add(flow_row(flow("world", "web", ns="shop")))
    shop = m.view("shop")
    assert {n["id"] for n in shop["nodes"]} == {"shop/web", "shop/db", "other/client", "world"}
    assert len(shop["edges"]) == 3 and m.namespaces() == ["other", "shop"]
    assert len(m.view()["rows"]) == 3  # the table keeps the newest `keep`
    assert m.view("nothing")["edges"] == [] and m.view(rows=0)["rows"] == []


class Observer(observer_pb2_grpc.ObserverServicer):
    """Two flows, then more when the test puts them in ``later``; the stream stays open."""

    def __init__(self) -> None:
        self.requests: list[observer_pb2.GetFlowsRequest] = []
        self.later: asyncio.Queue = asyncio.Queue()

    async def GetFlows(self, request, context):  # noqa: N802 (gRPC's name)
        self.requests.append(request)
        yield observer_pb2.GetFlowsResponse(flow=flow("tiefighter", "deathstar", uuid="1"))
        yield observer_pb2.GetFlowsResponse(flow=flow("xwing", "deathstar", flow_pb2.DROPPED,
                                                      reason=flow_pb2.POLICY_DENIED, uuid="2"))
        yield observer_pb2.GetFlowsResponse(flow=flow("tiefighter", "deathstar", uuid="1"))  # seen: skipped
        while True:
            yield observer_pb2.GetFlowsResponse(flow=await self.later.get())


async def _wait(predicate, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_the_server_serves_the_page_the_graph_and_live_flows(tmp_path: Path):
    async def main() -> None:
        sock = tmp_path / "hubble.sock"
        observer = Observer()
        grpc_server = grpc.aio.server()
        observer_pb2_grpc.add_ObserverServicer_to_server(observer, grpc_server)
        grpc_server.add_insecure_port(f"unix:{sock}")
        await grpc_server.start()
        app = build_app(UISettings(target=f"unix:{sock}", source="test", namespace="default", last=50))
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            page = await client.get("/")
            assert page.status == 200 and "<svg id=\"map\"" in await page.text()
            assert (await client.get("/static/app.js")).status == 200

            async def graph(query: str = "") -> dict:
                return await (await client.get("/api/graph" + query)).json()
            view: dict = {}

            async def poll() -> None:
                nonlocal view
                while len((view := await graph())["edges"]) < 2:
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(poll(), 5)
            assert observer.requests[0].follow and observer.requests[0].number == 50
            assert view["namespace"] == "default" and view["status"]["connected"] and view["flows"] == 2
            dropped = [e for e in view["edges"] if e["state"] == "dropped"]
            assert [(e["source"], e["last_reason"]) for e in dropped] == [("default/xwing", "POLICY_DENIED")]
            assert (await graph("?namespace=other"))["edges"] == []

            ws = await client.ws_connect("/api/stream")
            snap = await ws.receive_json(timeout=5)
            assert snap["type"] == "snapshot" and len(snap["data"]["edges"]) == 2
            await observer.later.put(flow("xwing", "deathstar", flow_pb2.DROPPED, reason=flow_pb2.POLICY_DENIED,
                                          uuid="3"))
            live = await ws.receive_json(timeout=5)
            assert live["type"] == "flow" and live["data"]["edge"]["dropped"] == 2
            await ws.send_json({"namespace": "other"})
            other = await ws.receive_json(timeout=5)
            assert other["type"] == "snapshot" and other["data"]["namespace"] == "other"
            await observer.later.put(flow("tiefighter", "deathstar", uuid="4"))  # not in "other": not sent
            await observer.later.put(flow("a", "b", ns="other", uuid="5"))
            live = await ws.receive_json(timeout=5)
            assert live["data"]["row"]["source"] == "other/a"
            await ws.close()
            await _wait(lambda: not app[FEED].subscribers)
        finally:
            await client.close()
            await grpc_server.stop(None)

    asyncio.run(main())


def test_the_page_says_when_hubble_does_not_answer(tmp_path: Path):
    async def main() -> None:
        app = build_app(UISettings(target=f"unix:{tmp_path / 'missing.sock'}", source="nowhere"))
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            feed = app[FEED]
            await _wait(lambda: feed.error, timeout=10)
            status = await (await client.get("/api/status")).json()
            assert status["connected"] is False and status["error"] and status["source"] == "nowhere"
        finally:
            await client.close()

    asyncio.run(main())


def test_a_reason_or_verdict_our_protos_do_not_name_is_kept_as_a_number():
    row = flow_row(flow("a", "b", flow_pb2.DROPPED, reason=9999))
    assert row.reason == "DROP_REASON_9999" and row.verdict == "DROPPED"
    assert flow_row(flow("a", "b", 77)).verdict == "VERDICT_77"
