"""DNS names and Cilium's ``matchName`` / ``matchPattern`` (pkg/fqdn/matchpattern), as the DNS
proxy's rules and the policy engine's toFQDNs selectors use them.

- Names are compared in FQDN form: lowercased, with the trailing dot (``api.github.com.``).
- ``matchName`` matches that one name.
- ``matchPattern``: ``*`` matches zero or more of ``[-a-zA-Z0-9_]``, so it never crosses a dot
  (``*.cilium.io`` matches ``sub.cilium.io.`` but not ``a.b.cilium.io.`` and not ``cilium.io.``).
  A pattern of only stars (``*``, ``**``, ``*.``) matches every name, the root ``.`` included.
  A leading ``**.`` (two or more stars, then a dot) matches one or more whole labels
  (``**.cilium.io`` matches ``a.cilium.io.`` and ``a.b.cilium.io.``, not ``cilium.io.``), as in
  Cilium 1.17+; elsewhere a run of stars means one ``*``, as Cilium reads it.
- Validation refuses, with the reason: characters other than ``[-a-zA-Z0-9_.]`` (and ``*`` in
  patterns), more than 255 characters, a label over 63 characters, empty labels (``a..b``,
  a leading dot).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_LABEL_LENGTH", "MAX_NAME_LENGTH", "NameMatcher", "compile_name", "compile_pattern", "normalize",
           "validate_name", "validate_pattern"]

MAX_NAME_LENGTH = 255  # Cilium's MaxFQDNLength for matchName / matchPattern
MAX_LABEL_LENGTH = 63
_LABEL_CHARS = "[-a-zA-Z0-9_]"
_MATCH_ALL = re.compile(rf"(?:{_LABEL_CHARS}+\.)+|\.")  # every name, and the root (Cilium #11633)
_BAD_NAME_CHAR = re.compile(r"[^-a-zA-Z0-9_.]")
_BAD_PATTERN_CHAR = re.compile(r"[^-a-zA-Z0-9_.*]")
_MULTI_LABEL_PREFIX = re.compile(r"\*{2,}\.")


def normalize(name: str) -> str:
    """The FQDN form names are compared in: stripped, lowercased, with the trailing dot."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _check(s: Any, bad: re.Pattern[str], allowed: str) -> str:
    if not isinstance(s, str):
        raise ValueError("must be a string")
    s = s.strip()
    if not s:
        raise ValueError("must not be empty")
    if len(s) > MAX_NAME_LENGTH:
        raise ValueError(f"longer than {MAX_NAME_LENGTH} characters ({len(s)})")
    m = bad.search(s)
    if m:
        raise ValueError(f"character {m.group()!r} at {m.start()} is not allowed (only {allowed})")
    body = s[:-1] if s.endswith(".") else s
    for label in body.split("."):
        if not label:
            raise ValueError("empty label (a leading dot or two dots in a row)")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label {label[:16]!r}... is longer than {MAX_LABEL_LENGTH} characters ({len(label)})")
    return s


def validate_name(s: Any) -> str:
    """``s`` (a matchName) stripped; ValueError with the reason when it is not a DNS name."""
    return _check(s, _BAD_NAME_CHAR, "a-z, A-Z, 0-9, '-', '_' and '.'")


def validate_pattern(s: Any) -> str:
    """``s`` (a matchPattern) stripped; ValueError with the reason when it is not a pattern."""
    return _check(s, _BAD_PATTERN_CHAR, "a-z, A-Z, 0-9, '-', '_', '.' and '*'")


def compile_name(s: str) -> re.Pattern[str]:
    """A regex that fullmatches the normalized name ``s`` alone."""
    return re.compile(re.escape(normalize(validate_name(s))))


def compile_pattern(s: str) -> re.Pattern[str]:
    """A regex to ``fullmatch`` against normalized names (ValueError: the pattern is invalid)."""
    p = normalize(validate_pattern(s))
    if set(p[:-1]) == {"*"}:
        return _MATCH_ALL
    out: list[str] = []
    i = 0
    if m := _MULTI_LABEL_PREFIX.match(p):  # "**." : one or more whole labels
        out.append(rf"{_LABEL_CHARS}+(?:\.{_LABEL_CHARS}+)*\.")
        i = m.end()
    while i < len(p):
        c = p[i]
        if c == "*":
            while i + 1 < len(p) and p[i + 1] == "*":
                i += 1
            out.append(_LABEL_CHARS + "*")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _field(rule: Any, key: str) -> Any:
    return rule.get(key) if isinstance(rule, dict) else getattr(rule, key, None)


class NameMatcher:
    """The names a list of PortRuleDNS-like rules allows (a query is allowed when any rule
    matches). ``[]`` or a rule ``{}`` allows every name."""

    def __init__(self, names: Iterable[str] = (), patterns: Iterable[str] = (), *, allow_all: bool = False):
        self.names = frozenset(normalize(validate_name(n)) for n in names)
        self.patterns = tuple(dict.fromkeys(normalize(validate_pattern(p)) for p in patterns))
        self.allow_all = allow_all
        self._regexes = tuple(compile_pattern(p) for p in self.patterns)

    @classmethod
    def from_rules(cls, rules: Iterable[Any], where: str = "dns") -> NameMatcher:
        """From ``[{"matchName": ...} | {"matchPattern": ...}]`` (dicts or ``PortRuleDNS``).
        Errors start with the field path: ``dns[1].matchPattern: ...``."""
        rules = list(rules)
        names: list[str] = []
        patterns: list[str] = []
        allow_all = not rules
        for i, rule in enumerate(rules):
            if isinstance(rule, dict):
                unknown = set(rule) - {"matchName", "matchPattern"}
                if unknown:
                    raise ValueError(f"{where}[{i}].{sorted(unknown)[0]}: unknown field")
            elif not hasattr(rule, "matchName"):
                raise ValueError(f"{where}[{i}]: must be an object with matchName or matchPattern")
            name, pattern = _field(rule, "matchName") or "", _field(rule, "matchPattern") or ""
            if name and pattern:
                raise ValueError(f"{where}[{i}]: only one of matchName and matchPattern")
            try:
                if name:
                    names.append(validate_name(name))
                elif pattern:
                    patterns.append(validate_pattern(pattern))
                else:
                    allow_all = True  # {}: every request (visibility)
            except ValueError as e:
                raise ValueError(f"{where}[{i}].{'matchName' if name else 'matchPattern'}: {e}") from None
        return cls(names, patterns, allow_all=allow_all)

    @classmethod
    def union(cls, matchers: Iterable[NameMatcher]) -> NameMatcher:
        matchers = list(matchers)
        out = cls(allow_all=any(m.allow_all for m in matchers))
        out.names = frozenset().union(*(m.names for m in matchers))
        pats = dict.fromkeys(p for m in matchers for p in m.patterns)
        out.patterns = tuple(pats)
        regexes = {p: r for m in matchers for p, r in zip(m.patterns, m._regexes, strict=True)}
        out._regexes = tuple(regexes[p] for p in out.patterns)
        return out

    def matches(self, name: str) -> bool:
        if self.allow_all:
            return True
        n = normalize(name)
        return n in self.names or any(r.fullmatch(n) for r in self._regexes)

    def describe(self) -> list[str]:
        """For status and traces: ``*`` (everything), names, then patterns."""
        if self.allow_all:
            return ["*"]
        return sorted(self.names) + [f"pattern:{p}" for p in self.patterns]

    def __repr__(self) -> str:
        return f"NameMatcher({', '.join(self.describe()) or 'nothing'})"
