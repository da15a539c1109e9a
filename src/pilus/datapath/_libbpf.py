"""ctypes prototypes over libbpf.so.1 (libbpf 1.1 ABI).

Only what pilus needs. Every wrapper checks the return value and raises
``OSError(errno, "<function>: <strerror> (<context>)")``; libbpf 1.x returns
``-errno`` (or NULL with errno set) on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import logging
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_long,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

__all__ = ["lib", "LibbpfMissing", "check", "check_ptr"]


class LibbpfMissing(RuntimeError):
    """libbpf.so.1 is not installed."""


def _load() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise LibbpfMissing(
            f"libbpf.so.1 not found ({exc}); run `make setup` (apt-get install libbpf1)"
        ) from None


# ---------------------------------------------------------------- structs


class bpf_object_open_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("object_name", c_char_p),
        ("relaxed_maps", c_bool),
        ("pin_root_path", c_char_p),
        ("_attach_prog_fd", c_uint32),
        ("kconfig", c_char_p),
        ("btf_custom_path", c_char_p),
        ("kernel_log_buf", c_char_p),
        ("kernel_log_size", c_size_t),
        ("kernel_log_level", c_uint32),
    ]


class bpf_map_create_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1
BPF_TC_CUSTOM = 1 << 2
BPF_TC_F_REPLACE = 1 << 0


class bpf_tc_hook(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),
        ("parent", c_uint32),
    ]


class bpf_tc_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]


class bpf_test_run_opts(Structure):
    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class bpf_map_info(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class bpf_prog_info(Structure):
    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * 16),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad", c_uint32),
    ]


class bpf_link_info(Structure):
    """struct bpf_link_info: common head + the cgroup member of the union."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("prog_id", c_uint32),
        ("_pad", c_uint32),
        ("cgroup_id", c_uint64),  # union: cgroup.cgroup_id
        ("attach_type", c_uint32),  # union: cgroup.attach_type
        ("_rest", c_uint8 * 44),
    ]


# BTF
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_TYPEDEF = 8


class btf_type(Structure):
    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class btf_member(Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class btf_array(Structure):
    _fields_ = [("type", c_uint32), ("index_type", c_uint32), ("nelems", c_uint32)]


ring_buffer_sample_fn = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)
libbpf_print_fn = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

