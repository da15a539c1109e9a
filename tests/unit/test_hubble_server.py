"""Hubble's gRPC server on a temporary UNIX socket (no root): HubblePart fed with typed
events (pilus.datapath.events dataclasses) through the real EventHub, called with the
stubs generated from our protos, with plain grpcio calls by method name, and the bytes
of a Flow checked against Hubble's field numbers (shared/reference/hubble-api.md) by a
hand-written protobuf wire reader, so that a wrong number fails here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import grpc
import pytest
from aio_helpers import eventually, run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_hubble_flows import DEATHSTAR_IP, LOOKUP, NODE, T0, WORLD_IP, XWING_IP, drop, packet, trace, verdict

from pilus.datapath import abi
from pilus.datapath.events import MONITOR_TYPES
from pilus.hubble.flows import timestamp
from pilus.hubble.part import HubblePart
from pilus.hubble.protos import flow_pb2, observer_pb2, observer_pb2_grpc, peer_pb2, peer_pb2_grpc, relay_pb2
from pilus.observer.monitor import EventHub

NOTIFY_OF = {name: notify for notify, name in MONITOR_TYPES.items()}


class TypedReader:
    """EventReader's interface handing out typed events (the decoding is tested in
    test_events): ``fileno()`` is a pipe that becomes readable when events are pushed."""

    def __init__(self) -> None:
        self.pending: list = []
        self.records = 0
        self.records_by_type: dict[int, int] = {}
        self.masks: list[int] = []
        self.lost_count = 0
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.closed = False

    def push(self, *events) -> None:
        self.pending.extend(events)
        os.write(self._w, b"x")

    def fileno(self) -> int:
        return self._r

    def poll(self, timeout_ms: int = 0, want=None) -> list:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        events, self.pending = self.pending, []
        self.records += len(events)
        return [e for e in events if want is None or want(NOTIFY_OF[e.kind])]

    def set_listen_mask(self, mask: int) -> None:
        self.masks.append(mask)

    def lost(self) -> int:
        return self.lost_count

    def close(self) -> None:
        if not self.closed:
            os.close(self._r)
            os.close(self._w)
            self.closed = True


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="hubble-", dir="/tmp"))  # short: sun_path holds 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Node:
    """A started hub + HubblePart and a channel to its socket."""

    def __init__(self, sockdir: Path, **kw) -> None:
        self.reader = TypedReader()
        self.hub = EventHub(self.reader)
        self.part = HubblePart(self.hub, LOOKUP, node_name=NODE, socket_path=sockdir / "hubble.sock", **kw)
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Node:
        await self.hub.start()
        await self.part.start()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.part.server.socket_path}")
        return self

    async def __aexit__(self, *exc) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.part.stop()
        await self.hub.stop()

    @property
    def observer(self) -> observer_pb2_grpc.ObserverStub:
        return observer_pb2_grpc.ObserverStub(self.channel)

    async def feed(self, *events) -> None:
        want = self.part.ring.seen_flows + len(events)
        self.reader.push(*events)
        await eventually(lambda: self.part.ring.seen_flows >= want)

    async def flows(self, **req) -> list[observer_pb2.GetFlowsResponse]:
        return [r async for r in self.observer.GetFlows(observer_pb2.GetFlowsRequest(**req))]


def story():
    """xwing's SYN to deathstar is dropped by policy; a world packet to xwing is allowed;
    deathstar's reply to a tiefighter connection is forwarded."""
    return [
        drop(133, t=T0),
        verdict(0, pkt=packet(src=WORLD_IP, dst=XWING_IP), source_ep=5, local=1000, remote=2, t=T0 + 1),
        trace(abi.TRACE_TO_LXC, ct=2, source_ep=5, src_id=1001, t=T0 + 2,
              pkt=packet(src=DEATHSTAR_IP, dst=XWING_IP)),
    ]


def only_flows(responses) -> list[flow_pb2.Flow]:
    return [r.flow for r in responses if r.WhichOneof("response_types") == "flow"]


# -- the protobuf wire format, read by hand ------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def wire_fields(buf: bytes) -> dict[int, list]:
    """field number -> values (ints for varints, bytes for length-delimited)."""
    out: dict[int, list] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wtype = key >> 3, key & 7
        if wtype == 0:
            value, i = _varint(buf, i)
        elif wtype == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wtype == 1:
            value, i = buf[i:i + 8], i + 8
        elif wtype == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise AssertionError(f"wire type {wtype}")
        out.setdefault(number, []).append(value)
    return out


