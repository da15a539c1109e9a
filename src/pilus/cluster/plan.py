"""The pure part of a local cluster: names, addresses, the cluster.json document.

No I/O here, so that it can be unit tested without root. Names follow
docs/architecture.md ("Runtime layout on one machine").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

DEFAULT_STATE_ROOT = Path("/run/pilus")
BPFFS_ROOT = Path("/sys/fs/bpf/pilus")
HUBBLE_PORT = 4244  # Hubble's gRPC port on every node (Cilium's)
PROMETHEUS_PORT = 9090  # the cluster's prometheus on the bridge address
AGENT_METRICS_PORT = 9962  # the agents' --prometheus-serve-addr (Cilium's agent port)
HUBBLE_METRICS_PORT = 9965
RELAY_PORT = 4245  # the cluster's Hubble Relay on the bridge address (the hubble CLI's default port)
MAX_NODES = 200  # underlay .11 ... .210 in a /24; also keeps names short
KVSTORES = ("embedded", "etcd")
# etcd listens on the bridge address only, so a system etcd on 127.0.0.1 cannot collide
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")


class ClusterError(Exception):
    """A cluster operation failed; the message is one line and says what to do."""


@dataclass(frozen=True)
class ClusterSpec:
    name: str = "default"
    nodes: int = 1
    pod_cidr: IPv4Network = IPv4Network("10.200.0.0/16")
    underlay_cidr: IPv4Network = IPv4Network("172.30.0.0/24")
    state_root: Path = DEFAULT_STATE_ROOT
    kvstore: str = "embedded"
    routing_mode: str = "tunnel"  # tunnel or native (the agents' --routing-mode)
    bpf_lb_mode: str = "snat"  # snat or dsr (the agents' --bpf-lb-mode; dsr needs native routing)
    prometheus: bool = False  # run Debian's prometheus scraping every agent and Hubble metrics
    socket_lb: bool = False  # the agents' --socket-lb (services translated at connect()/sendmsg())


def validate(spec: ClusterSpec) -> None:
    """Raise ClusterError when the spec cannot be built."""
    if not _NAME_RE.match(spec.name):
        raise ClusterError(
            f"invalid cluster name {spec.name!r}: use 1-32 lowercase letters, digits and '-' "
            "(not at the start or end)"
        )
    if not 1 <= spec.nodes <= MAX_NODES:
        raise ClusterError(f"invalid node count {spec.nodes}: use 1 to {MAX_NODES}")
    pod = IPv4Network(spec.pod_cidr)
    und = IPv4Network(spec.underlay_cidr)
    if pod.prefixlen > 23:
        raise ClusterError(
            f"pod CIDR {pod} is too small: nodes get /24s from it, use a /23 or larger"
        )
    if spec.nodes > 2 ** (24 - pod.prefixlen) - 1:
        raise ClusterError(
            f"pod CIDR {pod} has room for {2 ** (24 - pod.prefixlen) - 1} nodes "
            f"(node i gets the i-th /24), not {spec.nodes}: use a larger pod CIDR"
        )
    if und.num_addresses < 10 + spec.nodes + 2:
        raise ClusterError(
            f"underlay CIDR {und} is too small for {spec.nodes} nodes "
            f"(node i gets .(10+i)): use a /24"
        )
    if pod.overlaps(und):
        raise ClusterError(f"pod CIDR {pod} overlaps the underlay CIDR {und}: pick disjoint ranges")
    if spec.routing_mode not in ("tunnel", "native"):
        raise ClusterError(f"unknown routing mode {spec.routing_mode!r}: use tunnel or native")
    if spec.bpf_lb_mode not in ("snat", "dsr"):
        raise ClusterError(f"unknown lb mode {spec.bpf_lb_mode!r}: use snat or dsr")
    if spec.bpf_lb_mode == "dsr" and spec.routing_mode == "tunnel":
        raise ClusterError("--bpf-lb-mode dsr needs --routing-mode native (DSR in tunnel mode needs "
                           "Geneve dispatch, which pilus does not have)")
    if spec.kvstore not in KVSTORES:
        raise ClusterError(
            f"unknown kvstore {spec.kvstore!r}: use one of {', '.join(KVSTORES)}"
        )


# ---------------------------------------------------------------------- names


def node_name(cluster: str, i: int) -> str:
    return f"{cluster}-node{i}"


def node_netns(node: str) -> str:
    return f"pilus-{node}"


def bridge_name(cluster: str) -> str:
    return f"plbr-{cluster[:10]}"


def _short(cluster: str) -> str:
    """≤6 characters that identify the cluster in interface names."""
    if len(cluster) <= 6:
        return cluster
    return cluster[:4] + hashlib.sha1(cluster.encode()).hexdigest()[:2]


def host_veth_name(cluster: str, i: int) -> str:
    """Machine-side end of node i's underlay veth (≤15 characters)."""
    return f"plu{_short(cluster)}{i}"


