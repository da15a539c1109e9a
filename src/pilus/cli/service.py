"""``pilus service import|create|list|get|delete|update`` and ``pilus bpf lb list|maglev get``."""

from __future__ import annotations

import argparse
import sys
from ipaddress import IPv4Address

from pilus.cli import common, output

STATES = ("active", "terminating", "quarantined", "maintenance")

_FLAG_NAMES = [
    (0x01, "ExternalIPs"),
    (0x02, "NodePort"),
    (0x04, "Local"),
    (0x08, "HostPort"),
    (0x10, "sessionAffinity"),
    (0x20, "LoadBalancer"),
]


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "service", parents=[parent], help="manage load-balanced services",
        description="Services: Kubernetes-style frontends (ClusterIP, NodePort, ExternalIPs, "
                    "LoadBalancer) translated to backends in the datapath.",
    )
    ssub = p.add_subparsers(dest="service_cmd", metavar="COMMAND", required=True)

    imp = ssub.add_parser("import", parents=[parent], help="create/replace services from YAML",
                          description="Create or replace services from a Kubernetes Service "
                                      "YAML (with optional Endpoints/EndpointSlice documents). "
                                      "All or nothing.")
    imp.add_argument("file", help="YAML file, or - for stdin")
    common.add_output_option(imp)
    imp.set_defaults(func=cmd_import)

    cr = ssub.add_parser(
        "create", parents=[parent], help="create/replace a service from flags",
        description="Create or replace one service.",
        epilog="example: pilus service create --name default/web --frontend 10.96.0.10:80/TCP "
               "--selector app=web --target-port 8080",
    )
    cr.add_argument("--name", required=True, type=common.endpoint_name, metavar="NS/NAME")
    cr.add_argument("--frontend", required=True, action="append", metavar="IP:PORT[/PROTO]",
                    help="ClusterIP frontend (repeat for more ports on the same IP)")
    cr.add_argument("--selector", metavar="K=V[,K=V]",
                    help="pods whose labels match are the backends")
    cr.add_argument("--backend", action="append", metavar="IP[:PORT]",
                    help="explicit backend instead of a selector (repeatable)")
    cr.add_argument("--target-port", metavar="PORT|NAME",
                    help="backend port (number or the pods' named port; default: frontend port)")
    cr.add_argument("--type", choices=("ClusterIP", "NodePort", "LoadBalancer"),
                    default="ClusterIP")
    cr.add_argument("--node-port", type=int, action="append", metavar="PORT",
                    help="node port per frontend (30000-32767)")
    cr.add_argument("--external-ip", action="append", metavar="IP", default=[])
    cr.add_argument("--lb-ip", metavar="IP", help="LoadBalancer ingress IP")
    cr.add_argument("--algorithm", choices=("random", "maglev"),
                    help="LB algorithm (annotation service.cilium.io/lb-algorithm)")
    cr.add_argument("--session-affinity-timeout", type=int, metavar="SECONDS",
                    help="ClientIP session affinity with this timeout")
    cr.add_argument("--external-traffic-policy", choices=("Cluster", "Local"))
    cr.add_argument("--internal-traffic-policy", choices=("Cluster", "Local"))
    common.add_output_option(cr)
    cr.set_defaults(func=cmd_create)

    ls = ssub.add_parser("list", aliases=["ls"], parents=[parent], help="list services",
                         description="One row per frontend: ID, frontend, type, backends.")
    common.add_output_option(ls)
    ls.set_defaults(func=cmd_list)

    get = ssub.add_parser("get", parents=[parent], help="show one service")
    get.add_argument("name", type=common.endpoint_name, metavar="NS/NAME")
    common.add_output_option(get)
    get.set_defaults(func=cmd_get)

    de = ssub.add_parser("delete", aliases=["rm"], parents=[parent], help="delete services",
                         description="Delete one service, every service of a namespace, or all.")
    de.add_argument("name", nargs="?", type=common.endpoint_name, metavar="NS/NAME")
    de.add_argument("--namespace", metavar="NS", help="delete every service of this namespace")
    de.add_argument("--all", action="store_true", help="delete every service")
    common.add_output_option(de)
    de.set_defaults(func=cmd_delete)

    up = ssub.add_parser("update", parents=[parent], help="change backend states",
                         description="Set the state of backends (all services using them): "
                                     "active, terminating, quarantined, maintenance.")
    up.add_argument("--backend-state", action="append", required=True, metavar="IP:PORT=STATE",
                    type=_backend_state)
    common.add_output_option(up)
    up.set_defaults(func=cmd_update)


