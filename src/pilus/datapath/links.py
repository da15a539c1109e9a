"""Links: network namespaces, veth pairs, addresses, routes, neighbours, sysctls.

The only module of pilus that talks netlink (through pyroute2). Every function is
synchronous and safe to call from any thread, also from a thread that runs an
asyncio event loop, and from a process that itself lives inside a non-root network
namespace (the agent runs inside its node namespace, started by `ip netns exec`).

How it works:

* Netlink work runs on one private worker thread. For each call the worker enters
  the target network namespace with setns(2) (a per-thread operation), opens an
  IPRoute socket there, does the work and returns to its home namespace. "The
  caller's namespace" (``netns=None``) is the namespace of the *calling thread*,
  captured at call time.
* Named namespaces are bind mounts under ``/run/netns`` like `ip netns add`. A
  process started by `ip netns exec` lives in a private mount namespace whose
  ``/run/netns`` is a *slave* of the machine's: a mount made there would be
  invisible to everybody else (``ip netns exec <new> ...`` from the machine fails
  with "Invalid argument"). So create/delete run on a throwaway thread that joins
  the mount namespace of a process that holds the *shared* peer of our
  ``/run/netns`` (found by peer-group id in mountinfo; normally our parent). The
  mount then propagates to the machine and to every slave, including us.
  ``PILUS_HOST_MNTNS=<path to a mnt ns file>`` overrides the search.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "LinkError",
    "VethInfo",
    "netns_exists",
    "create_netns",
    "delete_netns",
    "list_netns",
    "netns_path",
    "create_veth",
    "delete_link",
    "link_info",
    "set_link_up",
    "set_link_down",
    "set_mtu",
    "add_address",
    "del_address",
    "addresses",
    "default_route_device",
    "add_route",
    "del_route",
    "add_neigh",
    "del_neigh",
    "set_sysctl",
    "get_sysctl",
    "create_bridge",
    "set_master",
    "run_in_netns",
]

NETNS_RUN_DIR = "/run/netns"

_CLONE_NEWNS = 0x00020000
_CLONE_FS = 0x00000200
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 16384
_MS_SHARED = 1 << 20
_MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class LinkError(Exception):
    """A netlink / namespace operation failed (one-line message)."""


@dataclass(frozen=True)
class VethInfo:
    host_ifindex: int
    host_mac: str
    peer_ifindex: int
    peer_mac: str


# --------------------------------------------------------------------------- helpers


def _oserr(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise _oserr("setns")


def _nl_msg(e: NetlinkError) -> str:
    code = e.code if hasattr(e, "code") else 0
    try:
        return os.strerror(code) if code else str(e)
    except ValueError:
        return str(e)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise LinkError(f"invalid network namespace name {name!r}")


def netns_path(name: str) -> str:
    """Path of a named network namespace (``/run/netns/<name>``)."""
    _check_name(name)
    return os.path.join(NETNS_RUN_DIR, name)


def _is_nsfs_mount(path: str) -> bool:
    """True if ``path`` is a bind-mounted namespace file (not a stale empty file)."""
    try:
        st = os.stat(path)
        dst = os.stat(os.path.dirname(path))
    except OSError:
        return False
    return st.st_dev != dst.st_dev


# ------------------------------------------------------------- mount namespace logic


def _run_netns_mount(pid: str = "thread-self") -> dict[str, str] | None:
    """Optional fields (shared:N / master:N) of the /run/netns mount seen by ``pid``."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        parts = line.split()
        if len(parts) < 7:
            continue
        if parts[4] in (NETNS_RUN_DIR, "/var/run/netns"):
            opts: dict[str, str] = {}
            i = 6
            while i < len(parts) and parts[i] != "-":
                k, _, v = parts[i].partition(":")
                opts[k] = v
                i += 1
            found = opts  # the last mount on the mountpoint wins
    return found