def host_veth_re(cluster: str) -> re.Pattern[str]:
    return re.compile(rf"^plu{re.escape(_short(cluster))}\d+$")


def node_netns_re(cluster: str) -> re.Pattern[str]:
    """Node namespaces and endpoint namespaces (pilus-<node>-ep<id>) of the cluster."""
    return re.compile(rf"^pilus-{re.escape(cluster)}-node\d+(-ep.+)?$")


def node_name_re(cluster: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(cluster)}-node\d+$")


# ------------------------------------------------------------------ addresses


def node_pod_cidr(pod_cidr: IPv4Network, i: int) -> IPv4Network:
    """The i-th /24 of the cluster pod CIDR (10.200.<i>.0/24 for 10.200.0.0/16)."""
    pod = IPv4Network(pod_cidr)
    n = 2 ** (24 - pod.prefixlen)
    if not 0 <= i < n:
        raise ClusterError(f"pod CIDR {pod} has no /24 number {i}")
    return IPv4Network((int(pod.network_address) + (i << 8), 24))


def router_ip(node_cidr: IPv4Network) -> str:
    return str(next(IPv4Network(node_cidr).hosts()))


def bridge_ip(underlay: IPv4Network) -> str:
    return str(IPv4Network(underlay).network_address + 1)


def node_ip(underlay: IPv4Network, i: int) -> str:
    return str(IPv4Network(underlay).network_address + 10 + i)


# ----------------------------------------------------------------- cluster.json


def cluster_dir(name: str, state_root: Path) -> Path:
    return Path(state_root) / name


def build_cluster_doc(spec: ClusterSpec, supervisor_pid: int | None = None) -> dict[str, Any]:
    """The content of <state_root>/<name>/cluster.json."""
    validate(spec)
    cdir = cluster_dir(spec.name, spec.state_root)
    und = IPv4Network(spec.underlay_cidr)
    nodes = []
    for i in range(1, spec.nodes + 1):
        node = node_name(spec.name, i)
        sdir = cdir / node
        cidr = node_pod_cidr(spec.pod_cidr, i)
        nodes.append(
            {
                "name": node,
                "index": i,
                "netns": node_netns(node),
                "state_dir": str(sdir),
                "socket": str(sdir / "pilus.sock"),
                "node_ip": node_ip(und, i),
                "underlay_device": "eth0",
                "host_veth": host_veth_name(spec.name, i),
                "pod_cidr": str(cidr),
                "router_ip": router_ip(cidr),
            }
        )
    doc: dict[str, Any] = {
        "name": spec.name,
        "bridge": bridge_name(spec.name),
        "bridge_ip": bridge_ip(und),
        "underlay_cidr": str(und),
        "pod_cidr": str(IPv4Network(spec.pod_cidr)),
        "kvstore": spec.kvstore,
        "routing_mode": spec.routing_mode,
        "bpf_lb_mode": spec.bpf_lb_mode,
        "socket_lb": spec.socket_lb,
        "kvstore_path": str(cdir / "kvstore.db"),
        "state_root": str(spec.state_root),
        "supervisor_pid": supervisor_pid,
        "nodes": nodes,
        "relay_address": f"{bridge_ip(und)}:{RELAY_PORT}",
        "relay_log": str(cdir / "relay.log"),
    }
    if spec.prometheus:
        doc["prometheus"] = {
            "address": f"{bridge_ip(und)}:{PROMETHEUS_PORT}",
            "config": str(cdir / "prometheus.yml"),
            "data_dir": str(cdir / "prometheus"),
            "log": str(cdir / "prometheus.log"),
        }
    if spec.kvstore == "etcd":
        doc["kvstore_path"] = None
        doc["kvstore_address"] = f"http://{bridge_ip(und)}:{ETCD_CLIENT_PORT}"
        doc["etcd"] = {
            "data_dir": str(cdir / "etcd"),
            "peer_url": f"http://{bridge_ip(und)}:{ETCD_PEER_PORT}",
            "log": str(cdir / "etcd.log"),
        }
    return doc


def kvstore_description(doc: dict[str, Any]) -> str:
    """'etcd http://172.30.0.1:2379' or 'embedded /run/pilus/default/kvstore.db'."""
    where = doc.get("kvstore_address") or doc.get("kvstore_path") or "-"
    return f"{doc.get('kvstore') or 'embedded'} {where}"


