"""Services cluster-wide: two nodes' ServiceDistributions on one real embedded store.
A service created through one node's manager appears on the other with that node's own
NodePort frontend; deletes follow; a conflicting write from another node is reported,
not applied; a failed kvstore write leaves the requesting node unchanged."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from aio_helpers import eventually, run
from lb_fakes import FakeDatapath

from pilus.kvstore import open_store
from pilus.kvstore.base import KVStoreError
from pilus.loadbalancer.distribution import SERVICE_PREFIX, ServiceDistribution, encode, service_key
from pilus.loadbalancer.manager import ServiceConflict, ServiceManager
from pilus.loadbalancer.model import ServiceValidationError, parse_documents

WEB = """
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"""

EXPLICIT = """
kind: Service
metadata: {name: ext, namespace: other}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80}]
---
kind: EndpointSlice
metadata: {name: ext-1, namespace: other, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.200.2.9]}]
"""


class Node:
    def __init__(self, tmp_path, n: int) -> None:
        self.store = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
        self.mgr = ServiceManager(FakeDatapath(), node_ips=[IPv4Address(f"172.30.0.{n}")],
                                  known_networks=[IPv4Network("10.200.0.0/16")],
                                  state_path=tmp_path / f"node{n}-services.json")
        self.sync = ServiceDistribution(self.store, self.mgr)

    def frontends(self) -> set[str]:
        return {r["frontend"] for r in self.mgr.frontends()}

    async def stop(self) -> None:
        await self.sync.stop()
        await self.store.close()


def nodes(tmp_path):
    return Node(tmp_path, 1), Node(tmp_path, 2)


def test_a_service_created_on_one_node_exists_on_the_other_with_its_own_nodeport(tmp_path):
    async def main():
        a, b = nodes(tmp_path)
        try:
            await a.sync.start()
            await b.sync.start()
            await a.sync.upsert(parse_documents(WEB) + parse_documents(EXPLICIT))
            assert "172.30.0.1:30080/TCP" in a.frontends()
            await eventually(lambda: "10.96.0.20:80/TCP" in b.frontends())
            assert {"10.96.0.10:80/TCP", "172.30.0.2:30080/TCP"} <= b.frontends()
            assert "172.30.0.1:30080/TCP" not in b.frontends()  # each node its own NodePort
            ext = b.mgr.get("other", "ext")
            assert [str(e.ip) for e in ext.endpoints] == ["10.200.2.9"]  # explicit backends travel
            # the writer applied its own write once: its watch skipped the echo
            assert a.sync.status() == {"services": 2, "pending": 0, "errors": []}
            kv = await a.store.get(service_key("default", "web"))
            assert json.loads(kv.value)["documents"][0]["spec"]["ports"][0]["nodePort"] == 30080

            await b.sync.delete("default", "web")
            await eventually(lambda: "10.96.0.10:80/TCP" not in a.frontends())
            assert await a.sync.delete_all("other") == 1
            await eventually(lambda: b.mgr.services() == [])
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_a_restarted_node_takes_the_kvstores_set_as_the_truth(tmp_path):
    async def main():
        a, b = nodes(tmp_path)
        try:
            await a.sync.start()
            await b.sync.start()
            await a.sync.upsert(parse_documents(WEB))
            await eventually(lambda: b.mgr.services() != [])
            await b.stop()  # node 2 is away while the cluster changes
            await a.sync.delete("default", "web")
            await a.sync.upsert(parse_documents(EXPLICIT))
            b2 = Node(tmp_path, 2)
            assert b2.mgr.restore() == 1  # its state file still has web
            await b2.sync.start()
            assert [s.full_name for s in b2.mgr.services()] == ["other/ext"]
            await b2.stop()
        finally:
            await a.stop()

    run(main())


def test_a_conflicting_service_from_another_node_is_reported_and_left_out(tmp_path):
    async def main():
        a, b = nodes(tmp_path)
        try:
            await a.sync.start()
            await b.sync.start()
            await a.sync.upsert(parse_documents(WEB))
            await eventually(lambda: b.mgr.services() != [])
            # a request through b for the same frontend is refused before anything is written
            clash = parse_documents(WEB.replace("name: web", "name: web2"))
            with pytest.raises(ServiceConflict):
                await b.sync.upsert(clash)
            assert await a.store.get(service_key("default", "web2")) is None
            # a racing writer that bypassed the check: not applied on a, and said so
            await a.store.put(service_key("default", "web2"), encode(clash[0]))
            await a.store.put(SERVICE_PREFIX + "default/bad", '{"documents": [{"kind": "Pod"}]}')
            await eventually(lambda: len(a.sync.status()["errors"]) == 2)
            errors = a.sync.status()["errors"]
            assert any("default/web2" in e and "already used by service default/web" in e for e in errors)
            assert any("default/bad" in e and "kind" in e for e in errors)
            assert [s.full_name for s in a.mgr.services()] == ["default/web"]
        finally:
            await a.stop()
            await b.stop()

    run(main())


def test_invalid_input_and_a_failed_write_change_nothing(tmp_path):
    async def main():
        a = Node(tmp_path, 1)
        try:
            await a.sync.start()
            with pytest.raises(ServiceValidationError):
                await a.sync.upsert(parse_documents(WEB.replace("30080", "99999")))
            await a.sync.upsert(parse_documents(WEB))

            async def broken(*args, **kwargs):
                raise KVStoreError("kvstore unreachable")

            a.store.put_many = broken
            changed = WEB.replace("10.96.0.10", "10.96.0.11")
            with pytest.raises(KVStoreError):
                await a.sync.upsert(parse_documents(changed))
            assert a.frontends() == {"10.96.0.10:80/TCP", "172.30.0.1:30080/TCP"}  # as before
            with pytest.raises(KVStoreError):
                await a.sync.delete("default", "web")
            assert [s.full_name for s in a.mgr.services()] == ["default/web"]
        finally:
            await a.stop()

    run(main())
