"""DNSProxy in-process on 127.0.0.1 (plain mode: ``transparent=False, upstream=...``) in front
of a small real DNS server (dnspython messages over asyncio UDP/TCP). Checks verdicts by rcode,
records, counters, on_answer before the answer, SERVFAIL on upstream failure, garbage input."""

from __future__ import annotations

import asyncio
import socket

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rrset
import pytest
from aio_helpers import eventually, run

from pilus.fqdn.dnsproxy import DNSProxy
from pilus.fqdn.rules import DNSPolicy
from pilus.observer.l7 import L7Event

ZONE = {"api.github.com.": "10.9.9.1", "docs.cilium.io.": "10.9.9.2", "evil.example.com.": "10.6.6.6"}
IDS = {"127.0.0.1": 2000}
POLICY = DNSPolicy.from_rule_sets([{"endpoint": 12, "endpoint_ips": ["127.0.0.1"], "port": None, "peers": [2000],
                                    "dns": [{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}]}])


def _respond(wire: bytes, seen: list[str]) -> bytes:
    q = dns.message.from_wire(wire)
    name = q.question[0].name.to_text().lower()
    seen.append(name)
    r = dns.message.make_response(q)
    if name in ZONE:
        r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", ZONE[name]))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()


class Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(_respond(data, self.seen), addr)


async def _tcp_upstream(seen, reader, writer):
    while True:
        try:
            n = int.from_bytes(await reader.readexactly(2), "big")
            data = await reader.readexactly(n)
        except asyncio.IncompleteReadError:
            break
        out = _respond(data, seen)
        writer.write(len(out).to_bytes(2, "big") + out)
        await writer.drain()
    writer.close()


async def _setup(**kw):
    loop = asyncio.get_running_loop()
    transport, up = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    tcp = await asyncio.start_server(lambda r, w: _tcp_upstream(up.seen, r, w), "127.0.0.1", port)
    records: list[dict] = []
    proxy = DNSProxy(POLICY, lambda ip: IDS.get(ip, 2), port=0, address="127.0.0.1", transparent=False,
                     upstream=("127.0.0.1", port), sink=records.append, **kw)
    await proxy.start()

    async def close():
        await proxy.stop()
        transport.close()
        tcp.close()

    return proxy, up, records, close


def _q(name, rdtype="A"):
    return dns.message.make_query(name, rdtype)


