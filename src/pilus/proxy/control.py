"""The proxy's control socket: a UNIX stream socket, one JSON object per line each way.

Requests: ``{"cmd": "status"}`` (counters per listener, the config generation) and
``{"cmd": "reload"}`` (read the config file again; a bad file is refused with its field path
and the running config stays). A bare ``status`` or ``reload`` line works too. Every answer has
``"ok"``; a failure has ``"error"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["ControlServer", "control_request"]

Handler = Callable[[str], Awaitable[dict[str, Any]]]


class ControlServer:
    def __init__(self, path: str | Path, handler: Handler):
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                text = line.decode(errors="replace").strip()
                if not text:
                    continue
                try:
                    cmd = json.loads(text)["cmd"] if text.startswith("{") else text
                    answer = await self.handler(str(cmd))
                except (ValueError, KeyError, TypeError) as e:
                    answer = {"ok": False, "error": f"bad request: {e}"}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def control_request(path: str | Path, cmd: str, timeout: float = 5.0) -> dict[str, Any]:
    """One request from a synchronous caller (tests, the CLI later)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)
