"""Secrets for headerMatches: parsing/validation (field paths, never a value in an error or
repr, never a crash), the kvstore layout, SecretSync and the policy import check."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pilus.kvstore import open_store
from pilus.policy.distribution import PolicyDistribution
from pilus.policy.errors import PolicyValidationError
from pilus.secrets import (
    MAX_SECRET_BYTES,
    SECRET_PREFIX,
    KubeSecret,
    SecretDistribution,
    SecretNotFound,
    SecretSync,
    SecretValidationError,
    parse_secrets,
)

VALUE = "s3cr3t-VALUE-xyz"
B64 = base64.b64encode(VALUE.encode()).decode()


def doc(name="tok", ns="default", data=None, string_data=None, **extra) -> dict:
    d = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}}
    if data is not None:
        d["data"] = data
    if string_data is not None:
        d["stringData"] = string_data
    d.update(extra)
    return d


def dump(*docs) -> str:
    return yaml.safe_dump_all(list(docs))


def errors_of(text: str) -> list[str]:
    with pytest.raises(SecretValidationError) as ei:
        parse_secrets(text)
    return ei.value.errors


# -- parsing ---------------------------------------------------------------------------


def test_data_and_string_data_multi_document():
    out = parse_secrets(dump(doc(data={"token": B64}), doc("other", "ns1", string_data={"a": "b", "c": "d"})))
    assert [(s.namespace, s.name, s.type) for s in out] == [("default", "tok", "Opaque"), ("ns1", "other", "Opaque")]
    assert out[0].data == {"token": VALUE.encode()}
    assert out[0].header_value() == VALUE
    assert out[1].sizes() == {"a": 1, "c": 1}
    assert out[1].header_value() is None  # two keys: not a header value
    assert "2 keys" in out[1].header_problem()


def test_list_namespace_default_type_kept_and_string_data_wins():
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}, "type": "kubernetes.io/basic-auth",
         "data": {"k": base64.b64encode(b"old").decode()}, "stringData": {"k": "new"}}]})
    (s,) = parse_secrets(text)
    assert (s.namespace, s.type, s.data) == ("default", "kubernetes.io/basic-auth", {"k": b"new"})


def test_invalid_base64_has_field_path_and_no_value():
    errs = errors_of(dump(doc(data={"token": B64}), doc("b", data={"token": VALUE + "!!"})))
    assert errs == ["[1].data.token: invalid base64"]


def test_every_problem_listed_with_its_path():
    errs = errors_of(dump(doc(name="Bad_Name", ns="NS!", data=["x"], extra=1),
                          {"apiVersion": "v2", "kind": "Secret", "metadata": {"name": "ok"}},
                          {"kind": "List", "items": [doc(string_data={"bad/key": "v"})]}))
    assert "[0].metadata.name: must be a DNS subdomain: at most 253 lowercase letters, digits, '-' and '.'" in errs
    assert any(e.startswith("[0].metadata.namespace: must be a DNS label") for e in errs)
    assert "[0].data: must be a mapping of key to value" in errs
    assert "[0].extra: unknown field" in errs
    assert "[1].apiVersion: must be v1 for a Secret, got 'v2'" in errs
    assert any(e.startswith("[2].items[0].stringData.bad/key: invalid key") for e in errs)


def test_wrong_kind_duplicate_and_empty():
    assert errors_of(dump({"apiVersion": "v1", "kind": "ConfigMap"})) == ["[0].kind: must be Secret, got 'ConfigMap'"]
    assert errors_of(dump(doc(data={}), doc(data={}))) == [
        "[1].metadata.name: duplicate: secret default/tok is also [0]"]
    assert errors_of("") == ["no Secret documents found"]


def test_size_limit_named():
    big = "x" * (MAX_SECRET_BYTES + 1)
    (err,) = errors_of(dump(doc(string_data={"k": big})))
    assert err.startswith("[0].data: the secret holds 1048578 bytes, over the limit of 1048576 bytes")
    assert "1 MiB" in err


def test_bad_yaml_quotes_no_content():
    (err,) = errors_of(f"apiVersion: v1\nkind: Secret\nstringData:\n  k: [{VALUE}\n")
    assert err.startswith("[0]: bad YAML: line ")
    assert VALUE not in err


def test_repr_and_summary_carry_no_value():
    (s,) = parse_secrets(dump(doc(data={"token": B64})))
    assert VALUE not in repr(s) and B64 not in repr(s)
    assert s.summary() == {"namespace": "default", "name": "tok", "type": "Opaque", "keys": {"token": 16}}


def test_header_value_refuses_crlf_and_non_utf8():
    assert "CR, LF or NUL" in KubeSecret("d", "a", data={"k": b"a\r\nb"}).header_problem()
    assert "not UTF-8" in KubeSecret("d", "a", data={"k": b"\xff"}).header_problem()


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                         st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode()))
values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=10)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.one_of(st.text(max_size=12), yaml_scalars), data=values, string_data=values,
       typ=yaml_scalars, meta_ns=yaml_scalars)
def test_fuzz_objects_never_crash(name, data, string_data, typ, meta_ns):
    obj = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": meta_ns},
           "data": data, "stringData": string_data, "type": typ}
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError):
        return
    try:
        out = parse_secrets(text)
    except SecretValidationError as e:
        assert e.errors and all(isinstance(x, str) and x.startswith("[0]") for x in e.errors)
        return
    assert len(out) == 1 and out[0].name == name


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_fuzz_text_never_crashes(text):
    try:
        parse_secrets(text)
    except SecretValidationError as e:
        assert e.errors


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=64))
def test_fuzz_base64_roundtrip(raw):
    (s,) = parse_secrets(dump(doc(data={"k": base64.b64encode(raw).decode()})))
    assert s.data == {"k": raw}
    assert KubeSecret.from_json(s.to_json()).data == {"k": raw}


# -- kvstore, SecretSync, policy import --------------------------------------------------


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p1, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: x}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          headerMatches:
          - name: X-Token
            mismatch: REPLACE
            secret: {namespace: default, name: tok}
"""


