"""Cilium's matchName / matchPattern semantics as a truth table, and the refusals with reasons."""

from __future__ import annotations

import pytest

from pilus.fqdn.matchpattern import (
    NameMatcher,
    compile_name,
    compile_pattern,
    normalize,
    validate_name,
    validate_pattern,
)
from pilus.policy.l7 import PortRuleDNS

PATTERNS = [
    # pattern, name, matches
    ("*.cilium.io", "sub.cilium.io", True),
    ("*.cilium.io", "sub.cilium.io.", True),
    ("*.cilium.io", "SUB.Cilium.IO", True),  # case-insensitive
    ("*.CILIUM.io", "sub.cilium.io", True),
    ("*.cilium.io", "cilium.io", False),  # the star is in its own label, the dot is literal
    ("*.cilium.io", "a.b.cilium.io", False),  # * never crosses a dot
    ("*.cilium.io", "subxcilium.io", False),  # "." is not a regex dot
    ("*cilium.io", "cilium.io", True),  # zero characters
    ("*cilium.io", "www-cilium.io", True),
    ("*cilium.io", "a.cilium.io", False),
    ("sub.*.io", "sub.cilium.io", True),
    ("sub.*.io", "sub.a.b.io", False),
    ("a*b.com", "ab.com", True),
    ("a*b.com", "a-_9b.com", True),
    ("a**b.com", "axb.com", True),  # a run of stars inside a label is one *
    ("*", "api.github.com", True),  # a lone star matches every name
    ("*", ".", True),  # and the root (Cilium #11633)
    ("*.", "x.y.z", True),
    ("**", "x", True),
    ("**.cilium.io", "a.cilium.io", True),  # **. : one or more whole labels
    ("**.cilium.io", "a.b.c.cilium.io", True),
    ("**.cilium.io", "cilium.io", False),
    ("***.cilium.io", "a.b.cilium.io", True),
    ("**.cilium.io", "a.b.cilium.iox", False),
    ("api.github.com", "api.github.com", True),
    ("api.github.com", "api.github.com.evil", False),
    ("api.github.com", "xapi.github.com", False),
]


@pytest.mark.parametrize(("pattern", "name", "want"), PATTERNS)
def test_pattern_truth_table(pattern, name, want):
    assert bool(compile_pattern(pattern).fullmatch(normalize(name))) is want
    assert NameMatcher(patterns=[pattern]).matches(name) is want


def test_a_star_does_not_match_odd_characters():
    # dnspython writes a space in a label as \032: not a DNS-name character, so * refuses it
    assert not compile_pattern("*.cilium.io").fullmatch(normalize("a\\032b.cilium.io"))
    assert not NameMatcher(patterns=["*"]).matches("a\\032b.com.")


def test_normalize():
    assert normalize("API.GitHub.com") == "api.github.com."
    assert normalize(" api.github.com. ") == "api.github.com."
    assert normalize("") == "."


def test_match_name_is_exact():
    r = compile_name("API.github.com")
    assert r.fullmatch("api.github.com.")
    assert not r.fullmatch("apixgithub.com.")  # dots are literal
    m = NameMatcher(names=["api.github.com"])
    assert m.matches("API.GITHUB.COM") and m.matches("api.github.com.")
    assert not m.matches("www.api.github.com") and not m.matches("github.com")


@pytest.mark.parametrize(("bad", "reason"), [
    ("", "must not be empty"),
    ("a..b", "empty label"),
    (".cilium.io", "empty label"),
    ("a b.com", "character ' ' at 1 is not allowed"),
    ("*.ci[l]ium.io", "character '[' at 4"),
    ("cilium.io/x", "character '/'"),
    ("(a|b).com", "character '('"),
    ("x" * 64 + ".com", "longer than 63 characters (64)"),
    (("a" * 60 + ".") * 5, "longer than 255 characters"),
    (7, "must be a string"),
])
def test_invalid_patterns_are_refused_with_the_reason(bad, reason):
    with pytest.raises(ValueError) as e:
        validate_pattern(bad)
    assert reason in str(e.value)


def test_names_refuse_stars():
    assert validate_name("api.github.com.") == "api.github.com."
    with pytest.raises(ValueError, match=r"character '\*' at 0"):
        validate_name("*.github.com")
    assert validate_pattern("*.github.com") == "*.github.com"


def test_matcher_from_rules_and_allow_all():
    m = NameMatcher.from_rules([{"matchPattern": "*.cilium.io"}, {"matchName": "api.github.com"}])
    assert m.matches("docs.cilium.io") and m.matches("api.github.com") and not m.matches("evil.com")
    assert m.describe() == ["api.github.com.", "pattern:*.cilium.io."]
    assert NameMatcher.from_rules([]).matches("anything.at.all")
    assert NameMatcher.from_rules([{}]).matches("anything.at.all")
    assert NameMatcher.from_rules([{"matchName": "a.com"}, {}]).allow_all
    typed = NameMatcher.from_rules([PortRuleDNS(matchPattern="*.cilium.io"), PortRuleDNS(matchName="x.org")])
    assert typed.matches("a.cilium.io") and typed.matches("x.org") and not typed.matches("y.org")


@pytest.mark.parametrize(("rules", "error"), [
    ([{"matchName": "a.com", "matchPattern": "*.com"}], "dns[0]: only one of matchName and matchPattern"),
    ([{"matchName": "a.com"}, {"matchPattern": "a..com"}], "dns[1].matchPattern: empty label"),
    ([{"matchName": "*.com"}], "dns[0].matchName: character '*' at 0"),
    ([{"matchname": "a.com"}], "dns[0].matchname: unknown field"),
    (["a.com"], "dns[0]: must be an object"),
])
def test_matcher_errors_name_the_field(rules, error):
    with pytest.raises(ValueError) as e:
        NameMatcher.from_rules(rules)
    assert str(e.value).startswith(error), str(e.value)


def test_union():
    a = NameMatcher.from_rules([{"matchName": "a.com"}])
    b = NameMatcher.from_rules([{"matchPattern": "*.b.com"}])
    u = NameMatcher.union([a, b])
    assert u.matches("a.com") and u.matches("x.b.com") and not u.matches("c.com")
    assert NameMatcher.union([a, NameMatcher(allow_all=True)]).matches("c.com")
