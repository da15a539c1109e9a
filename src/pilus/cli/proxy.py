"""``pilus proxy status``: the node's L7 proxy, like the proxy part of ``cilium-dbg status --verbose``."""

from __future__ import annotations

import argparse
import time

from pilus.cli import common, output

LISTENER_HEADERS = ["LISTENER", "DIRECTION", "PORT", "RULE SETS", "FORWARDED", "DENIED", "PARSE ERRORS",
                    "UPSTREAM ERRORS", "CONNECTIONS", "ACTIVE"]
REDIRECT_HEADERS = ["ENDPOINT", "NAME", "INGRESS PORTS", "EGRESS PORTS"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("proxy", parents=[parent], help="show the node's L7 proxy",
                       description="The L7 (HTTP/gRPC) proxy the agent runs for rules.http.")
    psub = p.add_subparsers(dest="proxy_cmd", metavar="COMMAND", required=True)
    st = psub.add_parser("status", parents=[parent], help="ports, process, redirects and counters",
                         description="The proxy's listener ports, its process (pid, restarts), the "
                                     "ports redirected to it per endpoint, and per listener the "
                                     "requests forwarded, denied and refused as unparsable.")
    common.add_output_option(st)
    st.set_defaults(func=cmd_status)


def _ports(ports: list) -> str:
    return ", ".join(str(p) for p in ports) if ports else "-"


def format_status(s: dict) -> str:
    ports = s.get("ports") or {}
    proc = s.get("process") or {}
    if proc.get("running"):
        started = proc.get("started")
        up = f", up {output.duration(time.time() - started)}" if started else ""
        how = " (adopted)" if proc.get("adopted") else ""
        process = f"running, pid {proc.get('pid')}{how}{up}, restarts {output.or_dash(proc.get('restarts'))}"
    else:
        process = f"not running, restarts {output.or_dash(proc.get('restarts'))}"
    redirects = s.get("redirects") or []
    records = s.get("records") or {}
    lines: list[tuple[str, output.Cell]] = [
        ("Proxy ports", f"ingress {output.or_dash(ports.get('ingress'))}, "
                        f"egress {output.or_dash(ports.get('egress'))}"),
        ("Process", process),
        ("Generation", output.or_dash(s.get("generation"))),
        ("Redirects", f"{sum(len(r.get('ingress') or []) + len(r.get('egress') or []) for r in redirects)} "
                      f"on {len(redirects)} endpoints"),
        ("L7 records", f"{output.or_dash(records.get('received'))} received, {output.or_dash(records.get('bad'))} "
                       f"bad, {output.or_dash(s.get('records_dropped', 0))} dropped by the proxy"),
    ]
    for key in ("error", "last_error"):
        if s.get(key):
            lines.append(("Error" if key == "error" else "Last error", s[key]))
    out = output.status_lines(lines)
    listeners = s.get("listeners") or []
    if listeners:
        rows = [[li.get("name", "?"), li.get("direction", "?"), output.or_dash(li.get("port")),
                 output.or_dash(li.get("rule_sets")), output.or_dash(li.get("forwarded")),
                 output.or_dash(li.get("denied")), output.or_dash(li.get("parse_errors")),
                 output.or_dash(li.get("upstream_errors")), output.or_dash(li.get("connections")),
                 output.or_dash(li.get("active"))] for li in listeners]
        out += "\n" + output.table(LISTENER_HEADERS, rows)
    if redirects:
        rows = [[r.get("endpoint"), output.or_dash(r.get("name")), _ports(r.get("ingress") or []),
                 _ports(r.get("egress") or [])] for r in redirects]
        out += "\n" + output.table(REDIRECT_HEADERS, rows)
    return out


def cmd_status(args: argparse.Namespace) -> int:
    status = common.client(args).proxy_status()
    output.emit(output.dump(status, args.output) if args.output else format_status(status))
    return 0
