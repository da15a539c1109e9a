"""L7 records: one per request, to a pluggable sink.

A record is a JSON object:
``{"time": unix seconds (float), "listener": name, "direction": "ingress"|"egress",
"endpoint": id or null, "source": {"ip", "port", "identity"}, "destination": {"ip", "port",
"identity"}, "protocol": "HTTP/1.1"|"HTTP/2", "method", "url", "host", "path", "status": HTTP
status (0 when none was sent), "grpc_status": int or null, "verdict": "FORWARDED"|"DENIED"|
"ERROR", "latency_ns": request head to end of response, "header_mismatches":
[{"name", "action"}]}``. Header values are never recorded.

Sinks: ``ListSink`` (tests), ``CountingSink`` (no destination), ``JsonLinesFileSink`` (appends one line per record), and
``UnixSocketSink`` (one line per record to a UNIX stream socket; at most
``MAX_PENDING_RECORDS`` wait while it is away, older ones are dropped and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from pathlib import Path
from typing import Any, Protocol

__all__ = ["MAX_PENDING_RECORDS", "CountingSink", "JsonLinesFileSink", "ListSink", "RecordSink", "UnixSocketSink",
           "open_sink"]

MAX_PENDING_RECORDS = 4096


class RecordSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def emit(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    async def aclose(self) -> None:
        return None


class CountingSink:
    """No destination configured: records are counted, not kept."""

    def __init__(self) -> None:
        self.count = 0

    def emit(self, record: dict[str, Any]) -> None:
        self.count += 1

    async def aclose(self) -> None:
        return None


class JsonLinesFileSink:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = self.path.open("a", buffering=1)

    def emit(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")

    async def aclose(self) -> None:
        self._f.close()


class UnixSocketSink:
    """Writes JSON lines to a UNIX stream socket, reconnecting every second while it is away."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.dropped = 0
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def emit(self, record: dict[str, Any]) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run_writer())
        if len(self._queue) >= MAX_PENDING_RECORDS:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(json.dumps(record, separators=(",", ":")).encode() + b"\n")
        self._wake.set()

    async def run_writer(self) -> None:
        reader = writer = None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                # the agent never writes: EOF means it went away (a restart), and a write
                # to a closing transport would be dropped without an error
                if writer is not None and (reader.at_eof() or writer.is_closing()):
                    writer.close()
                    reader = writer = None
                if writer is None:
                    try:
                        reader, writer = await asyncio.open_unix_connection(self.path)
                    except OSError:
                        await asyncio.sleep(1)
                        continue
                line = self._queue[0]
                try:
                    writer.write(line)
                    await writer.drain()
                except OSError:
                    writer = None
                    continue
                if not writer.is_closing():
                    self._queue.popleft()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def open_sink(spec: str | None) -> RecordSink:
    """``unix:/path`` or ``file:/path`` (a plain path is a file); None: records are only counted."""
    if not spec:
        return CountingSink()
    if spec.startswith("unix:"):
        return UnixSocketSink(spec[5:])
    return JsonLinesFileSink(spec[5:] if spec.startswith("file:") else spec)
