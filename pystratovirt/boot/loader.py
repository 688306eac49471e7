"""load_kernel: put a Linux kernel, its initrd and every boot structure into guest RAM for a 64-bit entry.

:func:`prepare_kernel` does it in two steps: everything is checked and the boot structures are
written at once, while the copies that read a file (the kernel's segments from the payload
cache, the initrd) can wait until :meth:`KernelLoad.finish` -- the machine calls it when the
guest first runs. :func:`load_kernel` does both.

The vCPU is expected to start in long mode with CR3 = layout.PML4_ADDR, the GDT at layout.GDT_ADDR,
RIP = BootInfo.entry and RSI = BootInfo.boot_params (the Linux 64-bit boot protocol).

Kernel formats, detected in this order:
  * bzImage ("HdrS" at 0x202). With extract_payload, a gzip/xz/lz4/zstd payload is decompressed on
    the host and its vmlinux ELF loaded at its physical addresses, skipping the in-guest
    decompressor (which is slow when the guest's CPU is emulated). The result is kept in the
    extracted-payload cache (:mod:`.payload_cache`), so the next start of the same image reads it
    instead of decompressing (and, when the file's stat is unchanged, reads only the image's setup
    header). Anything that goes wrong there falls back to loading the bzImage as is and entering its
    startup_64, with a note saying why.
  * ELF64 vmlinux: PT_LOAD segments at p_paddr, entered at e_entry made physical.
  * anything else: a flat binary (objcopy -O binary vmlinux) loaded and entered at
    layout.VMLINUX_LOAD_ADDR, as early StratoVirt does.

Everything is validated before the first byte is written to guest RAM, so a BootError leaves
guest memory untouched except when the initrd file changes under us while it is being read.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..memory.layout import (
    CMDLINE_ADDR,
    CMDLINE_MAX,
    EBDA_START,
    GDT_ADDR,
    HIGH_MEMORY_START,
    IDT_ADDR,
    INITRD_ADDR_MAX,
    PAGE_SIZE,
    VMLINUX_LOAD_ADDR,
    ZERO_PAGE_ADDR,
    MiB,
)
from . import elf, payload
from .bootparams import (
    BOOT_FLAG,
    CAN_USE_HEAP,
    HDRS_MAGIC,
    KASLR_FLAG,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    BootParams,
    SetupHeader,
)
from .bzimage import STARTUP_64_OFFSET, BzImage, looks_like_bzimage, parse_bzimage
from .e820 import build_e820
from .errors import BootError
from .gdt import gdt_bytes
from .mptable import build_mptable
from .pagetables import page_tables
from .payload_cache import CachedPayload, PayloadCache

# The x86 kernel's COMMAND_LINE_SIZE is 2048 including the NUL; used when no header says otherwise.
DEFAULT_CMDLINE_SIZE = 2047
# The header version given to kernels that bring no setup header (raw binary, plain ELF).
FRESH_HEADER_VERSION = 0x020C
BDA_EBDA_SEGMENT = 0x40E          # BIOS data area word: the EBDA's real-mode segment
IDT_SIZE = 8                      # an "empty" IDT: one zero slot, smaller than any 16-byte gate

# Enough of a bzImage for parse_bzimage: the boot sector and at most 255 setup sectors, plus a page.
HEAD_BYTES = 256 * 512 + 4096
# Enough of a compact ELF for its headers: 64 bytes and at most elf.MAX_PHNUM program headers.
_ELF_HEAD = 64 << 10

# Magics of things that are plainly not a raw kernel binary (a compressed file or archive).
_NOT_RAW = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x02\x21\x4c\x18", b"BZh", b"\x89LZO",
            b"070701", b"070702")


@dataclass
class BootInfo:
    """Where the loaded kernel wants to be entered, and what went where."""

    entry: int                          # RIP, physical, 64-bit mode
    boot_params: int                    # RSI: guest address of the zero page
    kind: str                           # "bzimage", "bzimage-extracted:<codec>", "vmlinux-raw", "elf"
    kernel_end: int                     # first byte past the kernel's (run-time) footprint
    initrd: tuple[int, int] | None      # (guest address, size)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Kernel:
    """A validated kernel, not yet written to guest memory."""

    kind: str
    entry: int
    kernel_end: int
    header: SetupHeader | None          # the kernel's setup header (bzImage) or None
    header_len: int
    write: Callable[[], None]           # writes the kernel into guest memory
    notes: list[str]
    close: Callable[[], None] = lambda: None   # releases what write() would have read from
    from_file: bool = False             # write() reads a file (so it can wait); else it holds the bytes


# -- file reading ----------------------------------------------------------------------------------
def _open_regular(path, what: str):
    try:
        fspath = os.fspath(path)
    except TypeError:
        raise BootError(f"the {what} path {path!r} is not a file name") from None
    # stat before open: opening a FIFO would block, and reading /dev/zero would never end.
    try:
        st = os.stat(fspath)
    except (OSError, ValueError) as exc:
        raise BootError(f"cannot open the {what} {fspath!r}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if not stat.S_ISREG(st.st_mode):
        raise BootError(f"the {what} {fspath!r} is not a regular file")
    try:
        f = open(fspath, "rb")
    except OSError as exc:
        raise BootError(f"cannot open the {what} {fspath!r}: {exc.strerror or exc}") from None
    # the size of what was opened, in case the path was replaced since the stat
    return f, os.fstat(f.fileno()).st_size, fspath


class _KernelFile:
    """The opened kernel file; reads its head or all of it, whichever the chosen path needs."""

    def __init__(self, path, limit: int):
        self.file, size, self.name = _open_regular(path, "kernel")
        self.limit = limit
        self.stat = os.fstat(self.file.fileno())
        self._data: bytes | None = None
        self.unchanged = False           # the same stat before and after data() read the file
        if size > limit:
            self.close()
            raise BootError(f"the kernel {self.name!r} ({size / MiB:.1f} MiB) is larger than guest RAM")

    def _read(self, offset: int, count: int) -> bytes:
        try:
            return os.pread(self.file.fileno(), count, offset)
        except OSError as exc:
            raise BootError(f"cannot read the kernel {self.name!r}: {exc.strerror or exc}") from None

    def head(self) -> bytes:
        return self._data[:HEAD_BYTES] if self._data is not None else self._read(0, HEAD_BYTES)

    def data(self) -> bytes:
        if self._data is None:
            chunks, got = [], 0
            while got <= self.limit:
                # the size fstat gave (+1 to see the end), then MiB steps if the file grew since
                count = min(self.limit + 1 - got, max(self.stat.st_size + 1 - got, MiB))
                chunk = self._read(got, count)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
            if not data:
                raise BootError(f"the kernel {self.name!r} is empty")
            if len(data) > self.limit:
                raise BootError(f"the kernel {self.name!r} is larger than guest RAM")
            self.unchanged = len(data) == self.stat.st_size and self.still_unchanged()
            self._data = data
        return self._data

    def still_unchanged(self) -> bool:
        after = os.fstat(self.file.fileno())
        return (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == \
            (self.stat.st_mtime_ns, self.stat.st_ctime_ns, self.stat.st_size)

    def close(self) -> None:
        self.file.close()


# -- kernel formats --------------------------------------------------------------------------------
def _check_fits(mem, start: int, end: int, what: str) -> None:
    if not mem.contains(start, end - start):
        low_end = mem.regions[0].end
        raise BootError(f"the {what} needs guest RAM up to {end / MiB:.1f} MiB but low RAM ends at "
                        f"{low_end / MiB:.0f} MiB")


def _prepare_elf(mem, data: elf.ElfData, kind: str, notes: list[str]) -> _Kernel:
    image = elf.parse_elf(data)
    elf.check_placement(image, mem)
    return _Kernel(kind=kind, entry=image.entry, kernel_end=image.end, header=None, header_len=0,
                   write=lambda: elf.load_elf(mem, image, data), notes=notes)


def _prepare_raw(mem, data: bytes) -> _Kernel:
    if any(data.startswith(m) for m in _NOT_RAW):
        raise BootError("the kernel file is a compressed file or archive, not a kernel image")
    if data.startswith(elf.ELF_MAGIC):
        raise BootError("the kernel is an ELF file but not a loadable x86-64 vmlinux")
    end = VMLINUX_LOAD_ADDR + len(data)
    _check_fits(mem, VMLINUX_LOAD_ADDR, end, "raw kernel binary")
    return _Kernel(kind="vmlinux-raw", entry=VMLINUX_LOAD_ADDR, kernel_end=end, header=None,
                   header_len=0, write=lambda: mem.write(VMLINUX_LOAD_ADDR, data),
                   notes=[f"raw kernel binary of {len(data) / MiB:.1f} MiB loaded and entered at "
                          f"{VMLINUX_LOAD_ADDR:#x}"])


def _entry_note(kernel: _Kernel) -> str:
    return (f"entering the vmlinux ELF at {kernel.entry:#x} (no KASLR: the kernel runs at its "
            f"link-time address)")


def _from_cache(mem, bz: BzImage, entry: CachedPayload, t0: float) -> tuple[_Kernel | None, str]:
    """The cached vmlinux as a loadable kernel, or (None, why not) exactly as a fresh extraction
    of the same image would have said (the entry's checks make its content that extraction's).
    Only the ELF headers are read now; the segments go from the entry's file straight into guest
    RAM when the kernel is written (and the entry is closed then, or by :func:`_close`)."""
    if entry.decompressed_len > mem.size:
        entry.close()
        return None, f"the {entry.codec} payload decompresses to more than {mem.size} bytes"
    try:
        image = elf.parse_elf(entry.head(_ELF_HEAD), file_size=entry.size)
        elf.check_placement(image, mem)
    except (BootError, OSError) as exc:
        entry.close()
        return None, f"the decompressed payload is not a loadable vmlinux ({exc})"

    def write() -> None:
        try:
            for s in image.segments:
                if s.filesz:
                    entry.read_into(s.offset, mem.view(s.paddr, s.filesz))
                if s.memsz > s.filesz:
                    mem.fill(s.paddr + s.filesz, s.memsz - s.filesz, 0)
        except OSError as exc:
            raise BootError(f"cannot read the payload cache entry {entry.path}: "
                            f"{exc.strerror or exc}") from None
        finally:
            entry.close()

    ms = (time.perf_counter() - t0) * 1000
    kernel = _Kernel(kind=f"bzimage-extracted:{entry.codec}", entry=image.entry, kernel_end=image.end,
                     header=bz.header, header_len=bz.header_len, write=write, notes=[],
                     close=entry.close, from_file=True)
    kernel.notes.append(f"the {entry.codec.upper()} payload's vmlinux came from the payload cache "
                        f"({entry.path}, {entry.size / MiB:.1f} MiB, checked) in {ms:.0f} ms; "
                        f"{_entry_note(kernel)}")
    return kernel, ""


def _from_stat_index(mem, kfile: _KernelFile, cache: PayloadCache) -> _Kernel | None:
    """The cached kernel of an image whose stat matches the index, reading only its setup header;
    None sends the loader down the full path (read, hash, cache or decompress)."""
    t0 = time.perf_counter()
    digest = cache.digest_for(kfile.stat)
    if digest is None:
        return None
    head = kfile.head()
    if not looks_like_bzimage(head):
        return None
    try:
        bz = parse_bzimage(head)
    except BootError:
        return None
    entry = cache.get(digest)
    if entry is None:
        return None
    if not kfile.still_unchanged():     # rewritten since the index matched: its head may be new
        entry.close()
        return None
    kernel, _why = _from_cache(mem, bz, entry, t0)
    return kernel


def _try_extract(mem, bz: BzImage, kfile: _KernelFile,
                 cache: PayloadCache | None) -> tuple[_Kernel | None, str]:
    """The bzImage's payload as a loadable ELF kernel, or (None, why not)."""
    try:
        compressed = bz.payload()
    except BootError as exc:
        return None, str(exc)
    t0 = time.perf_counter()
    digest = None
    if cache is not None and payload.detect_codec(compressed) in payload.SUPPORTED:
        import hashlib  # a hit through the stat index never hashes

        digest = hashlib.sha256(kfile.data()).digest()
        entry = cache.get(digest)
        if entry is not None:
            kernel, why = _from_cache(mem, bz, entry, t0)
            if kfile.unchanged:
                cache.remember(kfile.stat, digest)
            return kernel, why
    try:
        codec, vmlinux = payload.decompress(compressed, limit=mem.size)
        image = elf.parse_elf(vmlinux)
    except payload.PayloadError as exc:
        return None, str(exc)
    except BootError as exc:
        return None, f"the decompressed payload is not a loadable vmlinux ({exc})"
    ms = (time.perf_counter() - t0) * 1000
    cached = ""
    if digest is not None and cache is not None and cache.put(digest, codec, len(vmlinux),
                                                              elf.compact(vmlinux)) is not None:
        cached = " (kept in the payload cache)"
        if kfile.unchanged:
            cache.remember(kfile.stat, digest)
    try:
        elf.check_placement(image, mem)
    except BootError as exc:
        return None, f"the decompressed payload is not a loadable vmlinux ({exc})"
    kernel = _Kernel(kind=f"bzimage-extracted:{codec}", entry=image.entry, kernel_end=image.end,
                     header=bz.header, header_len=bz.header_len,
                     write=lambda: elf.load_elf(mem, image, vmlinux), notes=[])
    kernel.notes.append(
        f"extracted a {len(vmlinux) / MiB:.1f} MiB {codec.upper()} payload "
        f"({len(compressed) / MiB:.1f} MiB compressed) on the host in {ms:.0f} ms{cached}; "
        f"{_entry_note(kernel)}")
    return kernel, ""


