"""Host-scope IPAM: hand out pod addresses from the node's pod CIDR.

The network and broadcast addresses (for prefixes shorter than /31) and the
``reserved`` addresses (the router IP) are never handed out. ``allocate`` gives
the lowest free address; ``allocate_specific`` restores an address after an
agent restart. The allocator is in-memory: the endpoint state on disk is the
truth and is replayed through ``allocate_specific`` at start.

IPv4 only for now; the shape (``family``, generic address types) is ready for
an IPv6 allocator next to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

__all__ = ["HostScopeIPAM", "IPAMError", "IPAMExhausted"]


class IPAMError(Exception):
    """IPAM refused a request; the message is one line meant for a user."""


class IPAMExhausted(IPAMError):
    """No free address is left in the pod CIDR."""


class HostScopeIPAM:
    family = 4

    def __init__(self, cidr: IPv4Network | str, reserved: Iterable[IPv4Address | str] = ()) -> None:
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise IPAMError(f"pod CIDR {cidr}: {e}") from None
        if net.version != 4:
            raise IPAMError(f"pod CIDR {net}: IPv6 pod CIDRs are not supported yet")
        self.cidr: IPv4Network = net
        base, size = int(net.network_address), net.num_addresses
        if net.prefixlen < 31:
            self._lo, self._hi = base + 1, base + size - 2  # skip network and broadcast
        else:
            self._lo, self._hi = base, base + size - 1  # RFC 3021 /31, single /32
        self._reserved: set[int] = set()
        for r in reserved:
            ip = self._parse(r)
            if int(ip) not in self.cidr_range():
                raise IPAMError(f"reserved address {ip} is not in pod CIDR {self.cidr}")
            self._reserved.add(int(ip))
        self._owners: dict[int, str] = {}
        self._hint = self._lo  # every address below the hint is taken or reserved
        self._total = self._hi - self._lo + 1 - len([r for r in self._reserved if self._lo <= r <= self._hi])

    # ------------------------------------------------------------------ helpers

    def cidr_range(self) -> range:
        return range(int(self.cidr.network_address), int(self.cidr.broadcast_address) + 1)

    @staticmethod
    def _parse(ip: IPv4Address | str) -> IPv4Address:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise IPAMError(f"{ip!r} is not an IP address") from None
        if addr.version != 4:
            raise IPAMError(f"{addr} is not an IPv4 address")
        return addr

    def _check_usable(self, ip: IPv4Address) -> int:
        n = int(ip)
        if n not in self.cidr_range():
            raise IPAMError(f"{ip} is not in pod CIDR {self.cidr}")
        if n in self._reserved:
            raise IPAMError(f"{ip} is reserved in pod CIDR {self.cidr} (router address)")
        if n < self._lo:
            raise IPAMError(f"{ip} is the network address of pod CIDR {self.cidr}")
        if n > self._hi:
            raise IPAMError(f"{ip} is the broadcast address of pod CIDR {self.cidr}")
        return n

    @staticmethod
    def _check_owner(owner: str) -> None:
        if not isinstance(owner, str) or not owner:
            raise IPAMError(f"owner must be a non-empty string, got {owner!r}")

    # ------------------------------------------------------------------ API

    def allocate(self, owner: str) -> IPv4Address:
        """The lowest free address, now owned by ``owner``."""
        self._check_owner(owner)
        n = self._hint
        while n <= self._hi and (n in self._owners or n in self._reserved):
            n += 1
        if n > self._hi:
            self._hint = n
            used = len(self._owners)
            raise IPAMExhausted(
                f"pod CIDR {self.cidr} is exhausted ({used} of {self._total} addresses in use): "
                "delete endpoints or start the node with a larger --pod-cidr"
            )
        self._owners[n] = owner
        self._hint = n + 1
        return IPv4Address(n)

    def allocate_specific(self, ip: IPv4Address | str, owner: str) -> IPv4Address:
        """Take ``ip`` for ``owner`` (restore after restart). Idempotent for the same owner."""
        self._check_owner(owner)
        addr = self._parse(ip)
        n = self._check_usable(addr)
        current = self._owners.get(n)
        if current is not None and current != owner:
            raise IPAMError(f"{addr} is already allocated to {current}")
        self._owners[n] = owner
        return addr

    def release(self, ip: IPv4Address | str) -> bool:
        """Free ``ip``; False if it was not allocated (so CNI DEL can repeat)."""
        addr = self._parse(ip)
        n = int(addr)
        if n not in self.cidr_range():
            raise IPAMError(f"{addr} is not in pod CIDR {self.cidr}")
        if self._owners.pop(n, None) is None:
            return False
        self._hint = min(self._hint, n)
        return True

    def release_owner(self, owner: str) -> list[IPv4Address]:
        """Free every address of ``owner``; returns them."""
        mine = [n for n, o in self._owners.items() if o == owner]
        for n in mine:
            del self._owners[n]
            self._hint = min(self._hint, n)
        return [IPv4Address(n) for n in sorted(mine)]

    def owner_of(self, ip: IPv4Address | str) -> str | None:
        return self._owners.get(int(self._parse(ip)))

    def is_allocated(self, ip: IPv4Address | str) -> bool:
        return int(self._parse(ip)) in self._owners

    def allocations(self) -> dict[IPv4Address, str]:
        return {IPv4Address(n): o for n, o in sorted(self._owners.items())}

    @property
    def reserved(self) -> list[IPv4Address]:
        return [IPv4Address(n) for n in sorted(self._reserved)]

    def stats(self) -> dict:
        used = len(self._owners)
        return {
            "family": f"ipv{self.family}",
            "cidr": str(self.cidr),
            "allocated": used,
            "available": self._total - used,
            "total": self._total,
        }

    def __repr__(self) -> str:
        return f"HostScopeIPAM({str(self.cidr)!r}, allocated={len(self._owners)}/{self._total})"