def test_allowed_denied_and_records_udp_and_tcp():
    async def main():
        proxy, up, records, close = await _setup()
        try:
            r = await dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "10.9.9.1"
            r = await dns.asyncquery.tcp(_q("DOCS.cilium.io"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "10.9.9.2"
            r = await dns.asyncquery.udp(_q("evil.example.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.REFUSED and not r.answer
            assert up.seen == ["api.github.com.", "docs.cilium.io."]  # the denied query never left
            assert [(x["verdict"], x["transport"], x["dns"]["query"], x["dns"]["rcode"], x["dns"]["ips"])
                    for x in records] == [("FORWARDED", "udp", "api.github.com.", 0, ["10.9.9.1"]),
                                          ("FORWARDED", "tcp", "docs.cilium.io.", 0, ["10.9.9.2"]),
                                          ("DENIED", "udp", "evil.example.com.", 5, [])]
            rec = records[0]
            assert rec["l7"] == "dns" and rec["protocol"] == "DNS" and rec["endpoint"] == 12
            assert rec["destination"]["identity"] == 2000 and rec["dns"]["ttl"] == 300
            assert rec["dns"]["qtypes"] == ["A"] and rec["dns"]["rrtypes"] == ["A"]
            events = [L7Event.from_record(x) for x in records]  # the agent's reader takes them
            assert [(e.l7, e.transport, e.dns.query, e.verdict) for e in events] == [
                ("dns", "udp", "api.github.com.", "FORWARDED"), ("dns", "tcp", "docs.cilium.io.", "FORWARDED"),
                ("dns", "udp", "evil.example.com.", "DENIED")]
            st = proxy.status()
            assert (st["queries"], st["forwarded"], st["denied"], st["tcp_connections"]) == (3, 2, 1, 1)
        finally:
            await close()

    run(main())


def test_nxdomain_reject_code_and_policy_swap():
    async def main():
        proxy, up, records, close = await _setup(reject_rcode="NXDOMAIN")
        try:
            r = await dns.asyncquery.udp(_q("evil.example.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.NXDOMAIN
            proxy.set_policy(DNSPolicy.from_rule_sets([{"dns": []}]))  # visibility: everything passes
            r = await dns.asyncquery.udp(_q("evil.example.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "10.6.6.6"
            proxy.set_policy(DNSPolicy())  # no rule set applies: denied
            r = await dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.rcode() == dns.rcode.NXDOMAIN
            assert [x["verdict"] for x in records] == ["DENIED", "FORWARDED", "DENIED"]
        finally:
            await close()

    run(main())
    with pytest.raises(ValueError, match="reject_rcode"):
        DNSProxy(POLICY, lambda ip: 2, reject_rcode="DROP")


def test_on_answer_runs_before_the_client_gets_the_answer():
    async def main():
        gate = asyncio.Event()
        got: list = []

        async def on_answer(a):
            got.append(a)
            await gate.wait()

        proxy, up, records, close = await _setup(on_answer=on_answer)
        try:
            client = asyncio.ensure_future(
                dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=10))
            await eventually(lambda: proxy.status()["answers_pending"] == 1)
            assert got[0].ips == ("10.9.9.1",) and got[0].endpoint == 12 and got[0].ttl == 300
            assert got[0].client_ip == "127.0.0.1" and got[0].qname == "api.github.com."
            assert not client.done() and records == []  # held: nothing went to the client yet
            gate.set()
            r = await client
            assert r.answer[0][0].address == "10.9.9.1"
            assert proxy.status()["answers_pending"] == 0 and records[0]["verdict"] == "FORWARDED"
        finally:
            await close()

    run(main())


def test_udp_queries_over_the_inflight_limit_are_dropped():
    async def main():
        gate = asyncio.Event()

        async def on_answer(a):
            await gate.wait()

        proxy, up, records, close = await _setup(on_answer=on_answer, max_inflight=1)
        try:
            first = asyncio.ensure_future(
                dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=10))
            await eventually(lambda: proxy.status()["answers_pending"] == 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.sendto(_q("docs.cilium.io").to_wire(), ("127.0.0.1", proxy.port))
                await eventually(lambda: proxy.status()["dropped_overload"] == 1)
            finally:
                s.close()
            gate.set()
            assert (await first).answer[0][0].address == "10.9.9.1"
            assert up.seen == ["api.github.com."]  # the dropped query never went upstream
        finally:
            await close()

    run(main())


def test_failing_on_answer_still_answers_and_is_counted():
    async def main():
        async def on_answer(a):
            raise RuntimeError("policy update failed")

        proxy, up, records, close = await _setup(on_answer=on_answer)
        try:
            r = await dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=5)
            assert r.answer[0][0].address == "10.9.9.1"
            assert proxy.status()["on_answer_errors"] == 1
        finally:
            await close()

    run(main())


def test_upstream_failure_is_servfail_and_error_record():
    async def main():
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))  # bound and never read: the query gets no answer
        records: list[dict] = []
        proxy = DNSProxy(POLICY, lambda ip: 2000, port=0, address="127.0.0.1", transparent=False,
                         upstream=dead.getsockname(), sink=records.append, upstream_timeout=0.3)
        await proxy.start()
        try:
            r = await dns.asyncquery.udp(_q("api.github.com"), "127.0.0.1", port=proxy.port, timeout=10)
            assert r.rcode() == dns.rcode.SERVFAIL
            assert records[0]["verdict"] == "ERROR" and records[0]["dns"]["rcode"] == 2
            # TCP: nothing listens there (refused); the client's connection stays usable
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            for _ in range(2):
                wire = _q("docs.cilium.io").to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
                n = int.from_bytes(await reader.readexactly(2), "big")
                assert dns.message.from_wire(await reader.readexactly(n)).rcode() == dns.rcode.SERVFAIL
            writer.close()
            await eventually(lambda: len(records) == 3)  # written once the answer went out
            assert [r["transport"] for r in records] == ["udp", "tcp", "tcp"]
            assert proxy.status()["upstream_errors"] == 3
        finally:
            await proxy.stop()
            dead.close()

    run(main())


def test_garbage_is_counted_and_the_proxy_keeps_answering():
    async def main():
        proxy, up, records, close = await _setup()
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                s.sendto(b"\x00\x01junk", ("127.0.0.1", proxy.port))  # no header: dropped
                s.sendto(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01", ("127.0.0.1", proxy.port))
                reply = await asyncio.wait_for(loop.sock_recv(s, 512), 5)
            finally:
                s.close()
            r = dns.message.from_wire(reply)
            assert r.id == 0xABCD and r.rcode() == dns.rcode.FORMERR
            await eventually(lambda: proxy.status()["parse_errors"] == 2)
            # TCP: a zero-length message and garbage, then a good query on the same connection
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            good = _q("api.github.com").to_wire()
            writer.write(b"\x00\x00" + b"\x00\x05hello" + len(good).to_bytes(2, "big") + good)
            await writer.drain()
            n = int.from_bytes(await reader.readexactly(2), "big")
            assert dns.message.from_wire(await reader.readexactly(n)).answer[0][0].address == "10.9.9.1"
            writer.close()
            await eventually(lambda: records and records[-1]["transport"] == "tcp")
            assert proxy.status()["parse_errors"] == 4 and records[-1]["verdict"] == "FORWARDED"
        finally:
            await close()

    run(main())
