"""The cluster supervisor: keeps one agent running per node (like a DaemonSet).

    python -m pilus.cluster.supervisor --cluster <name> --state-root <root>

Reads ``<root>/<name>/cluster.json``, starts every node's agent inside the node's
network namespace with its output appended to ``<state_dir>/agent.log``, restarts
an agent that exits (after 1 s, doubling up to 5 s while it keeps failing fast),
records what it does in ``<root>/<name>/supervisor.json`` and on SIGTERM/SIGINT
stops the agents (SIGTERM, SIGKILL after 5 s) and exits. It also exits when the
cluster directory disappears.

With ``"kvstore": "etcd"`` it also runs the cluster's etcd (output in
``<root>/<name>/etcd.log``), restarted like an agent; the agents are started only
once etcd answers GET /health, and stopped before it.

It also runs the cluster's Hubble Relay (pilus.hubble.relay, on ``relay_address`` of
cluster.json, output in ``relay.log``), restarted like an agent and stopped with them.

How an agent enters its node: ``nsenter --net=/run/netns/<netns> -- <agent argv>``
(the network namespace only). `ip netns exec` would also put the agent in a
private mount namespace with a fresh /sys, where the machine's bpffs
(/sys/fs/bpf) is not mounted, so the agent's pins would neither be visible to the
machine nor survive an agent restart. Set ``PILUS_AGENT_EXEC=ip-netns-exec`` to
use `ip netns exec` anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pilus.cluster.plan import agent_argv, etcd_argv, prometheus_argv, relay_argv

RESTART_MIN_S = 1.0
RESTART_MAX_S = 5.0
HEALTHY_AFTER_S = 10.0  # an agent that ran this long resets the backoff
STOP_GRACE_S = 5.0

_PR_SET_PDEATHSIG = 1


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor[{os.getpid()}]: {msg}", flush=True)


def netns_exec_prefix(netns: str) -> list[str]:
    mode = os.environ.get("PILUS_AGENT_EXEC", "nsenter")
    if mode == "ip-netns-exec" or not shutil.which("nsenter"):
        return ["ip", "netns", "exec", netns]
    return ["nsenter", f"--net=/run/netns/{netns}", "--"]


def _die_with_parent() -> None:
    # the agent gets SIGTERM if the supervisor dies (no orphans holding agent.lock)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ChildProc:
    """One supervised process: started, restarted with backoff when it exits, stopped."""

    what = "process"

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.fast_failures = 0
        self.next_start = 0.0
        self.last_exit: int | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with open(self.log_path, "ab") as log:
            log.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: starting {self.what} "
                f"(start #{self.restarts + 1}): {' '.join(argv)}\n".encode()
            )
            log.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                preexec_fn=_die_with_parent,
            )
        self.started = time.monotonic()
        _log(f"{self.name}: {self.what} started, pid {self.proc.pid}")

    def poll(self, now: float) -> bool:
        """Reap/restart; True when something changed."""
        if self.proc is None:
            if now >= self.next_start:
                self.start()
                return True
            return False
        rc = self.proc.poll()
        if rc is None:
            return False
        ran = now - self.started
        self.last_exit = rc
        self.proc = None
        self.restarts += 1
        if ran >= HEALTHY_AFTER_S:
            self.fast_failures = 0
        delay = min(RESTART_MIN_S * (2**self.fast_failures), RESTART_MAX_S)
        self.fast_failures += 1
        self.next_start = now + delay
        _log(
            f"{self.name}: {self.what} exited with {rc} after {ran:.1f} s; "
            f"restarting in {delay:.0f} s"
        )
        return True

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.proc.pid if self.proc is not None else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


class AgentProc(ChildProc):
    what = "agent"

    def __init__(self, doc: dict[str, Any], node: dict[str, Any]) -> None:
        super().__init__(f"node {node['name']}", Path(node["state_dir"]) / "agent.log")
        self.doc = doc
        self.node = node

    def argv(self) -> list[str]:
        return netns_exec_prefix(self.node["netns"]) + agent_argv(
            self.doc, self.node, sys.executable
        )


class EtcdProc(ChildProc):
    """The cluster's etcd, in the machine's namespace on the bridge address."""

    what = "etcd"

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__(f"cluster {doc['name']}", Path(doc["etcd"]["log"]))
        self.doc = doc
        self.address = doc["kvstore_address"]

    def argv(self) -> list[str]:
        return etcd_argv(self.doc)

    def healthy(self) -> bool:
        return self.running() and etcd_healthy(self.address, timeout=0.5)


class RelayProc(ChildProc):
    """The cluster's Hubble Relay, in the machine's namespace on ``doc["relay_address"]``
    (output in ``doc["relay_log"]``); started with the agents, stopped with them."""

    what = "relay"

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__(f"cluster {doc['name']}", Path(doc.get("relay_log") or
                                                        Path(doc["state_root"]) / doc["name"] / "relay.log"))
        self.doc = doc

    def argv(self) -> list[str]:
        return relay_argv(self.doc, sys.executable)


class PrometheusProc(ChildProc):
    """The cluster's prometheus (``pilus cluster up --prometheus``), on the bridge address."""

    what = "prometheus"

    def __init__(self, doc: dict[str, Any]) -> None:
        super().__init__(f"cluster {doc['name']}", Path(doc["prometheus"]["log"]))
        self.doc = doc

    def argv(self) -> list[str]:
        return prometheus_argv(self.doc)


