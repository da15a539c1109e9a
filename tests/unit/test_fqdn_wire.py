"""dnswire on untrusted bytes: random bytes and mutated real messages never raise anything
but BadMessage; the replies the proxy builds; what an answer tells (CNAME chain, TTL)."""

from __future__ import annotations

import dns.message
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from pilus.fqdn.dnswire import BadMessage, DNSQuery, parse_query, read_answer, reply_with_rcode


def _query(name="api.github.com", rdtype="A", **kw) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = 4242
    return q.to_wire()


def _answer(query_wire: bytes, *records: tuple[str, int, str, str]) -> bytes:
    q = dns.message.from_wire(query_wire)
    r = dns.message.make_response(q)
    for name, ttl, rdtype, value in records:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, value))
    return r.to_wire()


REAL = [
    _query(),
    _query("docs.cilium.io", "AAAA", use_edns=0, payload=1232),
    _answer(_query(), ("api.github.com.", 60, "A", "1.2.3.4")),
    _answer(_query("www.x.org"), ("www.x.org.", 30, "CNAME", "edge.x.net."), ("edge.x.net.", 20, "A", "9.9.9.9")),
]


def _total(data: bytes) -> None:
    """Both parse paths: either a result or BadMessage, never another exception."""
    try:
        q = parse_query(data)
    except BadMessage as e:
        assert e.reply is None or len(e.reply) >= 12
        return
    assert isinstance(q, DNSQuery)
    reply_with_rcode(q, dns.rcode.REFUSED)
    for other in REAL:
        try:
            read_answer(q, other, endpoint=1, client_ip="10.0.0.1")
        except BadMessage:
            pass


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    _total(data)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(REAL), st.lists(st.tuples(st.integers(0, 599), st.integers(0, 255)), max_size=8),
       st.integers(0, 600), st.binary(max_size=40))
def test_mutated_messages_never_raise(base, flips, cut, tail):
    b = bytearray(base)
    for pos, val in flips:
        if pos < len(b):
            b[pos] = val
    data = bytes(b[:cut]) + tail
    _total(data)
    # the same mutated bytes as an upstream answer to a good query
    q = parse_query(REAL[0])
    try:
        read_answer(q, data, endpoint=1, client_ip="10.0.0.1")
    except BadMessage:
        pass


def test_short_header_is_dropped_and_bad_body_gets_formerr():
    try:
        parse_query(b"\x01\x02\x03")
        raise AssertionError("parsed")
    except BadMessage as e:
        assert e.reply is None
    bad = _query()[:12] + b"\xc0\x0c\x00\x01\x00\x01"  # a question whose name points at itself (loop)
    try:
        parse_query(bad)
        raise AssertionError("parsed")
    except BadMessage as e:
        r = dns.message.from_wire(e.reply)
        assert r.id == 4242 and r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR


def test_a_response_sent_as_query_is_dropped():
    try:
        parse_query(REAL[2])
        raise AssertionError("parsed")
    except BadMessage as e:
        assert e.reply is None and "response" in e.reason


def test_too_long_name_is_formerr():
    # 5 labels of 63: 320 bytes on the wire, over DNS's 255
    wire = _query()[:12].replace(b"\x00\x01\x00\x00", b"\x00\x01\x00\x00", 1)
    qname = (b"\x3f" + b"a" * 63) * 5 + b"\x00"
    try:
        parse_query(wire[:12] + qname + b"\x00\x01\x00\x01")
        raise AssertionError("parsed")
    except BadMessage as e:
        assert dns.message.from_wire(e.reply).rcode() == dns.rcode.FORMERR


def test_refused_reply_echoes_the_question():
    q = parse_query(_query("API.GitHub.com", use_edns=0))
    assert q.qname == "api.github.com." and q.qtypes == ("A",)
    r = dns.message.from_wire(reply_with_rcode(q, dns.rcode.REFUSED))
    assert r.id == 4242 and r.rcode() == dns.rcode.REFUSED and r.question == q.message.question and not r.answer


def test_answer_follows_the_cname_chain_only():
    qw = _query("www.x.org")
    aw = _answer(qw, ("www.x.org.", 300, "CNAME", "edge.x.net."), ("edge.x.net.", 20, "A", "9.9.9.9"),
                 ("edge.x.net.", 40, "A", "9.9.9.8"), ("unrelated.evil.", 999, "A", "6.6.6.6"))
    a = read_answer(parse_query(qw), aw, endpoint=12, client_ip="10.0.0.1")
    assert a.ips == ("9.9.9.9", "9.9.9.8") and a.cnames == ("edge.x.net.",) and a.ttl == 20
    assert a.rrtypes == ("A", "CNAME") and a.rcode == 0 and a.qname == "www.x.org." and a.endpoint == 12


def test_answer_for_another_question_or_id_is_refused():
    q = parse_query(_query())
    other = _answer(_query("evil.com"), ("evil.com.", 60, "A", "6.6.6.6"))
    for wire in (other, _answer(_query()[:0] + _query(), ("api.github.com.", 60, "A", "1.2.3.4"))[:0] + b"x" * 20):
        try:
            read_answer(q, wire, endpoint=1, client_ip="10.0.0.1")
            raise AssertionError("accepted")
        except BadMessage:
            pass
    mism = bytearray(_answer(_query(), ("api.github.com.", 60, "A", "1.2.3.4")))
    mism[0] ^= 0xFF
    try:
        read_answer(q, bytes(mism), endpoint=1, client_ip="10.0.0.1")
        raise AssertionError("accepted")
    except BadMessage as e:
        assert "id" in e.reason
