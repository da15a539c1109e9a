"""``pilus secret import|list|delete``: the Kubernetes Secrets that headerMatches use,
stored cluster-wide. Values are never printed: a listing shows keys and sizes."""

from __future__ import annotations

import argparse
import sys

from pilus.cli import common, output

HEADERS = ["NAMESPACE", "NAME", "TYPE", "KEYS"]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("secret", parents=[parent], help="manage the secrets headerMatches use",
                       description="Kubernetes v1 Secrets, stored cluster-wide, for the "
                                   "headerMatches secret of HTTP rules.")
    ssub = p.add_subparsers(dest="secret_cmd", metavar="COMMAND", required=True)
    imp = ssub.add_parser("import", parents=[parent], help="import Secrets from YAML/JSON (FILE or -)",
                          description="Import v1 Secret objects (multi-document YAML or a v1 List; "
                                      "data in base64 and/or stringData), all or nothing; a secret of "
                                      "the same namespace/name is replaced.")
    imp.add_argument("file", metavar="FILE|-", help="the YAML or JSON file, or - for standard input")
    common.add_output_option(imp)
    imp.set_defaults(func=cmd_import)
    ls = ssub.add_parser("list", parents=[parent], help="namespace, name, keys and sizes (never values)")
    common.add_output_option(ls)
    ls.set_defaults(func=cmd_list)
    rm = ssub.add_parser("delete", parents=[parent], help="delete one secret")
    rm.add_argument("ref", metavar="NS/NAME", type=_ref, help="the secret, as namespace/name")
    rm.set_defaults(func=cmd_delete)


def _ref(text: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME")
    return ns, name


def _keys(keys: dict) -> list[str]:
    return [f"{k} ({v} bytes)" for k, v in sorted((keys or {}).items())] or ["-"]


def format_secrets(secrets: list[dict]) -> str:
    rows = [[s.get("namespace", "?"), s.get("name", "?"), s.get("type", "?"), _keys(s.get("keys"))]
            for s in secrets]
    return output.table(HEADERS, rows) if rows else "No secrets\n"


def cmd_import(args: argparse.Namespace) -> int:
    from pilus.api.client import APIError

    text = common.read_input(args.file, "secret")
    if not text.strip():
        raise common.CLIError(f"{'standard input' if args.file == '-' else args.file} is empty: nothing to import")
    try:
        res = common.client(args).request("PUT", "/secret", {"yaml": text}) or {}
    except APIError as e:
        errors = e.body.get("errors") if isinstance(e.body, dict) else None
        if e.status != 400 or not errors:
            raise
        n = len(errors)
        print(f"Error: secrets not imported ({n} problem{'s' if n != 1 else ''}); nothing was written:",
              file=sys.stderr)
        for line in errors:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.output:
        output.emit(output.dump(res, args.output))
    else:
        for s in res.get("imported") or []:
            print(f"secret/{s.get('namespace')}/{s.get('name')} imported ({len(s.get('keys') or {})} keys)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    res = common.client(args).request("GET", "/secret") or {}
    secrets = res.get("secrets") or []
    output.emit(output.dump(secrets, args.output) if args.output else format_secrets(secrets))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    ns, name = args.ref
    common.client(args).request("DELETE", f"/secret/{ns}/{name}")
    print(f"secret/{ns}/{name} deleted")
    return 0
