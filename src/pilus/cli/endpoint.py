"""``pilus endpoint create|list|get|delete|labels``."""

from __future__ import annotations

import argparse
import re

from pilus import protocols
from pilus.cli import common, output
from pilus.cli.policy import port_proto

#: the protocols a named port may have (TCP, UDP, SCTP)
PORT_PROTOCOL_NAMES = tuple(protocols.name(p) for p in sorted(protocols.PORT_PROTOCOLS))

LIST_HEADERS = ["ENDPOINT", "NAME", "POLICY (ingress) ENFORCEMENT", "POLICY (egress) ENFORCEMENT",
                "IDENTITY", "LABELS (source:key[=value])", "IPv4", "STATUS"]


def _enforcement(ep: dict, direction: str) -> str:
    state = (ep.get("policy_enforcement") or {}).get(direction)
    return "-" if state is None else ("Enabled" if state else "Disabled")


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("endpoint", aliases=["ep"], parents=[parent],
                       help="manage endpoints (pods)",
                       description="Create, list, inspect, relabel and delete endpoints (pods).")
    esub = p.add_subparsers(dest="endpoint_cmd", metavar="COMMAND", required=True)

    c = esub.add_parser("create", parents=[parent], help="create an endpoint",
                        description="Create an endpoint: a network namespace with an IP from "
                                    "the node's pod CIDR and a security identity from its labels.")
    c.add_argument("name", metavar="NAME", type=common.endpoint_name,
                   help="NAMESPACE/NAME, or NAME for namespace 'default'")
    c.add_argument("-l", "--labels", metavar="K=V[,K=V...]", type=common.label_list,
                   action="extend", default=None, required=True,
                   help="pod labels, e.g. org=empire,class=deathstar (repeatable)")
    c.add_argument("--service-account", metavar="SA", default=None,
                   help="service account (default: 'default')")
    c.add_argument("-p", "--port", metavar="NAME=PORT[/PROTO]", type=named_port,
                   action=_NamedPorts, dest="named_ports", default=None,
                   help="a named container port that policies may use by name "
                        "(toPorts port: http), e.g. http=80/TCP; protocol TCP (default), "
                        "UDP or SCTP; repeatable")
    common.add_output_option(c)
    c.set_defaults(func=cmd_create)

    ls = esub.add_parser("list", aliases=["ls"], parents=[parent], help="list endpoints",
                         description="List the endpoints of the node, sorted by ID.")
    common.add_output_option(ls)
    ls.add_argument("--no-headers", action="store_true", help="omit the header line")
    ls.set_defaults(func=cmd_list)

    g = esub.add_parser("get", parents=[parent], help="show one endpoint",
                        description="Show one endpoint by ID or NAMESPACE/NAME.")
    g.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                   help="endpoint ID or NAMESPACE/NAME")
    common.add_output_option(g)
    g.set_defaults(func=cmd_get)

    d = esub.add_parser("delete", aliases=["rm"], parents=[parent], help="delete an endpoint",
                        description="Delete an endpoint (its namespace, veth, IP and map entries).")
    d.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                   help="endpoint ID or NAMESPACE/NAME")
    common.add_output_option(d)
    d.set_defaults(func=cmd_delete)

    lb = esub.add_parser("labels", parents=[parent], help="show or change an endpoint's labels",
                         description="Show an endpoint's labels, or change the pod labels of a "
                                     "live endpoint (as `kubectl label pod`): deletes apply "
                                     "first, then adds; the endpoint gets the identity of its "
                                     "new label set and policy follows.")
    lb.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                    help="endpoint ID or NAMESPACE/NAME")
    lb.add_argument("-a", "--add", metavar="K=V[,K=V...]", type=common.label_list,
                    action="extend", default=[],
                    help="pod labels to add, or whose value to replace (repeatable)")
    lb.add_argument("-d", "--delete", metavar="K[,K...]", type=common.label_list,
                    action="extend", default=[],
                    help="pod label keys to delete (repeatable); a key the pod lacks is an error")
    common.add_output_option(lb)
    lb.set_defaults(func=cmd_labels)


# IANA service name, as Kubernetes' ContainerPort.name: at most 15 lowercase letters,
# digits and '-', at least one letter, no '-' at either end or twice in a row
_PORT_NAME = re.compile(r"^[a-z0-9-]{1,15}$")


def _valid_port_name(name: str) -> bool:
    return (bool(_PORT_NAME.match(name)) and any(c.isalpha() for c in name)
            and not name.startswith("-") and not name.endswith("-") and "--" not in name)


def named_port(text: str) -> tuple[str, str]:
    """``http=80/TCP`` -> ('http', '80/TCP')."""
    name, sep, spec = text.partition("=")
    if not sep or not spec:
        raise argparse.ArgumentTypeError(
            f"expected NAME=PORT[/PROTOCOL] such as http=80/TCP, got {text!r}")
    if not _valid_port_name(name):
        raise argparse.ArgumentTypeError(
            f"invalid port name {name!r}: at most 15 lowercase letters, digits and '-', "
            "with at least one letter (e.g. http, dns-udp)")
    try:
        return name, port_proto(spec, protocols=PORT_PROTOCOL_NAMES, allow_zero=False)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"port {name}: {e}") from None


