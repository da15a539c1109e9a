"""Per-endpoint policy maps (Cilium's cilium_policy_<id>): create, sync, read.

Each endpoint's policy is an LPM trie (``struct policy_key -> struct
policy_entry`` in bpf/lib/common.h) created here with ``bpf_map_create``,
pinned as ``<pin root>/pilus_policy_<id:05d>`` and published to the datapath
through the pinned hash-of-maps ``pilus_policy`` (endpoint id -> map). Both
outlive the agent: a restarted agent finds every endpoint's map through
``pilus_policy`` (or its pin) and syncs it in place, so established
connections and counters survive.

Key encoding (Cilium's): identity and direction always match in full (40
bits); ``proto`` adds 8 bits; ``prefix_len`` leading bits of ``dport`` add up
to 16 more. ``proto == 0`` means any protocol (then ``dport == 0`` and
``prefix_len == 0``). ICMP rules put the ICMP type in ``dport`` (proto 1,
prefix 16). Identity 0 is "any identity" (L4-only rules).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from . import abi
from ._libbpf import bpf_map_create_opts, check, lib
from .loader import close_fd, map_info, obj_get
from .maps import BpfMap, FdSource, _ipc_key, proto_name
from .reasons import POLICY_MATCH_TYPES

BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1

#: entries of one endpoint's policy map (Cilium's default, bpf-policy-map-max)
POLICY_MAP_CAPACITY = abi.PILUS_POLICY_MAX
PIN_PREFIX = "pilus_policy_"

MATCH_TYPES = POLICY_MATCH_TYPES


def _error(msg: str) -> Exception:
    from .datapath import DatapathError  # datapath.py imports this module

    return DatapathError(msg)


@dataclass(frozen=True)
class PolicyKey:
    """One policy map key, as the policy engine produces it."""

    identity: int  # remote identity; 0 = any
    egress: bool
    proto: int  # IP protocol; 0 = any (then dport = prefix_len = 0)
    dport: int  # host order; ICMP: the ICMP type
    prefix_len: int  # significant leading bits of dport, 0..16


@dataclass(frozen=True)
class PolicyValue:
    deny: bool
    proxy_port: int = 0


def _validate(k: PolicyKey) -> None:
    if not 0 <= k.identity <= 0xFFFFFFFF:
        raise ValueError(f"{k}: identity out of range")
    if not 0 <= k.proto <= 255:
        raise ValueError(f"{k}: proto must be 0..255")
    if not 0 <= k.prefix_len <= 16:
        raise ValueError(f"{k}: prefix_len must be 0..16")
    if not 0 <= k.dport <= 0xFFFF:
        raise ValueError(f"{k}: dport must be 0..65535")
    if k.proto == 0 and (k.dport or k.prefix_len):
        raise ValueError(f"{k}: any-protocol entries cannot name a port")


def _mask(dport: int, prefix_len: int) -> int:
    return dport & ((0xFFFF << (16 - prefix_len)) & 0xFFFF) if prefix_len else 0


def l4_prefix_len(k: PolicyKey) -> int:
    """Proto+port prefix bits of a key (the entry's lpm_prefix_length, 0..24)."""
    return abi.POLICY_PROTO_PREFIX + k.prefix_len if k.proto else 0


def key_to_c(k: PolicyKey) -> abi.PolicyKeyC:
    _validate(k)
    c = abi.PolicyKeyC()
    c.lpm_prefixlen = abi.POLICY_STATIC_PREFIX + l4_prefix_len(k)
    c.sec_label = k.identity
    c.egress = 1 if k.egress else 0
    c.protocol = k.proto
    c.dport = abi.port_to_raw(_mask(k.dport, k.prefix_len)) if k.proto else 0
    return c


def key_from_c(c: abi.PolicyKeyC) -> PolicyKey:
    l4 = max(0, c.lpm_prefixlen - abi.POLICY_STATIC_PREFIX)
    proto = c.protocol if l4 >= abi.POLICY_PROTO_PREFIX else 0
    plen = max(0, l4 - abi.POLICY_PROTO_PREFIX) if proto else 0
    dport = _mask(abi.raw_to_port(c.dport), plen) if proto else 0
    return PolicyKey(identity=c.sec_label, egress=bool(c.egress), proto=proto, dport=dport, prefix_len=plen)


def port_range(dport: int, prefix_len: int) -> tuple[int, int]:
    """First and last port a (dport, prefix_len) pair covers."""
    lo = _mask(dport, prefix_len)
    return lo, lo | (0xFFFF >> prefix_len if prefix_len < 16 else 0)


def port_range_text(proto: int, dport: int, prefix_len: int) -> str:
    """Cilium's column text: "80/TCP", "8000-8003/TCP", "ANY/TCP", "ANY"."""
    if not proto:
        return "ANY"
    pname = proto_name(proto)
    if prefix_len == 0:
        return f"ANY/{pname}"
    lo, hi = port_range(dport, prefix_len)
    return f"{lo}/{pname}" if lo == hi else f"{lo}-{hi}/{pname}"


def _covers(d: PolicyKey, a: PolicyKey) -> bool:
    """Does entry ``d`` match every packet ``a`` matches (same identity/direction)?"""
    if d.proto == 0:
        return True
    if d.proto != a.proto or d.prefix_len > a.prefix_len:
        return False
    return _mask(a.dport, d.prefix_len) == _mask(d.dport, d.prefix_len)


def close_denies(entries: Mapping[PolicyKey, Any]) -> dict[PolicyKey, PolicyValue]:
    """Normalize to PolicyValue and make deny win inside one identity.

    The datapath takes the longest proto/port prefix per identity, so an allow
    more specific than a deny covering it (deny TCP, allow 80/TCP) would win;
    such allows are written as denies (Cilium's map state does the same).
    """
    out: dict[PolicyKey, PolicyValue] = {}
    denies: dict[tuple[int, bool], list[PolicyKey]] = {}
    for k, v in entries.items():
        _validate(k)
        k = PolicyKey(k.identity, bool(k.egress), k.proto, _mask(k.dport, k.prefix_len), k.prefix_len)
        val = PolicyValue(bool(v.deny), int(getattr(v, "proxy_port", 0) or 0))
        if k in out and out[k].deny:
            continue  # duplicates after masking: deny wins
        out[k] = val
        if val.deny:
            denies.setdefault((k.identity, k.egress), []).append(k)
    for k, v in list(out.items()):
        if v.deny:
            continue
        for d in denies.get((k.identity, k.egress), ()):
            if _covers(d, k):
                out[k] = PolicyValue(True, 0)
                break
    return out


def _entry(k: PolicyKey, v: PolicyValue) -> abi.PolicyEntryC:
    e = abi.PolicyEntryC()
    e.deny = 1 if v.deny else 0
    e.proxy_port = abi.port_to_raw(v.proxy_port) if v.proxy_port else 0
    e.lpm_prefix_length = l4_prefix_len(k)
    return e


class PolicyMaps:
    """All endpoints' policy maps of one node (``Datapath.policy``).

    ``outer_fd``: the ``pilus_policy`` hash-of-maps; ``pin_root``: the node's
    pin directory (``None``: no pins, tests).
    """

    def __init__(
        self,
        outer_fd: FdSource,
        pin_root: Path | None = None,
        capacity: int = POLICY_MAP_CAPACITY,
    ) -> None:
        self.outer = BpfMap(outer_fd, ctypes.c_uint32, ctypes.c_uint32, "pilus_policy")
        self.pin_root = Path(pin_root) if pin_root is not None else None
        self.capacity = capacity
        self._fds: dict[int, int] = {}

    # ------------------------------------------------------------ maps

    def pin_path(self, ep_id: int) -> Path | None:
        return self.pin_root / f"{PIN_PREFIX}{ep_id:05d}" if self.pin_root is not None else None

    def _compatible(self, fd: int) -> bool:
        info = map_info(fd)
        return (
            info.type == BPF_MAP_TYPE_LPM_TRIE
            and info.key_size == ctypes.sizeof(abi.PolicyKeyC)
            and info.value_size == ctypes.sizeof(abi.PolicyEntryC)
            and info.max_entries == self.capacity
            and info.map_flags == BPF_F_NO_PREALLOC
        )

    def _published_fd(self, ep_id: int) -> int | None:
        """fd of the map the datapath uses for ``ep_id`` (cached), or None."""
        map_id = self.outer.lookup(ctypes.c_uint32(ep_id))
        if map_id is None:
            self._forget(ep_id)
            return None
        fd = self._fds.get(ep_id)
        if fd is not None and map_info(fd).id == map_id.value:
            return fd
        self._forget(ep_id)
        try:
            fd = check(lib.bpf_map_get_fd_by_id(map_id.value), "bpf_map_get_fd_by_id")
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # replaced meanwhile
                return None
            raise
        self._fds[ep_id] = fd
        return fd

    def _pinned_fd(self, ep_id: int) -> int | None:
        path = self.pin_path(ep_id)
        if path is None or not path.exists():
            return None
        try:
            return obj_get(path)
        except OSError:
            return None

    def _forget(self, ep_id: int) -> None:
        fd = self._fds.pop(ep_id, None)
        if fd is not None:
            close_fd(fd)

    def _create(self, ep_id: int) -> int:
        opts = bpf_map_create_opts()
        opts.sz = ctypes.sizeof(opts)
        opts.map_flags = BPF_F_NO_PREALLOC
        name = f"pilus_pol{ep_id:05d}"[:15].encode()
        return check(
            lib.bpf_map_create(
                BPF_MAP_TYPE_LPM_TRIE,
                name,
                ctypes.sizeof(abi.PolicyKeyC),
                ctypes.sizeof(abi.PolicyEntryC),
                self.capacity,
                ctypes.byref(opts),
            ),
            "bpf_map_create",
            f"policy map of endpoint {ep_id}",
        )

    def _publish(self, ep_id: int, fd: int) -> None:
        """Make ``fd`` the endpoint's map: pin it, then switch the datapath to it."""
        path = self.pin_path(ep_id)
        if path is not None:
            # bpffs has no rename: replace the pin (the datapath reads the
            # map through pilus_policy, never through the pin)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            check(lib.bpf_obj_pin(fd, str(path).encode()), "bpf_obj_pin", str(path))
        # one atomic switch for the datapath
        self.outer.update(ctypes.c_uint32(ep_id), ctypes.c_uint32(fd))
        if self._fds.get(ep_id) != fd:
            self._forget(ep_id)
            self._fds[ep_id] = fd

    def _map(self, fd: int, ep_id: int) -> BpfMap:
        return BpfMap(fd, abi.PolicyKeyC, abi.PolicyEntryC, f"policy map of endpoint {ep_id}")

    # ------------------------------------------------------------ API

    def sync(self, ep_id: int, entries: Mapping[PolicyKey, Any]) -> dict:
        """Make the endpoint's map hold exactly ``entries`` (values need
        ``.deny`` and ``.proxy_port``); create the map if missing.

        Changes are applied in place: new and changed entries first (denies
        before allows), stale ones last, so the map never passes through an
        empty or deny-all state. When old and new together would not fit, a
        complete new map is built and swapped in atomically. Counters of kept
        entries are preserved. Returns ``{"added", "updated", "deleted"}``.
        """
        try:
            desired = close_denies(entries)
        except ValueError as exc:
            raise _error(f"endpoint {ep_id} policy: bad entry {exc}") from None
        if len(desired) > self.capacity:
            raise _error(f"endpoint {ep_id} policy needs {len(desired)} entries, the policy map holds {self.capacity}")
        try:
            return self._sync(ep_id, desired)
        except OSError as exc:
            raise _error(f"syncing the policy map of endpoint {ep_id} failed: {exc}") from exc

    def _sync(self, ep_id: int, desired: dict[PolicyKey, PolicyValue]) -> dict:
        want = {bytes(key_to_c(k).to_bytes()): (k, v) for k, v in desired.items()}
        published = self._published_fd(ep_id)
        fd = published
        if fd is None:
            # e.g. pilus_policy was recreated under a live pin: adopt the pin
            fd = self._pinned_fd(ep_id)
        if fd is not None and not self._compatible(fd):
            if fd != published:
                close_fd(fd)
            fd = None  # from a build with another layout/capacity: replace
        current: dict[bytes, abi.PolicyEntryC] = {}
        if fd is not None:
            current = {bytes(k.to_bytes()): v for k, v in self._map(fd, ep_id).items()}
            if fd != published:
                self._publish(ep_id, fd)

        added = [b for b in want if b not in current]
        deleted = [b for b in current if b not in want]
        updated = [
            b
            for b in want
            if b in current
            and (
                bool(current[b].deny) != want[b][1].deny
                or current[b].proxy_port != _entry(*want[b]).proxy_port
                or current[b].lpm_prefix_length != _entry(*want[b]).lpm_prefix_length
            )
        ]
        stats = {"added": len(added), "updated": len(updated), "deleted": len(deleted)}

        def value(b: bytes) -> abi.PolicyEntryC:
            e = _entry(*want[b])
            old = current.get(b)
            if old is not None:  # keep the counters
                e.packets, e.bytes = old.packets, old.bytes
            return e

        if fd is None or len(current) + len(added) > self.capacity:
            new_fd = self._create(ep_id)
            try:
                m = self._map(new_fd, ep_id)
                for b in want:
                    m.update(abi.PolicyKeyC.from_raw(b), value(b))
                self._publish(ep_id, new_fd)
            except BaseException:
                if self._fds.get(ep_id) != new_fd:
                    close_fd(new_fd)
                raise
            return stats

        m = self._map(fd, ep_id)
        writes = added + updated
        writes.sort(key=lambda b: not want[b][1].deny)  # denies first
        for b in writes:
            m.update(abi.PolicyKeyC.from_raw(b), value(b))
        for b in deleted:
            m.delete(abi.PolicyKeyC.from_raw(b))
        return stats

    def delete(self, ep_id: int) -> None:
        """Drop the endpoint's map (the endpoint is gone)."""
        try:
            self.outer.delete(ctypes.c_uint32(ep_id))
        except OSError as exc:
            raise _error(f"removing the policy map of endpoint {ep_id} failed: {exc}") from exc
        self._forget(ep_id)
        path = self.pin_path(ep_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def endpoints(self) -> list[int]:
        """Endpoint ids that have a policy map in the datapath."""
        return sorted(k.value for k in self.outer.keys())  # noqa: SIM118 (a BpfMap)

    def _entries(self, ep_id: int) -> list[tuple[PolicyKey, abi.PolicyEntryC]]:
        fd = self._published_fd(ep_id)
        if fd is None:
            return []
        return [(key_from_c(k), v) for k, v in self._map(fd, ep_id).items()]

    def items(self, ep_id: int) -> list[dict]:
        """The endpoint's map as rows (Cilium's `bpf policy get` columns)."""
        rows = []
        for k, v in self._entries(ep_id):
            rows.append(
                {
                    "identity": k.identity,
                    "direction": "egress" if k.egress else "ingress",
                    "proto": k.proto,
                    "dport": k.dport,
                    "prefix_len": k.prefix_len,
                    "port": port_range_text(k.proto, k.dport, k.prefix_len),
                    "deny": bool(v.deny),
                    "proxy_port": abi.raw_to_port(v.proxy_port),
                    "packets": v.packets,
                    "bytes": v.bytes,
                }
            )
        rows.sort(key=lambda r: (r["direction"], r["identity"], r["proto"], r["dport"], r["prefix_len"]))
        return rows

    def verdict(
        self, ep_id: int, identity: int, egress: bool, proto: int, dport: int, ipblock_identity: int = 0
    ) -> dict:
        """What the datapath decides for the first packet of such a connection,
        with the same algorithm on the same map (for `policy trace`).
        ``ipblock_identity``: of the peer's address in pilus_ipblock, for an endpoint
        whose ENDPOINT_F_IPBLOCK_* flag is set (0: no second lookup)."""
        fd = self._published_fd(ep_id)
        if fd is None:
            return {"action": "deny", "reason": abi.DROP_POLICY, "match_type": "none", "entry": None}
        m = self._map(fd, ep_id)

        def lookup(ident: int) -> tuple[PolicyKey, abi.PolicyEntryC] | None:
            k = abi.PolicyKeyC()
            k.lpm_prefixlen = abi.POLICY_FULL_PREFIX
            k.sec_label = ident
            k.egress = 1 if egress else 0
            k.protocol = proto
            k.dport = abi.port_to_raw(dport)
            v = m.lookup(k)
            if v is None:
                return None
            # the matched key is not returned by the kernel: rebuild it
            l4 = v.lpm_prefix_length
            plen = max(0, l4 - abi.POLICY_PROTO_PREFIX) if l4 else 0
            return (
                PolicyKey(ident, egress, proto if l4 else 0, _mask(dport, plen) if l4 else 0, plen),
                v,
            )

        def mtype(v: abi.PolicyEntryC, any_id: bool) -> int:
            p = v.lpm_prefix_length
            if p > abi.POLICY_PROTO_PREFIX:
                return abi.POLICY_MATCH_L4_ONLY if any_id else abi.POLICY_MATCH_L3_L4
            if p == abi.POLICY_PROTO_PREFIX:
                return abi.POLICY_MATCH_PROTO_ONLY if any_id else abi.POLICY_MATCH_L3_PROTO
            return abi.POLICY_MATCH_ALL if any_id else abi.POLICY_MATCH_L3_ONLY

        a = lookup(identity)
        chosen, any_id = None, False
        if a is not None and a[1].deny:
            chosen = a
        else:
            b = lookup(0)
            if b is not None and (b[1].deny or a is None or b[1].lpm_prefix_length > a[1].lpm_prefix_length):
                chosen, any_id = b, True
            else:
                chosen = a
        if ipblock_identity and (chosen is None or not chosen[1].deny):
            # the second lookup (bpf/lib/policy.h __policy_ipblock): its deny wins, its
            # allow stands in for "nothing matched"
            c = lookup(ipblock_identity)
            if c is not None and (c[1].deny or chosen is None):
                chosen, any_id = c, False
        if chosen is None:
            return {"action": "deny", "reason": abi.DROP_POLICY, "match_type": "none", "entry": None}
        k, v = chosen
        return {
            "action": "deny" if v.deny else "allow",
            "reason": abi.DROP_POLICY_DENY if v.deny else 0,
            "match_type": MATCH_TYPES[mtype(v, any_id)],
            "entry": {
                "identity": k.identity,
                "direction": "egress" if egress else "ingress",
                "port": port_range_text(k.proto, k.dport, k.prefix_len),
                "deny": bool(v.deny),
            },
        }

    def close(self) -> None:
        """Close cached fds (maps stay: pins and pilus_policy hold them)."""
        for ep_id in list(self._fds):
            self._forget(ep_id)


class IPBlockMap:
    """pilus_ipblock: the prefixes Kubernetes ipBlocks name -> their local identity
    (the datapath's second policy lookup, bpf/lib/policy.h). Keyed as the ipcache."""

    def __init__(self, fd: FdSource) -> None:
        self.map = BpfMap(fd, abi.IpcacheKey, ctypes.c_uint32, "pilus_ipblock")

    def upsert(self, prefix: IPv4Network, identity: int) -> None:
        self.map.update(_ipc_key(IPv4Network(prefix, strict=False)), ctypes.c_uint32(identity))

    def delete(self, prefix: IPv4Network) -> bool:
        return self.map.delete(_ipc_key(IPv4Network(prefix, strict=False)))

    def items(self) -> list[tuple[IPv4Network, int]]:
        out = []
        for k, v in self.map.items():
            plen = k.prefixlen - abi.IPCACHE_STATIC_PREFIX
            out.append((IPv4Network((abi.raw_to_ip4(k.addr.ip4), plen), strict=False), v.value))
        return sorted(out, key=lambda t: (t[0].network_address, t[0].prefixlen))


__all__ = [
    "MATCH_TYPES",
    "POLICY_MAP_CAPACITY",
    "IPBlockMap",
    "PolicyKey",
    "PolicyMaps",
    "PolicyValue",
    "close_denies",
    "port_range",
    "port_range_text",
]