# -- tests ----------------------------------------------------------------------------------

def test_get_flows_returns_the_flows_with_both_ends(sockdir):
    async def main():
        async with Node(sockdir) as node:
            await node.feed(*story())
            flows = only_flows(await node.flows())
            assert [f.verdict for f in flows] == [flow_pb2.DROPPED, flow_pb2.FORWARDED, flow_pb2.FORWARDED]
            dropped = flows[0]
            assert (dropped.source.pod_name, dropped.destination.pod_name) == ("xwing", "deathstar-6c94d")
            assert "k8s:class=xwing" in dropped.source.labels
            assert "k8s:class=deathstar" in dropped.destination.labels
            assert dropped.drop_reason_desc == flow_pb2.POLICY_DENIED
            assert list(flows[1].source.labels) == ["reserved:world"]
            assert all(f.node_name == NODE for f in flows)
            responses = await node.flows(number=1)
            assert len(responses) == 1 and responses[0].node_name == NODE
            assert responses[0].time == responses[0].flow.time
    run(main())


def test_a_flow_on_the_wire_has_hubbles_field_numbers(sockdir):
    async def main():
        async with Node(sockdir) as node:
            await node.feed(drop(133, t=T0))
            # a plain grpcio call by method name, bytes in and out: no stubs of ours involved
            call = node.channel.unary_stream("/observer.Observer/GetFlows",
                                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
            raw = [r async for r in call(b"\x08\x01")]  # GetFlowsRequest{number (1): 1}
            return raw

    (resp,) = run(main())
    r = wire_fields(resp)
    assert r[1000] == [NODE.encode()]  # GetFlowsResponse.node_name
    assert set(r) == {1, 1000, 1001}  # flow, node_name, time
    f = wire_fields(r[1][0])
    assert f[2] == [flow_pb2.DROPPED] == [2]  # verdict
    assert f[3] == [133] and f[25] == [133]  # drop_reason, drop_reason_desc
    assert f[10] == [1]  # Type = L3_L4
    assert f[11] == [NODE.encode()]  # node_name
    assert f[22] == [1]  # traffic_direction INGRESS
    assert len(f[34][0]) == 36  # uuid
    assert f[100000] == [b"TCP Flags: SYN"]  # Summary
    ts = wire_fields(f[1][0])  # time: seconds (1), nanos (2)
    assert ts[1] == [int(T0)] and ts[2] == [250_000_000]
    assert r[1001] == f[1]  # GetFlowsResponse.time is the flow's
    eth = wire_fields(f[4][0])
    assert eth[1] == [b"02:00:00:00:00:05"] and eth[2] == [b"02:00:00:00:01:05"]
    ip = wire_fields(f[5][0])
    assert ip[1] == [XWING_IP.encode()] and ip[2] == [DEATHSTAR_IP.encode()] and ip[3] == [1]  # IPv4
    tcp = wire_fields(wire_fields(f[6][0])[1][0])  # l4.TCP
    assert tcp[1] == [43512] and tcp[2] == [80]
    assert wire_fields(tcp[3][0]) == {2: [1]}  # flags: SYN (2) only
    src = wire_fields(f[8][0])
    assert src[1] == [5] and src[2] == [1000]  # ID, identity
    assert src[3] == [b"default"] and src[5] == [b"xwing"] and src[7] == [b"default"]  # namespace, pod, cluster
    assert b"k8s:class=xwing" in src[4]  # labels
    dst = wire_fields(f[9][0])
    assert dst[1] == [6] and dst[5] == [b"deathstar-6c94d"]
    ev = wire_fields(f[19][0])  # event_type: type (1), sub_type (2)
    assert ev == {1: [1], 2: [133]}
    assert wire_fields(f[28][0]) == {1: [101]}  # interface.index
    assert wire_fields(f[41][0])[1] == [b"pilus"]  # emitter.name


def test_filters_whitelist_blacklist_and_an_invalid_one(sockdir):
    async def main():
        async with Node(sockdir) as node:
            await node.feed(*story())
            drops = only_flows(await node.flows(whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])]))
            assert [f.source.pod_name for f in drops] == ["xwing"]
            to_xwing = only_flows(await node.flows(
                whitelist=[flow_pb2.FlowFilter(destination_pod=["default/xwing"])],
                blacklist=[flow_pb2.FlowFilter(source_label=["reserved:world"])]))
            assert [f.source.pod_name for f in to_xwing] == ["deathstar-6c94d"]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.flows(whitelist=[flow_pb2.FlowFilter(source_port=["http"])])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "source_port: invalid port 'http'" in err.value.details()
    run(main())


