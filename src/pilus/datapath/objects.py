"""The table of BPF objects of one node, and how one of them is loaded.

Each row names its source (``src/pilus/bpf/<source>.c``, compiled to
``<source>.o``), its programs and their hooks, where they attach, and the
DatapathConfig option that enables it. ``Datapath.load`` walks the table in
order: the first row (lxc) creates the maps, the later rows share them, by
their pins (``LIBBPF_PIN_BY_NAME``: every object declares the same maps in
lib/maps.h) or, without pins (tests), by reusing the first object's fds.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._libbpf import LibbpfMissing
from .compile import CompileError, compile_datapath
from .config import DatapathConfig, build_config
from .errors import DatapathError
from .events import MONITOR_MASK_SECTION
from .lb import configure_object
from .loader import BpfObject
from .socklb import SOCK_HOOKS

#: where a row's programs attach
ATTACH_ENDPOINT = "endpoint"  # each endpoint's host-side veth (Datapath.attach_endpoint)
ATTACH_NETDEV = "netdev"  # the node's native device (DatapathConfig.native_device)
ATTACH_CGROUP = "cgroup"  # the cgroup v2 root, with pinned bpf links (socket LB)
ATTACH_TUNNEL = "tunnel"  # the VXLAN device (DatapathConfig.tunnel_device)


@dataclass(frozen=True)
class ObjectSpec:
    name: str
    source: str
    programs: Mapping[str, str] = field(default_factory=dict)  # program -> hook
    attach: str = ATTACH_ENDPOINT
    #: the DatapathConfig field that enables the row (None: always loaded);
    #: its value None means "not managed by load()"
    option: str | None = None
    #: tc programs are pinned under <pin dir>/progs/; cgroup programs pin their links
    pin_programs: bool = True

    def enabled(self, cfg: DatapathConfig) -> bool | None:
        if self.option is None:
            return True
        value = getattr(cfg, self.option)
        return None if value is None else bool(value)


LXC = ObjectSpec(
    "lxc", "bpf_lxc", {"cil_from_container": "tc-ingress", "cil_to_container": "tc-egress"}
)
HOST = ObjectSpec("host", "bpf_host", {"cil_from_netdev": "tc-ingress"}, ATTACH_NETDEV)
OVERLAY = ObjectSpec("overlay", "bpf_overlay", {"cil_from_overlay": "tc-ingress", "cil_to_overlay": "tc-egress"},
                     ATTACH_TUNNEL, option="tunnel_device")
SOCK = ObjectSpec("sock", "bpf_sock", SOCK_HOOKS, ATTACH_CGROUP, option="socket_lb", pin_programs=False)

OBJECTS: tuple[ObjectSpec, ...] = (LXC, HOST, OVERLAY, SOCK)


def load_object(
    spec: ObjectSpec,
    cfg: DatapathConfig,
    state_dir: Path,
    pin_root: Path | None,
    maps_from: BpfObject | None = None,
) -> BpfObject:
    """Compile (cached) and load one row's object. ``maps_from``: the object
    whose maps this one shares when nothing is pinned; the monitor mask (an
    internal map, never pinned) is always shared with it."""

    def before_load(obj: BpfObject) -> None:
        configure_object(obj, cfg.lb)
        if maps_from is None:
            return
        theirs = set(maps_from.map_names())
        for name in obj.map_names():
            shared = name == MONITOR_MASK_SECTION or (pin_root is None and not name.startswith("."))
            if shared and name in theirs:
                obj.reuse_map_fd(name, maps_from.map_fd(name))

    try:
        path = compile_datapath(state_dir, name=spec.source)
        obj = BpfObject(path, build_config(cfg), pin_root, before_load=before_load)
    except (CompileError, LibbpfMissing) as exc:
        raise DatapathError(str(exc).splitlines()[0]) from exc
    except OSError as exc:
        hint = ""
        if exc.errno in (errno.EPERM, errno.EACCES):
            hint = ": run as root (CAP_BPF, CAP_NET_ADMIN)"
        elif exc.errno == errno.EINVAL and pin_root is not None:
            hint = (
                f": pinned maps under {pin_root} may be from an incompatible build; "
                f"remove them (pilus cluster down / remove_pins)"
            )
        raise DatapathError(f"loading the datapath ({spec.source}.o) failed: {exc}{hint}") from exc
    if spec.pin_programs and pin_root is not None:
        try:
            for name in spec.programs:
                obj.pin_program(name, pin_root / "progs" / name)
        except OSError as exc:
            obj.close()
            raise DatapathError(f"pinning programs under {pin_root}/progs failed: {exc}") from exc
    return obj
