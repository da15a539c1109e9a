"""Kubernetes Secrets for the L7 proxy's headerMatches: parsing and validation (pure),
their place in the kvstore (cluster-wide, like policies), and ``SecretSync``, the agent's
live view of them.

Layout (JSON, one key per secret):
  pilus/state/secrets/v1/<namespace>/<name>
      {"namespace": ..., "name": ..., "type": "Opaque", "data": {"<key>": "<base64>"}}

A headerMatches ``secret`` takes the secret's value, and Cilium documents that such a
secret "must only contain one entry": ``KubeSecret.header_value`` is that entry's value, None
for a secret with several keys or a value no HTTP header can carry (CR, LF, NUL, not
UTF-8). Importing such a secret is fine (it may serve something else); a policy that uses
it is refused (``check_policy_secrets``), and the proxy treats it as missing.

Values never leave this module except through ``KubeSecret.data``/``header_value`` and
``SecretSync.values()`` (the proxy's secrets file): reprs, errors and listings carry
names, keys and sizes only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pilus import manifests
from pilus.kvstore.base import Store, WatchEvent
from pilus.kvstore.follow import follow_prefix

log = logging.getLogger(__name__)

SECRET_PREFIX = "pilus/state/secrets/v1/"
#: Kubernetes' limit for one Secret (keys and decoded values together)
MAX_SECRET_BYTES = 1024 * 1024
#: Kubernetes' data key rule (validation.IsConfigMapKey)
_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TOP_FIELDS = {"apiVersion", "kind", "metadata", "data", "stringData", "type", "immutable"}

__all__ = [
    "MAX_SECRET_BYTES",
    "SECRET_PREFIX",
    "KubeSecret",
    "SecretDistribution",
    "SecretNotFound",
    "SecretSync",
    "SecretValidationError",
    "check_policy_secrets",
    "parse_secrets",
    "secret_key",
]


class SecretValidationError(ValueError):
    """Every problem of an import, one ``<field path>: <reason>`` line each (never a value)."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class SecretNotFound(LookupError):
    pass


@dataclass(frozen=True)
class KubeSecret:
    namespace: str
    name: str
    type: str = "Opaque"
    data: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in sorted(self.data.items())}

    def summary(self) -> dict[str, Any]:
        """What the API and `pilus secret list` show: names, keys and sizes, no values."""
        return {"namespace": self.namespace, "name": self.name, "type": self.type,
                "keys": self.sizes()}

    def header_problem(self) -> str | None:
        """Why this secret cannot be a headerMatches value (None: it can)."""
        if len(self.data) != 1:
            return (f"secret {self.ref} has {len(self.data)} keys: a secret used in headerMatches "
                    "must hold exactly one key")
        (key, raw), = self.data.items()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return f"secret {self.ref} key {key}: the value is not UTF-8 text, so it cannot be a header value"
        if any(c in text for c in "\r\n\0"):
            return f"secret {self.ref} key {key}: the value holds CR, LF or NUL, which a header value cannot"
        return None

    def header_value(self) -> str | None:
        if self.header_problem() is not None:
            return None
        return next(iter(self.data.values())).decode()

    # -- kvstore form ------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"namespace": self.namespace, "name": self.name, "type": self.type,
                           "data": {k: base64.b64encode(v).decode() for k, v in sorted(self.data.items())}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KubeSecret:
        d = json.loads(text)
        return cls(d["namespace"], d["name"], d.get("type") or "Opaque",
                   {k: base64.b64decode(v, validate=True) for k, v in d.get("data", {}).items()})


def secret_key(namespace: str, name: str) -> str:
    return f"{SECRET_PREFIX}{namespace}/{name}"


# -- parsing (pure) -----------------------------------------------------------------


def _is_subdomain(s: str) -> bool:
    return 0 < len(s) <= 253 and all(_DNS_LABEL_RE.match(p) for p in s.split("."))


