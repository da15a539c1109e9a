"""BPF_PROG_TEST_RUN wrapper for tc programs."""

from __future__ import annotations

import ctypes
from ctypes import Structure, byref, c_uint8, c_uint32, c_uint64
from dataclasses import dataclass

from ._libbpf import bpf_test_run_opts, check, lib


class SkBuff(Structure):
    """struct __sk_buff (uapi) — the fields BPF_PROG_TEST_RUN accepts as ctx_in."""

    C_NAME = "__sk_buff"
    _fields_ = [
        ("len", c_uint32),
        ("pkt_type", c_uint32),
        ("mark", c_uint32),
        ("queue_mapping", c_uint32),
        ("protocol", c_uint32),
        ("vlan_present", c_uint32),
        ("vlan_tci", c_uint32),
        ("vlan_proto", c_uint32),
        ("priority", c_uint32),
        ("ingress_ifindex", c_uint32),
        ("ifindex", c_uint32),
        ("tc_index", c_uint32),
        ("cb", c_uint32 * 5),
        ("hash", c_uint32),
        ("tc_classid", c_uint32),
        ("data", c_uint32),
        ("data_end", c_uint32),
        ("napi_id", c_uint32),
        ("family", c_uint32),
        ("remote_ip4", c_uint32),
        ("local_ip4", c_uint32),
        ("remote_ip6", c_uint32 * 4),
        ("local_ip6", c_uint32 * 4),
        ("remote_port", c_uint32),
        ("local_port", c_uint32),
        ("data_meta", c_uint32),
        ("flow_keys", c_uint64),
        ("tstamp", c_uint64),
        ("wire_len", c_uint32),
        ("gso_segs", c_uint32),
        ("sk", c_uint64),
        ("gso_size", c_uint32),
        ("tstamp_type", c_uint8),
        ("_pad", c_uint8 * 3),
        ("hwtstamp", c_uint64),
    ]


@dataclass
class RunResult:
    retval: int
    data: bytes
    duration_ns: int
    ctx: SkBuff | None = None


def run_skb(
    prog_fd: int,
    packet: bytes,
    *,
    ingress_ifindex: int = 0,
    ifindex: int = 0,
    mark: int = 0,
    repeat: int = 1,
    out_size: int | None = None,
) -> RunResult:
    """Run a tc program once (or ``repeat`` times) on ``packet`` (Ethernet frame).

    ``ifindex`` must be 0/1 (loopback) or a device in the current netns;
    ``ingress_ifindex`` is free-form (skb->skb_iif).
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    size_out = out_size or (len(packet) + 256)
    data_out = ctypes.create_string_buffer(size_out)
    ctx_in = SkBuff()
    ctx_in.ingress_ifindex = ingress_ifindex
    ctx_in.ifindex = ifindex
    ctx_in.mark = mark
    ctx_out = SkBuff()
    opts = bpf_test_run_opts()
    opts.sz = ctypes.sizeof(opts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = size_out
    opts.ctx_in = ctypes.cast(byref(ctx_in), ctypes.c_void_p)
    opts.ctx_size_in = ctypes.sizeof(ctx_in)
    opts.ctx_out = ctypes.cast(byref(ctx_out), ctypes.c_void_p)
    opts.ctx_size_out = ctypes.sizeof(ctx_out)
    opts.repeat = repeat
    check(lib.bpf_prog_test_run_opts(prog_fd, byref(opts)), "bpf_prog_test_run_opts")
    return RunResult(
        retval=opts.retval,
        data=data_out.raw[: opts.data_size_out],
        duration_ns=opts.duration,
        ctx=ctx_out,
    )
