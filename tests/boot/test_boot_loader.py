"""load_kernel end to end on synthetic kernels: formats, extraction, fallbacks, zero page, cmdline,
initrd, and the fixed boot structures."""

import os
import struct

import pytest

from boot.bootimages import START_KERNEL_MAP, compress, make_bzimage, make_elf, vmlinux
from pystratovirt.boot import BootError, BootInfo, load_kernel
from pystratovirt.boot.bootparams import CAN_USE_HEAP, KASLR_FLAG, LOADED_HIGH, BootParams
from pystratovirt.boot.gdt import gdt_bytes
from pystratovirt.boot.mptable import build_mptable
from pystratovirt.boot.pagetables import page_tables
from pystratovirt.memory import GuestMemory
from pystratovirt.memory.layout import (
    CMDLINE_ADDR,
    EBDA_START,
    GDT_ADDR,
    INITRD_ADDR_MAX,
    VMLINUX_LOAD_ADDR,
    ZERO_PAGE_ADDR,
    GiB,
    MiB,
)

CODECS = ["gzip", "xz", "lz4", "zstd"]


def zero_page(mem) -> BootParams:
    return mem.read_struct(ZERO_PAGE_ADDR, BootParams)


def cmdline_at(mem, params: BootParams) -> bytes:
    addr = params.hdr.cmd_line_ptr | params.ext_cmd_line_ptr << 32
    raw = mem.read(addr, 4096)
    return raw[:raw.index(b"\0")]


# -- kernel formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_bzimage_extraction(mem, write_file, codec):
    elf = vmlinux()
    image = make_bzimage(compress(codec, elf))
    info = load_kernel(mem, write_file(image), "console=ttyS0 quiet")
    assert isinstance(info, BootInfo)
    assert info.kind == f"bzimage-extracted:{codec}"
    assert info.entry == 0x100_0000 and info.boot_params == ZERO_PAGE_ADDR
    assert info.kernel_end == 0x120_0000 + 256 + 0x3000
    assert mem.read(0x100_0000, 0x101) == b"\x90" * 0x100 + b"\xf4"
    assert mem.read(0x120_0000, 256) == b"DATA" * 64
    assert any(codec.upper() in n and "extracted" in n and " ms" in n for n in info.notes)
    # the zero page carries the kernel's own header
    p = zero_page(mem)
    assert p.hdr.header == 0x5372_6448 and p.hdr.version == 0x020F
    assert p.hdr.payload_length == len(image) - 5 * 512 - 0x300 - 64
    assert p.hdr.type_of_loader == 0xFF
    assert cmdline_at(mem, p) == b"console=ttyS0 quiet"


@pytest.mark.parametrize("payload,why", [
    (compress("bzip2", vmlinux()), "bzip2"),
    (compress("lzma", vmlinux()), "lzma"),
    (b"\x89LZO\0\r\n\x1a\n" + bytes(100), "lzo"),
    (b"NOTACODEC" * 10, "not recognised"),
    (compress("gzip", b"not an elf at all"), "not a loadable vmlinux"),
    (compress("lz4", vmlinux())[:-40], "lz4"),
])
def test_bzimage_fallback(mem, write_file, payload, why):
    image = make_bzimage(payload)
    info = load_kernel(mem, write_file(image), "")
    assert info.kind == "bzimage"
    assert info.entry == 0x100_0000 + 0x200       # relocatable: loaded at pref_address
    assert any(why in n for n in info.notes), info.notes
    pm = image[5 * 512:]
    assert mem.read(0x100_0000, len(pm)) == pm
    p = zero_page(mem)
    assert p.hdr.code32_start == 0x100_0000
    assert info.kernel_end == 0x100_0000 + p.hdr.init_size


def test_extraction_disabled(mem, write_file):
    info = load_kernel(mem, write_file(make_bzimage(compress("lz4", vmlinux()))), "",
                       extract_payload=False)
    assert info.kind == "bzimage" and any("disabled" in n for n in info.notes)


