"""Policies and namespaces in the kvstore, shared by every agent of the cluster.

Layout (JSON):
  pilus/state/policies/v1/set        {"policies": [original documents...]}
  pilus/state/namespaces/v1/<name>   {"labels": {...}}

The whole policy set is one key: an import is validated completely first, then
written in one put, so it is applied all-or-nothing on every node, and the key's
revision is the policy revision users see. Parsing runs in a worker thread so a
10k-document import does not stall the agent's API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

from pilus.identity.labels import Label, LabelError, is_dns_label
from pilus.kvstore.base import Store
from pilus.policy.repository import PolicyNotFound, Repository
from pilus.policy.schema import PolicyDoc, parse_policies
from pilus.secrets import check_policy_secrets

POLICY_KEY = "pilus/state/policies/v1/set"
NAMESPACE_PREFIX = "pilus/state/namespaces/v1/"
METADATA_NAME = "kubernetes.io/metadata.name"


class NamespaceError(ValueError):
    pass


def _parse_set(value: str) -> list[PolicyDoc]:
    raw = json.loads(value)["policies"]
    return parse_policies(json.dumps({"kind": "List", "items": raw})) if raw else []


class PolicyDistribution:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._write = asyncio.Lock()
        self._parsed: tuple[int, list[PolicyDoc]] = (0, [])  # last set seen, to parse each revision once

    async def load(self) -> tuple[int, list[PolicyDoc]]:
        """The current policy set and its revision (0: never written)."""
        kv = await self.store.get(POLICY_KEY)
        if kv is None:
            return 0, []
        if kv.mod_revision != self._parsed[0]:
            self._parsed = (kv.mod_revision, await asyncio.to_thread(_parse_set, kv.value))
        return self._parsed

    async def _repository(self) -> Repository:
        repo = Repository()
        repo.add((await self.load())[1])
        return repo

    async def import_text(self, text: str) -> tuple[int, list[PolicyDoc]]:
        docs = await asyncio.to_thread(parse_policies, text)  # PolicyValidationError: nothing written
        await check_policy_secrets(self.store, text)  # headerMatches secrets must exist (or have a value)
        async with self._write:
            repo = await self._repository()
            repo.add(docs)  # same kind/namespace/name replaces
            return await self._write_set(repo.docs()), docs

    async def delete(self, name: str | None, namespace: str | None, *, everything: bool = False) -> tuple[int, int]:
        """Delete all policies, or those called `name` (in `namespace`, or in any namespace and
        cluster-wide when it is None); returns (revision, count). PolicyNotFound: nothing deleted."""
        async with self._write:
            repo = await self._repository()
            before = len(repo)
            if everything:
                repo.delete_all()
            else:
                scopes = {(d.kind, d.namespace) for d in repo.docs() if d.name == name}
                if namespace is not None:
                    scopes = {(kind, ns) for kind, ns in scopes if ns == namespace}
                if not scopes:
                    where = f" in namespace {namespace!r}" if namespace else ""
                    raise PolicyNotFound(f"policy {name!r}{where} not found: nothing deleted (see `pilus policy get`)")
                for kind, ns in scopes:
                    repo.delete(name, ns, kind)
            return await self._write_set(repo.docs()), before - len(repo)

    async def _write_set(self, docs: list[PolicyDoc]) -> int:
        revision = await self.store.put(POLICY_KEY, json.dumps({"policies": [d.raw for d in docs]}))
        self._parsed = (revision, docs)
        return revision

    # -- namespaces ------------------------------------------------------------

    async def namespaces(self) -> dict[str, dict[str, str]]:
        out = {"default": {METADATA_NAME: "default"}}
        for kv in await self.store.list_prefix(NAMESPACE_PREFIX):
            out[kv.key[len(NAMESPACE_PREFIX):]] = json.loads(kv.value)["labels"]
        return out

    async def put_namespace(self, name: str, labels: Mapping[str, str]) -> dict[str, str]:
        if not is_dns_label(name):
            raise NamespaceError(f"namespace name {name!r} is invalid: use 1-63 lowercase letters, digits and '-'")
        for key, value in labels.items():
            try:
                Label("k8s", key, value)
            except LabelError as exc:
                raise NamespaceError(f"namespace {name}: {exc}") from None
        full = {**labels, METADATA_NAME: name}  # always set, as Kubernetes does
        await self.store.put(NAMESPACE_PREFIX + name, json.dumps({"labels": full}))
        return full

    async def delete_namespace(self, name: str) -> bool:
        return await self.store.delete(NAMESPACE_PREFIX + name)
