"""``pilus namespace create|label|list|delete``: namespaces and their labels, which
policies select with ``namespaceSelector`` (and endpoints carry as
``k8s:io.cilium.k8s.namespace.labels.<key>``)."""

from __future__ import annotations

import argparse
import re
import sys

from pilus.cli import common, output

METADATA_NAME = "kubernetes.io/metadata.name"  # set by the agent, as Kubernetes does
HEADERS = ["NAME", "LABELS"]

# Kubernetes label keys: [prefix/]name, prefix a DNS subdomain, name 1-63 characters
_KEY_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_KEY_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


# -- argument types -----------------------------------------------------------------------

def namespace_name(text: str) -> str:
    if not common._DNS_LABEL.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid namespace name {text!r}: 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit")
    return text


def _check_key(key: str, item: str) -> None:
    prefix, sep, name = key.rpartition("/")
    if not _KEY_NAME.match(name) or (sep and not _KEY_PREFIX.match(prefix)):
        raise argparse.ArgumentTypeError(
            f"invalid label key in {item!r}: expected [PREFIX/]NAME such as team or "
            "example.com/team (NAME: at most 63 letters, digits, '-', '_' or '.')")


def _check_value(value: str, item: str) -> None:
    if not _VALUE.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid label value in {item!r}: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit")


def label_pairs(text: str) -> dict[str, str]:
    """``k=v[,k2=v2]`` -> {k: v} (Kubernetes label syntax, no source prefix)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"invalid label {item!r}: expected KEY=VALUE[,KEY=VALUE...] such as "
                "team=rebels,env=prod")
        _check_key(key, item)
        _check_value(value, item)
        out[key] = value
    if not out:
        raise argparse.ArgumentTypeError("expected KEY=VALUE[,KEY=VALUE...], got nothing")
    return out


def label_change(text: str) -> tuple[str, str | None]:
    """``k=v`` (set) or ``k-`` (remove), as ``kubectl label``."""
    if "=" not in text and text.endswith("-"):
        key = text[:-1]
        _check_key(key, text)
        if key == METADATA_NAME:
            raise argparse.ArgumentTypeError(
                f"{METADATA_NAME} cannot be removed: every namespace carries its name")
        return key, None
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"invalid label change {text!r}: expected KEY=VALUE to set or KEY- to remove")
    _check_key(key, text)
    _check_value(value, text)
    if key == METADATA_NAME:
        raise argparse.ArgumentTypeError(
            f"{METADATA_NAME} is set by pilus to the namespace's name and cannot be changed")
    return key, value


class _MergeLabels(argparse.Action):
    """Repeatable --labels: merge the dicts."""

    def __call__(self, parser, namespace, values, option_string=None):
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


# -- parser -------------------------------------------------------------------------------

def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("namespace", aliases=["ns"], parents=[parent],
                       help="manage namespaces and their labels",
                       description="Namespaces and their labels. Policies select namespaces "
                                   "by these labels (namespaceSelector); every namespace "
                                   f"carries {METADATA_NAME}=<name>. Namespace 'default' "
                                   "always exists.")
    nsub = p.add_subparsers(dest="namespace_cmd", metavar="COMMAND", required=True)

    c = nsub.add_parser("create", parents=[parent], help="create a namespace",
                        description="Create a namespace, optionally with labels.")
    c.add_argument("name", metavar="NAME", type=namespace_name, help="namespace name")
    c.add_argument("-l", "--labels", metavar="K=V[,K=V...]", type=label_pairs,
                   action=_MergeLabels, default=None,
                   help="labels, e.g. team=rebels,env=prod (repeatable)")
    common.add_output_option(c)
    c.set_defaults(func=cmd_create)

    lb = nsub.add_parser("label", parents=[parent], help="set or remove labels of a namespace",
                         description="Change the labels of a namespace as `kubectl label` "
                                     "does: KEY=VALUE sets (adds or overwrites), KEY- removes; "
                                     "the other labels stay. Endpoints of the namespace get "
                                     "the new labels (and maybe a new identity) at once.")
    lb.add_argument("name", metavar="NAME", type=namespace_name, help="namespace name")
    lb.add_argument("changes", metavar="KEY=VALUE|KEY-", type=label_change, nargs="+",
                    help="label to set (KEY=VALUE) or remove (KEY-)")
    common.add_output_option(lb)
    lb.set_defaults(func=cmd_label)

    ls = nsub.add_parser("list", aliases=["ls"], parents=[parent], help="list namespaces",
                         description="List the namespaces and their labels.")
    common.add_output_option(ls)
    ls.add_argument("--no-headers", action="store_true", help="omit the header line")
    ls.set_defaults(func=cmd_list)

    d = nsub.add_parser("delete", aliases=["rm"], parents=[parent], help="delete a namespace",
                        description="Delete a namespace (its labels). Endpoints in it are not "
                                    "deleted.")
    d.add_argument("name", metavar="NAME", type=namespace_name, help="namespace name")
    common.add_output_option(d)
    d.set_defaults(func=cmd_delete)


# -- formatting ---------------------------------------------------------------------------

def _label_lines(labels: dict | None) -> list[str]:
    return [f"{k}={v}" for k, v in sorted((labels or {}).items())]


def format_list(namespaces: list[dict], no_headers: bool = False) -> str:
    rows = [[str(n.get("name", "?")), _label_lines(n.get("labels")) or ["-"]]
            for n in sorted(namespaces, key=lambda n: str(n.get("name", "")))]
    return output.table(HEADERS, rows, no_headers=no_headers)


def format_namespace(ns: dict, verb: str) -> str:
    labels = ", ".join(_label_lines(ns.get("labels"))) or "no labels"
    return f"Namespace {ns.get('name')} {verb}: {labels}\n"


# -- commands -----------------------------------------------------------------------------

def _find(namespaces: list[dict], name: str) -> dict | None:
    for n in namespaces:
        if isinstance(n, dict) and n.get("name") == name:
            return n
    return None


def _show(args, data, verb: str) -> int:
    output.emit(output.dump(data, args.output) if args.output else format_namespace(data, verb))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    client = common.client(args)
    if _find(client.list_namespaces(), args.name) is not None:
        raise common.CLIError(
            f"namespace {args.name} already exists: change its labels with "
            f"`pilus namespace label {args.name} KEY=VALUE ...`")
    labels = dict(args.labels or {})
    if labels.get(METADATA_NAME, args.name) != args.name:
        raise common.CLIError(f"{METADATA_NAME} is always the namespace's name ({args.name})")
    return _show(args, client.put_namespace(args.name, labels), "created")


def cmd_label(args: argparse.Namespace) -> int:
    client = common.client(args)
    current = _find(client.list_namespaces(), args.name)
    if current is None:
        raise common.CLIError(
            f"namespace {args.name} not found: create it with `pilus namespace create "
            f"{args.name}`")
    labels = dict(current.get("labels") or {})
    for key, value in args.changes:
        if value is None:
            if key not in labels:
                print(f"Warning: label {key!r} not found on namespace {args.name}",
                      file=sys.stderr)
            labels.pop(key, None)
        else:
            labels[key] = value
    labels.pop(METADATA_NAME, None)  # the agent sets it
    return _show(args, client.put_namespace(args.name, labels), "labeled")


def cmd_list(args: argparse.Namespace) -> int:
    data = common.client(args).list_namespaces()
    output.emit(output.dump(data, args.output) if args.output
                else format_list(data, args.no_headers))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    res = common.client(args).delete_namespace(args.name)
    if args.output:
        output.emit(output.dump(res, args.output))
    else:
        output.emit(f"Namespace {args.name} deleted\n")
    return 0