def test_number_first_since_until_and_field_mask(sockdir):
    async def main():
        async with Node(sockdir) as node:
            # xwing at even seconds, world at odd ones
            await node.feed(*[drop(133, t=T0 + i, pkt=packet(src=WORLD_IP if i % 2 else XWING_IP),
                                   src_id=2 if i % 2 else 1000) for i in range(10)])

            async def times(**req) -> list[int]:
                # seconds after T0 of the flows returned
                return [f.time.seconds - int(T0) for f in only_flows(await node.flows(**req))]

            assert await times(number=3) == [7, 8, 9]  # the last 3, oldest first
            assert await times(number=3, first=True) == [0, 1, 2]
            assert await times(since=timestamp(T0 + 6.5)) == [7, 8, 9]
            assert await times(until=timestamp(T0 + 1.5)) == [0, 1]
            assert await times(since=timestamp(T0 + 2), until=timestamp(T0 + 4)) == [2, 3, 4]
            assert len(await times()) == 10  # no number: the whole ring
            # number counts flows that pass the filters
            filtered = await times(number=2, whitelist=[flow_pb2.FlowFilter(source_pod=["default/xwing"])])
            assert filtered == [6, 8]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.flows(first=True, follow=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == "first cannot be specified with follow"
            masked = only_flows(await node.flows(number=1, field_mask={"paths": ["source.pod_name", "verdict"]},
                                                 whitelist=[flow_pb2.FlowFilter(source_identity=[1000])]))
            assert masked[0] == flow_pb2.Flow(source=flow_pb2.Endpoint(pod_name="xwing"), verdict=flow_pb2.DROPPED)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.flows(field_mask={"paths": ["no_such_field"]})
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    run(main())


def test_follow_streams_new_flows(sockdir):
    async def main():
        async with Node(sockdir) as node:
            await node.feed(drop(133, t=T0))
            stream = node.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True, number=1))
            it = stream.__aiter__()
            first = await asyncio.wait_for(it.__anext__(), 5)
            assert first.flow.verdict == flow_pb2.DROPPED  # --last 1 before following
            node.reader.push(trace(t=T0 + 1))
            second = await asyncio.wait_for(it.__anext__(), 5)
            assert second.flow.verdict == flow_pb2.FORWARDED
            # follow without number: only what comes next
            only_new = node.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
            it2 = only_new.__aiter__()
            pending = asyncio.ensure_future(it2.__anext__())
            await asyncio.sleep(0.2)
            assert not pending.done()
            node.reader.push(verdict(0, t=T0 + 2))
            third = await asyncio.wait_for(pending, 5)
            assert third.flow.event_type.type == 5
            stream.cancel()
            only_new.cancel()
    run(main())


def test_fifty_followers_each_get_every_new_flow(sockdir):
    async def main():
        async with Node(sockdir) as node:
            streams = [node.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True)) for _ in range(50)]
            iters = [s.__aiter__() for s in streams]
            pending = [asyncio.ensure_future(it.__anext__()) for it in iters]
            await asyncio.sleep(0.3)  # every stream is open and waiting
            node.reader.push(drop(133, t=T0), trace(t=T0 + 1))
            firsts = await asyncio.wait_for(asyncio.gather(*pending), 10)
            seconds = await asyncio.wait_for(asyncio.gather(*(it.__anext__() for it in iters)), 10)
            assert {r.flow.verdict for r in firsts} == {flow_pb2.DROPPED}
            assert {r.flow.verdict for r in seconds} == {flow_pb2.FORWARDED}
            assert len({r.flow.uuid for r in firsts}) == 1  # the same flow for everybody
            for s in streams:
                s.cancel()
    run(main())


