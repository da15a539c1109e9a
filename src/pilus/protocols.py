"""IP protocol numbers and names: the one table every room uses.

Names are Cilium's spelling (``TCP``, ``UDP``, ``ICMP``, ``ICMPv6``, ``SCTP``;
``ANY`` is protocol 0, "any protocol" in policy keys and rules). Parsing is
case-insensitive; printing uses the canonical name.
"""

from __future__ import annotations

ANY = 0
ICMP = 1
TCP = 6
UDP = 17
ICMPV6 = 58
SCTP = 132

#: number -> canonical name
NAMES: dict[int, str] = {ANY: "ANY", ICMP: "ICMP", TCP: "TCP", UDP: "UDP", ICMPV6: "ICMPv6", SCTP: "SCTP"}

#: upper-case name -> number (``ICMPV4`` is Cilium's alias for ICMP)
NUMBERS: dict[str, int] = {name.upper(): num for num, name in NAMES.items()} | {"ICMPV4": ICMP}

#: protocols that carry ports (service and named-port protocols)
PORT_PROTOCOLS = frozenset({TCP, UDP, SCTP})


def name(proto: int) -> str:
    """Canonical name, or the number as text for protocols without one."""
    return NAMES.get(proto, str(proto))


def number(text: str) -> int:
    """Protocol number of a name (any case) or of a decimal number 0-255."""
    key = text.strip().upper()
    if key in NUMBERS:
        return NUMBERS[key]
    if key.isdigit() and int(key) <= 255:
        return int(key)
    raise ValueError(f"unknown protocol {text!r}: expected one of {', '.join(NAMES.values())}")
