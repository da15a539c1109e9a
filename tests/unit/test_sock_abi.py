"""ctypes mirrors in pilus.datapath.socklb agree with bpf/lib/sock.h (via the BTF of bpf_sock.o)."""

from __future__ import annotations

import ctypes
import re
import shutil

import pytest
from test_lb_abi import btf_layout

from pilus.datapath import socklb
from pilus.datapath._libbpf import check_ptr, lib
from pilus.datapath.compile import BPF_SRC_DIR, compile_datapath

pytestmark = pytest.mark.skipif(
    shutil.which("clang") is None, reason="clang not installed (make setup)"
)


@pytest.fixture(scope="module")
def btf(tmp_path_factory):
    obj = compile_datapath(tmp_path_factory.mktemp("sockabi"), name="bpf_sock")
    handle = check_ptr(lib.btf__parse(str(obj).encode(), None), "btf__parse", str(obj))
    yield handle
    lib.btf__free(handle)


@pytest.mark.parametrize("cls", socklb.SOCK_MIRRORS, ids=lambda c: c.C_NAME)
def test_sock_mirror_matches_btf(btf, cls):
    size, members = btf_layout(btf, cls.C_NAME)
    py = [(f, getattr(cls, f).offset, ctypes.sizeof(t)) for f, t in cls._fields_]
    assert ctypes.sizeof(cls) == size
    assert py == members


def test_every_sock_h_struct_is_mirrored_and_stats_agree():
    text = (BPF_SRC_DIR / "lib" / "sock.h").read_text()
    assert set(re.findall(r"^struct (\w+) \{", text, re.M)) == {c.C_NAME for c in socklb.SOCK_MIRRORS}
    slots = dict(re.findall(r"^#define SOCK_STAT_(\w+)\s+(\d+)", text, re.M))
    assert int(slots.pop("SLOTS")) == len(socklb.SOCK_STATS)
    assert {k.lower(): int(v) for k, v in slots.items()} == {
        n: i for i, n in enumerate(socklb.SOCK_STATS)
    }


def test_program_sections_match_hooks():
    text = (BPF_SRC_DIR / "bpf_sock.c").read_text()
    found = dict((fn, sec) for sec, fn in re.findall(r'^SEC\("([^"]+)"\)\nint (\w+)\(', text, re.M))
    assert found == socklb.SOCK_HOOKS