def etcd_healthy(address: str, timeout: float = 2.0) -> bool:
    """etcd's GET /health says {"health":"true"}."""
    try:
        with urllib.request.urlopen(address + "/health", timeout=timeout) as resp:
            return json.loads(resp.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


class Supervisor:
    def __init__(self, cluster: str, state_root: Path) -> None:
        self.cluster = cluster
        self.cdir = Path(state_root) / cluster
        self.stopping = False
        doc = json.loads((self.cdir / "cluster.json").read_text())
        self.agents = [AgentProc(doc, n) for n in doc["nodes"]]
        self._doc_mtime = (self.cdir / "cluster.json").stat().st_mtime_ns
        self.etcd = EtcdProc(doc) if doc.get("kvstore") == "etcd" else None
        self.relay = RelayProc(doc) if doc.get("relay_address") else None
        self.prometheus = PrometheusProc(doc) if doc.get("prometheus") else None
        # agents start once the kvstore answers (they would fail fast without it)
        self.kvstore_ready = self.etcd is None

    def write_status(self) -> None:
        data: dict[str, Any] = {
            "pid": os.getpid(),
            "cluster": self.cluster,
            "agents": {a.node["name"]: a.status() for a in self.agents},
        }
        if self.etcd is not None:
            data["etcd"] = dict(self.etcd.status(), ready=self.kvstore_ready)
        if self.relay is not None:
            data["relay"] = dict(self.relay.status(), address=self.relay.doc["relay_address"])
        if self.prometheus is not None:
            data["prometheus"] = dict(self.prometheus.status(), address=self.prometheus.doc["prometheus"]["address"])
        tmp = self.cdir / "supervisor.json.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.cdir / "supervisor.json")

    def _drop_removed_nodes(self) -> None:
        """`pilus cluster node remove` rewrote cluster.json: stop the agents it no longer lists."""
        try:
            mtime = (self.cdir / "cluster.json").stat().st_mtime_ns
            if mtime == self._doc_mtime:
                return
            self._doc_mtime = mtime
            names = {n["name"] for n in json.loads((self.cdir / "cluster.json").read_text())["nodes"]}
        except (OSError, ValueError, KeyError):
            return  # being rewritten: read it again next time
        gone = [a for a in self.agents if a.node["name"] not in names]
        if gone:
            _log(f"node(s) {', '.join(a.node['name'] for a in gone)} removed from the cluster: stopping")
            self.agents = [a for a in self.agents if a not in gone]
            self.stop_children(gone)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True

    def _step(self, now: float) -> bool:
        changed = False
        if self.etcd is not None:
            changed |= self.etcd.poll(now)
            if not self.kvstore_ready and self.etcd.healthy():
                self.kvstore_ready = changed = True
                _log(f"etcd at {self.etcd.address} is healthy: starting the agents")
        if self.kvstore_ready:
            for a in self.agents:
                changed |= a.poll(now)
            if self.relay is not None:
                changed |= self.relay.poll(now)
            if self.prometheus is not None:
                changed |= self.prometheus.poll(now)
        return changed

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        (self.cdir / "supervisor.pid").write_text(f"{os.getpid()}\n")
        _log(f"cluster {self.cluster}: supervising {len(self.agents)} agent(s)"
             + (" and etcd" if self.etcd is not None else ""))
        self.write_status()
        while not self.stopping:
            if not (self.cdir / "cluster.json").exists():
                _log("cluster.json is gone: stopping")
                break
            self._drop_removed_nodes()
            if self._step(time.monotonic()):
                self.write_status()
            time.sleep(0.1)
        self.stop_children(self.agents + [c for c in (self.relay, self.prometheus) if c is not None])
        if self.etcd is not None:
            self.stop_children([self.etcd])  # after the agents: they revoke leases on the way out
        with contextlib.suppress(OSError):
            (self.cdir / "supervisor.pid").unlink()
        _log("exit")
        return 0

    def stop_children(self, children: list[ChildProc]) -> None:
        for c in children:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(c.running() for c in children):
            time.sleep(0.05)
        for c in children:
            if c.running():
                _log(f"{c.name}: {c.what} did not stop in {STOP_GRACE_S:.0f} s, killing")
                c.signal(signal.SIGKILL)
                c.proc.wait()
            elif c.proc is not None:
                _log(f"{c.name}: {c.what} stopped ({c.proc.returncode})")
            c.proc = None
        self.write_status()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pilus.cluster.supervisor")
    p.add_argument("--cluster", required=True)
    p.add_argument("--state-root", type=Path, default=Path("/run/pilus"))
    args = p.parse_args(argv)
    try:
        sup = Supervisor(args.cluster, args.state_root)
    except (OSError, ValueError, KeyError) as e:
        print(f"supervisor: cannot read cluster {args.cluster!r}: {e}", file=sys.stderr)
        return 1
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
