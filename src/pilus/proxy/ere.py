"""POSIX extended regular expressions (what Cilium's ``method``/``path``/``host`` are) as
Python ``re`` patterns with the same meaning under ``re.fullmatch``.

Rules of the translation (POSIX.1-2017 XBD 9.4, the ERE grammar):

* ``.`` matches any character, newline included (``re.DOTALL``); ``^``/``$`` are anchors at
  the start/end of the whole value (``\\A``/``\\Z``: Python's ``$`` would also match before a
  trailing newline).
* Bracket expressions are rebuilt item by item: a leading ``]`` is literal, a backslash is
  literal inside brackets, ``[:alpha:]``-style classes become their ASCII ranges; every
  character is escaped so Python's nested-set syntax (``[[``, ``--``, ``&&``) never applies.
* ``\\`` before a special character escapes it; ``\\d \\D \\w \\W \\s \\S`` keep the meaning
  RE2 (Envoy's engine) gives them, in ASCII (``re.ASCII``).
* Refused, with a message: ``(?...)`` groups, back-references and other backslash escapes,
  ``[=x=]``/``[.x.]`` (collation), ``{`` that does not start a valid interval ``{n}``,
  ``{n,}``, ``{n,m}`` (Python would read it as a literal), and stacked repetition
  (``a*+``, ``a+?``: possessive or lazy in Python, not the ERE meaning).

Whether a full match exists does not depend on leftmost-longest (POSIX) vs leftmost-first
(Python) choice, so ``fullmatch`` gives the POSIX answer for every accepted pattern.
"""

from __future__ import annotations

import re

__all__ = ["EreError", "compile_ere", "translate_ere"]

_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": r" \t\n\r\f\v", "blank": r" \t", "punct": re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    "xdigit": "0-9A-Fa-f", "cntrl": r"\x00-\x1f\x7f", "print": r"\x20-\x7e", "graph": r"\x21-\x7e",
}
_SPECIAL = set(".[]()*+?{}|^$\\")
_KEPT_ESCAPES = set("dDwWsS")
_INTERVAL = re.compile(r"\{(\d+)(,(\d*))?\}")
_QUANT = set("*+?{")


class EreError(ValueError):
    """A pattern that is not a POSIX ERE, or not one Python can match the same way."""


def _bracket(p: str, i: int) -> tuple[str, int]:
    """Translate the bracket expression starting at p[i] == '['; return (python, next i)."""
    j = i + 1
    negate = j < len(p) and p[j] == "^"
    if negate:
        j += 1
    items: list[str] = []
    first = True
    while True:
        if j >= len(p):
            raise EreError("unterminated bracket expression '['")
        c = p[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if p.startswith("[:", j):
            end = p.find(":]", j + 2)
            name = p[j + 2:end] if end > 0 else ""
            if name not in _CLASSES:
                raise EreError(f"unknown character class '[:{name}:]'")
            items.append(_CLASSES[name])
            j = end + 2
            continue
        if p.startswith("[=", j) or p.startswith("[.", j):
            raise EreError(f"collating elements and equivalence classes ('{p[j:j + 2]}') are not supported")
        # a character, possibly the start of a range a-z
        if j + 2 < len(p) and p[j + 1] == "-" and p[j + 2] != "]":
            lo, hi = c, p[j + 2]
            if hi == "[" and p.startswith("[.", j + 2):
                raise EreError("collating elements in a range are not supported")
            if ord(lo) > ord(hi):
                raise EreError(f"invalid range '{lo}-{hi}' in bracket expression")
            items.append(f"{_esc(lo)}-{_esc(hi)}")
            j += 3
            continue
        items.append(_esc(c))
        j += 1
    return "[" + ("^" if negate else "") + "".join(items) + "]", j


def _esc(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def translate_ere(pattern: str) -> str:
    """The Python pattern for an ERE (raises EreError)."""
    out: list[str] = []
    i = 0
    prev_quant = False  # the last token was a repetition operator
    depth = 0
    while i < len(pattern):
        c = pattern[i]
        if c in _QUANT:
            if prev_quant:
                raise EreError(f"stacked repetition operators at offset {i} ('{pattern[max(0, i - 1):i + 1]}')")
            if c == "{":
                m = _INTERVAL.match(pattern, i)
                if not m:
                    raise EreError(f"'{{' at offset {i} does not start an interval {{n}}, {{n,}} or {{n,m}}")
                if m.group(3) and int(m.group(3)) < int(m.group(1)):
                    raise EreError(f"invalid interval '{m.group(0)}'")
                out.append(m.group(0))
                i = m.end()
            else:
                out.append(c)
                i += 1
            prev_quant = True
            continue
        prev_quant = False
        if c == "[":
            py, i = _bracket(pattern, i)
            out.append(py)
            continue
        if c == "\\":
            if i + 1 >= len(pattern):
                raise EreError("trailing backslash")
            n = pattern[i + 1]
            if n in _SPECIAL or n in _KEPT_ESCAPES:
                out.append("\\" + n)
            else:
                raise EreError(f"unsupported escape '\\{n}' at offset {i}")
            i += 2
            continue
        if c == "(":
            if pattern.startswith("(?", i):
                raise EreError(f"'(?' at offset {i} is not ERE syntax")
            depth += 1
            out.append("(")
        elif c == ")":
            if depth == 0:
                raise EreError(f"unmatched ')' at offset {i}")
            depth -= 1
            out.append(")")
        elif c == "^":
            out.append(r"\A")
        elif c == "$":
            out.append(r"\Z")
        elif c in ".|":
            out.append(c)
        else:
            out.append(_esc(c) if not (c.isalnum() or c in "/_-:,;=@%&!~'\"<># ") else re.escape(c))
        i += 1
    if depth:
        raise EreError("unmatched '('")
    return "".join(out)


def compile_ere(pattern: str) -> re.Pattern[str]:
    """Compile an ERE for ``fullmatch`` (raises EreError with the reason)."""
    py = translate_ere(pattern)
    try:
        return re.compile(py, re.DOTALL | re.ASCII)
    except re.error as e:
        raise EreError(str(e)) from None
