"""bzImage parsing and placement under the Linux x86 boot protocol (Documentation/x86/boot.rst).

A bzImage is [boot sector + real-mode setup: (setup_sects + 1) * 512 bytes][protected-mode code].
The protected-mode part starts with the 32-bit entry; the 64-bit entry (startup_64) is 0x200
bytes in. That part is a small decompressor wrapped around the compressed vmlinux (the payload);
at run time it decompresses the kernel to max(load address rounded up to kernel_alignment,
pref_address) and needs init_size bytes from there, which is what has to fit in guest RAM.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from ..memory.layout import HIGH_MEMORY_START
from .bootparams import (
    BOOT_FLAG,
    HDRS_MAGIC,
    HDRS_OFFSET,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
    protocol_str,
)
from .errors import BootError

SECTOR = 512
DEFAULT_SETUP_SECTS = 4          # setup_sects == 0 means 4 (boot.rst)
STARTUP_64_OFFSET = 0x200        # 64-bit entry, relative to the protected-mode load address
MIN_PROTOCOL = 0x0206            # cmdline_size, and the oldest 64-bit-capable header we accept
PAYLOAD_PROTOCOL = 0x0208        # payload_offset / payload_length
INIT_SIZE_PROTOCOL = 0x020A      # pref_address / init_size
XLOADFLAGS_PROTOCOL = 0x020C     # xloadflags (XLF_KERNEL_64)
DEFAULT_CODE32_START = HIGH_MEMORY_START


def looks_like_bzimage(data: bytes | memoryview) -> bool:
    return len(data) >= HDRS_OFFSET + 4 and struct.unpack_from("<I", data, HDRS_OFFSET)[0] == HDRS_MAGIC


@dataclass
class BzImage:
    header: SetupHeader          # the kernel's own setup header (fields past its length are 0)
    header_len: int              # how many header bytes the kernel has (from the jump at 0x200)
    protocol: int
    setup_size: int              # bytes before the protected-mode code
    pm: memoryview               # the protected-mode code (decompressor + payload)

    @property
    def protocol_str(self) -> str:
        return protocol_str(self.protocol)

    @property
    def has_64bit_entry(self) -> bool:
        return self.protocol >= XLOADFLAGS_PROTOCOL and bool(self.header.xloadflags & XLF_KERNEL_64)

    def payload(self) -> memoryview:
        """The compressed payload inside the protected-mode code; BootError if absent or out of bounds."""
        if self.protocol < PAYLOAD_PROTOCOL:
            raise BootError(f"boot protocol {self.protocol_str} predates payload_offset")
        off, length = self.header.payload_offset, self.header.payload_length
        if length == 0 or off + length > len(self.pm):
            raise BootError(f"the payload [{off:#x}, +{length:#x}) lies outside the "
                            f"{len(self.pm):#x}-byte protected-mode code")
        return self.pm[off:off + length]

    def placement(self) -> tuple[int, int]:
        """(load address of the protected-mode code, first byte past the kernel's run-time footprint).

        A relocatable kernel is loaded at its pref_address when that is a sane, aligned address, so
        the decompressor works in place; otherwise (non-relocatable or odd header) at 1 MiB, the
        classic code32_start. Either way the decompressor writes the kernel from
        max(align_up(load, kernel_alignment), pref_address) for init_size bytes.
        """
        h = self.header
        align = h.kernel_alignment
        if align == 0 or align & (align - 1):
            align = 0
        pref = h.pref_address if self.protocol >= INIT_SIZE_PROTOCOL else 0
        load = DEFAULT_CODE32_START
        if h.relocatable_kernel and pref >= HIGH_MEMORY_START and pref < 1 << 32 and \
                (align == 0 or pref % align == 0):
            load = pref
        if self.protocol >= INIT_SIZE_PROTOCOL and h.init_size:
            if h.relocatable_kernel:
                out = (load + align - 1) & ~(align - 1) if align else load
                out = max(out, pref)
            else:
                out = pref or load  # a fixed kernel always decompresses to LOAD_PHYSICAL_ADDR
            end = max(load + len(self.pm), out + h.init_size)
        else:
            # Without init_size, the old rule of thumb: the kernel grows to a few times its image.
            end = load + 4 * len(self.pm)
        return load, end


def parse_bzimage(data: bytes | memoryview) -> BzImage:
    """Validate a bzImage's setup header; BootError if it is unusable."""
    if not looks_like_bzimage(data):
        raise BootError("the kernel has no \"HdrS\" setup header")
    if len(data) < 0x202:
        raise BootError("the bzImage is truncated inside its setup header")
    # The header ends at 0x202 + the 8-bit displacement of the short jump at 0x200.
    header_end = min(HDRS_OFFSET + data[0x201], SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader))
    if header_end > len(data):
        raise BootError("the bzImage is truncated inside its setup header")
    raw = bytes(data[SETUP_HEADER_OFFSET:header_end]).ljust(ctypes.sizeof(SetupHeader), b"\0")
    header = SetupHeader.from_buffer_copy(raw)
    if header.boot_flag != BOOT_FLAG:
        raise BootError(f"the bzImage's boot_flag is {header.boot_flag:#06x}, not {BOOT_FLAG:#06x}")
    if header.version < MIN_PROTOCOL:
        raise BootError(f"the bzImage uses boot protocol {protocol_str(header.version)}; "
                        f"at least {protocol_str(MIN_PROTOCOL)} is needed")
    if not header.loadflags & LOADED_HIGH:
        raise BootError("the bzImage is a zImage that loads low (LOADED_HIGH is not set)")
    setup_sects = header.setup_sects or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size >= len(data):
        raise BootError("the bzImage is truncated: it has no protected-mode code after its setup")
    return BzImage(header=header, header_len=header_end - SETUP_HEADER_OFFSET,
                   protocol=header.version, setup_size=setup_size,
                   pm=memoryview(data)[setup_size:])
