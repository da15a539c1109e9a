"""ServiceManager on a real loaded datapath: selector -> maps -> packets."""

from __future__ import annotations

from lxc_env import EP_A, EP_B
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from pilus.datapath.testrun import run_skb
from pilus.loadbalancer.manager import ServiceManager

SVC = """
apiVersion: v1
kind: Service
metadata:
  name: web
  annotations: {service.cilium.io/lb-algorithm: maglev}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


def syn(sport):
    return (Ether(src=EP_A.mac, dst=EP_A.host_mac) / IP(src=str(EP_A.ipv4), dst="10.96.0.10")
            / TCP(sport=sport, dport=80, flags="S"))


def send(dp, pkt):
    return run_skb(dp.prog_fd("cil_from_container"), raw(pkt), ingress_ifindex=EP_A.ifindex)


def test_manager_drives_the_datapath(dp):
    m = ServiceManager(dp)
    m.apply_yaml(SVC)
    # no backend yet: the SYN is answered with a RST
    assert Ether(send(dp, syn(1000)).data)[TCP].flags == "RA"
    m.set_endpoints([
        {"ip": str(EP_B.ipv4), "labels": ["k8s:app=web"]},
        {"ip": "10.200.2.7", "labels": ["k8s:app=web"], "node_local": False},
    ])
    rows = dp.lb.dump()
    assert len(rows) == 1 and rows[0]["algorithm"] == "maglev" and rows[0]["count"] == 2
    table = dp.lb.maglev_get(rows[0]["id"])
    assert sorted(set(table)) == sorted(b["id"] for b in rows[0]["backends"])
    dsts = {Ether(send(dp, syn(sport)).data)[IP].dst for sport in range(2000, 2040)}
    assert dsts == {str(EP_B.ipv4), "10.200.2.7"}
    # the same flow always gets the same backend (Maglev, no CT needed)
    first = Ether(send(dp, syn(3000)).data)[IP].dst
    dp.lb.ct_flush()
    assert Ether(send(dp, syn(3000)).data)[IP].dst == first

    # a restarted agent adopts the ids from the maps
    ids = {r["frontend"]: r["id"] for r in m.frontends()}
    m2 = ServiceManager(dp)
    m2.restore()
    m2.apply_yaml(SVC)
    m2.set_endpoints([{"ip": str(EP_B.ipv4), "labels": ["k8s:app=web"]}])
    assert {r["frontend"]: r["id"] for r in m2.frontends()} == ids
    assert {Ether(send(dp, syn(s)).data)[IP].dst for s in range(4000, 4020)} == {str(EP_B.ipv4)}
    assert {b["address"] for r in dp.lb.dump() for b in r["backends"]} == {
        f"{EP_B.ipv4}:8080/TCP"
    }
    m2.delete("default", "web")
    assert dp.lb.dump() == [] and dp.lb.backends() == {}


def _lb_state(dp):
    return dp.lb.dump(), dp.lb.backends(), [dp.lb.maglev_get(r["id"]) for r in dp.lb.dump()]


def test_restart_keeps_the_service_serving_before_endpoints_are_restored(dp, tmp_path):
    web = [{"ip": str(EP_B.ipv4), "labels": ["k8s:app=web"]}]
    m = ServiceManager(dp, state_path=tmp_path / "services.json")
    m.apply_yaml(SVC)
    m.set_endpoints(web)
    before = _lb_state(dp)
    # the restarted agent: services restored, its endpoints not yet
    m2 = ServiceManager(dp, state_path=tmp_path / "services.json")
    assert m2.restore() == 1
    assert _lb_state(dp) == before
    out = Ether(send(dp, syn(5000)).data)
    assert out[TCP].flags == "S" and out[IP].dst == str(EP_B.ipv4)  # translated, not RST
    m2.set_endpoints(web)
    assert _lb_state(dp) == before  # the same endpoints: nothing differs in the maps
    m2.delete("default", "web")