def _ancestors() -> list[int]:
    out: list[int] = []
    pid = os.getppid()
    seen = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        out.append(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid = next((int(x.split()[1]) for x in f if x.startswith("PPid:")), 0)
        except (OSError, ValueError):
            break
        pid = ppid
    return out


def _machine_mntns_fd() -> int | None:
    """fd of a mount namespace whose /run/netns is shared with the machine's, or
    None when the current one is fine (its /run/netns is shared or absent)."""
    env = os.environ.get("PILUS_HOST_MNTNS")
    if env:
        return os.open(env, os.O_RDONLY | os.O_CLOEXEC)
    mine = _run_netns_mount()
    if mine is None or "shared" in mine or "master" not in mine:
        return None
    group = mine["master"]
    own_ino = os.stat("/proc/thread-self/ns/mnt").st_ino
    candidates = _ancestors()
    candidates += [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for pid in candidates:
        if pid == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{pid}/ns/mnt").st_ino == own_ino:
                continue
        except OSError:
            continue
        opts = _run_netns_mount(str(pid))
        if opts is not None and opts.get("shared") == group:
            try:
                fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            # make sure it is still the same process' namespace
            if _run_netns_mount(str(pid)) == opts:
                return fd
            os.close(fd)
    return None  # fall back to our own mount namespace


def _on_fresh_thread(fn: Callable[[], Any]) -> Any:
    """Run fn on a throwaway thread (it may change its own namespaces)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["ret"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["err"] = e

    t = threading.Thread(target=body, name="pilus-netns", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box.get("ret")


def _enter_machine_mntns(mnt_fd: int | None) -> None:
    if mnt_fd is None:
        return
    # a thread shares its fs_struct with the process; setns(CLONE_NEWNS) needs its own
    if _libc.unshare(_CLONE_FS) != 0:
        raise _oserr("unshare(CLONE_FS)")
    _setns(mnt_fd, _CLONE_NEWNS)


def _ensure_run_dir() -> None:
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    d = NETNS_RUN_DIR.encode()
    opts = _run_netns_mount()
    if opts is not None and "shared" in opts:
        return
    # as iproute2: make /run/netns a shared mount point (bind it onto itself first)
    if _libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None) != 0:
        if _libc.mount(d, d, b"none", _MS_BIND | _MS_REC, None) != 0:
            raise _oserr(f"bind mount {NETNS_RUN_DIR}")
        if _libc.mount(b"", d, b"none", _MS_SHARED | _MS_REC, None) != 0:
            raise _oserr(f"make {NETNS_RUN_DIR} shared")


def _create_netns_thread(name: str, mnt_fd: int | None) -> None:
    _enter_machine_mntns(mnt_fd)
    _ensure_run_dir()
    path = netns_path(name)
    if os.path.exists(path):
        if _is_nsfs_mount(path):
            raise LinkError(f"network namespace {name!r} already exists")
        os.unlink(path)  # stale file of a half-made/half-removed namespace
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        if _libc.unshare(_CLONE_NEWNET) != 0:
            raise _oserr("unshare(CLONE_NEWNET)")
        if _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", _MS_BIND, None) != 0:
            raise _oserr(f"bind mount {path}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _delete_netns_thread(name: str, mnt_fd: int | None) -> None:
    _enter_machine_mntns(mnt_fd)
    path = netns_path(name)
    if not os.path.lexists(path):
        return
    _libc.umount2(path.encode(), _MNT_DETACH)  # EINVAL when not mounted: fine
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _with_machine_mntns(fn: Callable[[str, int | None], None], name: str) -> None:
    mnt_fd = _machine_mntns_fd()
    try:
        _on_fresh_thread(lambda: fn(name, mnt_fd))
    finally:
        if mnt_fd is not None:
            os.close(mnt_fd)


# ------------------------------------------------------------------ namespaces API


def netns_exists(name: str) -> bool:
    return _is_nsfs_mount(netns_path(name))


def create_netns(name: str) -> None:
    """Create a named network namespace (like `ip netns add`), visible machine-wide."""
    _check_name(name)
    if netns_exists(name):
        raise LinkError(f"network namespace {name!r} already exists")
    try:
        _with_machine_mntns(_create_netns_thread, name)
    except LinkError:
        raise
    except OSError as e:
        raise LinkError(f"cannot create network namespace {name!r}: {e}") from None
    if not netns_exists(name):
        raise LinkError(
            f"network namespace {name!r} was created but is not visible here "
            "(mount propagation of /run/netns)"
        )


def delete_netns(name: str) -> None:
    """Delete a named network namespace (like `ip netns del`); absent is fine."""
    _check_name(name)
    try:
        _with_machine_mntns(_delete_netns_thread, name)
    except OSError as e:
        raise LinkError(f"cannot delete network namespace {name!r}: {e}") from None
    # our own (slave) view may still hold a copy when propagation was impossible
    path = netns_path(name)
    if _is_nsfs_mount(path):
        _libc.umount2(path.encode(), _MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def list_netns(prefix: str = "") -> list[str]:
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if n.startswith(prefix) and _is_nsfs_mount(os.path.join(NETNS_RUN_DIR, n))
    )


# --------------------------------------------------------------- netlink worker


class _Worker:
    """One thread that does netlink work in the namespace a call asks for."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
                return
            self._q = queue.Queue()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="pilus-links", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        q = self._q
        while True:
            ns_fd, fn, args, done = q.get()
            try:
                _setns(ns_fd, _CLONE_NEWNET)
                try:
                    done["ret"] = fn(*args)
                finally:
                    _setns(home, _CLONE_NEWNET)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done["err"] = e
            finally:
                os.close(ns_fd)
                done["ev"].set()

    def call(self, netns: str | None, fn: Callable[..., Any], *args: Any) -> Any:
        if threading.current_thread() is self._thread:
            raise RuntimeError("pilus.datapath.links: nested call from the worker thread")
        if netns is None:
            ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        else:
            path = netns_path(netns)
            if not _is_nsfs_mount(path):
                raise LinkError(f"network namespace {netns!r} does not exist")
            ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._ensure()
        done: dict[str, Any] = {"ev": threading.Event()}
        self._q.put((ns_fd, fn, args, done))
        done["ev"].wait()
        if "err" in done:
            raise done["err"]
        return done.get("ret")


_worker = _Worker()


def run_in_netns(netns: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` on the links worker thread while it is inside ``netns``
    (None: the calling thread's namespace). Sockets created by fn belong to that
    namespace; /proc/sys/net reads and writes address it. fn must not call other
    functions of this module (use the ``_ipr`` based helpers instead)."""
    return _worker.call(netns, fn, *args)


def _nl(netns: str | None, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run fn(ipr, *args) in netns with a fresh IPRoute; NetlinkError -> LinkError."""

    def body() -> Any:
        with IPRoute() as ipr:
            return fn(ipr, *args)

    try:
        return _worker.call(netns, body)
    except NetlinkError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise LinkError(f"{what}{where}: {_nl_msg(e)}") from None
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise LinkError(f"{what}{where}: {e.strerror or e}") from None


def _idx(ipr: IPRoute, ifname: str) -> int | None:
    r = ipr.link_lookup(ifname=ifname)
    return r[0] if r else None


def _need_idx(ipr: IPRoute, ifname: str) -> int:
    i = _idx(ipr, ifname)
    if i is None:
        raise LinkError(f"no such device {ifname!r}")
    return i


def _link_dict(ipr: IPRoute, index: int) -> dict[str, Any]:
    msg = ipr.link("get", index=index)[0]
    return {
        "ifindex": msg["index"],
        "ifname": msg.get_attr("IFLA_IFNAME"),
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "mtu": msg.get_attr("IFLA_MTU"),
        "up": bool(msg["flags"] & 1),
        "master": msg.get_attr("IFLA_MASTER"),
    }


# -------------------------------------------------------------------- links API


def create_veth(
    host_ifname: str,
    peer_ifname: str,
    *,
    peer_netns: str | None,
    mtu: int = 1500,
    host_netns: str | None = None,
) -> VethInfo:
    """Create a veth pair. The host end stays in ``host_netns`` (None: the calling
    thread's namespace); the peer end is created directly inside ``peer_netns``
    under ``peer_ifname`` (so "eth0" is fine even if the host namespace has one).
    Both ends are set up, and lo in peer_netns."""
    for n in (host_ifname, peer_ifname):
        if not n or len(n) > 15:
            raise LinkError(f"invalid interface name {n!r} (1-15 characters)")
    peer_fd = None
    if peer_netns is not None:
        path = netns_path(peer_netns)
        if not _is_nsfs_mount(path):
            raise LinkError(f"network namespace {peer_netns!r} does not exist")
        peer_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def make(ipr: IPRoute) -> dict[str, Any]:
        if _idx(ipr, host_ifname) is not None:
            raise LinkError(f"device {host_ifname!r} already exists")
        peer: dict[str, Any] = {"ifname": peer_ifname, "mtu": mtu}
        if peer_fd is not None:
            peer["net_ns_fd"] = peer_fd
        ipr.link("add", ifname=host_ifname, kind="veth", mtu=mtu, peer=peer)
        idx = _need_idx(ipr, host_ifname)
        ipr.link("set", index=idx, state="up")
        return _link_dict(ipr, idx)

    try:
        host = _nl(host_netns, f"create veth {host_ifname}/{peer_ifname}", make)
    finally:
        if peer_fd is not None:
            os.close(peer_fd)

    def peer_up(ipr: IPRoute) -> dict[str, Any]:
        idx = _need_idx(ipr, peer_ifname)
        ipr.link("set", index=idx, state="up")
        lo = _idx(ipr, "lo")
        if lo is not None:
            ipr.link("set", index=lo, state="up")
        return _link_dict(ipr, idx)

    try:
        peer = _nl(
            peer_netns if peer_netns is not None else host_netns, "set veth peer up", peer_up
        )
    except LinkError:
        delete_link(host_ifname, host_netns)
        raise
    return VethInfo(host["ifindex"], host["mac"], peer["ifindex"], peer["mac"])


def delete_link(ifname: str, netns: str | None = None) -> None:
    """Delete a link; absent link (or absent namespace) is fine."""

    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, ifname)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    if netns is not None and not netns_exists(netns):
        return
    _nl(netns, f"delete link {ifname}", rm)


def link_info(ifname: str, netns: str | None = None) -> dict | None:
    """{'ifindex', 'ifname', 'mac', 'mtu', 'up', 'master'} or None if absent."""

    def get(ipr: IPRoute) -> dict | None:
        idx = _idx(ipr, ifname)
        return None if idx is None else _link_dict(ipr, idx)

    if netns is not None and not netns_exists(netns):
        return None
    return _nl(netns, f"get link {ifname}", get)


def set_link_up(ifname: str, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} up",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), state="up"),
    )


def set_link_down(ifname: str, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} down",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), state="down"),
    )


def set_mtu(ifname: str, mtu: int, netns: str | None = None) -> None:
    _nl(
        netns,
        f"set {ifname} mtu",
        lambda ipr: ipr.link("set", index=_need_idx(ipr, ifname), mtu=mtu),
    )


def add_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    """Add an IPv4/IPv6 address ("10.0.0.1/24"); already present is fine."""
    iface = ipaddress.ip_interface(cidr)

    def add(ipr: IPRoute) -> None:
        idx = _need_idx(ipr, ifname)
        try:
            ipr.addr(
                "add",
                index=idx,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
            )
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise

    _nl(netns, f"add address {cidr} to {ifname}", add)


def addresses(ifname: str, netns: str | None = None, family: int = 4) -> list[str]:
    """Addresses of a device as CIDRs ("172.30.0.11/24"), in kernel order; [] if absent."""
    fam = 2 if family == 4 else 10

    def get(ipr: IPRoute) -> list[str]:
        idx = _idx(ipr, ifname)
        if idx is None:
            return []
        return [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.addr("dump", index=idx, family=fam)
            if a["index"] == idx
        ]

    if netns is not None and not netns_exists(netns):
        return []
    return _nl(netns, f"list addresses of {ifname}", get)


def default_route_device(netns: str | None = None) -> str | None:
    """Name of the device of the IPv4 default route (main table), or None."""

    def get(ipr: IPRoute) -> str | None:
        for r in ipr.route("dump", family=2, table=254):
            if r["dst_len"] != 0:
                continue
            oif = r.get_attr("RTA_OIF")
            if oif is None:
                mp = r.get_attr("RTA_MULTIPATH")
                oif = mp[0]["oif"] if mp else None
            if oif:
                return ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")
        return None

    return _nl(netns, "find the default route", get)


def del_address(ifname: str, cidr: str, netns: str | None = None) -> None:
    iface = ipaddress.ip_interface(cidr)

    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, ifname)
        if idx is None:
            return
        try:
            ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise

    _nl(netns, f"delete address {cidr} from {ifname}", rm)


_SCOPES = {"universe": 0, "global": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}


def _route_dst(dst: str) -> dict[str, Any]:
    if dst == "default":
        return {"dst": "0.0.0.0/0"}
    net = ipaddress.ip_network(dst, strict=False)
    return {"dst": str(net)}


def add_route(
    dst: str,
    *,
    gateway: str | None = None,
    dev: str | None = None,
    netns: str | None = None,
    scope: str | None = None,
    src: str | None = None,
) -> None:
    """Add or replace a route in the main table. dst is a CIDR, an address, or "default"."""
    if gateway is None and dev is None:
        raise LinkError(f"route {dst}: needs a gateway or a device")

    def add(ipr: IPRoute) -> None:
        spec: dict[str, Any] = _route_dst(dst)
        if dev is not None:
            spec["oif"] = _need_idx(ipr, dev)
        if gateway is not None:
            spec["gateway"] = gateway
        if scope is not None:
            spec["scope"] = _SCOPES[scope] if isinstance(scope, str) else int(scope)
        elif gateway is None:
            spec["scope"] = _SCOPES["link"]
        if src is not None:
            spec["prefsrc"] = src
        ipr.route("replace", **spec)

    _nl(netns, f"add route {dst}", add)


def del_route(dst: str, netns: str | None = None) -> None:
    """Delete the route to dst from the main table; absent is fine."""

    def rm(ipr: IPRoute) -> None:
        try:
            ipr.route("del", **_route_dst(dst))
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise

    if netns is not None and not netns_exists(netns):
        return
    _nl(netns, f"delete route {dst}", rm)


def add_neigh(ip: str, mac: str, dev: str, netns: str | None = None) -> None:
    """Permanent neighbour entry (replace)."""

    def add(ipr: IPRoute) -> None:
        ipr.neigh(
            "replace",
            dst=ip,
            lladdr=mac,
            ifindex=_need_idx(ipr, dev),
            state="permanent",
        )

    _nl(netns, f"add neighbour {ip} on {dev}", add)


def del_neigh(ip: str, dev: str, netns: str | None = None) -> None:
    def rm(ipr: IPRoute) -> None:
        idx = _idx(ipr, dev)
        if idx is None:
            return
        try:
            ipr.neigh("del", dst=ip, ifindex=idx)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise

    _nl(netns, f"delete neighbour {ip} on {dev}", rm)


def _sysctl_path(key: str) -> str:
    if not key or ".." in key or key.startswith((".", "/")):
        raise LinkError(f"invalid sysctl key {key!r}")
    return "/proc/sys/" + key.replace(".", "/")


def set_sysctl(key: str, value: str | int, netns: str | None = None) -> None:
    """Write a sysctl ("net.ipv4.ip_forward", "net.ipv4.conf.eth0.rp_filter") in netns."""
    path = _sysctl_path(key)

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    try:
        _worker.call(netns, write)
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise LinkError(f"set sysctl {key}={value}{where}: {e.strerror or e}") from None


def get_sysctl(key: str, netns: str | None = None) -> str:
    path = _sysctl_path(key)

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    try:
        return _worker.call(netns, read)
    except OSError as e:
        where = f" in netns {netns!r}" if netns else ""
        raise LinkError(f"read sysctl {key}{where}: {e.strerror or e}") from None


def create_bridge(name: str, cidr: str | None = None, netns: str | None = None) -> None:
    """Create a Linux bridge (up, optional address) in the caller's namespace."""

    def make(ipr: IPRoute) -> None:
        if _idx(ipr, name) is None:
            ipr.link("add", ifname=name, kind="bridge")
        ipr.link("set", index=_need_idx(ipr, name), state="up")

    _nl(netns, f"create bridge {name}", make)
    if cidr is not None:
        add_address(name, cidr, netns)


def set_master(ifname: str, bridge: str, netns: str | None = None) -> None:
    def setm(ipr: IPRoute) -> None:
        ipr.link("set", index=_need_idx(ipr, ifname), master=_need_idx(ipr, bridge))

    _nl(netns, f"attach {ifname} to {bridge}", setm)
