"""ELF vmlinux parsing and loading: p_paddr placement, .bss zeroing, entry translation, rejections."""

import struct

import pytest

from boot.bootimages import START_KERNEL_MAP, make_elf, vmlinux
from pystratovirt.boot import BootError, load_kernel
from pystratovirt.boot.elf import ElfError, check_placement, load_elf, parse_elf
from pystratovirt.memory.layout import MiB


def test_parse_vmlinux_shape():
    img = parse_elf(vmlinux())
    assert img.entry == 0x100_0000
    assert [(s.paddr, s.memsz) for s in img.segments] == [(0x100_0000, 0x101),
                                                          (0x120_0000, 256 + 0x3000)]
    assert img.start == 0x100_0000 and img.end == 0x120_0000 + 256 + 0x3000


def test_load_places_segments_and_zeroes_bss(mem, write_file):
    # dirty the .bss range first: the loader must zero it, not rely on fresh RAM
    mem.write(0x120_0000, b"\xff" * 0x4000)
    info = load_kernel(mem, write_file(vmlinux()), "console=ttyS0")
    assert info.kind == "elf" and info.entry == 0x100_0000
    assert info.kernel_end == 0x120_0000 + 256 + 0x3000
    assert mem.read(0x100_0000, 0x101) == b"\x90" * 0x100 + b"\xf4"
    assert mem.read(0x120_0000, 256) == b"DATA" * 64
    assert mem.read(0x120_0000 + 256, 0x3000) == bytes(0x3000)
    assert mem.read(0x120_0000 + 256 + 0x3000, 16) == b"\xff" * 16


@pytest.mark.parametrize("entry,expected", [
    (0x100_0010, 0x100_0010),                              # physical already
    (START_KERNEL_MAP + 0x100_0020, 0x100_0020),           # virtual, inside the text segment
])
def test_entry_translation(entry, expected):
    data = make_elf([(0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\x90" * 64, 64)], entry=entry)
    assert parse_elf(data).entry == expected


def test_entry_through_segment_vaddr_when_paddr_differs():
    # vaddr 0x400000 maps to paddr 0x200_0000: the entry follows the segment, not a fixed offset
    data = make_elf([(0x200_0000, 0x40_0000, b"\x90" * 64, 64)], entry=0x40_0008)
    assert parse_elf(data).entry == 0x200_0008


def test_entry_outside_segments_rejected():
    data = make_elf([(0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\x90" * 64, 64)],
                    entry=0x300_0000)
    with pytest.raises(ElfError, match="entry point"):
        parse_elf(data)


def test_non_load_phdrs_ignored():
    data = make_elf([(0x100_0000, 0x100_0000, b"\x90" * 64, 64)], entry=0x100_0000,
                    extra_phdrs=(4, 0x6474E551))
    assert len(parse_elf(data).segments) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(machine=3), "x86-64"),
    (dict(elf_class=1), "x86-64"),
    (dict(e_type=1), "not an executable"),
])
def test_rejects_wrong_kind(kwargs, match):
    data = make_elf([(0x100_0000, 0x100_0000, b"\x90", 1)], entry=0x100_0000, **kwargs)
    with pytest.raises(ElfError, match=match):
        parse_elf(data)


def test_rejects_bad_segments():
    ok = make_elf([(0x100_0000, 0x100_0000, b"\x90" * 64, 64)], entry=0x100_0000)
    # filesz > memsz
    bad = bytearray(ok)
    struct.pack_into("<Q", bad, 64 + 40, 32)
    with pytest.raises(ElfError, match="more file bytes"):
        parse_elf(bytes(bad))
    # truncated file data
    with pytest.raises(ElfError, match="past the end"):
        parse_elf(ok[:-10])
    # program headers past the end
    bad = bytearray(ok)
    struct.pack_into("<H", bad, 56, 500)
    with pytest.raises(ElfError):
        parse_elf(bytes(bad))
    with pytest.raises(ElfError, match="no loadable"):
        parse_elf(make_elf([], entry=0, extra_phdrs=(4,)))


def test_placement_checks(mem):
    low = parse_elf(make_elf([(0x8000, 0x8000, b"\x90", 1)], entry=0x8000))
    with pytest.raises(ElfError, match="boot structures"):
        check_placement(low, mem)
    high = parse_elf(make_elf([(255 * MiB, 255 * MiB, b"\x90", 2 * MiB)], entry=255 * MiB))
    with pytest.raises(ElfError, match="does not fit"):
        check_placement(high, mem)


def test_plain_elf_that_does_not_fit_is_a_boot_error(mem, write_file):
    data = make_elf([(300 * MiB, 300 * MiB, b"\x90", 1)], entry=300 * MiB)
    with pytest.raises(BootError, match="does not fit"):
        load_kernel(mem, write_file(data), "")


def test_32bit_elf_is_a_boot_error(mem, write_file):
    data = make_elf([(0x100_0000, 0x100_0000, b"\x90", 1)], entry=0x100_0000, elf_class=1)
    with pytest.raises(BootError, match="ELF"):
        load_kernel(mem, write_file(data), "")


def test_load_elf_memoryview(mem):
    data = vmlinux()
    load_elf(mem, parse_elf(data), memoryview(data))
    assert mem.read_u8(0x100_0100) == 0xF4
