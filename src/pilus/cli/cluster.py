"""``pilus cluster up|down|status``: local multi-node clusters on this machine."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from pilus.cli import common, output

DEFAULT_NODES = 1
DEFAULT_POD_CIDR = "10.200.0.0/16"
DEFAULT_UNDERLAY_CIDR = "172.30.0.0/24"
# = pilus.cluster.plan.KVSTORES (tests/unit/test_cluster.py); not imported so `--help` stays light
KVSTORES = ("embedded", "etcd")


def _network(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected an IPv4 CIDR such as 10.200.0.0/16, got {text!r} ({e})") from e


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cluster", parents=[parent],
                       help="create, inspect and remove local clusters",
                       description="Local clusters: N node network namespaces on this machine, "
                                   "joined by an underlay bridge, one agent each.")
    csub = p.add_subparsers(dest="cluster_cmd", metavar="COMMAND", required=True)

    def name_arg(parser):
        parser.add_argument("--name", metavar="NAME", default=None,
                            help="cluster name (default: --cluster, env PILUS_CLUSTER, or "
                                 "'default')")

    up = csub.add_parser("up", parents=[parent], help="create a cluster and start its agents",
                         description="Create the node namespaces, the underlay and the "
                                     "kvstore, and start one agent per node.")
    name_arg(up)
    up.add_argument("--nodes", metavar="N", type=common.positive_int, default=DEFAULT_NODES,
                    help=f"number of nodes (default {DEFAULT_NODES})")
    up.add_argument("--pod-cidr", metavar="CIDR", type=_network,
                    default=_network(DEFAULT_POD_CIDR),
                    help=f"cluster pod CIDR, node i gets the i-th /24 (default {DEFAULT_POD_CIDR})")
    up.add_argument("--underlay-cidr", metavar="CIDR", type=_network,
                    default=_network(DEFAULT_UNDERLAY_CIDR),
                    help=f"underlay network of the nodes (default {DEFAULT_UNDERLAY_CIDR})")
    up.add_argument("--kvstore", choices=KVSTORES, default="embedded",
                    help="kvstore backend: embedded (one SQLite file) or etcd (one etcd started "
                         "for the cluster on the bridge address); default embedded")
    up.add_argument("--routing-mode", choices=("tunnel", "native"), default="tunnel",
                    help="how pods reach other nodes' pods: tunnel (VXLAN, the source identity in the "
                         "VNI; default) or native (routes via the node IPs, no encapsulation)")
    up.add_argument("--bpf-lb-mode", choices=("snat", "dsr"), default="snat",
                    help="NodePort to a backend on another node: snat (to the entry node's IP; default) "
                         "or dsr (the backend's node answers the client directly; needs "
                         "--routing-mode native)")
    up.add_argument("--socket-lb", action="store_true",
                    help="the agents also load-balance services at the socket (connect()/sendmsg())")
    up.add_argument("--prometheus", action="store_true",
                    help="also run Debian's prometheus on the bridge address :9090, scraping every "
                         "agent (:9962) and every node's Hubble metrics (:9965)")
    common.add_output_option(up)
    up.set_defaults(func=cmd_up)

    down = csub.add_parser("down", parents=[parent], help="stop the agents and remove the cluster",
                           description="Stop the agents and remove namespaces, links, pins and "
                                       "state of the cluster.")
    name_arg(down)
    down.set_defaults(func=cmd_down)

    node = csub.add_parser("node", parents=[parent], help="change the nodes of a cluster")
    nsub = node.add_subparsers(dest="node_cmd", metavar="COMMAND", required=True)
    rm = nsub.add_parser("remove", parents=[parent], help="take a node out of the cluster",
                         description="Stop the node's agent, remove its entries from the kvstore "
                                     "(the other nodes drop its endpoints, identities and routes at "
                                     "once) and remove its namespaces, link, pins and state.")
    name_arg(rm)
    rm.add_argument("node_name", metavar="NODE", help="the node, e.g. default-node3")
    rm.set_defaults(func=cmd_node_remove)

    st = csub.add_parser("status", parents=[parent], help="show the nodes of a cluster",
                         description="Show the nodes of the cluster and whether their agents "
                                     "answer.")
    name_arg(st)
    common.add_output_option(st)
    st.set_defaults(func=cmd_status)


def _name(args) -> str:
    return args.name or common.cluster_name(args)


def _manager():
    from pilus.cluster import manager

    return manager


def format_nodes(info: dict, health: dict[str, str] | None = None) -> str:
    headers = ["NODE", "NODE IP", "POD CIDR", "ROUTER IP", "NETNS"]
    if health is not None:
        headers.append("AGENT")
    rows = []
    for n in info.get("nodes") or []:
        row = [output.or_dash(n.get("name")), output.or_dash(n.get("node_ip")),
               output.or_dash(n.get("pod_cidr")), output.or_dash(n.get("router_ip")),
               output.or_dash(n.get("netns"))]
        if health is not None:
            row.append(health.get(str(n.get("name")), "-"))
        rows.append(row)
    return output.table(headers, rows)


def _kvstore(info: dict, check: bool = False) -> str:
    """The backend and where it is; with check, whether the cluster's etcd answers."""
    from pilus.cluster.plan import kvstore_description
    from pilus.cluster.supervisor import etcd_healthy

    text = kvstore_description(info)
    if check and info.get("kvstore") == "etcd":
        text += " (Ok)" if etcd_healthy(info["kvstore_address"]) else " (unreachable)"
    return text


