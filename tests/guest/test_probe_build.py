"""The probe guest's build: a clean compile, the ELF's shape, the instruction ban, the cache, the CLI.

The instruction check is the guard for the host's ring-0 emulator, which lacks cmpxchg16b,
xsave/xrstor, clac/stac, popcnt, int3 and fwait and is not trusted with SSE: every executable
byte of the probe is disassembled and searched.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pystratovirt.guest import build
from pystratovirt.guest.__main__ import main as guest_main
from pystratovirt.memory.layout import VMLINUX_LOAD_ADDR, MiB

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
needs_binutils = pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None,
                                    reason="binutils (objdump, nm) are not installed")

FORBIDDEN_MNEMONICS = {"cmpxchg16b", "xsave", "xsaveopt", "xsavec", "xsaves", "xrstor", "xrstors",
                       "popcnt", "clac", "stac", "int3", "fwait", "wait"}
# SSE/AVX/MMX/x87 register operands: none of them may appear at all.
FORBIDDEN_REGISTER = re.compile(r"%(?:[xyz]mm\d+|mm\d|st(?:\(\d\))?\b|k[0-7]\b)")

PT_LOAD = 1
EM_X86_64 = 62
ET_EXEC = 2


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """A private XDG cache for this module, so the tests neither need nor touch ~/.cache."""
    home = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(home)
    yield home
    if old is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="module")
def probe_elf(cache_home) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build.build_probe()


def elf_header(data: bytes) -> dict:
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2 and data[5] == 1  # ELFCLASS64, little-endian
    e_type, e_machine, _version, e_entry, e_phoff = struct.unpack_from("<HHIQQ", data, 16)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    segments = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        segments.append(dict(type=p_type, flags=p_flags, offset=p_offset, vaddr=p_vaddr, paddr=p_paddr,
                             filesz=p_filesz, memsz=p_memsz))
    return dict(type=e_type, machine=e_machine, entry=e_entry, segments=segments)


def symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            table[parts[2]] = int(parts[0], 16)
    return table


# -- the build -------------------------------------------------------------------------------------
def test_build_produces_a_cached_elf(probe_elf, cache_home):
    assert probe_elf.is_file()
    assert probe_elf.parent == cache_home / "pystratovirt"
    assert re.fullmatch(r"probe-[0-9a-f]{16}\.elf", probe_elf.name)


@needs_gcc
def test_sources_compile_without_warnings(tmp_path):
    gcc = build._compiler()
    diagnostics = build._compile(gcc, build.PROBE_SOURCE_DIR, tmp_path / "probe.elf")
    assert "warning" not in diagnostics, diagnostics


def test_sources_ship_in_the_package():
    names = {p.name for p in build.probe_sources()}
    assert {"start.S", "probe.ld", "probe.c", "commands.c", "serial.c", "lib.c"} <= names
    assert all(p.parent == build.PROBE_SOURCE_DIR for p in build.probe_sources())


# -- the ELF ---------------------------------------------------------------------------------------
def test_entry_point_is_the_load_address(probe_elf):
    hdr = elf_header(probe_elf.read_bytes())
    assert hdr["type"] == ET_EXEC
    assert hdr["machine"] == EM_X86_64
    assert hdr["entry"] == VMLINUX_LOAD_ADDR == 0x100_0000 == build.PROBE_ENTRY


def test_segments_lie_in_the_probe_region(probe_elf):
    lo, hi = 16 * MiB, 17 * MiB
    assert build.PROBE_REGION == (lo, hi)
    loads = [s for s in elf_header(probe_elf.read_bytes())["segments"] if s["type"] == PT_LOAD]
    assert loads
    assert min(s["paddr"] for s in loads) == lo
    for seg in loads:
        assert seg["vaddr"] == seg["paddr"]  # identity mapped: virtual is physical
        assert lo <= seg["paddr"] and seg["paddr"] + seg["memsz"] <= hi, seg
        assert seg["filesz"] <= seg["memsz"]


@needs_binutils
def test_ap_trampoline_fits_its_low_page(probe_elf):
    syms = symbols(probe_elf)
    size = syms["ap_trampoline_end"] - syms["ap_trampoline_start"]
    assert 0 < size <= 4096
    # The trampoline is data until smp.c copies it to 0x3000, never run in place.
    assert syms["ap_trampoline_start"] > syms["_start"]


# -- the instruction ban ---------------------------------------------------------------------------
@needs_binutils
def test_no_instructions_the_emulator_lacks(probe_elf):
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(probe_elf)],
                             capture_output=True, text=True, check=True).stdout
    mnemonics: dict[str, int] = {}
    offenders = []
    for line in listing.splitlines():
        m = re.match(r"\s*[0-9a-f]+:\s+(.*)$", line)
        if not m:
            continue
        words = m.group(1).split()
        if not words:
            continue
        # Prefixes (lock, rep, data16, cs) come first; the instruction is the first other word.
        insn = next((w for w in words if w not in ("lock", "rep", "repz", "repnz", "repe", "repne",
                                                   "data16", "cs", "ds", "es", "ss", "fs", "gs",
                                                   "addr32", "rex", "rex.W", "notrack", "bnd")),
                    words[0])
        mnemonics[insn] = mnemonics.get(insn, 0) + 1
        operands = m.group(1)[m.group(1).find(insn) + len(insn):]
        if insn in FORBIDDEN_MNEMONICS or FORBIDDEN_REGISTER.search(operands):
            offenders.append(line.strip())
        if insn.startswith(("endbr", "xsave", "xrstor", "fxsave", "fxrstor")):
            offenders.append(line.strip())
    assert mnemonics.get("hlt"), "the disassembly looks empty"
    assert not offenders, "\n".join(offenders)


@needs_binutils
def test_instruction_check_would_catch_a_forbidden_instruction(tmp_path):
    """The regexes above match objdump's spelling of what they ban (a check of the check)."""
    if shutil.which("as") is None:
        pytest.skip("the assembler is not installed")
    src = tmp_path / "bad.s"
    src.write_text(".text\nint3\npopcnt %eax, %ebx\nmovaps %xmm0, %xmm1\nfwait\nclac\n")
    obj = tmp_path / "bad.o"
    subprocess.run(["as", "-o", str(obj), str(src)], check=True)
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)],
                             capture_output=True, text=True, check=True).stdout
    for word in ("int3", "popcnt", "fwait", "clac"):
        assert re.search(rf"\s{word}\b", listing), word
    assert FORBIDDEN_REGISTER.search(listing)


