"""The datapath facade used by the agent."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
from pathlib import Path

from . import attach
from .config import DatapathConfig
from .errors import DatapathError
from .events import MONITOR_MASK_SECTION, EventReader
from .lb import LB_MAP_NAMES, LbMaps
from .loader import BpfObject, map_info, prog_info
from .maps import BpfMap, CtMap, EndpointInfo, EndpointMap, EventsLostMap, IpcacheMap, MetricsMap, TunnelMap
from .objects import (
    ATTACH_CGROUP,
    ATTACH_NETDEV,
    ATTACH_TUNNEL,
    HOST,
    LXC,
    OBJECTS,
    OVERLAY,
    SOCK,
    ObjectSpec,
    load_object,
)
from .policy import IPBlockMap, PolicyMaps
from .socklb import SOCK_MAP_NAMES, SocketLb, remove_links

DEFAULT_BPFFS_ROOT = Path("/sys/fs/bpf/pilus")
BPFFS_MOUNT = Path("/sys/fs/bpf")

#: program -> hook, of every object in the table
PROG_HOOKS = {prog: hook for spec in OBJECTS for prog, hook in spec.programs.items()}

MAP_NAMES = (
    "pilus_lxc",
    "pilus_lxc_if",
    "pilus_ipcache",
    "pilus_tunnel_map",
    "pilus_ipblock",
    "pilus_ct4",
    "pilus_metrics",
    "pilus_events",
    "pilus_ev_bucket",
    "pilus_ev_lost",
    "pilus_policy",
)

_MAP_TYPES = {
    1: "hash",
    2: "array",
    5: "percpu_hash",
    6: "percpu_array",
    9: "lru_hash",
    11: "lpm_trie",
    13: "hash_of_maps",
    27: "ringbuf",
}
_ITERABLE_TYPES = {1, 5, 9, 10, 11, 13}


def _bpffs_mounted_for(path: Path) -> bool:
    path = Path(os.path.abspath(path))
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "bpf":
                    mnt = Path(parts[1].replace("\\040", " "))
                    if path == mnt or mnt in path.parents:
                        return True
    except OSError:
        pass
    return False


def ensure_bpffs(path: Path) -> None:
    """Mount bpffs at /sys/fs/bpf unless ``path`` already lies on a bpffs."""
    if _bpffs_mounted_for(path):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(b"bpf", str(BPFFS_MOUNT).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise DatapathError(
            f"bpffs is not mounted at {BPFFS_MOUNT} and mounting it failed "
            f"({os.strerror(err)}): run as root or `mount -t bpf bpf {BPFFS_MOUNT}`"
        )
    if not _bpffs_mounted_for(path):
        raise DatapathError(f"{path} is not on a bpffs mount: use a path under {BPFFS_MOUNT}")


class _NotLoaded:
    def __init__(self, what: str):
        self._what = what

    def __getattr__(self, name):
        raise DatapathError(f"datapath not loaded: call Datapath.load() before using {self._what}")


class Datapath:
    """Compile, load, pin and attach the pilus datapath of one node: the
    objects of ``objects.OBJECTS`` (lxc, host, sock), sharing one set of maps.

    ``bpffs_root=None`` loads without any pinning (tests); the contract use is
    a directory on bpffs (default /sys/fs/bpf/pilus), pins go to
    ``<bpffs_root>/<node_name>/``.
    """

    def __init__(
        self, cfg: DatapathConfig, state_dir: Path, bpffs_root: Path | None = DEFAULT_BPFFS_ROOT
    ) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.bpffs_root = Path(bpffs_root) if bpffs_root is not None else None
        self._objects: dict[str, BpfObject] = {}  # row name -> loaded object, in table order
        self._attached: set[int] = set()
        self.object_path: Path | None = None  # bpf_lxc.o
        self.endpoints: EndpointMap = _NotLoaded("endpoints")  # type: ignore[assignment]
        self.ipcache: IpcacheMap = _NotLoaded("ipcache")  # type: ignore[assignment]
        self.tunnel: TunnelMap = _NotLoaded("tunnel")  # type: ignore[assignment]
        self.ct: CtMap = _NotLoaded("ct")  # type: ignore[assignment]
        self.metrics: MetricsMap = _NotLoaded("metrics")  # type: ignore[assignment]
        self.events_lost: EventsLostMap = _NotLoaded("events_lost")  # type: ignore[assignment]
        self.policy: PolicyMaps = _NotLoaded("policy")  # type: ignore[assignment]
        self.ipblock: IPBlockMap = _NotLoaded("ipblock")  # type: ignore[assignment]
        self.lb: LbMaps = _NotLoaded("lb")  # type: ignore[assignment]
        self.socket_lb: SocketLb | None = None  # the sock row, when loaded

    # ------------------------------------------------------------ lifecycle

    @property
    def pin_root(self) -> Path | None:
        return self.bpffs_root / self.cfg.node_name if self.bpffs_root is not None else None

    def load(self) -> None:
        """Walk the object table: load (and attach) the enabled rows, remove
        what a disabled row left attached. Idempotent."""
        if LXC.name in self._objects:
            return
        pin_root = self.pin_root
        if pin_root is not None:
            try:
                ensure_bpffs(pin_root)
                pin_root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatapathError(f"creating the pin directory {pin_root} failed: {exc}") from exc
        try:
            for spec in OBJECTS:
                enabled = spec.enabled(self.cfg)
                if enabled:
                    self._load_row(spec)
                elif enabled is not None:
                    self._remove_row(spec)
        except BaseException:
            self.close()
            raise

    def _load_row(self, spec: ObjectSpec, attach: bool = True, cgroup: Path | None = None) -> BpfObject:
        first = self._objects.get(LXC.name)
        obj = load_object(spec, self.cfg, self.state_dir, self.pin_root, maps_from=first)
        self._objects[spec.name] = obj
        if spec is LXC:
            self.object_path = obj.path
            self._open_maps(obj)
        elif spec.attach == ATTACH_NETDEV and attach and self.cfg.native_device:
            self.attach_netdev(_ifindex(self.cfg.native_device))
        elif spec.attach == ATTACH_TUNNEL and attach and self.cfg.tunnel_device:
            self._attach_device(OVERLAY, _ifindex(self.cfg.tunnel_device), "the tunnel device")
        elif spec.attach == ATTACH_CGROUP:
            sock = SocketLb(obj, self.pin_root)
            self.socket_lb = sock
            if attach:
                try:
                    sock.attach(cgroup or self.cfg.socket_lb_cgroup)
                except OSError as exc:
                    self._close_row(spec)
                    raise DatapathError(f"attaching the socket LB to the cgroup failed: {exc}") from exc
        return obj

    def _remove_row(self, spec: ObjectSpec) -> list[str]:
        """Detach a disabled row: close its object, and for the socket LB remove the
        pinned links (also those an earlier run left). Returns the removed pins."""
        self._close_row(spec)
        if spec.attach == ATTACH_CGROUP and self.pin_root is not None:
            return remove_links(self.pin_root)
        return []

    def _close_row(self, spec: ObjectSpec) -> None:
        if spec.attach == ATTACH_CGROUP and self.socket_lb is not None:
            self.socket_lb.close()  # closes its object
            self.socket_lb = None
            self._objects.pop(spec.name, None)
        elif (obj := self._objects.pop(spec.name, None)) is not None:
            obj.close()

    def _open_maps(self, obj: BpfObject) -> None:
        fd = obj.map_fd
        self.endpoints = EndpointMap(fd("pilus_lxc"), fd("pilus_lxc_if"))
        self.ipcache = IpcacheMap(fd("pilus_ipcache"))
        self.tunnel = TunnelMap(fd("pilus_tunnel_map"))
        self.ct = CtMap(fd("pilus_ct4"))
        self.metrics = MetricsMap(fd("pilus_metrics"))
        self.events_lost = EventsLostMap(fd("pilus_ev_lost"))
        # per-endpoint policy maps, pinned beside the others as pilus_policy_<id>
        self.policy = PolicyMaps(fd("pilus_policy"), self.pin_root)
        self.ipblock = IPBlockMap(fd("pilus_ipblock"))
        self.lb = LbMaps.from_object(fd, self.cfg.lb.maglev_table_size)

    def _loaded(self) -> BpfObject:
        obj = self._objects.get(LXC.name)
        if obj is None:
            raise DatapathError("datapath not loaded: call Datapath.load() first")
        return obj

    def prog_fd(self, name: str) -> int:
        """fd of a program of any loaded object."""
        self._loaded()
        for spec in OBJECTS:
            if name in spec.programs and spec.name in self._objects:
                return self._objects[spec.name].prog_fd(name)
        raise DatapathError(f"no loaded BPF object has a program {name!r}")

    def map_fd(self, name: str) -> int:
        return self._loaded().map_fd(name)

    def close(self) -> None:
        """Free the objects and their fds; tc filters and pins keep the datapath running
        (unpinned socket-LB links go with the fds)."""
        if isinstance(self.policy, PolicyMaps):
            self.policy.close()
        for spec in reversed(OBJECTS):
            self._close_row(spec)

    # ------------------------------------------------------------ attach

    def attach_endpoint(self, ifindex: int) -> None:
        self._loaded()
        try:
            for prog, hook in LXC.programs.items():
                attach.attach(ifindex, hook, self.prog_fd(prog))
        except OSError as exc:
            hint = (
                ": does the device exist in this network namespace?"
                if exc.errno in (errno.ENODEV, errno.EINVAL)
                else ""
            )
            raise DatapathError(f"attaching to ifindex {ifindex} failed: {exc}{hint}") from exc
        self._attached.add(ifindex)

    def detach_endpoint(self, ifindex: int) -> None:
        try:
            for hook in LXC.programs.values():
                attach.detach(ifindex, hook)
        except OSError as exc:
            raise DatapathError(f"detaching from ifindex {ifindex} failed: {exc}") from exc
        self._attached.discard(ifindex)

    def attach_netdev(self, ifindex: int) -> None:
        """bpf_host.o's cil_from_netdev at tc ingress of the node's native device
        (services reached from outside: NodePort, ExternalIPs, LoadBalancer IPs).
        ``load()`` does this itself when DatapathConfig.native_device is set."""
        self._attach_device(HOST, ifindex, "the native device")

    def _attach_device(self, spec: ObjectSpec, ifindex: int, what: str) -> None:
        try:
            for prog, hook in spec.programs.items():
                attach.attach(ifindex, hook, self.prog_fd(prog))
        except OSError as exc:
            raise DatapathError(f"attaching to {what} (ifindex {ifindex}) failed: {exc}") from exc

    def detach_netdev(self, ifindex: int) -> None:
        try:
            for hook in HOST.programs.values():
                attach.detach(ifindex, hook)
        except OSError as exc:
            raise DatapathError(f"detaching from ifindex {ifindex} failed: {exc}") from exc

    # ------------------------------------------------------------ socket LB

    def load_socket_lb(self, attach: bool = True, cgroup: Path | None = None) -> SocketLb:
        """The sock row on demand (DatapathConfig.socket_lb=True does it in load()):
        bpf_sock.o sharing this datapath's maps, attached to ``cgroup`` (default:
        the cgroup v2 root). Pinned: the links are pinned under ``<pin dir>/links/``
        and survive the agent."""
        self._loaded()
        if self.socket_lb is None:
            self._load_row(SOCK, attach=attach, cgroup=cgroup)
        elif attach:
            self.socket_lb.attach(cgroup or self.cfg.socket_lb_cgroup)
        assert self.socket_lb is not None
        return self.socket_lb

    def unload_socket_lb(self) -> list[str]:
        """The sock row disabled (DatapathConfig.socket_lb=False does it in load()):
        close this agent's object and remove the pinned links (also those left by
        an earlier run). Returns the removed pins."""
        return self._remove_row(SOCK)

    # ------------------------------------------------------------ introspection

    def events(self) -> EventReader:
        obj = self._loaded()
        try:
            return EventReader(
                obj.map_fd("pilus_events"),
                lost_fn=self.events_lost.total,
                mask_fd=obj.map_fd(MONITOR_MASK_SECTION),
            )
        except OSError as exc:
            raise DatapathError(f"opening the event ring buffer failed: {exc}") from exc

    def programs(self) -> list[dict]:
        self._loaded()
        ifaces = attach.interfaces()
        out = []
        # per endpoint (lxc), the native device (host), the tunnel device (overlay):
        # the device programs once load() attached them
        devices = {LXC.name: True, HOST.name: bool(self.cfg.native_device),
                   OVERLAY.name: bool(self.cfg.tunnel_device)}
        for spec in (LXC, HOST, OVERLAY):
            if spec.name not in self._objects or not devices[spec.name]:
                continue
            for name, hook in spec.programs.items():
                pid = prog_info(self._objects[spec.name].prog_fd(name)).id
                count = sum(1 for idx, _ in ifaces if attach.query(idx, hook) == pid)
                out.append({"name": name, "hook": hook, "attached": count, "prog_id": pid})
        if self.socket_lb is not None:
            for row in self.socket_lb.attached():
                out.append({
                    "name": row["name"],
                    "hook": row["hook"],
                    "attached": int(row["attached"]),
                    "prog_id": prog_info(self.socket_lb.prog_fd(row["name"])).id,
                })
        return out

    def map_stats(self) -> list[dict]:
        obj = self._loaded()
        out = []
        sock = self.socket_lb
        names = [(n, obj) for n in MAP_NAMES + LB_MAP_NAMES]
        if sock is not None:
            names += [(n, sock) for n in SOCK_MAP_NAMES]
        for name, owner in names:
            fd = owner.map_fd(name)
            info = map_info(fd)
            if info.type in _ITERABLE_TYPES:
                entries: int | None = BpfMap(
                    fd, ctypes.c_uint8 * info.key_size, ctypes.c_uint8, name
                ).count()
            elif info.type in (2, 6):
                entries = info.max_entries
            else:
                entries = None
            out.append(
                {
                    "name": name,
                    "type": _MAP_TYPES.get(info.type, str(info.type)),
                    "max_entries": info.max_entries,
                    "entries": entries,
                }
            )
        return out

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ifindex(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError as exc:
        raise DatapathError(f"native device {ifname!r} not found: {exc}") from exc


def remove_pins(node_name: str, bpffs_root: Path = DEFAULT_BPFFS_ROOT) -> None:
    """Remove a node's pinned maps and programs (cluster teardown)."""
    root = Path(bpffs_root) / node_name
    if root.exists():
        shutil.rmtree(root, ignore_errors=False)
    with contextlib.suppress(OSError):
        Path(bpffs_root).rmdir()  # only if empty


__all__ = [
    "Datapath",
    "DatapathConfig",
    "DatapathError",
    "EndpointInfo",
    "remove_pins",
]
