"""``pilus status``: one line per subsystem, like ``cilium-dbg status``."""

from __future__ import annotations

import argparse
import os

from pilus.cli import common, output


def register(sub, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[parent], help="show the agent's health",
                       description="Health of the node's agent, one line per subsystem.")
    p.add_argument("--brief", action="store_true",
                   help="one line: OK, or the first subsystem that is not")
    common.add_output_option(p)
    p.set_defaults(func=cmd_status)


def _state(section: dict | None) -> str:
    return str((section or {}).get("state") or "Unknown")


def _is_ok(state: str) -> bool:
    return state.lower() in ("ok", "ready", "healthy")


def _attached(value) -> str:
    if isinstance(value, bool) or value is None:
        return "attached" if value else "not attached"
    if isinstance(value, int):
        return f"attached to {value} device" + ("" if value == 1 else "s") if value else \
            "not attached"
    return str(value)


def format_status(h: dict) -> str:
    lines: list[tuple[str, output.Cell]] = []
    node_bits = [f"node IP {h['node_ip']}" if h.get("node_ip") else None,
                 f"router IP {h['router_ip']}" if h.get("router_ip") else None]
    node_extra = ", ".join(b for b in node_bits if b)
    lines.append(("Node", f"{h.get('node', '-')}" + (f" ({node_extra})" if node_extra else "")))

    nodes = h.get("nodes") or {}
    if nodes:
        lines.append(("Cluster", f"{output.or_dash(nodes.get('reachable'))}/{output.or_dash(nodes.get('nodes'))} "
                      "nodes reachable"))
    routing = h.get("routing") or {}
    if routing:
        how = "tunnel (vxlan)" if routing.get("mode") == "tunnel" else routing.get("mode", "-")
        conflicts = routing.get("conflicts") or {}
        lines.append(("Routing", f"{how}, {output.or_dash(routing.get('routes'))} remote pod CIDRs"
                      + "".join(f"; {node} left out: {why}" for node, why in conflicts.items())))

    kv = h.get("kvstore") or {}
    kv_bits = [kv.get("backend"), kv.get("path") or kv.get("endpoint")]
    kv_text = " ".join(str(b) for b in kv_bits if b)
    extra = []
    if kv.get("revision") is not None:
        extra.append(f"revision {kv['revision']}")
    if kv.get("keys") is not None:
        extra.append(f"{kv['keys']} keys")
    lines.append(("KVStore", f"{_state(kv)}   {kv_text}"
                  + (f" ({', '.join(extra)})" if extra else "")))

    agent = h.get("agent") or {}
    agent_extra = []
    if agent.get("pid") is not None:
        agent_extra.append(f"pid {agent['pid']}")
    if h.get("uptime_s") is not None:
        agent_extra.append(f"up {output.duration(h['uptime_s'])}")
    lines.append(("Pilus", f"{_state(agent)}   {h.get('version', '-')}"
                  + (f" ({', '.join(agent_extra)})" if agent_extra else "")))

    dp = h.get("datapath") or {}
    progs = dp.get("programs") or []
    maps = dp.get("maps") or []
    attached = sum(1 for p in progs if p.get("attached"))
    lines.append(("Datapath", f"{_state(dp)}   {attached}/{len(progs)} programs attached, "
                  f"{len(maps)} maps"))
    if progs:
        rows = [[p.get("name", "?"), p.get("hook", "?"), _attached(p.get("attached")),
                 f"id {p['id']}" if p.get("id") is not None else ""] for p in progs]
        lines.append(("Datapath programs", output.table([], rows, no_headers=True).splitlines()))
    if maps:
        rows = []
        for m in maps:
            fill = f"{output.or_dash(m.get('entries'))}/{output.or_dash(m.get('max_entries'))}"
            rows.append([m.get("name", "?"), fill, m.get("type") or ""])
        lines.append(("BPF maps", output.table([], rows, no_headers=True).splitlines()))

    components = h.get("components") or []
    if components:
        running = [c for c in components if c.get("state") != "Disabled"]
        bad = [f"{c.get('name')}: {c.get('state')}" for c in running if not _is_ok(str(c.get("state")))]
        lines.append(("Components", f"{len(running) - len(bad)}/{len(running)} Ok"
                      + (f" ({'; '.join(bad)})" if bad else "")))
        writers = [m for c in components for m in c.get("maps") or []]
        if writers:
            rows = [[m.get("name", "?"), _state(m),
                     f"{output.or_dash(m.get('desired'))} desired, {output.or_dash(m.get('pending'))} pending, "
                     f"{output.or_dash(m.get('errors'))} errors"
                     + (f", last: {m['last_error']}" if m.get("last_error") else "")] for m in writers]
            lines.append(("Map writers", output.table([], rows, no_headers=True).splitlines()))

    ipam = h.get("ipam") or {}
    cidr = ipam.get("cidr") or h.get("pod_cidr") or "?"
    total = ipam.get("total")
    if total is None and ipam.get("available") is not None:
        total = (ipam.get("allocated") or 0) + ipam["available"]
    lines.append(("IPAM", f"IPv4: {output.or_dash(ipam.get('allocated'))}/"
                  f"{output.or_dash(total)} allocated from {cidr}"))

    eps = h.get("endpoints") or {}
    by_state = eps.get("by_state") or {}
    states = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
    lines.append(("Endpoints", f"{output.or_dash(eps.get('total'))} total"
                  + (f" ({states})" if states else "")))
    lines.append(("Identities", f"{output.or_dash((h.get('identities') or {}).get('allocated'))} "
                  "allocated"))
    pol = h.get("policy")
    if pol:
        lines.append(("Policy", f"enforcement {output.or_dash(pol.get('mode'))}, "
                      f"revision {output.or_dash(pol.get('revision'))}"))
    hub = h.get("hubble")
    if hub:
        if hub.get("disabled"):
            lines.append(("Hubble", "Disabled"))
        else:
            lines.append(("Hubble", f"{'Ok' if hub.get('ok') else 'Failure'}   Current/Max Flows: "
                          f"{output.or_dash(hub.get('current_flows'))}/{output.or_dash(hub.get('max_flows'))}, "
                          f"Flows/s: {output.or_dash(hub.get('flows_per_second'))}, "
                          f"{output.or_dash(hub.get('lost'))} lost"
                          + (f", on {hub['address']}" if hub.get("address") else "")))
    proxy = h.get("proxy")
    if proxy:
        lines.append(("Proxy", _proxy_line(proxy)))
    dns = h.get("dns_proxy")
    if dns:
        lines.append(("DNS proxy", _dns_line(dns)))
    relay = h.get("relay")
    if relay:
        if relay.get("error"):
            lines.append(("Hubble Relay", f"Failure   {relay['address']}: {relay['error']}"))
        else:
            total = relay["connected"] + relay["unavailable"]
            lines.append(("Hubble Relay", f"{'Ok' if not relay['unavailable'] else 'Warning'}   "
                          f"{relay['connected']}/{total} nodes connected, {relay['flows']} flows, "
                          f"on {relay['address']}"))
    ev = h.get("events") or {}
    lines.append(("Events", f"{output.or_dash(ev.get('received'))} received, "
                  f"{output.or_dash(ev.get('lost'))} lost"))
    return output.status_lines(lines)


