"""``pilus exec NAME -- CMD...``: run a command inside an endpoint's network namespace."""

from __future__ import annotations

import argparse
import os
import shutil

from pilus.cli import common


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "exec", parents=[parent], help="run a command in an endpoint's network namespace",
        description="Run CMD inside the network namespace of an endpoint (like kubectl exec). "
                    "The command's exit code is pilus's exit code.",
        epilog="example: pilus exec default/xwing -- curl -s http://10.200.1.3/")
    p.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                   help="endpoint ID or NAMESPACE/NAME")
    p.add_argument("cmd", metavar="-- CMD", nargs=argparse.REMAINDER,
                   help="the command and its arguments")
    p.set_defaults(func=cmd_exec, _parser=p)


def netns_command(netns: str, command: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *command]


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        args._parser.error("a command is required: pilus exec ENDPOINT -- CMD [ARG...]")
    ep = common.client(args).get_endpoint(args.ref)
    netns = ep.get("netns")
    if not netns:
        raise common.CLIError(f"endpoint {args.ref} has no network namespace (state "
                              f"{ep.get('state')})")
    if shutil.which("ip") is None:
        raise common.CLIError("the `ip` command (iproute2) is not installed")
    argv = netns_command(netns, command)
    try:
        os.execvp("ip", argv)
    except OSError as e:  # pragma: no cover - execvp only returns on failure
        raise common.CLIError(f"cannot run {' '.join(argv)}: {e}") from e
    return 127  # pragma: no cover