def test_a_reader_left_behind_gets_a_lost_event(sockdir):
    async def main():
        async with Node(sockdir, capacity=4) as node:
            await node.feed(drop(133, t=T0))
            stream = node.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True, number=1))
            it = stream.__aiter__()
            assert (await asyncio.wait_for(it.__anext__(), 5)).flow.time == timestamp(T0)
            # while the client does not read, the ring wraps under it
            await node.part.ring.wait(0)
            node.part.ingest([drop(133, t=T0 + i) for i in range(1, 11)])
            kinds = []
            while len([k for k in kinds if k == "flow"]) < 4:
                r = await asyncio.wait_for(it.__anext__(), 5)
                kinds.append(r.WhichOneof("response_types"))
                if kinds[-1] == "lost_events":
                    assert r.lost_events.source == flow_pb2.HUBBLE_RING_BUFFER
                    assert r.lost_events.num_events_lost == 6  # flows 1..6 were overwritten
            assert kinds == ["lost_events", "flow", "flow", "flow", "flow"]
            stream.cancel()
    run(main())


def test_events_the_hub_could_not_queue_become_a_lost_event(sockdir):
    async def main():
        async with Node(sockdir) as node:
            from pilus.observer.monitor import LostEvents
            node.part.ingest([LostEvents(7), drop(133, t=T0)])
            node.reader.lost_count = 5  # the datapath's counter went up by 5
            node.part._lost_checked = 0.0
            node.part.ingest([])
            responses = await node.flows()
            lost = [r.lost_events for r in responses if r.WhichOneof("response_types") == "lost_events"]
            assert [(e.source, e.num_events_lost) for e in lost] == [
                (flow_pb2.OBSERVER_EVENTS_QUEUE, 7), (flow_pb2.PERF_EVENT_RING_BUFFER, 5)]
            status = node.part.status()
            assert status["lost"] == 12 and status["lost_by_source"] == {
                "OBSERVER_EVENTS_QUEUE": 7, "PERF_EVENT_RING_BUFFER": 5}
    run(main())


def test_server_status_nodes_namespaces_and_the_empty_event_streams(sockdir):
    async def main():
        async with Node(sockdir, capacity=100) as node:
            await node.feed(*story())
            status = await node.observer.ServerStatus(observer_pb2.ServerStatusRequest())
            assert (status.num_flows, status.max_flows, status.seen_flows) == (3, 100, 3)
            assert status.uptime_ns > 0 and status.version.startswith("pilus-")
            nodes = (await node.observer.GetNodes(observer_pb2.GetNodesRequest())).nodes
            assert [(n.name, n.state, n.num_flows, n.max_flows) for n in nodes] == [
                (NODE, relay_pb2.NODE_CONNECTED, 3, 100)]
            namespaces = (await node.observer.GetNamespaces(observer_pb2.GetNamespacesRequest())).namespaces
            assert [(n.cluster, n.namespace) for n in namespaces] == [("default", "default")]
            agent = [r async for r in node.observer.GetAgentEvents(observer_pb2.GetAgentEventsRequest())]
            debug = [r async for r in node.observer.GetDebugEvents(observer_pb2.GetDebugEventsRequest(number=5))]
            assert agent == [] and debug == []
            follow = node.observer.GetAgentEvents(observer_pb2.GetAgentEventsRequest(follow=True))
            pending = asyncio.ensure_future(follow.__aiter__().__anext__())
            await asyncio.sleep(0.1)
            assert not pending.done()  # kept open while following
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, StopAsyncIteration):
                await pending
            st = node.part.status()
            assert (st["current_flows"], st["max_flows"], st["seen_flows"], st["ok"]) == (3, 100, 3, True)
            assert st["flows_per_second"] >= 0
    run(main())


