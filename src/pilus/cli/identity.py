"""``pilus identity list|get``."""

from __future__ import annotations

import argparse

from pilus.cli import common, output

HEADERS = ["ID", "ENDPOINTS", "LABELS"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("identity", aliases=["id"], parents=[parent],
                       help="show security identities",
                       description="Security identities: numbers standing for sets of labels.")
    isub = p.add_subparsers(dest="identity_cmd", metavar="COMMAND", required=True)

    ls = isub.add_parser("list", aliases=["ls"], parents=[parent], help="list identities",
                         description="List the identities known to the node (reserved and "
                                     "allocated), sorted by ID.")
    common.add_output_option(ls)
    ls.add_argument("--no-headers", action="store_true", help="omit the header line")
    ls.set_defaults(func=cmd_list)

    g = isub.add_parser("get", parents=[parent], help="show one identity",
                        description="Show the labels of one identity.")
    g.add_argument("id", metavar="ID", type=common.identity_id, help="numeric identity")
    common.add_output_option(g)
    g.set_defaults(func=cmd_get)


def format_list(identities: list[dict], no_headers: bool = False) -> str:
    rows = [
        [output.or_dash(i.get("id")), output.or_dash(i.get("endpoints")),
         output.sorted_labels(i.get("labels")) or ["-"]]
        for i in sorted(identities, key=lambda i: i.get("id") or 0)
    ]
    return output.table(HEADERS, rows, no_headers=no_headers)


def cmd_list(args: argparse.Namespace) -> int:
    ids = common.client(args).list_identities()
    output.emit(output.dump(ids, args.output) if args.output
                else format_list(ids, args.no_headers))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    ident = common.client(args).get_identity(args.id)
    output.emit(output.dump(ident, args.output) if args.output else format_list([ident]))
    return 0
