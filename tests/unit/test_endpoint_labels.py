"""`pilus endpoint labels`: the label rules, the manager's re-identification of a live
endpoint (real allocator on the embedded kvstore, real state dir, datapath maps as
dicts, pilus.testing.fake_datapath), and the whole chain CLI -> client -> API -> manager on a UNIX socket."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from pilus.api.client import APIError, Client
from pilus.api.server import APIServer
from pilus.cli import endpoint as endpoint_cli
from pilus.cli.main import build_parser
from pilus.cli.main import main as cli
from pilus.endpoint.entries import EndpointEntries
from pilus.endpoint.manager import EndpointManager, NodeInfo, pod_labels, relabeled
from pilus.endpoint.model import Endpoint, EndpointStore
from pilus.endpoint.state import State
from pilus.identity import IdentityAllocator
from pilus.identity.labels import LabelError
from pilus.ipcache import IPCache
from pilus.kvstore import open_store
from pilus.testing.fake_datapath import FakeDatapath

# -- the label rules -------------------------------------------------------------------


def test_relabel_deletes_then_adds_and_sorts():
    current = ["k8s:org=empire", "k8s:class=tiefighter"]
    assert relabeled(current, ["class=xwing"], []) == ["k8s:class=xwing", "k8s:org=empire"]
    assert relabeled(current, ["k8s:team=red"], ["class"]) == ["k8s:org=empire", "k8s:team=red"]
    # deletes apply first, so delete+add of one key sets it; a value given to delete is ignored
    assert relabeled(current, ["class=xwing"], ["class=whatever"]) == ["k8s:class=xwing", "k8s:org=empire"]
    assert relabeled(current, ["flag"], []) == ["k8s:class=tiefighter", "k8s:flag", "k8s:org=empire"]
    assert current == ["k8s:org=empire", "k8s:class=tiefighter"]  # the input is not changed


@pytest.mark.parametrize(
    ("add", "delete", "message"),
    [
        ([], ["team"], "label 'team': not found on the endpoint (its pod label keys: class, org)"),
        (["Bad Key=x"], [], "label 'Bad Key=x': key must be a name"),
        (["app=-x"], [], "label 'app=-x': value must be"),
        (["app=" + "v" * 64], [], "value must be at most 63"),
        (["a=1", "a=2"], [], "key 'a' already set"),
        (["reserved:host"], [], "label 'reserved:host': endpoint labels are pod labels (source k8s), "
                                "source 'reserved' is set by pilus itself"),
        ([], ["reserved:world"], "source 'reserved' is set by pilus itself"),
        (["io.kubernetes.pod.namespace=kube-system"], [],
         "label 'io.kubernetes.pod.namespace=kube-system': key 'io.kubernetes.pod.namespace' is set by "
         "pilus from its namespace; it cannot be set or removed as a pod label"),
        ([], ["k8s:io.kubernetes.pod.namespace"], "is set by pilus from its namespace"),
        (["io.cilium.k8s.policy.serviceaccount=admin"], [], "from its service account"),
        (["io.cilium.k8s.policy.cluster=other"], [], "from the cluster"),
        (["io.cilium.k8s.namespace.labels.team=prod"], [], "from its namespace's labels"),
    ],
)
def test_relabel_refuses_with_label_and_reason(add, delete, message):
    with pytest.raises(LabelError) as err:
        relabeled(["k8s:org=empire", "k8s:class=tiefighter"], add, delete)
    assert message in str(err.value)


def test_create_refuses_derived_keys_too():
    with pytest.raises(LabelError, match="is set by pilus from its namespace"):
        pod_labels(["org=empire", "io.kubernetes.pod.namespace=kube-system"])
    assert [str(x) for x in pod_labels(["org=empire"])] == ["k8s:org=empire"]


# -- CLI parsing and format ------------------------------------------------------------


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_cli_parses_cilium_dbg_shape():
    ns = parse("endpoint", "labels", "7", "-a", "class=xwing,team=red", "--add", "x=1", "-d", "org", "--delete", "a,b")
    assert (ns.ref, ns.add, ns.delete) == ("7", ["class=xwing", "team=red", "x=1"], ["org", "a", "b"])
    assert ns.func is endpoint_cli.cmd_labels
    ns = parse("ep", "labels", "xwing", "-o", "json")
    assert (ns.ref, ns.add, ns.delete, ns.output) == ("default/xwing", [], [], "json")


def test_cli_rejects_bad_label_syntax(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["endpoint", "labels", "7", "--add", "bad key=x"])
    assert exc.value.code == 2
    assert "invalid label 'bad key=x'" in capsys.readouterr().err


def test_labels_view_marks_identity_and_info_labels():
    ep = {"labels": ["k8s:org=empire", "k8s:io.kubernetes.pod.namespace=default"],
          "user_labels": ["k8s:org=empire", "k8s:pod-template-hash=abc"]}
    assert endpoint_cli.format_labels(ep).splitlines() == [
        "LABEL                                     SOURCE",
        "k8s:io.kubernetes.pod.namespace=default   Orchestration identity",
        "k8s:org=empire                            Orchestration identity",
        "k8s:pod-template-hash=abc                 Orchestration info",
    ]


# -- the manager, without root -----------------------------------------------------------


class World:
    """An EndpointManager on a real allocator and state dir; pods are put in place as
    create() leaves them (netns and veth need root, relabel does not touch them)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.store = open_store(path=tmp / "kv.db", poll_interval=0.02)
        self.identities = IdentityAllocator(self.store, "node1")
        self.datapath = FakeDatapath()
        self.manager = EndpointManager(
            NodeInfo("node1", "default", IPv4Address("10.200.1.1"), IPv4Network("10.200.1.0/24")),
            self.datapath, self.identities, ipam=None, store=EndpointStore(tmp),
            ipcache=IPCache(self.datapath.ipcache), entries=EndpointEntries(self.datapath.endpoints),
        )

    async def start(self):
        await self.identities.start()

    async def stop(self):
        await self.identities.stop(revoke_lease=True)
        await self.store.close()

    async def pod(self, ep_id: int, name: str, labels: list[str]) -> Endpoint:
        ns, pod = name.split("/")
        user = [str(x) for x in pod_labels(labels)]
        ident = await self.identities.allocate(self.manager._security_labels(ns, user, "default"))
        ep = Endpoint(id=ep_id, namespace=ns, pod_name=pod, user_labels=user, service_account="default",
                      ipv4=IPv4Address(f"10.200.1.{ep_id + 1}"), netns=f"pilus-node1-ep{ep_id}",
                      interface_name=f"lxc{ep_id:011x}", state=State.READY, identity=ident.id,
                      labels=[str(x) for x in ident.labels], interface_index=100 + ep_id)
        self.manager.endpoints[ep_id] = ep
        self.manager.store.save(ep)
        return ep

    async def listed(self) -> set[int]:
        return {i.id for i in await self.identities.list()}


