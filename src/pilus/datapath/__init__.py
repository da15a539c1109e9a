"""Python side of the pilus datapath: compile, load, maps, attach, events."""

from .datapath import Datapath, DatapathConfig, DatapathError, remove_pins
from .events import DropEvent, EventReader, TraceEvent
from .maps import CtMap, EndpointInfo, EndpointMap, IpcacheMap, MetricsMap

__all__ = [
    "CtMap",
    "Datapath",
    "DatapathConfig",
    "DatapathError",
    "DropEvent",
    "EndpointInfo",
    "EndpointMap",
    "EventReader",
    "IpcacheMap",
    "MetricsMap",
    "TraceEvent",
    "remove_pins",
]
