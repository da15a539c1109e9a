"""The policy map state: one key type, one covering rule, one deny-wins pass, one lookup.

This is what an endpoint's policy map holds (``bpf/lib/policy.h``, Cilium's
``cilium_policy_<id>``) written as Python values, and the datapath's lookup over it:

* :class:`PolicyKey` ``(identity, egress, proto, dport, prefix_len)``: identity 0 =
  any peer; proto 0 = any protocol (then dport 0, prefix_len 0); ``prefix_len`` =
  significant leading bits of ``dport`` (16 exact, 0 any port); ICMP rules carry
  the ICMP type in ``dport``.
* :class:`PolicyEntry` ``(deny, proxy_port, rule)``: ``proxy_port`` is where an L7
  rule would redirect (0 until the L7 proxy lands); ``rule`` names the producing
  policy section (the map does not store it; ``policy trace`` explains with it).
* :func:`normalize` (deny wins): within one identity and direction the trie
  returns the longest proto/port prefix, so an allow more specific than a deny that
  covers it would win; such allows are written as denies (what the map holds).
  Across the identity and identity-0 lookups nothing is needed: the datapath lets
  a deny found by either win.
* :func:`lookup`: the datapath's lookup (``__policy_can_access`` then
  ``__policy_ipblock``) on a normalised state; :meth:`EndpointPolicy.verdict` adds
  the enforcement flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pilus import protocols

__all__ = [
    "DROP_NO_ENTRY",
    "DROP_DENY",
    "EndpointPolicy",
    "PolicyEntry",
    "PolicyKey",
    "Verdict",
    "covers",
    "lookup",
    "merge_entry",
    "normalize",
    "port_range",
    "port_range_text",
    "redirect_wins",
]

#: drop reasons of the lookup (the datapath's DROP_POLICY / DROP_POLICY_DENY)
DROP_NO_ENTRY = 133
DROP_DENY = 181


def port_mask(dport: int, prefix_len: int) -> int:
    """``dport`` with the bits past ``prefix_len`` cleared."""
    return dport & ((0xFFFF << (16 - prefix_len)) & 0xFFFF) if prefix_len else 0


def port_range(dport: int, prefix_len: int) -> tuple[int, int]:
    """First and last port a (dport, prefix_len) pair covers."""
    lo = port_mask(dport, prefix_len)
    return lo, lo | (0xFFFF >> prefix_len if prefix_len < 16 else 0)


def port_range_text(proto: int, dport: int, prefix_len: int) -> str:
    """Cilium's ``bpf policy get`` column text: "80/TCP", "8000-8003/TCP", "ANY/TCP", "ANY"."""
    if not proto:
        return "ANY"
    pname = protocols.name(proto)
    if prefix_len == 0:
        return f"ANY/{pname}"
    lo, hi = port_range(dport, prefix_len)
    return f"{lo}/{pname}" if lo == hi else f"{lo}-{hi}/{pname}"


@dataclass(frozen=True, order=True)
class PolicyKey:
    """One policy map key (not checked on construction: :meth:`validate` says what the map accepts)."""

    identity: int  # remote identity; 0 = any
    egress: bool
    proto: int  # IP protocol; 0 = any (then dport = prefix_len = 0)
    dport: int  # host order; ICMP: the ICMP type
    prefix_len: int  # significant leading bits of dport, 0..16

    def validate(self) -> None:
        """Raise ValueError unless the map can hold this key."""
        if not 0 <= self.identity <= 0xFFFFFFFF:
            raise ValueError(f"{self}: identity out of range")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"{self}: proto must be 0..255")
        if not 0 <= self.prefix_len <= 16:
            raise ValueError(f"{self}: prefix_len must be 0..16")
        if not 0 <= self.dport <= 0xFFFF:
            raise ValueError(f"{self}: dport must be 0..65535")
        if self.proto == 0 and (self.dport or self.prefix_len):
            raise ValueError(f"{self}: any-protocol entries cannot name a port")

    def masked(self) -> PolicyKey:
        """The key as the map stores it (port bits past the prefix cleared)."""
        d = port_mask(self.dport, self.prefix_len)
        return self if d == self.dport else PolicyKey(self.identity, self.egress, self.proto, d, self.prefix_len)

    @property
    def l4_prefix_len(self) -> int:
        """Proto+port prefix bits (the entry's ``lpm_prefix_length``, 0..24)."""
        return 0 if self.proto == 0 else 8 + self.prefix_len

    def matches(self, proto: int, dport: int) -> bool:
        """Does a packet with ``proto``/``dport`` fall under this key (identity aside)?"""
        if self.proto == 0:
            return True
        return self.proto == proto and port_mask(dport, self.prefix_len) == port_mask(self.dport, self.prefix_len)

    def text(self) -> str:
        return port_range_text(self.proto, self.dport, self.prefix_len)


