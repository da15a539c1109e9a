"""``pilus policy import|get|delete|trace|selectors``: the network policies in force
(CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, Kubernetes NetworkPolicy), as
``cilium-dbg policy ...`` manages them."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from pilus.cli import common, output

PROTOCOLS = ("TCP", "UDP", "SCTP", "ICMP", "ANY")
SELECTOR_HEADERS = ["SELECTOR", "IDENTITIES", "USERS"]


# -- argument types ----------------------------------------------------------------------

def port_proto(text: str, *, protocols: tuple[str, ...] = PROTOCOLS, allow_zero: bool = True,
               example: str = "80/TCP") -> str:
    """``PORT[/PROTO]`` -> ``PORT/PROTO`` (protocol upper-cased, TCP when not given)."""
    port, sep, proto = text.strip().partition("/")
    proto = proto.upper() if sep else "TCP"
    low = 0 if allow_zero else 1
    if not port.isdigit() or not low <= int(port) <= 65535 or proto not in protocols:
        raise argparse.ArgumentTypeError(
            f"expected PORT[/PROTOCOL] such as {example}, with PORT {low}-65535 and PROTOCOL "
            f"one of {', '.join(protocols)}; got {text!r}")
    return f"{int(port)}/{proto}"


def trace_port(text: str) -> str:
    return port_proto(text)


def label_selector(text: str) -> str:
    """``k=v,k2=v2`` as the agent takes them (validated like endpoint labels)."""
    return ",".join(common.label_list(text))


# -- parser -------------------------------------------------------------------------------

def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("policy", parents=[parent], help="manage network policies",
                       description="Import, show, delete and trace the network policies in "
                                   "force: CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy "
                                   "and Kubernetes NetworkPolicy (networking.k8s.io/v1).")
    psub = p.add_subparsers(dest="policy_cmd", metavar="COMMAND", required=True)

    imp = psub.add_parser(
        "import", parents=[parent], help="import policies from a YAML/JSON file",
        description="Import policy documents: multi-document YAML, a JSON/YAML List "
                    "(kind: List, items: [...]) or a single document. All or nothing: when "
                    "any document is invalid nothing is applied and the previous revision "
                    "stays in force. A document with the same kind, namespace and name as one "
                    "in force replaces it.")
    imp.add_argument("file", metavar="FILE", help="the policy file, or - for standard input")
    common.add_output_option(imp)
    imp.set_defaults(func=cmd_import)

    g = psub.add_parser(
        "get", parents=[parent], help="show the policies in force",
        description="Print the policy documents in force as YAML (they can be imported "
                    "again), followed by the revision. -o json|yaml prints the API's data: "
                    "{revision, policies}.")
    common.add_output_option(g)
    g.set_defaults(func=cmd_get)

    d = psub.add_parser(
        "delete", aliases=["rm"], parents=[parent], help="delete policies",
        description="Delete one policy by name (every kind with that name in the namespace, "
                    "and a clusterwide policy of that name) or all of them.")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", metavar="NAME", default=None, help="the policy's metadata.name")
    which.add_argument("--all", action="store_true", help="delete every policy")
    d.add_argument("--namespace", "-n", metavar="NS", default=None,
                   help="namespace of the policy (with --name)")
    common.add_output_option(d)
    d.set_defaults(func=cmd_delete, _parser=d)

    t = psub.add_parser(
        "trace", parents=[parent], help="explain the verdict for a connection",
        description="Evaluate the policies in force for a connection from a source to a\n"
                    "destination port, and show which rules select each side and allow or\n"
                    "deny it (egress at the source, ingress at the destination). Each side\n"
                    "is a local endpoint (--src-endpoint), an address (--src-ip, resolved\n"
                    "through the ipcache as the datapath does) or pod labels (--src-labels,\n"
                    "in namespace --src-namespace, default 'default').",
        epilog="examples:\n"
               "  pilus policy trace --src-endpoint default/xwing --dst-endpoint "
               "default/deathstar --dport 80/TCP\n"
               "  pilus policy trace --src-labels org=alliance --dst-labels "
               "org=empire,class=deathstar --dport 80/TCP\n"
               "  pilus policy trace -s reserved:world --dst-endpoint 3 --dport 53/UDP",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for side, short, word in (("src", "-s", "source"), ("dst", "-d", "destination")):
        grp = t.add_mutually_exclusive_group(required=True)
        grp.add_argument(f"--{side}-endpoint", metavar="ENDPOINT", type=common.endpoint_ref,
                         default=None, help=f"{word} endpoint: ID or NAMESPACE/NAME")
        grp.add_argument(f"--{side}-ip", metavar="IP", type=_ipv4, default=None,
                         help=f"{word} address, resolved to its identity through the ipcache "
                              "(as the datapath does: a pod, the host, a CIDR identity or world)")
        grp.add_argument(f"--{side}-labels", short, metavar="K=V[,K=V...]",
                         type=label_selector, default=None,
                         help=f"{word} labels, e.g. org=empire,class=deathstar "
                              "(or reserved:world, reserved:host, ...)")
        t.add_argument(f"--{side}-namespace", metavar="NS", type=_namespace, default=None,
                       help=f"namespace of the {word} labels (with --{side}-labels; "
                            "default 'default')")
    t.add_argument("--dport", metavar="PORT[/PROTO]", type=trace_port, default=None,
                   help="destination port and protocol (TCP, UDP, SCTP, ICMP with the ICMP "
                        "type as port, ANY; default TCP), e.g. 80/TCP, 8/ICMP; omitted: port 0, "
                        "which only L3-only rules allow")
    common.add_output_option(t)
    t.set_defaults(func=cmd_trace, _parser=t)

    s = psub.add_parser(
        "selectors", parents=[parent], help="show each selector and the identities it selects",
        description="The selector cache: every selector of the policies in force, the "
                    "identities it selects now and how many rules use it.")
    common.add_output_option(s)
    s.add_argument("--no-headers", action="store_true", help="omit the header line")
    s.set_defaults(func=cmd_selectors)


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IPv4 address like 10.200.1.3, got {text!r}") from None


def _namespace(text: str) -> str:
    if not common._DNS_LABEL.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid namespace {text!r}: lowercase letters, digits and '-' (at most 63)")
    return text


# -- formatting ---------------------------------------------------------------------------

def _doc_name(item: dict) -> str:
    kind = item.get("kind") or "?"
    ns, name = item.get("namespace"), item.get("name") or "?"
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def format_imported(res: dict) -> str:
    imported = res.get("imported") or []
    lines = [f"Imported {len(imported)} polic{'y' if len(imported) == 1 else 'ies'}"
             + (":" if imported else "")]
    lines.extend(f"  {_doc_name(i)}" for i in imported if isinstance(i, dict))
    lines.append(f"Revision: {output.or_dash(res.get('revision'))}")
    return "\n".join(lines) + "\n"


def format_policies(res: dict) -> str:
    """The documents as multi-document YAML, re-importable; the revision as a comment."""
    import yaml

    docs = res.get("policies") or []
    text = ""
    if docs:
        text = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False,
                                  explicit_start=True)
    else:
        text = "# no policies in force\n"
    return text + f"# Revision: {output.or_dash(res.get('revision'))}\n"


def validation_problems(body) -> list[str]:
    """One line per problem from a 400 answer of PUT /v1/policy."""
    if not isinstance(body, dict):
        return []
    text = str(body.get("error") or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
    if errors and len(lines) < len(errors):
        lines = []
        for e in errors:
            where = f"document {e.get('doc_index', '?')}" + (f" ({e['doc']})" if e.get("doc") else "")
            path = e.get("path")
            lines.append(f"{where}: {path}: {e.get('reason')}" if path
                         else f"{where}: {e.get('reason')}")
    return lines


def format_trace(res: dict) -> str:
    lines = [str(ln) for ln in res.get("lines") or []]
    verdict = res.get("verdict")
    if verdict:
        final = f"Final verdict: {verdict}"
        if not lines or str(verdict) not in lines[-1]:
            lines.append(final)
    return "\n".join(lines) + "\n" if lines else "(the agent sent no trace)\n"


def format_selectors(rows: list[dict], no_headers: bool = False) -> str:
    table = []
    for r in sorted(rows, key=lambda r: str(r.get("selector", ""))):
        ids = [str(i) for i in sorted(r.get("identities") or [], key=_id_key)]
        table.append([str(r.get("selector", "?")), ids or [""], output.or_dash(r.get("users"))])
    return output.table(SELECTOR_HEADERS, table, no_headers=no_headers)


def _id_key(value):
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


# -- commands -----------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace) -> int:
    from pilus.api.client import APIError

    text = common.read_input(args.file, "policy")
    if not text.strip():
        raise common.CLIError(f"{'standard input' if args.file == '-' else args.file} "
                              "is empty: nothing to import")
    try:
        res = common.client(args).import_policy(text)
    except APIError as e:
        problems = validation_problems(e.body) if e.status == 400 else []
        if not problems:
            raise
        n = len(problems)
        print(f"Error: policy not imported ({n} problem{'s' if n != 1 else ''}); nothing was "
              "applied and the previous revision stays in force:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    for w in res.get("warnings") or []:
        print(f"Warning: {w}", file=sys.stderr)
    output.emit(output.dump(res, args.output) if args.output else format_imported(res))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    res = common.client(args).get_policy()
    output.emit(output.dump(res, args.output) if args.output else format_policies(res))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if args.all and args.namespace:
        args._parser.error("--namespace goes with --name, not with --all")
    res = common.client(args).delete_policy(args.name, args.namespace, all=args.all)
    if args.output:
        output.emit(output.dump(res, args.output))
        return 0
    n = res.get("deleted", 0)
    output.emit(f"Deleted {n} polic{'y' if n == 1 else 'ies'}\n"
                f"Revision: {output.or_dash(res.get('revision'))}\n")
    return 0


def trace_request(args: argparse.Namespace) -> dict:
    body: dict = {}
    for side in ("src", "dst"):
        ref = getattr(args, f"{side}_endpoint")
        labels = getattr(args, f"{side}_labels")
        ns = getattr(args, f"{side}_namespace")
        ip = getattr(args, f"{side}_ip", None)
        if ip is not None:
            if ns is not None:
                args._parser.error(f"--{side}-namespace goes with --{side}-labels")
            body[f"{side}_ip"] = ip
        elif ref is not None:
            if ns is not None:
                args._parser.error(f"--{side}-namespace goes with --{side}-labels "
                                   f"(--{side}-endpoint names its namespace: NAMESPACE/NAME)")
            body[f"{side}_endpoint"] = int(ref) if ref.isdigit() else ref
        else:
            body[f"{side}_labels"] = labels
            if ns is not None:
                body[f"{side}_namespace"] = ns
    if args.dport is not None:
        body["dport"] = args.dport
    return body


def cmd_trace(args: argparse.Namespace) -> int:
    body = trace_request(args)
    res = common.client(args).trace_policy(body)
    output.emit(output.dump(res, args.output) if args.output else format_trace(res))
    return 0


def cmd_selectors(args: argparse.Namespace) -> int:
    rows = common.client(args).policy_selectors()
    output.emit(output.dump(rows, args.output) if args.output
                else format_selectors(rows, args.no_headers))
    return 0
