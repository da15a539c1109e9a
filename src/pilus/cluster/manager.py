"""Local clusters on one machine: node namespaces on an underlay bridge, one agent each.

    cluster_up(ClusterSpec(name="default", nodes=2))   -> the cluster.json document
    cluster_down("default")                            -> what was removed
    load_cluster("default")                            -> the cluster.json document or None

Layout (docs/architecture.md): bridge ``plbr-<name[:10]>`` with the underlay's .1 in
the machine's namespace; node i is namespace ``pilus-<name>-node<i>`` whose ``eth0``
(underlay .(10+i), default route via the bridge) is the peer of ``plu…<i>`` on the
bridge; node i's pod CIDR is the i-th /24 of the cluster's. A supervisor daemon
(pilus.cluster.supervisor) runs and restarts the agents.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pilus.api.client import unix_http
from pilus.cluster.plan import (
    BPFFS_ROOT,
    DEFAULT_STATE_ROOT,
    ClusterError,
    ClusterSpec,
    bridge_name,
    build_cluster_doc,
    cluster_dir,
    host_veth_name,
    host_veth_re,
    node_name_re,
    node_netns_re,
    prometheus_config,
    validate,
)
from pilus.cluster.supervisor import etcd_healthy
from pilus.datapath import links
from pilus.datapath.errors import DatapathError

__all__ = [
    "ClusterError",
    "ClusterSpec",
    "cluster_up",
    "cluster_down",
    "load_cluster",
    "unix_http",
]

UP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 8
FAIL_FAST_RESTARTS = 3  # an agent (or etcd) that exited this often during `up` will not come up
ETCD_UP_TIMEOUT_S = 20.0


# ------------------------------------------------------------ HTTP over UNIX


def healthy(socket_path: str | Path, timeout: float = 2.0) -> bool:
    try:
        status, _ = unix_http(socket_path, "GET", "/v1/healthz", timeout=timeout)
    except OSError:
        return False
    return status == 200


# ------------------------------------------------------------------ helpers


def load_cluster(name: str = "default", state_root: Path = DEFAULT_STATE_ROOT) -> dict | None:
    path = cluster_dir(name, state_root) / "cluster.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClusterError(
            f"cannot read {path}: {e}; run `pilus cluster down --name {name}` to clean up"
        ) from None


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    lines = [x for x in lines if not x.startswith("--- ")] or lines
    return " | ".join(x.strip() for x in lines[-n:]) or "(empty log)"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [x.decode(errors="replace") for x in f.read().split(b"\0") if x]
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_supervisor_of(pid: int, name: str, state_root: Path | None) -> bool:
    argv = _cmdline(pid)
    if "pilus.cluster.supervisor" not in argv:
        return False
    try:
        cluster = argv[argv.index("--cluster") + 1]
    except (ValueError, IndexError):
        return False
    if cluster != name:
        return False
    if state_root is None:
        return True
    try:
        root = argv[argv.index("--state-root") + 1]
    except (ValueError, IndexError):
        root = str(DEFAULT_STATE_ROOT)
    return os.path.realpath(root) == os.path.realpath(state_root)


def _is_etcd_of(pid: int, cdir: Path) -> bool:
    """The cluster's etcd: `etcd ... --data-dir <cdir>/etcd`."""
    argv = _cmdline(pid)
    if not argv or os.path.basename(argv[0]) != "etcd" or "--data-dir" not in argv:
        return False
    try:
        data_dir = argv[argv.index("--data-dir") + 1]
    except IndexError:
        return False
    return os.path.realpath(data_dir) == os.path.realpath(cdir / "etcd")


