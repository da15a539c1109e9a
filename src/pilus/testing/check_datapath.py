"""Conformance check for datapaths: the real one and the fake must agree.

``check_datapath(dp)`` exercises, on a loaded datapath, the surface the agent's
components use (ipcache, endpoint map, policy maps, ipBlock map, LB services and
backends, programs(), map_stats(), events(); on the ipcache and endpoint map also
the Reconciler target methods dump/update/delete) with keys from documentation ranges
and ids no agent hands out, and raises :class:`DatapathConformanceError` naming
the first broken promise. It removes what it wrote.
"""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Address, IPv4Network

from pilus import protocols
from pilus.datapath import lb as lbmaps
from pilus.datapath.maps import EndpointInfo
from pilus.datapath.policy import PolicyEntry, PolicyKey

__all__ = ["DatapathConformanceError", "check_datapath"]

EP_ID = 4001  # an endpoint id for the policy map check
PREFIXES = [IPv4Network("198.51.100.0/24"), IPv4Network("198.51.100.7/32"), IPv4Network("203.0.113.0/25")]
TUNNEL = IPv4Address("192.0.2.9")
EP_IP = IPv4Address("198.51.100.77")
VIP = IPv4Address("203.0.113.200")
BACKEND_IDS = (0xFFF0001, 0xFFF0002)
SERVICE_IDS = (60001, 60002)


class DatapathConformanceError(AssertionError):
    pass


def _expect(cond: object, what: str) -> None:
    if not cond:
        raise DatapathConformanceError(what)


def check_datapath(dp) -> None:
    _check_ipcache(dp)
    _check_ipcache_target(dp)
    _check_endpoints(dp)
    _check_endpoints_target(dp)
    _check_policy(dp)
    _check_ipblock(dp)
    _check_lb(dp)
    _check_programs(dp)
    _check_events(dp)


def _stats(dp) -> dict[str, dict]:
    rows = dp.map_stats()
    for row in rows:
        for field in ("name", "type", "max_entries", "entries"):
            _expect(field in row, f"map_stats() row lacks {field!r}: {row}")
    return {row["name"]: row for row in rows}


def _check_ipcache(dp) -> None:
    before = _stats(dp)["pilus_ipcache"]["entries"]
    try:
        dp.ipcache.upsert(PREFIXES[0], 16777217)
        dp.ipcache.upsert(PREFIXES[1], 2, TUNNEL)
        dp.ipcache.upsert(PREFIXES[2], 16777218)
        dp.ipcache.upsert(PREFIXES[2], 16777219)  # an update, not a second entry
        got = [row for row in dp.ipcache.items() if row[0] in PREFIXES]
        want = [(PREFIXES[0], 16777217, None), (PREFIXES[1], 2, TUNNEL), (PREFIXES[2], 16777219, None)]
        _expect(got == want, f"ipcache.items() after upserts: {got}, expected {want} (sorted by address, length)")
        after = _stats(dp)["pilus_ipcache"]["entries"]
        _expect(after == before + 3, f"map_stats() pilus_ipcache entries {after}, expected {before + 3}")
        _expect(dp.ipcache.delete(PREFIXES[1]) is True, "ipcache.delete of a present prefix is not True")
        _expect(dp.ipcache.delete(PREFIXES[1]) is False, "ipcache.delete of an absent prefix is not False")
        left = [row[0] for row in dp.ipcache.items() if row[0] in PREFIXES]
        _expect(left == [PREFIXES[0], PREFIXES[2]], f"ipcache.items() after a delete: {left}")
    finally:
        for prefix in PREFIXES:
            dp.ipcache.delete(prefix)
    _expect(_stats(dp)["pilus_ipcache"]["entries"] == before, "ipcache entries left after deleting all")


def _check_ipcache_target(dp) -> None:
    """The ipcache as a Reconciler target: prefix -> (identity, tunnel endpoint or None)."""
    try:
        dp.ipcache.update(PREFIXES[0], (16777217, None))
        dp.ipcache.update(PREFIXES[1], (2, TUNNEL))
        dp.ipcache.update(PREFIXES[1], (3, None))  # an update drops the tunnel
        got = [(k, v) for k, v in dp.ipcache.dump() if k in PREFIXES]
        want = [(PREFIXES[0], (16777217, None)), (PREFIXES[1], (3, None))]
        _expect(got == want, f"ipcache.dump() after update: {got}, expected {want}")
        _expect(got == [(p, (i, t)) for p, i, t in dp.ipcache.items() if p in PREFIXES],
                "ipcache.dump() differs from items()")
        dp.ipcache.delete(PREFIXES[0])
        dp.ipcache.delete(PREFIXES[0])  # absent: no error
        left = [k for k, _ in dp.ipcache.dump() if k in PREFIXES]
        _expect(left == [PREFIXES[1]], f"ipcache.dump() after delete: {left}")
    finally:
        for prefix in PREFIXES:
            dp.ipcache.delete(prefix)


