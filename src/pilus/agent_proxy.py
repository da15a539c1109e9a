"""The agent's ``proxy`` row: the L7 proxy's config from policy, its process, its records.

- Config: after every policy sync the rule sets of every local endpoint
  (``PolicyEngine.proxy_rule_sets``, HTTP and Kafka) become transparent listeners, HTTP
  ingress and egress (``--proxy-ingress-port`` / ``--proxy-egress-port``) and, when Kafka
  rules exist, Kafka ingress and egress (``--proxy-kafka-*-port``), written to
  ``<state-dir>/proxy/config.json`` (tmp + rename, only when it changed); the running proxy
  then reloads it (control command ``reload``). Secrets go to ``secrets.json`` (mode 0600).
- Process: ``python -m pilus.proxy`` in its own session, pid in ``proxy.pid``, so it
  outlives the agent (Cilium runs Envoy apart for the same reason: L7 traffic keeps
  flowing across an agent restart). A starting agent adopts a live proxy of this state dir
  (its /proc cmdline names our control socket and it answers ``status``); else it starts
  one once the first L7 rule set exists. A dead proxy is restarted with backoff (1 s .. 10 s).
  Agent stop leaves the proxy running; ``pilus cluster down`` kills every process of the
  node's namespace, and ``stop_proxy(state_dir)`` kills it by pid file.
- Records: the proxy writes JSON lines to ``<state-dir>/proxy/records.sock``; each becomes an
  ``L7Event`` on the EventHub; a line that does not parse is counted and skipped.

Nothing here may take the agent down: failures are logged and shown in ``status()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pilus.observer.l7 import L7Event
from pilus.proxy.control import control_request

log = logging.getLogger("pilus.agent.proxy")

INGRESS_PORT = 15001
EGRESS_PORT = 15002
KAFKA_INGRESS_PORT = 15003
KAFKA_EGRESS_PORT = 15004
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0  # a proxy that ran this long restarts after BACKOFF_MIN_S again
READY_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 5.0
COALESCE_S = 0.05  # policy syncs come in bursts (one per endpoint): one config write per burst
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class LocalEndpoint:
    """What the config needs of a local endpoint."""

    id: int
    name: str  # namespace/pod
    ipv4: str


#: the parsers this process serves (DNS is the agent's own proxy, agent_fqdn.py)
PARSERS = ("http", "kafka")
RULE_SET_FIELDS = ("endpoint", "port", "end_port", "peers")


def build_config(endpoint_rule_sets: Iterable[tuple[LocalEndpoint, list[dict]]],
                 ports: dict[str, int]) -> dict:
    """The proxy config (docs/l7.md): one transparent HTTP listener per direction and, when
    Kafka rules exist, one Kafka listener per direction, each with the rule sets of every
    local endpoint for it, bound to the endpoint's IPv4. ``ports``: ``ingress``, ``egress``
    (HTTP), ``kafka-ingress``, ``kafka-egress``."""
    rules: dict[tuple[str, str], list[dict]] = {(p, d): [] for p in PARSERS for d in ("ingress", "egress")}
    for ep, sets in sorted(endpoint_rule_sets, key=lambda item: item[0].id):
        for rs in sets:
            parser = rs.get("parser", "http")
            rule = {k: rs[k] for k in RULE_SET_FIELDS if k in rs}
            rule[parser] = rs.get(parser, [])
            rule["endpoint"] = ep.id
            rule["endpoint_ips"] = [ep.ipv4]  # a rule set never applies to another endpoint
            rules[(parser, "egress" if rs.get("egress") else "ingress")].append(rule)
    listeners = []
    for (parser, direction), sets in rules.items():
        if parser != "http" and not sets:
            continue  # the HTTP listeners always exist; others when their rules do
        port = ports[direction if parser == "http" else f"{parser}-{direction}"]
        listener = {"name": f"{direction}:{port}", "port": port, "address": "0.0.0.0",
                    "direction": direction, "transparent": True, "rules": sets}
        if parser != "http":
            listener["protocol"] = parser
        listeners.append(listener)
    return {"listeners": listeners}


def _port_text(rs: dict) -> int | str:
    port, end = rs.get("port"), rs.get("end_port")
    if not port:
        return "any"
    return f"{port}-{end}" if end and end != port else int(port)


def _port_order(port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(port.split("-")[0]) if port[0].isdigit() else -1  # "any" first


def redirects(endpoint_rule_sets: Iterable[tuple[LocalEndpoint, list[dict]]]) -> list[dict]:
    """Per endpoint with L7 rules: the ports redirected to the proxy, per direction."""
    out = []
    for ep, sets in sorted(endpoint_rule_sets, key=lambda item: item[0].id):
        if not sets:
            continue
        ports: dict[str, set] = {"ingress": set(), "egress": set()}
        for rs in sets:
            ports["egress" if rs.get("egress") else "ingress"].add(_port_text(rs))
        out.append({"endpoint": ep.id, "name": ep.name, **{d: sorted(p, key=_port_order) for d, p in ports.items()}})
    return out


def parse_record(line: bytes) -> L7Event:
    """One JSON line from the proxy -> an L7Event; ValueError when it is not one."""
    try:
        rec = json.loads(line)
        return L7Event.from_record(rec)
    except (TypeError, AttributeError) as exc:  # a shape from_record did not foresee
        raise ValueError(f"bad L7 record: {exc}") from None


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Atomically replace ``path`` with ``text`` (tmp + rename) unless it already holds it."""
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            if (path.stat().st_mode & 0o777) != mode:
                os.chmod(path, mode)
            return False
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # secrets never readable by others
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def is_our_proxy(pid: int, control: Path) -> bool:
    """Is ``pid`` a pilus proxy serving ``control`` (not a reused pid)?"""
    argv = _cmdline(pid)
    return "pilus.proxy" in argv and "--control" in argv and str(control) in argv


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def stop_proxy(state_dir: Path, grace: float = 5.0) -> int | None:
    """Kill the proxy of this state dir by its pid file (SIGTERM, SIGKILL after ``grace``);
    returns its pid, or None when none ran. For teardown outside ``pilus cluster down``."""
    pdir = Path(state_dir) / "proxy"
    pid = read_pid(pdir / "proxy.pid")
    if pid is None or not is_our_proxy(pid, pdir / "control.sock"):
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and is_our_proxy(pid, pdir / "control.sock"):
        time.sleep(0.05)
    if is_our_proxy(pid, pdir / "control.sock"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


class ProxyProcess:
    """One running proxy: started by us (``popen``) or adopted from an earlier agent run.
    Its end is seen through a pidfd, which also works for a process that is not our child."""

    def __init__(self, pid: int, popen: subprocess.Popen | None) -> None:
        self.pid = pid
        self.popen = popen
        self.started = time.time()
        self.since = time.monotonic()
        self.adopted = popen is None
        self._pidfd = os.pidfd_open(pid)  # ProcessLookupError: gone already
        self._gone = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)
        self.returncode: int | None = None

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        if self.popen is not None:
            self.returncode = self.popen.wait()  # reap: it has exited
        if not self._gone.done():
            self._gone.set_result(None)

    @property
    def running(self) -> bool:
        return not self._gone.done()

    async def wait(self) -> None:
        await asyncio.shield(self._gone)

    def close(self) -> None:
        """Stop watching (the process keeps running)."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._pidfd)
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        if not self._gone.done():
            self._gone.cancel()

    def describe_exit(self) -> str:
        if self.returncode is None:
            return "exited"
        if self.returncode < 0:
            return f"killed by signal {-self.returncode}"
        return f"exited with status {self.returncode}"


class RecordListener:
    """``records.sock``: JSON lines from the proxy (one connection at a time in practice,
    a new one after each proxy restart) -> ``hub.publish(L7Event)``."""

    def __init__(self, path: Path, hub: Callable[[], Any]) -> None:
        self.path = path
        self._hub = hub  # the EventHub once the events row runs
        self.received = 0
        self.bad = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_RECORD_BYTES)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()  # the proxy reconnects (every second) to the next agent's socket
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            # the events row starts after this one: leave records in the socket until then
            while (hub := self._hub()) is None:
                await asyncio.sleep(0.1)
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_RECORD_BYTES: readline dropped it
                    self._bad("a record over the size limit")
                    continue
                if not line:
                    return
                if not line.strip():
                    continue
                self.feed(line, hub)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def feed(self, line: bytes, hub) -> None:
        try:
            event = parse_record(line)
        except ValueError as exc:
            self._bad(str(exc))
            return
        self.received += 1
        try:
            hub.publish(event)
        except Exception:
            log.exception("publishing an L7 event failed")

    def _bad(self, why: str) -> None:
        self.bad += 1
        if self.bad <= 10 or self.bad % 1000 == 0:  # a broken proxy must not flood the log
            log.warning("skipped L7 record %d: %s", self.bad, why)

    def status(self) -> dict:
        return {"received": self.received, "bad": self.bad, "connections": self.connections}


class AgentProxy:
    """The row: keeps the proxy's config equal to the policy and its process running."""

    def __init__(self, *, state_dir: Path, policy, engine, ingress_port: int = INGRESS_PORT,
                 egress_port: int = EGRESS_PORT, kafka_ingress_port: int = KAFKA_INGRESS_PORT,
                 kafka_egress_port: int = KAFKA_EGRESS_PORT, ipcache_pin_dir: Path | None = None,
                 hub: Callable[[], Any] = lambda: None, secrets=None,
                 ready: Callable[[], bool] = lambda: True, python: str = sys.executable) -> None:
        self.dir = Path(state_dir) / "proxy"
        self.policy = policy  # PolicySync: its worker thread owns the engine
        self.engine = engine
        self.ports = {"ingress": ingress_port, "egress": egress_port,
                      "kafka-ingress": kafka_ingress_port, "kafka-egress": kafka_egress_port}
        self.ipcache_pin_dir = ipcache_pin_dir
        self.secrets = secrets  # SecretSync (values(), subscribe(fn)) or None
        self.python = python
        #: the local endpoints are restored: before that a config would lack their rule sets
        #: (and a running proxy would deny their traffic until the restore ends)
        self._ready = ready
        self.records = RecordListener(self.dir / "records.sock", hub)
        self.proc: ProxyProcess | None = None
        self.restarts = 0
        self.last_error: str | None = None
        self.generation: int | None = None  # the proxy's config generation after our last reload
        self._endpoints: list[tuple[LocalEndpoint, list[dict]]] = []
        self._wanted = asyncio.Event()  # a proxy should run (L7 rule sets exist, or one ran)
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._unsubscribe: Callable[[], None] | None = None

    @classmethod
    def for_agent(cls, agent) -> AgentProxy:
        cfg = agent.cfg
        return cls(state_dir=cfg.state_dir, policy=agent.policy, engine=agent.policy_engine,
                   ingress_port=cfg.proxy_ingress_port, egress_port=cfg.proxy_egress_port,
                   kafka_ingress_port=cfg.proxy_kafka_ingress_port, kafka_egress_port=cfg.proxy_kafka_egress_port,
                   ipcache_pin_dir=getattr(agent.datapath, "pin_root", None),
                   hub=lambda: agent.events,  # the events row starts later
                   ready=lambda: agent._endpoints_restored, secrets=agent.parts.get("secrets"))

    config_path = property(lambda self: self.dir / "config.json")
    secrets_path = property(lambda self: self.dir / "secrets.json")
    control_path = property(lambda self: self.dir / "control.sock")
    pid_path = property(lambda self: self.dir / "proxy.pid")
    log_path = property(lambda self: self.dir / "proxy.log")

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        ports = dict(self.ports)

        def set_ports() -> None:
            self.engine.set_proxy_ports("http", ports["ingress"], ports["egress"])
            self.engine.set_proxy_ports("kafka", ports["kafka-ingress"], ports["kafka-egress"])
            self.policy._sync_changed()  # entries an L7 rule covers now carry the port

        await self.policy._run(set_ports)
        await self.records.start()
        self.policy.change_callbacks.append(self._policy_changed)
        if self.secrets is not None:
            self._unsubscribe = self.secrets.subscribe(self._secrets_changed)
        await self._adopt()
        self._dirty.set()  # the first config once the endpoints are restored
        self._tasks = [asyncio.create_task(self._run_refresh(), name="proxy-config"),
                       asyncio.create_task(self._supervise(), name="proxy-supervisor")]

    async def stop(self) -> None:
        """Stop following policy and records; the proxy process keeps running."""
        with contextlib.suppress(ValueError):
            self.policy.change_callbacks.remove(self._policy_changed)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.proc is not None:
            self.proc.close()
        await self.records.stop()

    # -- config ----------------------------------------------------------------

    def _policy_changed(self) -> None:
        """PolicySync's change callback, on the policy worker thread."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._dirty.set)

    def _secrets_changed(self, *_args) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._dirty.set)

    def _collect(self) -> list[tuple[LocalEndpoint, list[dict]]]:
        """On the policy worker: every local endpoint's proxy rule sets."""
        out = []
        for ep_id, ep in sorted(self.policy.endpoints.items()):
            try:
                sets = [rs for rs in self.engine.proxy_rule_sets(ep_id) if rs.get("parser", "http") in PARSERS]
            except KeyError:  # removed meanwhile
                continue
            if sets:
                out.append((LocalEndpoint(ep_id, ep.name, str(ep.ipv4)), [dict(s) for s in sets]))
        return out

    async def _write_files(self) -> bool:
        """Write config and secrets from the current policy; True when either changed."""
        self._endpoints = await self.policy._run(self._collect)
        config = build_config(self._endpoints, self.ports)
        changed = await asyncio.to_thread(write_if_changed, self.config_path,
                                          json.dumps(config, indent=1, sort_keys=True) + "\n")
        values = dict(self.secrets.values()) if self.secrets is not None else {}
        changed |= await asyncio.to_thread(write_if_changed, self.secrets_path,
                                           json.dumps(values, sort_keys=True), 0o600)
        if self._endpoints:
            self._wanted.set()
        return changed

    async def refresh(self) -> None:
        """Policy or secrets changed: rewrite the files and reload a running proxy."""
        async with self._lock:
            changed = await self._write_files()
            if changed and self.proc is not None and self.proc.running:
                await self._reload()

    async def _reload(self) -> None:
        try:
            answer = await asyncio.to_thread(control_request, self.control_path, "reload", CONTROL_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            self._fail(f"reload: the proxy's control socket did not answer: {exc}")
            return
        if not answer.get("ok"):
            self._fail(f"reload refused by the proxy: {answer.get('error')}")
            return
        self.generation = answer.get("generation")
        self.last_error = None

    async def _run_refresh(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(COALESCE_S)
            while not self._ready():
                await asyncio.sleep(0.1)
            self._dirty.clear()
            try:
                await self.refresh()
            except Exception as exc:
                self._fail(f"writing the proxy config failed: {exc}")
                log.exception("writing the proxy config failed")
                await asyncio.sleep(1)
                self._dirty.set()

    def _fail(self, message: str) -> None:
        self.last_error = message
        log.error("%s", message)

    # -- process ---------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [self.python, "-m", "pilus.proxy", "--config", str(self.config_path),
                "--control", str(self.control_path), "--secrets", str(self.secrets_path),
                "--records", f"unix:{self.records.path}"]
        if self.ipcache_pin_dir is not None:
            argv += ["--ipcache-pin-dir", str(self.ipcache_pin_dir)]
        return argv

    async def _adopt(self) -> None:
        """A proxy of an earlier agent run that still serves: keep it, with the new config."""
        pid = read_pid(self.pid_path)
        if pid is None or not is_our_proxy(pid, self.control_path):
            return
        try:
            answer = await asyncio.to_thread(control_request, self.control_path, "status", CONTROL_TIMEOUT_S)
            if not answer.get("ok"):
                raise ValueError(answer.get("error"))
            self.proc = ProxyProcess(pid, None)
        except (OSError, ValueError) as exc:
            log.warning("proxy pid %d does not answer on %s (%s): starting a new one", pid, self.control_path, exc)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # it would hold the listeners' ports
            return
        # it keeps its config (the same, unless policy changed while no agent ran) until the
        # first refresh after the endpoint restore, which reloads it only if the file changed
        log.info("adopted the running L7 proxy, pid %d", pid)
        self.generation = answer.get("generation")
        self._wanted.set()

    async def _spawn(self) -> None:
        """Start a proxy and wait until it serves (its control socket answers)."""
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()  # an old socket must not look like the new proxy
        with self.log_path.open("ab") as out:
            popen = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True, close_fds=True)
        proc = ProxyProcess(popen.pid, popen)
        write_if_changed(self.pid_path, f"{popen.pid}\n")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not proc.running:
                raise RuntimeError(f"proxy pid {popen.pid} {proc.describe_exit()} before it was ready "
                                   f"(see {self.log_path}): {self._log_tail()}")
            try:
                answer = await asyncio.to_thread(control_request, self.control_path, "status", 1.0)
                if answer.get("ok"):
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(popen.pid, signal.SIGKILL)
                raise RuntimeError(f"proxy pid {popen.pid} was not ready after {READY_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)
        self.proc = proc
        self.generation = answer.get("generation")
        self.last_error = None
        log.info("L7 proxy started, pid %d", popen.pid)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    async def _supervise(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            await self._wanted.wait()
            if self.proc is None or not self.proc.running:
                while not self._ready():  # its first config must hold every endpoint's rules
                    await asyncio.sleep(0.1)
                try:
                    async with self._lock:
                        await self._write_files()  # start with the current policy
                        await self._spawn()
                except Exception as exc:
                    self._fail(f"starting the L7 proxy failed: {exc}")
                    self.restarts += 1
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
                    continue
            proc = self.proc
            assert proc is not None
            await proc.wait()
            self._fail(f"L7 proxy pid {proc.pid} {proc.describe_exit()}; restarting in {backoff:.0f} s")
            self.restarts += 1
            if time.monotonic() - proc.since > STABLE_S:
                backoff = BACKOFF_MIN_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    # -- views -----------------------------------------------------------------

    def process_status(self) -> dict:
        p = self.proc
        return {"pid": p.pid if p else None, "running": bool(p and p.running), "restarts": self.restarts,
                "started": p.started if p else None, "adopted": bool(p and p.adopted)}

    def redirects(self) -> list[dict]:
        return redirects(self._endpoints)

    def summary(self) -> dict:
        """For GET /v1/healthz (no call to the proxy: health checks stay cheap)."""
        running = bool(self.proc and self.proc.running)
        wanted = self._wanted.is_set()
        state = "Ok" if running or not wanted else "Failure"
        out = {"state": state, "ports": dict(self.ports), "process": self.process_status(),
               "listeners": 2 if running else 0,
               "redirects": sum(len(r["ingress"]) + len(r["egress"]) for r in self.redirects()),
               "records": self.records.status()}
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    async def status(self) -> dict:
        """GET /v1/proxy: ports, process, the proxy's own counters, redirects per endpoint."""
        out: dict[str, Any] = {"ports": dict(self.ports), "process": self.process_status(),
                               "generation": self.generation, "listeners": [],
                               "redirects": self.redirects(), "records": self.records.status(),
                               "config": str(self.config_path)}
        if self.proc is not None and self.proc.running:
            try:
                answer = await asyncio.to_thread(control_request, self.control_path, "status", CONTROL_TIMEOUT_S)
                out["generation"] = answer.get("generation")
                out["listeners"] = answer.get("listeners", [])
                out["records_dropped"] = answer.get("records_dropped", 0)
            except (OSError, ValueError) as exc:
                out["error"] = f"the proxy's control socket did not answer: {exc}"
        if self.last_error:
            out["last_error"] = self.last_error
        return out
