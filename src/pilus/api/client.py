"""Synchronous client of the agent's REST API (HTTP/1.1 over a UNIX socket).

The CLI is a thin layer over this module: every method returns the decoded JSON
of one documented endpoint (see ``openapi.yaml``); failures raise ``APIError``
(the agent answered with 4xx/5xx) or ``AgentUnreachable`` (nobody answered).
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

API_PREFIX = "/v1"
DEFAULT_TIMEOUT = 60.0


class ClientError(Exception):
    """Base class of the errors raised by :class:`Client`."""


class APIError(ClientError):
    """The agent answered with an error status; ``message`` is its one-line explanation."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body  # the decoded JSON error body (e.g. a policy's "errors" list), if any

    def __str__(self) -> str:
        return self.message


class AgentUnreachable(ClientError):
    """Nothing (or nothing we may talk to) is listening on the agent's socket."""

    def __init__(self, socket_path: str, detail: str | None = None):
        self.socket_path = socket_path
        self.detail = detail
        msg = (
            detail
            or f"cannot reach the pilus agent at {socket_path}: "
            "is the cluster up? (pilus cluster up)"
        )
        super().__init__(msg)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection whose transport is a UNIX stream socket."""

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT):
        # the host only feeds the Host: header
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def unix_http(
    socket_path: str | Path,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One HTTP request on a UNIX socket: (status, decoded JSON or text), whatever the
    status. OSError if nobody answers (for callers that poll, like ``cluster up``)."""
    conn = UnixHTTPConnection(str(socket_path), timeout)
    try:
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    except http.client.HTTPException as e:
        raise OSError(f"bad HTTP answer on {socket_path}: {e}") from None
    finally:
        conn.close()


def _ref_path(ref: int | str) -> str:
    """Path segment(s) of an endpoint reference: ``7`` or ``ns/name``."""
    ref = str(ref)
    if "/" in ref:
        ns, name = ref.split("/", 1)
        return f"{quote(ns, safe='')}/{quote(name, safe='')}"
    return quote(ref, safe="")


