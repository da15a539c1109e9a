"""The cluster supervisor: keeps one agent running per node (like a DaemonSet).

    python -m pilus.cluster.supervisor --cluster <name> --state-root <root>

Reads ``<root>/<name>/cluster.json``, starts every node's agent inside the node's
network namespace with its output appended to ``<state_dir>/agent.log``, restarts
an agent that exits (after 1 s, doubling up to 5 s while it keeps failing fast),
records what it does in ``<root>/<name>/supervisor.json`` and on SIGTERM/SIGINT
stops the agents (SIGTERM, SIGKILL after 5 s) and exits. It also exits when the
cluster directory disappears.

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
from pathlib import Path
from typing import Any

from pilus.cluster.plan import agent_argv

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


class AgentProc:
    def __init__(self, doc: dict[str, Any], node: dict[str, Any]) -> None:
        self.doc = doc
        self.node = node
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.fast_failures = 0
        self.next_start = 0.0
        self.last_exit: int | None = None

    @property
    def name(self) -> str:
        return self.node["name"]

    def argv(self) -> list[str]:
        return netns_exec_prefix(self.node["netns"]) + agent_argv(
            self.doc, self.node, sys.executable
        )

    def start(self) -> None:
        sdir = Path(self.node["state_dir"])
        sdir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        with open(sdir / "agent.log", "ab") as log:
            log.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: starting agent "
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
        _log(f"node {self.name}: agent started, pid {self.proc.pid}")

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
            f"node {self.name}: agent exited with {rc} after {ran:.1f} s; "
            f"restarting in {delay:.0f} s"
        )
        return True

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.proc.pid if self.proc is not None else None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


class Supervisor:
    def __init__(self, cluster: str, state_root: Path) -> None:
        self.cluster = cluster
        self.cdir = Path(state_root) / cluster
        self.stopping = False
        doc = json.loads((self.cdir / "cluster.json").read_text())
        self.agents = [AgentProc(doc, n) for n in doc["nodes"]]

    def write_status(self) -> None:
        data = {
            "pid": os.getpid(),
            "cluster": self.cluster,
            "agents": {a.name: a.status() for a in self.agents},
        }
        tmp = self.cdir / "supervisor.json.tmp"
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, self.cdir / "supervisor.json")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        (self.cdir / "supervisor.pid").write_text(f"{os.getpid()}\n")
        _log(f"cluster {self.cluster}: supervising {len(self.agents)} agent(s)")
        while not self.stopping:
            if not (self.cdir / "cluster.json").exists():
                _log("cluster.json is gone: stopping")
                break
            now = time.monotonic()
            changed = False
            for a in self.agents:
                changed |= a.poll(now)
            if changed:
                self.write_status()
            time.sleep(0.1)
        self.stop_agents()
        with contextlib.suppress(OSError):
            (self.cdir / "supervisor.pid").unlink()
        _log("exit")
        return 0

    def stop_agents(self) -> None:
        for a in self.agents:
            a.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(
            a.proc is not None and a.proc.poll() is None for a in self.agents
        ):
            time.sleep(0.05)
        for a in self.agents:
            if a.proc is not None and a.proc.poll() is None:
                _log(f"node {a.name}: agent did not stop in {STOP_GRACE_S:.0f} s, killing")
                a.signal(signal.SIGKILL)
                a.proc.wait()
            elif a.proc is not None:
                _log(f"node {a.name}: agent stopped ({a.proc.returncode})")
            a.proc = None
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
