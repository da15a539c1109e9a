"""What one node's datapath is configured with (DatapathConfig), and its C mirror."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from . import abi
from .lb import LbConfig

#: NodePort modes (Cilium's --bpf-lb-mode, without hybrid)
LB_MODES = ("snat", "dsr")


#: --monitor-aggregation names -> Cilium's levels (pilus_config.trace_aggregate,
#: lib/trace.h): from medium (3) on, traces follow conntrack; below, every packet
MONITOR_AGGREGATION = {"none": 0, "disabled": 0, "lowest": 1, "low": 2, "medium": 3,
                       "max": 4, "maximum": 4, "enabled": 4}

@dataclass(frozen=True)
class DatapathConfig:
    node_name: str
    router_ip: IPv4Address
    node_ip: IPv4Address
    pod_cidr: IPv4Network
    events_rate: int = 1000  # events per second per CPU
    events_burst: int = 200
    lb: LbConfig = field(default_factory=LbConfig)  # service LB: Maglev size, hairpin IP
    #: the socket LB (bpf_sock.o, agent --socket-lb): True loads and attaches it,
    #: False removes the links an earlier run left; None leaves it to
    #: load_socket_lb() / unload_socket_lb()
    socket_lb: bool | None = None
    socket_lb_cgroup: Path | None = None  # where the socket LB attaches (default: the cgroup v2 root)
    #: the node's native device (interface name): load() attaches bpf_host.o there
    native_device: str | None = None
    #: tunnel mode: the VXLAN device (name, ifindex) load() attaches bpf_overlay.o to
    #: and bpf_lxc.o encapsulates into; None: native routing
    tunnel_device: str | None = None
    tunnel_ifindex: int = 0
    tunnel_port: int = 8472  # its UDP port (agent --tunnel-port)
    #: NodePort to another node's backend (agent --bpf-lb-mode): "snat" (to the node IP,
    #: replies come back here) or "dsr" (the frontend travels in an IPv4 option, the
    #: backend's node answers the client directly; native routing only)
    lb_mode: str = "snat"
    #: Cilium's --monitor-aggregation: "none" (and "lowest", "low": pilus has no
    #: receive-side traces for them to hide) traces every packet; "medium" (default) and
    #: "maximum" the first packet of each direction of a connection, its TCP SYN/FIN/RST,
    #: and a live connection again every monitor_aggregation_interval seconds
    monitor_aggregation: str = "medium"
    monitor_aggregation_interval: int = 5

    def __post_init__(self) -> None:
        if self.monitor_aggregation not in MONITOR_AGGREGATION:
            raise ValueError(f"monitor aggregation {self.monitor_aggregation!r}: use one of "
                             f"{', '.join(MONITOR_AGGREGATION)}")
        if not 1 <= self.monitor_aggregation_interval <= 86400:
            raise ValueError(f"monitor aggregation interval {self.monitor_aggregation_interval}s: "
                             "use 1 to 86400 seconds")
        if self.lb_mode not in LB_MODES:
            raise ValueError(f"unknown lb mode {self.lb_mode!r}: use one of {', '.join(LB_MODES)}")
        if self.lb_mode == "dsr" and self.tunnel_device:
            raise ValueError("lb mode dsr needs native routing (no tunnel device)")


def build_config(cfg: DatapathConfig) -> abi.PilusConfig:
    c = abi.PilusConfig()
    c.router_ip = abi.ip4_to_raw(cfg.router_ip)
    c.node_ip = abi.ip4_to_raw(cfg.node_ip)
    net = IPv4Network(cfg.pod_cidr, strict=False)
    c.pod_cidr = abi.ip4_to_raw(net.network_address)
    c.pod_prefixlen = net.prefixlen
    c.events_rate = cfg.events_rate
    c.events_burst = cfg.events_burst
    c.ct_lifetime_tcp = 8000
    c.ct_syn_timeout = 60
    c.ct_close_timeout = 10
    c.ct_lifetime_nontcp = 60
    c.trace_aggregate = MONITOR_AGGREGATION[cfg.monitor_aggregation]
    c.trace_report_interval = cfg.monitor_aggregation_interval
    c.tunnel_ifindex = cfg.tunnel_ifindex if cfg.tunnel_device else 0
    c.tunnel_port = cfg.tunnel_port if cfg.tunnel_device else 0
    c.lb_dsr = 1 if cfg.lb_mode == "dsr" else 0
    return c