def covers(outer: PolicyKey, inner: PolicyKey) -> bool:
    """``outer`` matches every packet ``inner`` matches (identity and direction aside)."""
    if outer.proto == 0:
        return True
    if outer.proto != inner.proto or outer.prefix_len > inner.prefix_len:
        return False
    return port_mask(inner.dport, outer.prefix_len) == port_mask(outer.dport, outer.prefix_len)


@dataclass(frozen=True)
class PolicyEntry:
    deny: bool
    proxy_port: int = 0  # the L7 proxy's port for this key (0: none, plain L4)
    rule: str = ""  # which policy section produced it (not in the map)


def normalize(entries: Mapping[PolicyKey, object]) -> dict[PolicyKey, PolicyEntry]:
    """Deny wins: the map state for ``entries`` (values need ``.deny``, optionally
    ``.proxy_port`` and ``.rule``). Keys are masked (a duplicate after masking: deny
    wins); an allow covered by a deny of the same identity and direction is written
    as that deny (its rule named), so the longest-prefix lookup cannot pick it.
    Raises ValueError for a key the map cannot hold. Idempotent."""
    out: dict[PolicyKey, PolicyEntry] = {}
    denies: dict[tuple[int, bool], list[PolicyKey]] = {}
    for k, v in entries.items():
        k.validate()
        k = k.masked()
        e = v if type(v) is PolicyEntry else _entry(v)
        old = out.get(k)
        if old is not None and old.deny:
            continue
        out[k] = e
        if e.deny:
            denies.setdefault((k.identity, k.egress), []).append(k)
    if not denies:
        redirect_wins(out, out)
        return out
    for k, e in out.items():
        if e.deny:
            continue
        for d in denies.get((k.identity, k.egress), ()):
            if covers(d, k):
                out[k] = PolicyEntry(True, 0, out[d].rule)
                break
    redirect_wins(out, out)
    return out


def redirect_wins(entries: dict[PolicyKey, PolicyEntry], wildcard: Mapping[PolicyKey, PolicyEntry]) -> None:
    """A plain allow of one identity under a key that an any-identity (0) allow with a
    proxy port covers takes that proxy port (in place): the datapath prefers the
    identity's entry at equal length, and a plain allow must never bypass L7."""
    proxied = [(k, e) for k, e in wildcard.items() if k.identity == 0 and not e.deny and e.proxy_port]
    if not proxied:
        return
    for k, e in list(entries.items()):
        if k.identity == 0 or e.deny or e.proxy_port:
            continue
        for w, we in proxied:
            if w.egress == k.egress and covers(w, k):
                entries[k] = PolicyEntry(False, we.proxy_port, e.rule)
                break


def _entry(v: object) -> PolicyEntry:
    return PolicyEntry(bool(v.deny), int(getattr(v, "proxy_port", 0) or 0), str(getattr(v, "rule", "") or ""))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Verdict:
    """What the datapath decides for the first packet of a connection."""

    allowed: bool
    reason: int  # 0, DROP_NO_ENTRY or DROP_DENY
    key: PolicyKey | None = None  # the entry that decided (None: no entry matched, or not enforced)
    entry: PolicyEntry | None = None
    any_identity: bool = False  # the key is identity 0's (the match type's L3 part)
    enforced: bool = True

    @property
    def action(self) -> str:
        return "allow" if self.allowed else "deny"

    @property
    def proxy_port(self) -> int:
        return self.entry.proxy_port if self.allowed and self.entry is not None else 0