def test_health_and_peer(sockdir):
    async def main():
        async with Node(sockdir) as node:
            health = health_pb2_grpc.HealthStub(node.channel)
            for service in ("", "hubble.server.Observer"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            notify = peer_pb2_grpc.PeerStub(node.channel).Notify(peer_pb2.NotifyRequest())
            first = await asyncio.wait_for(notify.__aiter__().__anext__(), 5)
            assert (first.name, first.type) == (NODE, peer_pb2.PEER_ADDED)
            assert first.address == f"unix://{node.part.server.socket_path}"
            notify.cancel()
    run(main())


def test_tcp_listener_and_a_taken_port(sockdir):
    async def main():
        async with Node(sockdir, tcp_address="127.0.0.1:0") as node:
            port = node.part.server.tcp_port
            assert port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                notify = peer_pb2_grpc.PeerStub(ch).Notify(peer_pb2.NotifyRequest())
                first = await asyncio.wait_for(notify.__aiter__().__anext__(), 5)
                assert first.address == f"127.0.0.1:{port}"
                notify.cancel()
                await node.feed(drop(133))
                responses = [r async for r in observer_pb2_grpc.ObserverStub(ch).GetFlows(
                    observer_pb2.GetFlowsRequest())]
                assert len(responses) == 1
            second = Node(sockdir / "b", tcp_address=f"127.0.0.1:{port}")
            with pytest.raises(OSError, match="cannot listen"):
                await second.part.start()
            assert second.part.server._server is None
    run(main())


def test_event_types_limit_the_subscription(sockdir):
    async def main():
        async with Node(sockdir, event_types=frozenset({"drop", "policy-verdict"})) as node:
            assert node.reader.masks[-1] == (1 << abi.NOTIFY_DROP) | (1 << abi.NOTIFY_POLICY_VERDICT)
            await node.feed(drop(133, t=T0))
            node.reader.push(trace(t=T0 + 1))  # not subscribed: the hub does not pass it on
            await node.feed(verdict(0, t=T0 + 2))
            assert [f.event_type.type for f in only_flows(await node.flows())] == [1, 5]
    run(main())


def test_an_empty_listen_host_means_every_address(sockdir):
    async def main():
        async with Node(sockdir, tcp_address=":0") as node:
            port = node.part.server.tcp_port
            # nothing to tell a relay but the socket: the listen address names no host
            assert node.part.server.peer_address == f"unix://{node.part.server.socket_path}"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                status = await observer_pb2_grpc.ObserverStub(ch).ServerStatus(observer_pb2.ServerStatusRequest())
                assert status.max_flows == 4095
        async with Node(sockdir, tcp_address=":0", peer_address="10.0.0.1:4244") as node:
            notify = peer_pb2_grpc.PeerStub(node.channel).Notify(peer_pb2.NotifyRequest())
            first = await asyncio.wait_for(notify.__aiter__().__anext__(), 5)
            assert first.address == "10.0.0.1:4244"
            notify.cancel()
    run(main())


def test_stop_ends_followers_and_removes_the_socket(sockdir):
    async def main():
        node = Node(sockdir)
        await node.__aenter__()
        stream = node.observer.GetFlows(observer_pb2.GetFlowsRequest(follow=True))
        pending = asyncio.ensure_future(stream.__aiter__().__anext__())
        await asyncio.sleep(0.1)
        sock = node.part.server.socket_path
        assert sock.exists()
        assert node.reader.masks[-1] != 0  # the datapath emits for Hubble
        await node.part.stop()
        assert node.reader.masks[-1] == 0  # nobody listens any more
        with contextlib.suppress(StopAsyncIteration, grpc.aio.AioRpcError):
            await asyncio.wait_for(pending, 5)
        assert not sock.exists()
        await node.channel.close()
        await node.hub.stop()
        # nothing answers on the socket path any more
        with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
            s.connect(str(sock))
    run(main())


class TablePeers:
    """A PeerSource over a table the test changes (the agent's is the node registry)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table, self.callbacks = dict(table), []

    def current(self) -> dict[str, str]:
        return dict(self.table)

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def set(self, table: dict[str, str]) -> None:
        self.table = dict(table)
        for cb in list(self.callbacks):
            cb(dict(table))


def test_peer_notify_follows_the_cluster_table(sockdir):
    async def main():
        peers = TablePeers({"c1/n1": "10.0.0.1:4244", "c1/n2": "10.0.0.2:4244"})
        async with Node(sockdir, peers=peers) as node:
            notify = peer_pb2_grpc.PeerStub(node.channel).Notify(peer_pb2.NotifyRequest())
            it = notify.__aiter__()

            async def nxt():
                n = await asyncio.wait_for(it.__anext__(), 5)
                return (n.name, n.address, n.type)

            assert [await nxt(), await nxt()] == [("c1/n1", "10.0.0.1:4244", peer_pb2.PEER_ADDED),
                                                  ("c1/n2", "10.0.0.2:4244", peer_pb2.PEER_ADDED)]
            peers.set({"c1/n1": "10.0.0.9:4244", "c1/n3": "10.0.0.3:4244"})
            assert {await nxt(), await nxt(), await nxt()} == {
                ("c1/n2", "", peer_pb2.PEER_DELETED), ("c1/n1", "10.0.0.9:4244", peer_pb2.PEER_UPDATED),
                ("c1/n3", "10.0.0.3:4244", peer_pb2.PEER_ADDED)}
            notify.cancel()
            await asyncio.sleep(0.1)
            assert peers.callbacks == []  # the stream's subscription ended with it
    run(main())
