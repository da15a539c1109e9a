"""A fake pilus agent for CLI tests: aiohttp on a UNIX socket in a thread, serving
canned JSON of the documented shapes (see src/pilus/api/openapi.yaml)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from pathlib import Path

from aiohttp import web

ENDPOINTS = [
    {"id": 3, "name": "default/xwing", "namespace": "default", "pod_name": "xwing",
     "state": "ready", "identity": 23456,
     "labels": ["k8s:org=alliance", "k8s:class=xwing",
                "k8s:io.cilium.k8s.policy.cluster=default",
                "k8s:io.cilium.k8s.policy.serviceaccount=default",
                "k8s:io.kubernetes.pod.namespace=default"],
     "ipv4": "10.200.1.4", "mac": "0a:58:0a:c8:01:04", "host_mac": "0e:11:22:33:44:55",
     "interface_name": "lxc0123456789a", "interface_index": 9,
     "netns": "pilus-default-node1-ep3", "service_account": "default",
     "created": "2026-11-26T12:00:03Z"},
    {"id": 1, "name": "default/deathstar", "namespace": "default", "pod_name": "deathstar",
     "policy_enforcement": {"ingress": True, "egress": False},
     "state": "ready", "identity": 12345,
     "labels": ["k8s:org=empire", "k8s:class=deathstar"],
     "ipv4": "10.200.1.2", "mac": "0a:58:0a:c8:01:02", "host_mac": "0e:11:22:33:44:56",
     "interface_name": "lxcaaaaaaaaaaa", "interface_index": 7,
     "netns": "pilus-default-node1-ep1", "service_account": "default",
     "created": "2026-11-26T12:00:01Z"},
]

IDENTITIES = [
    {"id": 12345, "labels": ["k8s:org=empire", "k8s:class=deathstar"], "reserved": False,
     "endpoints": 1},
    {"id": 1, "labels": ["reserved:host"], "reserved": True, "endpoints": 0},
    {"id": 2, "labels": ["reserved:world"], "reserved": True, "endpoints": 0},
]

HEALTH = {
    "node": "default-node1", "version": "0.1.0", "uptime_s": 192.5,
    "router_ip": "10.200.1.1", "node_ip": "172.30.0.11", "pod_cidr": "10.200.1.0/24",
    "agent": {"state": "Ok", "pid": 4242},
    "kvstore": {"state": "Ok", "backend": "embedded", "path": "/run/pilus/default/kvstore.db",
                "revision": 42, "keys": 17},
    "datapath": {"state": "Ok",
                 "programs": [{"name": "from-container", "hook": "tc ingress", "attached": True,
                               "id": 41},
                              {"name": "to-container", "hook": "tc egress", "attached": True,
                               "id": 42}],
                 "maps": [{"name": "pilus_lxc", "type": "hash", "max_entries": 65536,
                           "entries": 3},
                          {"name": "pilus_ipcache", "type": "lpm_trie", "max_entries": 512000,
                           "entries": 5}]},
    "ipam": {"cidr": "10.200.1.0/24", "allocated": 3, "available": 250, "total": 253},
    "endpoints": {"total": 3, "by_state": {"ready": 3}},
    "identities": {"allocated": 3},
    "events": {"received": 120, "lost": 0},
}

IPCACHE = [
    {"prefix": "10.200.2.0/24", "identity": 6, "tunnel_endpoint": "172.30.0.12"},
    {"prefix": "10.200.1.2/32", "identity": 12345, "tunnel_endpoint": None},
]
BPF_ENDPOINTS = [{"ip": "10.200.1.2", "ifindex": 7, "ep_id": 1, "identity": 12345,
                  "mac": "0a:58:0a:c8:01:02", "host_mac": "0e:11:22:33:44:56", "flags": 0}]
CT = [{"proto": "tcp", "src": "10.200.1.4", "dst": "10.200.1.2", "sport": 40000, "dport": 80,
       "direction": "out", "expires_in_s": 57, "packets": 5, "bytes": 420,
       "flags": ["SeenNonSyn"]}]
BPF_METRICS = [{"reason": 0, "reason_desc": "Success", "direction": "egress", "packets": 10,
                "bytes": 1000},
               {"reason": 132, "reason_desc": "Invalid source ip", "direction": "egress",
                "packets": 1, "bytes": 42}]
METRICS = [{"name": "pilus_endpoint_count", "labels": {}, "value": 3.0},
           {"name": "pilus_drop_count_total",
            "labels": {"reason": "Invalid source ip", "direction": "EGRESS"}, "value": 1}]

DROP_EVENT = {"type": "drop", "time": "2026-11-26T12:01:00Z", "reason": 132,
              "reason_desc": "Invalid source ip", "observation_point": None, "ct_state": None,
              "source_ep": 3, "dst_ep": 0, "src_identity": 23456, "dst_identity": 2,
              "ifindex": 9, "hash": 0x1F2E3D4C, "orig_len": 42, "cap_len": 42,
              "src_ip": "10.200.1.250", "dst_ip": "10.200.1.2", "proto": "udp",
              "sport": 1234, "dport": 80, "tcp_flags": [], "icmp_type": None,
              "icmp_code": None, "summary": "10.200.1.250:1234 -> 10.200.1.2:80 udp",
              "packet_hex": "45000020" + "00" * 28}
TRACE_EVENT = {"type": "trace", "time": "2026-11-26T12:01:01Z", "reason": 0,
               "reason_desc": "", "observation_point": "to-endpoint", "ct_state": "new",
               "source_ep": 3, "dst_ep": 1, "src_identity": 23456, "dst_identity": 12345,
               "ifindex": 7, "hash": 0xABC, "orig_len": 74, "cap_len": 74,
               "src_ip": "10.200.1.4", "dst_ip": "10.200.1.2", "proto": "tcp",
               "sport": 40000, "dport": 80, "tcp_flags": ["SYN"], "icmp_type": None,
               "icmp_code": None, "summary": "", "packet_hex": ""}


class FakeAgent:
    """Serve canned data; ``requests`` records (method, path_qs, json body)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="plcli"))  # short: AF_UNIX path limit
        self.socket = str(self.dir / "pilus.sock")
        self.requests: list[tuple[str, str, object]] = []
        self.events: list[dict] = [DROP_EVENT, {"type": "lost", "count": 5}, TRACE_EVENT]
        self.endpoints = [dict(e) for e in ENDPOINTS]
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    # -- handlers ----------------------------------------------------------------
    async def _record(self, request: web.Request) -> None:
        body = None
        if request.can_read_body:
            body = await request.json()
        self.requests.append((request.method, request.path_qs, body))

    def app(self) -> web.Application:
        app = web.Application()

        def static(data):
            async def handler(request):
                await self._record(request)
                return web.json_response(data)
            return handler

        async def ep_list(request):
            await self._record(request)
            return web.json_response(self.endpoints)

        async def ep_create(request):
            await self._record(request)
            body = await request.json()
            if any(e["name"] == body["name"] for e in self.endpoints):
                return web.json_response(
                    {"error": f"endpoint {body['name']} already exists: delete it first"},
                    status=409)
            ns, name = body["name"].split("/")
            ep = dict(ENDPOINTS[0], id=9, name=body["name"], namespace=ns, pod_name=name,
                      labels=[f"k8s:{lbl}" for lbl in body["labels"]])
            self.endpoints.append(ep)
            return web.json_response(ep, status=201)

        def find(ref):
            for e in self.endpoints:
                if str(e["id"]) == ref or e["name"] == ref:
                    return e
            return None

        async def ep_get(request):
            await self._record(request)
            ep = find(request.match_info["ref"])
            if ep is None:
                return web.json_response(
                    {"error": f"endpoint {request.match_info['ref']} not found"}, status=404)
            return web.json_response(ep)

        async def ep_delete(request):
            await self._record(request)
            ep = find(request.match_info["ref"])
            if ep is None:
                return web.json_response(
                    {"error": f"endpoint {request.match_info['ref']} not found"}, status=404)
            self.endpoints.remove(ep)
            return web.json_response({"deleted": ep["id"]})

        async def identity_get(request):
            await self._record(request)
            for i in IDENTITIES:
                if str(i["id"]) == request.match_info["id"]:
                    return web.json_response(i)
            return web.json_response({"error": "identity not found"}, status=404)

        async def monitor(request):
            await self._record(request)
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            want = request.query.get("type")
            try:
                for ev in self.events:
                    if want and ev["type"] not in (want, "lost"):
                        continue
                    await resp.write(json.dumps(ev).encode() + b"\n")
                    await asyncio.sleep(0.01)
                await resp.write(b"not json\n\n")
                await resp.write_eof()
            except ConnectionResetError:  # the client went away first
                pass
            return resp

        async def ct_flush(request):
            await self._record(request)
            return web.json_response({"flushed": 7})

        async def boom(request):
            await self._record(request)
            return web.Response(status=500, text="<html>oops</html>")

        r = app.router
        r.add_get("/v1/healthz", static(HEALTH))
        r.add_get("/v1/endpoint", ep_list)
        r.add_post("/v1/endpoint", ep_create)
        r.add_get("/v1/endpoint/{ref:.+}", ep_get)
        r.add_delete("/v1/endpoint/{ref:.+}", ep_delete)
        r.add_get("/v1/identity", static(IDENTITIES))
        r.add_get("/v1/identity/{id}", identity_get)
        r.add_get("/v1/bpf/ipcache", static(IPCACHE))
        r.add_get("/v1/bpf/endpoint", static(BPF_ENDPOINTS))
        r.add_get("/v1/bpf/ct", static(CT))
        r.add_delete("/v1/bpf/ct", ct_flush)
        r.add_get("/v1/bpf/metrics", static(BPF_METRICS))
        r.add_get("/v1/metrics", static(METRICS))
        r.add_get("/v1/monitor", monitor)
        r.add_get("/v1/boom", boom)
        return app

    # -- lifecycle ----------------------------------------------------------------
    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket).start()

    def start(self) -> FakeAgent:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)
