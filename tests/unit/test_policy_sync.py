"""PolicySync without root: the real (pure) PolicyEngine, policies and identities in the
embedded kvstore on tmp_path, the datapath's maps in memory (pilus.testing.fake_datapath)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pilus.datapath import ENDPOINT_F_POLICY_EGRESS
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.model import Endpoint, endpoint_info
from pilus.endpoint.policy_sync import PolicySync
from pilus.endpoint.state import State
from pilus.identity import IdentityAllocator
from pilus.identity.labels import endpoint_labels
from pilus.identity.reserved import is_local
from pilus.ipcache import IPCache, IPCacheEntry, Source
from pilus.kvstore import open_store
from pilus.policy import PolicyEngine
from pilus.policy.distribution import PolicyDistribution
from pilus.testing.fake_datapath import FakeDatapath

CIDR = IPv4Network("10.1.2.0/24")


def cnp(name: str, body: str) -> str:
    lines = "\n".join("  " + ln for ln in body.strip("\n").splitlines())
    meta = f"{{name: {name}, namespace: default}}"
    return f"---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {meta}\nspec:\n{lines}\n"


EGRESS_TO_CIDR = cnp(
    "client-out",
    """
endpointSelector: {matchLabels: {app: client}}
egress:
- toCIDR: [10.1.2.0/24]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
- toCIDR: [10.200.1.3/32]
""",
)


class Node:
    def __init__(self, tmp: Path) -> None:
        self.store = open_store(path=tmp / "kv.db", poll_interval=0.02)
        self.identities = IdentityAllocator(self.store, "node1")
        self.distribution = PolicyDistribution(self.store)
        self.datapath = FakeDatapath()
        self.ipcache = IPCache(self.datapath.ipcache)
        self.entries = EndpointEntries(self.datapath.endpoints)
        self.sync = PolicySync(
            PolicyEngine(), self.datapath, self.identities, self.distribution,
            ipcache=self.ipcache, entries=self.entries,
        )

    async def endpoint(self, ep_id: int, pod: str, app: str) -> Endpoint:
        """An endpoint as the manager programs it: policy first, then its entries."""
        ident = await self.identities.allocate(endpoint_labels("default", {"app": app}))
        ep = Endpoint(id=ep_id, namespace="default", pod_name=pod, user_labels=[f"k8s:app={app}"],
                      service_account="default", ipv4=IPv4Address(f"10.200.1.{ep_id + 1}"),
                      netns=f"ns{ep_id}", interface_name=f"lxc{ep_id}", state=State.READY,
                      identity=ident.id, labels=[str(x) for x in ident.labels], interface_index=100 + ep_id)
        ep.policy_flags = await self.sync.endpoint_upserted(ep)
        self.entries.upsert(endpoint_info(ep))
        self.ipcache.upsert(IPv4Network(f"{ep.ipv4}/32"), ep.identity, Source.LOCAL)
        return ep

    def egress_keys(self, ep: Endpoint) -> set[tuple[int, int, int]]:
        """(identity, proto, port) of the endpoint's egress policy map keys."""
        return {(k.identity, k.proto, k.dport) for k in self.datapath.policy.maps[ep.id] if k.egress}


def run_node(tmp_path, body):
    async def main():
        node = Node(tmp_path)
        await node.identities.start()
        await node.sync.start()
        try:
            await body(node)
        finally:
            await node.sync.stop()
            await node.identities.stop(revoke_lease=True)
            await node.store.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_cidr_policy_fills_the_policy_map_and_the_ipcache_and_goes_with_it(tmp_path):
    async def body(n: Node):
        client = await n.endpoint(1, "client", "client")
        server = await n.endpoint(2, "server", "server")  # 10.200.1.3, named by the /32 rule
        assert n.egress_keys(client) == set() and client.policy_flags == 0

        await n.distribution.import_text(EGRESS_TO_CIDR)
        await n.sync.reload_policies()
        cidr_id = n.sync.cidr_identities[CIDR]
        assert is_local(cidr_id)
        assert (cidr_id, 6, 443) in n.egress_keys(client)
        # the GENERATED claim is in the ipcache and the map; the pod's /32 keeps its LOCAL entry
        assert IPCacheEntry(CIDR, cidr_id, Source.GENERATED) in n.ipcache.items()
        assert n.datapath.ipcache.rows[CIDR] == cidr_id
        pod = IPv4Network(f"{server.ipv4}/32")
        assert n.ipcache.lookup(server.ipv4) == IPCacheEntry(pod, server.identity, Source.LOCAL)
        assert n.datapath.ipcache.rows[pod] == server.identity
        assert n.ipcache.status()["entries"]["generated"] == 2
        # enforcement flipped in place through the endpoint map's owner
        assert client.policy_flags & ENDPOINT_F_POLICY_EGRESS
        assert n.datapath.endpoints.rows[client.ipv4].flags == client.policy_flags

        await n.distribution.delete("client-out", "default")
        await n.sync.reload_policies()
        assert n.sync.cidr_identities == {} and n.egress_keys(client) == set()
        assert n.ipcache.status()["entries"]["generated"] == 0
        assert CIDR not in n.datapath.ipcache.rows
        assert n.datapath.ipcache.rows[pod] == server.identity  # the LOCAL entry stays
        assert n.datapath.endpoints.rows[client.ipv4].flags == client.policy_flags == 0

    run_node(tmp_path, body)


def test_removing_an_endpoint_drops_its_policy_map(tmp_path):
    async def body(n: Node):
        await n.distribution.import_text(EGRESS_TO_CIDR)
        await n.sync.reload_policies()
        client = await n.endpoint(1, "client", "client")
        assert (n.sync.cidr_identities[CIDR], 6, 443) in n.egress_keys(client)
        await n.sync.endpoint_removed(client)
        assert client.id not in n.datapath.policy.maps and client.id not in n.sync.endpoints
        writers = [(r["name"], r["state"]) for r in n.sync.reconcilers_status()]
        assert writers == [("policy maps", "Ok"), ("ipblock", "Ok")]

    run_node(tmp_path, body)
