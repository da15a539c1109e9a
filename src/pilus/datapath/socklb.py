"""Socket-level service load balancing (src/pilus/bpf/bpf_sock.c).

An option next to the per-packet LB (agent ``--socket-lb``): cgroup v2 hooks
translate a connect()/sendmsg() to a frontend into the backend before any
packet exists, and recvmsg()/getpeername() show the frontend again.

* One ``bpf_sock.o`` per node. Its LB maps are the tc object's: with pinning,
  libbpf reuses the maps pinned by name under the node's pin dir; without
  (tests), the fds of the loaded tc object are reused.
* Attached to the cgroup v2 root with bpf links (always multi-attach: several
  nodes on one machine each attach their own programs); each program only
  touches sockets whose network namespace cookie is in its node's
  ``pilus_sock_netns`` (filled by the agent for its endpoints).
* The links are pinned under ``<pin dir>/links/``: they survive the agent (as
  the tc programs do), a restarted agent swaps the program in place
  (``bpf_link_update``), and removing the pin directory (``pilus cluster down``,
  ``remove_pins``) detaches them once no process holds them open.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterable
from ctypes import byref, c_uint16, c_uint32, c_uint64
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from pilus.reconcile import Reconciler

from . import abi, netns
from ._libbpf import bpf_link_info, check, lib
from .errors import DatapathError
from .maps import BpfMap

# ---- constants (keep in sync with lib/sock.h) ----
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_F_ALLOW_MULTI = 1 << 1

#: program -> cgroup attach type
SOCK_PROGRAMS = {
    "cil_sock4_connect": BPF_CGROUP_INET4_CONNECT,
    "cil_sock4_sendmsg": BPF_CGROUP_UDP4_SENDMSG,
    "cil_sock4_recvmsg": BPF_CGROUP_UDP4_RECVMSG,
    "cil_sock4_getpeername": BPF_CGROUP_INET4_GETPEERNAME,
}
SOCK_HOOKS = {
    "cil_sock4_connect": "cgroup/connect4",
    "cil_sock4_sendmsg": "cgroup/sendmsg4",
    "cil_sock4_recvmsg": "cgroup/recvmsg4",
    "cil_sock4_getpeername": "cgroup/getpeername4",
}
SOCK_MAP_NAMES = ("pilus_sock_netns", "pilus_lb4_reverse_sk", "pilus_sock_stats")
SOCK_STATS = ("connect", "sendmsg", "recvmsg", "getpeername", "no_backend")
SO_NETNS_COOKIE = 71
LINKS_DIR = "links"


# ---- ctypes mirrors of lib/sock.h ----
class SockNetnsInfo(abi._Base):
    C_NAME = "sock_netns_info"
    _fields_ = [("ipv4", c_uint32), ("ep_id", c_uint16), ("flags", c_uint16)]


class SockRevKey(abi._Base):
    C_NAME = "sock_rev_key"
    _fields_ = [("cookie", c_uint64), ("address", c_uint32), ("port", c_uint16), ("pad", c_uint16)]


class SockRevVal(abi._Base):
    C_NAME = "sock_rev_val"
    _fields_ = [
        ("address", c_uint32),
        ("port", c_uint16),
        ("pad", c_uint16),
        ("rev_nat_index", c_uint32),
        ("pad2", c_uint32),
    ]


SOCK_MIRRORS = [SockNetnsInfo, SockRevKey, SockRevVal]


# ---- helpers ----
def cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on hybrid systems)."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return Path(parts[1].replace("\\040", " "))
    except OSError:
        pass
    raise OSError(errno.ENOENT, "cgroup v2 is not mounted (socket LB needs it)")


def _own_netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


def netns_cookie(name: str | None = None) -> int:
    """The network namespace cookie (bpf_get_netns_cookie) of a named netns
    (/run/netns/<name>), or of the caller's namespace for None."""
    if name is None:
        return _own_netns_cookie()
    return netns.run_in_netns(name, _own_netns_cookie)


@dataclass(frozen=True)
class PodNetns:
    cookie: int
    ipv4: IPv4Address
    ep_id: int = 0