def etcd_argv(doc: dict[str, Any]) -> list[str]:
    """The cluster's one etcd member: client and peer URLs on the bridge address."""
    etcd = doc["etcd"]
    client, peer = doc["kvstore_address"], etcd["peer_url"]
    return [
        "etcd",
        "--name", doc["name"],
        "--data-dir", etcd["data_dir"],
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"{doc['name']}={peer}",
        # one member: a short election timeout only shortens (re)start
        "--heartbeat-interval", "50",
        "--election-timeout", "500",
        "--logger", "zap",
        "--log-level", "warn",
    ]  # fmt: skip


AGENT_PLACEHOLDERS = (
    "node",
    "state_dir",
    "socket",
    "pod_cidr",
    "cluster",
    "kvstore",
    "kvstore_path",
    "kvstore_address",
    "netns",
    "python",
)


def agent_argv(doc: dict[str, Any], node: dict[str, Any], python: str) -> list[str]:
    """The agent command line for one node (without the netns wrapper).

    ``doc["agent_cmd"]`` (tests only) overrides it; its items may use the
    placeholders of AGENT_PLACEHOLDERS in str.format style."""
    values = {
        "node": node["name"],
        "state_dir": node["state_dir"],
        "socket": node["socket"],
        "pod_cidr": node["pod_cidr"],
        "cluster": doc["name"],
        "kvstore": doc["kvstore"],
        "kvstore_path": doc.get("kvstore_path") or "",
        "kvstore_address": doc.get("kvstore_address") or "",
        "netns": node["netns"],
        "python": python,
    }
    custom = doc.get("agent_cmd")
    if custom:
        return [str(x).format(**values) for x in custom]
    return [
        python,
        "-m",
        "pilus",
        "agent",
        "--node-name",
        values["node"],
        "--state-dir",
        values["state_dir"],
        "--pod-cidr",
        values["pod_cidr"],
        "--cluster-name",
        values["cluster"],
        "--kvstore",
        values["kvstore"],
        *_kvstore_flags(doc),
        "--native-device",
        node.get("underlay_device", "eth0"),
        "--cluster-cidr",
        doc["pod_cidr"],
        "--routing-mode",
        doc.get("routing_mode", "tunnel"),
        *_lb_mode_flags(doc),
        "--hubble-listen-address",  # in the node's namespace: the relay and `--node` reach it
        f":{HUBBLE_PORT}",
        "--hubble-metrics", "flow,drop,tcp,policy",  # on <node IP>:9965
        *(["--prometheus-serve-addr", f":{AGENT_METRICS_PORT}"] if doc.get("prometheus") else []),
        *(["--socket-lb"] if doc.get("socket_lb") else []),
    ]


def _lb_mode_flags(doc: dict[str, Any]) -> list[str]:
    """``--bpf-lb-mode`` when it is not the agents' default (snat)."""
    mode = doc.get("bpf_lb_mode") or "snat"
    return [] if mode == "snat" else ["--bpf-lb-mode", mode]


def _kvstore_flags(doc: dict[str, Any]) -> list[str]:
    if doc.get("kvstore") == "etcd":
        return ["--kvstore-opt", f"etcd.address={doc['kvstore_address']}"]
    return ["--kvstore-path", doc["kvstore_path"]]


def relay_argv(doc: dict[str, Any], python: str) -> list[str]:
    """The cluster's Hubble Relay (pilus.hubble.relay) in the machine's namespace, on the
    bridge address, with every node's Hubble server (node IP:4244) as a peer target."""
    targets = [arg for n in doc["nodes"] for arg in ("--peer-target", f"{n['node_ip']}:{HUBBLE_PORT}")]
    return [python, "-m", "pilus.hubble.relay", "--listen-address", doc["relay_address"], *targets]


def prometheus_argv(doc: dict[str, Any]) -> list[str]:
    """The cluster's prometheus (Debian's) in the machine's namespace, on the bridge address."""
    prom = doc["prometheus"]
    return ["prometheus", f"--config.file={prom['config']}", f"--storage.tsdb.path={prom['data_dir']}",
            f"--web.listen-address={prom['address']}"]


def prometheus_config(doc: dict[str, Any]) -> str:
    """prometheus.yml: every agent (:9962) and every node's Hubble metrics (:9965)."""
    def targets(port: int) -> str:
        return ", ".join(f"'{n['node_ip']}:{port}'" for n in doc["nodes"])

    return (
        "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
        "scrape_configs:\n"
        f"  - job_name: pilus-agent\n    static_configs:\n      - targets: [{targets(AGENT_METRICS_PORT)}]\n"
        f"  - job_name: hubble\n    static_configs:\n      - targets: [{targets(HUBBLE_METRICS_PORT)}]\n"
    )
