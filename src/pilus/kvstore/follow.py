"""The two loops every kvstore client of the agent runs: follow a prefix, keep a lease.

Both use only the Store interface (``base.py``). ``follow_prefix`` resumes a watch
after a compaction or a failure by the caller's resync (a fresh read of the prefix
that returns the revision to go on from); ``keep_lease`` renews every third of the
TTL and calls the caller's recovery when the lease is gone (a new lease, keys
written again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pilus.kvstore.base import Compacted, KVStoreError, LeaseNotFound, Store, WatchEvent

log = logging.getLogger("pilus.kvstore")


async def follow_prefix(
    store: Store,
    prefix: str,
    rev: int,
    on_event: Callable[[WatchEvent], None],
    resync: Callable[[], Awaitable[int]],
    what: str,
) -> None:
    """``on_event`` for every change under ``prefix`` from ``rev`` on, until the store closes."""
    while True:
        try:
            async for ev in store.watch_prefix(prefix, rev):
                on_event(ev)
                rev = ev.revision
            return  # the store was closed
        except asyncio.CancelledError:
            raise
        except Compacted:
            rev = await resync()
        except KVStoreError as exc:
            log.warning("%s watch failed, resyncing in 1s: %s", what, exc)
            await asyncio.sleep(1)
            with contextlib.suppress(KVStoreError):
                rev = await resync()


async def keep_lease(
    store: Store,
    lease: Callable[[], int],
    ttl: float,
    recover: Callable[[], Awaitable[None]],
    what: str,
    after_renewal: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Renew ``lease()`` every ``ttl / 3``; when it expired, ``recover()`` (a failed
    recovery is tried again at the next renewal)."""
    while True:
        await asyncio.sleep(ttl / 3)
        try:
            await store.keepalive(lease())
            if after_renewal is not None:
                await after_renewal()
        except LeaseNotFound:
            log.warning("%s lease expired: writing its keys again", what)
            try:
                await recover()
            except KVStoreError as exc:
                log.warning("%s: recovering the lease failed: %s", what, exc)
        except KVStoreError as exc:
            log.warning("%s lease keepalive failed: %s", what, exc)


async def stop_loops(tasks: list[asyncio.Task]) -> None:
    """Cancel the loops above (or any tasks) and wait until each has ended; clears ``tasks``."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    tasks.clear()
