"""Guest RAM: one anonymous host mapping split into KVM memory slots around the 32-bit hole.

Every access a device or loader makes to guest memory goes through :class:`GuestMemory`, which
checks that the whole (address, length) range lies inside one RAM region before it touches the
host mapping. Guest-supplied addresses are hostile; an out-of-range access raises
:class:`GuestMemoryError` and never reaches host memory outside guest RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from .layout import PAGE_SIZE, ram_ranges

# Python 3.11's mmap module does not export MAP_NORESERVE; this is its value on Linux.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class GuestMemoryError(PyStratoVirtError):
    """A guest physical access fell (partly) outside guest RAM."""


@dataclass(frozen=True)
class Region:
    """One contiguous range of guest RAM: guest physical ``gpa`` .. ``gpa + size`` at host ``offset``."""

    slot: int
    gpa: int
    size: int
    offset: int  # offset into the host mapping

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int) -> bool:
        return self.gpa <= gpa and length >= 0 and gpa + length <= self.end


class GuestMemory:
    """All of a VM's RAM; bounds-checked reads, writes and views by guest physical address."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size {size} must be a positive multiple of {PAGE_SIZE}")
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self.host_base = ctypes.addressof(self._anchor)
        self.regions: list[Region] = []
        offset = 0
        for slot, (gpa, length) in enumerate(ram_ranges(size)):
            self.regions.append(Region(slot, gpa, length, offset))
            offset += length

    # -- address translation -------------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> Region:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is outside guest RAM")

    def _offset(self, gpa: int, length: int) -> int:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"invalid guest range [{gpa:#x}, +{length:#x})")
        region = self.region_of(gpa, length)
        return region.offset + (gpa - region.gpa)

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def host_address(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of ``gpa``; the whole range must be RAM."""
        return self.host_base + self._offset(gpa, length)

    def host_offset(self, gpa: int, length: int = 1) -> int:
        """Offset of ``gpa`` in the host mapping; the whole range must be RAM."""
        return self._offset(gpa, length)

    # -- access --------------------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        off = self._offset(gpa, length)
        return self._map[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        off = self._offset(gpa, length)
        self._map[off:off + length] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of guest RAM; release it promptly."""
        off = self._offset(gpa, length)
        return memoryview(self._map)[off:off + length]

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        off = self._offset(gpa, length)
        ctypes.memset(self.host_base + off, byte, length)

    def read_u8(self, gpa: int) -> int:
        return self._map[self._offset(gpa, 1)]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self._map, self._offset(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self._map, self._offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self._map, self._offset(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self._map[self._offset(gpa, 1)] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self._map, self._offset(gpa, 2), value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self._map, self._offset(gpa, 4), value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self._map, self._offset(gpa, 8), value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_struct(self, gpa: int, ctype):
        """Copy a ctypes structure out of guest memory."""
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_struct(self, gpa: int, obj) -> None:
        self.write(gpa, bytes(obj))

    # -- host memory management -----------------------------------------------------------------
    def discard(self, gpa: int, length: int) -> None:
        """Give the host pages behind a page-aligned guest range back to the host (MADV_DONTNEED)."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard of unaligned range [{gpa:#x}, +{length:#x})")
        off = self._offset(gpa, length)
        self._map.madvise(mmap.MADV_DONTNEED, off, length)

    def advise(self, advice: int, gpa: int = 0, length: int | None = None) -> None:
        """madvise() a page-aligned guest range (default: all of RAM's host mapping)."""
        if length is None:
            self._map.madvise(advice, 0, self.size)
            return
        self._map.madvise(advice, self._offset(gpa, length), length)

    def populate(self) -> None:
        """Back every page of guest RAM with host memory now (QEMU's -mem-prealloc)."""
        try:
            self._map.madvise(MADV_POPULATE_WRITE, 0, self.size)
        except OSError:  # kernels before 5.14: touch one byte per page instead
            view = memoryview(self._map)
            for off in range(0, self.size, PAGE_SIZE):
                view[off] = view[off]
            view.release()

    def close(self) -> None:
        if self._map is None:
            return
        del self._anchor
        self._map.close()
        self._map = None
