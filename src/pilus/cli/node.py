"""``pilus node list``: the cluster's nodes as this node's registry sees them."""

from __future__ import annotations

import argparse

from pilus.cli import common, output

HEADERS = ["NAME", "IPV4 ADDRESS", "ENDPOINT CIDR", "ROUTER IP", "HEALTH"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("node", parents=[parent], help="show the cluster's nodes",
                       description="Nodes of the cluster, from the node registry in the kvstore.")
    nsub = p.add_subparsers(dest="node_cmd", metavar="COMMAND", required=True)
    ls = nsub.add_parser("list", aliases=["ls"], parents=[parent], help="list nodes",
                         description="List every node registered in the kvstore (as cilium-dbg "
                                     "node list): name, node IP, pod CIDR, router IP, health; "
                                     "the node answering is marked (local).")
    common.add_output_option(ls)
    ls.add_argument("--no-headers", action="store_true", help="omit the header line")
    ls.set_defaults(func=cmd_list)


def format_list(nodes: list[dict], no_headers: bool = False) -> str:
    rows = [
        [output.or_dash(n.get("name")) + (" (local)" if n.get("local") else ""),
         output.or_dash(n.get("node_ip")), output.or_dash(n.get("pod_cidr")),
         output.or_dash(n.get("router_ip")), output.or_dash(n.get("health"))]
        for n in sorted(nodes, key=lambda n: n.get("name") or "")
    ]
    return output.table(HEADERS, rows, no_headers=no_headers)


def cmd_list(args: argparse.Namespace) -> int:
    nodes = common.client(args).list_nodes()
    output.emit(output.dump(nodes, args.output) if args.output else format_list(nodes, args.no_headers))
    return 0