def test_payload_out_of_bounds_falls_back(mem, write_file):
    image = make_bzimage(compress("gzip", vmlinux()), payload_length=1 << 30)
    info = load_kernel(mem, write_file(image), "")
    assert info.kind == "bzimage" and any("outside" in n for n in info.notes)


def test_extracted_elf_that_does_not_fit_falls_back(write_file):
    mem = GuestMemory(128 * MiB)
    try:
        big = make_elf([(0x100_0000, START_KERNEL_MAP + 0x100_0000, b"\x90", 200 * MiB)],
                       entry=0x100_0000)
        info = load_kernel(mem, write_file(make_bzimage(compress("zstd", big))), "")
        assert info.kind == "bzimage" and any("does not fit" in n for n in info.notes)
    finally:
        mem.close()


def test_non_relocatable_bzimage_loads_at_1mib(mem, write_file):
    image = make_bzimage(b"garbage", relocatable=0, init_size=8 * MiB)
    info = load_kernel(mem, write_file(image), "")
    assert info.entry == 0x10_0200
    assert info.kernel_end == 0x100_0000 + 8 * MiB  # decompresses to LOAD_PHYSICAL_ADDR
    assert zero_page(mem).hdr.code32_start == 0x10_0000


def test_setup_sects_zero_means_four(mem, write_file):
    image = bytearray(make_bzimage(b"garbage", setup_sects=4))
    image[0x1F1] = 0
    info = load_kernel(mem, write_file(bytes(image)), "")
    assert mem.read(info.entry - 0x200, 16) == bytes(image[5 * 512:5 * 512 + 16])


def test_no_64bit_entry_but_good_payload_still_boots(mem, write_file):
    image = make_bzimage(compress("xz", vmlinux()), xloadflags=0, version=0x020B)
    assert load_kernel(mem, write_file(image), "").kind == "bzimage-extracted:xz"


@pytest.mark.parametrize("kwargs,match", [
    (dict(xloadflags=0), "64-bit entry"),
    (dict(version=0x0205), "boot protocol"),
    (dict(loadflags=0), "LOADED_HIGH"),
    (dict(init_size=400 * MiB), "needs guest RAM"),
    (dict(pref_address=0x3000_0000, init_size=8 * MiB), "needs guest RAM"),
])
def test_bzimage_errors(mem, write_file, kwargs, match):
    with pytest.raises(BootError, match=match):
        load_kernel(mem, write_file(make_bzimage(b"garbage", **kwargs)), "")


def test_bzimage_errors_leave_memory_alone(mem, write_file):
    with pytest.raises(BootError):
        load_kernel(mem, write_file(make_bzimage(b"garbage", init_size=400 * MiB)), "")
    assert mem.read(0, 0x100000) == bytes(0x100000)


def test_raw_binary(mem, write_file):
    blob = b"\x48\x31\xc0\xf4" + os.urandom(5000)
    info = load_kernel(mem, write_file(blob), "x")
    assert info.kind == "vmlinux-raw" and info.entry == VMLINUX_LOAD_ADDR
    assert info.kernel_end == VMLINUX_LOAD_ADDR + len(blob)
    assert mem.read(VMLINUX_LOAD_ADDR, len(blob)) == blob
    p = zero_page(mem)   # a fresh header for a kernel that brings none
    assert p.hdr.boot_flag == 0xAA55 and p.hdr.header == 0x5372_6448 and p.hdr.version >= 0x020C
    assert p.hdr.loadflags & LOADED_HIGH and p.hdr.type_of_loader == 0xFF
    assert cmdline_at(mem, p) == b"x"


