"""`pilus fqdn cache list|clean` against the agent's real API app (APIServer on a UNIX
socket in a thread, the routes of pilus.api.fqdn_routes): cilium-dbg's columns, the
endpoint and matchpattern filters reaching the agent's ``fqdn`` object as an int and a
pattern, -o json, clean with and without confirmation, and the errors: a bad endpoint id
or pattern and an unknown parameter are 400s naming the parameter, no FQDN cache is 503.

The agent's ``fqdn`` here is a small in-test table with the two async methods the routes
call (the lead's FQDN component implements them over the DNS cache); the routes and the
CLI are what is under test."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from pilus.api.client import unix_http
from pilus.api.server import APIServer
from pilus.cli.main import main
from pilus.fqdn.matchpattern import compile_pattern

ENTRIES = [
    {"endpoint": 12, "fqdn": "api.github.com.", "ips": ["140.82.121.6", "140.82.121.5"], "ttl": 300,
     "lookup_time": "2026-12-03T18:00:00Z", "expiration_time": "2026-12-03T18:05:00Z", "source": "lookup"},
    {"endpoint": 12, "fqdn": "docs.cilium.io.", "ips": ["104.16.0.1"], "ttl": 60,
     "lookup_time": "2026-12-03T17:00:00Z", "expiration_time": "2026-12-03T17:01:00Z", "source": "connection"},
    {"endpoint": 7, "fqdn": "api.github.com.", "ips": ["140.82.121.6"], "ttl": 3600,
     "lookup_time": "2026-12-03T18:00:10Z", "expiration_time": "2026-12-03T19:00:10Z", "source": "lookup"},
]


class FQDNTable:
    """What the routes need of ``agent.fqdn``: list (filtered) and clean, over a list of entries."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries = [dict(e) for e in entries]
        self.calls: list[tuple] = []

    async def cache_list(self, endpoint: int | None, pattern: str | None) -> list[dict]:
        self.calls.append(("list", endpoint, pattern))
        rx = compile_pattern(pattern) if pattern is not None else None
        return [e for e in self.entries
                if (endpoint is None or e["endpoint"] == endpoint) and (rx is None or rx.fullmatch(e["fqdn"]))]

    async def cache_clean(self, endpoint: int | None) -> int:
        self.calls.append(("clean", endpoint))
        keep = [e for e in self.entries if endpoint is not None and e["endpoint"] != endpoint]
        deleted = len(self.entries) - len(keep)
        self.entries = keep
        return deleted


class Agent:
    """The real API app on a UNIX socket, served from a thread's event loop."""

    def __init__(self, fqdn) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fqdncli-", dir="/tmp"))  # sun_path holds 107 bytes
        self.socket = str(self.dir / "pilus.sock")
        self.surface = SimpleNamespace(fqdn=fqdn)
        self.server = APIServer(self.surface, Path(self.socket))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> Agent:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def http(self, method: str, path: str) -> tuple[int, object]:
        return unix_http(self.socket, method, path)


@pytest.fixture
def table() -> FQDNTable:
    return FQDNTable(ENTRIES)


@pytest.fixture
def agent(table):
    a = Agent(table)
    try:
        yield a.start()
    finally:
        a.stop()


