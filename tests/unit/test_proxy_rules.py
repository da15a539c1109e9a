"""Cilium's PortRuleHTTP semantics as a truth table: one row per field and mismatch action."""

from __future__ import annotations

import pytest

from pilus.policy.l7 import HeaderMatch, PortRuleHTTP, Secret
from pilus.proxy.ere import EreError, translate_ere
from pilus.proxy.http_rules import DictSecretStore, HttpRuleError, RequestHead, compile_http_rules

SECRETS = DictSecretStore({"default/token": "s3cret"})
TOKEN = Secret("default", "token")
GONE = Secret("default", "missing")


def req(method="GET", path="/", host="api", **headers):
    return RequestHead(method, path, host, [(k.replace("_", "-"), v) for k, v in headers.items()])


# (rules, request, allowed, headers the upstream sees afterwards or None = unchanged)
ROWS = [
    # empty rule list and empty rule: everything passes
    ([], req("DELETE", "/x"), True, None),
    ([PortRuleHTTP()], req("PUT", "/anything"), True, None),
    # method: an ERE matched against the whole method
    ([PortRuleHTTP(method="GET")], req("GET"), True, None),
    ([PortRuleHTTP(method="GET")], req("GETX"), False, None),  # anchored at the end
    ([PortRuleHTTP(method="ET")], req("GET"), False, None),  # anchored at the start
    ([PortRuleHTTP(method="GET|HEAD")], req("HEAD"), True, None),
    ([PortRuleHTTP(method="get")], req("GET"), False, None),  # case-sensitive
    # path: whole request target
    ([PortRuleHTTP(path="/public/.*")], req(path="/public/a/b"), True, None),
    ([PortRuleHTTP(path="/public/.*")], req(path="/private/a"), False, None),
    ([PortRuleHTTP(path="/public")], req(path="/public/x"), False, None),
    ([PortRuleHTTP(path="/v1/request-landing")], req(path="/v1/request-landing"), True, None),
    ([PortRuleHTTP(path="/a.c")], req(path="/abc"), True, None),  # '.' is any character
    ([PortRuleHTTP(path="/a\\.c")], req(path="/abc"), False, None),
    ([PortRuleHTTP(path="/id/[[:digit:]]+")], req(path="/id/42"), True, None),
    ([PortRuleHTTP(path="/id/[[:digit:]]+")], req(path="/id/4a"), False, None),
    ([PortRuleHTTP(path="/x{2,3}")], req(path="/xxx"), True, None),
    ([PortRuleHTTP(path="/x{2,3}")], req(path="/xxxx"), False, None),
    ([PortRuleHTTP(path="/[]a]")], req(path="/]"), True, None),  # leading ] is literal
    ([PortRuleHTTP(path="/[\\]")], req(path="/\\"), True, None),  # backslash literal in brackets
    ([PortRuleHTTP(path="/cilium.examples.DoorManager/GetName")],
     req("POST", "/cilium.examples.DoorManager/GetName"), True, None),
    # host: the Host header / :authority
    ([PortRuleHTTP(host="api\\.example\\.com")], req(host="api.example.com"), True, None),
    ([PortRuleHTTP(host="api\\.example\\.com")], req(host="evil.com"), False, None),
    ([PortRuleHTTP(host=".*\\.example\\.com")], req(host="a.example.com"), True, None),
    # headers: "Name" present, "Name: value" equal, names case-insensitive
    ([PortRuleHTTP(headers=("X-My-Header",))], req(x_my_header="anything"), True, None),
    ([PortRuleHTTP(headers=("X-My-Header",))], req(), False, None),
    ([PortRuleHTTP(headers=("X-Token: 42",))], req(x_token="42"), True, None),
    ([PortRuleHTTP(headers=("X-Token: 42",))], req(x_token="43"), False, None),
    ([PortRuleHTTP(headers=("x-token: 42",))], req(X_Token="42"), True, None),
    # all fields of one rule must hold
    ([PortRuleHTTP(method="POST", path="/v1/.*")], req("GET", "/v1/x"), False, None),
    ([PortRuleHTTP(method="POST", path="/v1/.*")], req("POST", "/v1/x"), True, None),
    # any rule allows: union
    ([PortRuleHTTP(method="GET"), PortRuleHTTP(method="PUT", path="/ok")], req("PUT", "/ok"), True, None),
    ([PortRuleHTTP(method="GET"), PortRuleHTTP(method="PUT", path="/ok")], req("PUT", "/no"), False, None),
    # headerMatches, mismatch "" = deny
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v"),))], req(x_key="v"), True, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v"),))], req(x_key="w"), False, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v"),))], req(), False, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key"),))], req(x_key="any"), True, None),  # presence
    # LOG: allowed, nothing changes
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="LOG"),))], req(x_key="w"), True,
     [("x-key", "w")]),
    # ADD: added when missing, a further field when a different one is present
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="ADD"),))], req(), True, [("X-Key", "v")]),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="ADD"),))], req(x_key="w"), True,
     [("x-key", "w"), ("X-Key", "v")]),
    # DELETE: a mismatching header is removed
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="DELETE"),))], req(x_key="w"), True, []),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="DELETE"),))], req(x_key="v"), True,
     [("x-key", "v")]),
    # REPLACE: set to the expected value (added when missing)
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="REPLACE"),))], req(x_key="w"), True,
     [("X-Key", "v")]),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("X-Key", "v", mismatch="REPLACE"),))], req(), True, [("X-Key", "v")]),
    # secrets: the secret's value wins over value; missing secret falls back to value
    ([PortRuleHTTP(headerMatches=(HeaderMatch("Authorization", secret=TOKEN),))], req(Authorization="s3cret"),
     True, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("Authorization", secret=TOKEN),))], req(Authorization="guess"),
     False, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("Authorization", "fallback", secret=GONE),))],
     req(Authorization="fallback"), True, None),
    # a missing secret without value fails, whatever the action
    ([PortRuleHTTP(headerMatches=(HeaderMatch("Authorization", secret=GONE, mismatch="LOG"),))], req(), False, None),
    ([PortRuleHTTP(headerMatches=(HeaderMatch("Authorization", secret=TOKEN, mismatch="REPLACE"),))],
     req(Authorization="guess"), True, [("Authorization", "s3cret")]),
    # a failing headerMatch in one rule, another rule allows
    ([PortRuleHTTP(path="/a", headerMatches=(HeaderMatch("X-Key", "v"),)), PortRuleHTTP(path="/a")],
     req(path="/a"), True, None),
    # a rule whose basic fields do not match runs no header action
    ([PortRuleHTTP(path="/other", headerMatches=(HeaderMatch("X-Key", "v", mismatch="ADD"),)),
      PortRuleHTTP(path="/a")], req(path="/a"), True, []),
]