# name: (restype, argtypes)
_PROTOS: dict[str, tuple[object, list[object]]] = {
    "libbpf_get_error": (c_long, [c_void_p]),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_set_print": (c_void_p, [c_void_p]),
    # objects
    "bpf_object__open_file": (c_void_p, [c_char_p, POINTER(bpf_object_open_opts)]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__btf": (c_void_p, [c_void_p]),
    # maps
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, POINTER(c_size_t)]),
    "bpf_map__set_initial_value": (c_int, [c_void_p, c_void_p, c_size_t]),
    "bpf_map__set_pin_path": (c_int, [c_void_p, c_char_p]),
    "bpf_map__pin_path": (c_char_p, [c_void_p]),
    "bpf_map__is_pinned": (c_bool, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__set_value_size": (c_int, [c_void_p, c_uint32]),
    "bpf_map__reuse_fd": (c_int, [c_void_p, c_int]),
    # programs
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__pin": (c_int, [c_void_p, c_char_p]),
    "bpf_program__unpin": (c_int, [c_void_p, c_char_p]),
    # low-level syscalls
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_map_create": (
        c_int,
        [c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(bpf_map_create_opts)],
    ),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    "bpf_prog_test_run_opts": (c_int, [c_int, POINTER(bpf_test_run_opts)]),
    # cgroup attachment (socket LB): links (opts NULL) and legacy attach
    "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
    "bpf_link_update": (c_int, [c_int, c_int, c_void_p]),
    "bpf_link_detach": (c_int, [c_int]),
    "bpf_prog_attach": (c_int, [c_int, c_int, c_int, c_uint32]),
    "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
    "bpf_prog_query": (
        c_int,
        [c_int, c_int, c_uint32, POINTER(c_uint32), POINTER(c_uint32), POINTER(c_uint32)],
    ),
    # tc
    "bpf_tc_hook_create": (c_int, [POINTER(bpf_tc_hook)]),
    "bpf_tc_hook_destroy": (c_int, [POINTER(bpf_tc_hook)]),
    "bpf_tc_attach": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    "bpf_tc_detach": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    "bpf_tc_query": (c_int, [POINTER(bpf_tc_hook), POINTER(bpf_tc_opts)]),
    # ring buffer
    "ring_buffer__new": (c_void_p, [c_int, ring_buffer_sample_fn, c_void_p, c_void_p]),
    "ring_buffer__poll": (c_int, [c_void_p, c_int]),
    "ring_buffer__consume": (c_int, [c_void_p]),
    "ring_buffer__epoll_fd": (c_int, [c_void_p]),
    "ring_buffer__free": (None, [c_void_p]),
    # btf
    "btf__parse": (c_void_p, [c_char_p, c_void_p]),
    "btf__free": (None, [c_void_p]),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
    "btf__type_by_id": (POINTER(btf_type), [c_void_p, c_uint32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    "btf__resolve_size": (c_long, [c_void_p, c_uint32]),
    "btf__resolve_type": (c_int, [c_void_p, c_uint32]),
}


class _Lib:
    """Lazily loaded libbpf with prototypes applied."""

    def __init__(self) -> None:
        self._cdll: ctypes.CDLL | None = None

    def _get(self) -> ctypes.CDLL:
        if self._cdll is None:
            cdll = _load()
            for name, (restype, argtypes) in _PROTOS.items():
                fn = getattr(cdll, name)
                fn.restype = restype
                fn.argtypes = argtypes
            self._cdll = cdll
        return self._cdll

    def __getattr__(self, name: str):
        if name not in _PROTOS:
            raise AttributeError(f"libbpf function {name} has no prototype in _libbpf.py")
        return getattr(self._get(), name)


lib = _Lib()


def _oserror(err: int, func: str, ctx: str = "") -> OSError:
    err = abs(err) or _errno.EINVAL
    msg = f"{func}: {os.strerror(err)}"
    if ctx:
        msg += f" ({ctx})"
    return OSError(err, msg)


def check(ret: int, func: str, ctx: str = "") -> int:
    """Raise OSError for a negative libbpf return (-errno, or -1 with errno set)."""
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or 1)
        raise _oserror(err, func, ctx)
    return ret


def check_ptr(ptr: int | None, func: str, ctx: str = "") -> int:
    """Raise OSError if libbpf returned NULL (errno set) or an ERR_PTR."""
    if not ptr:
        raise _oserror(ctypes.get_errno() or _errno.ENOENT, func, ctx)
    # libbpf 1.x never returns ERR_PTR in strict mode, but be safe
    if ptr > (1 << 64) - 4096:
        raise _oserror((1 << 64) - ptr, func, ctx)
    return ptr


def num_possible_cpus() -> int:
    return check(lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


_print_cb = None
_quiet_depth = 0
_log = logging.getLogger("pilus.datapath.libbpf")
_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def _vformat(fmt: bytes, args: int) -> str:
    libc = ctypes.CDLL(None)
    vsnprintf = libc.vsnprintf
    vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
    buf = ctypes.create_string_buffer(8192)
    vsnprintf(buf, len(buf), fmt, args)
    return buf.value.decode(errors="replace").rstrip("\n")


def route_print_to_logging() -> None:
    """Send libbpf's messages (including verifier logs) to the logging module
    (logger ``pilus.datapath.libbpf``) instead of stderr. Idempotent."""
    global _print_cb
    if _print_cb is not None:
        return

    def _cb(level, fmt, args):
        try:
            if _quiet_depth:
                return 0
            _log.log(_LEVELS.get(level, logging.DEBUG), "%s", _vformat(fmt, args))
        except Exception:  # noqa: BLE001 - never raise through C
            pass
        return 0

    _print_cb = libbpf_print_fn(_cb)
    lib.libbpf_set_print(ctypes.cast(_print_cb, c_void_p))


@contextlib.contextmanager
def quiet():
    """Suppress libbpf messages (e.g. expected netlink errors of bpf_tc_query)."""
    global _quiet_depth
    route_print_to_logging()
    _quiet_depth += 1
    try:
        yield
    finally:
        _quiet_depth -= 1
