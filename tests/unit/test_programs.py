"""Every program that code, tests, benchmarks, the demo or a documented example runs is
in pilus/programs.tsv, the list `make setup` installs from. A fresh machine has only
what setup installs; this catches a new `ping` before CI on a fresh machine does.

The scanner reads the sources instead of running them: it finds the places where a
program name is executed (the first element of an argv handed to subprocess or to a
wrapper of it, the command after `ip netns exec NS` or `pilus exec REF --`, the first
word of a shell command line, a `shutil.which` lookup)."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

from pilus import programs

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["src", "tests", "bench"]
DOCS = ["README.md", "docs"]

EXEC_CALLS = {"run", "Popen", "check_output", "check_call", "call", "execvp", "execvpe", "execv", "which"}
ARGV_NAMES = {"argv", "cmd", "command"}
# argv words that are not programs looked up on PATH: ours, and the interpreter itself
NOT_ON_PATH = {"pilus"}
_WORD = re.compile(r"^[a-z][a-z0-9_.+-]*$")  # lower case: CMD, PROG are placeholders
_PROG = r"([a-z][a-z0-9_.+-]*)(?=\s|$)"
_AFTER = [re.compile(r"\bnetns exec +\S+ +" + _PROG), re.compile(r"\bpilus exec +\S+ +-- +" + _PROG)]
_CODE = re.compile(r"```[^\n]*\n(.*?)```|``(.+?)``|`([^`\n]+)`", re.S)


def _shown_commands(text: str) -> list[str]:
    """Programs that prose shows being run: in code spans and blocks when it has any
    (`ip netns exec <node>` creates ... names no program), else anywhere (help texts)."""
    spans = ["".join(m.groups(default="")) for m in _CODE.finditer(text)] if "`" in text else [text]
    return [m.group(1) for span in spans for pattern in _AFTER for m in pattern.finditer(span)]


def _const(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):  # the literal text of an f-string, holes as "{}"
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _netns_programs(words: list[str | None]) -> list[str]:
    """What `ip netns exec NS PROG` in an argv runs."""
    return [words[i + 3] for i in range(len(words) - 3)
            if words[i] == "netns" and words[i + 1] == "exec" and words[i + 3] and _WORD.match(words[i + 3])]


def _argv_programs(elts: list[ast.AST]) -> list[str]:
    """Programs an argv literal runs: its first word, and what `netns exec NS` runs."""
    words = [_const(e) for e in elts]
    first = [words[0]] if words and words[0] and _WORD.match(words[0]) else []
    return first + _netns_programs(words)


def _line_programs(text: str) -> list[str]:
    """Programs a shell command line runs."""
    found = _shown_commands(text)
    first = text.strip().split(" ", 1)[0]
    return found + [first] if _WORD.match(first) else found


def _callee(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _command_param(argv: ast.AST, params: list[str]) -> str | None:
    """The parameter that becomes the command in `argv`: the argv itself, or spliced in."""
    if isinstance(argv, ast.Name) and argv.id in params:
        return argv.id
    if isinstance(argv, ast.List | ast.Tuple):
        words = [_const(e) for e in argv.elts]
        for i, e in enumerate(argv.elts):
            runs_it = i == 0 or (i >= 3 and words[i - 3:i - 1] == ["netns", "exec"])
            if runs_it and isinstance(e, ast.Starred) and isinstance(e.value, ast.Name) and e.value.id in params:
                return e.value.id
    return None


def _wrappers(tree: ast.AST) -> dict[str, tuple[int, bool]]:
    """Functions that run (or build the argv of) a command given as a parameter:
    name -> (index of that parameter, whether it is *args)."""
    fns = [fn for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)]
    found: dict[str, tuple[int, bool]] = {}
    changed = True
    while changed:  # wrappers of wrappers
        changed = False
        for fn in fns:
            if fn.name in found:
                continue
            params = [a.arg for a in fn.args.args]
            vararg = fn.args.vararg.arg if fn.args.vararg else None
            candidates = [c.args[found[_callee(c)][0]] if _callee(c) in found else c.args[0]
                          for c in ast.walk(fn) if isinstance(c, ast.Call) and c.args
                          and (_callee(c) in EXEC_CALLS or (_callee(c) in found
                                                           and len(c.args) > found[_callee(c)][0]))]
            candidates += [r.value for r in ast.walk(fn) if isinstance(r, ast.Return) and r.value is not None]
            for argv in candidates:
                name = _command_param(argv, params + ([vararg] if vararg else []))
                if name is not None:
                    found[fn.name] = (len(params), True) if name == vararg else (params.index(name), False)
                    changed = True
                    break
    return found


class _Scanner(ast.NodeVisitor):
    def __init__(self, wrappers: dict[str, tuple[int, bool]]) -> None:
        self.found: set[str] = set()
        self.wrappers = wrappers

    def visit_Call(self, node: ast.Call) -> None:
        callee = _callee(node) or ""
        index, spliced = (0, False) if callee in EXEC_CALLS else self.wrappers.get(callee, (None, False))
        if index is not None and len(node.args) > index:
            arg = node.args[index]
            if spliced:
                self.found.update(_argv_programs(node.args[index:]))
            elif isinstance(arg, ast.List | ast.Tuple):
                self.found.update(_argv_programs(arg.elts))
            elif (text := _const(arg)) is not None:
                self.found.update(_line_programs(text))
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        named = any(isinstance(t, ast.Name) and t.id in ARGV_NAMES for t in node.targets)
        if named and isinstance(node.value, ast.List | ast.Tuple):
            self.found.update(_argv_programs(node.value.elts))
        self.generic_visit(node)

    def visit_List(self, node: ast.List) -> None:
        # `ip netns exec NS PROG` in any list, e.g. one a helper returns
        self.found.update(_netns_programs([_const(e) for e in node.elts]))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):  # help texts and docstrings that show examples
            self.found.update(_shown_commands(node.value))


def scan_python(source: str) -> set[str]:
    tree = ast.parse(source)
    scanner = _Scanner(_wrappers(tree))
    scanner.visit(tree)
    return scanner.found


def scan_docs(text: str) -> set[str]:
    return set(_shown_commands(text))


def programs_used() -> dict[str, set[str]]:
    """program -> the files that run it."""
    used: dict[str, set[str]] = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # its examples name programs on purpose
            for prog in scan_python(path.read_text()):
                used.setdefault(prog, set()).add(str(path.relative_to(REPO)))
    for top in DOCS:
        paths = [REPO / top] if (REPO / top).is_file() else sorted((REPO / top).rglob("*.md"))
        for path in paths:
            for prog in scan_docs(path.read_text()):
                used.setdefault(prog, set()).add(str(path.relative_to(REPO)))
    return used


def test_every_program_run_is_installed_by_setup():
    listed = {p.name for p in programs.table()}
    unlisted = {prog: sorted(files) for prog, files in programs_used().items()
                if prog not in listed and prog not in NOT_ON_PATH}
    assert not unlisted, (
        "programs run but not in src/pilus/programs.tsv (so `make setup` does not install them): "
        + "; ".join(f"{p} in {', '.join(f)}" for p, f in sorted(unlisted.items())))


def test_the_scanner_finds_the_ways_programs_are_run():
    source = textwrap.dedent('''
        import subprocess, shutil, os
        def _sh(cmd, check=True):
            return subprocess.run(cmd, shell=True, check=check)
        def _ns(netns, *cmd):
            return subprocess.run(["ip", "netns", "exec", netns, *cmd])
        def ns_cmd(ns, cpu, argv):
            return ["ip", "netns", "exec", ns, "tool-d", "-c", str(cpu), *argv]
        subprocess.run(["tool-a", "-i", "eth0"])
        _sh(f"ip netns exec {ep} tool-b -c1 10.0.0.1")
        _ns(node, "tool-c", "-c1")
        argv = ["tool-e", "-c", ip]
        shutil.which("tool-f")
        os.execvp("ip", ["ip", "netns", "exec", ns, "tool-g"])
        HELP = "example: pilus exec default/xwing -- tool-h -s http://x/"
        labels = ["netns", "name"]   # data, not a command
    ''')
    assert scan_python(source) == {"tool-a", "ip", "tool-b", "tool-c", "tool-d", "tool-e", "tool-f", "tool-g", "tool-h"}
    assert scan_docs("Run `pilus exec default/xwing -- tool-i -z 10.0.0.1 80`.") == {"tool-i"}
    assert scan_docs("a process started by `ip netns exec <node>` creates links") == set()
    assert scan_docs("```\npilus exec default/xwing -- CMD [ARG...]\n```") == set()


def test_the_makefile_installs_the_table():
    makefile = (REPO / "Makefile").read_text()
    listed = re.search(r"^APT_PKGS := ((?:.*\\\n)*.*)$", makefile, re.M)
    assert listed and "apt-get install" in makefile
    assert sorted(set(listed.group(1).replace("\\", " ").split())) == programs.packages()


def test_require_names_the_missing_package(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None if name == "ping" else f"/usr/bin/{name}")
    try:
        programs.require("ip", "ping")
    except programs.MissingProgram as exc:
        assert str(exc) == "not installed: ping (Debian package iputils-ping); run `make setup`"
    else:
        raise AssertionError("require() accepted a missing program")
