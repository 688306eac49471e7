"""Guest RAM: one host mapping split into KVM memory slots around the 32-bit hole.

Every access a device or loader makes to guest memory goes through :class:`GuestMemory`, which
checks that the whole (address, length) range lies inside one RAM region before it touches the
host mapping. Guest-supplied addresses are hostile; an out-of-range access raises
:class:`GuestMemoryError` and never reaches host memory outside guest RAM.

The host mapping comes in three kinds (:class:`Backing`); the regions, checks and accessors are
the same for all of them:

* ``ANONYMOUS`` (``GuestMemory(size)``): private anonymous memory with MAP_NORESERVE; a host page
  is taken when the guest first touches it.
* ``FILE`` (``GuestMemory.from_file(path, size)``): a MAP_PRIVATE, copy-on-write mapping of an
  existing file exactly as large as guest RAM (a snapshot's memory file). Nothing is read up
  front: a page comes from the page cache when first touched and stays shared with every other
  mapping of the file until this VM writes to it; writes never reach the file.
* ``SHARED`` (``GuestMemory.shared(size)``, StratoVirt's ``-machine mem-share=on``): a memfd
  mapped MAP_SHARED; :attr:`GuestMemory.fd` lets another process (a vhost-user backend) map the
  same RAM. The memfd is sealed against shrinking and growing, so no holder of the fd can
  truncate it under this process (which would turn guest accesses into SIGBUS).

:meth:`GuestMemory.dump_to` / :meth:`GuestMemory.save` write all of RAM to a file in the host
mapping's layout (what ``from_file`` maps back), leaving all-zero pages as holes.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import mmap
import os
import stat
import struct
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import PyStratoVirtError
from ..util.libc import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from .layout import PAGE_SIZE, ram_ranges

# Python 3.11's mmap module does not export these; the values are Linux's.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


# /proc/self/pagemap: one u64 per virtual page; bit 63 = present in RAM, bit 62 = in swap.
_PAGEMAP_ENTRY = 8
_PAGEMAP_IN_USE = 0xC0  # those two bits, in the entry's most significant byte
_PAGEMAP_BATCH = 1 << 16  # entries read per pread (512 KiB)
_IN_USE_TABLE = bytes(1 if b & _PAGEMAP_IN_USE else 0 for b in range(256))

_SCAN_CHUNK = 1 << 20  # bytes compared against zero at a time while saving
_ZERO_CHUNK = bytes(_SCAN_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)
_PWRITE_MAX = 1 << 30  # bytes per pwrite (Linux moves at most ~2 GiB per call anyway)

_C = typing.TypeVar("_C", bound=ctypes.Structure)


class GuestMemoryError(PyStratoVirtError):
    """A guest physical access fell (partly) outside guest RAM, or guest RAM cannot be backed
    the way it was asked to be (str() says why)."""


class Backing(enum.Enum):
    """What the host mapping behind guest RAM is (see the module docstring)."""

    ANONYMOUS = "anonymous"
    FILE = "file"
    SHARED = "shared"


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


def _check_size(size: int) -> None:
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"guest memory size {size} must be a positive multiple of {PAGE_SIZE}")


class GuestMemory:
    """All of a VM's RAM; bounds-checked reads, writes and views by guest physical address."""

    _map: mmap.mmap | None

    def __init__(self, size: int):
        """Private anonymous RAM of ``size`` bytes (:attr:`Backing.ANONYMOUS`)."""
        _check_size(size)
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._attach(size, mapping, Backing.ANONYMOUS, None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], size: int) -> GuestMemory:
        """RAM mapped copy-on-write from the file at ``path``, which must hold exactly ``size``
        bytes (:attr:`Backing.FILE`). The file is opened read-only and never written."""
        _check_size(size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise GuestMemoryError(f"cannot open guest memory file {os.fspath(path)}: "
                                   f"{exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GuestMemoryError(f"guest memory file {os.fspath(path)} is not a regular file")
            if st.st_size != size:
                raise GuestMemoryError(f"guest memory file {os.fspath(path)} holds {st.st_size} "
                                       f"bytes, but guest RAM is {size} bytes")
            # MAP_PRIVATE with PROT_WRITE on a read-only fd: writes go to private copies.
            # MAP_NORESERVE: no swap is reserved up front for copies that may never be made.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        memory = cls.__new__(cls)
        memory._attach(size, mapping, Backing.FILE, fd)
        return memory

    @classmethod
    def shared(cls, size: int, name: str = "pystratovirt-ram") -> GuestMemory:
        """RAM in a new memfd of ``size`` bytes mapped MAP_SHARED (:attr:`Backing.SHARED`)."""
        _check_size(size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        memory = cls.__new__(cls)
        memory._attach(size, mapping, Backing.SHARED, fd)
        return memory

    def _attach(self, size: int, mapping: mmap.mmap, backing: Backing, fd: int | None) -> None:
        self.size = size
        self.backing = backing
        self._fd = fd
        self._map = mapping
        self._anchor = ctypes.c_char.from_buffer(mapping)
        self.host_base = ctypes.addressof(self._anchor)
        # One view of the whole mapping: views and reads are slices of it (a slice costs a
        # fraction of a new memoryview of the mmap, and every device request takes several).
        self._mv = memoryview(mapping)
        self._mv16 = self._mv.cast("H")
        self.regions: list[Region] = []
        offset = 0
        for slot, (gpa, length) in enumerate(ram_ranges(size)):
            self.regions.append(Region(slot, gpa, length, offset))
            offset += length
        # Region 0 starts at guest address 0 and host offset 0 (ram_ranges): the common check.
        self.low_end = self.regions[0].end

    @property
    def fd(self) -> int | None:
        """The memfd of :attr:`Backing.SHARED` RAM (None for the other kinds); it stays owned by
        this object and is closed with it."""
        return self._fd if self.backing is Backing.SHARED else None

    @property
    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            raise GuestMemoryError("guest memory is closed")
        return self._map

    # -- address translation -------------------------------------------------------------------
    def region_of(self, gpa: int, length: int = 1) -> Region:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise GuestMemoryError(f"guest range [{gpa:#x}, +{length:#x}) is outside guest RAM")

    def _offset(self, gpa: int, length: int) -> int:
        if 0 <= gpa and 0 <= length and gpa + length <= self.low_end:
            return gpa  # below the 32-bit hole: guest address == host offset
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
        return self._mapping[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        off = self._offset(gpa, length)
        self._mapping[off:off + length] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy writable view of guest RAM; release it (or drop it) before :meth:`close`."""
        off = self._offset(gpa, length)
        self._mapping  # noqa: B018 -- raises once closed
        return self._mv[off:off + length]

    def host_view(self) -> memoryview:
        """The writable view of the whole host mapping, indexed by host offset
        (:meth:`host_offset`), for code that checked its ranges itself and accesses them many
        times (a virtqueue's rings). It is shared: never release it; :meth:`close` does, after
        which every access through it raises ValueError."""
        self._mapping  # noqa: B018 -- raises once closed
        return self._mv

    def host_view_u16(self) -> memoryview:
        """The same, as 16-bit words (word ``i`` is at host offset ``2 * i``): reading or
        assigning one is a single 16-bit load or store, which a field the guest reads or writes
        concurrently (a ring index) needs. Shared and released by :meth:`close` like
        :meth:`host_view`."""
        self._mapping  # noqa: B018 -- raises once closed
        return self._mv16

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        off = self._offset(gpa, length)
        ctypes.memset(self.host_base + off, byte, length)

    def read_u8(self, gpa: int) -> int:
        return self._mapping[self._offset(gpa, 1)]

    def read_u16(self, gpa: int) -> int:
        value: int = struct.unpack_from("<H", self._mapping, self._offset(gpa, 2))[0]
        return value

    def read_u32(self, gpa: int) -> int:
        value: int = struct.unpack_from("<I", self._mapping, self._offset(gpa, 4))[0]
        return value

    def read_u64(self, gpa: int) -> int:
        value: int = struct.unpack_from("<Q", self._mapping, self._offset(gpa, 8))[0]
        return value

    # Not struct.pack_into: it clears the destination before it writes the value, so a guest
    # reading the field at that moment (a ring index, say) could see 0. A slice assignment of the
    # value's bytes is one copy.
    def write_u8(self, gpa: int, value: int) -> None:
        self._mapping[self._offset(gpa, 1)] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        off = self._offset(gpa, 2)
        self._mapping[off:off + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def write_u32(self, gpa: int, value: int) -> None:
        off = self._offset(gpa, 4)
        self._mapping[off:off + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def write_u64(self, gpa: int, value: int) -> None:
        off = self._offset(gpa, 8)
        self._mapping[off:off + 8] = (value & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little")

    def read_struct(self, gpa: int, ctype: type[_C]) -> _C:
        """Copy a ctypes structure out of guest memory."""
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_struct(self, gpa: int, obj: ctypes.Structure | ctypes.Union | ctypes.Array[typing.Any]) -> None:
        self.write(gpa, bytes(obj))

    # -- host memory management -----------------------------------------------------------------
    def discard(self, gpa: int, length: int) -> None:
        """Give the host memory behind a page-aligned guest range back to the host (the balloon).

        What that takes, and what the guest reads there afterwards, depends on the backing:

        * ANONYMOUS: MADV_DONTNEED frees the pages; they read as zeros and refault on touch.
        * FILE: MADV_DONTNEED drops this VM's private copies; the range reads as the *file's*
          bytes again (its page-cache pages stay, shared and reclaimable by the kernel).
        * SHARED: MADV_DONTNEED would only unmap the pages from this process while the memfd
          keeps them, so nothing would go back. fallocate(PUNCH_HOLE) frees them from the memfd
          itself (unmapping them from every process); they read as zeros everywhere afterwards.
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"discard of unaligned range [{gpa:#x}, +{length:#x})")
        off = self._offset(gpa, length)
        if self.backing is Backing.SHARED:
            assert self._fd is not None
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
            return
        self._mapping.madvise(mmap.MADV_DONTNEED, off, length)

    def advise(self, advice: int, gpa: int = 0, length: int | None = None) -> None:
        """madvise() a page-aligned guest range (default: all of RAM's host mapping)."""
        if length is None:
            self._mapping.madvise(advice, 0, self.size)
            return
        self._mapping.madvise(advice, self._offset(gpa, length), length)

    def populate(self) -> None:
        """Back every page of guest RAM with host memory now (QEMU's -mem-prealloc).

        ANONYMOUS and SHARED RAM is populated for writing (allocated). FILE RAM is populated for
        reading: its pages are mapped from the page cache and stay shared; populating it for
        writing would give this VM a private copy of every page and undo the sharing.
        """
        mapping = self._mapping
        write = self.backing is not Backing.FILE
        try:
            mapping.madvise(MADV_POPULATE_WRITE if write else MADV_POPULATE_READ, 0, self.size)
        except OSError:  # kernels before 5.14: touch one byte per page instead
            view = memoryview(mapping)
            for off in range(0, self.size, PAGE_SIZE):
                if write:
                    view[off] = view[off]
                else:
                    view[off]  # the read faults the page in
            view.release()

    # -- saving ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> int:
        """Write all of RAM to a new file at ``path`` (replacing any file there), sparsely; see
        :meth:`dump_to`. Returns the number of bytes written."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            return self.dump_to(fd)
        finally:
            os.close(fd)

    def dump_to(self, fd: int) -> int:
        """Write all of RAM to the regular file ``fd`` in the host mapping's layout (byte
        :meth:`host_offset` of a guest address; what :meth:`from_file` maps back), and return
        the number of bytes written. Call it while no vCPU runs.

        The file is emptied and set to the RAM's size first; then only pages holding a non-zero
        byte are written, so every all-zero page stays a hole on file systems with holes. To
        avoid even reading pages that cannot hold data, the scan looks only where data can be:
        ANONYMOUS RAM at pages /proc/self/pagemap says are in RAM or swap (a page never touched
        is neither), SHARED RAM at the memfd's data extents (SEEK_DATA), FILE RAM at both the
        mapped file's data extents and this VM's own pages.
        """
        mapping = self._mapping
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.size)
        view = memoryview(mapping)
        written = 0
        try:
            for start, length in self._data_runs():
                for off, n in _nonzero_runs(mapping, start, length):
                    written += _pwrite_all(fd, view[off:off + n], off)
        finally:
            view.release()
        return written

    def _data_runs(self) -> list[tuple[int, int]]:
        """Sorted, disjoint (offset, length) ranges of the host mapping outside of which every
        byte is known to be zero (without reading it)."""
        if self.backing is Backing.SHARED:
            assert self._fd is not None
            return _file_data_runs(self._fd, self.size)
        runs = _pagemap_runs(self.host_base, self.size)
        if self.backing is Backing.FILE:
            assert self._fd is not None
            runs = _merge_runs(runs + _file_data_runs(self._fd, self.size))
        return runs

    def close(self) -> None:
        if self._map is None:
            return
        del self._anchor
        self._mv16.release()
        self._mv.release()
        self._map.close()
        self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pagemap_runs(address: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) runs of the pages of [address, +size) that are in RAM or in swap.

    Only the top byte of each pagemap entry is looked at, through C-speed slicing and
    translation, so even a large mapping costs one pass over its pagemap. Where pagemap cannot
    be read, the whole range counts as a run.
    """
    pages = size // PAGE_SIZE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [(0, size)]
    flags = bytearray()
    try:
        first = address // PAGE_SIZE
        for batch in range(0, pages, _PAGEMAP_BATCH):
            count = min(_PAGEMAP_BATCH, pages - batch)
            raw = os.pread(fd, count * _PAGEMAP_ENTRY, (first + batch) * _PAGEMAP_ENTRY)
            if len(raw) != count * _PAGEMAP_ENTRY:
                return [(0, size)]
            flags += raw[_PAGEMAP_ENTRY - 1::_PAGEMAP_ENTRY].translate(_IN_USE_TABLE)
    except OSError:
        return [(0, size)]
    finally:
        os.close(fd)
    runs = []
    page = flags.find(1)
    while page >= 0:
        end = flags.find(0, page)
        end = pages if end < 0 else end
        runs.append((page * PAGE_SIZE, (end - page) * PAGE_SIZE))
        page = flags.find(1, end)
    return runs


def _file_data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) data extents of the file ``fd`` below ``size`` (SEEK_DATA/SEEK_HOLE);
    the whole range where the file system cannot say."""
    runs = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            runs.append((start, end - start))
            pos = end
    except OSError:
        return [(0, size)]
    return runs


def _merge_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(runs):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last_start, last_length = merged[-1]
            merged[-1] = (last_start, max(last_start + last_length, start + length) - last_start)
        else:
            merged.append((start, length))
    return merged


def _nonzero_runs(mapping: mmap.mmap, start: int, length: int) -> Iterator[tuple[int, int]]:
    """(offset, length) runs of whole pages in [start, +length) holding a non-zero byte.

    Chunks of 1 MiB are compared against zeros at memcmp speed; only a chunk with data in it is
    looked at page by page. ``start`` and ``length`` are page-aligned.
    """
    run_start = -1
    end = start + length
    for chunk_start in range(start, end, _SCAN_CHUNK):
        n = min(_SCAN_CHUNK, end - chunk_start)
        chunk = mapping[chunk_start:chunk_start + n]
        if chunk == _ZERO_CHUNK[:n]:
            if run_start >= 0:
                yield run_start, chunk_start - run_start
                run_start = -1
            continue
        for page in range(0, n, PAGE_SIZE):
            if chunk[page:page + PAGE_SIZE] == _ZERO_PAGE:
                if run_start >= 0:
                    yield run_start, chunk_start + page - run_start
                    run_start = -1
            elif run_start < 0:
                run_start = chunk_start + page
    if run_start >= 0:
        yield run_start, end - run_start


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + _PWRITE_MAX], offset + done)
    return done