def _proxy_line(p: dict) -> str:
    state = _state(p)
    if state == "Disabled":
        return "Disabled"
    proc = p.get("process") or {}
    restarts = f"(restarts {output.or_dash(proc.get('restarts'))})"
    if not proc.get("running"):
        what = "not started (no L7 rules)" if state == "Ok" else "not running"
        text = f"{state}   {what} {restarts}"
    else:
        text = (f"{state}   pid {proc.get('pid')}, {output.or_dash(p.get('listeners'))} listeners, "
                f"{output.or_dash(p.get('redirects'))} redirects {restarts}")
    return text + (f"; last error: {p['last_error']}" if p.get("last_error") else "")


def _dns_line(d: dict) -> str:
    if _state(d) == "Disabled":
        return "Disabled"
    c = d.get("proxy") or {}
    text = (f"{_state(d)}   port {output.or_dash(d.get('port'))} (UDP, TCP), {output.or_dash(c.get('queries'))} "
            f"queries: {output.or_dash(c.get('forwarded'))} forwarded, {output.or_dash(c.get('denied'))} denied, "
            f"{output.or_dash(c.get('upstream_errors'))} upstream errors; "
            f"{output.or_dash(d.get('names'))} names cached")
    return text + (f"; last error: {d['last_error']}" if d.get("last_error") else "")


def format_brief(h: dict) -> str:
    for name, section in (("Pilus", h.get("agent")), ("KVStore", h.get("kvstore")),
                          ("Datapath", h.get("datapath"))):
        state = _state(section)
        if not _is_ok(state):
            return f"{name}: {state}\n"
    for component in h.get("components") or []:
        state = str(component.get("state"))
        if state != "Disabled" and not _is_ok(state):
            return f"{component.get('name')}: {state}\n"
    return "OK\n"


def relay_status(args: argparse.Namespace) -> dict | None:
    """The cluster's Hubble Relay as its ServerStatus says (None outside a cluster, or
    when a socket is named): connected and unavailable nodes, or why it does not answer."""
    if getattr(args, "socket", None) or os.environ.get("PILUS_SOCK"):
        return None
    info = common.read_cluster_file(common.cluster_name(args))
    address = (info or {}).get("relay_address")
    if not address:
        return None
    import grpc

    from pilus.hubble.protos import observer_pb2, observer_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = observer_pb2_grpc.ObserverStub(channel).ServerStatus(observer_pb2.ServerStatusRequest(),
                                                                         timeout=2)
    except grpc.RpcError as exc:
        return {"address": address, "error": exc.code().name}
    return {"address": address, "connected": reply.num_connected_nodes.value,
            "unavailable": reply.num_unavailable_nodes.value, "flows": reply.num_flows}


def cmd_status(args: argparse.Namespace) -> int:
    health = common.client(args).healthz()
    if not args.brief:
        relay = relay_status(args)
        if relay is not None:
            health["relay"] = relay
    if args.output:
        output.emit(output.dump(health, args.output))
        return 0
    if args.brief:
        text = format_brief(health)
        output.emit(text)
        return 0 if text == "OK\n" else 1
    output.emit(format_status(health))
    return 0
