"""Per-endpoint policy maps (Cilium's cilium_policy_<id>): encoding and lifecycle.

Each endpoint's policy is an LPM trie (``struct policy_key -> struct
policy_entry`` in bpf/lib/common.h) created here with ``bpf_map_create``,
pinned as ``<pin root>/pilus_policy_<id:05d>`` and published to the datapath
through the pinned hash-of-maps ``pilus_policy`` (endpoint id -> map). Both
outlive the agent: a restarted agent finds every endpoint's map through
``pilus_policy`` (or its pin) and syncs it in place, so established
connections and counters survive.

What the map holds and what the datapath decides with it is
``pilus.policy.mapstate`` (the key type, deny-wins normalisation and the lookup
mirror); this module only encodes it. Key encoding (Cilium's): identity and
direction always match in full (40 bits); ``proto`` adds 8 bits; ``prefix_len``
leading bits of ``dport`` add up to 16 more. ``sync`` writes through one
``Reconciler`` per endpoint map.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections.abc import Iterator, Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from pilus.policy.mapstate import PolicyEntry, PolicyKey, Verdict, normalize, port_mask, port_range, port_range_text
from pilus.reconcile import ReconcileError, Reconciler, writers_status

from . import abi
from ._libbpf import bpf_map_create_opts, check, lib
from .errors import DatapathError
from .loader import close_fd, map_info, obj_get
from .maps import BpfMap, FdSource, _ipc_key
from .reasons import POLICY_MATCH_TYPES

BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1

#: entries of one endpoint's policy map (Cilium's default, bpf-policy-map-max)
POLICY_MAP_CAPACITY = abi.PILUS_POLICY_MAX
PIN_PREFIX = "pilus_policy_"

MATCH_TYPES = POLICY_MATCH_TYPES

def key_to_c(k: PolicyKey) -> abi.PolicyKeyC:
    k.validate()
    c = abi.PolicyKeyC()
    c.lpm_prefixlen = abi.POLICY_STATIC_PREFIX + k.l4_prefix_len
    c.sec_label = k.identity
    c.egress = 1 if k.egress else 0
    c.protocol = k.proto
    c.dport = abi.port_to_raw(port_mask(k.dport, k.prefix_len)) if k.proto else 0
    return c


def key_from_c(c: abi.PolicyKeyC) -> PolicyKey:
    l4 = max(0, c.lpm_prefixlen - abi.POLICY_STATIC_PREFIX)
    proto = c.protocol if l4 >= abi.POLICY_PROTO_PREFIX else 0
    plen = max(0, l4 - abi.POLICY_PROTO_PREFIX) if proto else 0
    dport = port_mask(abi.raw_to_port(c.dport), plen) if proto else 0
    return PolicyKey(identity=c.sec_label, egress=bool(c.egress), proto=proto, dport=dport, prefix_len=plen)


def entry_to_c(k: PolicyKey, v: PolicyEntry) -> abi.PolicyEntryC:
    e = abi.PolicyEntryC()
    e.deny = 1 if v.deny else 0
    e.proxy_port = abi.port_to_raw(v.proxy_port) if v.proxy_port else 0
    e.lpm_prefix_length = k.l4_prefix_len
    return e


def entry_from_c(e: abi.PolicyEntryC) -> PolicyEntry:
    """The control plane's part of an entry (counters left out)."""
    return PolicyEntry(bool(e.deny), abi.raw_to_port(e.proxy_port) if e.proxy_port else 0)


def match_type(v: Verdict) -> str:
    """The policy-verdict event's match type for a lookup result (bpf/lib/policy.h policy_match_type)."""
    if v.key is None:
        return MATCH_TYPES[abi.POLICY_MATCH_NONE]
    plen = v.key.l4_prefix_len
    if plen > abi.POLICY_PROTO_PREFIX:
        t = abi.POLICY_MATCH_L4_ONLY if v.any_identity else abi.POLICY_MATCH_L3_L4
    elif plen == abi.POLICY_PROTO_PREFIX:
        t = abi.POLICY_MATCH_PROTO_ONLY if v.any_identity else abi.POLICY_MATCH_L3_PROTO
    else:
        t = abi.POLICY_MATCH_ALL if v.any_identity else abi.POLICY_MATCH_L3_ONLY
    return MATCH_TYPES[t]


