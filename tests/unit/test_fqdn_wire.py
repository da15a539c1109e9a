"""dnswire on untrusted bytes: random bytes and mutated real messages never raise anything
but BadMessage; the replies the proxy builds; what an answer tells (CNAME chain, TTL)."""

from __future__ import annotations

import contextlib

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rrset
import pytest
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
        with contextlib.suppress(BadMessage):
            read_answer(q, other, endpoint=1, client_ip="10.0.0.1")


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
    with contextlib.suppress(BadMessage):
        read_answer(q, data, endpoint=1, client_ip="10.0.0.1")


def test_short_header_is_dropped_and_bad_body_gets_formerr():
    with pytest.raises(BadMessage) as e:
        parse_query(b"\x01\x02\x03")
    assert e.value.reply is None
    loop = _query()[:12] + b"\xc0\x0c\x00\x01\x00\x01"  # a question name that points at itself
    with pytest.raises(BadMessage) as e:
        parse_query(loop)
    r = dns.message.from_wire(e.value.reply)
    assert r.id == 4242 and r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR


def test_a_response_sent_as_query_is_dropped():
    with pytest.raises(BadMessage) as e:
        parse_query(REAL[2])
    assert e.value.reply is None and "response" in e.value.reason


def test_too_long_name_is_formerr():
    qname = (b"\x3f" + b"a" * 63) * 5 + b"\x00"  # 320 bytes, over DNS's 255
    with pytest.raises(BadMessage) as e:
        parse_query(_query()[:12] + qname + b"\x00\x01\x00\x01")
    assert dns.message.from_wire(e.value.reply).rcode() == dns.rcode.FORMERR
    assert "NameTooLong" in e.value.reason


def test_other_opcodes_get_notimp():
    q = dns.message.make_query("a.com", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(BadMessage) as e:
        parse_query(q.to_wire())
    assert dns.message.from_wire(e.value.reply).rcode() == dns.rcode.NOTIMP


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
    with pytest.raises(BadMessage, match="another question"):
        read_answer(q, _answer(_query("evil.com"), ("evil.com.", 60, "A", "6.6.6.6")), endpoint=1, client_ip="x")
    wrong_id = bytearray(_answer(_query(), ("api.github.com.", 60, "A", "1.2.3.4")))
    wrong_id[0] ^= 0xFF
    with pytest.raises(BadMessage, match="QR or id"):
        read_answer(q, bytes(wrong_id), endpoint=1, client_ip="x")
    with pytest.raises(BadMessage, match="QR or id"):
        read_answer(q, _query(), endpoint=1, client_ip="x")  # a query is no answer
