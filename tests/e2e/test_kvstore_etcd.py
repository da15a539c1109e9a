"""The etcd kvstore backend against a real etcd 3.4 (Debian's etcd-server) of its own:
started on free loopback ports in a tmp dir, never the system one on 2379."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from pilus.identity.labels import parse_labels
from pilus.kvstore import KVStoreError, open_store
from pilus.testing.check_kvstore import check_kvstore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member; start() again after kill() reuses its data dir (same revisions)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.address, "--advertise-client-urls", self.address,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", f"t={peer}",
             # short raft ticks: a quick election, and etcd's minimum lease TTL drops to 1 s
             "--heartbeat-interval", "10", "--election-timeout", "100",
             "--logger", "zap", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=open(self.data_dir.parent / "etcd.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"etcd exited: {(self.data_dir.parent / 'etcd.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.address + "/health", timeout=1) as resp:
                if b'"true"' in resp.read():
                    return
            time.sleep(0.05)
        raise AssertionError("etcd did not become healthy within 15 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def etcd(tmp_path):
    server = Etcd(tmp_path / "etcd")
    try:
        server.start()
        yield server
    finally:
        server.kill()


async def _with_store(address: str, fn):
    store = open_store("etcd", address=address)
    try:
        return await fn(store)
    finally:
        await store.close()


def test_etcd_passes_check_kvstore(etcd):
    asyncio.run(asyncio.wait_for(_with_store(etcd.address, check_kvstore), 30))


def test_status_names_backend_endpoint_revision(etcd):
    async def fn(store):
        rev = await store.put("k", "v")
        return rev, await store.status()

    rev, status = asyncio.run(_with_store(etcd.address, fn))
    assert status["backend"] == "etcd" and status["endpoint"] == etcd.address
    assert status["ok"] is True and status["revision"] == rev and status["keys"] == 1


def test_unreachable_address_is_one_clear_error():
    address = f"http://127.0.0.1:{_free_port()}"

    async def fn(store):
        with pytest.raises(KVStoreError) as err:
            await store.get("k")
        return str(err.value), await store.status()

    message, status = asyncio.run(_with_store(address, fn))
    assert address in message and "unreachable" in message and "\n" not in message
    assert status["ok"] is False and address in status["error"]


def test_watch_resumes_and_status_recovers_after_etcd_restart(etcd):
    async def fn(store):
        rev = await store.put("w/a", "1")
        watch = store.watch_prefix("w/", start_revision=rev - 1)
        try:
            first = await asyncio.wait_for(watch.__anext__(), 5)
            assert (first.type, first.key, first.value) == ("put", "w/a", "1")
            pending = asyncio.ensure_future(watch.__anext__())  # waiting across the outage
            etcd.kill()
            status = await store.status()
            assert status["ok"] is False and etcd.address in status["error"], status
            etcd.start()
            await store.put("w/b", "2")
            ev = await asyncio.wait_for(pending, 10)
            assert (ev.type, ev.key, ev.value) == ("put", "w/b", "2")
            status = await store.status()
            assert status["ok"] is True and status["revision"] == ev.revision
        finally:
            await watch.aclose()

    asyncio.run(asyncio.wait_for(_with_store(etcd.address, fn), 30))


def test_watch_from_compacted_revision_raises_compacted(etcd):
    from pilus.kvstore import Compacted

    async def fn(store):
        old = await store.put("c/a", "1")
        rev = await store.put("c/a", "2")
        body = json.dumps({"revision": str(rev), "physical": True}).encode()
        await asyncio.to_thread(urllib.request.urlopen, etcd.address + "/v3/kv/compaction", body, 5)
        watch = store.watch_prefix("c/", start_revision=old - 1)
        try:
            with pytest.raises(Compacted, match="compacted"):
                await asyncio.wait_for(watch.__anext__(), 5)
        finally:
            await watch.aclose()
        # from the compaction revision on, history is there again
        watch = store.watch_prefix("c/", start_revision=rev)
        try:
            await store.put("c/b", "3")
            ev = await asyncio.wait_for(watch.__anext__(), 5)
            assert (ev.type, ev.key, ev.value) == ("put", "c/b", "3")
        finally:
            await watch.aclose()

    asyncio.run(asyncio.wait_for(_with_store(etcd.address, fn), 30))


def test_create_of_a_present_key_still_checks_the_lease(etcd):
    from pilus.kvstore import LeaseNotFound

    async def fn(store):
        await store.put("l/k", "v")
        lease = await store.grant_lease(30)
        assert await store.create("l/k", "w", lease=lease) is False
        await store.revoke_lease(lease)
        with pytest.raises(LeaseNotFound):
            await store.create("l/k", "w", lease=lease)
        assert (await store.get("l/k")).value == "v"

    asyncio.run(asyncio.wait_for(_with_store(etcd.address, fn), 30))


def test_agent_runs_on_etcd_from_its_flags(etcd, tmp_path):
    """`pilus agent --kvstore etcd --kvstore-opt etcd.address=URL` reaches that etcd: the
    agent (fake datapath and node rows, as in tests/unit/test_agent.py) reports the backend,
    and the identity of a new endpoint's labels is stored in etcd."""
    from pilus import agent as agent_mod
    from pilus.testing.fake_datapath import FakeDatapath

    class Addresses:
        node_ip, device = IPv4Address("192.0.2.10"), None

        async def start(self) -> None:
            pass

    class Node:
        pass

    args = agent_mod.build_parser().parse_args([
        "--node-name", "n1", "--state-dir", str(tmp_path / "state"), "--pod-cidr", "10.210.1.0/24",
        "--bpffs-root", str(tmp_path / "bpf"), "--kvstore", "etcd",
        "--kvstore-opt", f"etcd.address={etcd.address}",
    ])
    cfg = agent_mod.config_from_args(args)
    agent = agent_mod.Agent(cfg, replace={"addresses": Addresses, "datapath": FakeDatapath, "node": Node})

    async def run():
        await agent.start()
        try:
            status = await agent.status()
            ident = await agent.identities.allocate(parse_labels(["k8s:app=etcd-check"]))
        finally:
            await agent.stop()
        return status, ident

    status, ident = asyncio.run(asyncio.wait_for(run(), 30))
    assert status["kvstore"]["backend"] == "etcd" and status["kvstore"]["endpoint"] == etcd.address
    assert status["kvstore"]["state"] == "Ok"

    async def identity_keys(store):
        return [kv.key for kv in await store.list_prefix("pilus/state/identities/v1/id/")]

    keys = asyncio.run(_with_store(etcd.address, identity_keys))
    assert any(key.endswith(f"/{ident.id}") for key in keys), keys
