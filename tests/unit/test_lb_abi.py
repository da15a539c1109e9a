"""ctypes mirrors in pilus.datapath.lb agree with the structs of bpf/lib/lb.h (via BTF)."""

from __future__ import annotations

import ctypes
import re
import shutil

import pytest

from pilus.datapath import lb
from pilus.datapath._libbpf import BTF_KIND_STRUCT, btf_member, check_ptr, lib
from pilus.datapath.compile import BPF_SRC_DIR, compile_datapath

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None, reason="clang not installed (make setup)"
)

#: structs of lb.h that never cross to user space (built on the stack)
STACK_ONLY = {"lb4_result", "lb_tcp_rst", "lb_icmp_unreach"}


@pytest.fixture(scope="module")
def btf(tmp_path_factory):
    obj = compile_datapath(tmp_path_factory.mktemp("lbabi"))
    handle = check_ptr(lib.btf__parse(str(obj).encode(), None), "btf__parse", str(obj))
    yield handle
    lib.btf__free(handle)


def btf_layout(btf, name: str):
    tid = lib.btf__find_by_name_kind(btf, name.encode(), BTF_KIND_STRUCT)
    assert tid > 0, f"struct {name} not in the object's BTF"
    t = lib.btf__type_by_id(btf, tid).contents
    vlen = t.info & 0xFFFF
    kflag = t.info >> 31
    members = (btf_member * vlen).from_address(ctypes.addressof(t) + ctypes.sizeof(t))
    out = []
    for m in members:
        mname = lib.btf__name_by_offset(btf, m.name_off).decode()
        bit_off = m.offset & 0xFFFFFF if kflag else m.offset
        out.append((mname, bit_off // 8, lib.btf__resolve_size(btf, m.type)))
    return t.size_or_type, out


@pytest.mark.parametrize("cls", lb.LB_MIRRORS, ids=lambda c: c.C_NAME)
def test_lb_mirror_matches_btf(btf, cls):
    size, members = btf_layout(btf, cls.C_NAME)
    py = [(f, getattr(cls, f).offset, ctypes.sizeof(t)) for f, t in cls._fields_]
    assert ctypes.sizeof(cls) == size
    assert py == members


def test_every_lb_h_struct_is_mirrored():
    text = (BPF_SRC_DIR / "lib" / "lb.h").read_text()
    c_names = set(re.findall(r"^struct (\w+) \{", text, re.M)) - STACK_ONLY
    assert c_names == {c.C_NAME for c in lb.LB_MIRRORS}


def test_lb_constants_match_lb_h():
    text = (BPF_SRC_DIR / "lib" / "lb.h").read_text()
    defines = dict(re.findall(r"^#define (\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*(?:/\*.*)?$", text, re.M))
    checked = 0
    for name, value in defines.items():
        if hasattr(lb, name):
            assert getattr(lb, name) == int(value, 0), name
            checked += 1
    assert checked >= 25


def test_lb_config_section_default_matches(btf):
    sec = lib.btf__find_by_name_kind(btf, lb.LB_CONFIG_SECTION.encode(), 15)  # DATASEC
    assert sec > 0
    size, _ = btf_layout(btf, "lb_config")
    assert size == ctypes.sizeof(lb.LbConfigC)


def test_lb_config_rejects_non_prime_sizes():
    with pytest.raises(ValueError, match="16000"):
        lb.LbConfig(maglev_table_size=16000)
    assert lb.LbConfig(maglev_table_size=251).to_c().maglev_size == 251
