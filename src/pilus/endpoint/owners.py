"""TEMPORARY fallback: the map owners of a datapath, for callers that do not pass them.

The agent is meant to build one IPCache and one EndpointEntries and hand both to the
EndpointManager and the PolicySync. Until it does, both find the same owners here, one
per map object: two owners of one map would each undo what the other wrote. Delete
this module together with the ``ipcache=None`` / ``entries=None`` defaults.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

from pilus.endpoint.entries import EndpointEntries
from pilus.ipcache import IPCache

_owners: WeakKeyDictionary = WeakKeyDictionary()


def ipcache_of(datapath) -> IPCache:
    return _owners.setdefault(datapath.ipcache, IPCache(datapath.ipcache))


def entries_of(datapath) -> EndpointEntries:
    return _owners.setdefault(datapath.endpoints, EndpointEntries(datapath.endpoints))
