"""The datapath facade used by the agent."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from . import abi, attach
from ._libbpf import LibbpfMissing
from .compile import CompileError, compile_datapath
from .events import MONITOR_MASK_SECTION, EventReader
from .lb import LB_MAP_NAMES, LbConfig, LbMaps, configure_object
from .loader import NETDEV_PROGRAMS, PROGRAMS, BpfObject, map_info, prog_info
from .maps import BpfMap, CtMap, EndpointInfo, EndpointMap, EventsLostMap, IpcacheMap, MetricsMap
from .policy import IPBlockMap, PolicyMaps
from .socklb import SOCK_MAP_NAMES, SocketLb, remove_links

DEFAULT_BPFFS_ROOT = Path("/sys/fs/bpf/pilus")
BPFFS_MOUNT = Path("/sys/fs/bpf")

PROG_HOOKS = {
    "cil_from_container": "tc-ingress",
    "cil_to_container": "tc-egress",
    "cil_from_netdev": "tc-ingress",  # native device: NodePort / ExternalIPs / LB IPs
}

MAP_NAMES = (
    "pilus_lxc",
    "pilus_lxc_if",
    "pilus_ipcache",
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


class DatapathError(Exception):
    """A datapath operation failed; the message says what to do."""


@dataclass(frozen=True)
class DatapathConfig:
    node_name: str
    router_ip: IPv4Address
    node_ip: IPv4Address
    pod_cidr: IPv4Network
    events_rate: int = 1000  # events per second per CPU
    events_burst: int = 200
    lb: LbConfig = field(default_factory=LbConfig)  # service LB: Maglev size, hairpin IP


def build_config(cfg: DatapathConfig, trace_aggregate: bool = True) -> abi.PilusConfig:
    c = abi.PilusConfig()
    c.router_ip = abi.ip4_to_raw(cfg.router_ip)
    c.node_ip = abi.ip4_to_raw(cfg.node_ip)
    net = IPv4Network(cfg.pod_cidr, strict=False)
    c.pod_cidr = abi.ip4_to_raw(net.network_address)
    c.pod_prefixlen = net.prefixlen
    c.events_rate = cfg.events_rate
    c.events_burst = cfg.events_burst
    c.ct_lifetime_tcp = 8000
    c.ct_syn_timeout = 60
    c.ct_close_timeout = 10
    c.ct_lifetime_nontcp = 60
    c.trace_aggregate = 1 if trace_aggregate else 0
    return c


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
    """Compile, load, pin and attach the pilus datapath of one node.

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
        self._obj: BpfObject | None = None
        self._attached: set[int] = set()
        self.object_path: Path | None = None
        self.endpoints: EndpointMap = _NotLoaded("endpoints")  # type: ignore[assignment]
        self.ipcache: IpcacheMap = _NotLoaded("ipcache")  # type: ignore[assignment]
        self.ct: CtMap = _NotLoaded("ct")  # type: ignore[assignment]
        self.metrics: MetricsMap = _NotLoaded("metrics")  # type: ignore[assignment]
        self.events_lost: EventsLostMap = _NotLoaded("events_lost")  # type: ignore[assignment]
        self.policy: PolicyMaps = _NotLoaded("policy")  # type: ignore[assignment]
        self.ipblock: IPBlockMap = _NotLoaded("ipblock")  # type: ignore[assignment]
        self.lb: LbMaps = _NotLoaded("lb")  # type: ignore[assignment]
        self.socket_lb: SocketLb | None = None  # load_socket_lb()

    # ------------------------------------------------------------ lifecycle

    @property
    def pin_root(self) -> Path | None:
        return self.bpffs_root / self.cfg.node_name if self.bpffs_root is not None else None

    def load(self) -> None:
        if self._obj is not None:
            return
        pin_root = self.pin_root
        try:
            if pin_root is not None:
                ensure_bpffs(pin_root)
                pin_root.mkdir(parents=True, exist_ok=True)
            self.object_path = compile_datapath(self.state_dir)
            obj = BpfObject(
                self.object_path,
                build_config(self.cfg),
                pin_root,
                before_load=lambda o: configure_object(o, self.cfg.lb),
            )
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
            raise DatapathError(f"loading the datapath failed: {exc}{hint}") from exc
        self._obj = obj
        try:
            if pin_root is not None:
                for name in PROGRAMS + NETDEV_PROGRAMS:
                    obj.pin_program(name, pin_root / "progs" / name)
        except OSError as exc:
            self.close()
            raise DatapathError(f"pinning programs under {pin_root}/progs failed: {exc}") from exc
        fd = obj.map_fd
        self.endpoints = EndpointMap(fd("pilus_lxc"), fd("pilus_lxc_if"))
        self.ipcache = IpcacheMap(fd("pilus_ipcache"))
        self.ct = CtMap(fd("pilus_ct4"))
        self.metrics = MetricsMap(fd("pilus_metrics"))
        self.events_lost = EventsLostMap(fd("pilus_ev_lost"))
        # per-endpoint policy maps, pinned beside the others as pilus_policy_<id>
        self.policy = PolicyMaps(fd("pilus_policy"), pin_root)
        self.ipblock = IPBlockMap(fd("pilus_ipblock"))
        self.lb = LbMaps.from_object(fd, self.cfg.lb.maglev_table_size)

    def _loaded(self) -> BpfObject:
        if self._obj is None:
            raise DatapathError("datapath not loaded: call Datapath.load() first")
        return self._obj

    def prog_fd(self, name: str) -> int:
        return self._loaded().prog_fd(name)

    def map_fd(self, name: str) -> int:
        return self._loaded().map_fd(name)

    def close(self) -> None:
        """Free the object and its fds; tc filters and pins keep the datapath running
        (unpinned socket-LB links go with the fds)."""
        if self.socket_lb is not None:
            self.socket_lb.close()
            self.socket_lb = None
        if isinstance(self.policy, PolicyMaps):
            self.policy.close()
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ------------------------------------------------------------ attach

    def attach_endpoint(self, ifindex: int) -> None:
        obj = self._loaded()
        try:
            attach.attach(ifindex, "tc-ingress", obj.prog_fd("cil_from_container"))
            attach.attach(ifindex, "tc-egress", obj.prog_fd("cil_to_container"))
        except OSError as exc:
            hint = (
                ": does the device exist in this network namespace?"
                if exc.errno
                in (
                    errno.ENODEV,
                    errno.EINVAL,
                )
                else ""
            )
            raise DatapathError(f"attaching to ifindex {ifindex} failed: {exc}{hint}") from exc
        self._attached.add(ifindex)

    def detach_endpoint(self, ifindex: int) -> None:
        try:
            for hook in ("tc-ingress", "tc-egress"):
                attach.detach(ifindex, hook)
        except OSError as exc:
            raise DatapathError(f"detaching from ifindex {ifindex} failed: {exc}") from exc
        self._attached.discard(ifindex)

    def attach_netdev(self, ifindex: int) -> None:
        """cil_from_netdev at tc ingress of the node's native device (services
        reached from outside: NodePort, ExternalIPs, LoadBalancer IPs)."""
        obj = self._loaded()
        try:
            attach.attach(ifindex, "tc-ingress", obj.prog_fd("cil_from_netdev"))
        except OSError as exc:
            raise DatapathError(f"attaching to the native device ifindex {ifindex} failed: {exc}") from exc

    def detach_netdev(self, ifindex: int) -> None:
        try:
            attach.detach(ifindex, "tc-ingress")
        except OSError as exc:
            raise DatapathError(f"detaching from ifindex {ifindex} failed: {exc}") from exc

    # ------------------------------------------------------------ socket LB

    def load_socket_lb(self, attach: bool = True, cgroup: Path | None = None) -> SocketLb:
        """Load bpf_sock.o (socket-level LB) sharing this datapath's maps, and
        attach it to ``cgroup`` (default: the cgroup v2 root). Pinned: the
        links are pinned under ``<pin dir>/links/`` and survive the agent."""
        tc = self._loaded()
        if self.socket_lb is not None:
            if attach:
                self.socket_lb.attach(cgroup)
            return self.socket_lb
        pin_root = self.pin_root

        def before_load(o: BpfObject) -> None:
            configure_object(o, self.cfg.lb)
            if pin_root is None:  # no pins to meet at: share the tc object's maps
                own = set(o.map_names())
                for name in tc.map_names():
                    if name in own and not name.startswith("."):
                        o.reuse_map_fd(name, tc.map_fd(name))

        try:
            path = compile_datapath(self.state_dir, name="bpf_sock")
            obj = BpfObject(path, build_config(self.cfg), pin_root, before_load=before_load)
        except (CompileError, LibbpfMissing) as exc:
            raise DatapathError(str(exc).splitlines()[0]) from exc
        except OSError as exc:
            raise DatapathError(f"loading the socket LB (bpf_sock.o) failed: {exc}") from exc
        sock = SocketLb(obj, pin_root)
        if attach:
            try:
                sock.attach(cgroup)
            except OSError as exc:
                sock.close()
                raise DatapathError(f"attaching the socket LB to the cgroup failed: {exc}") from exc
        self.socket_lb = sock
        return sock

    def unload_socket_lb(self) -> list[str]:
        """Detach the socket LB: close this agent's object and remove the pinned
        links (also those left by an earlier run). Returns the removed pins."""
        if self.socket_lb is not None:
            self.socket_lb.close()
            self.socket_lb = None
        return remove_links(self.pin_root) if self.pin_root is not None else []

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
        obj = self._loaded()
        ifaces = attach.interfaces()
        out = []
        for name in PROGRAMS:
            hook = PROG_HOOKS[name]
            pid = prog_info(obj.prog_fd(name)).id
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