class SockNetnsMap:
    """pilus_sock_netns: netns cookie -> the pod living in it (PodNetns), as a
    Reconciler target (``dump``/``update``/``delete``; values compare equal when
    in sync)."""

    def __init__(self, fd: int) -> None:
        self.map = BpfMap(fd, c_uint64, SockNetnsInfo, "pilus_sock_netns")

    def dump(self) -> list[tuple[int, PodNetns]]:
        return [
            (k.value, PodNetns(k.value, abi.raw_to_ip4(v.ipv4), v.ep_id)) for k, v in self.map.items()
        ]

    def update(self, cookie: int, pod: PodNetns) -> None:
        v = SockNetnsInfo()
        v.ipv4 = abi.ip4_to_raw(pod.ipv4)
        v.ep_id = pod.ep_id
        self.map.update(c_uint64(cookie), v)

    def delete(self, cookie: int) -> bool:
        return self.map.delete(c_uint64(cookie))


def _link_info(fd: int) -> bpf_link_info:
    info = bpf_link_info()
    ln = c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, byref(info), byref(ln)), "bpf_obj_get_info_by_fd")
    return info


class SocketLb:
    """The socket-LB object of one node; made by ``Datapath.load_socket_lb``."""

    def __init__(self, obj, pin_root: Path | None) -> None:
        self._obj = obj  # loader.BpfObject of bpf_sock.o
        self.pin_root = pin_root
        self._links: dict[str, int] = {}  # program -> link fd
        fd = obj.map_fd
        self.netns = SockNetnsMap(fd("pilus_sock_netns"))
        # the one writer of pilus_sock_netns (first write prunes what an earlier run left)
        self.netns_sync: Reconciler[int, PodNetns] = Reconciler("pilus_sock_netns", self.netns)
        self.reverse = BpfMap(fd("pilus_lb4_reverse_sk"), SockRevKey, SockRevVal, "pilus_lb4_reverse_sk")
        self.stats_map = BpfMap(fd("pilus_sock_stats"), c_uint32, c_uint64, "pilus_sock_stats", percpu=True)
        self.cgroup: Path | None = None

    def prog_fd(self, name: str) -> int:
        return self._obj.prog_fd(name)

    def map_fd(self, name: str) -> int:
        return self._obj.map_fd(name)

    # -- attach ---------------------------------------------------------------

    @property
    def links_dir(self) -> Path | None:
        return self.pin_root / LINKS_DIR if self.pin_root is not None else None

    def attach(self, cgroup: Path | None = None) -> None:
        """Attach the four programs to ``cgroup`` (default: the cgroup v2 root).

        Pinned: an existing pinned link gets the new program (atomic swap), else
        a link is created and pinned. Unpinned: the links live as long as this
        object (close() detaches)."""
        cgroup = Path(cgroup) if cgroup is not None else cgroup2_root()
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, attach_type in SOCK_PROGRAMS.items():
                self._attach_one(name, attach_type, cg_fd, cgroup)
        finally:
            os.close(cg_fd)
        self.cgroup = cgroup

    def _attach_one(self, name: str, attach_type: int, cg_fd: int, cgroup: Path) -> None:
        prog_fd = self._obj.prog_fd(name)
        pin = self.links_dir / name if self.links_dir is not None else None
        if pin is not None and pin.exists():
            old = -1
            try:
                old = check(lib.bpf_obj_get(str(pin).encode()), "bpf_obj_get", str(pin))
                same_cgroup = _link_info(old).cgroup_id == os.stat(cgroup).st_ino
                if same_cgroup:
                    check(lib.bpf_link_update(old, prog_fd, None), "bpf_link_update", name)
                    self._keep(name, old)
                    return
            except OSError:
                pass  # defunct (cgroup gone) or unreadable: replace it
            if old >= 0:
                os.close(old)
            with contextlib.suppress(FileNotFoundError):
                pin.unlink()
        link = check(
            lib.bpf_link_create(prog_fd, cg_fd, attach_type, None),
            "bpf_link_create",
            f"{name} on {cgroup}",
        )
        if pin is not None:
            try:
                pin.parent.mkdir(parents=True, exist_ok=True)
                check(lib.bpf_obj_pin(link, str(pin).encode()), "bpf_obj_pin", str(pin))
            except OSError:
                os.close(link)
                raise
        self._keep(name, link)

    def _keep(self, name: str, fd: int) -> None:
        old = self._links.pop(name, None)
        if old is not None:
            os.close(old)
        self._links[name] = fd

    def attached(self) -> list[dict]:
        """The programs with their link ids (this object's links)."""
        out = []
        for name in SOCK_PROGRAMS:
            fd = self._links.get(name)
            info = _link_info(fd) if fd is not None else None
            out.append({
                "name": name,
                "hook": SOCK_HOOKS[name],
                "attached": info is not None and info.prog_id != 0,
                "link_id": info.id if info else None,
            })
        return out

    def close(self) -> None:
        """Close fds; pinned links keep the programs attached."""
        for fd in self._links.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._links.clear()
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # -- pod namespaces -----------------------------------------------------------

    def add_netns(self, pod: PodNetns) -> None:
        self.netns_sync.upsert(pod.cookie, pod).raise_for_errors("pilus_sock_netns")

    def delete_netns(self, cookie: int) -> bool:
        found = cookie in self.netns_sync.desired
        self.netns_sync.delete(cookie).raise_for_errors("pilus_sock_netns")
        return found

    def netns_items(self) -> list[PodNetns]:
        return [pod for _, pod in self.netns.dump()]

    def sync_netns(self, pods: Iterable[PodNetns]) -> None:
        """Make pilus_sock_netns exactly ``pods`` (failed writes stay pending in
        ``netns_sync`` and are retried by the next call)."""
        self.netns_sync.set({p.cookie: p for p in pods}).raise_for_errors("pilus_sock_netns")

    # -- introspection ----------------------------------------------------------

    def stats(self) -> dict[str, int]:
        out = {}
        for slot, name in enumerate(SOCK_STATS):
            vals = self.stats_map.lookup(c_uint32(slot))
            out[name] = sum(v.value for v in vals) if vals else 0
        return out

    def reverse_items(self) -> list[dict]:
        return [
            {
                "cookie": k.cookie,
                "backend": f"{abi.raw_to_ip4(k.address)}:{abi.raw_to_port(k.port)}",
                "frontend": f"{abi.raw_to_ip4(v.address)}:{abi.raw_to_port(v.port)}",
                "service_id": v.rev_nat_index,
            }
            for k, v in self.reverse.items()
        ]