def _check_endpoints_target(dp) -> None:
    """The endpoint map as a Reconciler target: endpoint IP -> EndpointInfo."""
    ep = EndpointInfo(EP_IP, 4244, EP_ID, 16777217, "02:00:00:00:0f:a1", "02:00:00:00:0f:a2", 2)
    try:
        dp.endpoints.update(EP_IP, ep)
        got = [(k, v) for k, v in dp.endpoints.dump() if k == EP_IP]
        _expect(got == [(EP_IP, ep)], f"endpoints.dump() after update: {got}")
        _expect(all(isinstance(k, IPv4Address) for k, _ in dp.endpoints.dump()), "endpoints.dump() keys")
        try:
            dp.endpoints.update(IPv4Address("198.51.100.78"), ep)
        except ValueError:
            pass
        else:
            raise DatapathConformanceError("endpoints.update under another address than the entry's")
        _expect(dp.endpoints.get("198.51.100.78") is None, "endpoints.update wrote under the wrong key")
        dp.endpoints.delete(EP_IP)
        dp.endpoints.delete(EP_IP)  # absent: no error
        _expect(not any(k == EP_IP for k, _ in dp.endpoints.dump()), "endpoints.dump() after delete")
    finally:
        dp.endpoints.delete(EP_IP)


def _check_endpoints(dp) -> None:
    ep = EndpointInfo(EP_IP, 4242, EP_ID, 16777217, "02:00:00:00:0f:a1", "02:00:00:00:0f:a2")
    try:
        dp.endpoints.upsert(ep)
        _expect(dp.endpoints.get(EP_IP) == ep, f"endpoints.get after upsert: {dp.endpoints.get(EP_IP)}")
        moved = EndpointInfo(EP_IP, 4243, EP_ID, 16777218, ep.mac, ep.host_mac, 1)
        dp.endpoints.upsert(moved)
        got = [e for e in dp.endpoints.items() if e.ipv4 == EP_IP]
        _expect(got == [moved], f"endpoints.items() after an update: {got}")
        _expect(dp.endpoints.delete(EP_IP) is True, "endpoints.delete of a present endpoint is not True")
        _expect(dp.endpoints.delete(EP_IP) is False, "endpoints.delete of an absent endpoint is not False")
        _expect(dp.endpoints.get(EP_IP) is None, "endpoints.get after delete is not None")
    finally:
        dp.endpoints.delete(EP_IP)


_POLICY_FIELDS = ("identity", "direction", "proto", "dport", "prefix_len", "deny", "proxy_port")


def _rows(dp) -> list[tuple]:
    return [tuple(r[f] for f in _POLICY_FIELDS) for r in dp.policy.items(EP_ID)]


def _check_policy(dp) -> None:
    allow_web = PolicyKey(16777217, False, protocols.TCP, 80, 16)
    deny_dns = PolicyKey(16777218, True, protocols.UDP, 53, 16)
    allow_any = PolicyKey(0, True, protocols.ANY, 0, 0)
    try:
        dp.policy.sync(EP_ID, {allow_web: PolicyEntry(False), deny_dns: PolicyEntry(True),
                               allow_any: PolicyEntry(False)})
        _expect(EP_ID in dp.policy.endpoints(), f"policy.endpoints() lacks {EP_ID} after sync")
        want = [(0, "egress", 0, 0, 0, False, 0), (16777218, "egress", 17, 53, 16, True, 0),
                (16777217, "ingress", 6, 80, 16, False, 0)]
        _expect(_rows(dp) == want, f"policy.items() after sync: {_rows(dp)}, expected {want}")
        stats = dp.policy.sync(EP_ID, {allow_web: PolicyEntry(False)})
        _expect(stats.get("deleted") == 2 and stats.get("added") == 0,
                f"policy.sync to a subset: {stats}, expected 2 deleted, 0 added")
        _expect(_rows(dp) == [(16777217, "ingress", 6, 80, 16, False, 0)], f"policy.items(): {_rows(dp)}")
        deny_tcp = PolicyKey(16777217, False, protocols.TCP, 0, 0)  # covers allow_web: deny wins
        dp.policy.sync(EP_ID, {allow_web: PolicyEntry(False), deny_tcp: PolicyEntry(True)})
        want = [(16777217, "ingress", 6, 0, 0, True, 0), (16777217, "ingress", 6, 80, 16, True, 0)]
        _expect(_rows(dp) == want, f"policy.items() with a covering deny: {_rows(dp)}, expected {want}")
        st = dp.policy.status()
        _expect(st.get("name") == "policy maps" and st.get("pending") == 0 and "errors" in st,
                f"policy.status(): {st}")
    finally:
        with contextlib.suppress(Exception):
            dp.policy.delete(EP_ID)
    _expect(EP_ID not in dp.policy.endpoints(), "policy.endpoints() still lists a deleted endpoint")
    _expect(dp.policy.items(EP_ID) == [], "policy.items() of a deleted endpoint is not empty")