def _parse_one(path: str, obj: Any, errors: list[str]) -> KubeSecret | None:
    start = len(errors)

    def err(where: str, reason: str) -> None:
        errors.append(f"{path}.{where}: {reason}" if where else f"{path}: {reason}")

    if not isinstance(obj, dict):
        err("", f"a Secret must be a mapping, got {type(obj).__name__}")
        return None
    if obj.get("kind") != "Secret":
        err("kind", f"must be Secret, got {_short(obj.get('kind'))}")
        return None
    if obj.get("apiVersion") != "v1":
        err("apiVersion", f"must be v1 for a Secret, got {_short(obj.get('apiVersion'))}")
    for k in obj:
        if k not in _TOP_FIELDS:
            err(_short(k, quote=False), "unknown field")
    meta = obj.get("metadata")
    name = namespace = None
    if not isinstance(meta, dict):
        err("metadata", "required field missing" if meta is None else "must be a mapping")
    else:
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            err("metadata.name", "required field missing" if name is None else "must be a non-empty string")
            name = None
        elif not _is_subdomain(name):
            err("metadata.name", "must be a DNS subdomain: at most 253 lowercase letters, digits, '-' and '.'")
            name = None
        namespace = meta.get("namespace", "default")
        if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL_RE.match(namespace):
            err("metadata.namespace", "must be a DNS label: 1-63 lowercase letters, digits and '-'")
            namespace = None
    typ = obj.get("type", "Opaque")
    if typ is None:
        typ = "Opaque"
    if not isinstance(typ, str):
        err("type", "must be a string")
    if "immutable" in obj and not isinstance(obj["immutable"], bool):
        err("immutable", "must be true or false")
    data: dict[str, bytes] = {}
    for section in ("data", "stringData"):
        raw = obj.get(section)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            err(section, "must be a mapping of key to value")
            continue
        for key, value in raw.items():
            where = f"{section}.{_short(key, quote=False)}"
            if not isinstance(key, str) or not key or len(key) > 253 or not _KEY_RE.match(key) \
                    or key in (".", ".."):
                err(where, "invalid key: use 1-253 letters, digits, '-', '_' and '.'")
                continue
            if section == "data":
                if not isinstance(value, str):
                    err(where, "invalid base64: must be a string")
                    continue
                try:
                    # strict: Kubernetes takes standard base64 only; whitespace is YAML folding
                    data[key] = base64.b64decode("".join(value.split()), validate=True)
                except (binascii.Error, ValueError):
                    err(where, "invalid base64")
            else:
                if not isinstance(value, str):
                    err(where, "must be a string")
                    continue
                data[key] = value.encode()  # stringData wins over data, as in Kubernetes
    size = sum(len(k) + len(v) for k, v in data.items())
    if size > MAX_SECRET_BYTES:
        err("data", f"the secret holds {size} bytes, over the limit of {MAX_SECRET_BYTES} bytes "
                    "(1 MiB, Kubernetes' limit for one Secret)")
    if len(errors) > start or name is None or namespace is None or not isinstance(typ, str):
        return None
    return KubeSecret(namespace, name, typ or "Opaque", data)


def _short(value: Any, quote: bool = True) -> str:
    """A field name or kind for an error: cut, so a mistaken value cannot flood it."""
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= 64 else text[:61] + "..."
    return repr(text) if quote and isinstance(value, str) else text


def parse_secret_objects(objs: Iterable[Any]) -> list[KubeSecret]:
    """Loaded documents (Secrets, or a v1 List of them) -> Secrets, all or nothing."""
    errors: list[str] = []
    out: list[KubeSecret] = []
    seen: dict[str, str] = {}
    found = False
    for idx, obj in enumerate(objs):
        if obj is None:
            continue
        found = True
        if isinstance(obj, dict) and obj.get("kind") == "List" or (
                isinstance(obj, dict) and isinstance(obj.get("kind"), str) and obj["kind"].endswith("List")):
            items = obj.get("items")
            if not isinstance(items, list):
                errors.append(f"[{idx}].items: a List needs an items list")
                continue
            pairs = [(f"[{idx}].items[{i}]", it) for i, it in enumerate(items)]
        else:
            pairs = [(f"[{idx}]", obj)]
        for path, it in pairs:
            s = _parse_one(path, it, errors)
            if s is None:
                continue
            if s.ref in seen:
                errors.append(f"{path}.metadata.name: duplicate: secret {s.ref} is also {seen[s.ref]}")
                continue
            seen[s.ref] = path
            out.append(s)
    if not found:
        errors.append("no Secret documents found")
    if errors:
        raise SecretValidationError(errors)
    return out


