"""``pilus bpf ipcache|endpoint|ct|metrics|policy ...`` and ``pilus metrics list``."""

from __future__ import annotations

import argparse
import re

from pilus import protocols
from pilus.cli import common, output


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bpf", parents=[parent], help="show the datapath's BPF maps",
                       description="Read (and flush) the node's BPF maps.")
    bsub = p.add_subparsers(dest="bpf_cmd", metavar="MAP", required=True)

    def list_cmd(group_sub, func, help_, extra=None):
        ls = group_sub.add_parser("list", aliases=["ls"], parents=[parent], help=help_,
                                  description=help_[0].upper() + help_[1:] + ".")
        if extra:
            extra(ls)
        common.add_output_option(ls)
        ls.set_defaults(func=func)
        return ls

    ipc = bsub.add_parser("ipcache", parents=[parent], help="IP prefix -> identity map",
                          description="The ipcache map: IP prefixes -> security identity and "
                                      "tunnel endpoint.")
    list_cmd(ipc.add_subparsers(dest="sub", metavar="COMMAND", required=True),
             cmd_ipcache_list, "list the ipcache map (pilus_ipcache)")

    tun = bsub.add_parser("tunnel", parents=[parent], help="remote pod CIDR -> node IP (tunnel mode)",
                          description="The tunnel map (pilus_tunnel_map): other nodes' pod CIDRs "
                                      "and the node IPs their packets are encapsulated to.")
    list_cmd(tun.add_subparsers(dest="sub", metavar="COMMAND", required=True),
             cmd_tunnel_list, "list the tunnel map (pilus_tunnel_map)")

    epm = bsub.add_parser("endpoint", parents=[parent], help="local endpoint map",
                          description="The local endpoint map (pilus_lxc): endpoint IP -> "
                                      "ifindex, MACs, endpoint ID, identity.")
    list_cmd(epm.add_subparsers(dest="sub", metavar="COMMAND", required=True),
             cmd_endpoint_list, "list the local endpoint map (pilus_lxc)")

    ct = bsub.add_parser("ct", parents=[parent], help="connection tracking table",
                         description="The connection tracking table (pilus_ct4).")
    ctsub = ct.add_subparsers(dest="sub", metavar="COMMAND", required=True)

    def global_arg(parser):
        # cilium-dbg takes `global` (the only table here); accept it for muscle memory
        parser.add_argument("table", nargs="?", choices=("global",), default="global",
                            help=argparse.SUPPRESS)

    list_cmd(ctsub, cmd_ct_list, "list connection tracking entries", global_arg)
    fl = ctsub.add_parser("flush", parents=[parent], help="delete all connection tracking entries",
                          description="Delete every entry of the connection tracking table.")
    global_arg(fl)
    common.add_output_option(fl)
    fl.set_defaults(func=cmd_ct_flush)

    met = bsub.add_parser("metrics", parents=[parent], help="datapath counters",
                          description="The datapath's packet/byte counters by reason and "
                                      "direction (pilus_metrics).")
    list_cmd(met.add_subparsers(dest="sub", metavar="COMMAND", required=True),
             cmd_bpf_metrics_list, "list datapath counters (pilus_metrics)")

    pol = bsub.add_parser("policy", parents=[parent], help="per-endpoint policy map",
                          description="An endpoint's policy map: the identities, ports and "
                                      "directions it allows or denies, with counters.")
    polsub = pol.add_subparsers(dest="sub", metavar="COMMAND", required=True)
    pg = polsub.add_parser("get", parents=[parent], help="show an endpoint's policy map",
                           description="Show the policy map of one endpoint, as cilium-dbg bpf "
                                       "policy get: POLICY, DIRECTION, IDENTITY and its labels, "
                                       "PORT/PROTO, PROXY PORT, BYTES, PACKETS, PREFIX.")
    pg.add_argument("ref", metavar="ENDPOINT", type=common.endpoint_ref,
                    help="endpoint ID or NAMESPACE/NAME")
    pg.add_argument("-n", "--numeric", action="store_true",
                    help="numeric identities only (no LABELS column, no identity lookup)")
    common.add_output_option(pg)
    pg.set_defaults(func=cmd_bpf_policy_get)

    m = sub.add_parser("metrics", parents=[parent], help="show the agent's metrics",
                       description="The agent's metrics (the Prometheus ones), name, labels "
                                   "and value.")
    msub = m.add_subparsers(dest="sub", metavar="COMMAND", required=True)

    def pattern_arg(parser):
        parser.add_argument("-p", "--match-pattern", metavar="REGEX", default=None,
                            help="only metrics whose name matches REGEX")

    list_cmd(msub, cmd_metrics_list, "list the agent's metrics", pattern_arg)


# -- formatting ---------------------------------------------------------------------