def register_bpf_lb(bsub, parent: argparse.ArgumentParser) -> None:
    """``pilus bpf lb list`` / ``pilus bpf lb maglev get ID`` (under ``pilus bpf``)."""
    lb = bsub.add_parser("lb", parents=[parent], help="load-balancing maps",
                         description="The service load-balancing maps (pilus_lb4_*).")
    lsub = lb.add_subparsers(dest="sub", metavar="COMMAND", required=True)
    ls = lsub.add_parser("list", aliases=["ls"], parents=[parent],
                         help="list frontends and backend slots (pilus_lb4_svc)")
    common.add_output_option(ls)
    ls.set_defaults(func=cmd_bpf_lb_list)
    mg = lsub.add_parser("maglev", parents=[parent], help="Maglev lookup tables")
    msub = mg.add_subparsers(dest="maglev_cmd", metavar="COMMAND", required=True)
    g = msub.add_parser("get", parents=[parent], help="the Maglev table of one service id")
    g.add_argument("id", type=common.positive_int, metavar="SERVICE_ID")
    g.add_argument("--internal", action="store_true", help="the internal-scope table")
    common.add_output_option(g)
    g.set_defaults(func=cmd_bpf_lb_maglev)


def register_bpf_lb_under(sub, parent: argparse.ArgumentParser) -> None:
    """Add ``lb`` to the already registered ``pilus bpf`` command."""
    bpf_parser = sub.choices["bpf"]
    for action in bpf_parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            register_bpf_lb(action, parent)
            return
    raise RuntimeError("`pilus bpf` has no subcommands to add `lb` to")


# -- argument types -------------------------------------------------------------------

def _backend_state(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected IP:PORT=STATE, got {text!r}")
    be, state = text.rsplit("=", 1)
    if state not in STATES:
        raise argparse.ArgumentTypeError(f"state {state!r}: expected one of {', '.join(STATES)}")
    ip, _, port = be.rpartition(":")
    try:
        IPv4Address(ip)
        if not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"backend {be!r}: expected IP:PORT") from None
    return be, state


def parse_frontend(text: str) -> tuple[str, int, str]:
    proto = "TCP"
    body = text
    if "/" in text:
        body, proto = text.rsplit("/", 1)
        proto = proto.upper()
        if proto not in ("TCP", "UDP"):
            raise common.CLIError(f"--frontend {text!r}: protocol must be TCP or UDP")
    ip, sep, port = body.rpartition(":")
    try:
        IPv4Address(ip)
        pnum = int(port)
    except ValueError:
        raise common.CLIError(f"--frontend {text!r}: expected IP:PORT[/TCP|UDP]") from None
    if not sep or not 1 <= pnum <= 65535:
        raise common.CLIError(f"--frontend {text!r}: port must be 1-65535")
    return ip, pnum, proto


