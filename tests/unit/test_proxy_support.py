"""Shared by the proxy unit tests (no tests here): an echo HTTP/1.1 server, a proxy on a thread, raw clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pilus.proxy.config import ProxyConfig
from pilus.proxy.http_rules import DictSecretStore
from pilus.proxy.identity import DictIdentityResolver
from pilus.proxy.records import ListSink
from pilus.proxy.server import ProxyServer


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with JSON: method, path, the client address it sees, headers, body."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while data := self.connection.recv(65536):  # echo the tunnel's bytes
                self.connection.sendall(data)
            self.close_connection = True
            return
        out = json.dumps({"method": self.command, "path": self.path, "client": self.client_address[0],
                          "headers": [[k, v] for k, v in self.headers.items()],
                          "body": body.decode("latin-1")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args) -> None:
        pass


class EchoServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), EchoHandler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyThread:
    """A ProxyServer on its own event loop thread; ``call`` runs a coroutine on it."""

    def __init__(self, config: dict, identities: dict[str, int] | None = None, secrets: dict[str, str] | None = None):
        self.sink = ListSink()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ProxyServer(ProxyConfig.from_dict(config), DictIdentityResolver(identities or {}),
                                  DictSecretStore(secrets or {}), self.sink)
        self.call(self.server.start())

    def call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def plain_listener(port: int, upstream_port: int, http: list | None, *, peers=None, name="test") -> dict:
    return {"listeners": [{"name": name, "port": port, "address": "127.0.0.1", "direction": "ingress",
                           "transparent": False, "upstream": f"127.0.0.1:{upstream_port}",
                           "rules": [] if http is None else [{"peers": peers, "http": http}]}]}


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with Content-Length from a raw socket (leftover stays in buf)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; got {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    buf[:] = rest[n:]
    return status, headers, rest[:n]


def wait_records(proxy: ProxyThread, n: int, timeout: float = 3.0) -> list[dict]:
    """Records are written once a response has been relayed: wait for the n-th."""
    import time

    deadline = time.monotonic() + timeout
    while len(proxy.sink.records) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    return list(proxy.sink.records)


class GrpcDoorServer:
    """A grpcio server with generic handlers (raw bytes, no .proto): cilium.examples.DoorManager
    GetName echoes the request with a prefix and the metadata key x-token; OpenDoor answers b"open"."""

    SERVICE = "cilium.examples.DoorManager"

    def __init__(self, address: str = "127.0.0.1:0"):
        from concurrent import futures

        import grpc

        def get_name(request: bytes, context) -> bytes:
            token = dict(context.invocation_metadata()).get("x-token", "")
            return b"name:" + request + b";token:" + token.encode() + b";peer:" + context.peer().encode()

        def open_door(request: bytes, context) -> bytes:
            return b"open"

        handlers = {
            "GetName": grpc.unary_unary_rpc_method_handler(get_name),
            "OpenDoor": grpc.unary_unary_rpc_method_handler(open_door),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(self.SERVICE, handlers),))
        self.port = self.server.add_insecure_port(address)
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


def grpc_call(target: str, method: str, payload: bytes, metadata=(), timeout: float = 5.0):
    """(response bytes or None, status code name) of one unary call with raw bytes."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/{GrpcDoorServer.SERVICE}/{method}")
        try:
            return call(payload, metadata=metadata, timeout=timeout), "OK"
        except grpc.RpcError as e:
            return None, e.code().name


def _main(argv: list[str]) -> int:
    """``python test_proxy_support.py http PORT | grpc PORT | grpc-call TARGET METHOD PAYLOAD [KEY=VALUE]``:
    the servers and the gRPC client the e2e tests run inside namespaces."""
    import sys

    server: EchoServer | GrpcDoorServer
    if argv[0] == "http":
        server = EchoServer("0.0.0.0", int(argv[1]))
    elif argv[0] == "grpc":
        server = GrpcDoorServer(f"0.0.0.0:{argv[1]}")
    elif argv[0] == "grpc-call":
        meta = tuple(tuple(kv.split("=", 1)) for kv in argv[4:])
        reply, code = grpc_call(argv[1], argv[2], argv[3].encode(), metadata=meta)
        print(json.dumps({"code": code, "reply": reply.decode("latin-1") if reply is not None else None}))
        return 0
    print("ready", flush=True)
    sys.stdin.read()  # serve until the test closes our stdin or kills us
    server.close()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
