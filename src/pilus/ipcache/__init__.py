"""The ipcache room: one owner for pilus_ipcache (see cache.py for the precedence)."""

from pilus.ipcache.cache import IPCache, IPCacheEntry, Source

__all__ = ["IPCache", "IPCacheEntry", "Source"]
