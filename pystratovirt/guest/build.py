"""Building the probe guest: compile ``probe/`` (C and assembly) into a bare-metal x86_64 ELF.

The probe is our own tiny guest for fast integration tests (see ``probe/commands.c`` for its
serial protocol). It is built like kernel code, because on the target host the guest's ring-0
code runs in an emulator that lacks SSE-era and some newer instructions: no libc, no red zone,
general-purpose registers only, no CET ``endbr64``. The linker script places it at physical
``layout.VMLINUX_LOAD_ADDR`` with the entry point there, so the VMM boots it like a raw vmlinux.

Builds are cached in ``$XDG_CACHE_HOME/pystratovirt`` (default ``~/.cache/pystratovirt``) as
``probe-<hash>.elf``, the hash covering every source file, the flags and the compiler's
version, so an edit or a compiler upgrade rebuilds and everything else is a cache hit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..memory.layout import VMLINUX_LOAD_ADDR

PROBE_SOURCE_DIR = Path(__file__).resolve().parent / "probe"
PROBE_ENTRY = VMLINUX_LOAD_ADDR
# The image must stay inside [16 MiB, 17 MiB): the tests check it, the VMM relies on the gap.
PROBE_REGION = (VMLINUX_LOAD_ADDR, VMLINUX_LOAD_ADDR + (1 << 20))

COMPILER = "gcc"
CFLAGS: tuple[str, ...] = (
    "-ffreestanding", "-nostdlib", "-nostartfiles", "-static", "-fno-pic", "-no-pie",
    "-mno-red-zone",            # interrupts arrive on the same stack
    "-mgeneral-regs-only",      # no SSE/x87: risky under the ring-0 emulator
    "-mcmodel=small",           # everything is identity mapped below 2 GiB
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",  # else gcc may turn memmove's loop into a memmove call
    "-fcf-protection=none",     # no endbr64
    "-O2", "-g0", "-Wall", "-Wextra",
)
LDFLAGS: tuple[str, ...] = (
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack",
)
LINKER_SCRIPT = "probe.ld"
_SOURCE_SUFFIXES = (".c", ".S", ".h", ".ld")


class ProbeBuildError(RuntimeError):
    """The probe guest could not be built."""


def probe_sources(source_dir: Path = PROBE_SOURCE_DIR) -> list[Path]:
    """Every file the build reads, in a stable order (new driver files are picked up as is)."""
    return sorted(p for p in source_dir.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pystratovirt"


def _compiler() -> str:
    path = shutil.which(COMPILER)
    if path is None:
        raise ProbeBuildError(f"cannot build the probe guest: {COMPILER} is not installed "
                              f"(on Debian: apt-get install gcc)")
    return path


def _compiler_identity(gcc: str) -> str:
    # `gcc --version`'s first line names the distribution build too, which -dumpversion omits.
    out = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else gcc


def _cache_key(gcc: str, sources: list[Path]) -> str:
    h = hashlib.sha256()
    for part in (_compiler_identity(gcc), *CFLAGS, *LDFLAGS, LINKER_SCRIPT):
        h.update(part.encode() + b"\0")
    for src in sources:
        h.update(src.name.encode() + b"\0")
        data = src.read_bytes()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def _compile(gcc: str, source_dir: Path, target: Path) -> str:
    """Compile and link into ``target``; returns the compiler's diagnostics (warnings)."""
    units = sorted(str(p) for p in source_dir.iterdir() if p.suffix in (".c", ".S"))
    cmd = [gcc, *CFLAGS, f"-I{source_dir}", *units,
           f"-Wl,-T,{source_dir / LINKER_SCRIPT}", *LDFLAGS, "-o", str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ProbeBuildError("compiling the probe guest failed:\n" + result.stderr.strip())
    return result.stderr


def build_probe(output: Path | None = None) -> Path:
    """Build the probe guest (or reuse the cached build) and return the ELF's path.

    With ``output``, the ELF is copied there and that path is returned; otherwise the path is
    the cache entry itself, which callers must not modify.
    """
    gcc = _compiler()
    sources = probe_sources()
    cached = cache_dir() / f"probe-{_cache_key(gcc, sources)}.elf"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the cache entry and rename into place: concurrent builders (parallel
        # test workers) each finish a whole file, and a reader never sees a partial one.
        with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".probe-build-") as tmp:
            target = Path(tmp) / "probe.elf"
            _compile(gcc, PROBE_SOURCE_DIR, target)
            os.replace(target, cached)
    if output is None:
        return cached
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not (output.exists() and output.samefile(cached)):
        shutil.copyfile(cached, output)
    return output
