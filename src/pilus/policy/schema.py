"""Parse and validate CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
Kubernetes NetworkPolicy documents into :class:`PolicyDoc` s of internal rules.

All-or-nothing: :func:`parse_policies` either returns every document or raises
:class:`PolicyValidationError` listing every problem found, each with the document
index, the field path and the reason.

Jobs are split: ``models.py`` (the documents' structure and field checks),
``convert.py`` (models -> internal rules), ``errors.py`` (issues with field paths);
this module reads documents and puts them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from pilus import manifests
from pilus.policy.convert import L7_WARNING, SCTP_WARNING, Context, ConversionError, cilium_rule, np_rule
from pilus.policy.errors import PolicyValidationError, ValidationIssue, format_pydantic
from pilus.policy.models import DNS1123_LABEL, DNS1123_SUBDOMAIN, NPSpecM, RuleM
from pilus.policy.rule import Rule
from pilus.policy.selector import SelectorError

__all__ = [
    "KIND_CCNP",
    "KIND_CNP",
    "KIND_KNP",
    "L7_WARNING",
    "SCTP_WARNING",
    "PolicyDoc",
    "PolicyValidationError",
    "ValidationIssue",
    "parse_policies",
    "parse_policy_objects",
]

KIND_CNP = "CiliumNetworkPolicy"
KIND_CCNP = "CiliumClusterwideNetworkPolicy"
KIND_KNP = "NetworkPolicy"
API_VERSIONS = {KIND_CNP: ("cilium.io/v2",), KIND_CCNP: ("cilium.io/v2",), KIND_KNP: ("networking.k8s.io/v1",)}


@dataclass(frozen=True)
class PolicyDoc:
    kind: str
    name: str
    namespace: str | None
    rules: tuple[Rule, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    warnings: list[str] = field(default_factory=list, compare=False)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def origin(self) -> str:
        return _origin(self.kind, self.namespace, self.name)


def _origin(kind: str, namespace: str | None, name: str) -> str:
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _convert_doc(idx: int, doc: Any, prefix: str, issues: list[ValidationIssue]) -> PolicyDoc | None:
    start = len(issues)

    def err(path: str, reason: str, label: str = "") -> None:
        p = (f"{prefix}{path}" if prefix else path) if path else prefix.rstrip(".")
        issues.append(ValidationIssue(idx, p, reason, label))

    if not isinstance(doc, dict):
        err("", f"a policy document must be a mapping, got {type(doc).__name__}")
        return None
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    label = ""
    if isinstance(kind, str) and isinstance(name, str):
        nsl = None if kind == KIND_CCNP else (ns if isinstance(ns, str) else "default")
        label = _origin(kind, nsl, name)
    if kind not in API_VERSIONS:
        err(
            "kind",
            f"unsupported kind {kind!r} (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)",
            label,
        )
        return None
    api = doc.get("apiVersion")
    if api not in API_VERSIONS[kind]:
        err("apiVersion", f"must be {API_VERSIONS[kind][0]} for {kind}, got {api!r}", label)
    allowed = {"apiVersion", "kind", "metadata", "status"} | ({"spec"} if kind == KIND_KNP else {"spec", "specs"})
    for k in doc:
        if k not in allowed:
            err(str(k), "unknown field", label)
    if not isinstance(meta, dict):
        err("metadata", "required field missing" if meta is None else "must be a mapping", label)
        return None
    if not isinstance(name, str) or not name:
        err("metadata.name", "required field missing" if name is None else "must be a non-empty string", label)
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        err("metadata.name", "must be a DNS subdomain (lowercase alphanumerics, '-' and '.')", label)
    if kind == KIND_CCNP:
        if ns is not None:
            err("metadata.namespace", "a CiliumClusterwideNetworkPolicy is not namespaced", label)
        namespace = None
    else:
        if ns is None:
            namespace = "default"
        elif not isinstance(ns, str) or not DNS1123_LABEL.match(ns) or len(ns) > 63:
            err("metadata.namespace", "must be a DNS label (lowercase alphanumerics and '-')", label)
            namespace = "default"
        else:
            namespace = ns
    warnings: list[str] = []

    def warn(path: str, msg: str) -> None:
        warnings.append(f"{prefix}{path}: {msg}")

    ctx = Context(warn, namespace, label)
    rules: list[Rule] = []
    if kind == KIND_KNP:
        spec = doc.get("spec")
        if spec is None:
            err("spec", "required field missing", label)
            return None
        try:
            m = NPSpecM.model_validate(spec)
        except ValidationError as e:
            for p, r in format_pydantic("spec", e):
                err(p, r, label)
            return None
        try:
            rules.append(np_rule(ctx, m))
        except ConversionError as e:
            err(e.path, e.reason, label)
    else:
        specs: list[tuple[str, Any]] = []
        if "spec" in doc and doc["spec"] is not None:
            specs.append(("spec", doc["spec"]))
        if "specs" in doc and doc["specs"] is not None:
            if not isinstance(doc["specs"], list):
                err("specs", "wrong type: must be a list of rules", label)
            else:
                specs += [(f"specs[{i}]", s) for i, s in enumerate(doc["specs"])]
        if not specs:
            err("spec", "a CiliumNetworkPolicy needs spec or specs", label)
        for path, s in specs:
            try:
                m = RuleM.model_validate(s)
            except ValidationError as e:
                for p, r in format_pydantic(path, e):
                    err(p, r, label)
                continue
            try:
                rr = cilium_rule(ctx, path, m)
            except ConversionError as e:
                err(e.path, e.reason, label)
                continue
            except SelectorError as e:
                err(path, str(e), label)
                continue
            if rr is not None:
                rules.append(rr)
    if len(issues) > start:
        return None
    return PolicyDoc(kind, name, namespace, tuple(rules), doc, warnings)  # type: ignore[arg-type]


def parse_policy_objects(objs: list[Any]) -> list[PolicyDoc]:
    """Already-loaded documents (dicts, or List objects with items) -> PolicyDocs."""
    issues: list[ValidationIssue] = []
    out: list[PolicyDoc] = []
    seen: dict[tuple[str, str | None, str], int] = {}
    for idx, obj in enumerate(objs):
        if obj is None:
            continue
        items: list[tuple[str, Any]]
        if isinstance(obj, dict) and isinstance(obj.get("kind"), str) and obj["kind"].endswith("List"):
            its = obj.get("items")
            if not isinstance(its, list):
                issues.append(ValidationIssue(idx, "items", "a List needs an items list"))
                continue
            items = [(f"items[{i}].", it) for i, it in enumerate(its)]
        else:
            items = [("", obj)]
        for prefix, it in items:
            d = _convert_doc(idx, it, prefix, issues)
            if d is None:
                continue
            if d.key in seen:
                issues.append(
                    ValidationIssue(
                        idx, prefix + "metadata.name", f"duplicate: same policy as document {seen[d.key]}", d.origin
                    )
                )
                continue
            seen[d.key] = idx
            out.append(d)
    if issues:
        raise PolicyValidationError(issues)
    return out


def parse_policies(text: str) -> list[PolicyDoc]:
    """YAML (multi-document, or a List with items) or JSON -> PolicyDocs, all or nothing."""
    if not isinstance(text, str):
        raise TypeError("text must be a str")
    objs: list[Any] = []
    try:
        for obj in manifests.load_all(text):
            objs.append(obj)
    except manifests.YAMLError as e:
        problem = manifests.describe_error(e, str(e))
        raise PolicyValidationError([ValidationIssue(len(objs), "", f"bad YAML: {problem}")]) from None
    if isinstance(text, str) and not any(o is not None for o in objs):
        raise PolicyValidationError([ValidationIssue(0, "", "no policy documents found")])
    return parse_policy_objects(objs)