def parse_secrets(text: str) -> list[KubeSecret]:
    """YAML or JSON text (multi-document, or a v1 List) -> Secrets, all or nothing;
    SecretValidationError names every problem with its field path."""
    if not isinstance(text, str):
        raise TypeError("text must be a str")
    objs: list[Any] = []
    try:
        for obj in manifests.load_all(text):
            objs.append(obj)
    except manifests.YAMLError as e:
        problem = manifests.describe_error(e, "not YAML")  # never str(e): it quotes values
        raise SecretValidationError([f"[{len(objs)}]: bad YAML: {problem}"]) from None
    return parse_secret_objects(objs)


# -- the kvstore ---------------------------------------------------------------------


class SecretDistribution:
    """Secrets in the kvstore: import (validated first, then one transaction), list, delete."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def import_text(self, text: str) -> list[KubeSecret]:
        secrets = await asyncio.to_thread(parse_secrets, text)  # SecretValidationError: nothing written
        # one transaction (etcd splits a batch over --max-txn-ops, 128 by default, into several)
        await self.store.put_many({secret_key(s.namespace, s.name): s.to_json() for s in secrets})
        return secrets

    async def list(self) -> list[KubeSecret]:
        return [KubeSecret.from_json(kv.value) for kv in await self.store.list_prefix(SECRET_PREFIX)]

    async def get(self, namespace: str, name: str) -> KubeSecret | None:
        kv = await self.store.get(secret_key(namespace, name))
        return KubeSecret.from_json(kv.value) if kv is not None else None

    async def delete(self, namespace: str, name: str) -> None:
        if not await self.store.delete(secret_key(namespace, name)):
            raise SecretNotFound(f"secret {namespace}/{name} not found: nothing deleted (see `pilus secret list`)")


class SecretSync:
    """The agent's live copy of the cluster's secrets: ``SecretSync(store)``, then
    ``await start()``; ``values()`` maps "namespace/name" to the header value of every
    secret that can be one; ``subscribe(fn)`` calls ``fn()`` on the loop after each change
    and returns the function that unsubscribes it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._secrets: dict[str, KubeSecret] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        rev = await self._resync()
        self._task = asyncio.create_task(
            follow_prefix(self.store, SECRET_PREFIX, rev, self._on_event, self._resync, "secrets"),
            name="secret-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _resync(self) -> int:
        rev, kvs = await self.store.snapshot(SECRET_PREFIX)
        fresh: dict[str, KubeSecret] = {}
        for kv in kvs:
            s = self._decode(kv.key, kv.value)
            if s is not None:
                fresh[s.ref] = s
        changed = fresh.keys() != self._secrets.keys() or any(
            fresh[k].data != self._secrets[k].data for k in fresh)
        self._secrets = fresh
        if changed:
            self._notify()
        return rev

    @staticmethod
    def _decode(key: str, value: str) -> KubeSecret | None:
        try:
            return KubeSecret.from_json(value)
        except (ValueError, KeyError, TypeError, binascii.Error):
            log.warning("ignoring the malformed secret at %s", key)  # the key only, never the value
            return None

    def _on_event(self, ev: WatchEvent) -> None:
        ref = ev.key[len(SECRET_PREFIX):]
        if ev.type == "delete" or ev.value is None:
            if self._secrets.pop(ref, None) is None:
                return
        else:
            s = self._decode(ev.key, ev.value)
            if s is None:
                return
            self._secrets[s.ref] = s
        self._notify()

    def _notify(self) -> None:
        for fn in list(self._callbacks):
            try:
                fn()
            except Exception:  # one subscriber's bug must not stop the others
                log.exception("secret change callback failed")

    def subscribe(self, fn: Callable[[], None]) -> Callable[[], None]:
        self._callbacks.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(fn)

        return unsubscribe

    def values(self) -> dict[str, str]:
        out = {}
        for ref, s in sorted(self._secrets.items()):
            v = s.header_value()
            if v is not None:
                out[ref] = v
        return out

    def secrets(self) -> list[KubeSecret]:
        return [s for _, s in sorted(self._secrets.items())]


# -- policies that use secrets ------------------------------------------------------------

_RULE_LISTS = ("ingress", "ingressDeny", "egress", "egressDeny")


def _secret_refs(objs: list[Any]) -> Iterable[tuple[int, str, str, dict, bool]]:
    """(document index, field path, document label, the secret ref, has a value) of every
    headerMatches secret in the policy documents."""
    for idx, obj in enumerate(objs):
        if not isinstance(obj, dict):
            continue
        kind = obj.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
            docs = [(f"items[{i}].", it) for i, it in enumerate(obj["items"])]
        else:
            docs = [("", obj)]
        for prefix, doc in docs:
            if not isinstance(doc, dict):
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            ns = meta.get("namespace") or "default"
            label = f"{doc.get('kind')} {ns}/{meta.get('name')}" if doc.get("kind") != \
                "CiliumClusterwideNetworkPolicy" else f"{doc.get('kind')} {meta.get('name')}"
            specs = []
            if isinstance(doc.get("spec"), dict):
                specs.append((prefix + "spec", doc["spec"]))
            if isinstance(doc.get("specs"), list):
                specs += [(f"{prefix}specs[{i}]", s) for i, s in enumerate(doc["specs"]) if isinstance(s, dict)]
            for spath, spec in specs:
                for direction in _RULE_LISTS:
                    for ri, rule in _items(spec.get(direction)):
                        for pi, port in _items(rule.get("toPorts")):
                            rules = port.get("rules")
                            if not isinstance(rules, dict):
                                continue
                            for hi, http in _items(rules.get("http")):
                                for mi, hm in _items(http.get("headerMatches")):
                                    sec = hm.get("secret")
                                    if isinstance(sec, dict):
                                        path = (f"{spath}.{direction}[{ri}].toPorts[{pi}].rules.http[{hi}]"
                                                f".headerMatches[{mi}].secret")
                                        yield idx, path, label, sec, hm.get("value") is not None


def _items(v: Any) -> Iterable[tuple[int, dict]]:
    return ((i, x) for i, x in enumerate(v) if isinstance(x, dict)) if isinstance(v, list) else ()


async def check_policy_secrets(store: Store, text: str) -> None:
    """Refuse (PolicyValidationError, one issue per reference) a policy import whose
    headerMatches name a secret that does not exist while giving no ``value`` to fall back
    on, or a secret that cannot be a header value (not exactly one key). Run after the
    policy parsed, before it is written."""
    if "secret" not in text:  # most imports: no second parse
        return
    from pilus.policy.errors import PolicyValidationError, ValidationIssue

    objs = await asyncio.to_thread(lambda: list(manifests.load_all(text)))
    refs = list(_secret_refs(objs))
    if not refs:
        return
    dist = SecretDistribution(store)
    cache: dict[tuple[str, str], KubeSecret | None] = {}
    issues = []
    for idx, path, label, sec, has_value in refs:
        key = (str(sec.get("namespace") or "default"), str(sec.get("name")))
        if key not in cache:
            cache[key] = await dist.get(*key)
        found = cache[key]
        if found is None:
            if not has_value:
                issues.append(ValidationIssue(idx, path, f"secret {key[0]}/{key[1]} not found", label))
            continue
        problem = found.header_problem()
        if problem is not None:
            issues.append(ValidationIssue(idx, path, problem, label))
    if issues:
        raise PolicyValidationError(issues)
