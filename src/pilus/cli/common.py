"""What every command shares: global options, finding the agent's socket, errors,
and the argument types (endpoint names, labels) that argparse validates."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

DEFAULT_CLUSTER = "default"
DEFAULT_STATE_ROOT = "/run/pilus"
DEFAULT_NAMESPACE = "default"


class CLIError(Exception):
    """A failure to report as one line on stderr (``Error: <message>``), exit 1."""


# -- global options -------------------------------------------------------------

def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--cluster/--node/--socket.

    The top-level parser carries the real defaults (None); every subcommand parser
    accepts the same options with SUPPRESS defaults so that ``pilus endpoint list
    --node n2`` works and an option given before the subcommand is not reset.
    """
    default = argparse.SUPPRESS if suppress else None
    g = parser.add_argument_group("global options")
    g.add_argument("--cluster", metavar="NAME", default=default,
                   help="cluster to talk to (env PILUS_CLUSTER; default 'default')")
    g.add_argument("--node", metavar="NAME", default=default,
                   help="node of the cluster whose agent to ask (default: the first node)")
    g.add_argument("--socket", metavar="PATH", default=default,
                   help="agent API socket; overrides --cluster/--node (env PILUS_SOCK)")


def global_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    add_global_options(parent, suppress=True)
    return parent


def add_output_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("json", "yaml"), default=None,
                        help="print the API's data as json or yaml instead of a table")


# -- where things are -----------------------------------------------------------

def state_root() -> Path:
    """Root of the clusters' state (``/run/pilus``; env PILUS_STATE_ROOT for tests)."""
    return Path(os.environ.get("PILUS_STATE_ROOT") or DEFAULT_STATE_ROOT)


def cluster_name(args: argparse.Namespace) -> str:
    return (getattr(args, "cluster", None) or os.environ.get("PILUS_CLUSTER")
            or DEFAULT_CLUSTER)


def read_cluster_file(name: str, root: Path | None = None) -> dict | None:
    """The cluster's ``cluster.json`` or None when there is no such cluster."""
    path = (root or state_root()) / name / "cluster.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else None


def no_cluster_message(name: str) -> str:
    cmd = "pilus cluster up" + ("" if name == DEFAULT_CLUSTER else f" --name {name}")
    return f"no pilus cluster named '{name}' is up: run `{cmd}`"


def pick_node(info: dict, cluster: str, wanted: str | None) -> dict:
    nodes = [n for n in info.get("nodes") or [] if isinstance(n, dict)]
    if not nodes:
        raise CLIError(f"cluster '{cluster}' has no nodes: run `pilus cluster up` again")
    if not wanted:
        return nodes[0]
    for n in nodes:
        # accept the full name (default-node2) and the short one (node2)
        if n.get("name") in (wanted, f"{cluster}-{wanted}"):
            return n
    names = ", ".join(str(n.get("name")) for n in nodes)
    raise CLIError(f"cluster '{cluster}' has no node named '{wanted}' (nodes: {names})")


def node_socket(node: dict) -> str:
    if node.get("socket"):
        return str(node["socket"])
    if node.get("state_dir"):
        return str(Path(node["state_dir"]) / "pilus.sock")
    raise CLIError(f"cluster.json gives no socket for node '{node.get('name')}'")


def resolve_socket(args: argparse.Namespace) -> str:
    """--socket > PILUS_SOCK > the chosen node of ``/run/pilus/<cluster>/cluster.json``."""
    if getattr(args, "socket", None):
        return args.socket
    env = os.environ.get("PILUS_SOCK")
    if env:
        return env
    name = cluster_name(args)
    info = read_cluster_file(name)
    if info is None:
        raise CLIError(no_cluster_message(name))
    return node_socket(pick_node(info, name, getattr(args, "node", None)))


def client(args: argparse.Namespace):
    from pilus.api.client import Client

    return Client(resolve_socket(args))


# -- argument types -------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([A-Za-z0-9][-A-Za-z0-9_.]*:)?[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def endpoint_name(text: str) -> str:
    """``ns/name`` or ``name`` (namespace 'default') -> ``ns/name``."""
    ns, sep, name = text.rpartition("/")
    if not sep:
        ns = DEFAULT_NAMESPACE
    if not _DNS_LABEL.match(ns):
        raise argparse.ArgumentTypeError(
            f"invalid namespace {ns!r} in {text!r}: expected NAME or NAMESPACE/NAME, the namespace "
            "made of lowercase letters, digits and '-' (at most 63)")
    if not _DNS_SUBDOMAIN.match(name):
        raise argparse.ArgumentTypeError(
            f"invalid endpoint name {name!r}: expected NAME or NAMESPACE/NAME, the name made of "
            "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")
    return f"{ns}/{name}"


def endpoint_ref(text: str) -> str:
    """An endpoint ID (digits) or a name (``ns/name`` or ``name``)."""
    if text.isdigit():
        return text
    try:
        return endpoint_name(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"expected an endpoint ID (a number) or NAMESPACE/NAME, got {text!r}") from e


def label_list(text: str) -> list[str]:
    """``k=v,k2=v2`` -> ['k=v', 'k2=v2'] (a ``source:`` prefix is allowed, '=v' optional)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition("=")
        if not _LABEL_KEY.match(key) or len(key) > 317:
            raise argparse.ArgumentTypeError(
                f"invalid label {item!r}: expected KEY=VALUE[,KEY=VALUE...] such as "
                "org=empire,class=deathstar")
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise argparse.ArgumentTypeError(
                f"invalid label value in {item!r}: at most 63 letters, digits, '-', '_' or '.'")
        out.append(item)
    if not out:
        raise argparse.ArgumentTypeError("expected KEY=VALUE[,KEY=VALUE...], got nothing")
    return out


def identity_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if value < 0 or value > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"expected a numeric identity (e.g. 12345), got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def read_input(path: str, kind: str) -> str:
    """The text of a file to import (``-``: standard input); ``kind`` names it in errors."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise CLIError(f"{kind} file {path} not found") from None
    except IsADirectoryError:
        raise CLIError(f"{path} is a directory: give a YAML or JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {path}: {e}") from e