def build_service(args) -> dict:
    """The Kubernetes Service (and Endpoints) documents `service create` sends."""
    ns, name = args.name.split("/", 1)
    fronts = [parse_frontend(f) for f in args.frontend]
    ips = {f[0] for f in fronts}
    if len(ips) > 1:
        raise common.CLIError("all --frontend of one service share its cluster IP: "
                              f"got {', '.join(sorted(ips))}")
    if args.selector and args.backend:
        raise common.CLIError("use --selector or --backend, not both")
    node_ports = args.node_port or []
    if node_ports and len(node_ports) != len(fronts):
        raise common.CLIError("give one --node-port per --frontend")
    ports = []
    for i, (_, port, proto) in enumerate(fronts):
        p: dict = {"port": port, "protocol": proto}
        if len(fronts) > 1:
            p["name"] = f"{proto.lower()}-{port}"
        if args.target_port:
            tp = args.target_port
            p["targetPort"] = int(tp) if tp.isdigit() else tp
        if node_ports:
            p["nodePort"] = node_ports[i]
        ports.append(p)
    spec: dict = {"type": args.type, "clusterIP": fronts[0][0], "ports": ports}
    if args.selector:
        from pilus.loadbalancer.model import ServiceValidationError, parse_selector

        try:
            spec["selector"] = parse_selector(args.selector)
        except ServiceValidationError as e:
            raise common.CLIError(str(e)) from None
    if args.external_ip:
        spec["externalIPs"] = list(args.external_ip)
    if args.lb_ip:
        spec["loadBalancerIP"] = args.lb_ip
    if args.session_affinity_timeout:
        spec["sessionAffinity"] = "ClientIP"
        spec["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": args.session_affinity_timeout}}
    if args.external_traffic_policy:
        spec["externalTrafficPolicy"] = args.external_traffic_policy
    if args.internal_traffic_policy:
        spec["internalTrafficPolicy"] = args.internal_traffic_policy
    meta: dict = {"name": name, "namespace": ns}
    if args.algorithm:
        meta["annotations"] = {"service.cilium.io/lb-algorithm": args.algorithm}
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}]
    if args.backend:
        addrs = []
        ep_ports = []
        for b in args.backend:
            ip, _, port = b.partition(":")
            addrs.append({"ip": ip})
            if port:
                ep_ports.append(int(port) if port.isdigit() else port)
        if len(set(ep_ports)) > 1:
            raise common.CLIError("explicit --backend entries must share one port")
        subset: dict = {"addresses": addrs}
        if ep_ports or args.target_port:
            port = ep_ports[0] if ep_ports else args.target_port
            subset["ports"] = [{"name": p.get("name", ""), "port": int(port),
                                "protocol": p["protocol"]} for p in ports]
        docs.append({"apiVersion": "v1", "kind": "Endpoints", "metadata": {
            "name": name, "namespace": ns}, "subsets": [subset]})
    return {"kind": "List", "items": docs}


# -- formatting ------------------------------------------------------------------------

def _backend_line(b: dict) -> str:
    return f"{b.get('id')} => {b.get('address')} ({b.get('state')})"


def format_services(rows: list[dict]) -> str:
    table_rows = []
    for r in sorted(rows, key=lambda r: (r.get("id") or 0, r.get("scope") != "external")):
        kind = r.get("type", "?")
        if r.get("scope") == "internal":
            kind += " (internal)"
        bes = [_backend_line(b) for b in r.get("backends") or []] or [""]
        table_rows.append([str(r.get("id")), r.get("frontend", "?"), kind, bes])
    return output.table(["ID", "Frontend", "Service Type", "Backend"], table_rows)


def _flags(flags: int, flags2: int, scope: str) -> str:
    names = [n for bit, n in _FLAG_NAMES if flags & bit]
    if not flags & 0x23 and not flags & 0x01:
        names.insert(0, "ClusterIP")
    if flags2 & 0x10:
        names.append("InternalLocal")
    if flags2 & 0x20:
        names.append("two-scopes")
    if not flags & 0x40:
        names.append("non-routable")
    if scope == "internal":
        names.append("internal")
    return ", ".join(names)


def format_bpf_lb(entries: list[dict]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: (e.get("id") or 0, e.get("scope") != "external")):
        flags = _flags(e.get("flags", 0), e.get("flags2", 0), e.get("scope", "external"))
        lines = [f"0.0.0.0:0 ({e.get('id')}) (0) [{flags}] {e.get('algorithm')}"
                 + (f" affinity={e['affinity_timeout']}s" if e.get("affinity_timeout") else "")]
        for b in e.get("backends") or []:
            lines.append(f"{b.get('address') or '?'} ({e.get('id')}) ({b.get('slot')}) "
                         f"id={b.get('id')} {b.get('state')}")
        rows.append([e.get("frontend", "?"), lines])
    return output.table(["SERVICE ADDRESS", "BACKEND ADDRESS (REVNAT_ID) (SLOT)"], rows)