def test_raw_binary_too_big(write_file):
    mem = GuestMemory(128 * MiB)
    try:
        path = write_file(b"")
        with open(path, "wb") as f:
            f.truncate(113 * MiB)
        with pytest.raises(BootError, match="needs guest RAM"):
            load_kernel(mem, path, "")
        with open(path, "wb") as f:
            f.truncate(129 * MiB)
        with pytest.raises(BootError, match="larger than guest RAM"):
            load_kernel(mem, path, "")
    finally:
        mem.close()


@pytest.mark.parametrize("blob", [compress("gzip", b"x" * 100), compress("zstd", b"x" * 100),
                                  b"070701" + bytes(200)])
def test_compressed_file_is_not_a_raw_kernel(mem, write_file, blob):
    with pytest.raises(BootError, match="not a kernel"):
        load_kernel(mem, write_file(blob), "")


def test_file_errors(mem, tmp_path, write_file):
    with pytest.raises(BootError, match="cannot open"):
        load_kernel(mem, tmp_path / "missing", "")
    with pytest.raises(BootError, match="not a regular file"):
        load_kernel(mem, tmp_path, "")
    with pytest.raises(BootError, match="empty"):
        load_kernel(mem, write_file(b""), "")
    with pytest.raises(BootError, match="not a regular file"):
        load_kernel(mem, "/dev/zero", "")
    with pytest.raises(BootError):
        load_kernel(mem, None, "")
    with pytest.raises(BootError, match="cannot open"):
        load_kernel(mem, "bad\0name", "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BootError, match="not a regular file"):
        load_kernel(mem, write_file(b"\x90"), "", initrd=fifo)
    if os.geteuid() != 0:
        p = write_file(b"abc")
        p.chmod(0)
        with pytest.raises(BootError, match="cannot open"):
            load_kernel(mem, p, "")


# -- zero page, e820, fixed structures ------------------------------------------------------------
def test_zero_page_and_fixed_structures(mem, write_file):
    image = make_bzimage(compress("lz4", vmlinux()))
    load_kernel(mem, write_file(image), "root=/dev/vda", nr_cpus=2, max_cpus=4)
    p = zero_page(mem)
    assert p.hdr.loadflags & LOADED_HIGH and not p.hdr.loadflags & (CAN_USE_HEAP | KASLR_FLAG)
    assert p.hdr.cmd_line_ptr == CMDLINE_ADDR and p.ext_cmd_line_ptr == 0
    assert p.hdr.ramdisk_image == 0 and p.hdr.ramdisk_size == 0
    assert p.sentinel == 0
    e820 = [(p.e820_table[i].addr, p.e820_table[i].size, p.e820_table[i].type)
            for i in range(p.e820_entries)]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
                    (0x100000, 256 * MiB - 0x100000, 1)]
    gdt = gdt_bytes()
    assert mem.read(GDT_ADDR, len(gdt)) == gdt
    for gpa, page in page_tables():
        assert mem.read(gpa, 4096) == page
    mp = build_mptable(2, 4)
    assert mem.read(EBDA_START, len(mp)) == mp
    assert mem.read_u16(0x40E) == EBDA_START >> 4


def test_header_fields_past_the_kernels_header_length_stay_zero(mem, write_file):
    image = bytearray(make_bzimage(compress("gzip", vmlinux())))
    image[0x201] = 0x264 - 0x202          # a 2.12-sized header: no handover/kernel_info offsets
    struct.pack_into("<I", image, 0x268, 0xDEADBEEF)
    load_kernel(mem, write_file(bytes(image)), "")
    assert zero_page(mem).hdr.kernel_info_offset == 0


@pytest.mark.parametrize("nr,mx", [(0, None), (3, 2), (1, 255)])
def test_bad_cpu_counts(mem, write_file, nr, mx):
    with pytest.raises(BootError):
        load_kernel(mem, write_file(vmlinux()), "", nr_cpus=nr, max_cpus=mx)