def format_ipcache(entries: list[dict]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: _prefix_key(e.get("prefix"))):
        rows.append([e.get("prefix", "?"),
                     f"identity={output.or_dash(e.get('identity'))} "
                     f"tunnelendpoint={e.get('tunnel_endpoint') or '0.0.0.0'}"])
    return output.table(["IP PREFIX/ADDRESS", "IDENTITY"], rows)


def format_tunnel(entries: list[dict]) -> str:
    if not entries:
        return "No tunnel entries (native routing, or no other node yet)."
    rows = [[e.get("prefix", "?"), e.get("endpoint", "?")]
            for e in sorted(entries, key=lambda e: _prefix_key(e.get("prefix")))]
    return output.table(["TUNNEL", "VALUE"], rows)


def _prefix_key(prefix):
    import ipaddress

    try:
        net = ipaddress.ip_network(str(prefix), strict=False)
        return (0, int(net.network_address), net.prefixlen)
    except ValueError:
        return (1, 0, str(prefix))


def format_bpf_endpoints(entries: list[dict]) -> str:
    rows = []
    for e in sorted(entries, key=lambda e: _prefix_key(e.get("ip"))):
        flags = e.get("flags")
        flags = f"0x{flags:04x}" if isinstance(flags, int) else output.or_dash(flags)
        info = (f"id={output.or_dash(e.get('ep_id'))} "
                f"sec_id={output.or_dash(e.get('identity'))} flags={flags} "
                f"ifindex={output.or_dash(e.get('ifindex'))} mac={output.or_dash(e.get('mac'))} "
                f"nodemac={output.or_dash(e.get('host_mac'))}")
        rows.append([f"{e.get('ip', '?')}:0", info])
    return output.table(["IP ADDRESS", "LOCAL ENDPOINT INFO"], rows)


def _ct_flags(flags) -> str:
    if isinstance(flags, int):
        return f"0x{flags:04x}"
    if isinstance(flags, (list, tuple)):
        return "[ " + " ".join(str(f) for f in flags) + " ]" if flags else "[ ]"
    return output.or_dash(flags)


def _ct_endpoint(ip, port) -> str:
    return f"{ip}:{port}" if port is not None else str(ip)


def format_ct(entries: list[dict]) -> str:
    """cilium-dbg bpf ct list global: one entry per line."""
    lines = []
    for e in entries:
        proto = str(e.get("proto") or "?").upper()
        direction = str(e.get("direction") or "?").upper()
        lines.append(
            f"{proto} {direction} {_ct_endpoint(e.get('src'), e.get('sport'))} -> "
            f"{_ct_endpoint(e.get('dst'), e.get('dport'))} "
            f"expires={output.or_dash(e.get('expires_in_s'))} "
            f"Packets={output.or_dash(e.get('packets'))} Bytes={output.or_dash(e.get('bytes'))} "
            f"Flags={_ct_flags(e.get('flags'))}")
    return "".join(line + "\n" for line in lines) if lines else "No entries found.\n"


def format_bpf_metrics(entries: list[dict]) -> str:
    rows = [[e.get("reason_desc") or f"reason {e.get('reason')}",
             str(e.get("direction") or "?").upper(),
             output.number(e.get("packets")), output.number(e.get("bytes"))]
            for e in sorted(entries, key=lambda e: (e.get("reason") or 0,
                                                    str(e.get("direction"))))]
    return output.table(["REASON", "DIRECTION", "PACKETS", "BYTES"], rows)


def _is_any_proto(e: dict) -> bool:
    proto = e.get("proto")
    if isinstance(proto, str) and not proto.isdigit():
        return proto.upper() in ("", "ANY")
    return not int(proto or 0)


def _policy_prefix(e: dict) -> str:
    """cilium-dbg's PREFIX: the LPM prefix over protocol (8 bits) and port (16 bits), 0..24."""
    plen = e.get("prefix_len")
    if _is_any_proto(e):
        return "0"
    return str(8 + plen) if isinstance(plen, int) else output.or_dash(plen)


def _policy_port(e: dict) -> str:
    """The agent's ``port`` text, else from the key: ``ANY`` (L3-only), ``ANY/TCP`` (any
    port), ``80/TCP``, or a range ``8080-8083/TCP`` when ``prefix_len`` (the significant
    leading bits of dport, 0..16) is below 16."""
    if e.get("port"):
        return str(e["port"])
    proto = e.get("proto")
    if isinstance(proto, str) and not proto.isdigit():
        proto_name = proto.upper()
        wildcard = proto_name in ("", "ANY")
    else:
        num = int(proto or 0)
        proto_name = protocols.name(num)
        wildcard = num == 0
    if wildcard:
        return "ANY"
    dport = e.get("dport")
    dport = int(dport) if str(dport).isdigit() else 0
    plen = e.get("prefix_len")
    if plen == 0 or (plen is None and not dport):
        return f"ANY/{proto_name}"
    if isinstance(plen, int) and 0 < plen < 16:
        return f"{dport}-{dport + (1 << (16 - plen)) - 1}/{proto_name}"
    return f"{dport}/{proto_name}"