def _prepare_bzimage(mem, kfile: _KernelFile, extract_payload: bool,
                     cache: PayloadCache | None) -> _Kernel:
    bz = parse_bzimage(kfile.data())
    why = "host extraction is disabled"
    if extract_payload:
        kernel, why = _try_extract(mem, bz, kfile, cache)
        if kernel is not None:
            return kernel
    if not bz.has_64bit_entry:
        raise BootError(f"the bzImage (boot protocol {bz.protocol_str}) has no 64-bit entry point "
                        f"and its payload cannot be used instead: {why}")
    load, end = bz.placement()
    _check_fits(mem, load, end, "bzImage")
    pm = bz.pm

    def write() -> None:
        mem.write(load, pm)

    notes = [f"bzImage (boot protocol {bz.protocol_str}) loaded at {load:#x}, "
             f"decompresses itself in the guest ({why})"]
    return _Kernel(kind="bzimage", entry=load + STARTUP_64_OFFSET, kernel_end=end, header=bz.header,
                   header_len=bz.header_len, write=write, notes=notes)


def _prepare_kernel(mem, kfile: _KernelFile, extract_payload: bool, cache: PayloadCache | None) -> _Kernel:
    if extract_payload and cache is not None:
        kernel = _from_stat_index(mem, kfile, cache)
        if kernel is not None:
            return kernel
    data = kfile.data()
    if looks_like_bzimage(data):
        kernel = _prepare_bzimage(mem, kfile, extract_payload, cache)
        if kernel.kind == "bzimage":
            assert kernel.header is not None  # a bzImage has its setup header
            kernel.header.code32_start = kernel.entry - STARTUP_64_OFFSET
        return kernel
    if elf.is_elf(data) and len(data) >= 20 and data[4] == elf.ELFCLASS64:
        return _prepare_elf(mem, data, "elf", [])
    return _prepare_raw(mem, data)