# -- command line -----------------------------------------------------------------------------------
def test_cmdline_limits(mem, write_file):
    bz = write_file(make_bzimage(compress("gzip", vmlinux()), cmdline_size=255))
    load_kernel(mem, bz, "a" * 255)
    assert cmdline_at(mem, zero_page(mem)) == b"a" * 255
    with pytest.raises(BootError, match="at most 255"):
        load_kernel(mem, bz, "a" * 256)
    plain = write_file(vmlinux())
    load_kernel(mem, plain, "b" * 2047)
    assert cmdline_at(mem, zero_page(mem)) == b"b" * 2047
    with pytest.raises(BootError, match="at most 2047"):
        load_kernel(mem, plain, "b" * 2048)
    big = write_file(make_bzimage(compress("gzip", vmlinux()), cmdline_size=0x7FFF_FFFF))
    with pytest.raises(BootError, match="at most 65535"):
        load_kernel(mem, big, "c" * 70000)
    with pytest.raises(BootError, match="NUL"):
        load_kernel(mem, plain, "a\0b")
    with pytest.raises(BootError):
        load_kernel(mem, plain, b"bytes")


def test_cmdline_utf8(mem, write_file):
    load_kernel(mem, write_file(vmlinux()), "label=café")
    assert cmdline_at(mem, zero_page(mem)) == "label=café".encode()


# -- initrd --------------------------------------------------------------------------------------
def test_initrd_placed_high_and_page_aligned(mem, write_file):
    rd = os.urandom(5000)
    info = load_kernel(mem, write_file(vmlinux()), "", initrd=write_file(rd))
    addr, size = info.initrd
    assert size == 5000 and addr % 4096 == 0
    assert addr + size <= 256 * MiB and addr + size > 256 * MiB - 4096 - 5000
    assert mem.read(addr, size) == rd
    p = zero_page(mem)
    assert (p.hdr.ramdisk_image, p.hdr.ramdisk_size) == (addr, size)
    assert p.ext_ramdisk_image == 0 and p.ext_ramdisk_size == 0
    assert any("initrd" in n for n in info.notes)


def test_initrd_respects_header_initrd_addr_max(mem, write_file):
    bz = make_bzimage(compress("gzip", vmlinux()), initrd_addr_max=0x5FF_FFFF)
    info = load_kernel(mem, write_file(bz), "", initrd=write_file(b"r" * 10000))
    addr, size = info.initrd
    assert addr + size <= 0x600_0000 and addr == (0x600_0000 - 10000) & ~0xFFF


def test_initrd_below_initrd_addr_max_on_big_vm(write_file):
    mem = GuestMemory(6 * GiB)
    try:
        info = load_kernel(mem, write_file(vmlinux()), "", initrd=write_file(b"r" * 10000))
        assert info.initrd[0] == (INITRD_ADDR_MAX + 1 - 10000) & ~0xFFF
    finally:
        mem.close()


def test_initrd_above_bzimage_footprint(mem, write_file):
    bz = make_bzimage(b"garbage", init_size=200 * MiB)
    path = write_file(b"")
    with open(path, "wb") as f:
        f.truncate(41 * MiB)
    with pytest.raises(BootError, match="does not fit"):
        load_kernel(mem, write_file(bz), "", initrd=path)
    with open(path, "wb") as f:
        f.truncate(40 * MiB)
    info = load_kernel(mem, write_file(bz), "", initrd=path)
    assert info.initrd[0] >= info.kernel_end == 216 * MiB


def test_initrd_errors(mem, write_file, tmp_path):
    k = write_file(vmlinux())
    with pytest.raises(BootError, match="empty"):
        load_kernel(mem, k, "", initrd=write_file(b""))
    with pytest.raises(BootError, match="cannot open"):
        load_kernel(mem, k, "", initrd=tmp_path / "nope")
    big = write_file(b"")
    with open(big, "wb") as f:
        f.truncate(300 * MiB)
    with pytest.raises(BootError, match="larger than"):
        load_kernel(mem, k, "", initrd=big)
