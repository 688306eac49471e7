"""ELF64 x86-64 kernel images (vmlinux): parse, validate against guest RAM, and load by physical address.

Segments go to their p_paddr, which for vmlinux is where the kernel's own decompressor would put
them when it runs at its link-time address (LOAD_PHYSICAL_ADDR), so the kernel needs no relocation
processing. The entry point is made physical: vmlinux already has e_entry = phys_startup_64, but
an ELF whose e_entry is a virtual address is translated through the segment that contains it
(or, failing that, through the fixed __START_KERNEL_map offset).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

from ..memory.layout import HIGH_MEMORY_START
from .errors import BootError

#: An ELF image's bytes: read from a file, a view of them, or a cache entry mapped from disk.
ElfData = bytes | memoryview | mmap.mmap

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
ET_DYN = 3
EM_X86_64 = 62
PT_LOAD = 1

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")           # 56 bytes
MAX_PHNUM = 1024                             # vmlinux has ~5; anything huge is garbage


class ElfError(BootError):
    """The ELF image is malformed or cannot be placed in guest RAM."""


@dataclass(frozen=True)
class Segment:
    paddr: int
    vaddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfImage:
    entry: int                       # physical entry point
    segments: tuple[Segment, ...]    # PT_LOAD segments with memsz > 0

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def is_elf(data: ElfData) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def parse_elf(data: ElfData, file_size: int | None = None) -> ElfImage:
    """Parse an ELF64 x86-64 executable; raises ElfError for anything malformed. ``file_size``:
    ``data`` is only the head of a file of that many bytes (it must hold the program headers),
    against which the segments are checked."""
    if file_size is None:
        file_size = len(data)
    if len(data) < _EHDR.size or not is_elf(data):
        raise ElfError("the kernel is not a complete ELF file")
    (ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data, 0)
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB or e_machine != EM_X86_64:
        raise ElfError("the ELF kernel is not a 64-bit little-endian x86-64 image")
    if e_type not in (ET_EXEC, ET_DYN):
        raise ElfError(f"the ELF kernel is not an executable (e_type {e_type})")
    if e_phentsize < _PHDR.size or not 0 < e_phnum <= MAX_PHNUM:
        raise ElfError("the ELF kernel has no usable program header table")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise ElfError("the ELF program header table runs past the end of the file")

    segments = []
    for i in range(e_phnum):
        (p_type, _pflags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
         _align) = _PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise ElfError(f"ELF segment {i} has more file bytes than memory bytes")
        if p_offset + p_filesz > file_size:
            raise ElfError(f"ELF segment {i} runs past the end of the file")
        if p_paddr + p_memsz > 1 << 52:
            raise ElfError(f"ELF segment {i} has an impossible physical address {p_paddr:#x}")
        segments.append(Segment(p_paddr, p_vaddr, p_offset, p_filesz, p_memsz))
    if not segments:
        raise ElfError("the ELF kernel has no loadable segments")
    return ElfImage(_physical_entry(e_entry, segments), tuple(segments))


def _physical_entry(entry: int, segments: list[Segment]) -> int:
    def in_phys(addr: int) -> bool:
        return any(s.paddr <= addr < s.end for s in segments)

    if entry < START_KERNEL_MAP and in_phys(entry):
        return entry
    for s in segments:
        if s.vaddr <= entry < s.vaddr + s.memsz:
            return s.paddr + (entry - s.vaddr)
    if entry >= START_KERNEL_MAP and in_phys(entry - START_KERNEL_MAP):
        return entry - START_KERNEL_MAP
    raise ElfError(f"the ELF entry point {entry:#x} is not inside any loadable segment")


def check_placement(image: ElfImage, mem) -> None:
    """Every segment must lie in guest RAM above the low-memory boot structures."""
    for s in image.segments:
        if s.paddr < HIGH_MEMORY_START:
            raise ElfError(f"an ELF segment at {s.paddr:#x} would overwrite the boot structures "
                           f"below {HIGH_MEMORY_START:#x}")
        if not mem.contains(s.paddr, s.memsz):
            raise ElfError(f"an ELF segment [{s.paddr:#x}, {s.end:#x}) does not fit in guest RAM")


def load_elf(mem, image: ElfImage, data: ElfData) -> None:
    """Copy each segment to its physical address and zero its memsz - filesz tail (the .bss)."""
    view = memoryview(data)
    for s in image.segments:
        if s.filesz:
            mem.write(s.paddr, view[s.offset:s.offset + s.filesz])
        if s.memsz > s.filesz:
            mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0)


def compact(data: ElfData) -> bytes:
    """The same kernel as a smaller ELF: its header, one program header per loadable segment
    (those :func:`parse_elf` loads) and their file bytes back to back.

    A vmlinux pads its segments to 2 MiB file offsets and carries section headers the loader never
    reads (the lean kernel: 16.7 MiB of file, 11.5 MiB of segment bytes); the payload cache keeps
    this form. ``parse_elf`` of the result yields the same entry point and segments (but offsets).
    """
    parse_elf(data)                  # everything below indexes validated headers
    view = memoryview(data).cast("B")
    (_ident, _type, _machine, _version, _entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(view, 0)
    kept = []
    for i in range(e_phnum):
        phdr = _PHDR.unpack_from(view, e_phoff + i * e_phentsize)
        if phdr[0] == PT_LOAD and phdr[6] != 0:
            kept.append(phdr)
    header = bytearray(view[:_EHDR.size])
    # e_phoff right after the ELF header, no section headers (e_shoff, e_shnum, e_shstrndx = 0)
    struct.pack_into("<QQ", header, 32, _EHDR.size, 0)
    struct.pack_into("<HHHHH", header, 54, _PHDR.size, len(kept), 64, 0, 0)
    offset = _EHDR.size + _PHDR.size * len(kept)
    phdrs, blobs = [], []
    for p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align in kept:
        phdrs.append(_PHDR.pack(p_type, p_flags, offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align))
        blobs.append(view[p_offset:p_offset + p_filesz])
        offset += p_filesz
    return b"".join([bytes(header), *phdrs, *blobs])
