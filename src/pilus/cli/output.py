"""Output formatting shared by all commands: aligned tables (cilium-dbg style),
``-o json|yaml``, key/value detail views and small value formatters."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

Cell = Any  # str/int/None, or a list of lines (continuation rows)

COLUMN_GAP = 3  # like cilium-dbg's tabwriter padding
STATUS_LABEL_WIDTH = 25  # "KVStore:" + padding, as in cilium-dbg status


def _lines(cell: Cell) -> list[str]:
    if cell is None:
        return [""]
    if isinstance(cell, (list, tuple)):
        return [str(c) for c in cell] or [""]
    return [str(cell)]


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], *,
          no_headers: bool = False) -> str:
    """Align columns; a list cell spreads over continuation lines where only that
    column is filled (how cilium-dbg shows one label per line)."""
    lines: list[list[str]] = [] if no_headers else [list(headers)]
    for row in rows:
        cells = [_lines(c) for c in row]
        height = max((len(c) for c in cells), default=1)
        for i in range(height):
            lines.append([c[i] if i < len(c) else "" for c in cells])
    if not lines:
        return ""
    ncols = max(len(line) for line in lines)
    widths = [0] * ncols
    for line in lines:
        for i, cell in enumerate(line):
            widths[i] = max(widths[i], len(cell))
    out = []
    for line in lines:
        parts = [cell.ljust(widths[i] + COLUMN_GAP) for i, cell in enumerate(line)]
        out.append("".join(parts).rstrip())
    return "\n".join(out) + "\n"


def detail(pairs: Iterable[tuple[str, Cell]]) -> str:
    """``Key:   value`` lines; list values continue under the first value."""
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0) + 2
    out = []
    for key, value in pairs:
        vals = _lines(value)
        out.append(f"{(key + ':').ljust(width)}{vals[0]}".rstrip())
        out.extend((" " * width + v).rstrip() for v in vals[1:])
    return "\n".join(out) + "\n"


def status_lines(pairs: Iterable[tuple[str, Cell]]) -> str:
    """``cilium-dbg status`` layout: label padded to a fixed column."""
    out = []
    for key, value in pairs:
        vals = _lines(value)
        out.append(f"{(key + ':').ljust(STATUS_LABEL_WIDTH)}{vals[0]}".rstrip())
        out.extend((" " * STATUS_LABEL_WIDTH + v).rstrip() for v in vals[1:])
    return "\n".join(out) + "\n"


def dump(data: Any, fmt: str) -> str:
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return json.dumps(data, indent=2) + "\n"


def emit(text: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


# -- value formatters -------------------------------------------------------------

def duration(seconds: float | int | None) -> str:
    """Go-like short duration: 45s, 3m12s, 2h5m, 3d4h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 0:
        return "0s"
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m}m"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def number(value: Any) -> str:
    """Integers as integers, other numbers with 6 decimals (cilium-dbg metrics list)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6f}"
    return "-" if value is None else str(value)


def sorted_labels(labels: Iterable[str] | None) -> list[str]:
    return sorted(labels or [])


def or_dash(value: Any) -> str:
    return "-" if value in (None, "") else str(value)
