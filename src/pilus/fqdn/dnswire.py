"""DNS messages from untrusted bytes (dnspython), sans I/O: parse a query, read an answer,
build the replies the proxy sends itself. Nothing here raises anything but ``BadMessage``
for any input (tests/unit/test_fqdn_wire.py fuzzes it).

TSIG is not validated (``keyring=False``): the proxy passes signed messages through and the
server checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

__all__ = ["BadMessage", "DNSAnswer", "DNSQuery", "parse_query", "read_answer", "reply_with_rcode"]

HEADER_LEN = 12
_QR = 0x8000
_KEEP_FLAGS = 0x7900  # opcode and RD copied from the query into a header-only error reply
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class BadMessage(Exception):
    """Bytes that are no usable DNS message. ``reply``: what to answer (FORMERR / NOTIMP
    with the query's id) when the header was readable, else None (drop)."""

    def __init__(self, reason: str, reply: bytes | None = None):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class DNSQuery:
    wire: bytes  # forwarded as received (same id)
    message: dns.message.Message
    qname: str  # FQDN form, lowercased, trailing dot; non-printable bytes as \DDD
    qtypes: tuple[str, ...]


@dataclass(frozen=True)
class DNSAnswer:
    """What an answer told about a query (``DNSProxy``'s ``on_answer`` gets it before the
    client does): addresses and CNAMEs on the chain from ``qname``; ``ttl`` the least TTL of
    those addresses (0 without any)."""

    endpoint: int | None
    client_ip: str
    qname: str
    ips: tuple[str, ...]
    ttl: int
    cnames: tuple[str, ...]
    rcode: int
    qtypes: tuple[str, ...] = ()
    rrtypes: tuple[str, ...] = ()


def _header_reply(wire: bytes, rcode: int) -> bytes:
    flags = int.from_bytes(wire[2:4], "big")
    return wire[:2] + ((flags & _KEEP_FLAGS) | _QR | rcode).to_bytes(2, "big") + bytes(8)


def _parse(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire, keyring=False)
    except dns.exception.DNSException as e:
        raise BadMessage(f"malformed DNS message: {type(e).__name__}: {str(e)[:120]}") from None
    except Exception as e:  # untrusted bytes: whatever dnspython raises is a bad message
        raise BadMessage(f"malformed DNS message: {type(e).__name__}") from None


def parse_query(wire: bytes) -> DNSQuery:
    if len(wire) < HEADER_LEN:
        raise BadMessage(f"{len(wire)} bytes: shorter than a DNS header")
    if int.from_bytes(wire[2:4], "big") & _QR:
        raise BadMessage("a response, not a query")  # never answer an answer (reflection loops)
    try:
        msg = _parse(wire)
    except BadMessage as e:
        e.reply = _header_reply(wire, dns.rcode.FORMERR)
        raise
    if msg.opcode() != dns.opcode.QUERY:
        raise BadMessage(f"opcode {dns.opcode.to_text(msg.opcode())} is not QUERY",
                         _header_reply(wire, dns.rcode.NOTIMP))
    if len(msg.question) != 1:
        raise BadMessage(f"{len(msg.question)} questions (one expected)", _header_reply(wire, dns.rcode.FORMERR))
    q = msg.question[0]
    return DNSQuery(wire, msg, q.name.to_text().lower(), (dns.rdatatype.to_text(q.rdtype),))


def reply_with_rcode(query: DNSQuery, rcode: int) -> bytes:
    """The proxy's own answer (REFUSED / NXDOMAIN for a denied query, SERVFAIL when the
    upstream failed): the question echoed, no records."""
    try:
        r = dns.message.make_response(query.message)
        r.flags |= dns.flags.RA
        r.set_rcode(rcode)
        return r.to_wire()
    except Exception:  # e.g. an EDNS option dnspython will not write back: a header-only reply
        return _header_reply(query.wire, rcode & 0xF)


def read_answer(query: DNSQuery, wire: bytes, *, endpoint: int | None, client_ip: str) -> DNSAnswer:
    """The upstream's answer to ``query``; BadMessage when it is malformed or answers
    something else (another id or question)."""
    if len(wire) < HEADER_LEN:
        raise BadMessage(f"answer of {len(wire)} bytes: shorter than a DNS header")
    msg = _parse(wire)
    if not msg.flags & dns.flags.QR or msg.id != query.message.id:
        raise BadMessage("the answer is not a response to this query (QR or id)")
    q = query.message.question[0]
    if len(msg.question) != 1 or msg.question[0].name != q.name or msg.question[0].rdtype != q.rdtype:
        raise BadMessage("the answer is for another question")
    # follow the CNAME chain from the question (loops and unrelated records are ignored)
    chain = [q.name]
    cnames: list[str] = []
    for _ in range(len(msg.answer)):
        nxt = next((rr for rr in msg.answer if rr.rdtype == dns.rdatatype.CNAME and rr.name == chain[-1]), None)
        target = getattr(next(iter(nxt), None), "target", None) if nxt is not None else None
        if not isinstance(target, dns.name.Name) or target in chain:
            break
        chain.append(target)
        cnames.append(target.to_text().lower())
    ips: list[str] = []
    ttls: list[int] = []
    for rr in msg.answer:
        if rr.rdtype in _ADDRESS_TYPES and rr.rdclass == dns.rdataclass.IN and rr.name in chain:
            for rd in rr:
                ip = getattr(rd, "address", None)  # GenericRdata (an odd class) has none
                if isinstance(ip, str) and ip not in ips:
                    ips.append(ip)
            ttls.append(rr.ttl)
    rrtypes = tuple(sorted({dns.rdatatype.to_text(rr.rdtype) for rr in msg.answer}))
    return DNSAnswer(endpoint, client_ip, query.qname, tuple(ips), min(ttls, default=0), tuple(cnames),
                     msg.rcode(), query.qtypes, rrtypes)