class _PolicyMapTarget:
    """One endpoint's policy map as a reconciler target. ``dump`` leaves the
    counters out (kept entries keep theirs); ``update`` carries the counters of
    the entry it replaces, read from ``counters_from`` (the map being replaced) or
    the map itself."""

    def __init__(self, m: BpfMap, counters_from: BpfMap | None = None) -> None:
        self.map = m
        self.counters_from = counters_from
        self._snapshot: list[tuple[PolicyKey, PolicyEntry]] | None = None

    def read(self) -> dict[PolicyKey, PolicyEntry]:
        """Read the map now; the reconciler's first ``dump`` gets this same read."""
        self._snapshot = [(key_from_c(k), entry_from_c(v)) for k, v in self.map.items()]
        return dict(self._snapshot)

    def dump(self) -> Iterator[tuple[PolicyKey, PolicyEntry]]:
        snap, self._snapshot = self._snapshot, None
        if snap is not None:
            return iter(snap)
        return ((key_from_c(k), entry_from_c(v)) for k, v in self.map.items())

    def update(self, key: PolicyKey, value: PolicyEntry) -> None:
        ck = key_to_c(key)
        e = entry_to_c(key, value)
        old = (self.counters_from or self.map).lookup(ck)
        if old is not None:
            e.packets, e.bytes = old.packets, old.bytes
        self.map.update(ck, e)

    def delete(self, key: PolicyKey) -> None:
        self.map.delete(key_to_c(key))


