"""HTTP/2 prior knowledge through the proxy with grpcio on both ends (loopback, no root)."""

from __future__ import annotations

import pytest
from test_proxy_support import GrpcDoorServer, ProxyThread, free_port, grpc_call, plain_listener, wait_records

RULES = [
    {"method": "POST", "path": "/cilium.examples.DoorManager/GetName", "headerMatches": [
        {"name": "x-token", "secret": {"namespace": "default", "name": "door"}, "mismatch": "ADD"}]},
]


@pytest.fixture
def env():
    door = GrpcDoorServer()
    port = free_port()
    proxy = ProxyThread(plain_listener(port, door.port, RULES), identities={"127.0.0.0/8": 77},
                        secrets={"default/door": "t0k3n"})
    try:
        yield proxy, port
    finally:
        proxy.close()
        door.close()


def test_allowed_method_passes_with_added_header(env):
    proxy, port = env
    reply, code = grpc_call(f"127.0.0.1:{port}", "GetName", b"luke")
    assert code == "OK" and reply.startswith(b"name:luke;token:t0k3n")
    rec = wait_records(proxy, 1)[0]
    assert (rec["protocol"], rec["method"], rec["path"], rec["status"], rec["grpc_status"], rec["verdict"]) == (
        "HTTP/2", "POST", "/cilium.examples.DoorManager/GetName", 200, 0, "FORWARDED")
    assert rec["header_mismatches"] == [{"name": "x-token", "action": "ADD"}]


def test_denied_method_is_permission_denied(env):
    proxy, port = env
    reply, code = grpc_call(f"127.0.0.1:{port}", "OpenDoor", b"")
    assert (reply, code) == (None, "PERMISSION_DENIED")
    rec = wait_records(proxy, 1)[0]
    assert (rec["path"], rec["grpc_status"], rec["verdict"]) == ("/cilium.examples.DoorManager/OpenDoor", 7, "DENIED")


def test_many_calls_and_a_large_message_on_one_connection(env):
    import grpc

    proxy, port = env
    big = b"x" * 300_000  # beyond the default 64 KiB windows: flow control end to end
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        get_name = ch.unary_unary(f"/{GrpcDoorServer.SERVICE}/GetName")
        open_door = ch.unary_unary(f"/{GrpcDoorServer.SERVICE}/OpenDoor")
        for i in range(20):
            assert get_name(b"n%d" % i, timeout=5).startswith(b"name:n%d" % i)
        with pytest.raises(grpc.RpcError) as e:
            open_door(b"", timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert get_name(big, timeout=10).startswith(b"name:" + big)
    recs = wait_records(proxy, 22)
    assert [r["verdict"] for r in recs].count("DENIED") == 1 and len(recs) == 22
    st = proxy.server.status()["listeners"][0]
    assert (st["forwarded"], st["denied"]) == (21, 1)


def test_trailers_only_error_from_the_server_is_recorded(env):
    proxy, port = env
    upstream = proxy.server.config.listeners[0].upstream[1]
    cfg = plain_listener(port, upstream, [{"path": "/cilium.examples.DoorManager/.*"}])
    from pilus.proxy.config import ProxyConfig
    proxy.call(proxy.server.reload(ProxyConfig.from_dict(cfg)))
    reply, code = grpc_call(f"127.0.0.1:{port}", "NoSuchMethod", b"")
    assert (reply, code) == (None, "UNIMPLEMENTED")
    rec = wait_records(proxy, 1)[0]
    assert (rec["verdict"], rec["grpc_status"]) == ("FORWARDED", 12)
