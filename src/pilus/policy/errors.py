"""Policy validation errors: one issue per problem, each with its document and field path.

Paths are written as in the document (``spec.ingress[0].toPorts[0].ports[0].port``);
pydantic's locations are turned into that form here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

__all__ = ["PolicyValidationError", "ValidationIssue", "format_pydantic", "format_loc"]


@dataclass(frozen=True)
class ValidationIssue:
    doc_index: int
    path: str
    reason: str
    doc: str = ""  # "CiliumNetworkPolicy default/foo" when known

    def __str__(self) -> str:
        where = f"document {self.doc_index}" + (f" ({self.doc})" if self.doc else "")
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class PolicyValidationError(Exception):
    def __init__(self, errors: list[ValidationIssue]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = {"except_": "except", "from_": "from"}.get(str(part), str(part))
            out += ("." if out else "") + part
    return out


def format_pydantic(prefix: str, err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Input should be"):
            msg = "wrong type: " + msg[0].lower() + msg[1:] + f" (got {type(e.get('input')).__name__})"
        if msg.startswith("[") and "]: " in msg:  # list item errors raised from a list validator
            idx, msg = msg.split(": ", 1)
            loc = loc + (int(idx[1:-1]),)
        path = format_loc(loc)
        out.append((f"{prefix}.{path}" if prefix and path else prefix or path, msg))
    return out
