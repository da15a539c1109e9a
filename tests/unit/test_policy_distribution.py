"""The kvstore-backed policy set: one put per import, replace by kind/namespace/name,
delete by name, nothing written on bad input."""

import asyncio

import pytest

from pilus.kvstore import open_store
from pilus.policy.distribution import PolicyDistribution
from pilus.policy.repository import PolicyNotFound
from pilus.policy.schema import PolicyValidationError


def cnp(name: str, namespace: str, app: str) -> str:
    return (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{endpointSelector: {{matchLabels: {{app: {app}}}}}, ingress: [{{}}]}}\n"
    )


def run(tmp_path, scenario):
    async def main():
        store = open_store("embedded", path=tmp_path / "kv.db")
        try:
            await scenario(PolicyDistribution(store), PolicyDistribution(store))
        finally:
            await store.close()

    asyncio.run(main())


def test_import_replace_delete(tmp_path):
    async def scenario(dist, other_node):
        rev1, docs = await dist.import_text(cnp("a", "default", "x") + "---\n" + cnp("a", "prod", "x"))
        assert len(docs) == 2
        rev2, _ = await dist.import_text(cnp("a", "default", "y"))  # replaces default/a only
        assert rev2 > rev1
        rev, current = await other_node.load()  # another agent sees the same set and revision
        assert rev == rev2
        assert sorted((d.namespace, d.raw["spec"]["endpointSelector"]["matchLabels"]["app"]) for d in current) == [
            ("default", "y"), ("prod", "x")]
        _rev, count = await dist.delete("a", "prod")
        assert count == 1 and [d.namespace for d in (await dist.load())[1]] == ["default"]
        with pytest.raises(PolicyNotFound, match="not found"):
            await dist.delete("nope", None)
        _rev, count = await dist.delete(None, None, everything=True)
        assert count == 1 and (await dist.load())[1] == []

    run(tmp_path, scenario)


def test_bad_import_writes_nothing(tmp_path):
    async def scenario(dist, _other):
        rev, _ = await dist.import_text(cnp("keep", "default", "x"))
        bad = cnp("new", "default", "y") + "---\nkind: CiliumNetworkPolicy\nmetadata: {name: b}\nspec: {bogus: 1}\n"
        with pytest.raises(PolicyValidationError) as err:
            await dist.import_text(bad)
        assert "document 1" in str(err.value)
        assert (await dist.load())[0] == rev
        assert [d.name for d in (await dist.load())[1]] == ["keep"]

    run(tmp_path, scenario)