def format_maglev(data: dict) -> str:
    size = data.get("size") or 0
    out = [f"Service {data.get('id')} ({data.get('scope')}): Maglev table of {size} slots"]
    for b in data.get("backends") or []:
        share = 100.0 * b["slots"] / size if size else 0
        out.append(f"  backend {b['id']}: {b['slots']} slots ({share:.2f}%)")
    table = data.get("table") or []
    out.append("")
    for i in range(0, len(table), 16):
        out.append(f"[{i:6d}] " + " ".join(f"{x:5d}" for x in table[i:i + 16]))
    return "\n".join(out) + "\n"


# -- commands --------------------------------------------------------------------------

def _show(args, data, formatter) -> int:
    output.emit(output.dump(data, args.output) if args.output else formatter(data))
    return 0


#: an import of more services prints one summary line instead of every frontend
APPLIED_LISTED_MAX = 20


def _applied(res: dict) -> str:
    applied = res.get("applied") or []
    frontends = res.get("frontends") or []
    if len(applied) > APPLIED_LISTED_MAX:
        return (f"Applied {len(applied)} services ({len(frontends)} frontends): "
                "see `pilus service list`\n")
    return f"Applied {', '.join(applied)}\n" + format_services(frontends)


def cmd_import(args) -> int:
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file) as f:
                text = f.read()
    except OSError as e:
        raise common.CLIError(f"cannot read {args.file}: {e.strerror}") from e
    return _show(args, common.client(args).put_service(yaml_text=text), _applied)


def cmd_create(args) -> int:
    import json

    docs = build_service(args)
    return _show(args, common.client(args).put_service(yaml_text=json.dumps(docs)), _applied)


def cmd_list(args) -> int:
    return _show(args, common.client(args).list_services(), format_services)


def cmd_get(args) -> int:
    ns, name = args.name.split("/", 1)
    data = common.client(args).get_service(ns, name)

    def fmt(d):
        s = d.get("service") or {}
        ports = [f"{p['port']}/{p['protocol']} -> {p['target_port']}"
                 + (f" (nodePort {p['node_port']})" if p.get("node_port") else "")
                 for p in s.get("ports") or []]
        sel = s.get("selector")
        head = output.detail([
            ("Name", f"{s.get('namespace')}/{s.get('name')}"),
            ("Type", s.get("type")),
            ("ClusterIP", s.get("cluster_ip")),
            ("Ports", ports),
            ("Selector", ",".join(f"{k}={v}" for k, v in sel.items()) if sel else "-"),
            ("Algorithm", s.get("algorithm") or "(agent default)"),
            ("Session affinity", s.get("session_affinity")),
            ("Traffic policy", f"external={s.get('external_traffic_policy')} "
                               f"internal={s.get('internal_traffic_policy')}"),
        ])
        return head + "\n" + format_services(d.get("frontends") or [])

    return _show(args, data, fmt)


def cmd_delete(args) -> int:
    if sum((args.name is not None, args.namespace is not None, args.all)) != 1:
        raise common.CLIError("say which services: NS/NAME, --namespace NS or --all")
    if args.name is None:
        res = common.client(args).delete_services(args.namespace, all=args.all)
        return _show(args, res, lambda r: f"Deleted {r.get('deleted')} services\n")
    ns, name = args.name.split("/", 1)
    res = common.client(args).delete_service(ns, name)
    return _show(args, res, lambda r: f"Deleted service {r.get('deleted')}\n")


def cmd_update(args) -> int:
    c = common.client(args)
    results = [c.set_backend_state(be, state) for be, state in args.backend_state]
    return _show(args, results, lambda rs: "".join(
        f"Backend {r['backend']}: {r['state']} ({r['backends']} backend entries)\n" for r in rs))


def cmd_bpf_lb_list(args) -> int:
    return _show(args, common.client(args).bpf_lb(), format_bpf_lb)


def cmd_bpf_lb_maglev(args) -> int:
    data = common.client(args).bpf_lb_maglev(args.id, "internal" if args.internal else "external")
    return _show(args, data, format_maglev)
