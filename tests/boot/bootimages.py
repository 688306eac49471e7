"""Builders for the synthetic kernels the boot tests load: minimal ELF64 vmlinux files, compressed
payloads in the kernel build's formats (with size_append trailers) and bzImages wrapping them."""

from __future__ import annotations

import ctypes
import gzip
import lzma
import struct

import lz4.block
import zstandard

from pystratovirt.boot.bootparams import LOADED_HIGH, XLF_KERNEL_64, SetupHeader

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
HEADER_END = 0x26C   # boot protocol 2.15's header ends at kernel_info_offset + 4


def make_elf(segments, entry: int, *, machine: int = 62, elf_class: int = 2, e_type: int = 2,
             extra_phdrs=()) -> bytes:
    """An ELF64 executable; ``segments`` are (paddr, vaddr, data, memsz) tuples loaded as PT_LOAD."""
    phnum = len(segments) + len(extra_phdrs)
    phoff = 64
    data_off = phoff + 56 * phnum
    data_off = (data_off + 0xFFF) & ~0xFFF
    phdrs = []
    blobs = b""
    for paddr, vaddr, blob, memsz in segments:
        offset = data_off + len(blobs)
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(blob), memsz, 0x1000))
        blobs += blob
    for p_type in extra_phdrs:
        phdrs.append(struct.pack("<IIQQQQQQ", p_type, 4, 0, 0, 0, 0, 0, 4))
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0, 64, 56,
                       phnum, 64, 0, 0)
    out = ehdr + b"".join(phdrs)
    return out.ljust(data_off, b"\0") + blobs


def vmlinux(text: bytes = b"\x90" * 0x100 + b"\xf4", bss: int = 0x3000,
            data: bytes = b"DATA" * 64) -> bytes:
    """A kernel-shaped ELF: text at 16 MiB (virtual __START_KERNEL_map + 16 MiB), data + bss at 18 MiB,
    entry = the physical start of text, as vmlinux's ENTRY(phys_startup_64) gives."""
    return make_elf([
        (0x100_0000, START_KERNEL_MAP + 0x100_0000, text, len(text)),
        (0x120_0000, START_KERNEL_MAP + 0x120_0000, data, len(data) + bss),
    ], entry=0x100_0000)


def size_append(data: bytes) -> bytes:
    return struct.pack("<I", len(data) & 0xFFFF_FFFF)


def compress(codec: str, data: bytes, *, trailer: bool = True) -> bytes:
    """``data`` compressed the way arch/x86/boot/compressed/Makefile does for ``codec``."""
    if codec == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if codec == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        out = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    elif codec == "lz4":
        out = struct.pack("<I", 0x184C2102)
        for i in range(0, len(data), 8 << 20):
            block = lz4.block.compress(data[i:i + (8 << 20)], store_size=False)
            out += struct.pack("<I", len(block)) + block
    elif codec == "zstd":
        out = zstandard.ZstdCompressor(level=19).compress(data)
    elif codec == "bzip2":
        import bz2
        out = bz2.compress(data)
    elif codec == "lzma":
        out = lzma.compress(data, format=lzma.FORMAT_ALONE)
    else:
        raise ValueError(codec)
    return out + size_append(data) if trailer else out


def make_bzimage(payload: bytes, *, version: int = 0x020F, setup_sects: int = 4,
                 loadflags: int = LOADED_HIGH, xloadflags: int = XLF_KERNEL_64,
                 relocatable: int = 1, kernel_alignment: int = 0x20_0000,
                 pref_address: int = 0x100_0000, init_size: int | None = None,
                 cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFF_FFFF,
                 decompressor: bytes | None = None, tail: bytes = b"\xcc" * 64,
                 payload_offset: int | None = None, payload_length: int | None = None) -> bytes:
    """A bzImage: boot sector + setup sectors with a setup header, then [decompressor][payload][tail]."""
    if decompressor is None:
        decompressor = b"\x90" * 0x200 + b"\xf4" + b"\0" * 0xFF  # startup_64 at +0x200 is a hlt
    pm = decompressor + payload + tail
    h = SetupHeader()
    h.setup_sects = setup_sects
    h.syssize = (len(pm) + 15) // 16
    h.boot_flag = 0xAA55
    h.jump = 0xEB | ((HEADER_END - 0x202) << 8)
    h.header = 0x5372_6448
    h.version = version
    h.loadflags = loadflags
    h.code32_start = 0x10_0000
    h.initrd_addr_max = initrd_addr_max
    h.kernel_alignment = kernel_alignment
    h.relocatable_kernel = relocatable
    h.min_alignment = 21
    h.xloadflags = xloadflags
    h.cmdline_size = cmdline_size
    h.payload_offset = len(decompressor) if payload_offset is None else payload_offset
    h.payload_length = len(payload) if payload_length is None else payload_length
    h.pref_address = pref_address
    h.init_size = (len(pm) + 0x40_0000) if init_size is None else init_size
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0:2] = b"MZ"
    setup[0x1F1:0x1F1 + ctypes.sizeof(h)] = bytes(h)
    return bytes(setup) + pm
