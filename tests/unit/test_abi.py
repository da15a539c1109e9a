"""ctypes mirrors (pilus.datapath.abi) agree with the C structs, via the object's BTF."""

from __future__ import annotations

import ctypes
import re
import shutil
from pathlib import Path

import pytest

from pilus.datapath import abi
from pilus.datapath._libbpf import (
    BTF_KIND_STRUCT,
    BTF_KIND_UNION,
    btf_member,
    check_ptr,
    lib,
)
from pilus.datapath.compile import BPF_SRC_DIR, compile_datapath

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None, reason="clang not installed (make setup)"
)


@pytest.fixture(scope="module")
def btf(tmp_path_factory):
    obj = compile_datapath(tmp_path_factory.mktemp("abi"))
    handle = check_ptr(lib.btf__parse(str(obj).encode(), None), "btf__parse", str(obj))
    yield handle
    lib.btf__free(handle)


def btf_layout(btf, name: str, union: bool):
    kind = BTF_KIND_UNION if union else BTF_KIND_STRUCT
    tid = lib.btf__find_by_name_kind(btf, name.encode(), kind)
    assert tid > 0, f"{'union' if union else 'struct'} {name} not in the object's BTF"
    t = lib.btf__type_by_id(btf, tid).contents
    vlen = t.info & 0xFFFF
    kflag = t.info >> 31
    members_addr = ctypes.addressof(t) + ctypes.sizeof(t)
    members = (btf_member * vlen).from_address(members_addr)
    out = []
    for m in members:
        mname = lib.btf__name_by_offset(btf, m.name_off).decode()
        bit_off = m.offset & 0xFFFFFF if kflag else m.offset
        msize = lib.btf__resolve_size(btf, m.type)
        out.append((mname, bit_off // 8, msize))
    return t.size_or_type, out


def ctypes_layout(cls):
    out = []
    for fname, ftype in cls._fields_:
        out.append((fname, getattr(cls, fname).offset, ctypes.sizeof(ftype)))
    return ctypes.sizeof(cls), out


@pytest.mark.parametrize("cls", abi.ALL_MIRRORS, ids=lambda c: c.C_NAME)
def test_mirror_matches_btf(btf, cls):
    union = issubclass(cls, ctypes.Union)
    c_size, c_members = btf_layout(btf, cls.C_NAME, union)
    py_size, py_members = ctypes_layout(cls)
    assert py_size == c_size, f"{cls.__name__}: sizeof {py_size} != C {c_size}"
    assert py_members == c_members


def test_every_common_h_struct_is_mirrored():
    text = (BPF_SRC_DIR / "lib" / "common.h").read_text()
    c_names = set(re.findall(r"^(?:struct|union) (\w+) \{", text, re.M))
    mirrored = {c.C_NAME for c in abi.ALL_MIRRORS}
    assert c_names == mirrored


def test_constants_match_common_h():
    text = (BPF_SRC_DIR / "lib" / "common.h").read_text()
    defines = dict(re.findall(r"^#define (\w+)\s+(\d+)\s*(?:/\*.*)?$", text, re.M))
    checked = 0
    for name, value in defines.items():
        if hasattr(abi, name):
            assert getattr(abi, name) == int(value), name
            checked += 1
    assert checked >= 30


def test_config_section_is_the_config_struct(btf):
    """.rodata.config holds exactly one struct pilus_config (what the loader patches)."""
    size, _ = btf_layout(btf, "pilus_config", union=False)
    assert size == ctypes.sizeof(abi.PilusConfig)
    sec = lib.btf__find_by_name_kind(btf, b".rodata.config", 15)  # BTF_KIND_DATASEC
    assert sec > 0
    t = lib.btf__type_by_id(btf, sec).contents
    assert t.info & 0xFFFF == 1, "one variable in .rodata.config"
    # struct btf_var_secinfo {type, offset, size} follows the btf_type
    var_type, offset, var_size = (ctypes.c_uint32 * 3).from_address(
        ctypes.addressof(t) + ctypes.sizeof(t)
    )
    assert (offset, var_size) == (0, size)
    var = lib.btf__type_by_id(btf, var_type).contents  # BTF_KIND_VAR -> const volatile struct
    assert lib.btf__resolve_size(btf, var.size_or_type) == size


def test_clang_missing_is_one_line(monkeypatch, tmp_path):
    from pilus.datapath import compile as comp

    monkeypatch.setattr(comp.shutil, "which", lambda name: None)
    monkeypatch.delenv("PILUS_CLANG", raising=False)
    with pytest.raises(comp.CompileError) as ei:
        comp.compile_datapath(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "make setup" in msg


def test_compile_is_cached(tmp_path):
    a = compile_datapath(tmp_path)
    mtime = a.stat().st_mtime_ns
    b = compile_datapath(tmp_path)
    assert a == b and b.stat().st_mtime_ns == mtime
    assert a.parent.parent == Path(tmp_path) / "bpf"
