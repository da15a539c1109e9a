"""src/pilus/api/openapi.yaml against the routes the agent really registers.

- the document parses, every ``$ref`` resolves, path parameters are declared;
- every (method, path) route of ``APIServer.app()`` is documented and every
  documented operation is a route (aiohttp's ``{ref:.+}``, a reference that may
  contain a slash, is documented as two paths: ``/x/{id}`` and ``/x/{namespace}/{name}``);
- error responses use the shared Error shape;
- the service/LB handlers' answers (real ServiceManager, in-memory LB maps)
  match the documented schemas, for every status code they return.

No root, no sockets: the app is only built, handlers are called directly.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from lb_fakes import FakeDatapath, FakeLb

from pilus.api.server import APIServer
from pilus.api.service_routes import AGENT_KEY
from pilus.datapath import lb as lbmaps
from pilus.loadbalancer.manager import ServiceManager

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
API_PREFIX = "/v1"
DEFAULT_SEGMENT_RE = "[^{}/]+"  # aiohttp's pattern for a plain {name}


@pytest.fixture(scope="module")
def spec() -> dict:
    text = resources.files("pilus.api").joinpath("openapi.yaml").read_text()
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def build_app(agent: Any = None):
    agent = agent if agent is not None else SimpleNamespace()
    return APIServer(agent, Path("/nonexistent/pilus-test.sock")).app()


# -- $ref ---------------------------------------------------------------------------------


def resolve_pointer(doc: dict, ref: str) -> Any:
    assert ref.startswith("#/"), f"only local refs are used: {ref!r}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"$ref {ref!r} does not resolve"
        node = node[part]
    return node


def deref(doc: dict, node: Any) -> Any:
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref not in seen, f"$ref cycle at {ref}"
        seen.add(ref)
        node = resolve_pointer(doc, ref)
    return node


def all_refs(node: Any, where: str = "#") -> list[tuple[str, str]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                out.append((where, v))
            else:
                out.extend(all_refs(v, f"{where}/{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(all_refs(v, f"{where}/{i}"))
    return out


def test_document_parses(spec):
    assert str(spec.get("openapi", "")).startswith("3."), "an OpenAPI 3 document"
    assert spec["info"]["title"] and spec["info"]["version"]
    assert [s["url"] for s in spec["servers"]] == ["http://localhost" + API_PREFIX]
    assert isinstance(spec["paths"], dict) and spec["paths"]
    assert isinstance(spec["components"]["schemas"], dict)


def test_every_ref_resolves(spec):
    refs = all_refs(spec)
    assert refs, "the document uses $ref"
    bad = []
    for where, ref in refs:
        try:
            assert isinstance(ref, str)
            target = resolve_pointer(spec, ref)
            assert isinstance(target, dict), f"$ref {ref!r} is not an object"
        except AssertionError as exc:
            bad.append(f"{where}: {exc}")
    assert not bad, "\n".join(bad)


def test_every_component_schema_is_used(spec):
    used = {ref for _, ref in all_refs(spec)}
    unused = [n for n in spec["components"]["schemas"] if f"#/components/schemas/{n}" not in used]
    assert not unused, f"schemas nothing refers to: {unused}"


# -- routes <-> paths ---------------------------------------------------------------------


def _group_patterns(pattern: str) -> dict[str, str]:
    """{group name: its regex} of a compiled aiohttp route pattern (nested parens ok)."""
    out = {}
    for m in re.finditer(r"\(\?P<(\w+)>", pattern):
        depth, i = 1, m.end()
        while depth:
            c = pattern[i]
            if c == "\\":
                i += 2
                continue
            depth += {"(": 1, ")": -1}.get(c, 0)
            i += 1
        out[m.group(1)] = pattern[m.end():i - 1]
    return out


def route_forms(canonical: str, pattern: str | None) -> set[str]:
    """An aiohttp route -> the documented path forms, parameters as ``{}``: a
    parameter that may span slashes (``{ref:.+}``) is one segment or two."""
    assert canonical.startswith(API_PREFIX + "/"), f"route outside {API_PREFIX}: {canonical}"
    groups = _group_patterns(pattern) if pattern else {}
    forms = [""]
    for seg in canonical[len(API_PREFIX) + 1:].split("/"):
        m = re.fullmatch(r"\{(\w+)\}", seg)
        if not m:
            options = [seg]
        else:
            regex = groups.get(m.group(1), DEFAULT_SEGMENT_RE)
            multi = regex != DEFAULT_SEGMENT_RE and re.fullmatch(regex, "a/b") is not None
            options = ["{}", "{}/{}"] if multi else ["{}"]
        forms = [f"{f}/{o}" for f in forms for o in options]
    return set(forms)


def registered_operations() -> set[tuple[str, str]]:
    ops = set()
    for route in build_app().router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD to every GET
            continue
        info = route.resource.get_info()
        pattern = info["pattern"].pattern if "pattern" in info else None
        for form in route_forms(route.resource.canonical, pattern):
            ops.add((route.method, form))
    return ops


def normalize(path: str) -> str:
    return re.sub(r"\{[^}/]+\}", "{}", path)


def documented_operations(spec) -> set[tuple[str, str]]:
    return {
        (method.upper(), normalize(path))
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_route_forms_mapping():
    assert route_forms("/v1/endpoint/{ref}", "/v1/endpoint/(?P<ref>.+)") == {
        "/endpoint/{}", "/endpoint/{}/{}"}
    assert route_forms("/v1/identity/{id}", "/v1/identity/(?P<id>[^{}/]+)") == {"/identity/{}"}
    assert route_forms("/v1/x/{id}", r"/v1/x/(?P<id>\d+)") == {"/x/{}"}
    assert route_forms("/v1/bpf/lb", None) == {"/bpf/lb"}


def test_every_route_is_documented(spec):
    missing = registered_operations() - documented_operations(spec)
    assert not missing, "routes not in openapi.yaml:\n" + "\n".join(
        f"  {m} {p}" for m, p in sorted(missing, key=lambda x: (x[1], x[0])))


def test_every_documented_operation_is_a_route(spec):
    extra = documented_operations(spec) - registered_operations()
    assert not extra, "documented but not served:\n" + "\n".join(
        f"  {m} {p}" for m, p in sorted(extra, key=lambda x: (x[1], x[0])))


def test_path_parameters_declared(spec):
    problems = []
    for path, item in spec["paths"].items():
        in_path = re.findall(r"\{([^}/]+)\}", path)
        ops = [m for m in item if m in HTTP_METHODS]
        assert ops, f"{path}: no operation"
        for method in ops:
            params = {}
            for p in [*item.get("parameters", []), *item[method].get("parameters", [])]:
                p = deref(spec, p)
                params[(p["name"], p["in"])] = p
            declared = {n for (n, where) in params if where == "path"}
            if set(in_path) != declared:
                problems.append(f"{method.upper()} {path}: path has {in_path}, declared {sorted(declared)}")
            for n in in_path:
                if (n, "path") in params and params[(n, "path")].get("required") is not True:
                    problems.append(f"{method.upper()} {path}: path parameter {n} must be required")
    assert not problems, "\n".join(problems)


def test_operation_ids_unique_and_responses_present(spec):
    ids = []
    for path, item in spec["paths"].items():
        for method in item:
            if method not in HTTP_METHODS:
                continue
            op = item[method]
            assert op.get("operationId"), f"{method.upper()} {path}: no operationId"
            ids.append(op["operationId"])
            codes = set(op.get("responses", {}))
            assert any(str(c).startswith("2") for c in codes), f"{method.upper()} {path}: no 2xx"
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"duplicate operationIds: {dupes}"


def test_error_responses_use_the_error_shape(spec):
    """Every 4xx/5xx/default JSON answer is {"error": "..."} (maybe with more)."""
    bad = []
    for path, item in spec["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            for code, resp in item[method]["responses"].items():
                if not (str(code) == "default" or str(code)[0] in "45"):
                    continue
                resp = deref(spec, resp)
                schema = deref(spec, resp["content"]["application/json"]["schema"])
                err = deref(spec, schema.get("properties", {}).get("error", {}))
                if "error" not in schema.get("required", []) or err.get("type") != "string":
                    bad.append(f"{method.upper()} {path} {code}")
    assert not bad, "error responses without the Error shape: " + ", ".join(bad)


# -- the service/LB handlers' answers against the schemas -------------------------------------


class Mismatch(AssertionError):
    pass


def validate(spec: dict, schema: Any, value: Any, where: str = "$") -> None:
    """A small validator for the OpenAPI 3.0 schema subset openapi.yaml uses.
    Objects with ``properties`` and no ``additionalProperties`` are closed: a
    field the handler returns but the document does not describe is an error."""
    schema = deref(spec, schema)
    if value is None:
        if not schema.get("nullable") and schema:
            raise Mismatch(f"{where}: null but not nullable")
        return
    for key in ("oneOf", "anyOf"):
        if key in schema:
            ok = 0
            errors = []
            for alt in schema[key]:
                try:
                    validate(spec, alt, value, where)
                    ok += 1
                except Mismatch as exc:
                    errors.append(str(exc))
            if ok == 0 or (key == "oneOf" and ok > 1):
                raise Mismatch(f"{where}: {ok} of {key} match: {errors}")
    if "enum" in schema and value not in schema["enum"]:
        raise Mismatch(f"{where}: {value!r} not in {schema['enum']}")
    t = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if t is not None and not checks[t](value):
        raise Mismatch(f"{where}: {value!r} is not {t}")
    if t in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise Mismatch(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise Mismatch(f"{where}: {value} > {schema['maximum']}")
    if t == "string" and schema.get("format") == "ipv4":
        try:
            IPv4Address(value)
        except ValueError:
            raise Mismatch(f"{where}: {value!r} is not an IPv4 address") from None
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            raise Mismatch(f"{where}: {len(value)} items")
        if "items" in schema:
            for i, v in enumerate(value):
                validate(spec, schema["items"], v, f"{where}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                raise Mismatch(f"{where}: required field {k!r} missing")
        extra = schema.get("additionalProperties", not props)  # closed when it lists fields
        for k, v in value.items():
            if k in props:
                validate(spec, props[k], v, f"{where}.{k}")
            elif extra is False:
                raise Mismatch(f"{where}: field {k!r} is not documented")
            elif isinstance(extra, dict):
                validate(spec, extra, v, f"{where}.{k}")


def test_validator_catches_mismatches(spec):
    schemas = spec["components"]["schemas"]
    validate(spec, schemas["Error"], {"error": "x"})
    for bad in ({}, {"error": 1}, {"error": "x", "other": 1}):
        with pytest.raises(Mismatch):
            validate(spec, schemas["Error"], bad)


class RealDumpLb(FakeLb):
    """The in-memory maps, dumped by the real LbMaps.dump (the /bpf/lb shape)."""

    def items(self):
        return sorted(
            (lbmaps.ServiceEntry(v["id"], fe, [b.id for b in v["backends"]], v["flags"],
                                 v["flags2"], v["algorithm"], v["affinity"])
             for fe, v in self.svc.items()),
            key=lambda e: (e.id, e.frontend.scope),
        )

    dump = lbmaps.LbMaps.dump


class ServiceAgent:
    def __init__(self):
        self.datapath = FakeDatapath()
        self.datapath.lb = RealDumpLb()
        self.services = ServiceManager(self.datapath, node_ips=[IPv4Address("172.30.0.11")],
                                       known_networks=[IPv4Network("10.200.0.0/16")])


SERVICES_YAML = """
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels: {app: web}
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
    - {name: http, port: 80, targetPort: http, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: backend}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  loadBalancerIP: 192.0.2.20
  ports: [{name: pg, port: 5432, nodePort: 30432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: backend, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
  - addresses: [10.200.2.7]
  - addresses: [10.200.2.8]
    conditions: {ready: false, serving: true, terminating: true}
"""

PLAIN_SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "plain", "namespace": "default"},
    "spec": {"clusterIP": "10.96.0.30", "selector": {"app": "web"}, "ports": [{"port": 8080}]},
}


def _doc_operation(spec: dict, method: str, url_path: str) -> tuple[str, dict]:
    """The documented operation serving METHOD url_path (literal segments first)."""
    assert url_path.startswith(API_PREFIX + "/")
    rel = url_path[len(API_PREFIX):]
    found = []
    for path, item in spec["paths"].items():
        regex = "^" + re.sub(r"\\\{[^}/]+\\\}", "[^/]+", re.escape(path)) + "$"
        if method.lower() in item and re.match(regex, rel):
            found.append((path.count("{"), path, item[method.lower()]))
    assert found, f"{method} {url_path} is not documented"
    _, path, op = min(found, key=lambda f: f[0])
    return path, op


async def call(app, spec, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """Route METHOD url through the app's router, call the handler, check the answer
    against the documented response of its status; returns (status, JSON)."""
    url_path, _, qs = url.partition("?")
    match = await app.router.resolve(make_mocked_request(method, url_path, app=app))
    assert match.http_exception is None, f"{method} {url_path}: {match.http_exception}"

    async def json_body():
        if isinstance(body, str):
            return json.loads(body)  # JSONDecodeError, like aiohttp's request.json()
        return body

    async def raw_body():
        return (body if isinstance(body, str) else json.dumps(body)).encode()

    query = dict(p.split("=", 1) for p in qs.split("&") if p)
    request = SimpleNamespace(app=app, match_info=dict(match), query=query, json=json_body,
                              read=raw_body, method=method, path=url_path, content_length=None)
    handler = match.handler
    for middleware in reversed(app.middlewares):  # errors become answers there, as served
        handler = functools.partial(middleware, handler=handler)
    resp = await handler(request)
    data = json.loads(resp.body)
    path, op = _doc_operation(spec, method, url_path)
    code = str(resp.status)
    assert code in op["responses"], f"{method} {path}: status {code} is not documented"
    doc_resp = deref(spec, op["responses"][code])
    schema = doc_resp["content"][resp.content_type]["schema"]
    try:
        validate(spec, schema, data)
    except Mismatch as exc:
        raise AssertionError(f"{method} {url} -> {code}: {exc}\n{json.dumps(data, indent=1)}") from None
    return resp.status, data


def test_service_answers_match_the_schemas(spec):
    agent = ServiceAgent()
    app = build_app(agent)
    assert app[AGENT_KEY] is agent

    async def scenario():
        st, res = await call(app, spec, "PUT", "/v1/service", {"yaml": SERVICES_YAML})
        assert st == 200 and res["applied"] == ["backend/db", "default/web"]
        agent.services.set_endpoints([
            {"ip": "10.200.1.5", "labels": ["k8s:app=web"], "named_ports": {"http": "8080/TCP"}},
            {"ip": "10.200.2.5", "labels": ["k8s:app=web"], "named_ports": {"http": "8080/TCP"},
             "node_local": False},
            {"ip": "10.200.1.6", "labels": ["k8s:app=web"], "state": "terminating"},
        ])
        st, res = await call(app, spec, "PUT", "/v1/service", {"service": PLAIN_SERVICE})
        assert st == 200 and res["applied"] == ["default/plain"]
        st, res = await call(app, spec, "PUT", "/v1/service", {**PLAIN_SERVICE, "kind": "Service"})
        assert st == 200
        st, rows = await call(app, spec, "GET", "/v1/service")
        assert st == 200
        types = {r["type"] for r in rows}
        assert types == {"ClusterIP", "NodePort", "ExternalIPs", "LoadBalancer"}
        assert {r["scope"] for r in rows} == {"external", "internal"}
        st, got = await call(app, spec, "GET", "/v1/service/backend/db")
        assert st == 200 and got["service"]["endpoints"] and got["service"]["selector"] is None
        st, got = await call(app, spec, "GET", "/v1/service/default/web")
        assert st == 200 and got["service"]["algorithm"] == "maglev" and got["service"]["labels"]
        st, res = await call(app, spec, "PATCH", "/v1/service/backend-state",
                             {"backend": "10.200.1.5:8080", "state": "maintenance"})
        assert st == 200 and res["backends"] == 1
        st, lb = await call(app, spec, "GET", "/v1/bpf/lb")
        assert st == 200 and {e["scope"] for e in lb} == {"external", "internal"}
        maglev_id = next(r["id"] for r in rows if r["service"] == "default/web"
                         and r["type"] == "ClusterIP" and r["frontend"].endswith("/TCP"))
        st, table = await call(app, spec, "GET", f"/v1/bpf/lb/maglev/{maglev_id}")
        assert st == 200 and table["size"] == len(table["table"]) == 251
        st, res = await call(app, spec, "DELETE", "/v1/service/default/plain")
        assert st == 200 and res == {"deleted": "default/plain"}
        st, res = await call(app, spec, "DELETE", "/v1/service?namespace=nowhere")
        assert st == 200 and res == {"deleted": 0}

        # errors: each status the handlers return is documented with the Error shape
        errors = [
            ("DELETE", "/v1/service", None, 400),
            ("GET", "/v1/service/default/nope", None, 404),
            ("DELETE", "/v1/service/default/nope", None, 404),
            ("PUT", "/v1/service", "{not json", 400),
            ("PUT", "/v1/service", {"foo": 1}, 400),
            ("PUT", "/v1/service", {"yaml": SERVICES_YAML.replace("name: web", "name: web2")}, 409),
            ("PATCH", "/v1/service/backend-state", {"backend": "nonsense", "state": "active"}, 400),
            ("PATCH", "/v1/service/backend-state", {"backend": "10.200.1.5:8080", "state": "x"}, 400),
            ("PATCH", "/v1/service/backend-state", {"backend": "10.9.9.9:80", "state": "active"}, 404),
            ("GET", "/v1/bpf/lb/maglev/0", None, 400),
            ("GET", "/v1/bpf/lb/maglev/1?scope=sideways", None, 400),
            ("GET", "/v1/bpf/lb/maglev/65000", None, 404),
        ]
        for method, url, body, want in errors:
            st, res = await call(app, spec, method, url, body)
            assert st == want, (method, url, res)

        # no service manager, no datapath: 503 everywhere
        bare = build_app(SimpleNamespace())
        for method, url, body in [
            ("GET", "/v1/service", None), ("PUT", "/v1/service", {"yaml": SERVICES_YAML}),
            ("GET", "/v1/service/a/b", None), ("DELETE", "/v1/service/a/b", None),
            ("PATCH", "/v1/service/backend-state", {"backend": "10.0.0.1:80", "state": "active"}),
            ("GET", "/v1/bpf/lb", None), ("GET", "/v1/bpf/lb/maglev/1", None),
        ]:
            st, _ = await call(bare, spec, method, url, body)
            assert st == 503, (method, url)

    asyncio.run(scenario())