def run(agent: Agent, capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(["--socket", agent.socket, "fqdn", "cache", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_prints_cilium_dbg_columns(agent, table, capsys):
    rc, out, _ = run(agent, capsys, "list")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["Endpoint", "Source", "FQDN", "TTL", "ExpirationTime", "IPs"]
    assert [line.split() for line in lines[1:]] == [
        ["12", "lookup", "api.github.com.", "300", "2026-12-03T18:05:00Z", "140.82.121.6,140.82.121.5"],
        ["12", "connection", "docs.cilium.io.", "60", "2026-12-03T17:01:00Z", "104.16.0.1"],
        ["7", "lookup", "api.github.com.", "3600", "2026-12-03T19:00:10Z", "140.82.121.6"]]
    assert table.calls == [("list", None, None)]


def test_list_filters_reach_the_agent(agent, table, capsys):
    rc, out, _ = run(agent, capsys, "list", "-e", "12", "--matchpattern", "*.github.com")
    assert rc == 0 and [line.split()[:3] for line in out.splitlines()[1:]] == [["12", "lookup", "api.github.com."]]
    assert table.calls[-1] == ("list", 12, "*.github.com")  # the id as an integer
    rc, out, _ = run(agent, capsys, "list", "--endpoint", "7", "-o", "json")
    assert rc == 0 and json.loads(out) == [ENTRIES[2]]
    rc, out, _ = run(agent, capsys, "list", "-n", "nothing.example", "-o", "json")
    assert rc == 0 and json.loads(out) == []
    rc, out, _ = run(agent, capsys, "list", "-e", "99")
    assert rc == 0 and out.splitlines() == [out.splitlines()[0]]  # headers only


@pytest.mark.parametrize(("argv", "message"), [
    (["-e", "abc"], "Error: endpoint: must be an endpoint id (1-4095), got 'abc'"),
    (["-e", "0"], "Error: endpoint: must be an endpoint id (1-4095), got '0'"),
    (["-e", "4096"], "Error: endpoint: must be an endpoint id (1-4095), got '4096'"),
    (["-e", "-3"], "Error: endpoint: must be an endpoint id (1-4095), got '-3'"),
    (["-n", "a b.example"], "Error: matchpattern: character ' ' at 1 is not allowed"),
    (["-n", "a..example"], "Error: matchpattern: empty label"),
    (["-n", "x" * 300], "Error: matchpattern: longer than 255 characters"),
])
def test_list_bad_parameters_are_named(agent, table, capsys, argv, message):
    rc, out, err = run(agent, capsys, "list", *argv)
    assert rc == 1 and out == "" and err.startswith(message)
    assert table.calls == []  # refused before the agent's cache was asked


def test_bad_and_unknown_parameters_over_http(agent, table):
    status, body = agent.http("GET", "/v1/fqdn/cache?cidr=10.0.0.0/8")
    assert status == 400 and body == {"error": "unknown query parameter 'cidr' (known: endpoint, matchpattern)"}
    status, body = agent.http("DELETE", "/v1/fqdn/cache?matchpattern=*.io")
    assert status == 400 and body["error"].startswith("unknown query parameter 'matchpattern' (known: endpoint)")
    status, body = agent.http("GET", "/v1/fqdn/cache?endpoint=1&endpoint=2")
    assert status == 400 and body == {"error": "endpoint: given more than once"}
    status, body = agent.http("DELETE", "/v1/fqdn/cache?endpoint=%D9%A1")  # Arabic-Indic digit one
    assert status == 400 and body["error"].startswith("endpoint: must be an endpoint id")
    status, body = agent.http("GET", "/v1/fqdn/cache?endpoint=&matchpattern=")
    assert status == 200 and len(body) == 3  # empty values filter nothing
    assert table.entries == ENTRIES


def test_clean_all_and_one_endpoint(agent, table, capsys):
    rc, out, _ = run(agent, capsys, "clean", "-e", "7", "-f")
    assert (rc, out) == (0, "Deleted 1 entries from endpoint 7's FQDN cache\n")
    assert [e["endpoint"] for e in table.entries] == [12, 12] and table.calls == [("clean", 7)]
    rc, out, _ = run(agent, capsys, "clean", "--force")
    assert (rc, out) == (0, "Deleted 2 entries from the FQDN cache\n") and table.entries == []
    rc, out, _ = run(agent, capsys, "list", "-o", "json")
    assert json.loads(out) == []


def test_clean_asks_first(agent, table, capsys, monkeypatch):
    rc, out, err = run(agent, capsys, "clean", stdin="n\n", monkeypatch=monkeypatch)
    assert rc == 1 and out == "Are you sure you want to clean the FQDN cache? [y/N] "
    assert err == "Error: did not clean the FQDN cache (not confirmed; -f skips the question)\n"
    rc, _, _ = run(agent, capsys, "clean", "-e", "12", stdin="", monkeypatch=monkeypatch)  # EOF: no
    assert rc == 1 and len(table.entries) == 3 and table.calls == []
    rc, out, _ = run(agent, capsys, "clean", "-e", "12", stdin="y\n", monkeypatch=monkeypatch)
    assert rc == 0 and out.endswith("Deleted 2 entries from endpoint 12's FQDN cache\n")
    assert [e["endpoint"] for e in table.entries] == [7]


def test_no_fqdn_cache_is_503(capsys):
    a = Agent(None).start()
    try:
        rc, out, err = run(a, capsys, "list")
        assert rc == 1 and err.startswith("Error: the agent has no FQDN cache")
        status, body = a.http("DELETE", "/v1/fqdn/cache")
        assert status == 503 and "no FQDN cache" in body["error"]
        # a bad parameter is still the caller's fault first
        assert a.http("GET", "/v1/fqdn/cache?endpoint=x")[0] == 400
    finally:
        a.stop()


class CacheFacade:
    """``agent.fqdn`` over the DNS proxy's real DNSCache (pilus.fqdn.cache), as the agent
    wires it: its dump is the API's list, clean forgets rows."""

    def __init__(self, cache) -> None:
        self.cache = cache

    async def cache_list(self, endpoint: int | None, pattern: str | None) -> list[dict]:
        return self.cache.dump(endpoint, pattern=pattern)

    async def cache_clean(self, endpoint: int | None) -> int:
        before = len(self.cache.dump(endpoint))
        self.cache.clear(endpoint)
        return before

    def names_for_ip(self, ip: str) -> list[str]:
        return self.cache.names_for_ip(ip)


def test_a_real_dns_cache_through_the_cli(capsys):
    from pilus.fqdn.cache import DNSCache

    cache = DNSCache()
    t0 = 1_796_313_600.0  # 2026-12-03T16:00:00Z
    cache.update(12, "API.GitHub.com", ["140.82.121.6", "140.82.121.5"], 300, t0)
    cache.update(7, "docs.cilium.io", ["104.16.0.1"], 60, t0)
    a = Agent(CacheFacade(cache)).start()
    try:
        rc, out, _ = run(a, capsys, "list")
        assert rc == 0
        assert [line.split() for line in out.splitlines()[1:]] == [
            ["7", "lookup", "docs.cilium.io.", "60", "2026-12-03T16:01:00Z", "104.16.0.1"],
            ["12", "lookup", "api.github.com.", "300", "2026-12-03T16:05:00Z", "140.82.121.5,140.82.121.6"]]
        rc, out, _ = run(a, capsys, "list", "-n", "*.cilium.io", "-o", "json")
        assert [(e["endpoint"], e["fqdn"], e["lookup_time"]) for e in json.loads(out)] == [
            (7, "docs.cilium.io.", "2026-12-03T16:00:00Z")]
        rc, out, _ = run(a, capsys, "clean", "-e", "12", "-f")
        assert out == "Deleted 1 entries from endpoint 12's FQDN cache\n"
        assert cache.names_for_ip("140.82.121.6") == [] and cache.names_for_ip("104.16.0.1") == ["docs.cilium.io."]
    finally:
        a.stop()
