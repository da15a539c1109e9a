"""The HTTP/1.1 side of the proxy on loopback (a plain listener: no root needed): verdicts,
keep-alive across a 403, pipelining, chunked bodies, 100-continue, upgrades, bad input."""

from __future__ import annotations

import socket
import time

import pytest
from test_proxy_support import EchoServer, ProxyThread, free_port, plain_listener, read_response, wait_records

RULES = [
    {"method": "GET|HEAD", "path": "/public/.*"},
    {"method": "POST", "path": "/upload"},
    {"method": "GET", "path": "/ws"},
    {"method": "GET", "path": "/secure", "headerMatches": [
        {"name": "Authorization", "secret": {"namespace": "default", "name": "token"}, "mismatch": "REPLACE"}]},
]


@pytest.fixture
def env():
    echo = EchoServer()
    port = free_port()
    proxy = ProxyThread(plain_listener(port, echo.port, RULES), identities={"127.0.0.1": 1234},
                        secrets={"default/token": "Bearer s3cret"})
    try:
        yield proxy, port
    finally:
        proxy.close()
        echo.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n".encode()


def test_allowed_denied_and_keepalive_after_403(env):
    proxy, port = env
    with connect(port) as s:
        buf = bytearray()
        s.sendall(get("/public/a"))
        status, _, body = read_response(s, buf)
        assert status == 200 and b'"path": "/public/a"' in body
        s.sendall(get("/exhaust-port", "PUT", "Content-Length: 3\r\n") + b"abc")
        status, headers, body = read_response(s, buf)
        assert (status, body) == (403, b"Access denied\r\n")
        assert headers.get("connection") != "close"
        s.sendall(get("/public/b"))  # the same connection goes on
        status, _, body = read_response(s, buf)
        assert status == 200 and b"/public/b" in body
    recs = wait_records(proxy, 3)
    assert [(r["method"], r["path"], r["status"], r["verdict"]) for r in recs] == [
        ("GET", "/public/a", 200, "FORWARDED"), ("PUT", "/exhaust-port", 403, "DENIED"),
        ("GET", "/public/b", 200, "FORWARDED")]
    assert recs[0]["source"]["identity"] == 1234 and recs[0]["url"] == "http://svc/public/a"
    st = proxy.server.status()["listeners"][0]
    assert (st["forwarded"], st["denied"], st["parse_errors"]) == (2, 1, 0)