def _denies_first(entries: Mapping[PolicyKey, PolicyEntry]) -> dict[PolicyKey, PolicyEntry]:
    return {**{k: v for k, v in entries.items() if v.deny}, **{k: v for k, v in entries.items() if not v.deny}}


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
        self._writers: dict[int, tuple[int, Reconciler[PolicyKey, PolicyEntry]]] = {}  # ep -> (map fd, writer)

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
        """Make the endpoint's map hold exactly the map state of ``entries`` (values
        need ``.deny``, optionally ``.proxy_port``; ``mapstate.normalize`` makes deny
        win); create the map if missing.

        Changes are applied in place: new and changed entries first (denies
        before allows), stale ones last, so the map never passes through an
        empty or deny-all state. When old and new together would not fit, a
        complete new map is built and swapped in atomically. Counters of kept
        entries are preserved. Returns ``{"added", "updated", "deleted"}``.
        """
        try:
            state = normalize(entries)
        except ValueError as exc:
            raise DatapathError(f"endpoint {ep_id} policy: bad entry {exc}") from None
        desired = _denies_first({k: PolicyEntry(e.deny, e.proxy_port) for k, e in state.items()})
        if len(desired) > self.capacity:
            raise DatapathError(
                f"endpoint {ep_id} policy needs {len(desired)} entries, the policy map holds {self.capacity}"
            )
        try:
            return self._sync(ep_id, desired)
        except (OSError, ReconcileError) as exc:
            raise DatapathError(f"syncing the policy map of endpoint {ep_id} failed: {exc}") from exc

    def _current_fd(self, ep_id: int) -> int | None:
        """The endpoint's usable map: the published one, else its pin (then published)."""
        published = self._published_fd(ep_id)
        fd = published
        if fd is None:
            # e.g. pilus_policy was recreated under a live pin: adopt the pin
            fd = self._pinned_fd(ep_id)
        if fd is not None and not self._compatible(fd):
            if fd != published:
                close_fd(fd)
            return None  # from a build with another layout/capacity: replace
        if fd is not None and fd != published:
            self._publish(ep_id, fd)
        return fd

    def _sync(self, ep_id: int, desired: dict[PolicyKey, PolicyEntry]) -> dict:
        what = f"policy map of endpoint {ep_id}"
        fd = self._current_fd(ep_id)
        known = self._writers.get(ep_id)
        if fd is not None and known is not None and known[0] == fd:
            writer = known[1]
            before = dict(writer.desired)
        elif fd is not None:
            target = _PolicyMapTarget(self._map(fd, ep_id))
            before = target.read()
            writer = Reconciler(what, target)
        else:
            before = {}
        stats = {
            "added": sum(1 for k in desired if k not in before),
            "updated": sum(1 for k, v in desired.items() if k in before and before[k] != v),
            "deleted": sum(1 for k in before if k not in desired),
        }
        if fd is None or len(before.keys() | desired.keys()) > self.capacity:
            self._replace(ep_id, desired, fd)
            return stats
        self._writers[ep_id] = (fd, writer)
        # new and changed entries first, keeping the stale ones; then the stale ones go
        stale = {k: v for k, v in before.items() if k not in desired}
        writer.set({**stale, **desired}).raise_for_errors(what)
        writer.set(desired).raise_for_errors(what)
        return stats

    def _replace(self, ep_id: int, desired: dict[PolicyKey, PolicyEntry], old_fd: int | None) -> None:
        """Build a complete new map (counters carried from ``old_fd``'s) and switch to it."""
        new_fd = self._create(ep_id)
        try:
            old = self._map(old_fd, ep_id) if old_fd is not None else None
            target = _PolicyMapTarget(self._map(new_fd, ep_id), counters_from=old)
            writer: Reconciler[PolicyKey, PolicyEntry] = Reconciler(f"policy map of endpoint {ep_id}", target)
            writer.set(desired).raise_for_errors(f"policy map of endpoint {ep_id}")
            self._publish(ep_id, new_fd)
        except BaseException:
            if self._fds.get(ep_id) != new_fd:
                close_fd(new_fd)
            raise
        target.counters_from = None  # the old map's fd is closed now
        self._writers[ep_id] = (new_fd, writer)

    def delete(self, ep_id: int) -> None:
        """Drop the endpoint's map (the endpoint is gone)."""
        try:
            self.outer.delete(ctypes.c_uint32(ep_id))
        except OSError as exc:
            raise DatapathError(f"removing the policy map of endpoint {ep_id} failed: {exc}") from exc
        self._writers.pop(ep_id, None)
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

    def state(self, ep_id: int) -> dict[PolicyKey, PolicyEntry]:
        """What the endpoint's map holds, as map state (``mapstate.lookup`` decides on it)."""
        return {k: entry_from_c(v) for k, v in self._entries(ep_id)}

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
                    "port": k.text(),
                    "deny": bool(v.deny),
                    "proxy_port": abi.raw_to_port(v.proxy_port),
                    "packets": v.packets,
                    "bytes": v.bytes,
                }
            )
        rows.sort(key=lambda r: (r["direction"], r["identity"], r["proto"], r["dport"], r["prefix_len"]))
        return rows

    def status(self) -> dict:
        """The endpoint maps' writers as one row of ``pilus status``."""
        return writers_status("policy maps", [writer for _fd, writer in self._writers.values()])

    def close(self) -> None:
        """Close cached fds (maps stay: pins and pilus_policy hold them)."""
        self._writers.clear()
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

    # Reconciler target: prefix -> identity
    def dump(self) -> list[tuple[IPv4Network, int]]:
        return self.items()

    def update(self, prefix: IPv4Network, identity: int) -> None:
        self.upsert(prefix, identity)


__all__ = [
    "MATCH_TYPES",
    "POLICY_MAP_CAPACITY",
    "IPBlockMap",
    "PolicyKey",
    "PolicyMaps",
    "PolicyEntry",
    "normalize",
    "entry_from_c",
    "entry_to_c",
    "key_from_c",
    "key_to_c",
    "match_type",
    "port_range",
    "port_range_text",
]