def node_health(node: dict) -> str:
    from pilus.api.client import Client, ClientError

    try:
        sock = common.node_socket(node)
    except common.CLIError:
        return "no socket"
    try:
        h = Client(sock, timeout=5).healthz()
    except ClientError:
        return "unreachable"
    state = (h.get("agent") or {}).get("state") or "Unknown"
    eps = (h.get("endpoints") or {}).get("total")
    return f"{state}" + (f" ({eps} endpoints)" if eps is not None else "")


def cmd_up(args) -> int:
    mgr = _manager()
    name = _name(args)
    spec = mgr.ClusterSpec(name=name, nodes=args.nodes, pod_cidr=args.pod_cidr,
                           underlay_cidr=args.underlay_cidr, state_root=common.state_root(),
                           kvstore=args.kvstore, routing_mode=args.routing_mode,
                           bpf_lb_mode=args.bpf_lb_mode, prometheus=args.prometheus,
                           socket_lb=args.socket_lb)
    print(f"Creating cluster '{name}' with {args.nodes} node(s)...", file=sys.stderr, flush=True)
    try:
        info = mgr.cluster_up(spec)
    except mgr.ClusterError as e:
        raise common.CLIError(str(e)) from e
    if args.output:
        output.emit(output.dump(info, args.output))
        return 0
    extra = ""
    if (info or {}).get("relay_address"):
        extra += f"Hubble Relay: {info['relay_address']}\n"
    if (info or {}).get("prometheus"):
        extra += f"Prometheus: http://{info['prometheus']['address']}\n"
    output.emit(f"Cluster '{name}' is up (kvstore {_kvstore(info or {})}):\n"
                + format_nodes(info or {"nodes": []}) + extra)
    return 0


def cmd_down(args) -> int:
    mgr = _manager()
    name = _name(args)
    try:
        removed = mgr.cluster_down(name, common.state_root())
    except mgr.ClusterError as e:
        raise common.CLIError(str(e)) from e
    for item in removed or []:
        output.emit(f"removed {item}\n")
    output.emit(f"Cluster '{name}' is down\n")
    return 0


def cmd_node_remove(args) -> int:
    mgr = _manager()
    try:
        removed = mgr.node_remove(_name(args), args.node_name, common.state_root())
    except mgr.ClusterError as e:
        raise common.CLIError(str(e)) from e
    for item in removed:
        output.emit(f"removed {item}\n")
    output.emit(f"Node '{args.node_name}' is out of cluster '{_name(args)}'\n")
    return 0


def cmd_status(args) -> int:
    name = _name(args)
    mgr = _manager()
    try:
        info = mgr.load_cluster(name, common.state_root())
    except mgr.ClusterError as e:
        raise common.CLIError(str(e)) from e
    if info is None:
        raise common.CLIError(common.no_cluster_message(name))
    health = {str(n.get("name")): node_health(n) for n in info.get("nodes") or []}
    if args.output:
        data = dict(info)
        data["nodes"] = [dict(n, agent=health.get(str(n.get("name")))) for n in info["nodes"]]
        output.emit(output.dump(data, args.output))
        return 0
    output.emit(f"Cluster '{name}': {len(info.get('nodes') or [])} node(s), "
                f"kvstore {_kvstore(info, check=True)}\n" + format_nodes(info, health))
    return 0
