"""The FQDN cache (Cilium's per-endpoint DNSCache + DNSZombieMappings): which IPs each
endpoint learnt for each name through the DNS proxy, until the answer's TTL ends.

- ``update`` stores (endpoint, name, ip) with expiry ``now + max(ttl, min_ttl)``
  (``min_ttl``: Cilium's ``--tofqdns-min-ttl``; 0, the current default, honours the answer).
  A name keeps at most ``max_ips_per_host`` IPs per endpoint (Cilium's
  ``--tofqdns-endpoint-max-ip-per-hostname``, default 1000 since Cilium 1.15; it was 50):
  beyond it the IPs that expire first are evicted.
- Expired or evicted IPs become zombies (``"source": "connection"`` in ``dump``): ``expire``
  keeps them while ``in_use(ip)`` says conntrack still has a connection to them, and
  releases them once not. At most ``max_zombies`` (Cilium's
  ``--tofqdns-max-deferred-connection-deletes``, 10000) are kept; the oldest go first.
- Selectors see live IPs and zombies (``ips_matching``): dropping a zombie's IP from policy
  would cut the connection that keeps it alive.

Times are seconds since the epoch (``time.time()``). Thread-safe: the agent's policy worker
and its event loop both read it.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .matchpattern import NameMatcher, normalize

__all__ = ["DEFAULT_MAX_IPS_PER_HOST", "DEFAULT_MAX_ZOMBIES", "DNSCache", "rfc3339"]

DEFAULT_MAX_IPS_PER_HOST = 1000
DEFAULT_MAX_ZOMBIES = 10000


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class _Entry:
    lookup_time: float
    ttl: int
    expires: float


@dataclass
class _Zombie:
    names: set[str]
    lookup_time: float
    ttl: int
    expires: float


class DNSCache:
    def __init__(self, *, min_ttl: int = 0, max_ips_per_host: int = DEFAULT_MAX_IPS_PER_HOST,
                 max_zombies: int = DEFAULT_MAX_ZOMBIES):
        if min_ttl < 0 or max_ips_per_host < 1 or max_zombies < 0:
            raise ValueError("min_ttl >= 0, max_ips_per_host >= 1 and max_zombies >= 0 are required")
        self.min_ttl = min_ttl
        self.max_ips_per_host = max_ips_per_host
        self.max_zombies = max_zombies
        self._lock = threading.Lock()
        self._live: dict[int, dict[str, dict[str, _Entry]]] = {}  # endpoint -> name -> ip -> entry
        self._zombies: dict[int, dict[str, _Zombie]] = {}  # endpoint -> ip -> zombie

    # --- writes ------------------------------------------------------------------------------

    def update(self, endpoint: int, name: str, ips: Iterable[str], ttl: int, now: float) -> bool:
        """Record an answer. True when the name gained an IP for this endpoint (policy that
        selects the name must be recomputed); a refreshed expiry alone is False."""
        name = normalize(name)
        ips = [str(ipaddress.ip_address(ip)) for ip in ips]
        ttl = max(int(ttl), self.min_ttl)
        changed = False
        with self._lock:
            by_ip = self._live.setdefault(endpoint, {}).setdefault(name, {})
            zombies = self._zombies.get(endpoint, {})
            for ip in ips:
                old = by_ip.get(ip)
                if old is None:
                    z = zombies.get(ip)
                    changed |= z is None or name not in z.names
                    if z is not None:  # alive again under a fresh lookup
                        z.names.discard(name)
                        if not z.names:
                            del zombies[ip]
                if old is None or now + ttl >= old.expires:
                    by_ip[ip] = _Entry(now, ttl, now + ttl)
            if len(by_ip) > self.max_ips_per_host:
                victims = sorted(by_ip.items(), key=lambda kv: (kv[1].expires, kv[0]))
                for ip, e in victims[: len(by_ip) - self.max_ips_per_host]:
                    del by_ip[ip]
                    self._bury(endpoint, name, ip, e)
            if not by_ip:
                del self._live[endpoint][name]
        return changed

    def _bury(self, endpoint: int, name: str, ip: str, e: _Entry) -> None:
        z = self._zombies.setdefault(endpoint, {}).get(ip)
        if z is None:
            self._zombies[endpoint][ip] = _Zombie({name}, e.lookup_time, e.ttl, e.expires)
        else:
            z.names.add(name)
            if e.expires > z.expires:
                z.lookup_time, z.ttl, z.expires = e.lookup_time, e.ttl, e.expires

    def expire(self, now: float, in_use: Callable[[str], bool]) -> set[str]:
        """Expired entries become zombies; zombies whose IP has no connection (``in_use``)
        go. Returns the IPs nothing holds any more (no endpoint's entry, no zombie)."""
        with self._lock:
            gone: set[str] = set()
            for endpoint, names in self._live.items():
                for name, by_ip in list(names.items()):
                    for ip, e in list(by_ip.items()):
                        if e.expires <= now:
                            del by_ip[ip]
                            self._bury(endpoint, name, ip, e)
                    if not by_ip:
                        del names[name]
            verdicts: dict[str, bool] = {}
            for zs in self._zombies.values():
                for ip in list(zs):
                    if ip not in verdicts:
                        verdicts[ip] = bool(in_use(ip))
                    if not verdicts[ip]:
                        del zs[ip]
                        gone.add(ip)
            excess = sum(len(zs) for zs in self._zombies.values()) - self.max_zombies
            if excess > 0:
                oldest = sorted(((z.expires, ep, ip) for ep, zs in self._zombies.items() for ip, z in zs.items()))
                for _, ep, ip in oldest[:excess]:
                    del self._zombies[ep][ip]
                    gone.add(ip)
            self._prune()
            return gone - self._held()

    def clear(self, endpoint: int | None = None) -> set[str]:
        """Forget an endpoint's entries and zombies (all endpoints: None); the IPs nothing
        holds any more are returned."""
        with self._lock:
            eps = list(self._live.keys() | self._zombies.keys()) if endpoint is None else [endpoint]
            dropped: set[str] = set()
            for ep in eps:
                for by_ip in self._live.pop(ep, {}).values():
                    dropped.update(by_ip)
                dropped.update(self._zombies.pop(ep, {}))
            return dropped - self._held()

    def _prune(self) -> None:
        for d in (self._live, self._zombies):
            for ep in [ep for ep, v in d.items() if not v]:
                del d[ep]

    def _held(self) -> set[str]:
        held = {ip for names in self._live.values() for by_ip in names.values() for ip in by_ip}
        return held | {ip for zs in self._zombies.values() for ip in zs}

    # --- reads -------------------------------------------------------------------------------

    def ips_matching(self, matcher: NameMatcher) -> set[str]:
        """Every IP (live or zombie, any endpoint) learnt for a name ``matcher`` selects."""
        with self._lock:
            out = {ip for names in self._live.values() for name, by_ip in names.items() if matcher.matches(name)
                   for ip in by_ip}
            out.update(ip for zs in self._zombies.values() for ip, z in zs.items()
                       if any(matcher.matches(n) for n in z.names))
            return out

    def names_for_ip(self, ip: str) -> list[str]:
        """The names an IP was learnt for (Hubble's destination_names), sorted."""
        with self._lock:
            out = {name for names in self._live.values() for name, by_ip in names.items() if ip in by_ip}
            out.update(n for zs in self._zombies.values() if ip in zs for n in zs[ip].names)
            return sorted(out)

    def lookup(self, endpoint: int, name: str) -> set[str]:
        """The live IPs of one name for one endpoint."""
        with self._lock:
            return set(self._live.get(endpoint, {}).get(normalize(name), {}))

    def dump(self, endpoint: int | None = None, name: str | None = None,
             pattern: str | None = None) -> list[dict[str, Any]]:
        """``pilus fqdn cache list`` / ``GET /v1/fqdn/cache``: one row per (endpoint, name,
        lookup) with its IPs; zombies as ``"source": "connection"``. ``name``: that name only;
        ``pattern``: a matchPattern (ValueError when invalid), as ``--matchpattern``."""
        want = None if name is None else normalize(name)
        sel = None if pattern is None else NameMatcher(patterns=[pattern])
        rows: dict[tuple, set[str]] = {}
        with self._lock:
            for ep, names in self._live.items():
                for n, by_ip in names.items():
                    for ip, e in by_ip.items():
                        rows.setdefault((ep, n, e.lookup_time, e.ttl, e.expires, "lookup"), set()).add(ip)
            for ep, zs in self._zombies.items():
                for ip, z in zs.items():
                    for n in z.names:
                        rows.setdefault((ep, n, z.lookup_time, z.ttl, z.expires, "connection"), set()).add(ip)
        out = []
        for (ep, n, looked, ttl, expires, source), ips in sorted(rows.items(), key=lambda kv: kv[0][:3] + kv[0][5:]):
            if ((endpoint is None or ep == endpoint) and (want is None or n == want)
                    and (sel is None or sel.matches(n))):
                out.append({"endpoint": ep, "fqdn": n, "ips": sorted(ips, key=ipaddress.ip_address), "ttl": ttl,
                            "lookup_time": rfc3339(looked), "expiration_time": rfc3339(expires), "source": source})
        return out

    # --- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        with self._lock:
            live = [[ep, n, ip, e.lookup_time, e.ttl, e.expires] for ep, names in self._live.items()
                    for n, by_ip in names.items() for ip, e in by_ip.items()]
            zombies = [[ep, ip, sorted(z.names), z.lookup_time, z.ttl, z.expires] for ep, zs in self._zombies.items()
                       for ip, z in zs.items()]
        return json.dumps({"version": 1, "entries": live, "zombies": zombies}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | dict, **settings: Any) -> DNSCache:
        """A cache from ``to_json``'s output (``settings``: the constructor's). ValueError
        naming the field when it is not that."""
        try:
            data = json.loads(text) if isinstance(text, (str, bytes)) else text
        except json.JSONDecodeError as e:
            raise ValueError(f"fqdn cache: not JSON: {e}") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("fqdn cache: must be an object with version 1")
        cache = cls(**settings)
        for key, n in (("entries", 6), ("zombies", 6)):
            rows = data.get(key, [])
            if not isinstance(rows, list):
                raise ValueError(f"fqdn cache.{key}: must be a list")
            for i, row in enumerate(rows):
                try:
                    if not isinstance(row, list) or len(row) != n:
                        raise ValueError(f"must be a list of {n} items")
                    cache._restore(key, row)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"fqdn cache.{key}[{i}]: {e}") from None
        return cache

    def _restore(self, key: str, row: list) -> None:
        ep, a, b, looked, ttl, expires = row
        if not isinstance(ep, int) or isinstance(ep, bool) or not isinstance(ttl, int):
            raise ValueError("endpoint and ttl must be integers")
        looked, expires = float(looked), float(expires)
        if key == "entries":
            name, ip = normalize(str(a)), str(ipaddress.ip_address(b))
            self._live.setdefault(ep, {}).setdefault(name, {})[ip] = _Entry(looked, ttl, expires)
        else:
            ip = str(ipaddress.ip_address(a))
            if not isinstance(b, list) or not b:
                raise ValueError("zombie names must be a non-empty list")
            self._zombies.setdefault(ep, {})[ip] = _Zombie({normalize(str(x)) for x in b}, looked, ttl, expires)
