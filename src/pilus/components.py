"""The agent's small components: the start/stop steps that belong to no other room
(the state-dir lock, opening the kvstore, node addresses and plumbing, the node's
ipcache entries, the event ring).

Each constructor does no I/O; ``pilus.agent`` lists them in its table.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import logging
import os
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pilus.errors import AgentError
from pilus.identity import reserved
from pilus.ipcache import IPCache, Source
from pilus.kvstore import open_store
from pilus.node import setup as node_setup
from pilus.observer.monitor import EventHub

log = logging.getLogger("pilus.agent")


class StateDirLock:
    """One agent per state dir: flock on <state-dir>/agent.lock, holding our pid."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AgentError(
                f"another pilus agent (pid {holder}) is running on state dir {self.state_dir}: "
                "stop it first or use another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class KVStoreConnection:
    """The cluster store, opened on start (opening creates and migrates the file)."""

    def __init__(self, backend: str, path: Path, opts: dict[str, str] | None = None) -> None:
        self.backend, self.path, self.opts = backend, path, dict(opts or {})
        self.store: Any = None

    def open(self) -> None:
        self.store = open_store(self.backend, path=self.path, **self.opts)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()


class NodeAddresses:
    """The node IP and native device, read from the routing table on start."""

    def __init__(self, native_device: str | None, router_ip: IPv4Address) -> None:
        self.native_device = native_device
        self.node_ip = router_ip  # until detected; the router IP when the node has none
        self.device: str | None = None

    async def detect(self) -> None:
        node_ip, self.device = await asyncio.to_thread(node_setup.detect_node_ip, self.native_device)
        self.node_ip = node_ip or self.node_ip


class NodeNetwork:
    """The node plumbing the datapath relies on (netlink, sysctls, nft): the seam a
    test without root replaces."""

    def __init__(self, addressing: node_setup.NodeAddressing) -> None:
        self.addressing = addressing

    async def start(self) -> None:
        await asyncio.to_thread(node_setup.setup_node, self.addressing)


class TunnelDevice:
    """Tunnel mode: the VXLAN device the datapath encapsulates into (created before the
    datapath loads, which needs its ifindex); native routing: none."""

    def __init__(self, mode: str, port: int, mtu: int) -> None:
        self.mode, self.port, self.mtu = mode, port, mtu
        self.name: str | None = None
        self.ifindex = 0

    async def start(self) -> None:
        self.name, self.ifindex = await asyncio.to_thread(
            node_setup.setup_tunnel_device, self.mode, self.port, self.mtu)


class NodeIpcacheEntries:
    """The node's own ipcache claims: router and node IP are the host, the rest the world."""

    def __init__(self, ipcache: IPCache, router_ip: IPv4Address, node_ip: IPv4Address) -> None:
        self.ipcache = ipcache
        self.router_ip, self.node_ip = router_ip, node_ip

    def write(self) -> None:
        self.ipcache.upsert(IPv4Network(f"{self.router_ip}/32"), reserved.HOST, Source.LOCAL)
        self.ipcache.upsert(IPv4Network(f"{self.node_ip}/32"), reserved.HOST, Source.LOCAL)
        self.ipcache.upsert(IPv4Network("0.0.0.0/0"), reserved.WORLD, Source.LOCAL)


class EventsPart:
    """The datapath's ring buffer -> monitor subscribers; the ring is opened on start."""

    def __init__(self, datapath) -> None:
        self.datapath = datapath
        self.hub: EventHub | None = None

    async def start(self) -> None:
        self.hub = EventHub(self.datapath.events())
        await self.hub.start()

    async def stop(self) -> None:
        if self.hub is not None:
            await self.hub.stop()


class MapRetrier:
    """Writes again, once their backoff expired, the map entries whose write failed
    (each owner: ``retry_due()`` and ``retry()``, e.g. IPCache, EndpointEntries)."""

    def __init__(self, owners: list[Any], interval: float = 1.0) -> None:
        self.owners, self.interval = owners, interval
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="map-retries")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def retry_due_now(self) -> int:
        """One pass (in the calling thread); returns how many owners were retried."""
        retried = 0
        for owner in self.owners:
            try:
                if owner.retry_due():
                    owner.retry()
                    retried += 1
            except Exception:  # noqa: BLE001 - counted in the owner's status; next pass retries
                log.warning("retrying the writes of %s failed", type(owner).__name__, exc_info=True)
        return retried

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await asyncio.to_thread(self.retry_due_now)


#: how long an agent stop may take before the agent exits anyway (stop_deadline)
STOP_DEADLINE_S = 20.0


@contextlib.contextmanager
def stop_deadline(seconds: float = STOP_DEADLINE_S):
    """A stop that hangs must not hold up the agent's restart (everything it keeps is in
    the pins and the kvstore): past the deadline, say where every thread is and exit."""

    def overdue() -> None:
        log.error("stopping took over %.0f s; exiting now (thread stacks follow)", seconds)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    timer = threading.Timer(seconds, overdue)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