@pytest.fixture
def store(tmp_path):
    s = open_store(path=tmp_path / "kv.db", poll_interval=0.02)
    yield s
    asyncio.run(s.close())


def test_distribution_sync_and_policy_check(store):
    async def run():
        dist = SecretDistribution(store)
        pol = PolicyDistribution(store)
        # missing secret, no value: refused with the field path, nothing written
        with pytest.raises(PolicyValidationError) as ei:
            await pol.import_text(POLICY)
        (issue,) = ei.value.errors
        assert (issue.doc_index, issue.path, issue.reason) == (
            0, "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].secret", "secret default/tok not found")
        assert (await pol.load())[0] == 0
        # with a fallback value the import goes through
        await pol.import_text(POLICY.replace("mismatch: REPLACE", "mismatch: REPLACE\n            value: v"))
        sync = SecretSync(store)
        await sync.start()
        changed = asyncio.Event()
        unsubscribe = sync.subscribe(changed.set)
        try:
            assert sync.values() == {}
            await dist.import_text(dump(doc(data={"token": B64}), doc("two", string_data={"a": "1", "b": "2"})))
            kv = await store.get(SECRET_PREFIX + "default/tok")
            assert json.loads(kv.value)["data"] == {"token": B64}
            while sync.values() != {"default/tok": VALUE}:
                await asyncio.wait_for(changed.wait(), 10)
                changed.clear()
            assert [s.ref for s in sync.secrets()] == ["default/tok", "default/two"]
            await pol.import_text(POLICY)  # the secret exists now
            with pytest.raises(PolicyValidationError) as ei:
                await pol.import_text(POLICY.replace("name: tok", "name: two").replace("name: p1", "name: p2"))
            assert "must hold exactly one key" in ei.value.errors[0].reason
            await dist.delete("default", "tok")
            while "default/tok" in sync.values():
                await asyncio.wait_for(changed.wait(), 10)
                changed.clear()
            with pytest.raises(SecretNotFound):
                await dist.delete("default", "tok")
            assert [s.ref for s in await dist.list()] == ["default/two"]
        finally:
            unsubscribe()
            await sync.stop()

    asyncio.run(run())


def test_sync_skips_a_malformed_value_and_logs_the_key_only(store, caplog):
    async def run():
        await store.put(SECRET_PREFIX + "default/bad", '{"namespace": "default", "name": "bad", "data": {"k": "'
                        + VALUE + '!"}}')
        await SecretDistribution(store).import_text(dump(doc(data={"token": B64})))
        sync = SecretSync(store)
        await sync.start()
        try:
            assert sync.values() == {"default/tok": VALUE}
        finally:
            await sync.stop()

    with caplog.at_level("WARNING", logger="pilus.secrets"):
        asyncio.run(run())
    assert "ignoring the malformed secret at pilus/state/secrets/v1/default/bad" in caplog.text
    assert VALUE not in caplog.text
