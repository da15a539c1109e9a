"""The programs pilus and its tests, demo and benchmarks run, and the Debian packages
that provide them: one table (``programs.tsv`` beside this file) whose packages
``make setup`` installs and that callers check against, so a missing program is one
line naming its package instead of a failure deep inside a test."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class Program:
    name: str  # "-" for a package that provides a library or build input, not a command
    package: str
    used_by: str


class MissingProgram(RuntimeError):
    pass


@cache
def table() -> tuple[Program, ...]:
    text = resources.files("pilus").joinpath("programs.tsv").read_text()
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, package, used_by = line.split("\t")
        rows.append(Program(name, package, used_by))
    return tuple(rows)


def packages() -> list[str]:
    return sorted({p.package for p in table()})


def package_of(name: str) -> str | None:
    return next((p.package for p in table() if p.name == name), None)


def missing(names: list[str] | None = None) -> list[Program]:
    """The listed programs (all of the table's, or those named) not found on PATH."""
    wanted = [p for p in table() if p.name != "-" and (names is None or p.name in names)]
    return [p for p in wanted if shutil.which(p.name) is None]


def describe(programs: list[Program]) -> str:
    return ", ".join(f"{p.name} (Debian package {p.package})" for p in programs)


def require(*names: str) -> None:
    """Raise MissingProgram naming the package of every named program not on PATH."""
    unknown = [n for n in names if package_of(n) is None]
    if unknown:  # a caller of an unlisted program: the table is the one list
        raise ValueError(f"programs not listed in pilus/programs.tsv: {', '.join(unknown)}")
    gone = missing(list(names))
    if gone:
        raise MissingProgram(f"not installed: {describe(gone)}; run `make setup`")
