"""asyncio helpers for unit tests: run a coroutine with a timeout, wait for a condition."""

from __future__ import annotations

import asyncio


def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(pred, timeout=3.0):
    """Wait until ``pred()`` (a plain callable) is true, failing after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)
