"""``pilus fqdn cache list|clean``: the DNS names the node's DNS proxy saw answered, per
endpoint, as ``cilium-dbg fqdn cache`` shows and cleans them (GET/DELETE /v1/fqdn/cache)."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlencode

from pilus.cli import common, output

#: cilium-dbg fqdn cache list's columns
CACHE_HEADERS = ["Endpoint", "Source", "FQDN", "TTL", "ExpirationTime", "IPs"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("fqdn", parents=[parent], help="the FQDN cache (DNS names -> IPs) of toFQDNs",
                       description="The DNS answers the agent's DNS proxy saw, per endpoint; toFQDNs "
                                   "policy allows the IPs of the names it selects.")
    psub = p.add_subparsers(dest="fqdn_cmd", metavar="COMMAND", required=True)
    cache = psub.add_parser("cache", parents=[parent], help="list or clean the FQDN cache",
                            description="The FQDN cache: names, their IPs and TTLs, per endpoint.")
    csub = cache.add_subparsers(dest="fqdn_cache_cmd", metavar="COMMAND", required=True)
    ls = csub.add_parser("list", parents=[parent], help="list the cache's entries",
                         description="One row per (endpoint, name): where it came from (lookup: a DNS "
                                     "answer; connection: expired, kept while a connection uses an IP), "
                                     "its TTL, when it expires and its IPs.")
    ls.add_argument("-e", "--endpoint", metavar="ID", help="only this endpoint's entries")
    ls.add_argument("-n", "--matchpattern", metavar="PATTERN",
                    help="only names that match this matchPattern (e.g. '*.cilium.io')")
    common.add_output_option(ls)
    ls.set_defaults(func=cmd_list)
    clean = csub.add_parser("clean", parents=[parent], help="forget the cache's entries",
                            description="Forget the cached names (all, or one endpoint's); toFQDNs "
                                        "policy then allows their IPs again only after a new lookup.")
    clean.add_argument("-e", "--endpoint", metavar="ID", help="only this endpoint's entries")
    clean.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    clean.set_defaults(func=cmd_clean)


def _query(**params: str | None) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return "?" + urlencode(given) if given else ""


def format_cache(entries: list[dict]) -> str:
    rows = [[e.get("endpoint"), output.or_dash(e.get("source")), output.or_dash(e.get("fqdn")),
             output.or_dash(e.get("ttl")), output.or_dash(e.get("expiration_time")),
             ",".join(e.get("ips") or []) or "-"] for e in entries]
    return output.table(CACHE_HEADERS, rows)


def cmd_list(args: argparse.Namespace) -> int:
    entries = common.client(args).request(
        "GET", "/fqdn/cache" + _query(endpoint=args.endpoint, matchpattern=args.matchpattern)) or []
    output.emit(output.dump(entries, args.output) if args.output else format_cache(entries))
    return 0


def _confirmed(what: str) -> bool:
    sys.stdout.write(f"Are you sure you want to clean {what}? [y/N] ")
    sys.stdout.flush()
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):  # no usable stdin: no
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_clean(args: argparse.Namespace) -> int:
    what = f"endpoint {args.endpoint}'s FQDN cache" if args.endpoint is not None else "the FQDN cache"
    if not args.force and not _confirmed(what):
        raise common.CLIError(f"did not clean {what} (not confirmed; -f skips the question)")
    result = common.client(args).request("DELETE", "/fqdn/cache" + _query(endpoint=args.endpoint)) or {}
    output.emit(f"Deleted {result.get('deleted', 0)} entries from {what}\n")
    return 0