# -- boot structures -------------------------------------------------------------------------------
def _fresh_header() -> SetupHeader:
    h = SetupHeader()
    h.boot_flag = BOOT_FLAG
    h.header = HDRS_MAGIC
    h.version = FRESH_HEADER_VERSION
    h.loadflags = LOADED_HIGH
    h.cmdline_size = DEFAULT_CMDLINE_SIZE
    h.initrd_addr_max = INITRD_ADDR_MAX
    return h


def _cmdline_bytes(cmdline: str, header: SetupHeader | None) -> bytes:
    if not isinstance(cmdline, str):
        raise BootError("the kernel command line must be a string")
    try:
        raw = cmdline.encode("utf-8")
    except UnicodeEncodeError:
        raise BootError("the kernel command line is not valid text") from None
    if b"\0" in raw:
        raise BootError("the kernel command line contains a NUL character")
    limit = DEFAULT_CMDLINE_SIZE
    if header is not None and header.cmdline_size:
        limit = header.cmdline_size
    limit = min(limit, CMDLINE_MAX)
    if len(raw) > limit:
        raise BootError(f"the kernel command line is {len(raw)} bytes long; this kernel accepts at "
                        f"most {limit}")
    return raw + b"\0"


def _place_initrd(size: int, kernel_end: int, low_end: int, header: SetupHeader | None) -> int:
    """The page-aligned address as high as allowed below the limits, above the kernel."""
    ceiling = min(INITRD_ADDR_MAX, low_end - 1)
    if header is not None and header.initrd_addr_max:
        ceiling = min(ceiling, header.initrd_addr_max)
    addr = (ceiling + 1 - size) & ~(PAGE_SIZE - 1)
    floor = (kernel_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if addr < floor:
        raise BootError(f"the initrd ({size / MiB:.1f} MiB) does not fit between the kernel's end at "
                        f"{floor:#x} and the initrd limit {ceiling + 1:#x}; give the VM more memory")
    return addr


def _zero_page(kernel: _Kernel, initrd: tuple[int, int] | None, e820) -> BootParams:
    params = BootParams()
    if kernel.header is not None:
        # Only the kernel's own header bytes: fields past its header_len stay zero, as boot.rst asks.
        ctypes.memmove(ctypes.addressof(params.hdr), ctypes.addressof(kernel.header), kernel.header_len)
    else:
        params.hdr = _fresh_header()
    hdr = params.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    # The 16-bit setup code (the only user of the heap) never runs, and KASLR_FLAG is the
    # decompressor's report to the kernel, not something a loader sets.
    hdr.loadflags = (hdr.loadflags | LOADED_HIGH) & ~(CAN_USE_HEAP | KASLR_FLAG) & 0xFF
    hdr.cmd_line_ptr = CMDLINE_ADDR & 0xFFFF_FFFF
    params.ext_cmd_line_ptr = CMDLINE_ADDR >> 32
    if initrd is not None:
        addr, size = initrd
        hdr.ramdisk_image = addr & 0xFFFF_FFFF
        hdr.ramdisk_size = size & 0xFFFF_FFFF
        params.ext_ramdisk_image = addr >> 32
        params.ext_ramdisk_size = size >> 32
    params.e820_entries = len(e820)
    for i, entry in enumerate(e820):
        params.e820_table[i].addr = entry.addr
        params.e820_table[i].size = entry.size
        params.e820_table[i].type = entry.type
    return params


# -- the entry point -------------------------------------------------------------------------------
def _payload_cache(choice) -> tuple[PayloadCache | None, list[str]]:
    if isinstance(choice, PayloadCache):
        return choice, []
    if choice is False:
        return None, []
    cache, why = PayloadCache.from_environment()
    return cache, [why] if why else []


class KernelLoad:
    """A kernel prepared by :func:`prepare_kernel`: validated, its boot structures written, and
    what is left to copy into guest RAM (the kernel's segments when they come from the payload
    cache, the initrd) held as open files until :meth:`finish`.

    The machine finishes the load when the guest is about to run for the first time (or before
    a snapshot of a VM that never ran), so a VM started with ``-S`` answers its management socket
    sooner and keeps megabytes of guest pages untouched until it is continued."""

    def __init__(self, info: BootInfo, pending: list[Callable[[], None]], closers: list[Callable[[], None]]):
        self.info = info
        self._pending = pending
        self._closers = closers

    @property
    def done(self) -> bool:
        return not self._pending

    def finish(self) -> None:
        """Copy what is left into guest RAM; raises BootError (the files are closed either way)."""
        try:
            while self._pending:
                self._pending.pop(0)()
        finally:
            self.close()

    def close(self) -> None:
        """Release the held files (what is left is not loaded)."""
        self._pending.clear()
        closers, self._closers = self._closers, []
        for close in closers:
            close()


def load_kernel(mem, kernel, cmdline: str, initrd=None, nr_cpus: int = 1,
                max_cpus: int | None = None, extract_payload: bool = True,
                payload_cache: PayloadCache | bool = True) -> BootInfo:
    """Load ``kernel`` (+ ``initrd``) into ``mem`` and write every boot structure; see the module
    doc and :func:`prepare_kernel` for the arguments."""
    load = prepare_kernel(mem, kernel, cmdline, initrd, nr_cpus, max_cpus, extract_payload, payload_cache)
    load.finish()
    return load.info


def prepare_kernel(mem, kernel, cmdline: str, initrd=None, nr_cpus: int = 1,
                   max_cpus: int | None = None, extract_payload: bool = True,
                   payload_cache: PayloadCache | bool = True) -> KernelLoad:
    """Validate ``kernel`` (+ ``initrd``) and write every boot structure into ``mem``; the bulk
    copies that can come later (the cached kernel's segments, the initrd) are left to
    :meth:`KernelLoad.finish`. Raises BootError, and then nothing is held.

    ``payload_cache``: True uses the cache the environment names (:mod:`.payload_cache`), False
    none, or a :class:`PayloadCache`.
    """
    if max_cpus is None:
        max_cpus = nr_cpus
    if not isinstance(nr_cpus, int) or not isinstance(max_cpus, int) or not 1 <= nr_cpus <= max_cpus:
        raise BootError(f"invalid vCPU counts: {nr_cpus} of at most {max_cpus}")
    if not mem.regions or mem.regions[0].gpa != 0 or mem.regions[0].end <= HIGH_MEMORY_START:
        raise BootError("guest RAM must start at address 0 and extend past 1 MiB to boot a kernel")
    low_end = mem.regions[0].end
    e820 = build_e820(mem.regions)
    mptable = build_mptable(nr_cpus, max_cpus)

    cache, cache_notes = _payload_cache(payload_cache) if extract_payload else (None, [])
    seen = len(cache.notes) if cache is not None else 0
    kfile = _KernelFile(kernel, mem.size)
    try:
        k = _prepare_kernel(mem, kfile, extract_payload, cache)
    finally:
        kfile.close()
    if cache is not None:
        cache_notes += cache.notes[seen:]     # this load's, when a caller reuses one cache

    initrd_file = None
    initrd_info = None
    try:
        cmdline_raw = _cmdline_bytes(cmdline, k.header)
        if initrd is not None:
            initrd_file, size, initrd_name = _open_regular(initrd, "initrd")
            if size == 0:
                raise BootError(f"the initrd {initrd_name!r} is empty")
            if size > low_end:
                raise BootError(f"the initrd {initrd_name!r} ({size / MiB:.1f} MiB) is larger than "
                                f"low guest RAM")
            initrd_info = (_place_initrd(size, k.kernel_end, low_end, k.header), size)

        # Everything is validated: now write guest memory.
        params = _zero_page(k, initrd_info, e820)
        mem.write(ZERO_PAGE_ADDR, bytes(params))
        mem.write(CMDLINE_ADDR, cmdline_raw)
        # The IDT goes first: with the 5-entry GDT the two overlap at IDT_ADDR, and the GDT's TSS
        # descriptor must win; the IDT's content is never read (no 16-byte gate fits in 8 bytes).
        mem.write(IDT_ADDR, bytes(IDT_SIZE))
        mem.write(GDT_ADDR, gdt_bytes())
        for gpa, page in page_tables():
            mem.write(gpa, page)
        mem.write(EBDA_START, mptable)
        mem.write_u16(BDA_EBDA_SEGMENT, EBDA_START >> 4)
        if not k.from_file:
            k.write()   # its bytes are in memory already: holding them until later would cost more
    except BaseException:
        k.close()
        if initrd_file is not None:
            initrd_file.close()
        raise

    pending = [k.write] if k.from_file else []
    closers = [k.close]
    if initrd_file is not None:
        def read_initrd(file=initrd_file, where=initrd_info, name=initrd_name) -> None:
            addr, size = where
            view = mem.view(addr, size)
            try:
                got = 0
                while got < size:
                    n = file.readinto(view[got:])
                    if not n:
                        break
                    got += n
            except OSError as exc:
                raise BootError(f"cannot read the initrd {name!r}: {exc.strerror or exc}") from None
            finally:
                view.release()
            if got != size:
                raise BootError(f"the initrd {name!r} shrank while it was being read")
        pending.append(read_initrd)
        closers.append(initrd_file.close)

    notes = list(k.notes) + cache_notes
    if initrd_info is not None:
        notes.append(f"initrd of {initrd_info[1] / MiB:.1f} MiB at {initrd_info[0]:#x}")
    info = BootInfo(entry=k.entry, boot_params=ZERO_PAGE_ADDR, kind=k.kind, kernel_end=k.kernel_end,
                    initrd=initrd_info, notes=notes)
    return KernelLoad(info, pending, closers)
