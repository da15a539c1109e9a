"""Python side of the pilus datapath: compile, load, maps, attach, events."""

from .abi import (
    ENDPOINT_F_IPBLOCK_EGRESS,
    ENDPOINT_F_IPBLOCK_INGRESS,
    ENDPOINT_F_POLICY_EGRESS,
    ENDPOINT_F_POLICY_INGRESS,
)
from .config import DatapathConfig
from .datapath import Datapath, remove_pins
from .errors import DatapathError
from .events import DropEvent, EventReader, PolicyVerdictEvent, TraceEvent
from .maps import CtMap, EndpointInfo, EndpointMap, IpcacheMap, MetricsMap
from .policy import PolicyEntry, PolicyKey, PolicyMaps

__all__ = [
    "CtMap",
    "Datapath",
    "DatapathConfig",
    "DatapathError",
    "DropEvent",
    "ENDPOINT_F_IPBLOCK_EGRESS",
    "ENDPOINT_F_IPBLOCK_INGRESS",
    "ENDPOINT_F_POLICY_EGRESS",
    "ENDPOINT_F_POLICY_INGRESS",
    "EndpointInfo",
    "EndpointMap",
    "EventReader",
    "IpcacheMap",
    "MetricsMap",
    "PolicyKey",
    "PolicyMaps",
    "PolicyEntry",
    "PolicyVerdictEvent",
    "TraceEvent",
    "remove_pins",
]
