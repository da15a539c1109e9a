"""``pilus``: the command line. Builds the argparse tree from one module per
command group and turns errors into one line on stderr.

Exit codes: 0 success; 1 the operation failed (``Error: <message>`` on stderr);
2 bad arguments (argparse's usage + message); ``exec`` passes the command's code.
"""

from __future__ import annotations

import argparse
import os
import sys

from pilus import __version__
from pilus.cli import bpf, cluster, common, endpoint, exec_cmd, identity, monitor, node, observe, policy, status
from pilus.cli import fqdn as fqdn_cmd
from pilus.cli import namespace as namespace_cmd
from pilus.cli import proxy as proxy_cmd
from pilus.cli import secret as secret_cmd
from pilus.cli import service as service_cmd
from pilus.cli import ui as ui_cmd

# global options that take a value (to find the subcommand before parsing)
_VALUE_OPTIONS = ("--cluster", "--node", "--socket")

EPILOG = """\
examples:
  pilus cluster up --nodes 2
  pilus endpoint create default/xwing --labels org=alliance,class=xwing
  pilus endpoint list
  pilus node list
  pilus exec default/xwing -- ping -c1 10.200.1.3
  pilus monitor --type drop
  pilus namespace create rebels --labels team=rebels
  pilus policy import policies.yaml
  pilus policy trace --src-endpoint default/xwing --dst-endpoint default/deathstar --dport 80/TCP
  pilus status

The agent is found through /run/pilus/<cluster>/cluster.json (first node unless
--node), or directly with --socket / PILUS_SOCK.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pilus",
        description="pilus: eBPF networking, observability and security for Linux workloads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pilus {__version__}")
    common.add_global_options(parser, suppress=False)
    parent = common.global_parent()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("agent", help="run the node agent (pilus agent --help for its options)",
                   add_help=False)
    cluster.register(sub, parent)
    endpoint.register(sub, parent)
    exec_cmd.register(sub, parent)
    identity.register(sub, parent)
    monitor.register(sub, parent)
    observe.register(sub, parent)
    node.register(sub, parent)
    status.register(sub, parent)
    bpf.register(sub, parent)
    policy.register(sub, parent)
    namespace_cmd.register(sub, parent)
    service_cmd.register(sub, parent)
    service_cmd.register_bpf_lb_under(sub, parent)
    proxy_cmd.register(sub, parent)
    fqdn_cmd.register(sub, parent)
    secret_cmd.register(sub, parent)
    ui_cmd.register(sub, parent)
    return parser


def _first_positional(argv: list[str]) -> int | None:
    """Index of the subcommand word in argv (global options may come first)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else None
        if arg in _VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return i
    return None


def _run_agent(argv: list[str]) -> int:
    from pilus import agent

    return int(agent.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    idx = _first_positional(argv)
    if idx is not None and argv[idx] == "agent":
        # everything after `agent` is the agent's own command line
        return _run_agent(argv[idx + 1:])

    parser = build_parser()
    args = parser.parse_args(argv)

    from pilus.api.client import ClientError

    try:
        return int(args.func(args) or 0)
    except (common.CLIError, ClientError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # output piped into `head` and the like: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
