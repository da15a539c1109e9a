"""Open, configure, load and pin one BPF object through libbpf (the table of
objects is in objects.py)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from ctypes import byref, c_size_t
from pathlib import Path

from . import abi
from ._libbpf import bpf_object_open_opts, check, check_ptr, lib, route_print_to_logging

CONFIG_SECTION = ".rodata.config"


class BpfObject:
    """A loaded BPF object.

    ``pin_root``: directory on bpffs where maps with ``LIBBPF_PIN_BY_NAME`` are
    pinned (and reused if already there); ``None`` disables pinning entirely
    (tests).
    """

    def __init__(
        self,
        path: Path,
        config: abi.PilusConfig,
        pin_root: Path | None = None,
        before_load: Callable[[BpfObject], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.pin_root = pin_root
        self._obj: int | None = None
        route_print_to_logging()
        opts = bpf_object_open_opts()
        opts.sz = ctypes.sizeof(opts)
        if pin_root is not None:
            opts.pin_root_path = str(pin_root).encode()
        self._obj = check_ptr(
            lib.bpf_object__open_file(str(self.path).encode(), byref(opts)),
            "bpf_object__open_file",
            str(self.path),
        )
        try:
            if pin_root is None:
                self._unpin_all_defs()
            self._set_config(config)
            if before_load is not None:
                before_load(self)  # e.g. LB settings: map sizes, .rodata.lb
            check(lib.bpf_object__load(self._obj), "bpf_object__load", str(self.path))
        except BaseException:
            self.close()
            raise

    # -- setup

    def _maps(self):
        m = lib.bpf_object__next_map(self._obj, None)
        while m:
            yield m
            m = lib.bpf_object__next_map(self._obj, m)

    def _unpin_all_defs(self) -> None:
        for m in self._maps():
            check(lib.bpf_map__set_pin_path(m, None), "bpf_map__set_pin_path")

    def find_map(self, name: str) -> int:
        """libbpf's `struct bpf_map *` of a map or internal (.rodata.*) map."""
        return check_ptr(
            lib.bpf_object__find_map_by_name(self.handle, name.encode()),
            "bpf_object__find_map_by_name",
            name,
        )

    def set_rodata(self, section: str, value: ctypes.Structure) -> None:
        """Initial value of a `const volatile` config section (before load)."""
        m = self.find_map(section)
        size = c_size_t(0)
        check_ptr(lib.bpf_map__initial_value(m, byref(size)), "bpf_map__initial_value")
        if size.value != ctypes.sizeof(value):
            raise OSError(
                errno.EINVAL,
                f"{section} is {size.value} bytes, {type(value).__name__} is "
                f"{ctypes.sizeof(value)}: the C and Python mirrors disagree",
            )
        check(
            lib.bpf_map__set_initial_value(m, byref(value), ctypes.sizeof(value)),
            "bpf_map__set_initial_value",
            section,
        )

    def set_value_size(self, name: str, size: int) -> None:
        """Resize a map's value before load (maps declared without a BTF value type)."""
        check(lib.bpf_map__set_value_size(self.find_map(name), size), "bpf_map__set_value_size", name)

    def reuse_map_fd(self, name: str, fd: int) -> None:
        """Use an existing map (e.g. another object's) for ``name`` (before load)."""
        check(lib.bpf_map__reuse_fd(self.find_map(name), fd), "bpf_map__reuse_fd", name)

    def _set_config(self, config: abi.PilusConfig) -> None:
        m = check_ptr(
            lib.bpf_object__find_map_by_name(self._obj, CONFIG_SECTION.encode()),
            "bpf_object__find_map_by_name",
            CONFIG_SECTION,
        )
        size = c_size_t(0)
        check_ptr(lib.bpf_map__initial_value(m, byref(size)), "bpf_map__initial_value")
        if size.value != ctypes.sizeof(config):
            raise OSError(
                errno.EINVAL,
                f"{CONFIG_SECTION} is {size.value} bytes, abi.PilusConfig is "
                f"{ctypes.sizeof(config)}: abi.py and common.h disagree",
            )
        check(
            lib.bpf_map__set_initial_value(m, byref(config), ctypes.sizeof(config)),
            "bpf_map__set_initial_value",
        )

    # -- accessors

    @property
    def handle(self) -> int:
        if self._obj is None:
            raise OSError(errno.EBADF, "BPF object is closed")
        return self._obj

    def map_fd(self, name: str) -> int:
        m = check_ptr(
            lib.bpf_object__find_map_by_name(self.handle, name.encode()),
            "bpf_object__find_map_by_name",
            name,
        )
        return check(lib.bpf_map__fd(m), "bpf_map__fd", name)

    def map_names(self) -> list[str]:
        return [lib.bpf_map__name(m).decode() for m in self._maps()]

    def _prog(self, name: str) -> int:
        return check_ptr(
            lib.bpf_object__find_program_by_name(self.handle, name.encode()),
            "bpf_object__find_program_by_name",
            name,
        )

    def prog_fd(self, name: str) -> int:
        return check(lib.bpf_program__fd(self._prog(name)), "bpf_program__fd", name)

    def pin_program(self, name: str, path: Path) -> None:
        """Pin (or re-pin, replacing an older pin) a program."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        check(
            lib.bpf_program__pin(self._prog(name), str(path).encode()),
            "bpf_program__pin",
            str(path),
        )

    def close(self) -> None:
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prog_info(fd: int):
    from ._libbpf import bpf_prog_info

    info = bpf_prog_info()
    ln = ctypes.c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, byref(info), byref(ln)), "bpf_obj_get_info_by_fd")
    return info


def map_info(fd: int):
    from ._libbpf import bpf_map_info

    info = bpf_map_info()
    ln = ctypes.c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, byref(info), byref(ln)), "bpf_obj_get_info_by_fd")
    return info


def obj_get(path: Path) -> int:
    """Open a pinned object; caller closes the fd."""
    return check(lib.bpf_obj_get(str(path).encode()), "bpf_obj_get", str(path))


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