def test_pipelined_requests_answered_in_order(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/public/1") + get("/nope") + get("/public/3"))
        buf = bytearray()
        answers = [read_response(s, buf) for _ in range(3)]
    assert [a[0] for a in answers] == [200, 403, 200]
    assert b"/public/1" in answers[0][2] and b"/public/3" in answers[2][2]


def test_chunked_body_is_forwarded(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/upload", "POST", "Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        status, _, body = read_response(s, bytearray())
    assert status == 200 and b'"body": "hello world"' in body


def test_expect_100_continue(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/upload", "POST", "Content-Length: 4\r\nExpect: 100-continue\r\n"))
        buf = bytearray()
        status, _, _ = read_response(s, buf)
        assert status == 100
        s.sendall(b"data")
        status, _, body = read_response(s, buf)
    assert status == 200 and b'"body": "data"' in body


def test_header_replaced_from_secret(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/secure", extra="Authorization: guess\r\n"))
        status, _, body = read_response(s, bytearray())
    assert status == 200 and b'"Authorization", "Bearer s3cret"' in body and b"guess" not in body


def test_websocket_upgrade_becomes_a_tunnel(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"))
        buf = bytearray()
        status, _, _ = read_response(s, buf)
        assert status == 101
        s.sendall(b"ping-frame")
        got = bytes(buf)
        while len(got) < len(b"ping-frame"):
            got += s.recv(100)
    assert got == b"ping-frame"


def test_denied_upgrade_is_403_and_closed(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/chat", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        status, headers, _ = read_response(s, bytearray())
        assert status == 403 and headers["connection"] == "close"
        assert s.recv(10) == b""


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
    (b"GET /public/x HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /public/x HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431),
])
def test_bad_requests_are_refused_and_counted(env, raw, status):
    proxy, port = env
    with connect(port) as s:
        s.sendall(raw)
        got, headers, _ = read_response(s, bytearray())
        assert got == status and headers["connection"] == "close"
    deadline = time.monotonic() + 2
    while proxy.server.status()["listeners"][0]["parse_errors"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.server.status()["listeners"][0]["parse_errors"] == 1
    assert proxy.sink.records == []


def test_upstream_down_is_503():
    port = free_port()
    proxy = ProxyThread(plain_listener(port, free_port(), []))
    try:
        with connect(port) as s:
            s.sendall(get("/"))
            status, _, body = read_response(s, bytearray())
        assert status == 503 and body.startswith(b"upstream connect error")
        assert wait_records(proxy, 1)[0]["verdict"] == "ERROR"
    finally:
        proxy.close()


def test_reload_keeps_open_connections_and_applies_new_rules(env):
    proxy, port = env
    with connect(port) as s:
        buf = bytearray()
        s.sendall(get("/other"))
        assert read_response(s, buf)[0] == 403
        cfg = plain_listener(port, proxy.server.config.listeners[0].upstream[1], [{"path": "/other"}])
        from pilus.proxy.config import ProxyConfig
        proxy.call(proxy.server.reload(ProxyConfig.from_dict(cfg)))
        s.sendall(get("/other"))  # same connection, new rules
        assert read_response(s, buf)[0] == 200
    assert proxy.server.status()["generation"] == 2


def test_head_response_has_no_body_and_the_connection_goes_on(env):
    _, port = env
    with connect(port) as s:
        buf = bytearray()
        s.sendall(get("/public/h", "HEAD"))
        s.settimeout(5)
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert b"Content-Length" in head and rest == b""  # the length is announced, no body follows
        buf.clear()
        s.sendall(get("/public/after-head"))
        status, _, body = read_response(s, buf)
    assert status == 200 and b"/public/after-head" in body


def test_denied_expect_continue_is_403_and_closed(env):
    _, port = env
    with connect(port) as s:
        s.sendall(get("/nope", "POST", "Content-Length: 4\r\nExpect: 100-continue\r\n"))
        status, headers, _ = read_response(s, bytearray())
        assert status == 403 and headers["connection"] == "close"


def test_a_slow_client_does_not_stall_others(env):
    _, port = env
    with connect(port) as slow, connect(port) as fast:
        slow.sendall(b"GET /public/slow HTTP/1.1\r\nHo")  # and nothing more for now
        t0 = time.monotonic()
        fast.sendall(get("/public/fast"))
        assert read_response(fast, bytearray())[0] == 200
        assert time.monotonic() - t0 < 2
        slow.sendall(b"st: x\r\n\r\n")
        assert read_response(slow, bytearray())[0] == 200


def test_egress_listener_judges_by_the_destination_identity():
    from test_proxy_support import EchoServer as _Echo

    echo = _Echo()
    port = free_port()
    config = {"listeners": [{"port": port, "address": "127.0.0.1", "direction": "egress", "transparent": False,
                             "upstream": f"127.0.0.1:{echo.port}", "rules": [
                                 {"endpoint": 3, "endpoint_ips": ["127.0.0.1"], "peers": [4242],
                                  "http": [{"path": "/out/.*"}]}]}]}
    proxy = ProxyThread(config, identities={"127.0.0.1": 4242})
    try:
        with connect(port) as s:
            buf = bytearray()
            s.sendall(get("/out/ok"))
            assert read_response(s, buf)[0] == 200
            s.sendall(get("/in"))
            assert read_response(s, buf)[0] == 403
        recs = wait_records(proxy, 2)
        assert [(r["direction"], r["endpoint"], r["destination"]["identity"]) for r in recs] == [
            ("egress", 3, 4242), ("egress", 3, 4242)]
    finally:
        proxy.close()
        echo.close()


def test_an_upstream_that_closed_its_idle_connection_is_reopened():
    """A server that answers one request per connection (Connection: close not sent)."""
    import socketserver
    import threading

    class OneShot(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                data += self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            # and close, without telling the client it would

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), OneShot)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    port = free_port()
    proxy = ProxyThread(plain_listener(port, srv.server_address[1], []))
    try:
        with connect(port) as s:
            buf = bytearray()
            for _ in range(3):
                s.sendall(get("/x"))
                time.sleep(0.05)  # the server's close arrives before the next request
                assert read_response(s, buf)[:3:2] == (200, b"ok")
    finally:
        proxy.close()
        srv.shutdown()
        srv.server_close()


def test_after_connection_close_the_client_closes_first(env):
    """The proxy answers `Connection: close` and then waits for the client's FIN, so the
    TIME_WAIT state (and its hold on the 4-tuple) stays on the client's side."""
    proxy, port = env
    with connect(port) as s:
        buf = bytearray()
        s.sendall(get("/public/a", extra="Connection: close\r\n"))
        status, headers, _ = read_response(s, buf)
        assert status == 200
        time.sleep(0.3)
        s.setblocking(False)
        with pytest.raises(BlockingIOError):  # no FIN from the proxy yet
            s.recv(1)
    deadline = time.monotonic() + 5
    while proxy.server.status()["listeners"][0]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.server.status()["listeners"][0]["active"] == 0  # our FIN ended it at once
