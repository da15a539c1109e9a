"""Cilium's ``PortRuleHTTP`` semantics, as its Envoy filter enforces them (pure, no I/O).

* ``method``, ``path``, ``host``: POSIX extended regexes matched against the WHOLE value
  (``re.fullmatch`` of the translation in ``ere.py``); '' = not checked. ``path`` is matched
  against the request target as sent (Envoy's ``:path``: path and query), ``host`` against the
  ``Host`` header (HTTP/2: ``:authority``).
* ``headers``: "Name" (the header is present) or "Name: value" (its value equals ``value``);
  names are case-insensitive; several fields of one name are joined with "," first (Envoy).
* ``headerMatches``: ``name`` + ``value`` and/or ``secret``. The expected value is the secret's
  when the store has it, else ``value``; a secret that is missing with no ``value`` fails the
  match whatever the mismatch action; no value and no secret = presence only. On a mismatch:
  "" = the rule does not match, LOG = it still matches (the mismatch is recorded), ADD = add the
  expected value (a further field when one is present), DELETE = remove the header, REPLACE =
  set the header to the expected value. ADD and REPLACE need a value or a secret.
* A request is allowed when ANY rule allows it; an empty rule ``{}`` allows everything, and so
  does an empty rule list. As in Envoy, once any rule has headerMatches every rule whose
  method/path/host/headers match runs its header actions, in order, and the request is allowed
  when one of them passed all its header matches.

Secret values are never part of a verdict, an error or a record: only header names and actions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pilus.policy.l7 import HeaderMatch, PortRuleHTTP, Secret

from .ere import EreError, compile_ere

__all__ = [
    "MISMATCH_ACTIONS", "CompiledHttpRules", "DictSecretStore", "HttpRuleError", "HttpVerdict",
    "RequestHead", "SecretStore", "compile_http_rules", "deny_all", "rule_from_dict",
]

MISMATCH_ACTIONS = ("", "LOG", "ADD", "DELETE", "REPLACE")


class SecretStore(Protocol):
    """Where headerMatches secrets come from: the value, or None when there is no such secret."""

    def get(self, secret: Secret) -> str | None: ...


class DictSecretStore:
    """Secrets from a mapping "namespace/name" -> value (tests; the proxy's --secrets file)."""

    def __init__(self, values: Mapping[str, str] | None = None):
        self._values = dict(values or {})

    def get(self, secret: Secret) -> str | None:
        return self._values.get(f"{secret.namespace}/{secret.name}")

    def __repr__(self) -> str:  # never show values
        return f"DictSecretStore({len(self._values)} secrets)"


class HttpRuleError(ValueError):
    """An HTTP rule the proxy refuses, with the field path (``http[0].path: ...``)."""


@dataclass
class RequestHead:
    """What the rules look at; header actions edit ``headers`` in place."""

    method: str
    path: str
    host: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """All fields named ``name`` (case-insensitive) joined with ',', or None."""
        lname = name.lower()
        vals = [v for n, v in self.headers if n.lower() == lname]
        return ",".join(vals) if vals else None

    def remove(self, name: str) -> None:
        lname = name.lower()
        self.headers[:] = [(n, v) for n, v in self.headers if n.lower() != lname]


@dataclass(frozen=True)
class HttpVerdict:
    allowed: bool
    rule: int | None = None  # index of the first rule that allowed the request
    mismatches: tuple[tuple[str, str], ...] = ()  # (header name, action taken); never values


@dataclass(frozen=True)
class _HeaderMatch:
    name: str
    value: str | None
    secret: Secret | None
    mismatch: str


@dataclass(frozen=True)
class _Rule:
    method: re.Pattern[str] | None
    path: re.Pattern[str] | None
    host: re.Pattern[str] | None
    headers: tuple[tuple[str, str | None], ...]
    header_matches: tuple[_HeaderMatch, ...]

    def basic_match(self, req: RequestHead) -> bool:
        for pat, val in ((self.method, req.method), (self.path, req.path), (self.host, req.host)):
            if pat is not None and pat.fullmatch(val) is None:
                return False
        for name, want in self.headers:
            got = req.get(name)
            if got is None or (want is not None and got != want):
                return False
        return True


def _header_match(hm: _HeaderMatch, req: RequestHead, secrets: SecretStore, log: list[tuple[str, str]]) -> bool:
    expected = hm.value
    if hm.secret is not None:
        secret_value = secrets.get(hm.secret)
        if secret_value is not None:
            expected = secret_value
        elif hm.value is None:
            log.append((hm.name, "SECRET-MISSING"))
            return False
    got = req.get(hm.name)
    if got is not None and (expected is None or got == expected):
        return True
    action = hm.mismatch
    if action == "":
        log.append((hm.name, "FAIL"))
        return False
    if action == "ADD":
        assert expected is not None  # compile_http_rules refuses ADD without a value
        req.headers.append((hm.name, expected))
    elif action == "DELETE":
        req.remove(hm.name)
    elif action == "REPLACE":
        assert expected is not None
        req.remove(hm.name)
        req.headers.append((hm.name, expected))
    log.append((hm.name, action))
    return True


@dataclass(frozen=True)
class CompiledHttpRules:
    """The union of HTTP rules that apply to one (direction, endpoint, port, peer)."""

    rules: tuple[_Rule, ...] = ()
    allow_all: bool = False  # from an empty rule list; no rules and not allow_all = deny everything

    def evaluate(self, req: RequestHead, secrets: SecretStore) -> HttpVerdict:
        if self.allow_all:
            return HttpVerdict(True, None)
        if not self.rules:  # deny_all(): no rule set applies
            return HttpVerdict(False, None)
        has_matches = any(r.header_matches for r in self.rules)
        log: list[tuple[str, str]] = []
        allowed_by: int | None = None
        for i, rule in enumerate(self.rules):
            if not rule.basic_match(req):
                continue
            if not has_matches:
                return HttpVerdict(True, i)
            ok = True
            for hm in rule.header_matches:  # every action runs, like Envoy's headerMatch loop
                ok = _header_match(hm, req, secrets, log) and ok
            if ok and allowed_by is None:
                allowed_by = i
        return HttpVerdict(allowed_by is not None, allowed_by, tuple(log))

    @staticmethod
    def union(parts: Iterable[CompiledHttpRules]) -> CompiledHttpRules:
        parts = list(parts)
        if any(p.allow_all for p in parts):
            return CompiledHttpRules((), True)
        return CompiledHttpRules(tuple(r for p in parts for r in p.rules), False)


_DENY_ALL = CompiledHttpRules((), False)


def deny_all() -> CompiledHttpRules:
    """No rule set applies: nothing is allowed."""
    return _DENY_ALL



def _regex(value: str, where: str) -> re.Pattern[str] | None:
    if value == "":
        return None
    try:
        return compile_ere(value)
    except EreError as e:
        raise HttpRuleError(f"{where}: invalid regular expression {value!r}: {e}") from None


def _compile_rule(rule: PortRuleHTTP, where: str) -> _Rule:
    headers: list[tuple[str, str | None]] = []
    for j, h in enumerate(rule.headers):
        name, sep, val = h.partition(":")
        if not name.strip():
            raise HttpRuleError(f"{where}.headers[{j}]: empty header name")
        headers.append((name.strip(), val.strip() if sep else None))
    matches: list[_HeaderMatch] = []
    for j, hm in enumerate(rule.headerMatches):
        at = f"{where}.headerMatches[{j}]"
        if not hm.name:
            raise HttpRuleError(f"{at}.name: must not be empty")
        if hm.mismatch not in MISMATCH_ACTIONS:
            raise HttpRuleError(f"{at}.mismatch: unknown action {hm.mismatch!r} (one of LOG, ADD, DELETE, REPLACE)")
        value = hm.value if hm.value not in (None, "") else None
        if hm.mismatch in ("ADD", "REPLACE") and value is None and hm.secret is None:
            raise HttpRuleError(f"{at}: mismatch {hm.mismatch} needs a value or a secret")
        matches.append(_HeaderMatch(hm.name, value, hm.secret, hm.mismatch))
    return _Rule(
        _regex(rule.method, f"{where}.method"), _regex(rule.path, f"{where}.path"),
        _regex(rule.host, f"{where}.host"), tuple(headers), tuple(matches),
    )


def compile_http_rules(rules: Iterable[PortRuleHTTP], where: str = "http") -> CompiledHttpRules:
    """Compile typed rules (raises HttpRuleError naming the field)."""
    rules = list(rules)
    compiled = tuple(_compile_rule(r, f"{where}[{i}]") for i, r in enumerate(rules))
    return CompiledHttpRules(compiled, allow_all=not compiled)


def rule_from_dict(d: Mapping[str, object], where: str) -> PortRuleHTTP:
    """A PortRuleHTTP from its policy/JSON form (Cilium's field names)."""
    known = {"method", "path", "host", "headers", "headerMatches"}
    if not isinstance(d, Mapping):
        raise HttpRuleError(f"{where}: must be an object")
    for k in d:
        if k not in known:
            raise HttpRuleError(f"{where}.{k}: unknown field")
    for k in ("method", "path", "host"):
        if not isinstance(d.get(k, ""), str):
            raise HttpRuleError(f"{where}.{k}: must be a string")
    headers = d.get("headers", []) or []
    if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
        raise HttpRuleError(f"{where}.headers: must be a list of strings")
    hms = []
    for j, hm in enumerate(d.get("headerMatches", []) or []):
        at = f"{where}.headerMatches[{j}]"
        if not isinstance(hm, Mapping):
            raise HttpRuleError(f"{at}: must be an object")
        for k in hm:
            if k not in ("name", "value", "secret", "mismatch"):
                raise HttpRuleError(f"{at}.{k}: unknown field")
        sec = hm.get("secret")
        secret = None
        if sec is not None:
            if not isinstance(sec, Mapping) or not sec.get("name"):
                raise HttpRuleError(f"{at}.secret: needs name (and namespace)")
            secret = Secret(str(sec.get("namespace", "")), str(sec["name"]))
        hms.append(HeaderMatch(str(hm.get("name", "")), hm.get("value"), secret, str(hm.get("mismatch", "") or "")))
    return PortRuleHTTP(str(d.get("method", "")), str(d.get("path", "")), str(d.get("host", "")),
                        tuple(headers), tuple(hms))