def _check_ipblock(dp) -> None:
    try:
        dp.ipblock.upsert(PREFIXES[0], 7)
        dp.ipblock.upsert(PREFIXES[1], 8)
        got = [row for row in dp.ipblock.items() if row[0] in PREFIXES]
        _expect(got == [(PREFIXES[0], 7), (PREFIXES[1], 8)], f"ipblock.items(): {got}")
        _expect(dp.ipblock.delete(PREFIXES[0]) is True, "ipblock.delete of a present prefix is not True")
        _expect(dp.ipblock.delete(PREFIXES[0]) is False, "ipblock.delete of an absent prefix is not False")
        dp.ipblock.update(PREFIXES[1], 9)  # as a Reconciler target
        got = [row for row in dp.ipblock.dump() if row[0] in PREFIXES]
        _expect(got == [(PREFIXES[1], 9)], f"ipblock.dump() after update: {got}")
    finally:
        for prefix in PREFIXES:
            dp.ipblock.delete(prefix)


def _check_lb(dp) -> None:
    lb = dp.lb
    a, t = BACKEND_IDS
    be_a = lbmaps.BackendEntry(a, IPv4Address("198.51.100.10"), 8080, "TCP", "active")
    be_t = lbmaps.BackendEntry(t, IPv4Address("198.51.100.11"), 8080, "TCP", "terminating")
    fe = lbmaps.Frontend(VIP, 80, "TCP", lbmaps.LB_SCOPE_EXT)
    fe_m = lbmaps.Frontend(VIP, 443, "TCP", lbmaps.LB_SCOPE_EXT)
    random_id, maglev_id = SERVICE_IDS
    try:
        lb.upsert_backend(be_a)
        lb.upsert_backend(be_t)
        got = {bid: be for bid, be in lb.backends().items() if bid in BACKEND_IDS}
        _expect(got == {a: be_a, t: be_t}, f"lb.backends(): {got}")
        lb.upsert_service(random_id, fe, [be_a, be_t], affinity_timeout=60, write_backends=False)
        table = [a] * lb.maglev_table_size
        lb.upsert_service(maglev_id, fe_m, [be_a], algorithm="maglev", maglev_table=table,
                          write_backends=False)
        entries = {e.frontend: e for e in lb.items() if e.id in SERVICE_IDS}
        _expect(set(entries) == {fe, fe_m}, f"lb.items() frontends: {sorted(map(str, entries))}")
        e = entries[fe]
        _expect(e.id == random_id and e.backend_ids == [a], f"lb.items() {fe}: slots {e.backend_ids} "
                f"(only active backends have a slot)")
        _expect(e.flags & lbmaps.SVC_FLAG_AFFINITY and e.affinity_timeout == 60 and e.algorithm == "random",
                f"lb.items() {fe}: flags {e.flags}, affinity {e.affinity_timeout}, {e.algorithm}")
        _expect(entries[fe_m].algorithm == "maglev", f"lb.items() {fe_m}: {entries[fe_m].algorithm}")
        _expect(lb.maglev_get(maglev_id) == table, "lb.maglev_get() differs from the table written")
        _expect(lb.maglev_get(random_id) is None, "lb.maglev_get() of a random service is not None")
        lb.upsert_service(random_id, fe, [be_t], write_backends=False)  # no active backend left
        e = next(e for e in lb.items() if e.frontend == fe)
        _expect(e.backend_ids == [] and not e.flags & lbmaps.SVC_FLAG_AFFINITY,
                f"lb.items() {fe} after rewrite: slots {e.backend_ids}, flags {e.flags}")
        _expect(lb.delete_service(maglev_id, fe_m) is True, "lb.delete_service of a present frontend")
        _expect(lb.delete_service(maglev_id, fe_m) is False, "lb.delete_service of an absent frontend")
        _expect(lb.maglev_get(maglev_id) is None, "lb.maglev_get() after delete_service is not None")
        _expect(fe_m not in {e.frontend for e in lb.items()}, "lb.items() lists a deleted frontend")
    finally:
        for sid, f in zip(SERVICE_IDS, (fe, fe_m), strict=True):
            lb.delete_service(sid, f)
        for bid in BACKEND_IDS:
            lb.delete_backend(bid)
    _expect(not any(bid in BACKEND_IDS for bid in lb.backends()), "lb.backends() after delete_backend")


def _check_programs(dp) -> None:
    rows = dp.programs()
    for row in rows:
        for field in ("name", "hook", "attached", "prog_id"):
            _expect(field in row, f"programs() row lacks {field!r}: {row}")
    names = {row["name"] for row in rows}
    _expect({"cil_from_container", "cil_to_container"} <= names, f"programs(): {sorted(names)}")
    stats = _stats(dp)
    for name in ("pilus_lxc", "pilus_ipcache", "pilus_policy", "pilus_lb4_svc", "pilus_lb4_be"):
        _expect(name in stats, f"map_stats() lacks {name}: {sorted(stats)}")


def _check_events(dp) -> None:
    reader = dp.events()
    try:
        _expect(isinstance(reader.fileno(), int) and reader.fileno() >= 0, "events(): no file descriptor")
        reader.set_listen_mask(0)
        _expect(isinstance(reader.poll(), list), "events().poll() does not return a list")
        _expect(isinstance(reader.records, int), "events().records is not a count")
        _expect(isinstance(reader.records_by_type, dict), "events().records_by_type is not a dict")
        _expect(isinstance(reader.lost(), int), "events().lost() is not a count")
    finally:
        reader.close()