def _longest(
    entries: Mapping[PolicyKey, PolicyEntry], ident: int, egress: bool, proto: int, dport: int
) -> PolicyKey | None:
    """The trie's answer for one identity: the longest proto/port prefix present."""
    for plen in range(16, -1, -1):
        k = PolicyKey(ident, egress, proto, port_mask(dport, plen), plen)
        if k in entries:
            return k
    k = PolicyKey(ident, egress, 0, 0, 0)
    return k if k in entries else None


def lookup(
    entries: Mapping[PolicyKey, PolicyEntry],
    identity: int,
    egress: bool,
    proto: int,
    dport: int,
    ipblock_identity: int = 0,
) -> Verdict:
    """The datapath's lookup on a normalised map state (bpf/lib/policy.h).

    A = identity's longest match; a deny there drops. B = identity 0's; chosen: B if
    B is a deny, A is missing or B's prefix is longer, else A. Then, for an
    ``ipblock_identity`` (the peer address's, 0: none or the direction has no ipBlock
    rules), C = its longest match: a deny there drops, an allow there stands in for
    "nothing matched"."""
    a = _longest(entries, identity, egress, proto, dport)
    if a is not None and entries[a].deny:
        return Verdict(False, DROP_DENY, a, entries[a])
    b = _longest(entries, 0, egress, proto, dport)
    if b is not None and (entries[b].deny or a is None or b.l4_prefix_len > a.l4_prefix_len):
        chosen, any_id = b, True
    else:
        chosen, any_id = a, False
    if chosen is not None and entries[chosen].deny:
        return Verdict(False, DROP_DENY, chosen, entries[chosen], any_id)
    if ipblock_identity:
        c = _longest(entries, ipblock_identity, egress, proto, dport)
        if c is not None and (entries[c].deny or chosen is None):
            e = entries[c]
            return Verdict(not e.deny, DROP_DENY if e.deny else 0, c, e)
    if chosen is None:
        return Verdict(False, DROP_NO_ENTRY)
    return Verdict(True, 0, chosen, entries[chosen], any_id)


@dataclass(frozen=True)
class EndpointPolicy:
    """One endpoint's policy as the datapath gets it: the enforcement flags and the map state.

    ``*_enforced`` false: the direction is not policed (allow all, no lookup);
    ``*_ipblock``: the direction's rules use a Kubernetes ipBlock (second lookup)."""

    ingress_enforced: bool
    egress_enforced: bool
    entries: dict[PolicyKey, PolicyEntry]
    ingress_ipblock: bool = False
    egress_ipblock: bool = False

    def verdict(self, identity: int, egress: bool, proto: int, dport: int, ipblock_identity: int = 0) -> Verdict:
        """:func:`lookup` with the endpoint's flags; ``ipblock_identity``: of the peer's address."""
        if not (self.egress_enforced if egress else self.ingress_enforced):
            return Verdict(True, 0, enforced=False)
        use_ipblock = self.egress_ipblock if egress else self.ingress_ipblock
        return lookup(self.entries, identity, egress, proto, dport, ipblock_identity if use_ipblock else 0)


def merge_entry(entries: dict[PolicyKey, PolicyEntry], key: PolicyKey, entry: PolicyEntry) -> None:
    """Add ``entry`` under ``key``; two rules producing one key: the deny stays, else the
    one with a proxy port, else the first."""
    old = entries.get(key)
    if old is None or (entry.deny and not old.deny):
        entries[key] = entry
    elif not old.deny and not entry.deny and entry.proxy_port and not old.proxy_port:
        entries[key] = entry  # two allows: the L7 redirect wins (visibility is never bypassed)
