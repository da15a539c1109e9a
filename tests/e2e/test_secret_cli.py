"""`pilus secret import|list|delete` and the policy import check of headerMatches secrets,
through the CLI against the e2e cluster's agent: what is stored (keys and sizes, never a
value anywhere the user or the logs see), all-or-nothing refusals with field paths, and
a policy naming a missing secret refused with nothing changed."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pilus.api.client import APIError

from .conftest import CLUSTER, state_dir

VALUE = "e2e-Secret-Value-91f3"

SECRETS = textwrap.dedent(f"""\
    apiVersion: v1
    kind: Secret
    metadata: {{name: tok, namespace: default}}
    type: Opaque
    data:
      token: {base64.b64encode(VALUE.encode()).decode()}
    ---
    apiVersion: v1
    kind: List
    items:
    - apiVersion: v1
      kind: Secret
      metadata: {{name: pair}}
      stringData: {{user: luke, password: {VALUE}}}
    """)

BAD = SECRETS + textwrap.dedent(f"""\
    ---
    apiVersion: v1
    kind: Secret
    metadata: {{name: broken}}
    data:
      token: "{VALUE}!"
    """)

POLICY = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: secret-header, namespace: default}
    spec:
      endpointSelector: {matchLabels: {class: deathstar}}
      ingress:
      - toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules:
            http:
            - method: GET
              headerMatches:
              - name: X-Token
                mismatch: REPLACE
                secret: {namespace: default, name: SECRET}
    """)


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pilus", "--cluster", CLUSTER, *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def ok(*args: str, stdin: str | None = None) -> str:
    r = cli(*args, stdin=stdin)
    assert r.returncode == 0, f"pilus {' '.join(args)}: {r.stdout}{r.stderr}"
    assert VALUE not in r.stdout + r.stderr
    return r.stdout


def listing() -> list[dict]:
    return json.loads(ok("secret", "list", "-o", "json"))


@pytest.fixture
def clean(api):
    yield
    for s in api.request("GET", "/secret")["secrets"]:
        api.request("DELETE", f"/secret/{s['namespace']}/{s['name']}")
    with contextlib.suppress(APIError):  # 404 when the test failed before importing it
        api.request("DELETE", "/policy?name=secret-header&namespace=default")


def test_import_list_delete_and_policy_check(api, node, tmp_path: Path, clean):
    # all or nothing: a bad third secret keeps the two good ones out too
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    r = cli("secret", "import", str(bad))
    assert r.returncode == 1
    assert "[2].data.token: invalid base64" in r.stderr and "nothing was written" in r.stderr
    assert VALUE not in r.stdout + r.stderr
    assert listing() == []

    out = ok("secret", "import", "-", stdin=SECRETS)
    assert "secret/default/tok imported (1 keys)" in out and "secret/default/pair imported (2 keys)" in out
    assert listing() == [
        {"namespace": "default", "name": "pair", "type": "Opaque", "keys": {"password": len(VALUE), "user": 4}},
        {"namespace": "default", "name": "tok", "type": "Opaque", "keys": {"token": len(VALUE)}},
    ]
    table = ok("secret", "list")
    assert f"token ({len(VALUE)} bytes)" in table and "NAMESPACE" in table

    # a policy naming a secret that does not exist (and no value): refused, nothing changes
    before = api.get_policy()["revision"]
    r = cli("policy", "import", "-", stdin=POLICY.replace("SECRET", "nosuch"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].secret: secret default/nosuch not found"
            in r.stderr)
    # several keys: Cilium's "must only contain one entry"
    r = cli("policy", "import", "-", stdin=POLICY.replace("SECRET", "pair"))
    assert r.returncode == 1 and "must hold exactly one key" in r.stderr
    assert api.get_policy()["revision"] == before
    # the one-key secret exists: imported
    ok("policy", "import", "-", stdin=POLICY.replace("SECRET", "tok"))
    assert any(d["metadata"]["name"] == "secret-header" for d in api.get_policy()["policies"])

    ok("secret", "delete", "default/tok")
    assert [s["name"] for s in listing()] == ["pair"]
    r = cli("secret", "delete", "default/tok")
    assert r.returncode == 1 and "secret default/tok not found" in r.stderr
    r = cli("secret", "delete", "no-slash")
    assert r.returncode == 2 and "NAMESPACE/NAME" in r.stderr

    # the agent never logged a value
    for log in state_dir(node).rglob("*.log"):
        assert VALUE not in log.read_text(errors="replace"), log
