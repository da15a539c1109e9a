"""Labels: ``source:key=value``, as in Cilium.

A :class:`Label` has a source (where it came from: ``k8s``, ``reserved``,
``cidr``, …), a key and a possibly empty value. Its string form is
``source:key=value`` (``source:key`` when the value is empty). A :class:`Labels`
is an immutable set with at most one label per key (like Cilium's map keyed by
label key), iterated in key order; :meth:`Labels.sorted_key` is the kvstore
serialization ``source:key=value;source:key=value;`` and
:meth:`Labels.from_sorted_key` reads it back.

Keys and values are validated like Kubernetes label keys and values; ``cidr``
labels carry a prefix (IPv6 written with ``-`` for ``:``) and ``fqdn`` labels a
DNS name or pattern.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = [
    "ANY",
    "CIDR",
    "CILIUM_GENERATED",
    "CONTAINER",
    "FQDN",
    "K8S",
    "KVSTORE",
    "LABEL_CLUSTER",
    "LABEL_NAMESPACE",
    "LABEL_NAMESPACE_LABELS",
    "LABEL_SERVICE_ACCOUNT",
    "NODE",
    "RESERVED",
    "SOURCES",
    "UNSPEC",
    "Label",
    "LabelError",
    "Labels",
    "endpoint_labels",
    "is_identity_relevant",
    "parse_label",
    "parse_labels",
    "split_identity_labels",
]

K8S = "k8s"
RESERVED = "reserved"
CIDR = "cidr"
FQDN = "fqdn"
CONTAINER = "container"
UNSPEC = "unspec"
ANY = "any"
CILIUM_GENERATED = "cilium-generated"
KVSTORE = "kvstore"
NODE = "node"
SOURCES = frozenset({K8S, RESERVED, CIDR, FQDN, CONTAINER, UNSPEC, ANY, CILIUM_GENERATED, KVSTORE, NODE})

LABEL_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_SERVICE_ACCOUNT = "io.cilium.k8s.policy.serviceaccount"
LABEL_CLUSTER = "io.cilium.k8s.policy.cluster"
LABEL_NAMESPACE_LABELS = "io.cilium.k8s.namespace.labels."


class LabelError(ValueError):
    """A label that does not follow the rules; the message names label and rule."""


_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_FQDN_RE = re.compile(r"^[A-Za-z0-9*_]([-A-Za-z0-9*_.]*[A-Za-z0-9*_.])?$")

_RULE_NAME = "at most 63 characters of [A-Za-z0-9._-], starting and ending with an alphanumeric"
_RULE_VALUE = f"value must be {_RULE_NAME}"
_RULE_KEY = (
    "key must be a name of " + _RULE_NAME + ", optionally prefixed by a DNS subdomain "
    "(at most 253 characters of [a-z0-9.-]) and '/'"
)


def _valid_name(s: str) -> bool:
    return len(s) <= 63 and bool(_NAME_RE.match(s))


def is_dns_label(s: str) -> bool:
    """A Kubernetes DNS-1123 label (namespace, pod, service names): 1-63 of [a-z0-9-]."""
    return len(s) <= 63 and bool(_DNS_LABEL_RE.match(s))


def _valid_dns_subdomain(s: str) -> bool:
    return 0 < len(s) <= 253 and all(_DNS_LABEL_RE.match(part) for part in s.split("."))


def _valid_k8s_key(key: str) -> bool:
    if key.startswith(LABEL_NAMESPACE_LABELS):
        # Cilium's namespace-label keys embed a whole Kubernetes key after the prefix
        rest = key[len(LABEL_NAMESPACE_LABELS) :]
        return bool(rest) and _valid_k8s_key(rest)
    prefix, slash, name = key.rpartition("/")
    if slash and not _valid_dns_subdomain(prefix):
        return False
    return _valid_name(name)


def _canonical_cidr(key: str) -> str | None:
    """``cidr:`` keys: ``10.0.0.0/8``, ``2001-db8--/32`` (``-`` for ``:``)."""
    try:
        net = ipaddress.ip_network(key.replace("-", ":"), strict=True)
    except ValueError:
        return None
    if "/" not in key:
        return None
    return net.compressed.replace(":", "-")


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __post_init__(self) -> None:
        for name in ("source", "key", "value"):
            if not isinstance(getattr(self, name), str):
                raise LabelError(f"label {self._raw()!r}: {name} must be a string")
        if self.source not in SOURCES:
            raise LabelError(
                f"label {self._raw()!r}: unknown source {self.source!r} (known: {', '.join(sorted(SOURCES))})"
            )
        if self.source == CIDR:
            canon = _canonical_cidr(self.key)
            if canon is None or self.value:
                raise LabelError(
                    f"label {self._raw()!r}: cidr labels are 'cidr:<prefix>' with a network "
                    "address and length (IPv6 with '-' for ':'), e.g. cidr:10.0.0.0/8"
                )
            object.__setattr__(self, "key", canon)
            return
        if self.source == FQDN:
            if not (len(self.key) <= 255 and _FQDN_RE.match(self.key)) or self.value:
                raise LabelError(
                    f"label {self._raw()!r}: fqdn labels are 'fqdn:<name or pattern>' "
                    "of [A-Za-z0-9.*_-], at most 255 characters"
                )
            return
        if not self.key:
            raise LabelError(f"label {self._raw()!r}: key must not be empty")
        if not _valid_k8s_key(self.key):
            raise LabelError(f"label {self._raw()!r}: {_RULE_KEY}")
        if self.value and not _valid_name(self.value):
            raise LabelError(f"label {self._raw()!r}: {_RULE_VALUE}")

    def _raw(self) -> str:
        return f"{self.source}:{self.key}" + (f"={self.value}" if self.value else "")

    def __str__(self) -> str:
        return self._raw()

    def matches(self, other: Label) -> bool:
        """Same key and value, and same source or either source is ``any``."""
        return (
            self.key == other.key
            and self.value == other.value
            and (self.source == other.source or ANY in (self.source, other.source))
        )


def parse_label(s: str, default_source: str = K8S) -> Label:
    """``key``, ``key=value``, ``source:key``, ``source:key=value`` -> Label.

    The source is the text before the first ``:`` when that ``:`` comes before
    any ``=``; otherwise ``default_source`` applies.
    """
    if not isinstance(s, str):
        raise LabelError(f"label {s!r}: must be a string")
    text = s.strip()
    if not text:
        raise LabelError("label '': must not be empty")
    colon, eq = text.find(":"), text.find("=")
    source = default_source
    if colon >= 0 and (eq < 0 or colon < eq):
        source, text = text[:colon], text[colon + 1 :]
    key, _, value = text.partition("=")
    try:
        return Label(source, key, value)
    except LabelError as e:
        # name the label as the user wrote it
        msg = str(e)
        rule = msg.split("': ", 1)[1] if "': " in msg else msg
        raise LabelError(f"label {s!r}: {rule}") from None


def _iter_labels(items: Iterable[Label]) -> Iterator[Label]:
    for item in items:
        if not isinstance(item, Label):
            raise LabelError(f"label {item!r}: expected a Label")
        yield item


class Labels:
    """Immutable set of labels, at most one per key, ordered by key."""

    __slots__ = ("_by_key", "_hash", "_items")

    def __init__(self, labels: Iterable[Label] = ()) -> None:
        by_key: dict[str, Label] = {}
        for lbl in _iter_labels(labels):
            prev = by_key.get(lbl.key)
            if prev is not None and prev != lbl:
                raise LabelError(f"label {str(lbl)!r}: key {lbl.key!r} already set by {str(prev)!r}")
            by_key[lbl.key] = lbl
        self._items: tuple[Label, ...] = tuple(by_key[k] for k in sorted(by_key))
        self._by_key = {lbl.key: lbl for lbl in self._items}
        self._hash = hash(self._items)

    # construction ---------------------------------------------------------

    @classmethod
    def parse(cls, spec: str | Mapping[str, str] | Iterable[str], default_source: str = K8S) -> Labels:
        return parse_labels(spec, default_source)

    @classmethod
    def from_dict(cls, d: Mapping[str, str], source: str = K8S) -> Labels:
        return parse_labels(d, source)

    @classmethod
    def from_sorted_key(cls, s: str) -> Labels:
        """Inverse of :meth:`sorted_key`."""
        if not isinstance(s, str):
            raise LabelError(f"labels {s!r}: must be a string")
        if s and not s.endswith(";"):
            raise LabelError(f"labels {s!r}: serialized labels end with ';'")
        out = []
        for part in s.split(";")[:-1]:
            if ":" not in part.split("=", 1)[0]:
                raise LabelError(f"label {part!r}: serialized labels carry a source")
            out.append(parse_label(part))
        return cls(out)

    # access ---------------------------------------------------------------

    def __iter__(self) -> Iterator[Label]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            item = parse_label(item)
        return isinstance(item, Label) and self._by_key.get(item.key) == item

    def __getitem__(self, key: str) -> Label:
        return self._by_key[key]

    def get(self, key: str, default: Label | None = None) -> Label | None:
        return self._by_key.get(key, default)

    def has(self, label: Label) -> bool:
        """Contains a label matching ``label`` (source ``any`` matches every source)."""
        mine = self._by_key.get(label.key)
        return mine is not None and mine.matches(label)

    def has_source(self, source: str) -> bool:
        return any(lbl.source == source for lbl in self._items)

    def with_source(self, source: str) -> Labels:
        return Labels(lbl for lbl in self._items if lbl.source == source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Labels) and self._items == other._items

    def __hash__(self) -> int:
        return self._hash

    def __or__(self, other: Labels) -> Labels:
        """Union; a label of ``other`` replaces one with the same key."""
        merged = {lbl.key: lbl for lbl in self._items}
        merged.update({lbl.key: lbl for lbl in other})
        return Labels(merged.values())

    # serialization --------------------------------------------------------

    def sorted_key(self) -> str:
        """``source:key=value;`` for each label in key order (Cilium's kvstore key)."""
        return "".join(f"{lbl.source}:{lbl.key}={lbl.value};" for lbl in self._items)

    def to_list(self) -> list[str]:
        return [str(lbl) for lbl in self._items]

    def to_dict(self) -> dict[str, str]:
        """key -> value (sources dropped), e.g. for display."""
        return {lbl.key: lbl.value for lbl in self._items}

    def __str__(self) -> str:
        return ",".join(self.to_list())

    def __repr__(self) -> str:
        return f"Labels({self.to_list()!r})"


def parse_labels(spec: str | Mapping[str, str] | Iterable[str] | Labels, default_source: str = K8S) -> Labels:
    """``"org=alliance,class=xwing"``, ``{"org": "alliance"}`` or ``["org=alliance"]``.

    Mapping keys may carry a source (``{"reserved:host": ""}``).
    """
    if isinstance(spec, Labels):
        return spec
    if isinstance(spec, str):
        parts = [p for p in (x.strip() for x in spec.split(",")) if p]
        return Labels(parse_label(p, default_source) for p in parts)
    if isinstance(spec, Mapping):
        out = []
        for k, v in spec.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise LabelError(f"label {k!r}: {v!r}: keys and values must be strings")
            out.append(parse_label(f"{k}={v}" if v else k, default_source))
        return Labels(out)
    return Labels(parse_label(p, default_source) for p in spec)


# ---------------------------------------------------------------------------
# identity-relevant label filter (Cilium's default, pkg/labelsfilter)

# (source or None, regex on the key). Includes win over excludes when their match is
# longer; reserved labels always count.
_INCLUDE = [
    re.compile(re.escape(p))
    for p in (
        LABEL_NAMESPACE,
        LABEL_NAMESPACE_LABELS.rstrip("."),
        "app.kubernetes.io",
        "io.cilium.k8s.policy",
    )
]
_EXCLUDE = [
    re.compile(p)
    for p in (
        re.escape("io.kubernetes"),
        re.escape("kubernetes.io"),
        re.escape("statefulset.kubernetes.io/pod-name"),
        re.escape("apps.kubernetes.io/pod-index"),
        re.escape("batch.kubernetes.io/job-completion-index"),
        r".*beta\.kubernetes\.io",
        re.escape("k8s.io"),
        re.escape("pod-template-generation"),
        re.escape("pod-template-hash"),
        re.escape("controller-revision-hash"),
        r"annotation.*",
        re.escape("etcd_node"),
    )
]


def _match_len(patterns: list[re.Pattern[str]], key: str) -> int:
    best = 0
    for pat in patterns:
        m = pat.match(key)
        if m:
            best = max(best, m.end() or 1)
    return best


def is_identity_relevant(label: Label) -> bool:
    """Cilium's default label filter: does this label count for the identity?"""
    if label.source == RESERVED:
        return True
    exclude = _match_len(_EXCLUDE, label.key)
    if not exclude:
        return True
    return _match_len(_INCLUDE, label.key) > exclude


def split_identity_labels(labels: Labels) -> tuple[Labels, Labels]:
    """(identity-relevant labels, information-only labels)."""
    rel = [lbl for lbl in labels if is_identity_relevant(lbl)]
    info = [lbl for lbl in labels if not is_identity_relevant(lbl)]
    return Labels(rel), Labels(info)


def endpoint_labels(
    namespace: str,
    pod_labels: Mapping[str, str],
    service_account: str = "default",
    cluster: str = "default",
    namespace_labels: Mapping[str, str] | None = None,
    *,
    filter_labels: bool = True,
) -> Labels:
    """The identity labels of a pod, as Cilium derives them.

    Pod labels (source ``k8s``) plus ``k8s:io.kubernetes.pod.namespace``,
    ``k8s:io.cilium.k8s.policy.serviceaccount``, ``k8s:io.cilium.k8s.policy.cluster``
    and ``k8s:io.cilium.k8s.namespace.labels.<key>`` for each namespace label.
    With ``filter_labels`` (default), labels Cilium's default filter leaves out
    of identities (``pod-template-hash``, ``controller-revision-hash``, other
    ``*kubernetes.io`` keys, …) are dropped.
    """
    out: list[Label] = []
    for k, v in pod_labels.items():
        try:
            out.append(Label(K8S, k, v))
        except LabelError as e:
            raise LabelError(f"pod label {k}={v}: {str(e).split(': ', 1)[1]}") from None
    for k, v in (namespace_labels or {}).items():
        try:
            Label(K8S, k, v)
        except LabelError as e:
            raise LabelError(f"namespace label {k}={v}: {str(e).split(': ', 1)[1]}") from None
        out.append(Label(K8S, LABEL_NAMESPACE_LABELS + k, v))
    for key, value, what in (
        (LABEL_NAMESPACE, namespace, "namespace"),
        (LABEL_SERVICE_ACCOUNT, service_account, "service account"),
        (LABEL_CLUSTER, cluster, "cluster"),
    ):
        if not value:
            raise LabelError(f"{what} must not be empty")
        try:
            out.append(Label(K8S, key, value))
        except LabelError:
            raise LabelError(f"{what} {value!r}: must be {_RULE_NAME}") from None
    # the generated labels win over pod labels that try to set the same keys
    labels = Labels(out[: len(pod_labels)]) | Labels(out[len(pod_labels) :])
    if filter_labels:
        labels = split_identity_labels(labels)[0]
    return labels