def run_world(tmp_path, body):
    async def main():
        world = World(tmp_path)
        await world.start()
        try:
            await body(world)
        finally:
            await world.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_relabel_gives_new_identity_programs_it_and_collects_the_old(tmp_path):
    async def body(w: World):
        ep = await w.pod(1, "default/pod", ["org=empire", "class=tiefighter"])
        old = ep.identity
        changed = []
        w.manager.on_change = lambda: asyncio.sleep(0, changed.append(True))

        same, previous = await w.manager.relabel("default/pod", ["class=xwing"], [])
        assert same is ep and previous == old and ep.identity != old
        assert "k8s:class=xwing" in ep.labels and "k8s:class=tiefighter" not in ep.labels
        assert ep.state is State.READY and changed == [True]
        # the datapath follows: ipcache and endpoint map carry the new identity
        assert w.datapath.ipcache.rows[IPv4Network("10.200.1.2/32")] == ep.identity
        assert w.datapath.endpoints.rows[ep.ipv4].identity == ep.identity
        # the old identity had no other user: it is gone from the cluster's list
        assert old not in await w.listed() and ep.identity in await w.listed()
        assert w.identities.refcount(old) == 0 and w.identities.refcount(ep.identity) == 1
        # the change is in the state dir (what a restarted agent restores)
        saved = {e.id: e for e in EndpointStore(w.tmp).load_all()}[1]
        assert saved.user_labels == ["k8s:class=xwing", "k8s:org=empire"] and saved.identity == ep.identity

        # by ID, back to the first labels: the same label set gets an identity again
        _, previous = await w.manager.relabel("1", ["class=tiefighter"], [])
        assert previous != ep.identity and previous not in await w.listed()

    run_world(tmp_path, body)


def test_relabel_into_a_shared_identity_keeps_the_shared_one(tmp_path):
    async def body(w: World):
        a = await w.pod(1, "default/a", ["app=web"])
        b = await w.pod(2, "default/b", ["app=db"])
        web = a.identity
        _, previous = await w.manager.relabel("default/b", ["app=web"], [])
        assert b.identity == web and w.identities.refcount(web) == 2
        assert previous not in await w.listed()  # app=db had no other user
        await w.manager.relabel("default/a", ["app=other"], [])
        assert web in await w.listed()  # b still uses it

    run_world(tmp_path, body)


def test_info_only_label_keeps_the_identity_but_is_saved(tmp_path):
    async def body(w: World):
        ep = await w.pod(1, "default/pod", ["app=web"])
        ident, writes = ep.identity, dict(w.datapath.ipcache.rows)
        _, previous = await w.manager.relabel("default/pod", ["pod-template-hash=abc123"], [])
        assert previous == ident == ep.identity and w.identities.refcount(ident) == 1
        assert w.datapath.ipcache.rows == writes
        assert EndpointStore(w.tmp).load_all()[0].user_labels == ["k8s:app=web", "k8s:pod-template-hash=abc123"]

    run_world(tmp_path, body)


