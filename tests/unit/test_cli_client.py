"""pilus.api.client against a fake agent on a UNIX socket (incl. streaming)."""

from __future__ import annotations

import socket

import pytest
from test_cli_fakeagent import ENDPOINTS, HEALTH, FakeAgent

from pilus.api.client import AgentUnreachable, APIError, Client


@pytest.fixture
def agent():
    fake = FakeAgent().start()
    try:
        yield fake
    finally:
        fake.stop()


def test_get_json(agent):
    c = Client(agent.socket)
    assert c.healthz() == HEALTH
    assert [e["id"] for e in c.list_endpoints()] == [e["id"] for e in ENDPOINTS]
    assert c.bpf_ct_flush() == {"flushed": 7}
    assert agent.requests[-1][:2] == ("DELETE", "/v1/bpf/ct")


def test_endpoint_refs_by_id_and_name(agent):
    c = Client(agent.socket)
    assert c.get_endpoint(1)["name"] == "default/deathstar"
    assert c.get_endpoint("default/xwing")["id"] == 3
    assert agent.requests[-1][1] == "/v1/endpoint/default/xwing"
    assert c.delete_endpoint("default/xwing") == {"deleted": 3}


def test_create_sends_documented_body(agent):
    c = Client(agent.socket)
    ep = c.create_endpoint("default/tiefighter", ["org=empire", "class=tiefighter"], "sa1")
    assert ep["name"] == "default/tiefighter"
    method, path, body = agent.requests[-1]
    assert (method, path) == ("POST", "/v1/endpoint")
    assert body == {"name": "default/tiefighter", "labels": ["org=empire", "class=tiefighter"],
                    "service_account": "sa1"}


def test_api_error_carries_status_and_message(agent):
    c = Client(agent.socket)
    with pytest.raises(APIError) as exc:
        c.get_endpoint("default/nope")
    assert exc.value.status == 404
    assert str(exc.value) == "endpoint default/nope not found"
    with pytest.raises(APIError) as exc:
        c.create_endpoint("default/xwing", ["a=b"])
    assert exc.value.status == 409
    assert "already exists" in exc.value.message


def test_non_json_error_body(agent):
    with pytest.raises(APIError) as exc:
        Client(agent.socket).request("GET", "/boom")
    assert exc.value.status == 500
    assert exc.value.message.startswith("HTTP 500")


def test_unknown_route_is_api_error(agent):
    with pytest.raises(APIError) as exc:
        Client(agent.socket).request("GET", "/nothing-here")
    assert exc.value.status == 404


def test_stream_monitor(agent):
    events = list(Client(agent.socket).stream_monitor())
    assert [e["type"] for e in events] == ["drop", "lost", "trace"]
    assert events[1]["count"] == 5


def test_stream_monitor_query(agent):
    events = list(Client(agent.socket).stream_monitor(type="drop", endpoint=3))
    assert [e["type"] for e in events] == ["drop", "lost"]
    assert agent.requests[-1][1] in ("/v1/monitor?type=drop&endpoint=3",)


def test_unreachable_missing_socket(tmp_path):
    path = str(tmp_path / "pilus.sock")
    with pytest.raises(AgentUnreachable) as exc:
        Client(path).healthz()
    assert str(exc.value) == (f"cannot reach the pilus agent at {path}: is the cluster up? "
                              "(pilus cluster up)")


def test_unreachable_stale_socket(tmp_path):
    path = str(tmp_path / "s")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # file exists, nobody listens -> ECONNREFUSED
    with pytest.raises(AgentUnreachable, match="is the cluster up"):
        Client(path).list_endpoints()
    with pytest.raises(AgentUnreachable):
        Client(path).stream_monitor()


def test_server_closing_without_answer(tmp_path):
    import threading

    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def accept_and_close():
        conn, _ = srv.accept()
        conn.recv(1024)
        conn.close()

    t = threading.Thread(target=accept_and_close)
    t.start()
    try:
        with pytest.raises(AgentUnreachable, match="lost the connection"):
            Client(path).healthz()
    finally:
        t.join(5)
        srv.close()
