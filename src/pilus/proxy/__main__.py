"""``python -m pilus.proxy --config FILE --control SOCKET``: the L7 proxy as its own process.

It runs apart from the agent (as Cilium runs Envoy) so L7 traffic survives an agent restart.
SIGHUP or the control command ``reload`` re-reads the config without closing connections;
``status`` returns the counters; SIGTERM/SIGINT stop it. Identities come from a pinned ipcache
(``--ipcache-pin-dir /sys/fs/bpf/pilus/<node>``) or a JSON file ``{"ip or cidr": identity}``
(``--identities``); secrets from a JSON file ``{"namespace/name": "value"}`` (``--secrets``,
re-read on reload; values are never logged); L7 records to ``--records unix:PATH|file:PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, ProxyConfig
from .control import ControlServer
from .http_rules import DictSecretStore
from .identity import DictIdentityResolver, IdentityResolver, IpcacheIdentityResolver
from .records import open_sink
from .server import ProxyServer

log = logging.getLogger("pilus.proxy")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pilus.proxy", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the proxy's JSON config (docs/l7.md)")
    p.add_argument("--control", required=True, help="UNIX socket for status / reload")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument("--ipcache-pin-dir", help="directory holding the pinned pilus_ipcache")
    ids.add_argument("--identities", help='JSON file {"ip or cidr": identity}')
    p.add_argument("--secrets", help='JSON file {"namespace/name": "value"} for headerMatches')
    p.add_argument("--records", help="where L7 records go: unix:PATH or file:PATH")
    p.add_argument("--log-level", default="info")
    return p


class _Secrets:
    """A DictSecretStore re-read from its file on reload."""

    def __init__(self, path: str | None):
        self.path = path
        self.store = DictSecretStore()
        self.load()

    def load(self) -> None:
        if self.path:
            data = json.loads(Path(self.path).read_text())
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise ConfigError(f"{self.path}: must be an object of strings")
            self.store = DictSecretStore(data)

    def get(self, secret):
        return self.store.get(secret)


async def _run(args: argparse.Namespace) -> int:
    resolver: IdentityResolver
    if args.ipcache_pin_dir:
        resolver = IpcacheIdentityResolver(args.ipcache_pin_dir)
    else:
        resolver = DictIdentityResolver(json.loads(Path(args.identities).read_text()) if args.identities else {})
    secrets = _Secrets(args.secrets)
    sink = open_sink(args.records)
    proxy = ProxyServer(ProxyConfig.from_file(args.config), resolver, secrets, sink)
    await proxy.start()

    async def reload() -> dict[str, Any]:
        try:
            cfg = ProxyConfig.from_file(args.config)
            secrets.load()
            await proxy.reload(cfg)
        except (ConfigError, OSError, ValueError) as e:
            log.error("reload refused: %s", e)
            return {"ok": False, "error": str(e)}
        log.info("config reloaded (generation %d)", proxy.generation)
        return {"ok": True, "generation": proxy.generation}

    async def handle(cmd: str) -> dict[str, Any]:
        if cmd == "status":
            return {"ok": True, **proxy.status()}
        if cmd == "reload":
            return await reload()
        return {"ok": False, "error": f"unknown command {cmd!r} (status, reload)"}

    control = ControlServer(args.control, handle)
    await control.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await control.stop()
        await proxy.stop()
        await sink.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(_run(args))
    except ConfigError as e:
        print(f"pilus proxy: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
