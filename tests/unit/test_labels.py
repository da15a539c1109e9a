"""Label parsing, validation, serialization and the identity label filter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilus.identity.labels import (
    SOURCES,
    Label,
    LabelError,
    Labels,
    endpoint_labels,
    is_identity_relevant,
    parse_label,
    parse_labels,
    split_identity_labels,
)

GOOD = [
    ("app=web", Label("k8s", "app", "web"), "k8s:app=web"),
    ("app", Label("k8s", "app", ""), "k8s:app"),
    ("app=", Label("k8s", "app", ""), "k8s:app"),
    ("k8s:org=alliance", Label("k8s", "org", "alliance"), "k8s:org=alliance"),
    ("reserved:host", Label("reserved", "host", ""), "reserved:host"),
    ("any:key=v", Label("any", "key", "v"), "any:key=v"),
    ("container:a.b_c-d=X.y_z-1", Label("container", "a.b_c-d", "X.y_z-1"), None),
    ("app.kubernetes.io/name=web", Label("k8s", "app.kubernetes.io/name", "web"), None),
    ("  k8s:app=web  ", Label("k8s", "app", "web"), "k8s:app=web"),
    ("cilium-generated:x=1", Label("cilium-generated", "x", "1"), None),
    ("cidr:10.0.0.0/8", Label("cidr", "10.0.0.0/8"), "cidr:10.0.0.0/8"),
    ("cidr:2001-0db8--/32", Label("cidr", "2001-db8--/32"), "cidr:2001-db8--/32"),
    ("fqdn:*.cilium.io", Label("fqdn", "*.cilium.io"), "fqdn:*.cilium.io"),
    ("a=" + "v" * 63, Label("k8s", "a", "v" * 63), None),
    ("k" * 63, Label("k8s", "k" * 63), None),
    ("io.cilium.k8s.namespace.labels." + "n" * 63 + "=x", None, None),
]


@pytest.mark.parametrize(("text", "label", "string"), GOOD, ids=[g[0][:40] for g in GOOD])
def test_parse_good(text, label, string):
    got = parse_label(text)
    if label is not None:
        assert got == label
    if string is not None:
        assert str(got) == string
    assert parse_label(str(got)) == got


BAD = [
    (
        "org=al liance",
        "value must be at most 63 characters of [A-Za-z0-9._-], starting and ending with an alphanumeric",
    ),
    ("", "must not be empty"),
    ("=x", "key must not be empty"),
    ("k8s:=x", "key must not be empty"),
    ("foo:bar", "unknown source 'foo'"),
    ("a=" + "v" * 64, "value must be at most 63"),
    ("k" * 64, "key must be a name of at most 63"),
    ("-app=x", "key must be"),
    ("app-=x", "key must be"),
    ("app=-x", "value must be"),
    ("app=x_", "value must be"),
    ("a/b/c=x", "key must be"),
    ("Example.COM/app=x", "DNS subdomain"),
    ("/app=x", "key must be"),
    ("app/=x", "key must be"),
    ("app=a=b", "value must be"),
    ("app=a:b", "value must be"),
    ("app=a;b", "value must be"),
    ("ünïcode=x", "key must be"),
    ("cidr:10.0.0.1/8", "cidr labels"),
    ("cidr:10.0.0.0", "cidr labels"),
    ("cidr:nope/8", "cidr labels"),
    ("cidr:10.0.0.0/8=x", "cidr labels"),
    ("fqdn:bad name", "fqdn labels"),
]


@pytest.mark.parametrize(("text", "rule"), BAD, ids=[b[0][:30] or "empty" for b in BAD])
def test_parse_bad(text, rule):
    with pytest.raises(LabelError) as exc:
        parse_label(text)
    msg = str(exc.value)
    assert rule in msg
    assert "\n" not in msg
    assert msg.startswith(f"label {text.strip()!r}" if text.strip() else "label ''") or msg.startswith(
        f"label {text!r}"
    )


def test_error_message_example():
    with pytest.raises(LabelError) as exc:
        parse_label("org=al liance")
    assert str(exc.value) == (
        "label 'org=al liance': value must be at most 63 characters of [A-Za-z0-9._-], "
        "starting and ending with an alphanumeric"
    )


def test_default_source():
    assert parse_label("app=x", default_source="container").source == "container"
    assert parse_label("k8s:app=x", default_source="container").source == "k8s"


def test_parse_labels_forms():
    a = parse_labels("org=alliance,class=xwing")
    assert a.to_list() == ["k8s:class=xwing", "k8s:org=alliance"]
    assert parse_labels({"org": "alliance", "class": "xwing"}) == a
    assert parse_labels(["class=xwing", "k8s:org=alliance"]) == a
    assert parse_labels(" org=alliance , class=xwing ,") == a
    assert parse_labels("") == Labels()
    assert parse_labels({"reserved:host": ""}).to_list() == ["reserved:host"]
    assert Labels.from_dict({"a": "1"}, source="container").to_list() == ["container:a=1"]
    with pytest.raises(LabelError, match="already set"):
        parse_labels("a=1,a=2")
    assert parse_labels("a=1,a=1") == parse_labels("a=1")  # exact duplicates collapse


def test_sorted_key_and_back():
    labels = parse_labels("k8s:c=d,k8s:a=b,reserved:host,empty")
    assert labels.sorted_key() == "k8s:a=b;k8s:c=d;k8s:empty=;reserved:host=;"
    assert Labels.from_sorted_key(labels.sorted_key()) == labels
    assert Labels.from_sorted_key("") == Labels()
    with pytest.raises(LabelError):
        Labels.from_sorted_key("k8s:a=b")  # no trailing ';'
    with pytest.raises(LabelError, match="carry a source"):
        Labels.from_sorted_key("a=b;")


def test_labels_collection():
    labels = parse_labels("app=web,tier=front")
    assert len(labels) == 2 and bool(labels) and not Labels()
    assert "k8s:app=web" in labels and "k8s:app=db" not in labels
    assert labels["app"].value == "web" and labels.get("nope") is None
    assert labels.has(parse_label("any:app=web")) and not labels.has(parse_label("container:app=web"))
    assert hash(labels) == hash(parse_labels("tier=front,app=web"))
    assert {labels: 1}[parse_labels("tier=front,app=web")] == 1
    assert (labels | parse_labels("app=db")).to_dict() == {"app": "db", "tier": "front"}
    assert labels.to_dict() == {"app": "web", "tier": "front"}
    assert repr(labels) == "Labels(['k8s:app=web', 'k8s:tier=front'])"
    assert str(labels) == "k8s:app=web,k8s:tier=front"
    assert labels.with_source("k8s") == labels and not labels.has_source("reserved")


def test_endpoint_labels():
    labels = endpoint_labels(
        "default",
        {"app": "web", "pod-template-hash": "5d9c7b", "app.kubernetes.io/name": "shop"},
        service_account="web-sa",
        namespace_labels={"team": "blue", "kubernetes.io/metadata.name": "default"},
    )
    assert labels.to_list() == [
        "k8s:app=web",
        "k8s:app.kubernetes.io/name=shop",
        "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=default",
        "k8s:io.cilium.k8s.namespace.labels.team=blue",
        "k8s:io.cilium.k8s.policy.cluster=default",
        "k8s:io.cilium.k8s.policy.serviceaccount=web-sa",
        "k8s:io.kubernetes.pod.namespace=default",
    ]
    unfiltered = endpoint_labels("ns", {"pod-template-hash": "x"}, filter_labels=False)
    assert "k8s:pod-template-hash=x" in unfiltered
    # a pod cannot fake its namespace through a label
    forged = endpoint_labels("real", {"io.kubernetes.pod.namespace": "kube-system"})
    assert forged["io.kubernetes.pod.namespace"].value == "real"
    with pytest.raises(LabelError, match="pod label bad key=x"):
        endpoint_labels("ns", {"bad key": "x"})
    with pytest.raises(LabelError, match="namespace 'Bad_'"):
        endpoint_labels("Bad_", {})
    with pytest.raises(LabelError, match="namespace label"):
        endpoint_labels("ns", {}, namespace_labels={"a": "b c"})


@pytest.mark.parametrize(
    ("label", "relevant"),
    [
        ("k8s:app=web", True),
        ("reserved:host", True),
        ("k8s:pod-template-hash=abc", False),
        ("k8s:controller-revision-hash=abc", False),
        ("k8s:statefulset.kubernetes.io/pod-name=db-0", False),
        ("k8s:io.kubernetes.pod.namespace=default", True),
        ("k8s:io.kubernetes.other=x", False),
        ("k8s:kubernetes.io/hostname=n1", False),
        ("k8s:app.kubernetes.io/name=web", True),
        ("k8s:failure-domain.beta.kubernetes.io/zone=a", False),
        ("k8s:io.cilium.k8s.policy.cluster=default", True),
        ("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=x", True),
        ("k8s:annotation.foo=bar", False),
    ],
)
def test_identity_filter(label, relevant):
    assert is_identity_relevant(parse_label(label)) is relevant


def test_split_identity_labels():
    rel, info = split_identity_labels(parse_labels("app=web,pod-template-hash=x"))
    assert rel.to_list() == ["k8s:app=web"] and info.to_list() == ["k8s:pod-template-hash=x"]


# --------------------------------------------------------------------- properties

_alnum = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_mid = st.text(alphabet="abcXYZ019-_.", max_size=61)


@st.composite
def names(draw):
    first = draw(_alnum)
    middle = draw(_mid)
    last = draw(_alnum)
    return (first + middle + last)[: draw(st.integers(1, 63))].rstrip("-_.") or first


@st.composite
def keys(draw):
    name = draw(names())
    if draw(st.booleans()):
        dns = st.builds(
            lambda a, m, b: a + m + b if m or b else a,
            st.sampled_from("abz09"),
            st.text(alphabet="ab0-", max_size=6),
            st.sampled_from(["", "a", "9"]),
        ).map(lambda s: s.rstrip("-") or "x")
        parts = draw(st.lists(dns, min_size=1, max_size=3))
        return ".".join(parts) + "/" + name
    return name


@st.composite
def labels_st(draw):
    source = draw(st.sampled_from(sorted(SOURCES - {"cidr", "fqdn"})))
    value = draw(st.one_of(st.just(""), names()))
    return Label(source, draw(keys()), value)


@given(labels_st())
def test_label_roundtrip(label):
    assert parse_label(str(label)) == label
    assert parse_label(str(label), default_source="container") == label


@given(st.lists(labels_st(), max_size=8))
def test_labels_sorted_key_roundtrip(items):
    uniq = {lbl.key: lbl for lbl in items}
    labels = Labels(uniq.values())
    key = labels.sorted_key()
    assert Labels.from_sorted_key(key) == labels
    assert [lbl.key for lbl in labels] == sorted(uniq)
    assert Labels(reversed(list(uniq.values()))).sorted_key() == key


@given(st.text(max_size=30))
def test_parse_never_crashes(text):
    try:
        label = parse_label(text)
    except LabelError as e:
        assert "\n" not in str(e).replace(repr(text), "")
    else:
        assert parse_label(str(label)) == label