def _is_agent_of(pid: int, name: str, cdir: Path) -> bool:
    """An agent (or stand-in) of one of the cluster's nodes: `--node-name <name>-node<i>`,
    and when it has a --state-dir, one under this cluster's directory."""
    argv = _cmdline(pid)
    if "--node-name" not in argv:
        return False
    try:
        node = argv[argv.index("--node-name") + 1]
    except IndexError:
        return False
    if not node_name_re(name).match(node):
        return False
    if "--state-dir" in argv:
        try:
            sdir = os.path.realpath(argv[argv.index("--state-dir") + 1])
        except IndexError:
            return False
        return sdir.startswith(os.path.realpath(cdir) + os.sep)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM, wait up to grace seconds, SIGKILL; returns the pids that were alive."""
    live = [p for p in pids if _alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in live:
            _reap(p)
        if not any(_alive(p) for p in live):
            break
        time.sleep(0.05)
    for p in live:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    for p in live:
        for _ in range(100):
            _reap(p)
            if not _alive(p):
                break
            time.sleep(0.02)
    return live


def _pids_in_netns(names: list[str]) -> list[int]:
    """Processes living in any of the named network namespaces (`ip netns pids`)."""
    inodes = set()
    for n in names:
        with contextlib.suppress(OSError):
            st = os.stat(links.netns_path(n))
            inodes.add((st.st_dev, st.st_ino))
    if not inodes:
        return []
    out = []
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inodes:
            out.append(pid)
    return out


def _rm_tree_bpffs(path: Path) -> None:
    """Remove a directory of pins (bpffs: unlink files, rmdir directories)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(root, f))
        for d in dirs:
            p = os.path.join(root, d)
            if os.path.islink(p):
                os.unlink(p)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(p)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)


def _host_links() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return []