class _NamedPorts(argparse.Action):
    """Repeatable --port NAME=PORT[/PROTO] -> {NAME: 'PORT/PROTO'}; a name only once."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, spec = values
        ports = dict(getattr(namespace, self.dest, None) or {})
        if name in ports:
            parser.error(f"argument {option_string}: port name {name!r} given twice")
        ports[name] = spec
        setattr(namespace, self.dest, ports)


# -- formatting -------------------------------------------------------------------

def format_list(endpoints: list[dict], no_headers: bool = False) -> str:
    rows = []
    for ep in sorted(endpoints, key=lambda e: (e.get("id") is None, e.get("id") or 0)):
        rows.append([
            output.or_dash(ep.get("id")),
            output.or_dash(ep.get("name")),
            _enforcement(ep, "ingress"),
            _enforcement(ep, "egress"),
            output.or_dash(ep.get("identity")),
            output.sorted_labels(ep.get("labels")) or ["no labels"],
            output.or_dash(ep.get("ipv4")),
            output.or_dash(ep.get("state")),
        ])
    return output.table(LIST_HEADERS, rows, no_headers=no_headers)


def format_detail(ep: dict) -> str:
    return output.detail([
        ("ID", output.or_dash(ep.get("id"))),
        ("Name", output.or_dash(ep.get("name"))),
        ("Namespace", output.or_dash(ep.get("namespace"))),
        ("Pod", output.or_dash(ep.get("pod_name"))),
        ("State", output.or_dash(ep.get("state"))),
        ("Identity", output.or_dash(ep.get("identity"))),
        ("Labels", output.sorted_labels(ep.get("labels")) or ["-"]),
        ("Service account", output.or_dash(ep.get("service_account"))),
        *([("Named ports", [f"{k}={v}" for k, v in sorted(ep["named_ports"].items())])]
          if isinstance(ep.get("named_ports"), dict) and ep["named_ports"] else []),
        ("IPv4", output.or_dash(ep.get("ipv4"))),
        ("MAC", output.or_dash(ep.get("mac"))),
        ("Host MAC", output.or_dash(ep.get("host_mac"))),
        ("Interface", f"{output.or_dash(ep.get('interface_name'))} "
                      f"(ifindex {output.or_dash(ep.get('interface_index'))})"),
        ("Netns", output.or_dash(ep.get("netns"))),
        ("Created", output.or_dash(ep.get("created"))),
    ])


def format_labels(ep: dict) -> str:
    """cilium-dbg's `endpoint labels` view: each label and whether it counts for the identity."""
    identity = set(output.sorted_labels(ep.get("labels")))
    info = set(output.sorted_labels(ep.get("user_labels"))) - identity
    rows = [[label, "Orchestration identity" if label in identity else "Orchestration info"]
            for label in sorted(identity | info)]
    return output.table(["LABEL", "SOURCE"], rows)


def format_created(ep: dict) -> str:
    return (f"Endpoint {ep.get('id')} {ep.get('name')} created: identity {ep.get('identity')}, "
            f"IPv4 {ep.get('ipv4')}, interface {ep.get('interface_name')}, "
            f"state {ep.get('state')}\n")


# -- commands ----------------------------------------------------------------------

def cmd_create(args: argparse.Namespace) -> int:
    ep = common.client(args).create_endpoint(args.name, args.labels, args.service_account,
                                             named_ports=args.named_ports)
    output.emit(output.dump(ep, args.output) if args.output else format_created(ep))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    eps = common.client(args).list_endpoints()
    output.emit(output.dump(eps, args.output) if args.output
                else format_list(eps, args.no_headers))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    ep = common.client(args).get_endpoint(args.ref)
    output.emit(output.dump(ep, args.output) if args.output else format_detail(ep))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    res = common.client(args).delete_endpoint(args.ref)
    if args.output:
        output.emit(output.dump(res, args.output))
    else:
        deleted = res.get("deleted") if isinstance(res, dict) else None
        output.emit(f"Endpoint {deleted if deleted is not None else args.ref} deleted\n")
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    api = common.client(args)
    if not args.add and not args.delete:
        ep = api.get_endpoint(args.ref)
        output.emit(output.dump(ep, args.output) if args.output else format_labels(ep))
        return 0
    res = api.relabel_endpoint(args.ref, args.add, args.delete)
    if args.output:
        output.emit(output.dump(res, args.output))
        return 0
    ep, previous = res.get("endpoint") or {}, res.get("previous_identity")
    change = (f"identity {previous} -> {ep.get('identity')}" if previous != ep.get("identity")
              else f"identity {ep.get('identity')} unchanged")
    output.emit(f"Endpoint {ep.get('id')} {ep.get('name')} relabelled: {change}\n" + format_labels(ep))
    return 0