class Client:
    """Client of one agent, addressed by the path of its UNIX socket."""

    def __init__(self, socket_path: str, timeout: float | None = DEFAULT_TIMEOUT):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    # -- plumbing -------------------------------------------------------------

    def _open(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[UnixHTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(self.socket_path, timeout=timeout)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, API_PREFIX + path, body=payload, headers=headers)
            resp = conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            conn.close()
            raise AgentUnreachable(self.socket_path) from e
        except PermissionError as e:
            conn.close()
            raise AgentUnreachable(
                self.socket_path,
                f"permission denied on the pilus agent socket {self.socket_path}: run as root",
            ) from e
        except TimeoutError as e:
            conn.close()
            raise AgentUnreachable(
                self.socket_path,
                f"the pilus agent at {self.socket_path} did not answer {method} {path} "
                f"within {timeout:g}s",
            ) from e
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            conn.close()
            raise AgentUnreachable(
                self.socket_path,
                f"lost the connection to the pilus agent at {self.socket_path}: "
                f"{e or type(e).__name__}",
            ) from e
        if resp.status >= 400:
            try:
                raw = resp.read()
            except (http.client.HTTPException, OSError):
                raw = b""
            conn.close()
            raise APIError(resp.status, _error_message(resp.status, resp.reason, raw),
                           _error_body(raw))
        return conn, resp

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request to ``/v1<path>``; return the decoded JSON body (None if empty)."""
        conn, resp = self._open(method, path, body, timeout=self.timeout)
        try:
            raw = resp.read()
        except (http.client.HTTPException, OSError) as e:
            raise AgentUnreachable(
                self.socket_path,
                f"lost the connection to the pilus agent at {self.socket_path}: {e}",
            ) from e
        finally:
            conn.close()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise APIError(
                resp.status, f"the agent sent a response that is not JSON: {raw[:80]!r}"
            ) from e

    # -- API --------------------------------------------------------------------

    def healthz(self) -> dict:
        return self.request("GET", "/healthz")

    status = healthz

    def list_endpoints(self) -> list[dict]:
        return self.request("GET", "/endpoint") or []

    def get_endpoint(self, ref: int | str) -> dict:
        return self.request("GET", f"/endpoint/{_ref_path(ref)}")

    def create_endpoint(self, name: str, labels: list[str],
                        service_account: str | None = None,
                        named_ports: dict[str, str] | None = None) -> dict:
        body: dict[str, Any] = {"name": name, "labels": list(labels)}
        if service_account is not None:
            body["service_account"] = service_account
        if named_ports:
            body["named_ports"] = dict(named_ports)  # {"http": "80/TCP"}
        return self.request("POST", "/endpoint", body)

    def delete_endpoint(self, ref: int | str) -> dict:
        return self.request("DELETE", f"/endpoint/{_ref_path(ref)}")

    def relabel_endpoint(self, ref: int | str, add: list[str], delete: list[str]) -> dict:
        """{"endpoint": ..., "previous_identity": N} after deleting, then adding, pod labels."""
        return self.request("PATCH", f"/endpoint/{_ref_path(ref)}/labels",
                            {"add": list(add), "delete": list(delete)})

    def list_identities(self) -> list[dict]:
        return self.request("GET", "/identity") or []

    def get_identity(self, ident: int | str) -> dict:
        return self.request("GET", f"/identity/{quote(str(ident), safe='')}")

    def list_nodes(self) -> list[dict]:
        """Every node in the cluster's node registry, the local one marked."""
        return self.request("GET", "/node") or []

    def proxy_status(self) -> dict:
        """The L7 proxy: ports, process, listeners' counters, redirects (GET /v1/proxy)."""
        return self.request("GET", "/proxy")

    def bpf_ipcache(self) -> list[dict]:
        return self.request("GET", "/bpf/ipcache") or []

    def bpf_tunnel(self) -> list[dict]:
        return self.request("GET", "/bpf/tunnel") or []

    def bpf_endpoints(self) -> list[dict]:
        return self.request("GET", "/bpf/endpoint") or []

    def bpf_ct(self) -> list[dict]:
        return self.request("GET", "/bpf/ct") or []

    def bpf_ct_flush(self) -> dict:
        return self.request("DELETE", "/bpf/ct")

    def bpf_metrics(self) -> list[dict]:
        return self.request("GET", "/bpf/metrics") or []

    def metrics(self) -> list[dict]:
        return self.request("GET", "/metrics") or []

    # -- policy and namespaces --------------------------------------------------

    def get_policy(self) -> dict:
        """``{"revision": n, "policies": [documents]}``."""
        return self.request("GET", "/policy") or {}

    def import_policy(self, text: str) -> dict:
        """Import YAML/JSON policy text (multi-document or a List), all or nothing."""
        return self.request("PUT", "/policy", {"yaml": text}) or {}

    def delete_policy(self, name: str | None = None, namespace: str | None = None,
                      all: bool = False) -> dict:  # noqa: A002 - mirrors the query
        if all:
            query = {"all": "true"}
        else:
            query = {"name": name or ""}
            if namespace:
                query["namespace"] = namespace
        return self.request("DELETE", f"/policy?{urlencode(query)}") or {}

    def trace_policy(self, request: dict) -> dict:
        return self.request("POST", "/policy/trace", request) or {}

    def policy_selectors(self) -> list[dict]:
        return self.request("GET", "/policy/selectors") or []

    def bpf_policy(self, ref: int | str) -> dict:
        return self.request("GET", f"/bpf/policy/{_ref_path(ref)}") or {}

    def list_namespaces(self) -> list[dict]:
        return self.request("GET", "/namespace") or []

    def put_namespace(self, name: str, labels: dict[str, str]) -> dict:
        return self.request("PUT", f"/namespace/{quote(name, safe='')}",
                            {"labels": dict(labels)})

    def delete_namespace(self, name: str) -> dict:
        return self.request("DELETE", f"/namespace/{quote(name, safe='')}")

    def openapi(self) -> str:
        conn, resp = self._open("GET", "/openapi.yaml", timeout=self.timeout)
        try:
            return resp.read().decode()
        finally:
            conn.close()

    def stream_monitor(self, type: str | None = None,  # noqa: A002 - mirrors the query
                       endpoint: int | str | None = None) -> Iterator[dict]:
        """Open the event stream and return an iterator of events (dicts).

        The request is made before this returns (so ``APIError``/``AgentUnreachable``
        are raised here); the iterator then yields events as the agent sends them
        until it closes the stream. Lines that are not JSON objects are skipped.
        Closing the iterator closes the connection.
        """
        query = {}
        if type:
            query["type"] = type
        if endpoint is not None:
            query["endpoint"] = str(endpoint)
        path = "/monitor" + (f"?{urlencode(query)}" if query else "")
        # connect with a timeout, then wait for events as long as it takes
        conn, resp = self._open("GET", path, timeout=self.timeout)
        if conn.sock is not None:
            conn.sock.settimeout(None)
        return self._events(conn, resp)

    def _events(self, conn: UnixHTTPConnection,
                resp: http.client.HTTPResponse) -> Iterator[dict]:
        try:
            while True:
                try:
                    line = resp.readline()
                except (http.client.HTTPException, OSError) as e:
                    raise AgentUnreachable(
                        self.socket_path,
                        f"lost the connection to the pilus agent at {self.socket_path}: {e}",
                    ) from e
                if not line:
                    return
                line = line.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event
        finally:
            conn.close()

    # -- services (load balancing) ---------------------------------------------

    def list_services(self) -> list[dict]:
        return self.request("GET", "/service") or []

    def get_service(self, namespace: str, name: str) -> dict:
        return self.request("GET", f"/service/{quote(namespace, safe='')}/{quote(name, safe='')}")

    def put_service(self, yaml_text: str | None = None, service: dict | None = None) -> dict:
        """Create or replace services: Kubernetes YAML (Service + optional
        Endpoints/EndpointSlice) or one Kubernetes Service as a dict."""
        body = {"yaml": yaml_text} if yaml_text is not None else {"service": service}
        return self.request("PUT", "/service", body)

    def delete_service(self, namespace: str, name: str) -> dict:
        return self.request(
            "DELETE", f"/service/{quote(namespace, safe='')}/{quote(name, safe='')}"
        )

    def delete_services(self, namespace: str | None = None, all: bool = False) -> dict:  # noqa: A002
        """Delete every service of ``namespace``, or every service (``all``)."""
        query = {"namespace": namespace} if namespace else {"all": "true" if all else ""}
        return self.request("DELETE", f"/service?{urlencode(query)}")

    def set_backend_state(self, backend: str, state: str) -> dict:
        return self.request("PATCH", "/service/backend-state",
                            {"backend": backend, "state": state})

    def bpf_lb(self) -> list[dict]:
        return self.request("GET", "/bpf/lb") or []

    def bpf_lb_maglev(self, service_id: int, scope: str = "external") -> dict:
        q = "" if scope == "external" else f"?scope={quote(scope)}"
        return self.request("GET", f"/bpf/lb/maglev/{int(service_id)}{q}")


def _error_body(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(status: int, reason: str, raw: bytes) -> str:
    text = raw.decode(errors="replace").strip()
    if text:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict) and body.get("error"):
            return " ".join(str(body["error"]).split())
        if body is None:
            first = text.splitlines()[0]
            return f"HTTP {status} {reason}: {first[:200]}"
    return f"HTTP {status} {reason}".strip()