def _pilus_pythonpath() -> str:
    import pilus

    src = str(Path(pilus.__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return src if not old else f"{src}{os.pathsep}{old}"


# ------------------------------------------------------------------ cluster_up


def _leftovers(spec: ClusterSpec) -> list[str]:
    found = [f"netns {n}" for n in links.list_netns("pilus-") if node_netns_re(spec.name).match(n)]
    if links.link_info(bridge_name(spec.name)) is not None:
        found.append(f"bridge {bridge_name(spec.name)}")
    for i in range(1, spec.nodes + 1):
        if links.link_info(host_veth_name(spec.name, i)) is not None:
            found.append(f"link {host_veth_name(spec.name, i)}")
    return found


def _build_node(doc: dict, node: dict, prefixlen: int) -> None:
    ns = node["netns"]
    links.create_netns(ns)
    links.create_veth(node["host_veth"], "eth0", peer_netns=ns, mtu=1500)
    links.set_master(node["host_veth"], doc["bridge"])
    links.add_address("eth0", f"{node['node_ip']}/{prefixlen}", ns)
    links.set_link_up("lo", ns)
    links.add_route("default", gateway=doc["bridge_ip"], dev="eth0", netns=ns)
    links.set_sysctl("net.ipv4.ip_forward", 1, ns)
    links.set_sysctl("net.ipv4.conf.all.rp_filter", 0, ns)
    links.set_sysctl("net.ipv4.conf.default.rp_filter", 0, ns)
    links.set_sysctl("net.ipv4.conf.eth0.rp_filter", 0, ns)
    Path(node["state_dir"]).mkdir(parents=True, exist_ok=True)


def _start_supervisor(doc: dict, cdir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = _pilus_pythonpath()
    with open(cdir / "supervisor.log", "ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pilus.cluster.supervisor",
                "--cluster",
                doc["name"],
                "--state-root",
                doc["state_root"],
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            cwd="/",
            env=env,
        )


def _crash_looping(cdir: Path, pending: dict[str, dict]) -> str | None:
    """A pending node whose agent keeps exiting (per supervisor.json), or None."""
    try:
        agents = json.loads((cdir / "supervisor.json").read_text()).get("agents", {})
    except (OSError, ValueError):
        return None
    for name in pending:
        if agents.get(name, {}).get("restarts", 0) >= FAIL_FAST_RESTARTS:
            return name
    return None


def _check_supervisor(doc: dict, sup: subprocess.Popen, cdir: Path) -> None:
    if sup.poll() is not None:
        raise ClusterError(
            f"cluster {doc['name']!r}: the supervisor exited with {sup.returncode}: "
            f"{_tail(cdir / 'supervisor.log')}"
        )


def _supervised_etcd(cdir: Path) -> dict:
    try:
        return json.loads((cdir / "supervisor.json").read_text()).get("etcd") or {}
    except (OSError, ValueError):
        return {}


def _wait_etcd(doc: dict, sup: subprocess.Popen, timeout: float) -> None:
    """The supervisor started etcd and it answers GET /health (before any agent runs)."""
    cdir = Path(doc["state_root"]) / doc["name"]
    address = doc["kvstore_address"]
    deadline = time.monotonic() + timeout
    while not (_supervised_etcd(cdir).get("ready") and etcd_healthy(address, timeout=1.0)):
        _check_supervisor(doc, sup, cdir)
        crashing = _supervised_etcd(cdir).get("restarts", 0) >= FAIL_FAST_RESTARTS
        if crashing or time.monotonic() > deadline:
            why = (
                f"exited {FAIL_FAST_RESTARTS} times in a row"
                if crashing
                else f"did not answer GET /health within {timeout:.0f} s"
            )
            log = doc["etcd"]["log"]
            raise ClusterError(
                f"cluster {doc['name']!r}: etcd at {address} {why}; "
                f"etcd log ({log}) ends with: {_tail(Path(log))}"
            )
        time.sleep(0.1)


def _wait_healthy(doc: dict, sup: subprocess.Popen, timeout: float) -> None:
    cdir = Path(doc["state_root"]) / doc["name"]
    pending = {n["name"]: n for n in doc["nodes"]}
    deadline = time.monotonic() + timeout
    while pending:
        for name, node in list(pending.items()):
            if healthy(node["socket"]):
                del pending[name]
        if not pending:
            return
        _check_supervisor(doc, sup, cdir)
        crashing = _crash_looping(cdir, pending)
        if crashing or time.monotonic() > deadline:
            name = crashing or next(iter(pending))
            node = pending[name]
            log = Path(node["state_dir"]) / "agent.log"
            why = (
                f"exited {FAIL_FAST_RESTARTS} times in a row"
                if crashing
                else f"did not answer GET /v1/healthz on {node['socket']} within {timeout:.0f} s"
            )
            raise ClusterError(
                f"cluster {doc['name']!r}: the agent of node {name} {why}; "
                f"agent log ({log}) ends with: {_tail(log)}"
            )
        time.sleep(0.2)


def cluster_up(
    spec: ClusterSpec,
    *,
    agent_cmd: list[str] | None = None,
    timeout: float = UP_TIMEOUT_S,
) -> dict:
    """Build the cluster, start its supervisor, wait until every agent is healthy.

    ``agent_cmd`` (tests only) replaces the agent command line; its items may use
    {node} {state_dir} {socket} {pod_cidr} {cluster} {kvstore_path} {netns} {python}.
    On any failure everything made is torn down and ClusterError is raised."""
    validate(spec)
    if os.geteuid() != 0:
        raise ClusterError("cluster up needs root (network namespaces, BPF): run it as root")
    if shutil.which("nsenter") is None and shutil.which("ip") is None:
        raise ClusterError("neither nsenter nor ip is installed: install util-linux or iproute2")
    cdir = cluster_dir(spec.name, spec.state_root)
    if (cdir / "cluster.json").exists():
        raise ClusterError(f"cluster '{spec.name}' is already up; run `pilus cluster down` first")
    left = _leftovers(spec)
    if left:
        raise ClusterError(
            f"cluster '{spec.name}' has leftovers ({', '.join(left[:3])}"
            f"{', ...' if len(left) > 3 else ''}); run `pilus cluster down` first"
        )
    if spec.kvstore == "etcd" and shutil.which("etcd") is None:
        raise ClusterError("--kvstore etcd needs the etcd binary: install etcd-server")
    if spec.prometheus and shutil.which("prometheus") is None:
        raise ClusterError("--prometheus needs the prometheus binary: install prometheus (make setup)")
    doc = build_cluster_doc(spec)
    if agent_cmd:
        doc["agent_cmd"] = list(agent_cmd)
    prefixlen = spec.underlay_cidr.prefixlen
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        links.create_bridge(doc["bridge"], f"{doc['bridge_ip']}/{prefixlen}")
        for node in doc["nodes"]:
            _build_node(doc, node, prefixlen)
        if doc.get("prometheus"):
            Path(doc["prometheus"]["config"]).write_text(prometheus_config(doc))
        _write_json(cdir / "cluster.json", doc)
        sup = _start_supervisor(doc, cdir)
        doc["supervisor_pid"] = sup.pid
        _write_json(cdir / "cluster.json", doc)
        if spec.kvstore == "etcd":
            started = time.monotonic()
            _wait_etcd(doc, sup, min(ETCD_UP_TIMEOUT_S, timeout))
            timeout = max(timeout - (time.monotonic() - started), 1.0)
        _wait_healthy(doc, sup, timeout)
    except BaseException as e:
        with contextlib.suppress(Exception):
            cluster_down(spec.name, spec.state_root)
        if isinstance(e, ClusterError):
            raise
        if isinstance(e, DatapathError | OSError):
            raise ClusterError(
                f"cluster {spec.name!r} could not be built: {e}; everything made was removed"
            ) from None
        raise
    return doc


# ---------------------------------------------------------------- cluster_down


def cluster_down(name: str = "default", state_root: Path = DEFAULT_STATE_ROOT) -> list[str]:
    """Remove everything of cluster ``name``: supervisor, agents, namespaces, links,
    pins, state dir. Works without cluster.json (after a crash); idempotent."""
    if not node_name_re(name).match(f"{name}-node1"):
        raise ClusterError(f"invalid cluster name {name!r}")
    state_root = Path(state_root)
    cdir = cluster_dir(name, state_root)
    removed: list[str] = []
    doc: dict | None
    try:
        doc = load_cluster(name, state_root)
    except ClusterError:
        doc = None

    # 1. supervisor (it stops its agents), then stray supervisors and agents
    sup_pids: set[int] = set()
    if doc and doc.get("supervisor_pid"):
        sup_pids.add(int(doc["supervisor_pid"]))
    with contextlib.suppress(OSError, ValueError):
        sup_pids.add(int((cdir / "supervisor.pid").read_text().strip()))
    sup_pids = {p for p in sup_pids if _is_supervisor_of(p, name, state_root)}
    sup_pids |= {p for p in _pids() if _is_supervisor_of(p, name, state_root)}
    for p in _terminate(sorted(sup_pids), grace=8.0):
        removed.append(f"supervisor pid {p}")
    agents = [p for p in _pids() if p != os.getpid() and _is_agent_of(p, name, cdir)]
    for p in _terminate(agents, grace=5.0):
        removed.append(f"agent pid {p}")
    relay = (doc or {}).get("relay_address")
    strays = [p for p in _pids() if relay and "pilus.hubble.relay" in _cmdline(p) and relay in _cmdline(p)]
    for p in _terminate(strays, grace=2.0):
        removed.append(f"relay pid {p}")
    tsdb = f"--storage.tsdb.path={cdir / 'prometheus'}"
    for p in _terminate([p for p in _pids() if tsdb in _cmdline(p)], grace=5.0):
        removed.append(f"prometheus pid {p}")
    for p in _terminate([p for p in _pids() if _is_etcd_of(p, cdir)], grace=5.0):
        removed.append(f"etcd pid {p}")

    # 2. anything still running inside the cluster's namespaces
    nsre = node_netns_re(name)
    all_ns = [n for n in links.list_netns("pilus-") if nsre.match(n)]
    for p in _terminate(_pids_in_netns(all_ns), grace=2.0):
        removed.append(f"process pid {p}")

    # 3. endpoint namespaces, machine-side veths, node namespaces, bridge
    eps = [n for n in all_ns if "-ep" in n.split("-node", 1)[-1]]
    nodes = [n for n in all_ns if n not in eps]
    for n in eps:
        links.delete_netns(n)
        removed.append(f"netns {n}")
    veths = set()
    if doc:
        veths |= {n.get("host_veth") for n in doc.get("nodes", []) if n.get("host_veth")}
    vre = host_veth_re(name)
    veths |= {x for x in _host_links() if vre.match(x)}
    for v in sorted(veths):
        if links.link_info(v) is not None:
            links.delete_link(v)
            removed.append(f"link {v}")
    for n in nodes:
        links.delete_netns(n)
        removed.append(f"netns {n}")
    br = doc.get("bridge") if doc else None
    for b in {br, bridge_name(name)} - {None}:
        if links.link_info(b) is not None and _bridge_is_ours(b, name, doc):
            links.delete_link(b)
            removed.append(f"bridge {b}")

    # 4. pins
    if BPFFS_ROOT.is_dir():
        nre = node_name_re(name)
        for entry in sorted(BPFFS_ROOT.iterdir()):
            if nre.match(entry.name):
                _rm_tree_bpffs(entry)
                removed.append(f"pins {entry}")

    # 5. state dir
    if cdir.exists():
        shutil.rmtree(cdir, ignore_errors=True)
        removed.append(f"state dir {cdir}")
    return removed


def _bridge_is_ours(bridge: str, name: str, doc: dict | None) -> bool:
    """plbr-<name[:10]> is shared by cluster names with the same first 10 characters:
    only delete it when no other cluster's cluster.json claims it."""
    if doc is not None:
        return True
    if len(name) <= 10:
        return True
    root_candidates = [DEFAULT_STATE_ROOT]
    for root in root_candidates:
        with contextlib.suppress(OSError):
            for d in root.iterdir():
                if d.name == name:
                    continue
                cj = d / "cluster.json"
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(cj.read_text()).get("bridge") == bridge:
                        return False
    return True


def cluster_names(state_root: Path = DEFAULT_STATE_ROOT) -> list[str]:
    """Clusters with a cluster.json under state_root."""
    try:
        return sorted(d.name for d in Path(state_root).iterdir() if (d / "cluster.json").exists())
    except OSError:
        return []


def node_remove(name: str, node_name: str, state_root: Path = DEFAULT_STATE_ROOT) -> list[str]:
    """Take one node out of cluster ``name``: the supervisor stops its agent, the node's
    kvstore leases are revoked (its node entry, endpoints and identity references go at
    once on every other node, instead of after the lease TTL), then its namespaces,
    link, pins and state dir are removed. Returns what was removed."""
    cdir = cluster_dir(name, Path(state_root))
    doc = load_cluster(name, state_root)
    if doc is None:
        raise ClusterError(f"no cluster named {name!r}")
    names = [n["name"] for n in doc["nodes"]]
    if node_name not in names:
        raise ClusterError(f"cluster {name!r} has no node named {node_name!r} (nodes: {', '.join(names)})")
    if len(names) == 1:
        raise ClusterError(f"{node_name} is the last node of cluster {name!r}: use `pilus cluster down`")
    node = next(n for n in doc["nodes"] if n["name"] == node_name)
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != node_name]
    _write_json(cdir / "cluster.json", doc)  # the supervisor stops the agent it no longer lists
    removed: list[str] = []

    def agent_pids() -> list[int]:
        return [p for p in _pids() if _is_agent_of(p, name, cdir) and f"--node-name {node_name} " in
                " ".join(_cmdline(p)) + " "]

    deadline = time.monotonic() + 10
    while agent_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in _terminate(agent_pids(), grace=5.0):  # no supervisor, or it did not stop it
        removed.append(f"agent pid {p}")
    removed += [f"kvstore lease {lease}" for lease in _revoke_node_leases(doc, node_name)]
    nsre = node_netns_re(name)
    netns = [n for n in links.list_netns("pilus-") if nsre.match(n)
             and (n == node["netns"] or n.startswith(node["netns"] + "-ep"))]
    for p in _terminate(_pids_in_netns(netns), grace=2.0):
        removed.append(f"process pid {p}")
    for n in sorted(netns, key=lambda n: n == node["netns"]):  # endpoints first
        links.delete_netns(n)
        removed.append(f"netns {n}")
    if node.get("host_veth") and links.link_info(node["host_veth"]) is not None:
        links.delete_link(node["host_veth"])
        removed.append(f"link {node['host_veth']}")
    if (BPFFS_ROOT / node_name).is_dir():
        _rm_tree_bpffs(BPFFS_ROOT / node_name)
        removed.append(f"pins {BPFFS_ROOT / node_name}")
    sdir = Path(node["state_dir"])
    if sdir.exists():
        shutil.rmtree(sdir, ignore_errors=True)
        removed.append(f"state dir {sdir}")
    return removed


def _revoke_node_leases(doc: dict, node_name: str) -> list[int]:
    """Revoke every lease that holds a key of ``node_name``: keys ending in /<node>
    (node registry, identity references) or whose JSON value names it (ipcache)."""
    import asyncio

    from pilus.kvstore import KVStoreError, open_store

    async def run() -> list[int]:
        if doc.get("kvstore") == "etcd":
            store = open_store("etcd", address=doc["kvstore_address"])
        else:
            store = open_store(path=doc["kvstore_path"])
        try:
            leases: set[int] = set()
            for prefix in ("cilium/state/", "pilus/state/"):
                for kv in await store.list_prefix(prefix):
                    if kv.lease is None:
                        continue
                    named = kv.key.endswith("/" + node_name)
                    if not named and node_name in kv.value:
                        with contextlib.suppress(ValueError):
                            value = json.loads(kv.value)
                            named = isinstance(value, dict) and value.get("Node") == node_name
                    if named:
                        leases.add(kv.lease)
            for lease in sorted(leases):
                with contextlib.suppress(KVStoreError):  # expired meanwhile
                    await store.revoke_lease(lease)
            return sorted(leases)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except KVStoreError as exc:
        raise ClusterError(f"{node_name} is stopped, but its kvstore entries could not be removed "
                           f"({exc}); the other nodes drop them when its leases expire") from exc
