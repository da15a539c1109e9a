"""Compile the C datapath with clang, cached by content hash.

Output: ``<state_dir>/bpf/<sha256 of sources + flags + clang>/bpf_lxc.o``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

BPF_SRC_DIR = Path(__file__).resolve().parent.parent / "bpf"

_MULTIARCH = {
    "x86_64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
    "armv7l": "arm-linux-gnueabihf",
    "ppc64le": "powerpc64le-linux-gnu",
    "s390x": "s390x-linux-gnu",
    "riscv64": "riscv64-linux-gnu",
}


class CompileError(RuntimeError):
    """clang missing or the datapath failed to compile."""


def multiarch_include() -> str:
    triple = _MULTIARCH.get(platform.machine(), f"{platform.machine()}-linux-gnu")
    return f"/usr/include/{triple}"


def clang_flags(src_dir: Path = BPF_SRC_DIR) -> list[str]:
    return [
        "-O2",
        "-g",
        "-target",
        "bpf",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-Werror=implicit-function-declaration",
        f"-I{multiarch_include()}",
        f"-I{src_dir}",
    ]


def find_clang() -> str:
    for name in (os.environ.get("PILUS_CLANG"), "clang", "clang-14", "clang-15", "clang-16"):
        if name and (path := shutil.which(name)):
            return path
    raise CompileError("clang not found: run `make setup` (apt-get install clang llvm)")


def source_files(src_dir: Path = BPF_SRC_DIR) -> list[Path]:
    files = sorted(src_dir.glob("*.c")) + sorted((src_dir / "lib").glob("*.h"))
    if not files:
        raise CompileError(f"no BPF sources under {src_dir}")
    return files


def source_hash(flags: list[str], clang: str, src_dir: Path = BPF_SRC_DIR) -> str:
    h = hashlib.sha256()
    for f in source_files(src_dir):
        h.update(str(f.relative_to(src_dir)).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    h.update("\0".join(flags).encode())
    h.update(clang.encode())
    return h.hexdigest()


def compile_datapath(state_dir: Path, name: str = "bpf_lxc", src_dir: Path = BPF_SRC_DIR) -> Path:
    """Return the path of the compiled object, compiling if not cached."""
    clang = find_clang()
    flags = clang_flags(src_dir)
    digest = source_hash(flags, clang, src_dir)
    out_dir = Path(state_dir) / "bpf" / digest
    out = out_dir / f"{name}.o"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / f"{name}.c"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".o", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [clang, *flags, "-c", str(src), "-o", tmp],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            first = next(
                (ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()
            )
            raise CompileError(f"clang failed on {src.name}: {first}\n{proc.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
