"""An in-memory stand-in for pilus.datapath.lb.LbMaps that counts writes and checks
their order (unit tests need no root); it passes the LB part of check_datapath, and
``FakeDatapath()`` is pilus.testing's fake datapath with these maps."""

from __future__ import annotations

from ipaddress import IPv4Address

from pilus.datapath import lb as lbmaps
from pilus.testing import fake_datapath


class FakeLb:
    def __init__(self, m=251):
        self.maglev_table_size = m
        self.svc: dict[lbmaps.Frontend, dict] = {}
        self.be: dict[int, lbmaps.BackendEntry] = {}
        self.writes = 0  # upserts and deletes

    def upsert_backend(self, be):
        self.be[be.id] = be
        self.writes += 1

    def delete_backend(self, bid):
        self.writes += 1
        return self.be.pop(bid, None) is not None

    def backends(self):
        return dict(self.be)

    def upsert_service(self, svc_id, frontend, backends, algorithm="random", affinity_timeout=0,
                       flags=0, flags2=0, maglev_table=None, write_backends=True):
        backends = list(backends)
        for b in backends:
            assert b.id in self.be, "slot written before its backend"
        if algorithm == "maglev" and any(b.state == "active" for b in backends):
            assert maglev_table is not None and len(maglev_table) == self.maglev_table_size
        if affinity_timeout:
            flags |= lbmaps.SVC_FLAG_AFFINITY  # as LbMaps.upsert_service
        self.svc[frontend] = dict(id=svc_id, backends=backends, algorithm=algorithm,
                                  affinity=affinity_timeout, flags=flags, flags2=flags2,
                                  table=maglev_table)
        self.writes += 1

    def delete_service(self, svc_id, frontend):
        old = self.svc.get(frontend)
        assert old is None or old["id"] == svc_id
        self.writes += 1
        return self.svc.pop(frontend, None) is not None

    def items(self):
        """As LbMaps.items: the slots hold the active backends only."""
        return [lbmaps.ServiceEntry(v["id"], fe, [b.id for b in v["backends"] if b.state == "active"],
                                    v["flags"], v["flags2"], v["algorithm"], v["affinity"])
                for fe, v in self.svc.items()]

    # helpers for the tests
    def slots(self, vip, port, proto="TCP", scope=0):
        v = self.svc[lbmaps.Frontend(IPv4Address(vip), port, proto, scope)]
        return sorted(f"{b.address}:{b.port}" for b in v["backends"] if b.state == "active")

    def entry(self, vip, port, proto="TCP", scope=0):
        return self.svc[lbmaps.Frontend(IPv4Address(vip), port, proto, scope)]

    def dump(self):
        return [{"id": v["id"], "frontend": str(fe), "scope": "internal" if fe.scope else "external",
                 "flags": v["flags"], "flags2": v["flags2"], "algorithm": v["algorithm"],
                 "affinity_timeout": v["affinity"], "count": len(v["backends"]),
                 "backends": [{"slot": i, "id": b.id, "address": str(b), "state": b.state}
                              for i, b in enumerate(v["backends"], 1)]}
                for fe, v in sorted(self.svc.items(), key=lambda kv: kv[1]["id"])]

    def maglev_get(self, svc_id, scope=0):
        for fe, v in self.svc.items():
            if v["id"] == svc_id and fe.scope == scope:
                return v["table"]
        return None


def FakeDatapath():  # noqa: N802 - named as the class the tests used to build
    dp = fake_datapath.FakeDatapath()
    dp.lb = FakeLb()
    return dp