def _identity_labels(ident, labels_by_id: dict[int, list[str]]) -> list[str]:
    if ident in (0, "0", None):
        return ["ANY"]
    labels = labels_by_id.get(int(ident)) if str(ident).isdigit() else None
    return sorted(labels) if labels else ["(unknown identity)"]


def _policy_sort_key(e: dict):
    ident = e.get("identity")
    return (str(e.get("direction") or "").lower() != "ingress",
            int(ident) if str(ident).isdigit() else -1, _policy_port(e))


def format_bpf_policy(data: dict, labels_by_id: dict[int, list[str]] | None = None) -> str:
    """cilium-dbg bpf policy get: one row per map entry; with labels_by_id (not -n) a LABELS
    column beside the numeric IDENTITY, one label per line."""
    entries = [e for e in (data.get("entries") or []) if isinstance(e, dict)]
    if not entries:
        ep = data.get("name") or data.get("endpoint")
        return (f"Policy map of endpoint {ep} is empty: no policy selects it, or "
                "enforcement is off (all traffic allowed)\n")
    headers = ["POLICY", "DIRECTION", "IDENTITY"]
    if labels_by_id is not None:
        headers.append("LABELS (source:key[=value])")
    headers += ["PORT/PROTO", "PROXY PORT", "BYTES", "PACKETS", "PREFIX"]
    rows = []
    for e in sorted(entries, key=_policy_sort_key):
        proxy = e.get("proxy_port")
        row = ["Deny" if e.get("deny") else "Allow",
               str(e.get("direction") or "?").capitalize(),
               output.or_dash(e.get("identity"))]
        if labels_by_id is not None:
            row.append(_identity_labels(e.get("identity"), labels_by_id))
        row += [_policy_port(e), str(proxy) if proxy else "NONE",
                output.number(e.get("bytes", 0)), output.number(e.get("packets", 0)),
                _policy_prefix(e)]
        rows.append(row)
    return output.table(headers, rows)


def format_metrics(entries: list[dict], pattern: str | None = None) -> str:
    rx = re.compile(pattern) if pattern else None
    rows = []
    for e in sorted(entries, key=lambda e: (e.get("name", ""), sorted((e.get("labels") or {})
                                                                      .items()))):
        name = e.get("name", "?")
        if rx and not rx.search(name):
            continue
        labels = " ".join(f"{k}={v}" for k, v in sorted((e.get("labels") or {}).items()))
        rows.append([name, labels, output.number(e.get("value"))])
    return output.table(["Metric", "Labels", "Value"], rows)


# -- commands -------------------------------------------------------------------------

def _show(args, data, formatter) -> int:
    output.emit(output.dump(data, args.output) if args.output else formatter(data))
    return 0


def cmd_ipcache_list(args) -> int:
    return _show(args, common.client(args).bpf_ipcache(), format_ipcache)


def cmd_tunnel_list(args) -> int:
    return _show(args, common.client(args).bpf_tunnel(), format_tunnel)


def cmd_endpoint_list(args) -> int:
    return _show(args, common.client(args).bpf_endpoints(), format_bpf_endpoints)


def cmd_ct_list(args) -> int:
    return _show(args, common.client(args).bpf_ct(), format_ct)


def cmd_ct_flush(args) -> int:
    res = common.client(args).bpf_ct_flush() or {}
    if args.output:
        output.emit(output.dump(res, args.output))
    else:
        output.emit(f"Flushed {res.get('flushed', 0)} entries from pilus_ct4\n")
    return 0


def cmd_bpf_policy_get(args) -> int:
    client = common.client(args)
    data = client.bpf_policy(args.ref)
    if args.output:
        output.emit(output.dump(data, args.output))
        return 0
    labels_by_id = None
    if not args.numeric:
        from pilus.api.client import ClientError

        try:
            labels_by_id = {int(i["id"]): list(i.get("labels") or [])
                            for i in client.list_identities() if str(i.get("id")).isdigit()}
        except ClientError:
            labels_by_id = {}  # labels are a nicety: show the numbers
    output.emit(format_bpf_policy(data, labels_by_id))
    return 0


def cmd_bpf_metrics_list(args) -> int:
    return _show(args, common.client(args).bpf_metrics(), format_bpf_metrics)


def cmd_metrics_list(args) -> int:
    if args.match_pattern:
        try:
            re.compile(args.match_pattern)
        except re.error as e:
            raise common.CLIError(f"invalid --match-pattern {args.match_pattern!r}: {e}") from e
    data = common.client(args).metrics()
    if args.output:
        if args.match_pattern:
            rx = re.compile(args.match_pattern)
            data = [d for d in data if rx.search(d.get("name", ""))]
        output.emit(output.dump(data, args.output))
    else:
        output.emit(format_metrics(data, args.match_pattern))
    return 0