def cgroup_prog_ids(cgroup: Path, attach_type: int) -> list[int]:
    """Ids of the programs attached to ``cgroup`` at ``attach_type`` (itself, not inherited)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (c_uint32 * 64)()
        cnt = c_uint32(64)
        flags = c_uint32(0)
        check(lib.bpf_prog_query(fd, attach_type, 0, byref(flags), ids, byref(cnt)), "bpf_prog_query")
        return list(ids[: cnt.value])
    finally:
        os.close(fd)


def remove_links(pin_root: Path) -> list[str]:
    """Unpin a node's socket-LB links (the programs detach once no fd holds them)."""
    d = Path(pin_root) / LINKS_DIR
    removed = []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
        with contextlib.suppress(OSError):
            d.rmdir()
    return removed


class NetnsCookies:
    """pilus_sock_netns from a node's endpoints (agent side). Cookies are read
    once per endpoint namespace (entering it: netns.run_in_netns) and cached by
    the namespace file's inode (a name reused by a new namespace is re-read)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, int]] = {}  # netns name -> (inode, cookie)

    def pods(self, endpoints: Iterable) -> list[PodNetns]:
        """``endpoints``: objects with ``netns``, ``ipv4``, ``id``; namespaces that
        cannot be entered (being deleted) are left out."""
        out = []
        live = set()
        for ep in endpoints:
            live.add(ep.netns)
            try:
                ino = os.stat(netns.netns_path(ep.netns)).st_ino
                cached = self._cache.get(ep.netns)
                if cached is None or cached[0] != ino:
                    cached = (ino, netns_cookie(ep.netns))
                    self._cache[ep.netns] = cached
            except (OSError, ValueError, DatapathError):
                continue  # gone meanwhile
            out.append(PodNetns(cached[1], IPv4Address(ep.ipv4), ep.id))
        for gone in set(self._cache) - live:
            del self._cache[gone]
        return out
