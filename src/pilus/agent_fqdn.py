"""The agent's ``fqdn`` row: the DNS proxy (in the agent, as Cilium's), the DNS cache, toFQDNs.

- Policy -> proxy: egress allow entries that ``rules.dns`` cover carry ``--tofqdns-proxy-port``
  (the datapath hands those UDP/TCP queries to the proxy); after every policy sync the
  endpoints' DNS rule sets (``PolicyEngine.proxy_rule_sets``, parser ``dns``) become the
  proxy's ``DNSPolicy``.
- Proxy -> policy: an allowed answer goes into the ``DNSCache`` (per endpoint, TTLs raised to
  ``--tofqdns-min-ttl``, at most ``--tofqdns-endpoint-max-ip-per-hostname`` IPs per name);
  then ``PolicySync.set_fqdn_names`` gives the IPs that toFQDNs selectors name their
  identities in the policy maps and the ipcache, and only then is the answer released to
  the pod, so its first connection to the address passes.
- Expiry: every second expired entries leave the cache; an IP that conntrack still shows in
  a live connection stays as a zombie until that connection ends (Cilium's deferred deletes).
- The cache is saved to ``<state-dir>/fqdn/cache.json`` and restored at start, so a
  restarted agent keeps allowing the addresses its pods already resolved.
- Records (``l7: "dns"``) become ``L7Event`` s on the event hub (monitor, Hubble).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pilus.agent_proxy import write_if_changed
from pilus.fqdn.cache import DNSCache
from pilus.fqdn.dnsproxy import DNSAnswer, DNSProxy
from pilus.fqdn.rules import DNSPolicy, DNSPolicyError
from pilus.identity.reserved import WORLD
from pilus.observer.l7 import L7Event

__all__ = ["AgentFQDN"]

log = logging.getLogger("pilus.agent.fqdn")

EXPIRE_INTERVAL_S = 1.0
SAVE_DELAY_S = 1.0
COALESCE_S = 0.05
REJECT_CODES = {"refused": "REFUSED", "nameError": "NXDOMAIN"}


class AgentFQDN:
    def __init__(self, *, state_dir: Path, policy, engine, ipcache, datapath, port: int, min_ttl: int = 0,
                 max_ips_per_host: int = 1000, reject_code: str = "refused",
                 hub: Callable[[], Any] = lambda: None) -> None:
        self.dir = Path(state_dir) / "fqdn"
        self.policy = policy  # PolicySync: its worker thread owns the engine
        self.engine = engine
        self.ipcache = ipcache
        self.datapath = datapath  # conntrack, for zombies
        self.port = port
        self.cache = DNSCache(min_ttl=min_ttl, max_ips_per_host=max_ips_per_host)
        self.proxy = DNSProxy(DNSPolicy(), self._identity, port=port, on_answer=self._on_answer,
                              sink=self._record, reject_rcode=REJECT_CODES[reject_code])
        self._hub = hub
        self.records_bad = 0
        self.last_error: str | None = None
        self._dirty = asyncio.Event()
        self._save = asyncio.Event()
        self._names_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    @classmethod
    def for_agent(cls, agent) -> AgentFQDN:
        cfg = agent.cfg
        return cls(state_dir=cfg.state_dir, policy=agent.policy, engine=agent.policy_engine,
                   ipcache=agent.ipcache, datapath=agent.datapath, port=cfg.tofqdns_proxy_port,
                   min_ttl=cfg.tofqdns_min_ttl, max_ips_per_host=cfg.tofqdns_endpoint_max_ip_per_hostname,
                   reject_code=cfg.tofqdns_dns_reject_response_code,
                   hub=lambda: agent.events)  # the events row starts later

    cache_path = property(lambda self: self.dir / "cache.json")

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._restore()
        port = self.port

        def set_port() -> None:
            self.engine.set_proxy_ports("dns", 0, port)  # DNS rules are egress only
            self.policy._sync_changed()

        await self._push_names()
        await self.policy._run(set_port)
        try:
            await self.proxy.start()
        except OSError as exc:  # fail closed and say so: DNS rules' queries then drop (178)
            self.last_error = f"the DNS proxy cannot listen on port {self.port}: {exc}"
            log.error("%s", self.last_error)
        self.policy.change_callbacks.append(self._policy_changed)
        self._dirty.set()
        self._tasks = [asyncio.create_task(self._run_refresh(), name="fqdn-policy"),
                       asyncio.create_task(self._run_expire(), name="fqdn-expire"),
                       asyncio.create_task(self._run_save(), name="fqdn-save")]

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.policy.change_callbacks.remove(self._policy_changed)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self.proxy.stop()
        self._write_cache()

    # -- policy -> proxy -------------------------------------------------------

    def _policy_changed(self) -> None:
        """PolicySync's change callback, on the policy worker thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._dirty.set)

    def _collect(self) -> list[dict]:
        """On the policy worker: every local endpoint's DNS rule sets, for the proxy."""
        out = []
        for ep_id, ep in sorted(self.policy.endpoints.items()):
            try:
                sets = self.engine.proxy_rule_sets(ep_id)
            except KeyError:
                continue
            for rs in sets:
                if rs.get("parser") == "dns":
                    out.append({"endpoint": ep_id, "endpoint_ips": [str(ep.ipv4)], "port": rs["port"],
                                "end_port": rs["end_port"], "peers": rs["peers"], "dns": rs["dns"]})
        return out

    async def refresh(self) -> None:
        sets = await self.policy._run(self._collect)
        try:
            self.proxy.set_policy(DNSPolicy.from_rule_sets(sets))
        except DNSPolicyError as exc:  # the engine's output is validated policy: a bug if seen
            self.last_error = f"DNS rules: {exc}"
            log.error("the DNS proxy refused its rules: %s", exc)

    async def _run_refresh(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(COALESCE_S)
            self._dirty.clear()
            try:
                await self.refresh()
            except Exception:
                log.exception("updating the DNS proxy's rules failed")

    def _identity(self, ip: str) -> int:
        entry = self.ipcache.lookup(IPv4Address(ip))
        return entry.identity if entry is not None else WORLD

    # -- proxy -> policy -------------------------------------------------------

    async def _on_answer(self, answer: DNSAnswer) -> None:
        """Before the pod gets the answer: its IPs reach the cache, the ipcache and the maps."""
        if answer.endpoint is None or answer.rcode != 0 or not answer.ips:
            return
        names = [answer.qname, *answer.cnames]  # a CNAME chain's addresses belong to every name on it
        changed = False
        for name in names:
            changed |= self.cache.update(answer.endpoint, name, list(answer.ips), answer.ttl, time.time())
        if changed:
            await self._push_names()
            self._save.set()

    async def _push_names(self) -> None:
        async with self._names_lock:  # answers and expiry must not reorder their snapshots
            await self.policy.set_fqdn_names(self._names())

    def _names(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = {}
        for entry in self.cache.dump():
            names.setdefault(entry["fqdn"], set()).update(entry["ips"])
        return names

    async def _run_expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            try:
                live: set[str] | None = None

                def in_use(ip: str) -> bool:
                    nonlocal live
                    if live is None:
                        live = self._live_ips()
                    return ip in live

                if self.cache.expire(time.time(), in_use):
                    await self._push_names()
                    self._save.set()
            except Exception:
                log.exception("expiring DNS cache entries failed")

    def _live_ips(self) -> set[str]:
        out: set[str] = set()
        for e in self.datapath.ct.items():
            if e["expires_in_s"] > 0:
                out.add(e["dst"])
                out.add(e["src"])
        return out

    # -- records, persistence, API -------------------------------------------

    def _record(self, rec: dict) -> None:
        try:
            event = L7Event.from_record(rec)
        except ValueError as exc:
            self.records_bad += 1
            log.warning("a DNS record does not parse: %s", exc)
            return
        hub = self._hub()
        if hub is not None:
            hub.publish(event)

    def _restore(self) -> None:
        try:
            text = self.cache_path.read_text()
        except FileNotFoundError:
            return
        try:
            self.cache = DNSCache.from_json(text, min_ttl=self.cache.min_ttl,
                                            max_ips_per_host=self.cache.max_ips_per_host)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("the saved DNS cache %s does not parse (%s): starting empty", self.cache_path, exc)

    def _write_cache(self) -> None:
        try:
            write_if_changed(self.cache_path, self.cache.to_json())
        except OSError as exc:
            log.warning("saving the DNS cache failed: %s", exc)

    async def _run_save(self) -> None:
        while True:
            await self._save.wait()
            await asyncio.sleep(SAVE_DELAY_S)
            self._save.clear()
            await asyncio.to_thread(self._write_cache)

    def names_for_ip(self, ip: str) -> list[str]:
        return self.cache.names_for_ip(ip)

    async def cache_list(self, endpoint: int | None = None, pattern: str | None = None) -> list[dict]:
        """The cache's rows; ``pattern``: a name or a matchPattern (ValueError when invalid)."""
        return self.cache.dump(endpoint=endpoint, pattern=pattern or None)

    async def cache_clean(self, endpoint: int | None = None) -> int:
        """Forget an endpoint's (or every) entry; the policy stops selecting their IPs."""
        rows = len(self.cache.dump(endpoint=endpoint))
        self.cache.clear(endpoint)
        await self._push_names()
        self._save.set()
        return rows

    def status(self) -> dict:
        out = {"state": "Failure" if self.last_error else "Ok", "port": self.port, "proxy": self.proxy.status(),
               "names": len(self._names()),
               "records_bad": self.records_bad}
        if self.last_error:
            out["last_error"] = self.last_error
        return out
