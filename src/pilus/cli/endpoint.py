"""``pilus endpoint create|list|get|delete``."""

from __future__ import annotations

import argparse

from pilus.cli import common, output

LIST_HEADERS = ["ENDPOINT", "NAME", "IDENTITY", "LABELS (source:key[=value])", "IPv4", "STATUS"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("endpoint", aliases=["ep"], parents=[parent],
                       help="manage endpoints (pods)",
                       description="Create, list, inspect and delete endpoints (pods).")
    esub = p.add_subparsers(dest="endpoint_cmd", metavar="COMMAND", required=True)

    c = esub.add_parser("create", parents=[parent], help="create an endpoint",
                        description="Create an endpoint: a network namespace with an IP from "
                                    "the node's pod CIDR and a security identity from its labels.")
    c.add_argument("name", metavar="NAME", type=common.endpoint_name,
                   help="NAMESPACE/NAME, or NAME for namespace 'default'")
    c.add_argument("-l", "--labels", metavar="K=V[,K=V...]", type=common.label_list,
                   action="extend", default=None, required=True,
                   help="pod labels, e.g. org=empire,class=deathstar (repeatable)")
    c.add_argument("--service-account", metavar="SA", default=None,
                   help="service account (default: 'default')")
    common.add_output_option(c)
    c.set_defaults(func=cmd_create)

    ls = esub.add_parser("list", aliases=["ls"], parents=[parent], help="list endpoints",
                         description="List the endpoints of the node, sorted by ID.")
    common.add_output_option(ls)
    ls.add_argument("--no-headers", action="store_true", help="omit the header line")
    ls.set_defaults(func=cmd_list)

    g = esub.add_parser("get", parents=[parent], help="show one endpoint",
                        description="Show one endpoint by ID or NAMESPACE/NAME.")
    g.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                   help="endpoint ID or NAMESPACE/NAME")
    common.add_output_option(g)
    g.set_defaults(func=cmd_get)

    d = esub.add_parser("delete", aliases=["rm"], parents=[parent], help="delete an endpoint",
                        description="Delete an endpoint (its namespace, veth, IP and map entries).")
    d.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                   help="endpoint ID or NAMESPACE/NAME")
    common.add_output_option(d)
    d.set_defaults(func=cmd_delete)


# -- formatting -------------------------------------------------------------------

def format_list(endpoints: list[dict], no_headers: bool = False) -> str:
    rows = []
    for ep in sorted(endpoints, key=lambda e: (e.get("id") is None, e.get("id") or 0)):
        rows.append([
            output.or_dash(ep.get("id")),
            output.or_dash(ep.get("name")),
            output.or_dash(ep.get("identity")),
            output.sorted_labels(ep.get("labels")) or ["no labels"],
            output.or_dash(ep.get("ipv4")),
            output.or_dash(ep.get("state")),
        ])
    return output.table(LIST_HEADERS, rows, no_headers=no_headers)


def format_detail(ep: dict) -> str:
    return output.detail([
        ("ID", output.or_dash(ep.get("id"))),
        ("Name", output.or_dash(ep.get("name"))),
        ("Namespace", output.or_dash(ep.get("namespace"))),
        ("Pod", output.or_dash(ep.get("pod_name"))),
        ("State", output.or_dash(ep.get("state"))),
        ("Identity", output.or_dash(ep.get("identity"))),
        ("Labels", output.sorted_labels(ep.get("labels")) or ["-"]),
        ("Service account", output.or_dash(ep.get("service_account"))),
        ("IPv4", output.or_dash(ep.get("ipv4"))),
        ("MAC", output.or_dash(ep.get("mac"))),
        ("Host MAC", output.or_dash(ep.get("host_mac"))),
        ("Interface", f"{output.or_dash(ep.get('interface_name'))} "
                      f"(ifindex {output.or_dash(ep.get('interface_index'))})"),
        ("Netns", output.or_dash(ep.get("netns"))),
        ("Created", output.or_dash(ep.get("created"))),
    ])


def format_created(ep: dict) -> str:
    return (f"Endpoint {ep.get('id')} {ep.get('name')} created: identity {ep.get('identity')}, "
            f"IPv4 {ep.get('ipv4')}, interface {ep.get('interface_name')}, "
            f"state {ep.get('state')}\n")


# -- commands ----------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    ep = common.client(args).create_endpoint(args.name, args.labels, args.service_account)
    output.emit(output.dump(ep, args.output) if args.output else format_created(ep))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    eps = common.client(args).list_endpoints()
    output.emit(output.dump(eps, args.output) if args.output
                else format_list(eps, args.no_headers))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    ep = common.client(args).get_endpoint(args.ref)
    output.emit(output.dump(ep, args.output) if args.output else format_detail(ep))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    res = common.client(args).delete_endpoint(args.ref)
    if args.output:
        output.emit(output.dump(res, args.output))
    else:
        deleted = res.get("deleted") if isinstance(res, dict) else None
        output.emit(f"Endpoint {deleted if deleted is not None else args.ref} deleted\n")
    return 0
