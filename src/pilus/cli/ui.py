"""``pilus ui``: serve the service map (Hubble UI's page) on http://127.0.0.1:12000.

Flows come from the cluster's Hubble Relay, or from one node's ``hubble.sock`` with
``--node`` (or ``--socket``), or from any Hubble server with ``--server`` (the same rule
as ``pilus observe``). The server runs until interrupted."""

from __future__ import annotations

import argparse

from pilus.cli import common
from pilus.cli.observe import server_address

__all__ = ["DEFAULT_LISTEN", "cmd_ui", "parse_listen", "register"]

DEFAULT_LISTEN = "127.0.0.1:12000"  # Hubble UI's port


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` (127.0.0.1) or ``[V6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as {DEFAULT_LISTEN}, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ui", parents=[parent], help="serve the service map (Hubble UI) on a web page",
                       description="Serve a web page showing the cluster's workloads as boxes and the flows "
                                   "between them as edges, updated live; dropped edges are marked with their "
                                   "drop reason; a table of the flows below.",
                       epilog="examples:\n  pilus ui                       # http://127.0.0.1:12000/\n"
                              "  pilus ui --namespace default --listen 0.0.0.0:12000\n"
                              "  pilus ui --node default-node2  # one node's flows, no relay",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=parse_listen, default=parse_listen(DEFAULT_LISTEN), metavar="HOST:PORT",
                   help=f"address to serve the page on (default {DEFAULT_LISTEN})")
    p.add_argument("--namespace", "-n", default="", metavar="NS",
                   help="the namespace the page opens with (default: every namespace)")
    p.add_argument("--last", type=common.positive_int, default=1000, metavar="N",
                   help="flows to read from the buffers at start (default 1000)")
    p.add_argument("--server", metavar="ADDRESS",
                   help="a Hubble server or relay (HOST:PORT or unix:PATH) instead of the cluster's relay")
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    from pilus.ui.server import UISettings, run

    target, what = server_address(args)
    host, port = args.listen
    settings = UISettings(target=target, source=what, namespace=args.namespace, last=args.last)
    try:
        run(settings, host, port)
    except OSError as exc:
        raise common.CLIError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    return 0
