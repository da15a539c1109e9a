"""tc (clsact) attachment through libbpf's bpf_tc_* netlink helpers."""

from __future__ import annotations

import ctypes
import errno
import socket
from ctypes import byref

from ._libbpf import (
    BPF_TC_EGRESS,
    BPF_TC_F_REPLACE,
    BPF_TC_INGRESS,
    bpf_tc_hook,
    bpf_tc_opts,
    check,
    lib,
    quiet,
)

#: handle / priority of every pilus filter: a re-attach replaces in place
TC_HANDLE = 1
TC_PRIORITY = 1

HOOKS = {"tc-ingress": BPF_TC_INGRESS, "tc-egress": BPF_TC_EGRESS}

# errors meaning "nothing there (any more)"
_GONE = (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.EINVAL)


def _hook(ifindex: int, point: int) -> bpf_tc_hook:
    h = bpf_tc_hook()
    h.sz = ctypes.sizeof(h)
    h.ifindex = ifindex
    h.attach_point = point
    return h


def _opts(prog_fd: int = 0, flags: int = 0) -> bpf_tc_opts:
    o = bpf_tc_opts()
    o.sz = ctypes.sizeof(o)
    o.prog_fd = prog_fd
    o.flags = flags
    o.handle = TC_HANDLE
    o.priority = TC_PRIORITY
    return o


def _err(ret: int) -> int:
    return -ret if ret != -1 else (ctypes.get_errno() or 1)


def ensure_clsact(ifindex: int) -> None:
    with quiet():  # EEXIST is the normal case
        ret = lib.bpf_tc_hook_create(byref(_hook(ifindex, BPF_TC_INGRESS)))
    if ret < 0 and _err(ret) != errno.EEXIST:
        check(ret, "bpf_tc_hook_create", f"clsact on ifindex {ifindex}")


def attach(ifindex: int, hook: str, prog_fd: int) -> int:
    """Attach (or atomically replace) our filter; returns the attached prog id."""
    ensure_clsact(ifindex)
    opts = _opts(prog_fd, BPF_TC_F_REPLACE)
    check(
        lib.bpf_tc_attach(byref(_hook(ifindex, HOOKS[hook])), byref(opts)),
        "bpf_tc_attach",
        f"{hook} on ifindex {ifindex}",
    )
    return opts.prog_id


def detach(ifindex: int, hook: str) -> bool:
    """Remove our filter; False if it (or the device) was not there."""
    with quiet():
        ret = lib.bpf_tc_detach(byref(_hook(ifindex, HOOKS[hook])), byref(_opts()))
    if ret < 0:
        if _err(ret) in _GONE:
            return False
        check(ret, "bpf_tc_detach", f"{hook} on ifindex {ifindex}")
    return True


def query(ifindex: int, hook: str) -> int | None:
    """Prog id of our filter on (ifindex, hook), or None."""
    opts = _opts()
    with quiet():
        ret = lib.bpf_tc_query(byref(_hook(ifindex, HOOKS[hook])), byref(opts))
    if ret < 0:
        return None
    return opts.prog_id


def interfaces() -> list[tuple[int, str]]:
    try:
        return socket.if_nameindex()
    except OSError:
        return []