# -- the cache -------------------------------------------------------------------------------------
def test_cache_is_reused(probe_elf, monkeypatch):
    mtime = probe_elf.stat().st_mtime_ns

    def no_compile(*args, **kwargs):
        raise AssertionError("the cached probe should have been reused")

    monkeypatch.setattr(build, "_compile", no_compile)
    assert build.build_probe() == probe_elf
    assert probe_elf.stat().st_mtime_ns == mtime


def test_output_gets_a_copy(probe_elf, tmp_path):
    out = tmp_path / "sub" / "probe.elf"
    assert build.build_probe(out) == out
    assert out.read_bytes() == probe_elf.read_bytes()


def test_cache_key_follows_the_sources_and_the_compiler(tmp_path, monkeypatch):
    for name in ("a.c", "probe.ld"):
        (tmp_path / name).write_text("one\n")
    (tmp_path / "notes.txt").write_text("not a source\n")
    sources = build.probe_sources(tmp_path)
    assert [p.name for p in sources] == ["a.c", "probe.ld"]
    monkeypatch.setattr(build, "_compiler_identity", lambda gcc: "gcc (Test) 1.0")
    key1 = build._cache_key("gcc", sources)
    assert build._cache_key("gcc", sources) == key1
    (tmp_path / "a.c").write_text("two\n")
    key2 = build._cache_key("gcc", sources)
    assert key2 != key1
    monkeypatch.setattr(build, "_compiler_identity", lambda gcc: "gcc (Test) 2.0")
    assert build._cache_key("gcc", sources) != key2


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert build.cache_dir() == tmp_path / "pystratovirt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert build.cache_dir() == Path.home() / ".cache" / "pystratovirt"


def test_missing_gcc_is_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(build.ProbeBuildError) as info:
        build.build_probe()
    message = str(info.value)
    assert "gcc" in message and "\n" not in message


# -- python -m pystratovirt.guest ------------------------------------------------------------------
def test_cli_probe_writes_the_file(probe_elf, tmp_path, capsys):
    out = tmp_path / "p.elf"
    assert guest_main(["probe", "-o", str(out)]) == 0
    assert out.read_bytes() == probe_elf.read_bytes()
    assert capsys.readouterr().out.strip() == str(out)


def test_cli_linux_delegates_to_the_kit(monkeypatch):
    seen = []
    fake = types.ModuleType("pystratovirt.guest.kit")
    fake.main = lambda argv: seen.append(argv) or 7
    import pystratovirt.guest as guest_pkg

    monkeypatch.setitem(sys.modules, "pystratovirt.guest.kit", fake)
    monkeypatch.setattr(guest_pkg, "kit", fake, raising=False)
    assert guest_main(["linux", "-o", "DIR", "--flavour", "lean"]) == 7
    assert seen == [["-o", "DIR", "--flavour", "lean"]]


def test_cli_without_a_subcommand_is_a_usage_error(capsys):
    assert guest_main([]) == 2
    assert "usage" in capsys.readouterr().err