def test_namespace_label_change_takes_the_same_path(tmp_path):
    async def body(w: World):
        labels = {"prod": {}}
        w.manager.namespace_labels = lambda ns: labels.get(ns, {})
        ep = await w.pod(1, "prod/db", ["app=db"])
        other = await w.pod(2, "default/db", ["app=db"])
        old, kept = ep.identity, other.identity
        labels["prod"] = {"team": "prod"}
        assert await w.manager.namespace_changed("prod") == [ep]
        assert "k8s:io.cilium.k8s.namespace.labels.team=prod" in ep.labels and other.identity == kept
        assert w.datapath.ipcache.rows[IPv4Network(f"{ep.ipv4}/32")] == ep.identity
        assert old not in await w.listed() and ep.identity in await w.listed()
        assert await w.manager.namespace_changed("prod") == []  # nothing new: nothing changes

    run_world(tmp_path, body)


def test_bad_relabel_changes_nothing(tmp_path):
    async def body(w: World):
        ep = await w.pod(1, "default/pod", ["app=web"])
        before = (ep.identity, list(ep.user_labels), list(ep.labels), await w.listed())
        saved = (w.tmp / "endpoints" / "1.json").read_text()
        for add, delete in ([], ["team"]), (["io.kubernetes.pod.namespace=x"], []), (["app=ok", "reserved:host"], []):
            with pytest.raises(LabelError):
                await w.manager.relabel("default/pod", add, delete)
        with pytest.raises(LabelError, match="no label change given"):
            await w.manager.relabel("default/pod", [], [])
        assert (ep.identity, ep.user_labels, ep.labels, await w.listed()) == before
        assert (w.tmp / "endpoints" / "1.json").read_text() == saved
        assert w.datapath.ipcache.rows == {} and w.datapath.attached == set()

    run_world(tmp_path, body)


# -- CLI -> client -> API -> manager -------------------------------------------------------


@pytest.fixture
def served():
    """The agent's real APIServer routes over a UNIX socket, on a loop of their own."""
    tmp = Path(tempfile.mkdtemp(prefix="pilus-ep-labels-"))
    world = World(tmp)
    loop = asyncio.new_event_loop()
    state = {}

    async def start():
        await world.start()
        await world.pod(1, "default/pod", ["org=empire", "class=tiefighter"])
        runner = web.AppRunner(APIServer(SimpleNamespace(endpoints=world.manager), tmp / "x.sock").app())
        await runner.setup()
        await web.UnixSite(runner, str(tmp / "pilus.sock")).start()
        state["runner"] = runner

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(20)
    world.socket = str(tmp / "pilus.sock")
    yield world
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    asyncio.run_coroutine_threadsafe(world.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_cli_relabels_through_the_api(served, capsys):
    old = served.manager.endpoints[1].identity
    assert cli(["--socket", served.socket, "endpoint", "labels", "default/pod", "-a", "class=xwing"]) == 0
    out = capsys.readouterr().out.splitlines()
    new = served.manager.endpoints[1].identity
    assert out[0] == f"Endpoint 1 default/pod relabelled: identity {old} -> {new}"
    assert "k8s:class=xwing                                   Orchestration identity" in out

    assert cli(["--socket", served.socket, "endpoint", "labels", "1", "-d", "class", "-o", "json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["previous_identity"] == new and res["endpoint"]["user_labels"] == ["k8s:org=empire"]

    assert cli(["--socket", served.socket, "endpoint", "labels", "1"]) == 0  # no change: the view
    assert "k8s:org=empire" in capsys.readouterr().out


def test_api_errors_name_the_label_and_change_nothing(served, capsys):
    c = Client(served.socket)
    before = served.manager.endpoints[1].identity
    with pytest.raises(APIError) as err:
        c.relabel_endpoint("default/pod", ["k8s:io.kubernetes.pod.namespace=kube-system"], [])
    assert err.value.status == 400 and "'k8s:io.kubernetes.pod.namespace=kube-system'" in err.value.message
    with pytest.raises(APIError) as err:
        c.request("PATCH", "/endpoint/1/labels", {"add": "org=x"})
    assert err.value.status == 400 and "field 'add' must be a list of strings" in err.value.message
    with pytest.raises(APIError) as err:
        c.relabel_endpoint("default/nope", ["a=b"], [])
    assert err.value.status == 404
    assert cli(["--socket", served.socket, "endpoint", "labels", "1", "-d", "team"]) == 1
    assert "label 'team': not found on the endpoint" in capsys.readouterr().err
    assert served.manager.endpoints[1].identity == before
