"""``pilus monitor``: live datapath events in cilium-dbg monitor's one-line formats
(the formats are pilus.observer.format's)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pilus.cli import common

__all__ = ["EVENT_TYPES", "TYPE_CHOICES", "IdentityNames", "IfNames", "cmd_monitor", "format_event", "register"]

#: the --type choices: the names of pilus.datapath.events.MONITOR_TYPES (the agent checks
#: them too; tests/unit/test_cli_parse.py keeps the two equal)
EVENT_TYPES = ("drop", "trace", "policy-verdict")
#: and the L7 proxy's records (one per HTTP request), which the agent publishes too
TYPE_CHOICES = (*EVENT_TYPES, "l7")


def format_event(ev: dict, verbose: int = 0, ifnames: dict[int, str] | None = None, labels=None) -> str:
    """One monitor record -> text: pilus.observer.format's, imported when a line is printed
    because it loads the datapath package, which no other command needs at start-up."""
    from pilus.observer.format import format_event as observer_format_event

    return observer_format_event(ev, verbose, ifnames, labels)


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("monitor", parents=[parent], help="show live datapath events",
                       description="Print drop, trace and policy-verdict events as the "
                                   "datapath reports them, and the proxies' HTTP and Kafka requests and DNS queries "
                                   "(l7), one line each, until Ctrl-C.")
    p.add_argument("-t", "--type", choices=TYPE_CHOICES, default=None,
                   help="only events of this type (default: all)")
    p.add_argument("--endpoint", "--related-to", metavar="ID", type=common.positive_int,
                   default=None, help="only events to or from this endpoint ID")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also print the captured packet bytes (hex)")
    p.add_argument("-o", "--output", choices=("json",), default=None,
                   help="print each event as one JSON object per line")
    p.add_argument("-j", "--json", dest="output", action="store_const", const="json",
                   help="same as -o json")
    p.set_defaults(func=cmd_monitor)


class IfNames:
    """Host-side interface names by ifindex, learned from the endpoint list; refreshed
    at most every few seconds when an unknown ifindex shows up."""

    def __init__(self, client, min_refresh_s: float = 5.0):
        self.client = client
        self.names: dict[int, str] = {}
        self.min_refresh_s = min_refresh_s
        self.last = 0.0
        self.refresh()

    def refresh(self) -> None:
        self.last = time.monotonic()
        try:
            eps = self.client.list_endpoints()
        except Exception:  # names are a nicety; numbers will do
            return
        for ep in eps:
            if ep.get("interface_index") is not None and ep.get("interface_name"):
                self.names[int(ep["interface_index"])] = str(ep["interface_name"])

    def lookup(self, ev: dict) -> dict[int, str]:
        idx = ev.get("ifindex")
        if (ev.get("type") == "trace" and isinstance(idx, int) and idx not in self.names
                and time.monotonic() - self.last > self.min_refresh_s):
            self.refresh()
        return self.names


class IdentityNames:
    """Identity -> its labels (sorted), as L7 lines name both ends; the identity list is
    fetched again at most every few seconds when an unknown identity shows up."""

    def __init__(self, client, min_refresh_s: float = 5.0):
        self.client = client
        self.labels: dict[int, list[str]] = {}
        self.min_refresh_s = min_refresh_s
        self.last: float | None = None

    def refresh(self) -> None:
        self.last = time.monotonic()
        try:
            rows = self.client.list_identities()
        except Exception:  # labels are a nicety; the numbers are printed anyway
            return
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("id"), int):
                self.labels[row["id"]] = sorted(str(x) for x in row.get("labels") or ())

    def __call__(self, identity: int) -> list[str]:
        if identity not in self.labels and (
                self.last is None or time.monotonic() - self.last > self.min_refresh_s):
            self.refresh()
        return self.labels.get(identity, [])


# -- command --------------------------------------------------------------------------

def cmd_monitor(args: argparse.Namespace) -> int:
    client = common.client(args)
    stream = client.stream_monitor(type=args.type, endpoint=args.endpoint)
    try:
        print("Listening for events... Press Ctrl-C to quit", file=sys.stderr, flush=True)
        ifnames = IfNames(client) if args.output != "json" else None
        labels = IdentityNames(client)
        for ev in stream:
            if args.output == "json":
                text = json.dumps(ev, separators=(",", ":"))
            else:
                text = format_event(ev, args.verbose, ifnames.lookup(ev) if ifnames else None, labels)
            print(text, flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        stream.close()
    print("Error: the agent closed the event stream", file=sys.stderr)
    return 1
