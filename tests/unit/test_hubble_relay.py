"""Hubble Relay (pilus.hubble.relay) over two real node servers (pilus.hubble.server on
loopback TCP, rings filled directly), no root: nodes found through peer.Peer/Notify,
flows of both merged by time with number/first, node_status at the start of a stream,
a node that stops reported NODE_UNAVAILABLE while the other's flows keep coming and its
stream resuming when it is back, GetNodes, ServerStatus, GetNamespaces and health."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from aio_helpers import eventually, run
from google.protobuf.field_mask_pb2 import FieldMask
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pilus.hubble.flows import timestamp
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc, relay_pb2
from pilus.hubble.relay import Relay, merge_flows
from pilus.hubble.ring import FlowRing
from pilus.hubble.server import HubbleServer

T0 = 1_750_000_000.0


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="relay-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def flow(node: str, t: float, pod: str, *, verdict=flow_pb2.FORWARDED, namespace="default") -> flow_pb2.Flow:
    f = flow_pb2.Flow(node_name=node, verdict=verdict, Type=flow_pb2.L3_L4, time=timestamp(t))
    f.source.namespace, f.source.pod_name = namespace, pod
    f.destination.namespace, f.destination.pod_name = namespace, "deathstar"
    return f


class Cluster:
    """Node servers (two unless told) on 127.0.0.1 and a relay over them (Notify of each)."""

    def __init__(self, sockdir: Path, nodes: int = 2) -> None:
        self.sockdir = sockdir
        self.rings = {f"n{i}": FlowRing(100) for i in range(1, nodes + 1)}
        self.servers: dict[str, HubbleServer] = {}
        self.ports: dict[str, int] = {}
        self.relay: Relay | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start_node(self, name: str) -> None:
        port = self.ports.get(name, 0)
        server = HubbleServer(self.rings[name], node_name=name, socket_path=self.sockdir / f"{name}.sock",
                              tcp_address=f"127.0.0.1:{port}")
        await server.start()
        self.servers[name], self.ports[name] = server, server.tcp_port

    async def stop_node(self, name: str) -> None:
        await self.servers.pop(name).stop()

    async def __aenter__(self) -> Cluster:
        for name in self.rings:
            await self.start_node(name)
        self.relay = Relay("127.0.0.1:0", [f"127.0.0.1:{p}" for p in self.ports.values()], health_interval=0.2)
        await self.relay.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.relay.port}")
        await eventually(lambda: sum(p.connected for p in self.relay.peers.snapshot()) == len(self.rings), timeout=5)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.relay.stop()
        for name in list(self.servers):
            await self.stop_node(name)

    @property
    def observer(self) -> observer_pb2_grpc.ObserverStub:
        return observer_pb2_grpc.ObserverStub(self.channel)

    async def get_flows(self, **req) -> list[observer_pb2.GetFlowsResponse]:
        return [r async for r in self.observer.GetFlows(observer_pb2.GetFlowsRequest(**req), timeout=10)]


def kinds(responses) -> list[str]:
    return [r.WhichOneof("response_types") for r in responses]


def pods(responses) -> list[str]:
    return [r.flow.source.pod_name for r in responses if r.WhichOneof("response_types") == "flow"]


def test_flows_of_both_nodes_are_merged_by_time_and_number_keeps_the_newest(sockdir):
    async def main():
        async with Cluster(sockdir) as c:
            for i in range(4):
                c.rings["n1"].push(flow("n1", T0 + 2 * i, f"a{i}"))
                c.rings["n2"].push(flow("n2", T0 + 2 * i + 1, f"b{i}"))
            everything = await c.get_flows()
            assert kinds(everything)[0] == "node_status"
            opening = everything[0].node_status
            assert opening.state_change == relay_pb2.NODE_CONNECTED and list(opening.node_names) == ["n1", "n2"]
            assert pods(everything) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
            assert pods(await c.get_flows(number=3)) == ["b2", "a3", "b3"]
            assert pods(await c.get_flows(number=3, first=True)) == ["a0", "b0", "a1"]
            only_b = await c.get_flows(number=2, whitelist=[flow_pb2.FlowFilter(source_pod=["default/b"])])
            assert pods(only_b) == ["b2", "b3"] and {r.node_name for r in only_b if r.HasField("flow")} == {"n2"}
    run(main())


def test_a_bad_filter_is_invalid_argument_once(sockdir):
    async def main():
        async with Cluster(sockdir) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.get_flows(whitelist=[flow_pb2.FlowFilter(source_ip=["not-an-ip"])])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not-an-ip" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.get_flows(follow=True, first=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.get_flows(field_mask=FieldMask(paths=["no_such_field"]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no_such_field" in err.value.details()
            c.rings["n2"].push(flow("n2", T0, "b"))
            masked = [r for r in await c.get_flows(field_mask=FieldMask(paths=["source.pod_name"]))
                      if r.HasField("flow")]
            assert [r.flow for r in masked] == [flow_pb2.Flow(source=flow_pb2.Endpoint(pod_name="b"))]
            assert masked[0].node_name == "n2"
    run(main())


def test_nodes_status_namespaces_and_health(sockdir):
    async def main():
        async with Cluster(sockdir) as c:
            c.rings["n1"].push(flow("n1", T0, "a", namespace="rebels"))
            c.rings["n2"].push(flow("n2", T0 + 1, "b"))
            c.rings["n2"].push(flow("n2", T0 + 2, "b"))
            nodes = (await c.observer.GetNodes(observer_pb2.GetNodesRequest(), timeout=5)).nodes
            assert [(n.name, n.state) for n in nodes] == [("n1", relay_pb2.NODE_CONNECTED),
                                                          ("n2", relay_pb2.NODE_CONNECTED)]
            assert [n.num_flows for n in nodes] == [1, 2] and nodes[0].address == f"127.0.0.1:{c.ports['n1']}"
            status = await c.observer.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
            assert (status.num_flows, status.max_flows, status.seen_flows) == (3, 200, 3)
            assert status.num_connected_nodes.value == 2 and status.num_unavailable_nodes.value == 0
            spaces = (await c.observer.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=5)).namespaces
            assert [s.namespace for s in spaces] == ["default", "rebels"]
            check = await health_pb2_grpc.HealthStub(c.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            await c.stop_node("n2")
            await eventually(lambda: not c.relay.peers.peers["n2"].connected, timeout=5)
            status = await c.observer.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
            assert status.num_connected_nodes.value == 1 and status.num_unavailable_nodes.value == 1
            assert list(status.unavailable_nodes) == ["n2"] and status.num_flows == 1
            nodes = (await c.observer.GetNodes(observer_pb2.GetNodesRequest(), timeout=5)).nodes
            assert [(n.name, n.state) for n in nodes] == [("n1", relay_pb2.NODE_CONNECTED),
                                                          ("n2", relay_pb2.NODE_UNAVAILABLE)]
            got = await c.get_flows()
            assert [(r.node_status.state_change, list(r.node_status.node_names)) for r in got
                    if r.HasField("node_status")] == [(relay_pb2.NODE_CONNECTED, ["n1"]),
                                                      (relay_pb2.NODE_UNAVAILABLE, ["n2"])]
            assert pods(got) == ["a"]
    run(main())


def test_follow_goes_on_when_a_node_goes_and_resumes_when_it_is_back(sockdir):
    async def main():
        async with Cluster(sockdir) as c:
            stream = c.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=30)
            seen: list[observer_pb2.GetFlowsResponse] = []

            async def read():
                async for r in stream:
                    seen.append(r)

            reader = asyncio.create_task(read())
            try:
                await eventually(lambda: len(seen) >= 1)  # the opening node_status
                await asyncio.sleep(0.2)  # both node streams are open
                c.rings["n1"].push(flow("n1", T0, "a0"))
                c.rings["n2"].push(flow("n2", T0 + 1, "b0"))
                await eventually(lambda: sorted(pods(seen)) == ["a0", "b0"])
                await c.stop_node("n2")

                def unavailable():
                    return [list(r.node_status.node_names) for r in seen if r.HasField("node_status")
                            and r.node_status.state_change == relay_pb2.NODE_UNAVAILABLE]
                await eventually(lambda: unavailable() == [["n2"]], timeout=5)
                c.rings["n1"].push(flow("n1", T0 + 2, "a1"))
                await eventually(lambda: "a1" in pods(seen))
                c.rings["n2"].push(flow("n2", T0 + 3, "b1"))  # while n2 is down
                await c.start_node("n2")  # same ring and port: the node is back
                await eventually(lambda: "b1" in pods(seen), timeout=5)
                assert pods(seen).count("b0") == 1  # resumed after the last flow sent
            finally:
                stream.cancel()
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader
    run(main(), timeout=40)


def test_merge_keeps_lost_events_in_the_window():
    def r(t, pod=None):
        if pod is None:
            return observer_pb2.GetFlowsResponse(lost_events=flow_pb2.LostEvent(num_events_lost=1), time=timestamp(t))
        return observer_pb2.GetFlowsResponse(flow=flow("n", t, pod), time=timestamp(t))

    merged = merge_flows([[r(1, "a"), r(3), r(4, "b")], [r(2, "c"), r(5, "d")]], 3)
    assert kinds(merged) == ["flow", "lost_events", "flow", "flow"] and pods(merged) == ["c", "b", "d"]
    assert pods(merge_flows([[r(1, "a"), r(4, "b")], [r(2, "c")]], 2, first=True)) == ["a", "c"]


def test_the_cluster_runs_its_relay_on_the_bridge_address_with_every_node_as_target():
    from pilus.cluster import plan

    doc = plan.build_cluster_doc(plan.ClusterSpec(name="c1", nodes=2))
    assert doc["relay_address"] == "172.30.0.1:4245"
    argv = plan.relay_argv(doc, "/usr/bin/python3")
    assert argv == ["/usr/bin/python3", "-m", "pilus.hubble.relay", "--listen-address", "172.30.0.1:4245",
                    "--peer-target", "172.30.0.11:4244", "--peer-target", "172.30.0.12:4244"]


def test_follow_puts_the_nodes_backlogs_in_time_order_and_reports_a_deleted_node_gone(sockdir):
    from pilus.hubble.protos import peer_pb2

    async def main():
        async with Cluster(sockdir) as c:
            for i in range(2):
                c.rings["n1"].push(flow("n1", T0 + 2 * i, f"a{i}"))
                c.rings["n2"].push(flow("n2", T0 + 2 * i + 1, f"b{i}"))
            stream = c.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True, number=2), timeout=30)
            seen: list[observer_pb2.GetFlowsResponse] = []

            async def read():
                async for r in stream:
                    seen.append(r)

            reader = asyncio.create_task(read())
            try:
                await eventually(lambda: len(pods(seen)) == 4)
                assert pods(seen) == ["a0", "b0", "a1", "b1"]  # one time line, not node by node
                c.relay.peers.apply(peer_pb2.ChangeNotification(name="n2", type=peer_pb2.PEER_DELETED))
                await eventually(lambda: any(r.HasField("node_status") and r.node_status.state_change ==
                                             relay_pb2.NODE_GONE for r in seen))
                assert [n.name for n in (await c.observer.GetNodes(observer_pb2.GetNodesRequest())).nodes] == ["n1"]
                c.rings["n1"].push(flow("n1", T0 + 9, "a9"))
                await eventually(lambda: "a9" in pods(seen))
            finally:
                stream.cancel()
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader
    run(main(), timeout=40)


def test_the_sort_buffer_holds_at_most_its_size_and_drains_in_order():
    from pilus.hubble.relay import _SortBuffer

    def r(t):
        return observer_pb2.GetFlowsResponse(flow=flow("n", t, f"p{t}"), time=timestamp(t))

    buf = _SortBuffer(size=2, drain=10.0)
    assert buf.timeout() is None
    assert buf.push(r(3)) == [] and buf.push(r(1)) == []
    assert 9.0 < buf.timeout() <= 10.0
    assert pods(buf.push(r(2))) == ["p1"]  # full: the oldest goes out
    assert pods(buf.drain()) == ["p2", "p3"] and buf.timeout() is None


def test_follow_passes_flows_of_the_same_time_and_a_resume_skips_only_those_sent(sockdir):
    from pilus.hubble.relay import _Sent

    async def main():
        async with Cluster(sockdir) as c:
            stream = c.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True), timeout=30)
            seen: list[observer_pb2.GetFlowsResponse] = []

            async def read():
                async for r in stream:
                    seen.append(r)

            reader = asyncio.create_task(read())
            try:
                await eventually(lambda: len(seen) >= 1)
                await asyncio.sleep(0.2)
                for pod in ("verdict", "drop"):  # one packet: a policy verdict and a drop, same time
                    f = flow("n1", T0, pod)
                    f.uuid = pod
                    c.rings["n1"].push(f)
                await eventually(lambda: sorted(pods(seen)) == ["drop", "verdict"])
            finally:
                stream.cancel()
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader
    run(main(), timeout=40)

    def r(t, uuid):
        f = flow("n", t, uuid)
        f.uuid = uuid
        return observer_pb2.GetFlowsResponse(flow=f, time=timestamp(t))

    sent = _Sent()
    assert [sent.fresh(x) for x in (r(1, "a"), r(2, "b"), r(2, "c"))] == [True, True, True]
    # resumed with since = 2: the node sends b and c again, and d of the same time for the first time
    assert [sent.fresh(x) for x in (r(2, "b"), r(2, "c"), r(2, "d"), r(3, "e"))] == [False, False, True, True]


def test_three_nodes_are_merged_and_listed(sockdir):
    async def main():
        async with Cluster(sockdir, nodes=3) as c:
            for i, name in enumerate(c.rings):
                for j in range(3):
                    c.rings[name].push(flow(name, T0 + 3 * j + i, f"{name}-{j}"))
            got = await c.get_flows(number=5)
            assert pods(got) == ["n2-1", "n3-1", "n1-2", "n2-2", "n3-2"]
            assert list(got[0].node_status.node_names) == ["n1", "n2", "n3"]
            nodes = (await c.observer.GetNodes(observer_pb2.GetNodesRequest(), timeout=5)).nodes
            assert [(n.name, n.state, n.num_flows) for n in nodes] == [
                (name, relay_pb2.NODE_CONNECTED, 3) for name in ("n1", "n2", "n3")]
            status = await c.observer.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=5)
            assert (status.num_flows, status.num_connected_nodes.value) == (9, 3)
    run(main())
