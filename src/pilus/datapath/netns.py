"""Network namespaces: named namespaces (create, delete, list) and the worker
thread that runs work inside one.

Every function is synchronous and safe to call from any thread, also from a
thread that runs an asyncio event loop, and from a process that itself lives
inside a non-root network namespace (the agent runs inside its node namespace,
started by `ip netns exec`). links.py does its netlink work through
``run_in_netns``.

How it works:

* Work runs on one private worker thread. For each call the worker enters
  the target network namespace with setns(2) (a per-thread operation), does the
  work and returns to its home namespace. "The caller's namespace"
  (``netns=None``) is the namespace of the *calling thread*, captured at call time.
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
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import DatapathError

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


# --------------------------------------------------------------------------- helpers


def _oserr(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        raise _oserr("setns")


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise DatapathError(f"invalid network namespace name {name!r}")


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
            raise DatapathError(f"network namespace {name!r} already exists")
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
        raise DatapathError(f"network namespace {name!r} already exists")
    try:
        _with_machine_mntns(_create_netns_thread, name)
    except DatapathError:
        raise
    except OSError as e:
        raise DatapathError(f"cannot create network namespace {name!r}: {e}") from None
    if not netns_exists(name):
        raise DatapathError(
            f"network namespace {name!r} was created but is not visible here "
            "(mount propagation of /run/netns)"
        )


def delete_netns(name: str) -> None:
    """Delete a named network namespace (like `ip netns del`); absent is fine."""
    _check_name(name)
    try:
        _with_machine_mntns(_delete_netns_thread, name)
    except OSError as e:
        raise DatapathError(f"cannot delete network namespace {name!r}: {e}") from None
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
            raise RuntimeError("pilus.datapath.netns: nested call from the worker thread")
        if netns is None:
            ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        else:
            path = netns_path(netns)
            if not _is_nsfs_mount(path):
                raise DatapathError(f"network namespace {netns!r} does not exist")
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
    """Run ``fn(*args)`` on the worker thread while it is inside ``netns``
    (None: the calling thread's namespace). Sockets created by fn belong to that
    namespace; /proc/sys/net reads and writes address it. fn must not call
    run_in_netns (nor the functions of links.py) itself: the worker would wait on itself."""
    return _worker.call(netns, fn, *args)
