"""Who is on the other end: IP -> security identity, pluggable.

``DictIdentityResolver`` for tests (IPs or CIDRs, longest prefix wins); ``IpcacheIdentityResolver``
reads the pinned ``pilus_ipcache`` LPM map of a node (``/sys/fs/bpf/pilus/<node>/``) through
``pilus.datapath.maps`` as ``pilus bpf ipcache list`` does, so the proxy needs no agent.
An unknown address is ``world`` (2), as in the datapath.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from pilus.identity.reserved import WORLD

__all__ = ["DictIdentityResolver", "IdentityResolver", "IpcacheIdentityResolver"]


class IdentityResolver(Protocol):
    def resolve(self, ip: str) -> int: ...


class DictIdentityResolver:
    def __init__(self, table: Mapping[str, int], default: int = WORLD):
        self._nets = sorted(((ipaddress.ip_network(k, strict=False), v) for k, v in table.items()),
                            key=lambda t: -t[0].prefixlen)
        self.default = default

    def resolve(self, ip: str) -> int:
        addr = ipaddress.ip_address(ip)
        for net, ident in self._nets:
            if addr.version == net.version and addr in net:
                return ident
        return self.default


class IpcacheIdentityResolver:
    """Longest-prefix lookup in a pinned ipcache; the map is reopened after an error (agent
    restarts keep the pin, a node teardown removes it: then everything is world)."""

    def __init__(self, pin_dir: str | Path, default: int = WORLD):
        self.path = Path(pin_dir) / "pilus_ipcache"
        self.default = default
        self._map = None
        self._fd = -1
        self._lock = threading.Lock()

    def _open(self):
        from pilus.datapath.loader import obj_get
        from pilus.datapath.maps import IpcacheMap

        self._fd = obj_get(self.path)
        self._map = IpcacheMap(self._fd)
        return self._map

    def resolve(self, ip: str) -> int:
        from pilus.datapath import abi

        key = abi.IpcacheKey()  # a /32 key: the LPM trie answers with the longest prefix
        key.prefixlen = abi.IPCACHE_STATIC_PREFIX + 32
        key.family = abi.ENDPOINT_KEY_IPV4
        key.addr.ip4 = abi.ip4_to_raw(ipaddress.IPv4Address(ip))
        with self._lock:
            try:
                m = self._map or self._open()
                found = m.map.lookup(key)
            except OSError:
                self.close()
                return self.default
        return self.default if found is None else int(found.sec_identity)

    def close(self) -> None:
        from pilus.datapath.loader import close_fd

        if self._fd >= 0:
            with contextlib.suppress(OSError):
                close_fd(self._fd)
        self._fd, self._map = -1, None
