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


def test_policy_key_encoding():
    """PolicyKey -> LPM key as the datapath looks it up (Cilium's layout)."""
    from pilus.datapath.policy import PolicyKey, key_from_c, key_to_c, port_range_text

    k = key_to_c(PolicyKey(1001, True, 6, 80, 16))
    assert (k.lpm_prefixlen, k.sec_label, k.egress, k.protocol) == (64, 1001, 1, 6)
    assert k.to_bytes()[-2:] == b"\x00\x50"  # dport in network order
    k = key_to_c(PolicyKey(7, False, 0, 0, 0))  # L3-only
    assert (k.lpm_prefixlen, k.protocol, k.dport) == (abi.POLICY_STATIC_PREFIX, 0, 0)
    k = key_to_c(PolicyKey(0, False, 17, 0, 0))  # proto-only
    assert k.lpm_prefixlen == abi.POLICY_STATIC_PREFIX + abi.POLICY_PROTO_PREFIX
    k = key_to_c(PolicyKey(0, False, 6, 8003, 14))  # 8000-8003: bits past the prefix dropped
    assert k.lpm_prefixlen == 62 and k.to_bytes()[-2:] == (8000).to_bytes(2, "big")
    assert key_from_c(k) == PolicyKey(0, False, 6, 8000, 14)
    assert port_range_text(6, 8000, 14) == "8000-8003/TCP"
    assert port_range_text(6, 80, 16) == "80/TCP"
    assert port_range_text(17, 0, 0) == "ANY/UDP"
    assert port_range_text(0, 0, 0) == "ANY"
    assert port_range_text(1, 8, 16) == "8/ICMP"
    for bad in (PolicyKey(1, False, 0, 80, 16), PolicyKey(1, False, 6, 80, 17)):
        with pytest.raises(ValueError):
            key_to_c(bad)


def test_policy_deny_closure():
    from pilus.datapath.policy import PolicyEntry, PolicyKey, normalize

    allow, deny = PolicyEntry(False), PolicyEntry(True)
    out = normalize(
        {
            PolicyKey(5, False, 6, 80, 16): allow,  # covered by the TCP deny of identity 5
            PolicyKey(5, False, 6, 0, 0): deny,
            PolicyKey(5, False, 17, 53, 16): allow,  # other protocol: untouched
            PolicyKey(6, False, 6, 80, 16): allow,  # other identity: untouched
            PolicyKey(5, True, 6, 80, 16): allow,  # other direction: untouched
            PolicyKey(9, False, 6, 8000, 13): deny,  # 8000-8007
            PolicyKey(9, False, 6, 8004, 15): allow,  # 8004-8005: covered
            PolicyKey(9, False, 6, 8008, 16): allow,  # outside the range
        }
    )
    assert [k for k, v in out.items() if v.deny] == [
        PolicyKey(5, False, 6, 80, 16),
        PolicyKey(5, False, 6, 0, 0),
        PolicyKey(9, False, 6, 8000, 13),
        PolicyKey(9, False, 6, 8004, 15),
    ]


def test_libbpf_missing_is_one_line(monkeypatch):
    from pilus.datapath import _libbpf

    def no_such_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(_libbpf.ctypes, "CDLL", no_such_library)
    with pytest.raises(_libbpf.LibbpfMissing) as ei:
        _libbpf._load()
    msg = str(ei.value)
    assert "\n" not in msg and "make setup" in msg and "libbpf1" in msg


def test_object_table_matches_the_sources(tmp_path):
    """Each row of objects.OBJECTS names programs its source defines (and no
    other); every object declares the shared maps of lib/maps.h, only
    bpf_sock.o the socket LB's own."""
    from pilus.datapath.objects import OBJECTS

    maps_of = {}
    for spec in OBJECTS:
        text = (BPF_SRC_DIR / f"{spec.source}.c").read_text()
        progs = set(re.findall(r'^SEC\("[^"]+"\)\nint (\w+)\(', text, re.M))
        assert progs == set(spec.programs), spec.name
        obj = compile_datapath(tmp_path, name=spec.source)
        maps_of[spec.name] = set(re.findall(rb"pilus_\w+", obj.read_bytes()))
    shared = {b"pilus_lxc", b"pilus_ipcache", b"pilus_policy", b"pilus_lb4_svc", b"pilus_events"}
    for name, found in maps_of.items():
        assert shared <= found, name
        assert (b"pilus_sock_netns" in found) == (name == "sock"), name