@pytest.mark.parametrize(("rules", "request_", "allowed", "after"), ROWS)
def test_truth_table(rules, request_, allowed, after):
    before = list(request_.headers)
    verdict = compile_http_rules(rules).evaluate(request_, SECRETS)
    assert verdict.allowed is allowed
    assert request_.headers == (before if after is None else after)


def test_mismatches_name_headers_never_values():
    rules = compile_http_rules([PortRuleHTTP(headerMatches=(
        HeaderMatch("Authorization", secret=TOKEN, mismatch="REPLACE"), HeaderMatch("X-Log", "v", mismatch="LOG")))])
    verdict = rules.evaluate(req(Authorization="guess"), SECRETS)
    assert verdict.mismatches == (("Authorization", "REPLACE"), ("X-Log", "LOG"))
    assert "s3cret" not in repr(verdict) and "s3cret" not in repr(SECRETS)


@pytest.mark.parametrize(("rule", "field"), [
    (PortRuleHTTP(method="(?i)get"), "http[0].method"),
    (PortRuleHTTP(path="/a{"), "http[0].path"),
    (PortRuleHTTP(path="/a{,3}"), "http[0].path"),
    (PortRuleHTTP(path="/a*+"), "http[0].path"),
    (PortRuleHTTP(path="/a+?"), "http[0].path"),
    (PortRuleHTTP(path="/(a"), "http[0].path"),
    (PortRuleHTTP(host="\\1"), "http[0].host"),
    (PortRuleHTTP(host="[[:nope:]]"), "http[0].host"),
    (PortRuleHTTP(host="[[=a=]]"), "http[0].host"),
    (PortRuleHTTP(path="*a"), "http[0].path"),
    (PortRuleHTTP(path="[z-a]"), "http[0].path"),
    (PortRuleHTTP(headerMatches=(HeaderMatch("X", "v", mismatch="DROP"),)), "http[0].headerMatches[0].mismatch"),
    (PortRuleHTTP(headerMatches=(HeaderMatch("X", mismatch="ADD"),)), "http[0].headerMatches[0]"),
    (PortRuleHTTP(headers=(": v",)), "http[0].headers[0]"),
])
def test_refused_with_field_path(rule, field):
    with pytest.raises(HttpRuleError) as e:
        compile_http_rules([rule])
    assert str(e.value).startswith(field + ":") or str(e.value).startswith(field + ".")


@pytest.mark.parametrize(("ere", "text", "match"), [
    ("a|b", "b", True), ("(ab)+", "abab", True), ("(ab)+", "aba", False), ("a$", "a\n", False),
    ("^a", "a", True), ("[^a-c]x", "dx", True), ("[^a-c]x", "bx", False), ("[a-]", "-", True),
    ("[[:alpha:]_][[:alnum:]_]*", "_x9", True), ("[[:space:]]", "\t", True), (".", "\n", True),
    ("\\d+", "12", True), ("\\d+", "١٢", False),  # ASCII digits only, as RE2
    ("[&&]", "&", True), ("[--/]", ".", True),  # Python set syntax never applies
])
def test_ere_translation(ere, text, match):
    import re
    assert (re.fullmatch(translate_ere(ere), text, re.DOTALL | re.ASCII) is not None) is match


@pytest.mark.parametrize("ere", ["\\q", "[a--]", "a\\", "[abc"])
def test_not_an_ere(ere):
    with pytest.raises(EreError):
        translate_ere(ere)
